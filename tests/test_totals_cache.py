"""The public totals' in-memory cache: served within the TTL without waiting, read again after
it once however many ask, and the last figures kept for a while when the database is away."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from typing import Any, cast

import asyncpg
import pytest

from donations import db
from donations.settings import Settings
from donations.totals_api import MAX_STALE_SECONDS, Entry, TotalsCache


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Cache(TotalsCache):
    """A cache whose reads are counted, can be held, and can fail as an outage would."""

    def __init__(self, clock: Clock) -> None:
        super().__init__(cast(asyncpg.Pool, None), Settings(totals_ttl=5), clock)
        self.clock = clock
        self.reads = 0
        self.slug_reads = 0
        self.failing = False
        self.gate: asyncio.Event | None = None

    async def _read_slugs(self) -> frozenset[str]:
        self.slug_reads += 1
        if self.failing:
            raise db.DatabaseUnavailable("away")
        self._slugs = (frozenset({"winter"}), self.clock())
        return self._slugs[0]

    async def _refresh(self, scope: str) -> Entry:
        self.reads += 1
        if self.gate is not None:
            await self.gate.wait()
        if self.failing:
            raise db.DatabaseUnavailable("away")
        entry = Entry(None, f"read {self.reads}".encode(), "", datetime.now(UTC), self.clock())
        self._entries[scope] = entry
        return entry


async def test_within_the_ttl_the_entry_is_served_without_a_read() -> None:
    clock = Clock()
    cache = Cache(clock)
    assert cache.fresh("*") is None
    first = await cache.get("*")
    clock.now += 4.9
    assert cache.fresh("*") is first
    assert await cache.get("*") is first
    assert cache.reads == 1
    clock.now += 0.2
    assert cache.fresh("*") is None
    assert (await cache.get("*")).body == b"read 2"


async def test_after_the_ttl_many_requests_wait_for_one_read() -> None:
    clock = Clock()
    cache = Cache(clock)
    await cache.get("*")
    clock.now += 6
    cache.gate = asyncio.Event()
    waiting: list[asyncio.Task[Any]] = [asyncio.create_task(cache.get("*")) for _ in range(10)]
    await asyncio.sleep(0)
    cache.gate.set()
    entries = await asyncio.gather(*waiting)
    assert {e.body for e in entries} == {b"read 2"}
    assert cache.reads == 2


async def test_while_the_database_is_away_the_last_figures_are_served_for_a_while() -> None:
    clock = Clock()
    cache = Cache(clock)
    kept = await cache.get("*")
    cache.failing = True
    clock.now += 60
    assert await cache.get("*") is kept
    clock.now += MAX_STALE_SECONDS
    with pytest.raises(db.DatabaseUnavailable):
        await cache.get("*")
    with pytest.raises(db.DatabaseUnavailable):
        await cache.get("winter")  # nothing held for it


async def test_a_slug_that_is_no_campaign_costs_no_read_and_takes_no_place() -> None:
    clock = Clock()
    cache = Cache(clock)
    for i in range(50):  # a crawler, or someone trying to load the database
        entry = await cache.get(f"no-such-campaign-{i}")
        assert entry.totals is None
    assert (cache.reads, cache.slug_reads) == (0, 1)  # the campaigns' slugs, read once
    assert cache.fresh("no-such-campaign-1") is None  # nothing held for them
    await cache.get("winter")
    assert cache.reads == 1
    clock.now += 6  # the slugs are read again after the TTL: a new campaign shows by then
    await cache.get("spring")
    assert cache.slug_reads == 2


async def test_a_slug_read_in_flight_when_a_campaign_is_created_does_not_hide_it(
    pool: asyncpg.Pool, dsn: str
) -> None:
    """A read of the campaigns' slugs begun before a campaign was created (and the cache
    cleared for it) is not kept: the new campaign answers at once. The read is held by a slow
    connection release (asyncpg's pool `reset` hook), real database timing."""
    from donations import campaigns
    from donations.settings import Settings
    from donations.totals_api import TotalsCache

    in_release, go_on = asyncio.Event(), asyncio.Event()
    hold = {"on": False}

    async def reset(conn: asyncpg.Connection) -> None:
        if hold["on"]:
            hold["on"] = False
            in_release.set()
            await go_on.wait()
        await conn.reset()

    slow = await asyncpg.create_pool(dsn, min_size=1, max_size=4, reset=reset)
    try:
        cache = TotalsCache(slow, Settings(totals_ttl=60))
        hold["on"] = True
        first = asyncio.create_task(cache.get("spring"))  # a reader, before the campaign
        await asyncio.wait_for(in_release.wait(), 5)  # the slugs are read; not stored yet
        async with db.connection(pool) as conn:
            await campaigns.create(conn, "spring", "Spring appeal", None, None, None, None,
                                   "gbp")
        cache.clear()  # what POST /v1/campaigns does once the campaign is committed
        go_on.set()
        assert (await first).totals is None  # fair: it asked before the campaign existed
        after = await cache.get("spring")
        assert after.totals is not None, "a campaign created and cleared for is a 404"
    finally:
        await slow.close()
