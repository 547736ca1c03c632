"""Order independence and exactly-once with the newer shapes (dispute appeals,
uncaptured and released authorisations, invoices paid partly off Stripe, payments.settled_at).

Every scenario is built from events shaped as the pinned API (2026-10-28.endive) writes them
(tests/fakestripe/objects.py), delivered in every order, with duplicates, one by one racing or in
racing groups (as webhooks' group commit and reconciliation pages do), with the balance
transactions stored (fees.store_balance_transactions: the fee worker, payouts, reconciliation)
before, between or after. The database ledger must equal tests/ledger_check.reference of the same
events and balance transactions, the kept totals must equal `totals.verify`'s, and the rows must
say what Stripe's objects say in the end.
"""

from __future__ import annotations

import asyncio
import json
import secrets
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from donations import db, fees, store, totals
from donations.events import parse_event
from donations.ingest import ingest, ingest_many
from donations.ledger import BalanceTransaction, FoundingOffer
from tests.fakestripe import objects as o
from tests.fakestripe.world import World
from tests.ledger_check import dump, reference

OFFER = FoundingOffer()
T0 = 1_795_000_000
DAY = 86_400


def _ev(type_: str, obj: dict[str, Any], created: int, tag: str) -> dict[str, Any]:
    return o.event(type_, json.loads(json.dumps(obj)), created=created, id=f"evt_rv_{tag}")


@dataclass
class Scenario:
    name: str
    events: list[dict[str, Any]]
    bts: list[dict[str, Any]] = field(default_factory=list)
    # checks on the final reference/database ledger: what Stripe's objects say in the end
    check: Callable[[dict[str, Any]], None] = lambda ledger: None


def _card(pi: str, ch: str, amount: int, created: int, bt: str | None, **charge: Any
          ) -> tuple[dict[str, Any], dict[str, Any]]:
    intent = o.payment_intent(amount=amount, currency="gbp", created=created, id=pi,
                              latest_charge=ch, customer=f"cus_{pi}")
    chg = o.charge(amount=amount, currency="gbp", created=created, id=ch, payment_intent=pi,
                   customer=f"cus_{pi}", balance_transaction=bt)
    chg.update(charge)
    return intent, chg


