"""Checkout creation through the service against a fake Stripe, beside that fake Stripe alone.

    .venv/bin/python -m benchmarks.checkout [--requests N] [--concurrency C] [--database-url URL]

The service side: one `donations serve` process whose Stripe is the test suite's fake Stripe
(tests/fakestripe, run in this process on a free port); N checkout requests over HTTP, C in
flight, alternating one-off contributions and monthly subscriptions (the first FOUNDING_SEATS of
those hold a founding seat, the rest find the offer closed), each with a campaign, form metadata
and an Idempotency-Key: the full path (rate limits, idempotency, campaign check, seat hold,
Stripe call through the stripe library, answer stored).

The fake Stripe alone, in the same run: the same number of session creations at the same
concurrency posted straight to it, form-encoded as the stripe library sends them.

The service's own overhead per checkout is taken request by request: the checkout's latency at
the client less the fake Stripe's own time for that checkout's session creation (measured inside
the fake, from its outermost middleware to its answer, summed over the stripe library's tries;
matched through the Idempotency-Key the service passes on). The target is p99 of that under
5 ms. This is strict: the Stripe call's HTTP round trip (the library's encoding, loopback, the
fake's HTTP parsing) counts as the service's. The difference of the two sides' percentiles
(p99(service) - p99(fake alone)), which earlier versions reported, is printed for comparison;
it is not a percentile of anything and flatters the service (the fake's own tail is subtracted
although it rarely coincides with the service's, and at concurrency > 1 the fake alone queues
more than it does behind the service).

Exit status: 0 when every request got its 201 (this is a measurement, not a test), 1 otherwise.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import math
import os
import platform
import sys
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from typing import Any
from urllib.parse import urlencode

import aiohttp
import asyncpg
from aiohttp import web

from benchmarks._common import (
    KeepAlive,
    Measurement,
    cpu_seconds,
    database_url_from,
    describe_server,
    fake_stripe_process,
    postgres_server,
    print_table,
    running_service,
    scratch_database,
    server_version,
)
from tests.checkout_helpers import SITE, TEST_KEY, stock
from tests.fakestripe.server import FakeStripe
from tests.fakestripe.world import World

TARGET_MS = 5.0
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
CAMPAIGN = "benchmark"


def body(i: int) -> tuple[str, dict[str, Any]]:
    """The i-th request: path and JSON body."""
    common: dict[str, Any] = {
        "currency": "gbp", "campaign": CAMPAIGN, "email": f"reader{i}@example.org",
        "success_url": f"{SITE}/thanks?session_id={{CHECKOUT_SESSION_ID}}",
        "cancel_url": f"{SITE}/support", "metadata": {"referrer": "benchmark", "variant": "a"},
    }
    if i % 2:
        return "/v1/checkout/subscriptions", {**common, "amount": 1000, "interval": "month"}
    return "/v1/checkout/contributions", {**common, "amount": 2500}


def stripe_form(i: int) -> bytes:
    """What the service sends Stripe for the i-th request, as the stripe library encodes it."""
    _, b = body(i)
    recurring = "interval" in b
    metadata = {"referrer": "benchmark", "variant": "a", "campaign": CAMPAIGN}
    pairs = [
        ("success_url", b["success_url"]), ("cancel_url", b["cancel_url"]),
        ("expires_at", str(int(time.time()) + 31 * 60)),
        *((f"metadata[{k}]", v) for k, v in metadata.items()),
        ("customer_email", b["email"]),
        ("mode", "subscription" if recurring else "payment"),
        ("line_items[0][quantity]", "1"),
        ("line_items[0][price_data][currency]", "gbp"),
        ("line_items[0][price_data][unit_amount]", str(b["amount"])),
        ("line_items[0][price_data][product]",
         "donations-recurring" if recurring else "donations-one-off"),
    ]
    data = "subscription_data" if recurring else "payment_intent_data"
    if recurring:
        pairs.append(("line_items[0][price_data][recurring][interval]", "month"))
    else:
        pairs.append(("submit_type", "donate"))
    pairs += [(f"{data}[metadata][{k}]", v) for k, v in metadata.items()]
    return urlencode(pairs).encode()


class FakeTimes:
    """The fake Stripe's own time per Idempotency-Key (the service's
    `checkout:<key>:<claimed>[:<try>]` counted as `<key>`), from its outermost middleware to its
    answer, retries summed."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    def install(self, fake: FakeStripe) -> None:
        @web.middleware
        async def timed(request: web.Request, handler: Handler) -> web.StreamResponse:
            started = time.perf_counter()
            try:
                return await handler(request)
            finally:
                key = request.headers.get("Idempotency-Key", "")
                key = key.removeprefix("checkout:").split(":", 1)[0]
                self.seconds[key] = self.seconds.get(key, 0.0) + time.perf_counter() - started

        fake.app.middlewares.insert(0, timed)

        async def report(_: web.Request) -> web.Response:
            return web.json_response(self.seconds)

        async def settle(_: web.Request) -> web.Response:
            gc.collect()
            gc.freeze()
            return web.json_response({})

        fake.app.router.add_get(TIMES_PATH, report)
        fake.app.router.add_post(SETTLE_PATH, settle)


