"""Reconciliation of a large backlog of events from the fake Stripe, beside the page-fetch rate.

    .venv/bin/python -m benchmarks.reconcile [--events 100000] [--database-url URL] [--seed 2026]

The fake Stripe (tests/fakestripe, serving a simulated account with N events) runs in a process
of its own. In the same run: the rate at which its event pages can be fetched at all (plain
aiohttp GETs, 100 a page, one after the other, nothing done with them), the same through
`reconcile.pages` (the stripe library's raw requests, as a run reads them; for information),
then one `reconcile.run` over an empty ledger, so every event is missing and applied, followed
by the balance-transaction comparison. Target: reconciliation events/s >= 0.5 x the raw
page-fetch events/s. Exit status 0 when the ledger then equals the reference ledger of the same
events and the totals equal the ledger (unless --no-check), 1 otherwise.
"""

from __future__ import annotations

import argparse
import multiprocessing
import platform
import sys
import time
from typing import Any

import aiohttp
import stripe

from benchmarks._common import (
    database_url_from,
    describe_server,
    fake_stripe_process,
    postgres_server,
    print_table,
    scratch_database,
    server_version,
)
from benchmarks.webhooks import CpuSample, cpu_report, generate_events
from donations import cli, db, reconcile, totals
from donations.ledger import BalanceTransaction, FoundingOffer
from donations.settings import Secret, Settings
from donations.stripe_api import make_client
from tests.fakestripe.world import World
from tests.ledger_check import dump, reference

TARGET = 0.5
KEY = "sk_test_benchmark_reconciliation"
SINCE = 1_795_000_000  # the simulated account's first second


async def fetch_floor(base: str, until: int) -> tuple[int, int, float]:
    """(pages, events, seconds) to fetch every page with plain HTTP, nothing else done."""
    headers = {"Authorization": f"Bearer {KEY}"}
    params: dict[str, str] = {"limit": "100", "created[gte]": str(SINCE),
                              "created[lte]": str(until)}
    pages = events = 0
    started = time.perf_counter()
    async with aiohttp.ClientSession(headers=headers) as session:
        while True:
            async with session.get(f"{base}/v1/events", params=params) as response:
                response.raise_for_status()
                body = await response.json()
            pages += 1
            events += len(body["data"])
            if not body["has_more"] or not body["data"]:
                break
            params["starting_after"] = body["data"][-1]["id"]
    return pages, events, time.perf_counter() - started


async def fetch_through_library(client: stripe.StripeClient, until: int) -> tuple[int, float]:
    events = 0
    started = time.perf_counter()
    params: Any = {"created": {"gte": SINCE, "lte": until}, "limit": 100}
    async for items, _more in reconcile.pages(client, "/v1/events", params, "events.list"):
        events += len(items)
    return events, time.perf_counter() - started


async def measure(args: argparse.Namespace, world: World, events: list[dict[str, Any]],
                  base: str) -> int:
    until = world.now + 60
    http_client = stripe.AIOHTTPClient(timeout=60)
    client = make_client(Settings(stripe_secret_key=Secret(KEY), stripe_api_base=base),
                         http_client)
    assert client is not None
    offer = FoundingOffer()
    try:
        # warm-up: the fake builds its sorted list once; neither side pays for it
        await fetch_floor_first_page(base, until)
        pages, fetched, floor_seconds = await fetch_floor(base, until)
        lib_events, lib_seconds = await fetch_through_library(client, until)
        async with postgres_server(database_url_from(args.database_url)) as admin, \
                scratch_database(admin) as dsn:
            version = await server_version(dsn)
            await db.migrate(dsn)
            pool = await db.create_pool(dsn, min_size=2,
                                        max_size=4)
            try:
                before = CpuSample.take(args.fake_pid)
                started = time.perf_counter()
                result = await reconcile.run(pool, client, offer, since=SINCE, now=until)
                run_seconds = time.perf_counter() - started
                after = CpuSample.take(args.fake_pid)
                _report(version, dsn, pages, fetched, floor_seconds, lib_events, lib_seconds,
                        result, run_seconds)
                for line in cpu_report(before, after, run_seconds, ("the fake Stripe",
                                                                    "reconciliation")):
                    print(line)
                ok = True
                if not args.no_check:
                    # the figures first: the reference of 100,000 events takes minutes
                    bts = {i: BalanceTransaction.from_stripe(bt)
                           for i, bt in world.balance_transactions.items()
                           if bt["type"] == "charge"}
                    ok = await dump(pool) == reference(events, offer, bts)
                    async with db.connection(pool) as conn:
                        kept = await totals.verify(conn)
                    if kept.differences:
                        ok = False
                        print("TOTALS DIFFER FROM THE LEDGER: "
                              + "; ".join(map(str, kept.differences[:3])))
            finally:
                await pool.close()
    finally:
        await http_client.close_async()  # type: ignore[no-untyped-call]
    print("ledger equals the reference; totals equal the ledger" if ok and not args.no_check else
          "ledger not checked" if args.no_check else "LEDGER DIFFERS FROM THE REFERENCE")
    return 0 if ok and result.events_failed == 0 else 1


