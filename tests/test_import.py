"""`donations import`: history from Stripe's objects gives the ledger its events would, is
idempotent, resumes where it stopped, and never overrides what a real event says."""

from __future__ import annotations

import io
import random

import asyncpg
import pytest
import stripe

from donations import importer
from donations.ledger import FoundingOffer
from tests.conftest import Client
from tests.fakestripe.world import World
from tests.ledger_check import dump, reference
from tests.test_fees import stripe_against
from tests.test_reconcile import scenario
from tests.webhook_helpers import post_all

OFFER = FoundingOffer()
SINCE = 1_795_000_000


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


async def test_import_gives_the_ledger_the_events_would(pool: asyncpg.Pool) -> None:
    world = scenario(seed=701, steps=60)
    async with stripe_against(world) as (fake, stripe_client):
        shown = Terminal()
        result = await importer.run(pool, stripe_client, OFFER, SINCE, progress=shown,
                                    now=world.now + 60)
        assert fake.requests_to("/v1/events") == []
    assert result.failed == 0
    assert await dump(pool) == reference(world.events, OFFER)
    assert result.imported["charges"] == sum(
        1 for o in world.objects.values() if o.get("object") == "charge")
    assert await pool.fetchval(
        "SELECT count(*) FROM stripe_events WHERE source <> 'import'") == 0
    assert "charges" in shown.getvalue()
    assert "100%" in shown.getvalue()


async def test_importing_again_changes_nothing(pool: asyncpg.Pool) -> None:
    world = scenario(seed=702, steps=20)
    async with stripe_against(world) as (fake, stripe_client):
        await importer.run(pool, stripe_client, OFFER, SINCE, now=world.now + 60)
        before = await dump(pool)
        events = await pool.fetchval("SELECT count(*) FROM stripe_events")
        fake.requests.clear()
        again = await importer.run(pool, stripe_client, OFFER, SINCE, now=world.now + 60)
        assert set(again.skipped) == {r.name for r in importer.RESOURCES}
        assert fake.requests == []
        # another --since lists everything again: all of it already stored
        wider = await importer.run(pool, stripe_client, OFFER, SINCE - 86400,
                                   now=world.now + 60)
        assert (wider.applied, wider.failed) == (0, 0)
    assert await dump(pool) == before
    assert await pool.fetchval("SELECT count(*) FROM stripe_events") == events


async def test_an_interrupted_import_resumes_where_it_stopped(pool: asyncpg.Pool) -> None:
    world = scenario(seed=703, steps=60)
    charges = sum(1 for o in world.objects.values() if o.get("object") == "charge")
    assert charges > 20
    async with stripe_against(world) as (fake, stripe_client):
        fake.fail_next(1, 500, "/v1/charges", should_retry=False, after=1)
        with pytest.raises(stripe.APIError):
            await importer.run(pool, stripe_client, OFFER, SINCE, now=world.now + 60,
                               page_size=10)
        row = await pool.fetchrow("SELECT * FROM import_progress WHERE resource = 'charges'")
        assert row is not None
        assert row["finished_at"] is None
        assert row["imported"] == 10
        cursor = row["cursor"]
        fake.requests.clear()
        result = await importer.run(pool, stripe_client, OFFER, SINCE, now=world.now + 60,
                                    page_size=10)
        assert fake.requests_to("/v1/charges")[0].query["starting_after"] == cursor
        # customers, sessions and payment intents were finished before
        assert {"customers", "checkout_sessions", "payment_intents"} <= set(result.skipped)
        assert fake.requests_to("/v1/customers") == []
    assert result.imported["charges"] == charges
    assert await dump(pool) == reference(world.events, OFFER)


async def test_real_events_outrank_imported_snapshots_in_any_order(
    client: Client, pool: asyncpg.Pool
) -> None:
    world = World(seed=704)
    paid = world.one_off(4000, "gbp")
    sub = world.subscribe(1500, "gbp", founding=True)
    snapshot_world = World(seed=704)  # the same history, stopped before the later changes
    snapshot_world.one_off(4000, "gbp")
    snapshot_world.subscribe(1500, "gbp", founding=True)
    world.refund(paid.charge, 1000)
    world.change_amount(sub.subscription, 2500)
    async with stripe_against(snapshot_world) as (_, stripe_client):
        await importer.run(pool, stripe_client, OFFER, SINCE, now=snapshot_world.now + 60)
    rng = random.Random(4)
    shuffled = list(world.events)
    rng.shuffle(shuffled)
    await post_all(client, shuffled)
    assert await dump(pool) == reference(world.events, OFFER)