AUTH = {"Authorization": f"Bearer {TEST_KEY}"}  # the fake asks for a key on every path
TIMES_PATH = "/_benchmark/times"  # the fake's own times, read once the run is over
SETTLE_PATH = "/_benchmark/settle"  # collect and freeze the fake's objects (see harness_gc_settled)


async def measure(
    name: str, base_url: str, requests: Sequence[bytes], concurrency: int,
    latencies: dict[int, float] | None = None,
    answered: Callable[[int, bytes], None] = lambda i, body: None,
) -> Measurement:
    """Send the requests (written out in full), `concurrency` at a time, each worker on a
    keep-alive connection of its own; `answered(i, body)` sees each 2xx answer."""
    result = Measurement(name)
    queue = iter(range(len(requests)))
    errors: list[int] = []

    async def worker() -> None:
        connection = KeepAlive(base_url)
        try:
            for i in queue:
                started = time.perf_counter()
                status, body = await connection.send(requests[i])
                elapsed = time.perf_counter() - started
                result.latencies.append(elapsed)
                if latencies is not None:
                    latencies[i] = elapsed
                if status not in (200, 201):
                    result.failures += 1
                    errors.append(status)
                else:
                    answered(i, body)
        finally:
            await connection.close()

    t = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    result.seconds = time.perf_counter() - t
    if errors:
        print(f"{name}: statuses {sorted(set(errors))}", file=sys.stderr)
    return result


async def harness_gc_settled(session: aiohttp.ClientSession, fake_url: str) -> None:
    """Collect and freeze the objects of this process and the fake's (its world, the sessions
    it made), so that a full collection in either, not in the service, does not land in the
    measured phase (it would be charged to whichever side it hit)."""
    gc.collect()
    gc.freeze()
    async with session.post(fake_url + SETTLE_PATH, headers=AUTH) as response:
        response.raise_for_status()


def key(side: str, i: int) -> str:
    """The Idempotency-Key of the i-th request of a side (one per request, as a form sends)."""
    return f"bench-{side}-{i}-{uuid.uuid4().hex[:8]}"


