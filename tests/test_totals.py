"""Public totals: the arithmetic from ledger states, fed through the real webhook, and verify."""

from __future__ import annotations

import asyncio
import secrets
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import asyncpg
import pytest
from hypothesis import given
from hypothesis import strategies as st
from pytest_aiohttp import AiohttpClient

from donations import db, display, fees, totals
from donations.app import create_app
from donations.appkeys import TOTALS
from donations.campaigns import Campaign
from donations.money import Money, discount_columns, subscription_price
from donations.totals import Bucket, PaymentFacts, Tally, Window
from tests.conftest import Client, _admin, _with_database, make_settings
from tests.fakestripe.world import World
from tests.test_cli import _env, _run
from tests.test_staff import _bearer, _token
from tests.webhook_helpers import post_all

# --- pure arithmetic ------------------------------------------------------------------------


def test_rounding_is_half_up_with_integers() -> None:
    assert totals.muldiv(5, 1, 2) == 3
    assert totals.muldiv(4999, 1, 10) == 500
    assert totals.muldiv(10**15, 10**15, 3) == (10**30 + 1) // 3
    assert totals.settled_share(None, 500, 1000) == 0
    assert totals.settled_share(789, 500, 1000) == 395  # 394.5 rounds up
    assert totals.settled_share(789, 0, 1000) == 0


def test_subscription_prices_after_discounts_and_per_month() -> None:
    assert totals.price_after_discounts(1000, Decimal(50), None) == 500
    assert totals.price_after_discounts(999, Decimal(50), None) == 499  # 999 - 500
    assert totals.price_after_discounts(1000, Decimal("33.3333"), None) == 667
    assert totals.price_after_discounts(1000, None, 1500) == 0
    assert totals.annualised(500, "month", 1) == 6000
    assert totals.annualised(12000, "year", 1) == 12000
    assert totals.annualised(1500, "month", 3) == 6000
    assert totals.annualised(100, "week", 1) == 5200
    # yearly ones count a twelfth, the sum rounded once
    assert totals.monthly(5000 + 5000 + 5000) == 1250
    assert [totals.monthly(totals.annualised(5000, "year", 1))] * 3 == [417] * 3


def test_a_subscriptions_discount_columns_give_its_price_after_every_discount() -> None:
    """The row keeps (amount, percent_off, amount_off), which the triggers (sql/016's
    totals_price), the finance summary and verify read: a single discount on the whole price is
    kept as its terms, as before; several, or one on one item of several, as what they take off
    in all, so that every reader finds the price Stripe's invoice charges."""
    p50, p15, p20 = (Decimal(50), None), (Decimal(15), None), (Decimal(20), None)
    assert discount_columns([(999, [])], [p50]) == (Decimal(50), None)
    assert discount_columns([(999, [p50])], []) == (Decimal(50), None)  # one item
    assert discount_columns([(500, [])], [(None, 700)]) == (None, 700)
    assert discount_columns([(999, [])], [(None, None)]) == (None, None)
    assert discount_columns([(999, [])], []) == (None, None)
    # founding 50% then a 15% promotion: 999 -> 499 -> 424
    assert discount_columns([(999, [])], [p50, p15]) == (None, 575)
    # an item's 20% on one of two items: 1000 -> 800, + 500
    assert discount_columns([(1000, [p20]), (500, [])], []) == (None, 200)
    assert discount_columns([(1000, [p20]), (500, [])], [p50, (None, 250)]) == (
        None, 1100)
    # an amount off another currency took nothing: the other discount is the only one
    assert discount_columns([(999, [])], [(None, None), p50]) == (Decimal(50), None)
    # a percentage the column (four decimals) cannot hold exactly is kept as what it takes off
    assert discount_columns([(999, [])], [(Decimal("12.34567"), None)]) == (None, 123)


@given(st.lists(st.tuples(st.integers(0, 10**8),
                          st.lists(st.one_of(
                              st.tuples(st.decimals(0, 100, places=2), st.none()),
                              st.tuples(st.none(), st.integers(0, 10**8)),
                              st.just((None, None))), max_size=3)), min_size=1, max_size=3),
       st.lists(st.one_of(st.tuples(st.decimals(0, 100, places=2), st.none()),
                          st.tuples(st.none(), st.integers(0, 10**8)),
                          st.just((None, None))), max_size=3))
