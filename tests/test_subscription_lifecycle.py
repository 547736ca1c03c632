"""A supporter's life, step by step, against the public totals, the finance summary and the
ledger: the steps whose figures are not shown elsewhere in the suite."""

from __future__ import annotations

import copy
import secrets
from typing import Any

import asyncpg

from donations import auth, db
from donations.appkeys import TOTALS
from donations.ingest import reapply
from donations.ledger import FoundingOffer
from tests.conftest import Client
from tests.fakestripe import objects as o
from tests.fakestripe.world import DAY, World
from tests.webhook_helpers import post_all

START = 1_795_000_000  # 2026-11-18T07:46:40Z


async def _totals(client: Client) -> dict[str, Any]:
    client.app[TOTALS].clear()
    response = await client.get("/v1/totals")
    assert response.status == 200, await response.text()
    body: dict[str, Any] = await response.json()
    return body


async def _summary(client: Client, pool: asyncpg.Pool, start: str, end: str) -> dict[str, Any]:
    async with db.connection(pool) as conn:
        token = await auth.create_token(conn, f"finance-{secrets.token_hex(4)}", ["reports:read"])
    response = await client.get("/v1/reports/summary", headers={"Authorization": f"Bearer {token}"},
                                params={"from": start, "to": end})
    assert response.status == 200, await response.text()
    body: dict[str, Any] = await response.json()
    return body


def _event(world: World, type: str, obj: dict[str, Any], *,
           previous: dict[str, Any] | None = None) -> dict[str, Any]:
    """A Stripe-shaped event of the pinned version about `obj` as it is now, stamped now."""
    return o.event(type, copy.deepcopy(obj), created=world.now, ids=world.ids,
                   previous_attributes=previous)


def _founding_checkout_never_paid(world: World) -> tuple[str, list[dict[str, Any]]]:
    """A founding subscription created `incomplete` by Checkout whose first payment is never made:
    Stripe expires it after 23 hours (`incomplete_expired`, a terminal status, its open invoice
    voided). The events before any money moved, then the expiry."""
    sub = world.subscribe(1000, "gbp", founding=True, email="never@example.org",
                          metadata={"founding_supporter": "true"})
    before_payment = {"customer.created", "customer.subscription.created",
                      "customer.discount.created", "invoice.created", "invoice.finalized"}
    events = [e for e in sub.events if e["type"] in before_payment]
    created = next(e for e in events if e["type"] == "customer.subscription.created")
    state = copy.deepcopy(created["data"]["object"])
    world.advance(23 * 3600)
    previous = {"status": "incomplete", "canceled_at": None, "ended_at": None}
    state.update(status="incomplete_expired", canceled_at=world.now, ended_at=world.now)
    events.append(_event(world, "customer.subscription.updated", state, previous=previous))
    return sub.subscription, events


async def test_an_incomplete_expired_founding_subscription_gives_its_seat_back(
    client: Client, pool: asyncpg.Pool
) -> None:
    """A founding checkout whose first payment is never made (3-D Secure abandoned, a declined
    card) leaves Stripe's subscription `incomplete`, then, 23 hours later, `incomplete_expired`:
    terminal, nothing ever paid. Whoever never became a subscriber is not one of the first
    supporters: the subscription takes no founding seat, neither in the public
    `founding_seats_left` nor in checkout's count, and is no supporter."""
    world = World(seed=901, start=START)
    sub_id, events = _founding_checkout_never_paid(world)
    await post_all(client, events)
    status = await pool.fetchval("SELECT status FROM subscriptions WHERE id = $1", sub_id)
    assert status == "incomplete_expired"
    body = await _totals(client)
    assert body["supporters"] == 0
    assert body["active_subscriptions"] == 0
    assert body["founding_seats_left"] == 1000
    taken = await pool.fetchval("SELECT taken FROM founding_seat_counts")
    assert taken == 0


