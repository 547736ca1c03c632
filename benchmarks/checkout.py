"""Checkout creation through the service against a fake Stripe, beside that fake Stripe alone.

    .venv/bin/python -m benchmarks.checkout [--requests N] [--concurrency C] [--database-url URL]

The service side: one `donations serve` process whose Stripe is the test suite's fake Stripe
(tests/fakestripe, run in this process on a free port); N checkout requests over HTTP, C in
flight, alternating one-off contributions and monthly subscriptions (the first FOUNDING_SEATS of
those hold a founding seat, the rest find the offer closed), each with a campaign, form metadata
and an Idempotency-Key: the full path (rate limits, idempotency, campaign check, seat hold,
Stripe call through the stripe library, answer stored).

The fake Stripe alone, in the same run: the same number of session creations at the same
concurrency posted straight to it, form-encoded as the stripe library sends them. The
service's own overhead per checkout is the difference; the target is under 5 ms at p99.

Exit status: 0 when every request got its 201 (this is a measurement, not a test), 1 otherwise.
"""

from __future__ import annotations

import argparse
import asyncio
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

from benchmarks._common import (
    Measurement,
    database_url_from,
    describe_server,
    postgres_server,
    print_table,
    running_service,
    scratch_database,
    server_version,
)
from tests.checkout_helpers import SITE, TEST_KEY, stock
from tests.fakestripe.server import running_fake_stripe
from tests.fakestripe.world import World

TARGET_MS = 5.0
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


async def measure(
    name: str, count: int, concurrency: int, send: Callable[[int], Awaitable[int]]
) -> Measurement:
    result = Measurement(name)
    queue = iter(range(count))
    errors: list[int] = []

    async def worker() -> None:
        for i in queue:
            started = time.perf_counter()
            status = await send(i)
            result.latencies.append(time.perf_counter() - started)
            if status not in (200, 201):
                result.failures += 1
                errors.append(status)

    t = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    result.seconds = time.perf_counter() - t
    if errors:
        print(f"{name}: statuses {sorted(set(errors))}", file=sys.stderr)
    return result


async def run(args: argparse.Namespace) -> int:
    world = World(seed=2026)
    stock(world, seats=args.founding_seats)
    async with postgres_server(database_url_from(args.database_url)) as admin_dsn, \
            scratch_database(admin_dsn) as dsn, running_fake_stripe(world) as fake:
        print(f"PostgreSQL {await server_version(admin_dsn)} ({describe_server(admin_dsn)});"
              f" Python {platform.python_version()}; {os.cpu_count()} cores;"
              f" concurrency {args.concurrency}; fake Stripe at {fake.base_url}")
        env = {
            "STRIPE_SECRET_KEY": TEST_KEY, "STRIPE_API_BASE": fake.base_url,
            "SITE_ORIGINS": SITE, "FOUNDING_SEATS": str(args.founding_seats),
            "CHECKOUT_RATE_PER_IP": "1000000", "CHECKOUT_RATE_OVERALL": "100000000",
        }
        async with running_service(dsn, env=env) as service:
            conn = await asyncpg.connect(dsn)
            try:
                await conn.execute("INSERT INTO campaigns (slug, title) VALUES ($1, 'Bench')",
                                   CAMPAIGN)
            finally:
                await conn.close()
            connector = aiohttp.TCPConnector(limit=args.concurrency * 2)
            async with aiohttp.ClientSession(connector=connector) as session:
                async def via_service(i: int) -> int:
                    path, payload = body(i)
                    headers = {"Idempotency-Key": str(uuid.uuid4())}
                    async with session.post(service.base_url + path, json=payload,
                                            headers=headers) as response:
                        await response.read()
                        return response.status

                async def stripe_alone(i: int) -> int:
                    headers = {"Authorization": f"Bearer {TEST_KEY}",
                               "Content-Type": "application/x-www-form-urlencoded",
                               "Idempotency-Key": str(uuid.uuid4())}
                    async with session.post(f"{fake.base_url}/v1/checkout/sessions",
                                            data=stripe_form(i), headers=headers) as response:
                        await response.read()
                        return response.status

                warm = args.warmup
                await measure("warm-up", warm, args.concurrency, via_service)
                await measure("warm-up", warm, args.concurrency, stripe_alone)
                # the fake keeps every session it made: measure both sides at the same size
                fake_alone = await measure("fake Stripe alone", args.requests,
                                           args.concurrency,
                                           lambda i: stripe_alone(i + warm))
                served = await measure("service -> fake Stripe", args.requests,
                                       args.concurrency, lambda i: via_service(i + warm))
            log_tail = service.log_tail(10)

    print()
    print_table(
        ["", "requests", "seconds", "req/s", "mean ms", "p50 ms", "p99 ms", "max ms", "failed"],
        [[m.name, m.count, m.seconds, m.rate, m.mean_ms, m.ms(50), m.ms(99), m.ms(100),
          m.failures] for m in (served, fake_alone)],
    )
    overhead = {p: served.ms(p) - fake_alone.ms(p) for p in (50, 99)}
    verdict = "PASS" if overhead[99] < TARGET_MS else "FAIL"
    print()
    print(f"service overhead per checkout: mean {served.mean_ms - fake_alone.mean_ms:.2f} ms,"
          f" p50 {overhead[50]:.2f} ms, p99 {overhead[99]:.2f} ms"
          f" (target p99 < {TARGET_MS:.0f} ms: {verdict})")
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
    return asyncio.run(run(args))


if __name__ == "__main__":
    sys.exit(main())
