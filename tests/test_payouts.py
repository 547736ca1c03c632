"""Payouts: each payout's balance transactions fetched (paginated, through the stripe library)
from the fake Stripe, stored, reported joined to the ledger, and flagged when they do not sum."""

from __future__ import annotations

import asyncio
import csv
import io
import json
from typing import Any

import asyncpg
import pytest
import stripe
from pytest_aiohttp import AiohttpClient

from donations import auth, db, fees, payouts, reconcile, reports
from donations.app import create_app
from donations.ledger import FoundingOffer
from donations.settings import Secret
from tests.conftest import Client, make_settings
from tests.fakestripe import objects as o
from tests.fakestripe.server import FakeStripe, running_fake_stripe
from tests.fakestripe.world import DAY, Emitted, World
from tests.test_cli import _env, _run
from tests.test_fees import TEST_KEY, stripe_against
from tests.test_finance_tieout import settle
from tests.test_reconcile import START
from tests.webhook_helpers import post_all

WIDE = {"from": "2026-11-01", "to": "2027-03-01"}


async def _bearer(pool: asyncpg.Pool) -> dict[str, str]:
    async with db.connection(pool) as conn:
        return {"Authorization": "Bearer "
                + await auth.create_token(conn, "finance", ["reports:read"])}


def _world(seed: int) -> tuple[World, dict[str, str]]:
    world = World(seed=seed)
    paid = world.one_off(2500, "gbp", campaign="winter")
    usd = world.one_off(4000, "usd")
    refund = world.refund(usd.charge, 1000)
    disputed = world.one_off(3000, "gbp")
    dispute = world.dispute(disputed.charge, "lost")
    world.subscribe(700, "eur")
    return world, {"paid": paid.payment_intent, "charge": paid.charge, "refund": refund.refund,
                   "dispute": dispute.dispute, "disputed": disputed.payment_intent}


async def test_a_payout_whose_transactions_sum_to_it_is_balanced_and_joined_to_the_ledger(
    client: Client, pool: asyncpg.Pool
) -> None:
    world, ids = _world(601)
    paid_out = world.payout()
    await post_all(client, world.events)
    headers = await _bearer(pool)

    before = await (await client.get("/v1/reports/payouts", headers=headers,
                                     params=WIDE)).json()
    assert [(p["id"], p["status"], p["transactions_fetched"], p["balanced"])
            for p in before["data"]] == [(paid_out.payout, "paid", False, None)]

    async with stripe_against(world) as (fake, stripe_client):
        assert await payouts.run_once(pool, stripe_client) == 1
        assert await payouts.run_once(pool, stripe_client) == 0  # done: not fetched again
    listed = fake.requests_to("/v1/balance_transactions")
    assert len(listed) == 1 and listed[0].query.get("payout") == paid_out.payout

    body = await (await client.get("/v1/reports/payouts", headers=headers, params=WIDE)).json()
    payout = body["data"][0]
    po = world.get(paid_out.payout)
    assert payout["amount"] == {"amount": po["amount"], "currency": "gbp"}
    assert payout["arrival_date"] is not None
    assert (payout["balanced"], payout["difference"]["amount"]) == (True, 0)
    assert payout["transactions"] == len(paid_out.balance_transactions) - 1  # less its own
    assert body["unbalanced"] == []

    detail = await client.get(f"/v1/reports/payouts/{paid_out.payout}", headers=headers)
    assert detail.status == 200
    members = (await detail.json())["balance_transactions"]
    assert sorted(m["balance_transaction"] for m in members) == sorted(
        paid_out.balance_transactions)
    by_type = {(m["type"], m["reporting_category"]) for m in members}
    assert {("charge", "charge"), ("refund", "refund"), ("adjustment", "dispute"),
            ("payout", "payout")} <= by_type
    charge = next(m for m in members if m["source"] == ids["charge"])
    assert (charge["payment_key"], charge["campaign"], charge["payment_amount"]) == (
        ids["paid"], "winter", {"amount": 2500, "currency": "gbp"})
    refund = next(m for m in members if m["type"] == "refund")
    assert refund["refund"] == ids["refund"]
    assert refund["payment_amount"] == {"amount": -1000, "currency": "usd"}
    dispute = next(m for m in members if m["reporting_category"] == "dispute")
    assert (dispute["dispute"], dispute["payment_key"]) == (ids["dispute"], ids["disputed"])
    assert dispute["fee"] == {"amount": 2000, "currency": "gbp"}
    assert sum(m["net"]["amount"] for m in members if m["type"] != "payout") == po["amount"]
    # the listing also settled the payments whose fees were not fetched yet
    assert await pool.fetchval("SELECT count(*) FROM payments WHERE fee IS NULL") == 0

    missing = await client.get("/v1/reports/payouts/po_nope", headers=headers)
    assert missing.status == 404