def test_the_discount_columns_always_give_the_price_stripe_charges(
    items: list[tuple[int, list[tuple[Decimal | None, int | None]]]],
    discounts: list[tuple[Decimal | None, int | None]],
) -> None:
    percent_off, amount_off = discount_columns(items, discounts)
    assert percent_off is None or amount_off is None  # the finance summary reads one of them
    amount = sum(a for a, _ in items)
    assert totals.price_after_discounts(amount, percent_off, amount_off) == subscription_price(
        items, discounts)


def test_percent_of_goal_has_two_decimals_rounded_half_up() -> None:
    assert totals.percent_of_goal(1_234_500, 5_000_000) == Decimal("24.69")
    assert totals.percent_of_goal(1, 8) == Decimal("12.50")
    assert totals.percent_of_goal(1, 200_000) == Decimal("0.00")
    assert totals.percent_of_goal(3, 40_000) == Decimal("0.01")  # 0.0075 up
    assert totals.percent_of_goal(7_000, 5_000) == Decimal("140.00")


def test_money_for_people_in_zero_two_and_three_decimal_currencies() -> None:
    assert display.money(1_234_500, "gbp") == "£12,345"
    assert display.money(1_234_567, "gbp") == "£12,345.67"
    assert display.money(1_234_505, "usd") == "$12,345.05"
    assert display.money(1_000_000, "jpy") == "¥1,000,000"
    assert display.money(1_234_500, "bhd") == "BHD\u00a01,234.5" + "00"
    assert display.money(1_234_567, "kwd") == "KWD\u00a01,234.567"
    assert display.money(50, "xof") == "XOF\u00a050"


def _payment(key: str, amount: int, **changes: Any) -> PaymentFacts:
    values: dict[str, Any] = {
        "payment_key": key, "status": "succeeded", "currency": "gbp", "amount": amount,
        "amount_refunded": 0, "amount_disputed": 0, "settlement_currency": None,
        "settlement_amount": None, "customer": None, "email": f"{key}@example.org",
        "campaign": None, "created_at": datetime(2026, 11, 1, tzinfo=UTC),
    }
    values.update(changes)
    return PaymentFacts(**values)


def test_summary_of_refunds_disputes_foreign_money_and_windows() -> None:
    window = Window(datetime(2026, 10, 1, tzinfo=UTC), datetime(2026, 12, 1, tzinfo=UTC))
    tally = Tally({"winter": window})
    for p in [
        _payment("a", 2500, campaign="winter", customer="cus_1"),
        _payment("b", 1000, campaign="winter", customer="cus_1"),  # same person
        _payment("c", 4000, amount_refunded=4000),  # wholly refunded: not counted
        _payment("d", 3000, amount_disputed=3000),  # held by an open dispute: counted, not raised
        _payment("l", 3000, amount_disputed=3000, dispute_lost=True),  # lost: not counted
        _payment("e", 4000, amount_refunded=1000, email="E@example.org"),
        _payment("f", 9000, status="failed"),
        _payment("g", 5000, campaign="winter", created_at=datetime(2026, 12, 1, tzinfo=UTC)),
        _payment("h", 2000, currency="usd", campaign="winter"),  # not settled yet
        _payment("i", 1000, currency="usd", settlement_currency="gbp", settlement_amount=789,
                 amount_refunded=500, email="e@EXAMPLE.org"),  # the same person as e
    ]:
        tally.add_payment(p)
    buckets = tally.finish()
    everything = {k[1:]: b for k, b in buckets.items() if k[0] == totals.GLOBAL}
    figures = totals.summarise(everything, founding_taken=3, reporting_currency="gbp",
                               founding_seats=2)
    assert figures.raised == Money(2500 + 1000 + 3000 + 5000 + 395, "gbp")
    assert figures.contributions == 7
    assert figures.supporters == 5  # cus_1 (twice), d, e (twice, any case), g, h
    assert figures.founding_seats_left == 0
    assert [(c.currency, c.raised, c.contributions) for c in figures.by_currency] == [
        ("gbp", 11500, 5), ("usd", 2500, 2)]

    goal = Money(10_000, "gbp")
    campaign = Campaign("winter", "Winter appeal", goal, window.starts, window.ends,
                        datetime(2026, 9, 1, tzinfo=UTC))
    scoped = {k[1:]: b for k, b in buckets.items() if k[0] == "winter"}
    winter = totals.summarise(scoped, founding_taken=0, reporting_currency="gbp",
                              founding_seats=10, campaign=campaign)
    assert (winter.raised.amount, winter.contributions, winter.supporters) == (3500, 3, 2)
    assert winter.percent_of_goal == Decimal("35.00")
    assert display.summary(winter) == "£35 raised of £100 · 2 supporters"