async def run(args: argparse.Namespace) -> int:
    times = FakeTimes()
    fake_url = args.fake_url
    async with postgres_server(database_url_from(args.database_url)) as admin_dsn, \
            scratch_database(admin_dsn) as dsn:
        print(f"PostgreSQL {await server_version(admin_dsn)} ({describe_server(admin_dsn)});"
              f" Python {platform.python_version()}; {os.cpu_count()} cores;"
              f" concurrency {args.concurrency}; load average {os.getloadavg()[0]:.2f};"
              f" fake Stripe at {fake_url} (a process of its own)")
        env = {
            "STRIPE_SECRET_KEY": TEST_KEY, "STRIPE_API_BASE": fake_url,
            "SITE_ORIGINS": SITE, "FOUNDING_SEATS": str(args.founding_seats),
            "CHECKOUT_RATE_PER_IP": "1000000", "CHECKOUT_RATE_OVERALL": "100000000",
            # each checkout from a reader of its own network (X-Forwarded-For below), as on the
            # site: one network holds at most two founding seats at a time (sql/022)
            "PROXY_HOPS": "1",
        }
        async with running_service(dsn, env=env) as service:
            conn = await asyncpg.connect(dsn)
            try:
                await conn.execute("INSERT INTO campaigns (slug, title) VALUES ($1, 'Bench')",
                                   CAMPAIGN)
            finally:
                await conn.close()
            keys: dict[tuple[str, int], str] = {}
            founding: set[int] = set()  # the subscriptions that held a seat

            def via_service(i: int) -> bytes:
                path, payload = body(i)
                headers = {"Content-Type": "application/json",
                           "Idempotency-Key": keys.setdefault(("service", i), key("service", i)),
                           "X-Forwarded-For": f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}"}
                return KeepAlive.request("POST", path, headers, json.dumps(payload).encode())

            def stripe_alone(i: int) -> bytes:
                headers = {"Authorization": f"Bearer {TEST_KEY}",
                           "Content-Type": "application/x-www-form-urlencoded",
                           "Idempotency-Key": keys.setdefault(("alone", i), key("alone", i))}
                return KeepAlive.request("POST", "/v1/checkout/sessions", headers,
                                         stripe_form(i))

            def held_a_seat(i: int, answer: bytes) -> None:
                if b'"founding_discount": true' in answer:
                    founding.add(i + warm)

            # every request written out before it is measured: the client only sends and reads
            warm, n = args.warmup, args.requests
            await measure("warm-up", service.base_url, [via_service(i) for i in range(warm)],
                          args.concurrency)
            await measure("warm-up", fake_url, [stripe_alone(i) for i in range(warm)],
                          args.concurrency)
            async with aiohttp.ClientSession() as session:
                # the fake keeps every session it made: measure both sides at the same size
                await harness_gc_settled(session, fake_url)
                alone_latency: dict[int, float] = {}
                fake_alone = await measure(
                    "fake Stripe alone", fake_url, [stripe_alone(i + warm) for i in range(n)],
                    args.concurrency, alone_latency)
                served_latency: dict[int, float] = {}
                requests = [via_service(i + warm) for i in range(n)]
                await harness_gc_settled(session, fake_url)
                cpu_before = cpu_seconds(service.process.pid)
                served = await measure("service -> fake Stripe", service.base_url, requests,
                                       args.concurrency, served_latency, held_a_seat)
                service_cpu = cpu_seconds(service.process.pid) - cpu_before
                async with session.get(fake_url + TIMES_PATH, headers=AUTH) as response:
                    times.seconds = await response.json()
            log_tail = service.log_tail(10)

    def inside_fake(side: str, latency: dict[int, float]) -> Measurement:
        """Per request: the fake's own time for it (0 when it never reached the fake)."""
        m = Measurement(f"{side}: inside the fake")
        m.latencies = [times.seconds.get(keys[(side, i + args.warmup)], 0.0) for i in latency]
        return m

    def overhead(side: str, latency: dict[int, float], name: str = "",
                 which: Callable[[int], bool] = lambda i: True) -> Measurement:
        """Per request (those `which` picks): its latency less the fake's own time for it."""
        m = Measurement(name or f"{side}: latency - fake's time")
        m.latencies = [t - times.seconds.get(keys[(side, i + args.warmup)], 0.0)
                       for i, t in latency.items() if which(i + args.warmup)]
        return m

    service_overhead = overhead("service", served_latency)
    rows = [served, inside_fake("service", served_latency), service_overhead,
            fake_alone, inside_fake("alone", alone_latency), overhead("alone", alone_latency)]
    print()
    print_table(
        ["", "requests", "seconds", "req/s", "mean ms", "p50 ms", "p99 ms", "max ms", "failed"],
        [[m.name, m.count, m.seconds or math.nan, m.rate, m.mean_ms, m.ms(50), m.ms(99),
          m.ms(100), m.failures if m.seconds else math.nan] for m in rows],
    )
    kinds = [
        overhead("service", served_latency, "  one-off contributions", lambda i: i % 2 == 0),
        overhead("service", served_latency, "  subscriptions holding a seat",
                 lambda i: i in founding),
        overhead("service", served_latency, "  subscriptions at full price",
                 lambda i: i % 2 == 1 and i not in founding),
    ]
    print()
    print_table(["service overhead by kind", "requests", "mean ms", "p50 ms", "p99 ms", "max ms"],
                [[m.name, m.count, m.mean_ms, m.ms(50), m.ms(99), m.ms(100)] for m in kinds])
    p99 = service_overhead.ms(99)
    verdict = "PASS" if p99 < TARGET_MS else "FAIL"
    print()
    print(f"service overhead per checkout (latency - the fake's own time, per request):"
          f" mean {service_overhead.mean_ms:.2f} ms, p50 {service_overhead.ms(50):.2f} ms,"
          f" p99 {p99:.2f} ms (target p99 < {TARGET_MS:.0f} ms: {verdict})")
    print(f"for comparison, difference of the sides' percentiles:"
          f" p50 {served.ms(50) - fake_alone.ms(50):.2f} ms,"
          f" p99 {served.ms(99) - fake_alone.ms(99):.2f} ms")
    print(f"the service process's CPU per checkout: {service_cpu / served.count * 1000:.2f} ms;"
          f" load average at the end {os.getloadavg()[0]:.2f}")
    if served.failures or fake_alone.failures:
        print("FAILED REQUESTS; service log (last lines):\n" + log_tail, file=sys.stderr)
        return 1
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.checkout",
        description="Checkout creation through the service against the fake Stripe alone.",
    )
    parser.add_argument("--requests", type=int, default=2000, help="measured requests (2000)")
    parser.add_argument("--concurrency", type=int, default=4, help="requests in flight (4)")
    parser.add_argument("--warmup", type=int, default=200,
                        help="requests sent first on each side, not measured (200)")
    parser.add_argument("--founding-seats", type=int, default=500,
                        help="FOUNDING_SEATS: that many subscription checkouts hold a seat (500)")
    parser.add_argument("--database-url", default=None,
                        help="an administrative postgresql:// URL; a scratch database is created"
                             " there and dropped (default: DATABASE_URL, else embedded PG 18)")
    args = parser.parse_args(argv)
    if args.requests < 1 or args.concurrency < 1 or args.warmup < 0:
        parser.error("--requests and --concurrency must be positive, --warmup not negative")
    world = World(seed=2026)
    stock(world, seats=args.founding_seats)
    # in a process of its own: sharing the measuring client's event loop, a session creation
    # waited for the client's work, and that wait was counted as the service's
    with fake_stripe_process(world, FakeTimes().install) as (args.fake_url, _):
        return asyncio.run(run(args))


if __name__ == "__main__":
    sys.exit(main())