def _authorised(pi: str, ch: str, amount: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """A manual-capture payment intent waiting for capture, and its charge not captured."""
    intent, held = _card(pi, ch, amount, T0, None, captured=False, amount_captured=0)
    intent.update(status="requires_capture", amount_capturable=amount, amount_received=0,
                  capture_method="manual")
    return intent, held


def _charge_bt(bt: str, ch: str, amount: int, created: int) -> dict[str, Any]:
    # 1.5 % + 20p, rounded half up, in integers
    return o.balance_transaction(amount=amount, currency="gbp", created=created, source=ch,
                                 type="charge", id=bt, fee=(amount * 15 + 500) // 1000 + 20,
                                 reporting_category="charge")


def appeal(outcome: str | None) -> Scenario:
    """A chargeback lost, appealed, and then won, lost again or still under appeal."""
    pi, ch, dp, txn = f"pi_rv_ap_{outcome}", f"ch_rv_ap_{outcome}", f"dp_rv_ap_{outcome}", \
        f"txn_rv_ap_{outcome}"
    intent, charge = _card(pi, ch, 2500, T0, txn)
    withdrawal = o.balance_transaction(amount=-2500, currency="gbp", created=T0 + DAY,
                                       source=dp, type="adjustment", fee=1500,
                                       id=f"txn_rv_apw_{outcome}", reporting_category="dispute")
    bts = [withdrawal]

    def d(status: str) -> dict[str, Any]:
        return o.dispute(amount=2500, currency="gbp", created=T0 + DAY, charge=ch,
                         payment_intent=pi, id=dp, status=status,
                         balance_transactions=list(bts))

    events = [
        _ev("payment_intent.succeeded", intent, T0, f"ap{outcome}1"),
        _ev("charge.succeeded", charge, T0, f"ap{outcome}2"),
        _ev("charge.dispute.created", d("needs_response"), T0 + DAY, f"ap{outcome}3"),
        _ev("charge.dispute.funds_withdrawn", d("needs_response"), T0 + DAY, f"ap{outcome}4"),
        _ev("charge.dispute.updated", d("under_review"), T0 + 3 * DAY, f"ap{outcome}5"),
        _ev("charge.dispute.closed", d("lost"), T0 + 33 * DAY, f"ap{outcome}6"),
        _ev("charge.dispute.updated", d("appeal_needs_response"), T0 + 34 * DAY, f"ap{outcome}7"),
        _ev("charge.dispute.updated", d("appeal_under_review"), T0 + 36 * DAY, f"ap{outcome}8"),
    ]
    final = "appeal_under_review"
    if outcome == "won":
        bts.append(o.balance_transaction(amount=2500, currency="gbp", created=T0 + 56 * DAY,
                                         source=dp, type="adjustment", id=f"txn_rv_apr_{outcome}",
                                         reporting_category="dispute_reversal"))
        events += [
            _ev("charge.dispute.closed", d("won"), T0 + 56 * DAY, f"ap{outcome}9"),
            _ev("charge.dispute.funds_reinstated", d("won"), T0 + 56 * DAY, f"ap{outcome}10"),
        ]
        final = "won"
    elif outcome == "lost":
        events.append(_ev("charge.dispute.closed", d("lost"), T0 + 56 * DAY, f"ap{outcome}9"))
        final = "lost"

    def check(ledger: dict[str, Any]) -> None:
        row = ledger["payments"][pi]
        assert ledger["disputes"][dp]["status"] == final
        held = 0 if final == "won" else 2500
        assert (row["status"], row["amount_disputed"], row["dispute_lost"]) == (
            "succeeded", held, final != "won")

    return Scenario(f"appeal_{outcome}", events,
                    [_charge_bt(txn, ch, 2500, T0), *bts], check)


def captured_later() -> Scenario:
    """Manual capture: authorised (charge.succeeded, captured: false), captured an hour later
    (charge.captured; since 2024-04-10 often without its balance transaction yet), then
    payment_intent.succeeded and charge.updated attaching the balance transaction."""
    pi, ch, txn = "pi_rv_cap", "ch_rv_cap", "txn_rv_cap"
    intent, held = _authorised(pi, ch, 3000)
    captured = dict(held, captured=True, amount_captured=3000)
    attached = dict(captured, balance_transaction=txn)
    done = dict(intent, status="succeeded", amount_capturable=0, amount_received=3000)
    events = [
        _ev("charge.succeeded", held, T0, "cap1"),
        _ev("charge.captured", captured, T0 + 3600, "cap2"),
        _ev("payment_intent.succeeded", done, T0 + 3600, "cap3"),
        _ev("charge.updated", attached, T0 + 3602, "cap4"),
    ]

    def check(ledger: dict[str, Any]) -> None:
        row = ledger["payments"][pi]
        assert (row["status"], row["amount"], row["amount_refunded"], row["charge"],
                row["balance_transaction"]) == ("succeeded", 3000, 0, ch, txn)

    return Scenario("captured_later", events, [_charge_bt(txn, ch, 3000, T0 + 3602)], check)


def released() -> Scenario:
    """An authorisation released without capture: the intent canceled, Stripe marks the charge
    refunded (captured: false) and makes a Refund for the released amount."""
    pi, ch = "pi_rv_rel", "ch_rv_rel"
    intent, held = _authorised(pi, ch, 2000)
    canceled = dict(intent, status="canceled", cancellation_reason="requested_by_customer",
                    amount_capturable=0, canceled_at=T0 + 3600)
    refunded = dict(held, amount_refunded=2000, refunded=True)
    refund = o.refund(amount=2000, currency="gbp", created=T0 + 3600, charge=ch,
                      payment_intent=pi, id="re_rv_rel", reason=None)
    events = [
        _ev("charge.succeeded", held, T0, "rel1"),
        _ev("payment_intent.canceled", canceled, T0 + 3600, "rel2"),
        _ev("charge.refunded", refunded, T0 + 3600, "rel3"),
        _ev("refund.created", refund, T0 + 3600, "rel4"),
    ]

    def check(ledger: dict[str, Any]) -> None:
        assert {k: p["status"] for k, p in ledger["payments"].items()} == {pi: "canceled"}

    return Scenario("released", events, [], check)


def partly_off_stripe() -> Scenario:
    """A renewal invoice of 1,000 paid 600 by card through Stripe and 400 recorded as paid
    outside Stripe (amount_paid_off_stripe): one payment of 600 under the payment intent."""
    sub, cus, inv = "sub_rv_oob", "cus_rv_oob", "in_rv_oob"
    pi, ch, txn = "pi_rv_oob", "ch_rv_oob", "txn_rv_oob"
    p = o.price(unit_amount=1000, currency="gbp", created=T0, product="prod_rv",
                id="price_rv_oob")
    item = o.subscription_item(price=p, subscription=sub, created=T0, id="si_rv_oob",
                               current_period_start=T0, current_period_end=T0 + 30 * DAY)
    line = o.invoice_line_item(invoice=inv, subscription=sub, subscription_item="si_rv_oob",
                               price=p, period_start=T0, period_end=T0 + 30 * DAY)
    invoice = o.invoice(id=inv, customer=cus, currency="gbp", created=T0, lines=[line],
                        subscription=sub, billing_reason="subscription_cycle",
                        finalized_at=T0, paid_at=T0 + 60)
    invoice["amount_paid_off_stripe"] = 400
    subscription = o.subscription(customer=cus, currency="gbp", created=T0 - 30 * DAY,
                                  items=[item], id=sub)
    intent, charge = _card(pi, ch, 600, T0 + 30, txn)
    intent["customer"] = charge["customer"] = cus
    by_card = o.invoice_payment(invoice=inv, amount_requested=600, currency="gbp",
                                created=T0, id="inpay_rv_oob_card", payment_intent=pi,
                                paid_at=T0 + 30)
    by_hand = o.invoice_payment(invoice=inv, amount_requested=400, currency="gbp",
                                created=T0, id="inpay_rv_oob_hand", paid_at=T0 + 60,
                                is_default=False)
    by_hand["payment"] = {"payment_record": "pr_rv_oob", "type": "payment_record"}
    events = [
        _ev("customer.subscription.created", subscription, T0 - 30 * DAY, "oob1"),
        _ev("invoice.finalized", dict(invoice, status="open", amount_paid=0,
                                      amount_paid_off_stripe=0, amount_remaining=1000),
            T0, "oob2"),
        _ev("payment_intent.succeeded", intent, T0 + 30, "oob3"),
        _ev("charge.succeeded", charge, T0 + 30, "oob4"),
        _ev("invoice_payment.paid", by_card, T0 + 30, "oob5"),
        _ev("invoice_payment.paid", by_hand, T0 + 60, "oob6"),
        _ev("invoice.paid", invoice, T0 + 60, "oob7"),
    ]

    def check(ledger: dict[str, Any]) -> None:
        taken = {k: (p["amount"], p["status"]) for k, p in ledger["payments"].items()}
        assert taken == {pi: (600, "succeeded")}
        assert ledger["payments"][pi]["invoice"] == inv

    return Scenario("partly_off_stripe", events, [_charge_bt(txn, ch, 600, T0 + 30)], check)


def nul_and_surrogate() -> Scenario:
    """A one-off whose metadata holds U+0000 and half a surrogate pair (escaped, as JSON must):
    stored and applied with both replaced by U+FFFD, once, whatever the order."""
    pi, ch, txn = "pi_rv_nul", "ch_rv_nul", "txn_rv_nul"
    intent, charge = _card(pi, ch, 1500, T0, txn)
    intent["metadata"] = {"note": "a\u0000b", "campaign": "winter"}
    charge["metadata"] = {"note2": "x\ud800y"}
    events = [_ev("payment_intent.succeeded", intent, T0, "nul1"),
              _ev("charge.succeeded", charge, T0, "nul2")]

    def check(ledger: dict[str, Any]) -> None:
        row = ledger["payments"][pi]
        assert row["status"] == "succeeded" and row["campaign"] == "winter"

    return Scenario("nul", events, [_charge_bt(txn, ch, 1500, T0)], check)


SCENARIOS: list[Callable[[], Scenario]] = [
    lambda: appeal("won"), lambda: appeal("lost"), lambda: appeal(None),
    captured_later, released, partly_off_stripe,
]


def _bt_rows(bts: list[dict[str, Any]]) -> dict[str, BalanceTransaction]:
    return {bt["id"]: BalanceTransaction.from_stripe(bt) for bt in bts}


async def _reset(pool: asyncpg.Pool) -> None:
    from tests.conftest import empty_tables
    await empty_tables(pool)
    await pool.execute("INSERT INTO campaigns (slug, title) VALUES ('winter', 'Winter')")


async def _assert_ledger(pool: asyncpg.Pool, scenario: Scenario, with_bts: bool) -> None:
    expected = reference(scenario.events, OFFER,
                         _bt_rows(scenario.bts) if with_bts else None)
    scenario.check(expected)
    got = await dump(pool)
    assert got == expected
    async with db.connection(pool) as conn:
        result = await totals.verify(conn)
    assert result.differences == (), list(totals.describe(result))


def _raw(event: dict[str, Any]) -> str:
    return json.dumps(event)


@st.composite
def _plans(draw: st.DrawFn) -> tuple[Scenario, list[dict[str, Any]], int, list[int], int, int]:
    scenario = draw(st.sampled_from(SCENARIOS))()
    shuffled = draw(st.permutations(scenario.events))
    repeats = draw(st.lists(st.sampled_from(scenario.events), max_size=len(scenario.events)))
    order = draw(st.permutations([*shuffled, *repeats]))
    racing = draw(st.sampled_from([1, 2, 3]))
    sizes = draw(st.lists(st.integers(1, 5), min_size=1, max_size=3))
    bts_at = draw(st.integers(0, len(order)))  # where the balance transactions are stored
    mode = draw(st.sampled_from([0, 1]))  # 0: events one by one racing; 1: racing groups
    return scenario, order, racing, sizes, bts_at, mode


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(plan=_plans())
async def test_new_shapes_in_any_order_racing_and_duplicated_give_the_reference(
    pool: asyncpg.Pool, plan: tuple[Scenario, list[dict[str, Any]], int, list[int], int, int]
) -> None:
    """Appeals, manual capture, released authorisations and invoices paid partly off Stripe,
    delivered in any order with duplicates, one by one or in groups racing each other, with the
    balance transactions stored at any point: the ledger the events describe, whole totals."""
    scenario, order, racing, sizes, bts_at, mode = plan
    await _reset(pool)

    async def deliver(events: list[dict[str, Any]]) -> None:
        if mode == 0:
            for start in range(0, len(events), racing):
                await asyncio.gather(*(ingest(pool, parse_event(e), _raw(e), OFFER)
                                       for e in events[start:start + racing]))
            return
        groups, start, n = [], 0, 0
        while start < len(events):
            groups.append(events[start:start + sizes[n % len(sizes)]])
            start, n = start + sizes[n % len(sizes)], n + 1
        for first in range(0, len(groups), racing):
            await asyncio.gather(*(
                ingest_many(pool, [(parse_event(e), _raw(e)) for e in g], OFFER,
                            source="reconcile" if i % 2 else "webhook")
                for i, g in enumerate(groups[first:first + racing])))

    await deliver(order[:bts_at])
    async with db.connection(pool) as conn:
        await fees.store_balance_transactions(conn, scenario.bts)
    await deliver(order[bts_at:])
    await _assert_ledger(pool, scenario, with_bts=True)


async def test_nul_and_lone_surrogate_events_apply_once_in_any_order(pool: asyncpg.Pool) -> None:
    """Events carrying U+0000 and a lone surrogate (escaped in the JSON body) are kept and
    applied once: a second delivery is a duplicate, and both orders give one payment."""
    scenario = nul_and_surrogate()
    for order in (scenario.events, scenario.events[::-1]):
        await _reset(pool)
        outcomes = [await ingest(pool, parse_event(e), _raw(e), OFFER) for e in order * 2]
        assert [x.value for x in outcomes] == ["processed"] * 2 + ["duplicate"] * 2
        ledger = await dump(pool)
        scenario.check(ledger)
        assert ledger["payments"]["pi_rv_nul"]["metadata"]["note"] == "a\ufffdb"
        assert ledger["payments"]["pi_rv_nul"]["metadata"]["note2"] == "x\ufffdy"


# --- defects --------------------------------------------------------------------------------


async def test_a_balance_transaction_stored_while_its_charge_event_applies_is_not_lost(
    pool: asyncpg.Pool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """charge.succeeded arrives without its balance transaction; the charge.updated that attaches
    it is being applied while the payout worker or a reconciliation run stores that same balance
    transaction. Whichever commits second sees the other (the payments trigger of sql/023 fills
    what is stored): the payment ends with its fee, net and settled_at, as the reference says."""
    pi, ch, txn = "pi_rv_race", "ch_rv_race", "txn_rv_race"
    intent, pending_bt = _card(pi, ch, 4000, T0, None)
    attached = dict(pending_bt, balance_transaction=txn)
    bt = _charge_bt(txn, ch, 4000, T0 + 2)
    first = [_ev("payment_intent.succeeded", intent, T0, "race1"),
             _ev("charge.succeeded", pending_bt, T0, "race2")]
    update = _ev("charge.updated", attached, T0 + 2, "race3")
    await _reset(pool)
    for e in first:
        await ingest(pool, parse_event(e), _raw(e), OFFER)

    read, stored = asyncio.Event(), asyncio.Event()
    real = store.load_clusters

    async def paused(*args: Any, **kwargs: Any) -> Any:
        clusters = await real(*args, **kwargs)
        if not read.is_set():
            read.set()
            await stored.wait()  # the balance transaction is stored meanwhile
        return clusters

    monkeypatch.setattr(store, "load_clusters", paused)

    async def store_bt() -> None:
        await read.wait()
        async with db.connection(pool) as conn:
            await fees.store_balance_transactions(conn, [bt])
        stored.set()

    await asyncio.gather(ingest(pool, parse_event(update), _raw(update), OFFER), store_bt())
    monkeypatch.setattr(store, "load_clusters", real)

    row = (await dump(pool))["payments"][pi]
    queued = await pool.fetchval("SELECT count(*) FROM balance_transaction_fetches")
    expected = reference([*first, update], OFFER, _bt_rows([bt]))["payments"][pi]
    # filled now, or at least a look-up queued that will fill it
    assert (row["fee"], row["settled_at"]) == (expected["fee"], expected["settled_at"]) \
        or queued == 1, (
        f"fee={row['fee']} settled_at={row['settled_at']} look-ups queued={queued}; "
        f"expected fee={expected['fee']} settled_at={expected['settled_at']}")


def _same_second_capture(uncaptured_id: str, captured_id: str) -> list[dict[str, Any]]:
    pi, ch = "pi_rv_same", "ch_rv_same"
    _, held = _card(pi, ch, 2000, T0, None, captured=False, amount_captured=0)
    captured = dict(held, captured=True, amount_captured=2000)
    return [
        o.event("charge.succeeded", held, created=T0, id=uncaptured_id),
        o.event("charge.captured", captured, created=T0, id=captured_id),
    ]


def test_a_charge_captured_in_the_second_it_was_authorised_is_money_taken() -> None:
    """A manual-capture charge captured within the second it was authorised: charge.succeeded
    (captured: false) and charge.captured share `created`, stage and type rank; capture is
    progress (it never goes back), so the captured snapshot is kept whatever the event ids, and
    the payment succeeded for 2,000."""
    results = {}
    for ids in (("evt_rv_same_a", "evt_rv_same_z"), ("evt_rv_same_z", "evt_rv_same_a")):
        row = reference(_same_second_capture(*ids), OFFER)["payments"]["pi_rv_same"]
        results[ids] = (row["status"], row["amount"])
    assert set(results.values()) == {("succeeded", 2000)}, results


# --- two snapshots of one subscription in one second -------------------------------------------


def _renewal_beside_a_discount(discount_id: str, renewal_id: str) -> tuple[World, str]:
    """Staff add a coupon in the second the subscription renews: two customer.subscription.updated
    of one subscription, one second, stage `active`, type rank 1; the discount's carries the
    period before, the renewal's the new one (with the discount). The ids are given."""
    world = World(seed=9)
    world.create_coupon("spring-20", percent_off=20)
    sub = world.subscribe(1000, "gbp").subscription
    end = int(world.objects[sub]["items"]["data"][0]["current_period_end"])
    world.now = end - 1
    discounted = world.discount_subscription(sub, "spring-20")  # at `end`, the old period
    renewal = world.renew(sub)  # at `end` too: the new period, with the discount
    old = discounted.of_type("customer.subscription.updated")[0]
    new = renewal.of_type("customer.subscription.updated")[0]
    assert old["created"] == new["created"]
    assert old["data"]["object"]["discounts"] == new["data"]["object"]["discounts"]
    old["id"], new["id"] = discount_id, renewal_id
    return world, sub


@pytest.mark.parametrize("ids", [("evt_rv_sub_z", "evt_rv_sub_a"),
                                 ("evt_rv_sub_a", "evt_rv_sub_z")])
async def test_a_renewal_and_another_update_in_one_second_keep_the_new_period(
    pool: asyncpg.Pool, ids: tuple[str, str]
) -> None:
    """The two tied on everything but the event id, which carries no order at Stripe: the row
    kept the period before, a month behind Stripe's, when the discount's id sorted last. A
    subscription's period only moves forward, so its start is progress: the renewal's snapshot
    is kept whatever the ids, by the reference and by the database in either order."""
    world, sub = _renewal_beside_a_discount(*ids)
    item = world.objects[sub]["items"]["data"][0]
    expected = reference(world.events, OFFER)
    row = expected["subscriptions"][sub]
    assert int(row["current_period_start"].timestamp()) == item["current_period_start"], (
        f"kept the period starting {row['current_period_start']}, Stripe's starts "
        f"{item['current_period_start']}")
    assert int(row["current_period_end"].timestamp()) == item["current_period_end"]
    assert row["percent_off"] == 20
    for order in (world.events, world.events[::-1]):
        await _reset(pool)
        for e in order:
            await ingest(pool, parse_event(e), _raw(e), OFFER)
        assert await dump(pool) == expected


def _same_second_updates(renewal_id: str, change_id: str) -> tuple[World, str]:
    """A monthly subscription renews at its period end while, in that same second, its price is
    changed (the customer portal, the Dashboard, an API script): two customer.subscription.updated
    of one subscription, one second, stage `active`, type rank 1, and the same (new) period."""
    world = World(seed=7)
    sub = world.subscribe(1000, "gbp").subscription
    end = int(world.objects[sub]["items"]["data"][0]["current_period_end"])
    world.now = end - 5
    renewal = world.renew(sub)  # customer.subscription.updated at `end`: the new period
    renewed = renewal.of_type("customer.subscription.updated")[0]
    changed = world.change_amount(sub, 2500)[0]  # a new price (and the new period)
    changed["created"] = renewed["created"]  # ... in the same second
    renewed["id"], changed["id"] = renewal_id, change_id
    return world, sub


@pytest.mark.xfail(strict=True, reason=(
    "a known limitation: two snapshots of one subscription in one second with the same period "
    "(a renewal, then a price change) tie on stage, progress, time and type, and the event id, "
    "which carries no order at Stripe, decides. Telling them apart needs the change's "
    "previous_attributes (what it changed from is the other snapshot) or, when two differing "
    "snapshots tie, a look-up of the subscription at Stripe"))
def test_two_updates_of_a_subscription_in_one_second_keep_the_later() -> None:
    """The ledger keeps the renewal's snapshot (the old price) over the price change made after
    it in the same second when the renewal's id sorts last: the row says 1,000 a month where
    Stripe charges 2,500 from now on, and monthly recurring is wrong until the subscription's
    next event; the same whatever the delivery order (the tie is decided by the ids)."""
    kept = {}
    for ids in (("evt_rv_tie_z_renewal", "evt_rv_tie_a_change"),
                ("evt_rv_tie_a_renewal", "evt_rv_tie_z_change")):
        world, sub = _same_second_updates(*ids)
        assert world.objects[sub]["items"]["data"][0]["price"]["unit_amount"] == 2500
        kept[ids] = reference(world.events, OFFER)["subscriptions"][sub]["amount"]
    assert set(kept.values()) == {2500}, kept


# --- the database's text collation decides ties the reference decides by code point ------------


@pytest.fixture
async def icu_pool(server_dsn: str) -> AsyncIterator[asyncpg.Pool]:
    """A scratch database made as many servers make theirs: a linguistic collation (here ICU
    en-US; en_US.UTF-8 from initdb on most Linux installs and managed services orders alike)."""
    name = f"donations_icu_{secrets.token_hex(4)}"
    admin = await asyncpg.connect(server_dsn)
    try:
        try:
            await admin.execute(
                f"CREATE DATABASE \"{name}\" TEMPLATE template0 ENCODING 'UTF8'"
                " LOCALE_PROVIDER icu ICU_LOCALE 'en-US' LOCALE 'C.UTF-8'")
        except asyncpg.PostgresError as exc:
            pytest.skip(f"no ICU collation on this server: {exc}")
    finally:
        await admin.close()
    url = urlunsplit(urlsplit(server_dsn)._replace(path=f"/{name}"))
    await db.migrate(url)
    pool = await db.create_pool(url, min_size=1, max_size=4)
    try:
        yield pool
    finally:
        await pool.close()
        admin = await asyncpg.connect(server_dsn)
        try:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await admin.close()


async def test_equal_ranked_snapshots_are_decided_as_the_reference_decides_them(
    icu_pool: asyncpg.Pool,
) -> None:
    """When two snapshots of one object tie on everything but the event id, the database decides
    as the reference does (by code point: event ids compared COLLATE "C"), whatever the
    database's own collation (here ICU en-US, where 'evt_…B' > 'evt_…a')."""
    events = _same_second_capture("evt_rv_same_B", "evt_rv_same_a")
    for e in events:
        await ingest(icu_pool, parse_event(e), _raw(e), OFFER)
    got = (await dump(icu_pool))["payments"]["pi_rv_same"]
    expected = reference(events, OFFER)["payments"]["pi_rv_same"]
    assert (got["status"], got["amount"]) == (expected["status"], expected["amount"])
    assert got == expected