# --- ledger states through the webhook --------------------------------------------------------


async def _totals(client: Client, path: str = "/v1/totals") -> dict[str, Any]:
    client.app[TOTALS].clear()
    response = await client.get(path)
    assert response.status == 200, await response.text()
    body: dict[str, Any] = await response.json()
    return body


async def _create_campaign(client: Client, pool: asyncpg.Pool, **body: Any) -> None:
    token = await _token(pool, f"admin-{body['slug']}", "admin")
    response = await client.post("/v1/campaigns", headers=_bearer(token), json=body)
    assert response.status == 201, await response.text()


async def _verify_clean(pool: asyncpg.Pool) -> None:
    async with db.connection(pool) as conn:
        result = await totals.verify(conn)
    assert result.differences == (), list(totals.describe(result))


async def test_totals_follow_refunds_disputes_plans_and_the_founding_discount(
    client: Client, pool: asyncpg.Pool
) -> None:
    world = World(seed=401)
    world.one_off(2500, "gbp", email="ann@example.org")
    refunded = world.one_off(1000, "gbp", email="bob@example.org")
    world.refund(refunded.charge)
    partly = world.one_off(4000, "gbp", email="cat@example.org")
    world.refund(partly.charge, 1500)
    lost = world.one_off(3000, "gbp", email="dan@example.org")
    world.dispute(lost.charge, "lost")
    won = world.one_off(2000, "gbp", email="eve@example.org")
    world.dispute(won.charge, "won")
    held = world.one_off(700, "gbp", email="fay@example.org")
    world.dispute(held.charge)  # still under review: held
    monthly = world.subscribe(1000, "gbp", founding=True, email="gus@example.org")
    world.renew(monthly.subscription)
    world.subscribe(6000, "gbp", interval="year", email="hal@example.org")
    ended = world.subscribe(1000, "gbp", founding=True, email="ivy@example.org")
    world.cancel(ended.subscription, at_period_end=False)
    await post_all(client, world.events)

    body = await _totals(client)
    # 2500 + (4000 - 1500) + 2000 + 500 + 500 (founding 50% off, twice) + 6000 + 500
    assert body["raised"] == {"amount": 2500 + 2500 + 2000 + 500 * 3 + 6000, "currency": "gbp"}
    # the open dispute (fay) still counts; the lost one (dan) and the refunded one (bob) do not
    assert body["contributions"] == 1 + 1 + 1 + 1 + 2 + 1 + 1
    assert body["supporters"] == 7  # ann, cat, eve, fay, gus, hal, ivy
    assert body["active_subscriptions"] == 2
    assert body["monthly_recurring"] == {"amount": 500 + 500, "currency": "gbp"}
    assert body["founding_seats_left"] == 1000 - 2  # ivy's seat stays taken
    assert body["campaign"] is None and body["goal"] is None and body["percent_of_goal"] is None
    assert body["by_currency"][0]["currency"] == "gbp"
    assert body["as_of"].endswith("Z")
    await _verify_clean(pool)


async def test_an_inquiry_escalated_to_a_chargeback_holds_its_amount(
    client: Client, pool: asyncpg.Pool
) -> None:
    world = World(seed=404)
    world.one_off(2500, "gbp", email="ann@example.org")
    escalated = world.one_off(800, "gbp", email="jo@example.org")
    dispute = world.dispute(escalated.charge, inquiry=True)  # needs_response, money withdrawn
    await post_all(client, world.events)

    assert world.get(str(dispute.dispute))["status"] == "needs_response"
    row = await pool.fetchrow("SELECT status, amount_held FROM disputes")
    assert row is not None and tuple(row) == ("needs_response", 800)
    body = await _totals(client)
    assert body["raised"]["amount"] == 2500  # the 800 Stripe withdrew is held out
    assert body["contributions"] == 2  # an open dispute still counts, as in the contract
    await _verify_clean(pool)