async def test_the_window_report_gives_each_payout_with_its_balance_transactions(
    client: Client, pool: asyncpg.Pool
) -> None:
    """GET /v1/reports/payouts gives each payout of the window with the balance transactions
    that make it up (as the contract says), the same as GET /v1/reports/payouts/{id}; empty
    until they are fetched."""
    world = World(seed=611)
    world.one_off(2500, "gbp")
    world.one_off(4000, "gbp")
    paid_out = world.payout()
    await post_all(client, world.events)
    headers = await _bearer(pool)
    before = await (await client.get("/v1/reports/payouts", headers=headers,
                                     params=WIDE)).json()
    assert [p["balance_transactions"] for p in before["data"]] == [[]]
    async with stripe_against(world) as (_fake, stripe_client):
        assert await payouts.run_once(pool, stripe_client) == 1
    body = await (await client.get("/v1/reports/payouts", headers=headers, params=WIDE)).json()
    [payout] = body["data"]
    assert payout["id"] == paid_out.payout
    assert sorted(t["balance_transaction"] for t in payout["balance_transactions"]) == sorted(
        paid_out.balance_transactions)
    detail = await (await client.get(f"/v1/reports/payouts/{paid_out.payout}",
                                     headers=headers)).json()
    assert payout == detail


async def test_a_payout_id_that_is_no_stripe_id_is_404(client: Client, pool: asyncpg.Pool) -> None:
    """An id that is no Stripe payout id (one holding U+0000, which no text column can be
    compared with, or other characters Stripe's ids never have) is 404 `payout_not_found`."""
    headers = await _bearer(pool)
    for payout_id in ("po_%00", "po_1%00x", "po_%C2%B2", "po_", "ch_123"):
        response = await client.get(f"/v1/reports/payouts/{payout_id}", headers=headers)
        body = await response.json()
        assert (response.status, body["error"]["code"]) == (404, "payout_not_found"), payout_id


async def test_a_payout_whose_transactions_do_not_sum_to_it_is_flagged(
    client: Client, pool: asyncpg.Pool, dsn: str
) -> None:
    world, _ = _world(602)
    paid_out = world.payout()
    # Stripe lists one charge fewer than the payout holds: the parts no longer make the whole
    dropped = next(t for t in world.payout_members[paid_out.payout]
                   if world.balance_transactions[t]["type"] == "charge")
    world.payout_members[paid_out.payout].remove(dropped)
    await post_all(client, world.events)
    async with stripe_against(world) as (_, stripe_client):
        assert await payouts.run_once(pool, stripe_client) == 1
    headers = await _bearer(pool)
    body = await (await client.get("/v1/reports/payouts", headers=headers, params=WIDE)).json()
    payout = body["data"][0]
    assert payout["balanced"] is False
    assert payout["difference"] == {"amount": world.balance_transactions[dropped]["net"],
                                    "currency": "gbp"}
    assert body["unbalanced"] == [paid_out.payout]

    from tests.test_cli import _env, _run
    code, out, err = await _run("report", "payouts", "--from", WIDE["from"], "--to", WIDE["to"],
                                env=_env(DATABASE_URL=dsn))
    assert code == 1 and paid_out.payout in err
    rows = list(csv.DictReader(io.StringIO(out, newline="")))
    assert {r["payout"] for r in rows} == {paid_out.payout}
    assert {r["payout_balanced"] for r in rows} == {"false"}
    assert len(rows) == len(world.payout_members[paid_out.payout])


async def test_a_payout_not_fetched_yet_has_its_own_line_in_the_csv_and_fails_the_command(
    client: Client, pool: asyncpg.Pool, dsn: str
) -> None:
    world, _ = _world(606)
    paid_out = world.payout()
    await post_all(client, world.events)  # no worker run: its transactions are not known yet

    from tests.test_cli import _env, _run
    code, out, err = await _run("report", "payouts", "--from", WIDE["from"], "--to", WIDE["to"],
                                env=_env(DATABASE_URL=dsn))
    assert code == 1
    assert f"not fetched from Stripe yet (see donations lookups list): {paid_out.payout}" in err
    (row,) = list(csv.DictReader(io.StringIO(out, newline="")))
    amount = world.get(paid_out.payout)["amount"]
    assert (row["payout"], row["payout_status"], row["payout_amount"], row["payout_balanced"]) \
        == (paid_out.payout, "paid", f"{amount // 100}.{amount % 100:02d}", "")
    assert row["balance_transaction"] == row["amount"] == row["net"] == ""
    assert row["currency"] == row["payment_currency"] == row["payout_failure_code"] == ""
    # an automatic payout whose transactions are still to come, not a manual one
    assert (row["payout_currency"], row["payout_automatic"],
            row["payout_transactions_fetched"]) == ("gbp", "true", "false")


