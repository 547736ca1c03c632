"""Order independence: any permutation of the same events, with duplicates, gives one ledger,
and that ledger agrees with what Stripe's objects say in the end."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import asyncpg
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from donations import db, importer, totals
from donations.events import parse_event
from donations.ingest import ingest, ingest_many
from donations.ledger import FoundingOffer
from donations.money import apply_percent_off
from tests.conftest import empty_tables
from tests.fakestripe.world import World
from tests.ledger_check import dump, reference
from tests.scenarios import History, deliveries, histories

OFFER = FoundingOffer()


@settings(max_examples=150, deadline=None)
@given(data=st.data())
def test_any_order_with_duplicates_gives_the_same_ledger(data: st.DataObject) -> None:
    history = data.draw(histories())
    shuffled = data.draw(deliveries(history.events))
    assert reference(shuffled, OFFER) == reference(history.events, OFFER)


@settings(max_examples=100, deadline=None)
@given(history=histories())
def test_the_ledger_agrees_with_stripes_final_objects(history: History) -> None:
    world = history.world
    # with the coupons the coupon worker looks up (Stripe's events leave an amount-off
    # coupon's amounts in other currencies out; the look-up expands them)
    looked_up = [importer.synthetic_event(c, "coupon.updated", world.now)
                 for c in world.objects.values()
                 if c.get("object") == "coupon" and "currency_options" in c]
    ledger = reference([*history.events, *looked_up], OFFER)
    payments = ledger["payments"]
    succeeded = {p["charge"]: p for p in payments.values() if p["status"] == "succeeded"}
    charges = {i: o for i, o in world.objects.items()
               if o.get("object") == "charge" and o["status"] == "succeeded"}
    # every successful charge is exactly one contribution, with Stripe's amounts
    assert set(succeeded) == set(charges)
    for charge_id, charge in charges.items():
        row = succeeded[charge_id]
        assert (row["amount"], row["currency"]) == (charge["amount"], charge["currency"])
        assert row["amount_refunded"] == charge["amount_refunded"]
        dispute = next((o for o in world.objects.values() if o.get("object") == "dispute"
                        and o["charge"] == charge_id), None)
        held = dispute["amount"] if dispute and dispute["status"] in (
            "needs_response", "under_review", "lost", "appeal_needs_response",
            "appeal_under_review") else 0
        assert row["amount_disputed"] == held
    for sub_id in history.subscriptions:
        stripe_sub = world.objects[sub_id]
        row = ledger["subscriptions"][sub_id]
        assert row["status"] == stripe_sub["status"]
        assert row["cancel_at_period_end"] == stripe_sub["cancel_at_period_end"]
        price = stripe_sub["items"]["data"][0]["price"]
        assert row["amount"] == price["unit_amount"]
        assert row["interval"] == price["recurring"]["interval"]
        # the price after its discounts is what Stripe's invoices charge (founding, a Dashboard
        # coupon by percentage or by amount in the subscription's currency)
        off, _ = world._discount_amount(stripe_sub, price["unit_amount"])
        after = (apply_percent_off(row["amount"], row["percent_off"])
                 if row["percent_off"] is not None
                 else max(0, row["amount"] - (row["amount_off"] or 0)))
        assert after == price["unit_amount"] - off, (row, stripe_sub["discounts"])
    # a payment is never counted under its invoice once its payment intent is known
    assert not [k for k, p in payments.items() if k.startswith("in_")]


async def _reset(pool: asyncpg.Pool) -> None:
    """An empty ledger, and campaigns for the histories' metadata: one open, one long over (its
    payments count in no campaign's totals), one with no window at all."""
    await empty_tables(pool)
    await pool.execute(
        "INSERT INTO campaigns (slug, title, starts_at, ends_at) VALUES"
        " ('winter', 'Winter', NULL, NULL),"
        " ('spring', 'Spring', '1999-03-01', '1999-06-01'),"
        " ('founders', 'Founders', '2000-01-01', NULL)")


async def _assert_ledger_of(pool: asyncpg.Pool, history: History) -> None:
    """The database's ledger equals the reference of the history's events, and what the
    triggers kept equals the totals recomputed from that ledger."""
    assert await dump(pool) == reference(history.events, OFFER)
    async with db.connection(pool) as conn:
        result = await totals.verify(conn)
    assert result.differences == (), list(totals.describe(result))


async def _deliver(pool: asyncpg.Pool, events: list[dict[str, Any]], at_once: int) -> None:
    """Deliver in order of the list, `at_once` events racing each other at a time."""
    for start in range(0, len(events), at_once):
        batch = events[start:start + at_once]
        await asyncio.gather(*(
            ingest(pool, parse_event(e), json.dumps(e), OFFER) for e in batch
        ))


@settings(max_examples=25, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(data=st.data())
async def test_the_database_ledger_equals_the_reference_in_any_order(
    pool: asyncpg.Pool, data: st.DataObject
) -> None:
    history = data.draw(histories(max_steps=6))
    shuffled = data.draw(deliveries(history.events))
    at_once = data.draw(st.sampled_from([1, 4, 8]))
    await _reset(pool)
    await _deliver(pool, shuffled, at_once)
    await _assert_ledger_of(pool, history)


async def _deliver_in_groups(
    pool: asyncpg.Pool, events: list[dict[str, Any]], sizes: list[int], racing: int,
    sources: tuple[str, ...] = ("webhook",),
) -> None:
    """Deliver in order of the list, cut into groups of the given sizes (cycled), each group
    applied in one transaction (as the webhooks' group commit does), `racing` groups at once,
    the groups of each race from `sources` in turn (as webhooks and reconciliation race)."""
    groups, start, n = [], 0, 0
    while start < len(events):
        size = sizes[n % len(sizes)]
        groups.append(events[start:start + size])
        start, n = start + size, n + 1
    for first in range(0, len(groups), racing):
        await asyncio.gather(*(
            ingest_many(pool, [(parse_event(e), json.dumps(e)) for e in group], OFFER,
                        source=sources[i % len(sources)])
            for i, group in enumerate(groups[first:first + racing])
        ))


@settings(max_examples=25, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(data=st.data())
async def test_groups_of_events_give_the_same_ledger_as_one_at_a_time(
    pool: asyncpg.Pool, data: st.DataObject
) -> None:
    history = data.draw(histories(max_steps=6))
    shuffled = data.draw(deliveries(history.events))
    sizes = data.draw(st.lists(st.integers(1, 12), min_size=1, max_size=4))
    racing = data.draw(st.sampled_from([1, 2, 3]))
    await _reset(pool)
    await _deliver_in_groups(pool, shuffled, sizes, racing)
    await _assert_ledger_of(pool, history)


def test_a_dispute_lost_on_a_partly_refunded_charge_holds_what_was_left() -> None:
    """(The generated histories never dispute a refunded charge.)"""
    world = World(seed=21)
    paid = world.one_off(10_000, "gbp")
    world.refund(paid.charge, 4000)
    world.dispute(paid.charge, "lost", amount=6000)  # only what is left can be taken
    row = reference(world.events, OFFER)["payments"][paid.payment_intent]
    assert (row["amount_refunded"], row["amount_disputed"], row["dispute_lost"]) == (
        4000, 6000, True)