async def test_active_subscriptions_count_every_currency_monthly_recurring_the_reporting_one(
    client: Client, pool: asyncpg.Pool
) -> None:
    world = World(seed=405)
    world.subscribe(1000, "gbp", email="gus@example.org")
    world.subscribe(1200, "usd", email="kim@example.org")
    await post_all(client, world.events)

    body = await _totals(client)
    assert body["active_subscriptions"] == 2
    assert body["monthly_recurring"] == {"amount": 1000, "currency": "gbp"}
    usd = next(c for c in body["by_currency"] if c["currency"] == "usd")
    assert usd["active_subscriptions"] == 1
    assert usd["monthly_recurring"] == {"amount": 1200, "currency": "usd"}
    await _verify_clean(pool)


async def test_a_foreign_payment_counts_once_settled_and_refunds_pro_rata(
    client: Client, pool: asyncpg.Pool
) -> None:
    world = World(seed=402)
    paid = world.one_off(10_000, "usd", email="sam@example.org")
    world.refund(paid.charge, 2500)
    await post_all(client, world.events)

    body = await _totals(client)
    assert body["raised"]["amount"] == 0  # the settled amount is not known yet
    assert body["contributions"] == 1 and body["supporters"] == 1
    assert body["by_currency"] == [{
        "currency": "usd", "raised": {"amount": 7500, "currency": "usd"}, "contributions": 1,
        "active_subscriptions": 0, "monthly_recurring": {"amount": 0, "currency": "usd"}}]

    assert paid.balance_transaction is not None
    settled = world.balance_transactions[paid.balance_transaction]
    async with db.connection(pool) as conn:  # what the fee worker does once Stripe answers
        await fees.store_balance_transaction(conn, settled)
    body = await _totals(client)
    assert body["raised"]["amount"] == totals.muldiv(settled["amount"], 7500, 10_000)
    await _verify_clean(pool)