async def test_many_transactions_are_fetched_page_by_page(
    client: Client, pool: asyncpg.Pool
) -> None:
    world = World(seed=603)
    for i in range(130):
        world.one_off(100 + i, "gbp")
    paid_out = world.payout()
    await post_all(client, [e for e in world.events
                            if e["type"] == "payout.reconciliation_completed"])
    async with stripe_against(world) as (fake, stripe_client):
        assert await payouts.run_once(pool, stripe_client) == 1
        pages = fake.requests_to("/v1/balance_transactions")
    assert len(pages) == 2
    assert pages[1].query.get("starting_after")
    stored = await pool.fetchval(
        "SELECT count(*) FROM payout_balance_transactions WHERE payout = $1", paid_out.payout)
    assert stored == 131
    headers = await _bearer(pool)
    body = await (await client.get("/v1/reports/payouts", headers=headers, params=WIDE)).json()
    # no payment is in the ledger (only the payout's last event was sent), yet the sums tie
    assert body["data"][0]["balanced"] is True


async def test_stripe_errors_leave_the_payout_queued_with_backoff(
    client: Client, pool: asyncpg.Pool
) -> None:
    world, _ = _world(604)
    paid_out = world.payout()
    await post_all(client, world.events)
    async with stripe_against(world) as (fake, stripe_client):
        fake.fail_next(1, 500, path_prefix="/v1/balance_transactions", should_retry=False)
        assert await payouts.run_once(pool, stripe_client) == 0
        row = await pool.fetchrow("SELECT *, next_attempt_at - now() AS wait FROM payout_fetches")
        assert row is not None
        assert (row["payout"], row["attempts"], row["fetched_at"]) == (paid_out.payout, 1, None)
        assert row["last_error"].startswith("APIError")
        assert 5 < row["wait"].total_seconds() <= fees.backoff(1)
        assert await payouts.run_once(pool, stripe_client) == 0  # not due yet
        await pool.execute("UPDATE payout_fetches SET next_attempt_at = now()")
        assert await payouts.run_once(pool, stripe_client) == 1
    assert await pool.fetchval("SELECT fetched_at IS NOT NULL FROM payout_fetches")


async def _answered_not_found_until_set_aside(
    pool: asyncpg.Pool, fake: FakeStripe, stripe_client: stripe.StripeClient
) -> None:
    """The payout's look-up answered "no such object" as many times running as it takes."""
    fake.fail_next(fees.GIVE_UP_AFTER_NOT_FOUND, 404, path_prefix="/v1/balance_transactions")
    for _ in range(fees.GIVE_UP_AFTER_NOT_FOUND):
        assert await payouts.run_once(pool, stripe_client) == 0
        await pool.execute("UPDATE payout_fetches SET next_attempt_at = now()")


async def test_a_payout_stripe_keeps_not_finding_is_set_aside_until_its_status_changes(
    client: Client, pool: asyncpg.Pool
) -> None:
    world, _ = _world(605)
    paid_out = world.payout()
    await post_all(client, world.events)
    async with stripe_against(world) as (fake, stripe_client):
        await _answered_not_found_until_set_aside(pool, fake, stripe_client)
        row = await pool.fetchrow("SELECT * FROM payout_fetches")
        assert row is not None and row["gave_up_at"] is not None
        assert row["last_error"].startswith(
            f'set aside after {fees.GIVE_UP_AFTER_NOT_FOUND} "no such object" answers running; '
            "InvalidRequestError")
        asked = len(fake.requests_to("/v1/balance_transactions"))
        assert await payouts.run_once(pool, stripe_client) == 0  # set aside: not asked again
        assert len(fake.requests_to("/v1/balance_transactions")) == asked

        # news of the payout (here: it failed after all) is worth asking about again
        await pool.execute("UPDATE payouts SET status = 'failed' WHERE id = $1", paid_out.payout)
        assert await payouts.run_once(pool, stripe_client) == 1
    assert await pool.fetchval("SELECT gave_up_at IS NULL AND fetched_at IS NOT NULL "
                               "FROM payout_fetches")


async def test_the_worker_in_the_app_ties_a_payout_soon_after_its_webhook(
    pool: asyncpg.Pool, dsn: str, aiohttp_client: AiohttpClient
) -> None:
    world, _ = _world(605)
    paid_out = world.payout()
    async with running_fake_stripe(world) as fake:
        settings = make_settings(dsn, stripe_secret_key=Secret(TEST_KEY),
                                 stripe_api_base=fake.base_url, fee_worker_interval=0.05,
                                 payout_worker_interval=0.05)
        app_client = await aiohttp_client(create_app(settings))
        await post_all(app_client, world.events)
        for _ in range(100):  # the worker polls every 50 ms: give it up to 5 s
            if await pool.fetchval("SELECT fetched_at IS NOT NULL FROM payout_fetches "
                                   "WHERE payout = $1", paid_out.payout):
                break
            await asyncio.sleep(0.05)
        headers = await _bearer(pool)
        body = await (await app_client.get("/v1/reports/payouts", headers=headers,
                                           params=WIDE)).json()
        assert body["data"][0]["balanced"] is True
        await app_client.close()
    # the fee worker ran beside it: every payment settled
    assert await pool.fetchval("SELECT count(*) FROM payments WHERE fee IS NULL") == 0


