"""Totals stay exact while many events about one campaign are applied at once."""

from __future__ import annotations

import asyncio
import random
from typing import Any

import asyncpg

from donations import db, totals
from donations.appkeys import TOTALS
from tests.conftest import Client
from tests.fakestripe.world import World
from tests.test_staff import _bearer, _token
from tests.webhook_helpers import post_event


def _history(seed: int) -> World:
    """Contributions to one campaign by a few people (so supporters' rows are shared)."""
    world = World(seed=seed)
    rng = random.Random(seed)
    people = [f"reader{i}@example.org" for i in range(6)]
    charges: list[str] = []
    for i in range(24):
        currency = rng.choice(["gbp", "gbp", "usd", "jpy"])
        amount = rng.choice([500, 1000, 2500]) * (1 if currency != "jpy" else 3)
        paid = world.one_off(amount, currency, campaign="winter", email=rng.choice(people))
        charges.append(paid.charge)
        if i % 6 == 0:
            world.subscribe(1000, "gbp", campaign="winter", founding=i % 12 == 0,
                            interval=rng.choice(["month", "year"]), email=rng.choice(people))
    for charge in rng.sample(charges, 5):
        world.refund(charge, None if rng.random() < 0.5 else 100)
    for charge, outcome in zip(rng.sample(charges, 3), ("won", "lost", None), strict=True):
        world.dispute(charge, outcome)  # type: ignore[arg-type]
    return world


async def test_parallel_webhooks_lose_no_update_and_verify_finds_no_difference(
    client: Client, pool: asyncpg.Pool
) -> None:
    world = _history(seed=420)
    events: list[dict[str, Any]] = list(world.events)
    random.Random(7).shuffle(events)
    gate = asyncio.Semaphore(12)
    token = await _token(pool, "admin", "admin")

    async def deliver(event: dict[str, Any]) -> None:
        async with gate:
            status, body = await post_event(client, event)
            assert status == 200, body

    async def create_campaign_midway() -> None:
        await asyncio.sleep(0.3)
        response = await client.post("/v1/campaigns", headers=_bearer(token), json={
            "slug": "winter", "title": "Winter", "goal": {"amount": 100_000, "currency": "gbp"}})
        assert response.status == 201

    async def compact_meanwhile(done: asyncio.Event) -> None:
        while not done.is_set():
            async with db.connection(pool) as conn:
                await totals.compact(conn, batch=7)
            await asyncio.sleep(0.01)

    done = asyncio.Event()
    compacting = asyncio.create_task(compact_meanwhile(done))
    await asyncio.gather(create_campaign_midway(), *(deliver(e) for e in events))
    done.set()
    await compacting

    async with db.connection(pool) as conn:
        result = await totals.verify(conn)
    assert result.differences == (), list(totals.describe(result))
    assert result.payments >= 24
    assert result.scopes == 2  # everything, and the campaign

    client.app[TOTALS].clear()
    everything = await (await client.get("/v1/totals")).json()
    winter = await (await client.get("/v1/campaigns/winter/totals")).json()
    # every contribution was made for the campaign, which has no window
    for name in ("raised", "contributions", "supporters", "active_subscriptions"):
        assert everything[name] == winter[name], name
    assert everything["contributions"] > 15