async def test_campaign_totals_count_its_window_and_its_subscriptions(
    client: Client, pool: asyncpg.Pool
) -> None:
    world = World(seed=403)
    world.one_off(1000, "gbp", campaign="winter", email="early@example.org")
    world.advance(3600)
    opens = datetime.fromtimestamp(world.now, UTC)
    world.one_off(2500, "gbp", campaign="winter", email="ann@example.org")
    world.one_off(9999, "gbp", campaign="spring", email="bob@example.org")
    world.one_off(4000, "gbp", email="cat@example.org")
    monthly = world.subscribe(2000, "gbp", campaign="winter", founding=True,
                              email="dan@example.org")
    world.renew(monthly.subscription)
    world.subscribe(24000, "gbp", interval="year", campaign="winter", email="eve@example.org")
    await post_all(client, world.events[: len(world.events) // 2])
    # created while its contributions arrive: its totals are rebuilt from the ledger
    await _create_campaign(client, pool, slug="winter", title="Winter <appeal>",
                           goal={"amount": 50_000, "currency": "gbp"},
                           starts=opens.isoformat().replace("+00:00", "Z"))
    await post_all(client, world.events[len(world.events) // 2:])

    body = await _totals(client, "/v1/campaigns/winter/totals")
    raised = 2500 + 1000 * 2 + 24000
    assert body["campaign"] == "winter" and body["title"] == "Winter <appeal>"
    assert body["raised"] == {"amount": raised, "currency": "gbp"}
    assert body["goal"] == {"amount": 50_000, "currency": "gbp"}
    assert body["percent_of_goal"] == float(totals.percent_of_goal(raised, 50_000))
    assert (body["contributions"], body["supporters"]) == (4, 3)
    assert body["active_subscriptions"] == 2
    assert body["monthly_recurring"]["amount"] == 1000 + 2000
    assert body["founding_seats_left"] == 999
    assert body["display"]["summary"] == f"£{raised // 100:,} raised of £500 · 3 supporters"

    everything = await _totals(client)
    assert everything["contributions"] == 7
    missing = await client.get("/v1/campaigns/spring/totals")
    assert missing.status == 404
    assert (await missing.json())["error"]["code"] == "campaign_not_found"
    await _verify_clean(pool)


async def test_verify_reports_a_tampered_total_and_the_cli_exits_1(
    client: Client, pool: asyncpg.Pool, dsn: str
) -> None:
    world = World(seed=404)
    world.one_off(2500, "gbp", email="ann@example.org")
    await post_all(client, world.events)
    env = _env(DATABASE_URL=dsn)
    code, out, err = await _run("totals", "verify", env=env)
    assert code == 0, err
    assert "no differences" in out

    async with db.connection(pool) as conn:
        await totals.compact(conn)
        assert await conn.fetchval("SELECT count(*) FROM totals_deltas") == 0
        await conn.execute("UPDATE totals SET raised = raised + 1 WHERE currency = 'gbp'")
    code, out, _ = await _run("totals", "verify", env=env)
    assert code == 1
    assert "difference: bucket */gbp/ raised: stored 2501, expected 2500" in out


def test_buckets_add_up() -> None:
    a, b = Bucket(raised=1, supporters=2), Bucket(raised=2, founding=1)
    a.add(b)
    assert a == Bucket(raised=3, supporters=2, founding=1)
    assert Bucket().is_zero() and not a.is_zero()


async def test_new_figures_show_within_the_ttl(
    pool: asyncpg.Pool, dsn: str, aiohttp_client: AiohttpClient
) -> None:
    ttl = 1
    client = await aiohttp_client(create_app(make_settings(dsn, totals_ttl=ttl)))
    world = World(seed=405)
    world.one_off(2500, "gbp", email="ann@example.org")
    first = await client.get("/v1/totals")
    assert (await first.json())["contributions"] == 0
    await post_all(client, world.events)
    await asyncio.sleep(ttl + 0.05)
    later = await client.get("/v1/totals")
    assert (await later.json())["contributions"] == 1


async def test_a_contribution_written_while_its_campaign_is_created_counts_in_it(
    pool: asyncpg.Pool,
) -> None:
    """The trigger reads a campaign's window only once it holds the campaign's lock: a campaign
    created meanwhile is then committed and seen (its rebuild could not see this payment)."""
    async with pool.acquire() as creator, pool.acquire() as writer:
        creating = creator.transaction()
        await creating.start()
        await creator.execute("INSERT INTO campaigns (slug, title) VALUES ('spring', 'Spring')")
        writing = asyncio.ensure_future(writer.execute(
            """
            INSERT INTO payments (payment_key, kind, status, currency, amount, email, campaign,
                                  created_at)
            VALUES ('pi_spring1', 'one_off', 'succeeded', 'gbp', 2500, 'a@example.org',
                    'spring', now())
            """))
        await asyncio.sleep(0.3)
        assert not writing.done()  # waiting for the campaign's transaction
        await creating.commit()
        await writing
    async with db.connection(pool) as conn:
        result = await totals.verify(conn)
        raised = await conn.fetchval(
            "SELECT sum(raised) FROM (SELECT raised FROM totals WHERE scope = 'spring'"
            " UNION ALL SELECT raised FROM totals_deltas WHERE scope = 'spring') AS t")
    assert result.differences == (), list(totals.describe(result))
    assert raised == 2500


async def test_a_founding_discount_on_an_odd_amount_counts_what_each_invoice_charges(
    client: Client, pool: asyncpg.Pool
) -> None:
    # £9.99 a month at 50% off: Stripe takes 5.00 off (4.995 rounded half up) and charges 4.99
    world = World(seed=406)
    started = world.subscribe(999, "gbp", founding=True, email="odd@example.org")
    world.renew(started.subscription)
    await post_all(client, world.events)

    invoices = [v for v in world.objects.values() if v.get("object") == "invoice"
                and v["parent"]["subscription_details"]["subscription"] == started.subscription]
    assert {invoice["total"] for invoice in invoices} == {499}
    body = await _totals(client)
    assert body["raised"]["amount"] == 2 * 499
    assert body["monthly_recurring"] == {"amount": 499, "currency": "gbp"}
    await _verify_clean(pool)  # the triggers (sql/016) and the Python agree



async def _insert_payment(conn: asyncpg.Connection, key: str, amount: int, email: str) -> None:
    await conn.execute(
        "INSERT INTO payments (payment_key, kind, status, currency, amount, email, created_at)"
        " VALUES ($1, 'one_off', 'succeeded', 'gbp', $2, $3, $4)",
        key, amount, email, datetime(2026, 11, 10, 12, tzinfo=UTC))


async def _kept_supporters(conn: asyncpg.Connection) -> int:
    return int(await conn.fetchval(
        "SELECT coalesce(sum(supporters), 0) FROM (SELECT supporters FROM totals WHERE scope = '*'"
        " UNION ALL SELECT supporters FROM totals_deltas WHERE scope = '*') AS kept"))


async def test_verify_folds_supporters_emails_as_the_triggers_do(pool: asyncpg.Pool) -> None:
    """Python's str.lower and PostgreSQL's lower() disagree on some letters ('İ', a final 'Σ'):
    both sides fold only A-Z (sql/035), so `totals verify` finds no difference where there is
    none."""
    async with db.connection(pool) as conn:
        await _insert_payment(conn, "pi_ilkay", 1000, "İLKAY@example.org")
        await _insert_payment(conn, "pi_odys", 1000, "ΟΔΥΣ@example.org")
        await _insert_payment(conn, "pi_jane1", 1000, "Jane@Example.org")
        await _insert_payment(conn, "pi_jane2", 1000, "jane@example.ORG")
        result = await totals.verify(conn)
        assert await _kept_supporters(conn) == 3
    assert result.differences == (), list(totals.describe(result))


async def test_supporters_are_counted_alike_whatever_the_database_locale(
    server_dsn: str, pool: asyncpg.Pool
) -> None:
    """The same e-mails give the same supporters in a database whose LC_CTYPE is C (where
    lower() folds A-Z only) and in the suite's own (whatever its locale): case-insensitive in
    A-Z, 'ÉVA@…' and 'éva@…' two people everywhere."""
    emails = ("ÉVA@example.org", "éva@example.org", "Eva@example.org", "eva@EXAMPLE.org")

    async def count(conn: asyncpg.Connection) -> int:
        for i, email in enumerate(emails):
            await _insert_payment(conn, f"pi_locale_{i}", 1000, email)
        return await _kept_supporters(conn)

    name = f"donations_c_locale_{secrets.token_hex(4)}"
    await _admin(server_dsn, f'CREATE DATABASE "{name}" TEMPLATE template0 ENCODING \'UTF8\''
                             " LC_COLLATE 'C' LC_CTYPE 'C'")
    try:
        url = _with_database(server_dsn, name)
        await db.migrate(url)
        conn = await asyncpg.connect(url)
        try:
            in_c = await count(conn)
        finally:
            await conn.close()
    finally:
        await _admin(server_dsn, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    async with db.connection(pool) as conn:
        in_suite = await count(conn)
    assert (in_c, in_suite) == (3, 3)


async def test_sql_035_counts_again_the_supporters_an_earlier_folding_merged(
    server_dsn: str,
) -> None:
    """A database whose locale folded every letter kept 'ÉVA@…' and 'éva@…' as one supporter;
    sql/035 rebuilds the kept totals, so they are two, as on any other server."""
    name = f"donations_utf8_locale_{secrets.token_hex(4)}"
    try:
        await _admin(server_dsn, f'CREATE DATABASE "{name}" TEMPLATE template0'
                                 " ENCODING 'UTF8' LC_COLLATE 'C.UTF-8' LC_CTYPE 'C.UTF-8'")
    except asyncpg.PostgresError as exc:  # a server without that locale
        pytest.skip(f"no C.UTF-8 locale on this server: {exc}")
    try:
        url = _with_database(server_dsn, name)
        migrations = db.load_migrations()
        before = [m for m in migrations if m.name < "035"]
        await db.migrate(url, before)
        conn = await asyncpg.connect(url)
        try:
            await _insert_payment(conn, "pi_eva_1", 1000, "ÉVA@example.org")
            await _insert_payment(conn, "pi_eva_2", 1000, "éva@example.org")
            merged = await _kept_supporters(conn)
            await db.migrate(url, migrations)
            counted = await _kept_supporters(conn)
            result = await totals.verify(conn)
        finally:
            await conn.close()
    finally:
        await _admin(server_dsn, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    assert (merged, counted) == (1, 2)
    assert result.differences == (), list(totals.describe(result))