async def test_a_cancelled_payout_does_not_leave_the_payout_report_failing_for_ever(
    client: Client, pool: asyncpg.Pool, dsn: str
) -> None:
    """A manual payout cancelled while pending (its money never left Stripe) has no
    transactions to fetch or tie: the report lists it and does not fail for it."""
    world = World(seed=907)
    po = _manual_payout(world, "canceled", after=60)
    await post_all(client, world.events)
    async with stripe_against(world) as (_, stripe_client):
        for _ in range(3):
            await payouts.run_once(pool, stripe_client)
    assert await pool.fetchval("SELECT count(*) FROM payout_fetches") == 0  # nothing to look up
    code, out, err = await _run("report", "payouts", "--from", "2026-11-01", "--to", "2027-03-01",
                              env=_env(DATABASE_URL=dsn))
    assert (code, err) == (0, ""), err
    assert po["id"] in out


def _manual_payout(world: World, outcome: str = "paid", after: int = 2 * DAY) -> dict[str, Any]:
    """A payout requested by hand (stripe/_payout.py `automatic`: false "if it's requested
    manually"; `reconciliation_status` `not_applicable`), four days after a payment, `outcome`
    (paid, or canceled) `after` seconds after it was made: payout.created, payout.<outcome>."""
    world.one_off(2500, "gbp")
    world.advance(4 * DAY)
    emitted = Emitted()
    po = world._put(o.payout(ids=world.ids, amount=1000, currency="gbp", created=world.now,
                             arrival_date=(world.now // DAY + 2) * DAY, status="pending",
                             automatic=False))
    assert po["reconciliation_status"] == "not_applicable"
    world._emit(emitted, "payout.created", po)
    world.advance(after)
    po["status"] = outcome
    world._emit(emitted, f"payout.{outcome}", po)
    return po


async def _payout_report(pool: asyncpg.Pool) -> tuple[payouts.Written, dict[str, Any]]:
    chunks: list[bytes] = []

    async def write(chunk: bytes) -> None:
        chunks.append(chunk)

    async with db.connection(pool) as conn:
        written = await payouts.write_report(
            conn, reports.window(WIDE["from"], WIDE["to"]), "json", write)
    return written, json.loads(b"".join(chunks))


async def test_a_manual_payout_paid_does_not_leave_the_payout_report_failing_for_ever(
    client: Client, pool: asyncpg.Pool, dsn: str
) -> None:
    """A manual payout cannot be tied through the Balance Transactions API: its `payout`
    filter is "For automatic Stripe payouts only" (stripe/params/
    _balance_transaction_list_params.py), and `reconciliation_status` says transactions can be
    listed by payout only when it is `completed` (stripe/_payout.py). Stripe answers such a
    listing with a 400 invalid_request_error, for ever (a 400 is not a "no such object": it
    would never be set aside). So it is never queued, never asked for, and reported without a
    tie (`balanced` null, as a cancelled one is), not as a payout whose transactions are
    still to fetch: `donations report payouts` does not fail for it."""
    world = World(seed=4101)
    po = _manual_payout(world)
    await post_all(client, world.events)

    async with stripe_against(world) as (fake, stripe_client):
        for _ in range(3):
            await payouts.run_once(pool, stripe_client)
            await pool.execute("UPDATE payout_fetches SET next_attempt_at = now()")
        assert fake.requests_to("/v1/balance_transactions") == []
    assert await pool.fetchval("SELECT count(*) FROM payout_fetches") == 0  # nothing to look up
    written, body = await _payout_report(pool)
    assert written.payouts == 1
    assert (written.unfetched, written.unbalanced) == ([], [])
    [payout] = body["data"]
    assert (payout["id"], payout["status"], payout["automatic"],
            payout["reconciliation_status"], payout["transactions_fetched"],
            payout["balanced"], payout["fetch_error"]) == (
        po["id"], "paid", False, "not_applicable", False, None, None)
    code, out, err = await _run("report", "payouts", "--from", WIDE["from"], "--to", WIDE["to"],
                                env=_env(DATABASE_URL=dsn))
    assert (code, err) == (0, ""), err
    # the CSV says why it has no tie: a manual payout, for finance to tie by hand
    (row,) = list(csv.DictReader(io.StringIO(out, newline="")))
    assert (row["payout"], row["payout_amount"], row["payout_currency"], row["payout_balanced"],
            row["payout_automatic"], row["payout_reconciliation_status"],
            row["payout_transactions_fetched"]) == (
        po["id"], "10.00", "gbp", "", "false", "not_applicable", "false")


async def test_a_manual_payout_an_earlier_release_queued_is_taken_out_of_the_queue(
    client: Client, pool: asyncpg.Pool
) -> None:
    """A manual payout queued by an earlier release (which queued `not_applicable` ones, and
    whose replicas may still run during a deploy), its listing refused by Stripe at every
    try, is taken out of the queue by the worker's next pass without asking Stripe again: it
    leaves `donations lookups list`, and the report does not count it as unfetched."""
    world = World(seed=4104)
    po = _manual_payout(world)
    await post_all(client, world.events)
    await pool.execute(
        "INSERT INTO payout_fetches (payout, payout_status, attempts, last_error)"
        " VALUES ($1, 'paid:not_applicable', 9, 'InvalidRequestError: Balance transaction"
        " history can only be filtered on automatic transfers, not manual.')", po["id"])
    async with stripe_against(world) as (fake, stripe_client):
        assert await payouts.run_once(pool, stripe_client) == 0
        assert fake.requests_to("/v1/balance_transactions") == []
    assert await pool.fetchval("SELECT count(*) FROM payout_fetches") == 0
    written, _ = await _payout_report(pool)
    assert (written.payouts, written.unfetched, written.unbalanced) == (1, [], [])


async def test_stripe_refuses_to_list_a_manual_payouts_transactions() -> None:
    """The fake answers as Stripe does: `?payout=` of a manual payout is a 400
    invalid_request_error naming `payout` (an automatic one's are listed)."""
    world = World(seed=4105)
    po = _manual_payout(world)
    automatic = world.payout()
    async with stripe_against(world) as (_, stripe_client):
        with pytest.raises(stripe.InvalidRequestError) as refused:
            await stripe_client.v1.balance_transactions.list_async(params={"payout": po["id"]})
        listed = await stripe_client.v1.balance_transactions.list_async(
            params={"payout": automatic.payout, "limit": 100})
    assert (refused.value.http_status, refused.value.param) == (400, "payout")
    assert "automatic" in str(refused.value.user_message)
    assert sorted(bt.id for bt in listed.data) == sorted(automatic.balance_transactions)


async def test_a_failed_refund_typed_adjustment_is_money_coming_back_in_the_payout_report(
    client: Client, pool: asyncpg.Pool
) -> None:
    """Stripe's balance transaction for a failed refund is typed by `reporting_category`
    (stripe/_balance_transaction.py `type`: "To classify transactions for accounting purposes,
    consider `reporting_category` instead"; Stripe's reporting-categories guide: the category
    "separates balance transactions with type=adjustment into … disputes, dispute reversals, and
    failed refunds"). A failed refund's reversal can therefore be `type: adjustment`,
    `reporting_category: refund_failure` (the fake writes `type: refund_failure`): the money it
    brings back is positive in the report's `payment_amount`, not a second refund going out."""
    world = World(seed=4102)
    paid = world.one_off(5000, "gbp")
    refunded = world.refund(paid.charge, 2000)
    failed = world.fail_refund(str(refunded.refund))
    failure_bt = world.balance_transactions[str(failed.balance_transaction)]
    failure_bt["type"] = "adjustment"  # as Stripe types it; the category says what it is
    assert failure_bt["reporting_category"] == "refund_failure" and failure_bt["amount"] > 0
    paid_out = world.payout()
    await post_all(client, world.events)
    async with stripe_against(world) as (_, stripe_client):
        assert await payouts.run_once(pool, stripe_client) == 1
    async with db.connection(pool) as conn:
        (report,) = await payouts.payouts_with_members(conn, payout_id=paid_out.payout)
    members = {m["balance_transaction"]: m for m in report["balance_transactions"]}
    back = members[failure_bt["id"]]
    assert back["refund"] == refunded.refund
    assert back["payment_amount"] == {"amount": 2000, "currency": "gbp"}  # money back: positive
    out = members[str(refunded.balance_transaction)]
    assert out["payment_amount"] == {"amount": -2000, "currency": "gbp"}


async def test_a_failed_bank_debit_in_a_payout_is_its_payment_in_and_out_again(
    client: Client, pool: asyncpg.Pool
) -> None:
    """A bank debit booked when submitted and reversed when it failed has both transactions in
    the payout that pays them out: the booking (category `charge`) and the reversal (category
    `charge_failure`, type `payment_failure_refund`) are both joined to the failed payment, the
    one with its amount in, the other with it out again; together they net to what Stripe kept
    (its fee, which it does not give back), and the payout ties."""
    world = World(seed=4106)
    world.one_off(2500, "gbp")
    debit = world.async_checkout(3000, "eur", False, booked=True)
    charge = world.get(debit.charge)
    paid_out = world.payout()
    assert {charge["balance_transaction"], charge["failure_balance_transaction"]} <= set(
        paid_out.balance_transactions)
    await post_all(client, world.events)
    async with stripe_against(world) as (_, stripe_client):
        assert await payouts.run_once(pool, stripe_client) == 1
    async with db.connection(pool) as conn:
        (report,) = await payouts.payouts_with_members(conn, payout_id=paid_out.payout)
    assert report["balanced"] is True
    members = {m["balance_transaction"]: m for m in report["balance_transactions"]}
    booked = members[charge["balance_transaction"]]
    reversed_ = members[charge["failure_balance_transaction"]]
    for member in (booked, reversed_):
        assert (member["payment_key"], member["charge"], member["refund"]) == (
            debit.payment_intent, debit.charge, None)
    assert booked["payment_amount"] == {"amount": 3000, "currency": "eur"}
    assert reversed_["payment_amount"] == {"amount": -3000, "currency": "eur"}
    fee = world.balance_transactions[charge["balance_transaction"]]["fee"]
    assert booked["net"]["amount"] + reversed_["net"]["amount"] == -fee
    # the failed payment keeps no fee or net: it kept no money
    row = await pool.fetchrow("SELECT status, fee, net FROM payments WHERE payment_key = $1",
                              debit.payment_intent)
    assert row is not None and (row["status"], row["fee"], row["net"]) == ("failed", None, None)


async def test_a_payout_is_fetched_once_stripe_has_finished_reconciling_it(
    client: Client, pool: asyncpg.Pool
) -> None:
    """Stripe lists a payout's transactions in full only once reconciliation_status is
    completed: a paid payout still being reconciled waits, its
    payout.reconciliation_completed queues it."""
    world, _ = _world(607)
    paid_out = world.payout()
    (completed,) = [e for e in world.events if e["type"] == "payout.reconciliation_completed"]
    await post_all(client, [e for e in world.events if e is not completed])
    async with stripe_against(world) as (fake, stripe_client):
        assert await payouts.run_once(pool, stripe_client) == 0
        assert fake.requests_to("/v1/balance_transactions") == []
        assert await pool.fetchval("SELECT reconciliation_status FROM payouts") == "in_progress"

        await post_all(client, [completed])
        assert await payouts.run_once(pool, stripe_client) == 1
    headers = await _bearer(pool)
    body = await (await client.get("/v1/reports/payouts", headers=headers, params=WIDE)).json()
    assert [(p["id"], p["balanced"]) for p in body["data"]] == [(paid_out.payout, True)]


async def test_payout_put_back_by_a_status_change_is_not_set_aside_by_one_404(
    client: Client, pool: asyncpg.Pool
) -> None:
    """A payout put back in the queue by a status change starts its count of "no such
    object" answers again: one more 404 does not set it aside."""
    world, _ = _world(605)
    paid_out = world.payout()
    await post_all(client, world.events)
    async with stripe_against(world) as (fake, stripe_client):
        await _answered_not_found_until_set_aside(pool, fake, stripe_client)
        assert await pool.fetchval("SELECT gave_up_at IS NOT NULL FROM payout_fetches")

        # the payout's status changes: enqueue puts it back in the queue
        await pool.execute("UPDATE payouts SET status = 'failed' WHERE id = $1", paid_out.payout)
        fake.fail_next(1, 404, path_prefix="/v1/balance_transactions")
        assert await payouts.run_once(pool, stripe_client) == 0
        row = await pool.fetchrow("SELECT gave_up_at, not_found_in_a_row, last_error"
                                  " FROM payout_fetches")
    assert row is not None
    assert row["gave_up_at"] is None, (row["not_found_in_a_row"], row["last_error"])


async def test_a_worker_stopped_mid_fetch_leaves_the_payouts_it_leased_due_at_once(
    client: Client, pool: asyncpg.Pool
) -> None:
    """As for the fee worker: stopped by a shutdown while Stripe lists a payout's transactions,
    the payouts it had leased are due again at once, not after the five-minute lease."""
    world = World(seed=611)
    world.one_off(2500, "gbp")
    first = world.payout()
    world.one_off(3500, "gbp")
    second = world.payout()
    await post_all(client, world.events)
    async with stripe_against(world) as (fake, stripe_client):
        in_flight = fake.hold("/v1/balance_transactions")
        worker = asyncio.create_task(payouts.worker(pool, stripe_client, 60))
        await asyncio.wait_for(in_flight.arrived.wait(), 10)
        worker.cancel()
        with pytest.raises(asyncio.CancelledError):
            await worker
        in_flight.release()
        assert await payouts.run_once(pool, stripe_client) == 2
    assert await pool.fetchval(
        "SELECT count(*) FROM payout_fetches WHERE fetched_at IS NOT NULL AND payout = any($1)",
        [first.payout, second.payout]) == 2


async def test_a_window_of_payouts_is_streamed_a_payout_at_a_time(
    client: Client, pool: asyncpg.Pool, dsn: str
) -> None:
    """A window's payouts are read through a cursor and written one payout at a time (a year of
    daily payouts holds every movement of the year): the same payouts, in the same order, each
    with the same transactions as its own report, whatever the cursor's batch, and a payout not
    fetched yet keeps its place with none; the HTTP answer is chunked, the command's the same."""
    world = World(seed=612)
    ids = []
    for n in range(3):
        for i in range(3 + n):
            world.one_off(1000 + 100 * n + i, "gbp")
        ids.append(world.payout().payout)
    await post_all(client, world.events)
    async with stripe_against(world) as (_fake, stripe_client):
        assert await payouts.run_once(pool, stripe_client) == 3
    # the last one's transactions not fetched yet
    await pool.execute("DELETE FROM payout_balance_transactions WHERE payout = $1", ids[2])
    await pool.execute("UPDATE payout_fetches SET fetched_at = NULL WHERE payout = $1", ids[2])
    headers = await _bearer(pool)
    one_by_one = [await (await client.get(f"/v1/reports/payouts/{payout_id}",
                                          headers=headers)).json() for payout_id in ids]
    assert [len(p["balance_transactions"]) for p in one_by_one] == [4, 5, 0]
    win = reports.window(WIDE["from"], WIDE["to"])
    for batch in (1, 2, 3, 4, 1000):  # a batch ending inside, at the end of, across payouts
        async with db.connection(pool) as conn:
            found = [p async for p in payouts.each_payout(conn, win, batch=batch)]
        assert found == one_by_one, batch

    response = await client.get("/v1/reports/payouts", headers=headers, params=WIDE)
    assert response.headers.get("Transfer-Encoding") == "chunked"
    assert await response.json() == {"window": win.as_json(), "data": one_by_one,
                                     "unbalanced": []}
    code, out, err = await _run("report", "payouts", "--from", WIDE["from"], "--to", WIDE["to"],
                                "--format", "json", env=_env(DATABASE_URL=dsn))
    assert code == 1 and ids[2] in err  # (its transactions are not fetched yet)
    assert json.loads(out) == {"window": win.as_json(), "data": one_by_one, "unbalanced": []}


async def test_payouts_are_listed_in_the_order_they_fall_in_the_window_zone(
    pool: asyncpg.Pool,
) -> None:
    """Payouts are listed in the order they fall in the report's zone (the start of the
    arrival day there, or the creation when Stripe gave no arrival date), not by the arrival
    day's midnight UTC. In Pacific/Pago_Pago (-11) a payout arriving on 11 January falls at
    11:00 UTC, after one with no arrival date created at 05:00 UTC."""
    await pool.execute(
        "INSERT INTO payouts (id, status, amount, currency, arrival_date, automatic, created_at)"
        " VALUES ('po_arrives_11th', 'paid', 100, 'usd', '2026-01-11T00:00:00Z', true,"
        "         '2026-01-09T00:00:00Z'),"
        "        ('po_created_10th', 'paid', 200, 'usd', NULL, true, '2026-01-11T05:00:00Z')")
    win = reports.window("2026-01-10", "2026-01-12", "Pacific/Pago_Pago")
    async with db.connection(pool) as conn:
        found = await payouts.payouts_with_members(conn, win)
    assert [p["id"] for p in found] == ["po_created_10th", "po_arrives_11th"]



def test_the_csv_names_the_currency_of_each_amount_and_neutralises_every_text_cell() -> None:
    """`payout_currency`, the balance transaction's `currency` and `payment_currency` beside the
    amounts they are the currency of; what Stripe or the ledger wrote in a text cell (here a
    reconciliation status and a failure code beginning as a formula would) is neutralised."""
    gbp, jpy = {"amount": 500, "currency": "gbp"}, {"amount": 1000, "currency": "jpy"}
    member = dict.fromkeys(payouts.MEMBER_FIELDS) | {
        "balance_transaction": "txn_1", "type": "payment", "amount": gbp, "fee": gbp,
        "net": gbp, "payment_amount": jpy, "campaign": "=HYPERLINK(1)"}
    payout = {"id": "po_1", "status": "failed", "arrival_date": "2026-11-20T00:00:00Z",
              "amount": {"amount": 12345, "currency": "eur"}, "balanced": False,
              "automatic": True, "reconciliation_status": "+in_progress",
              "transactions_fetched": True, "failure_code": "@code",
              "balance_transactions": [member]}
    (cells,) = payouts.csv_rows([payout])
    line = dict(zip(payouts.CSV_COLUMNS, cells, strict=True))
    assert (line["payout_amount"], line["payout_currency"]) == ("123.45", "eur")
    assert (line["amount"], line["fee"], line["net"], line["currency"]) == (
        "5.00", "5.00", "5.00", "gbp")
    assert (line["payment_amount"], line["payment_currency"]) == ("1000", "jpy")
    assert (line["payout_automatic"], line["payout_transactions_fetched"],
            line["payout_balanced"]) == ("true", "true", "false")
    assert (line["payout_reconciliation_status"], line["payout_failure_code"],
            line["campaign"]) == ("'+in_progress", "'@code", "'=HYPERLINK(1)")
    # the new columns sit beside their kin, the old ones keep their order
    columns = list(payouts.CSV_COLUMNS)
    assert columns[columns.index("payout_amount") + 1] == "payout_currency"
    assert columns[columns.index("net") + 1] == "currency"
    assert columns[columns.index("payment_amount") + 1] == "payment_currency"
    old = ["payout", "payout_status", "payout_arrival_date", "payout_amount",
           "payout_balanced", *payouts.MEMBER_FIELDS]
    assert [c for c in columns if c in old] == old


# --- found in review: what the payouts CSV says of its amounts and of a payout without a tie ---


async def _payouts_csv(pool: asyncpg.Pool, win: reports.Window) -> list[dict[str, str]]:
    out: list[bytes] = []

    async def write(chunk: bytes) -> None:
        out.append(chunk)

    async with db.connection(pool) as conn:
        await payouts.write_report(conn, win, "csv", write)
    return list(csv.DictReader(io.StringIO(b"".join(out).decode("utf-8"), newline="")))


async def test_the_payouts_csv_says_which_currency_each_amount_is_in(
    client: Client, pool: asyncpg.Pool
) -> None:
    """The payouts CSV writes `payout_amount`, `amount`, `fee`, `net` (the balance transaction's
    currency) and `payment_amount` (the payment's currency) in major units: a ¥1,000 payment's
    line reads `payment_amount` 1000 beside an `amount` of 5.00, and the file says that the one
    is yen and the other pounds."""
    world = World(seed=9103, start=1_795_000_000)
    jpy = world.one_off(1000, "jpy")
    world.one_off(2500, "gbp")
    paid_out = world.payout()
    await settle(client, pool, world)

    lines = await _payouts_csv(pool, reports.window(WIDE["from"], WIDE["to"]))
    (line,) = [r for r in lines if r["payment_intent"] == jpy.payment_intent]
    assert line["payout"] == paid_out.payout
    assert (line["payment_amount"], line["amount"]) == ("1000", "5.00")
    assert (line["payment_currency"], line["currency"], line["payout_currency"]) == (
        "jpy", "gbp", "gbp")


async def test_the_payouts_csv_tells_a_manual_payout_from_one_whose_transactions_are_awaited(
    client: Client, pool: asyncpg.Pool
) -> None:
    """A manual payout (never to be tied: finance ties it by hand) and an automatic one whose
    transactions are simply not fetched yet (come back later) both have an empty
    `payout_balanced`; the CSV tells them apart (`payout_automatic`,
    `payout_reconciliation_status`, `payout_transactions_fetched`)."""
    world = World(seed=9105, start=1_795_000_000)
    world.one_off(2500, "gbp")
    world.advance(4 * 86400)
    manual = world._put(o.payout(ids=world.ids, amount=1000, currency="gbp", created=world.now,
                                 arrival_date=(world.now // 86400 + 2) * 86400,
                                 status="pending", automatic=False))
    emitted = Emitted()
    world._emit(emitted, "payout.created", manual)
    world.advance(2 * 86400)
    manual["status"] = "paid"
    world._emit(emitted, "payout.paid", manual)
    world.one_off(4000, "gbp")
    automatic = world.payout()
    await post_all(client, world.events)  # the payout worker has not fetched anything yet

    lines = {r["payout"]: r for r in await _payouts_csv(
        pool, reports.window(WIDE["from"], WIDE["to"]))}
    hand, awaited = lines[manual["id"]], lines[automatic.payout]
    assert (hand["payout_status"], hand["payout_balanced"]) == ("paid", "")
    assert (awaited["payout_status"], awaited["payout_balanced"]) == ("paid", "")
    own = ("payout", "payout_arrival_date", "payout_amount")

    def why(line: dict[str, str]) -> dict[str, str]:
        return {k: v for k, v in line.items() if k not in own}

    assert why(hand) != why(awaited), (hand, awaited)
    assert (hand["payout_automatic"], hand["payout_reconciliation_status"]) == (
        "false", "not_applicable")
    assert (awaited["payout_automatic"], awaited["payout_transactions_fetched"]) == (
        "true", "false")


async def test_the_payout_worker_does_not_overwrite_a_fee_reported_as_disagreeing(
    client: Client, pool: asyncpg.Pool
) -> None:
    """A payment whose fee differs from its balance transaction's is reported (fee_mismatch)
    and left as the ledger has it; the payout worker, storing the payout's transactions, fills
    only what the ledger lacks, so it does not overwrite that fee either (README: a disagreeing
    ledger value is never overwritten)."""
    world = World(seed=7305)
    paid = world.one_off(5000, "gbp")
    await post_all(client, world.events)
    async with stripe_against(world) as (_, stripe_client):
        await reconcile.run(pool, stripe_client, FoundingOffer(), since=START, now=world.now + 60)
        fee = await pool.fetchval("SELECT fee FROM payments WHERE payment_key = $1",
                                  paid.payment_intent)
        assert fee is not None
        bt = world.balance_transactions[str(paid.balance_transaction)]
        bt["fee"] += 7
        bt["net"] -= 7
        found = await reconcile.run(pool, stripe_client, FoundingOffer(), since=START,
                                    now=world.now + 60)
        assert [(d.kind, d.stripe_id) for d in found.open] == [("fee_mismatch", paid.charge)]
        paid_out = world.payout()
        await post_all(client, paid_out.events)
        assert await payouts.run_once(pool, stripe_client) == 1
    after = await pool.fetchval("SELECT fee FROM payments WHERE payment_key = $1",
                                paid.payment_intent)
    assert after == fee  # recorded, never overwritten