def _report(version: str, dsn: str, pages: int, fetched: int, floor_seconds: float,
            lib_events: int, lib_seconds: float, result: reconcile.RunResult,
            run_seconds: float) -> None:
    floor_rate = fetched / floor_seconds
    run_rate = result.events_listed / run_seconds
    print(f"PostgreSQL {version} at {describe_server(dsn)}; Python {platform.python_version()}, "
          f"{multiprocessing.cpu_count()} cores")
    print_table(
        ["phase", "pages", "events", "seconds", "events/s"],
        [["fetch pages, plain HTTP (the floor)", pages, fetched, floor_seconds, floor_rate],
         ["fetch pages, reconcile.pages (library)", "-", lib_events, lib_seconds,
          lib_events / lib_seconds],
         ["reconcile (apply all + compare)", result.pages, result.events_listed, run_seconds,
          run_rate]],
    )
    print(f"applied {result.events_applied}, failed {result.events_failed}; balance "
          f"transactions compared {result.balance_transactions}, fees filled "
          f"{result.fees_filled}; open discrepancies {len(result.open)}")
    ratio = run_rate / floor_rate
    print(f"ratio {ratio:.2f} (target >= {TARGET}): {'PASS' if ratio >= TARGET else 'FAIL'}",
          flush=True)


async def fetch_floor_first_page(base: str, until: int) -> None:
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {KEY}"}) as session:
        params = {"limit": "1", "created[gte]": str(SINCE), "created[lte]": str(until)}
        async with session.get(f"{base}/v1/events", params=params) as response:
            response.raise_for_status()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, default=100_000)
    parser.add_argument("--seed", type=int, default=2026)
    parser.add_argument("--database-url")
    parser.add_argument("--no-check", action="store_true",
                        help="skip comparing the ledger with the reference afterwards")
    args = parser.parse_args(argv)

    started = time.perf_counter()
    events, world = generate_world(args.events, args.seed)
    print(f"{len(events):,} events simulated in {time.perf_counter() - started:.0f} s")
    with fake_stripe_process(world, within=120) as (base, args.fake_pid):
        # on the event loop `donations reconcile` runs on (uvloop where installed)
        return cli.run(measure(args, world, events, base))


def generate_world(total: int, seed: int) -> tuple[list[dict[str, Any]], World]:
    """The webhook benchmark's account simulation (the same mix of payments, subscriptions,
    refunds and disputes), keeping its World for the fake Stripe to serve. `generate_events`
    (benchmarks/webhooks.py, not ours to change) returns only the events, so the World it makes
    is caught on construction. All its events are served (a few more than `total`), so that
    objects, balance transactions and events agree."""
    captured: list[World] = []
    original = World.__init__

    def keep(self: World, *a: Any, **kw: Any) -> None:
        original(self, *a, **kw)
        captured.append(self)

    World.__init__ = keep  # type: ignore[method-assign]
    try:
        events, _ = generate_events(total, seed)
    finally:
        World.__init__ = original  # type: ignore[method-assign]
    del events  # the first `total` only
    world = captured[-1]
    return world.events, world


if __name__ == "__main__":
    sys.exit(main())
