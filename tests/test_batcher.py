"""How the webhooks' group commit shares events out among its workers (a pure function)."""

from __future__ import annotations

import asyncio
import contextlib
import json

import asyncpg

from donations.batcher import Batcher, route
from donations.events import parse_event
from donations.ingest import Outcome
from donations.ledger import FoundingOffer
from tests.fakestripe.world import World
from tests.webhook_helpers import count


def test_a_payments_events_go_to_one_worker() -> None:
    world = World(seed=7)
    world.one_off(2500, "gbp", customer="cus_reader1")  # a reader the account knows
    world.one_off(1000, "gbp", email="guest@example.org")  # a guest: no customer
    world.one_off(700, "usd", via="payment_intent")
    events = [parse_event(e) for e in world.events]
    keys: dict[str, set[str]] = {}
    for event in events:
        obj = event.obj
        payment = obj["id"] if obj["object"] == "payment_intent" else obj.get("payment_intent")
        assert isinstance(payment, str), event.type
        keys.setdefault(payment, set()).add(route(event))
    assert len(keys) == 3
    # the checkout session, payment intent and charge of one payment share a route
    assert all(len(routes) == 1 for routes in keys.values()), keys
    # the known reader's payment is routed by the reader, the others by their payment
    assert {r for routes in keys.values() for r in routes} == {"cus_reader1", *(
        p for p, routes in keys.items() if "cus_reader1" not in routes)}


def test_an_event_about_nothing_known_routes_by_its_object_or_itself() -> None:
    customer = parse_event({
        "id": "evt_1", "object": "event", "type": "customer.created", "api_version": None,
        "created": 1, "livemode": False, "data": {"object": {"id": "cus_9", "object": "customer"}},
    })
    assert route(customer) == "cus_9"
    bare = parse_event({
        "id": "evt_2", "object": "event", "type": "balance.available", "api_version": None,
        "created": 1, "livemode": False, "data": {"object": {"object": "balance"}},
    })
    assert route(bare) == "evt_2"


async def test_a_delivery_whose_caller_goes_away_is_still_applied_once(
    pool: asyncpg.Pool,
) -> None:
    """A request cancelled while its event waits in the
    group commit (the client hung up, a handler timeout) leaves the group unharmed: the event
    is committed anyway and its next delivery is a duplicate."""
    events = World(seed=27).one_off(1000, "gbp").events
    batcher = Batcher(pool, FoundingOffer())
    async with batcher.running():
        waiting = [asyncio.create_task(batcher.ingest(parse_event(e), json.dumps(e)))
                   for e in events]
        await asyncio.sleep(0)  # queued
        for task in waiting:
            task.cancel()
        for task in waiting:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        assert all(task.cancelled() for task in waiting)
        for _ in range(200):  # the workers finish the groups on their own
            if await count(pool, "stripe_events") == len(events):
                break
            await asyncio.sleep(0.05)
        again = await batcher.ingest(parse_event(events[1]), json.dumps(events[1]))
    assert await count(pool, "stripe_events") == len(events)
    assert again is Outcome.DUPLICATE
    assert await count(pool, "payments") == 1