async def test_summary_does_not_count_a_subscription_that_never_started_as_ended(
    client: Client, pool: asyncpg.Pool
) -> None:
    """A subscription that never started (`incomplete_expired`, which Stripe gives an
    `ended_at`) is neither new nor ended in the finance summary: an abandoned checkout is not
    churn."""
    world = World(seed=902, start=START)
    _, events = _founding_checkout_never_paid(world)
    await post_all(client, events)
    body = await _summary(client, pool, "2026-11-01", "2026-12-01")
    rep = body["reporting"]
    assert (rep["new_subscriptions"], rep["ended_subscriptions"]) == (0, 0)


async def _lapse(world: World, sub_id: str, status: str, type: str) -> list[dict[str, Any]]:
    """Two weeks on, the subscription goes to `status` (Stripe's `unpaid` after the retries, or
    `paused`): the event that tells it."""
    world.advance(14 * DAY)
    state = world.get(sub_id)
    previous = {"status": state["status"]}
    state["status"] = status
    return [_event(world, type, state, previous=previous)]


async def test_a_closed_month_keeps_a_subscriber_who_lapsed_after_it(
    client: Client, pool: asyncpg.Pool
) -> None:
    """A subscriber live all November whose December renewal fails and whom Stripe then marks
    `unpaid` is still in November's monthly recurring when November is asked again in December:
    live at a window's end is the status the subscription had then, not now."""
    world = World(seed=903, start=START)
    sub = world.subscribe(1000, "gbp", email="lapses@example.org")
    await post_all(client, world.events)
    november = await _summary(client, pool, "2026-11-01", "2026-12-01")
    assert november["reporting"]["monthly_recurring"]["amount"] == 1000
    failed = world.fail_renewal(sub.subscription)
    await post_all(client, failed.events)
    await post_all(client, await _lapse(world, sub.subscription, "unpaid",
                                        "customer.subscription.updated"))
    again = await _summary(client, pool, "2026-11-01", "2026-12-01")
    assert again["reporting"]["monthly_recurring"]["amount"] == 1000
    # and at a window ending once it is unpaid, it is not live
    late = await _summary(client, pool, "2027-01-01", "2027-02-01")
    assert late["reporting"]["monthly_recurring"]["amount"] == 0


async def test_a_closed_month_keeps_a_subscriber_who_paused_after_it_in_any_delivery_order(
    client: Client, pool: asyncpg.Pool
) -> None:
    """The same for a pause, with every event delivered in reverse and twice: the history is
    facts of the events, so the order they come in changes nothing."""
    world = World(seed=904, start=START)
    sub = world.subscribe(1000, "gbp", email="pauses@example.org")
    world.advance(20 * DAY)  # into December
    paused = await _lapse(world, sub.subscription, "paused", "customer.subscription.paused")
    events = [*world.events, *paused]
    await post_all(client, list(reversed(events)))
    await post_all(client, events)
    november = await _summary(client, pool, "2026-11-01", "2026-12-01")
    assert november["reporting"]["monthly_recurring"]["amount"] == 1000
    december = await _summary(client, pool, "2026-12-01", "2027-01-01")
    assert december["reporting"]["monthly_recurring"]["amount"] == 0
    async with db.connection(pool) as conn:
        rows = await conn.fetch("SELECT status FROM subscription_statuses"
                                " WHERE subscription_id = $1 ORDER BY at, rank, type_rank",
                                sub.subscription)
    assert [r["status"] for r in rows][-1] == "paused"


async def test_a_stored_event_applied_again_writes_the_same_status_history(
    client: Client, pool: asyncpg.Pool
) -> None:
    """An event applied from the store (`events reapply`, `events retry`, a redelivery of one
    that failed) records its subscription's status as a webhook delivery does: the same rows."""
    world = World(seed=905, start=START)
    sub = world.subscribe(1000, "gbp", email="again@example.org")
    failed = world.fail_renewal(sub.subscription)
    await post_all(client, [*world.events, *failed.events])
    query = ("SELECT subscription_id, at, event_id, rank, type_rank, status"
             "  FROM subscription_statuses ORDER BY 1, 2, 3")
    delivered = [tuple(r) for r in await pool.fetch(query)]
    assert [r[-1] for r in delivered][-1] == "past_due"
    await pool.execute("DELETE FROM subscription_statuses")
    await reapply(pool, FoundingOffer(), "customer.subscription.%")
    assert [tuple(r) for r in await pool.fetch(query)] == delivered
