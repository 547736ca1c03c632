"""GET /v1/totals at 1,000 and 1,000,000 contributions, beside a bare aiohttp handler.

    .venv/bin/python -m benchmarks.totals [--sizes 1000 1000000] [--seconds 10]
        [--concurrency 32] [--database-url URL]

For each ledger size: a scratch database is migrated and loaded by COPY with that many
contributions (one-offs and subscription payments in GBP, USD, EUR and JPY, some refunded or
disputed, about 1 in 4 for a campaign, ~1 person in 3 giving twice, and one subscription per 20
contributions), their totals are built by the migration's own SQL (`totals_rebuild`, the function a
campaign's creation runs) and checked by `totals.verify`; then one `donations serve` process is
started on it and `GET /v1/totals` is measured at `--concurrency` connections for `--seconds`,
and in the same run a bare aiohttp handler (its own process, access log off) answering a
constant JSON body of the same length. The load comes from `wrk` when it is installed
(apt-get install wrk), else from an aiohttp client in this process. Beside requests/s, the CPU
each server process spent per request (from /proc: steadier than requests/s when the machine is
shared) and the load average. Exit status 0 when every answer was a 200.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import json
import math
import os
import platform
import random
import re
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import aiohttp
import asyncpg

from benchmarks._common import (
    Measurement,
    cpu_seconds,
    database_url_from,
    describe_server,
    free_port,
    postgres_server,
    print_table,
    running_service,
    scratch_database,
    server_version,
)
from donations import db, totals

# On the event loop `donations serve` runs on (uvloop where installed), so that the two sides
# differ only by what the service does.
BARE_SERVER = """
import sys
from aiohttp import web
from donations.cli import new_event_loop
body = open(sys.argv[2], "rb").read()
async def handler(request):
    return web.Response(body=body, content_type="application/json", charset="utf-8")
app = web.Application()
app.router.add_get("/v1/totals", handler)
web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), access_log=None, print=None,
            loop=new_event_loop())
"""


# --- the ledger -------------------------------------------------------------------------------


def ledger_rows(count: int, seed: int) -> tuple[bytes, bytes]:
    """`count` contributions and their subscriptions, as COPY text for payments, subscriptions."""
    rng = random.Random(seed)
    start = datetime(2025, 1, 1, tzinfo=UTC)
    payments, subscriptions = io.StringIO(), io.StringIO()
    currencies = ("gbp",) * 7 + ("usd", "eur", "jpy")
    for i in range(count):
        currency = rng.choice(currencies)
        amount = rng.choice((300, 500, 1000, 2500, 5000)) * (3 if currency == "jpy" else 1)
        refunded = amount if rng.random() < 0.02 else (amount // 2 if rng.random() < 0.02 else 0)
        disputed = amount - refunded if rng.random() < 0.003 else 0
        person = rng.randrange(max(1, count * 2 // 3))
        created = start + timedelta(seconds=i * 17)
        campaign = "winter" if i % 4 == 0 else r"\N"
        recurring = i % 3 == 0
        settled = amount if currency == "gbp" else amount * rng.choice((79, 85, 86)) // 100
        if currency == "jpy":
            settled = amount * 53 // 100
        known = rng.random() < 0.95
        payments.write("\t".join(map(str, (
            f"pi_bench{i:09d}", "recurring" if recurring else "one_off", "succeeded", currency,
            amount, refunded, disputed, "f", f"cus_bench{person:08d}",
            f"reader{person}@example.org", campaign, "gbp" if known else r"\N",
            settled if known else r"\N", created.isoformat(),
        ))) + "\n")
        if i % 20 == 0:
            interval = rng.choice(("month", "month", "year"))
            subscriptions.write("\t".join(map(str, (
                f"sub_bench{i:09d}", f"cus_bench{person:08d}",
                rng.choice(("active", "active", "active", "past_due", "canceled")), currency,
                1000 if interval == "month" else 10000, interval, 1,
                "50" if i % 60 == 0 else r"\N", "t" if i % 60 == 0 else "f", campaign,
                created.isoformat(),
            ))) + "\n")
    return payments.getvalue().encode(), subscriptions.getvalue().encode()


async def load(dsn: str, count: int, seed: int) -> float:
    """Migrate, COPY the ledger in and build its totals; returns the seconds it took."""
    started = time.perf_counter()
    await db.migrate(dsn)
    payments, subscriptions = ledger_rows(count, seed)
    conn = await asyncpg.connect(dsn)
    try:
        async with conn.transaction():
            await conn.execute(
                "INSERT INTO campaigns (slug, title, goal_amount, goal_currency) "
                "VALUES ('winter', 'Winter appeal', 5000000, 'gbp')")
            # row by row the triggers would do the same work a million times; the rebuild below
            # is the same SQL, set-based
            await conn.execute("ALTER TABLE payments DISABLE TRIGGER USER")
            await conn.execute("ALTER TABLE subscriptions DISABLE TRIGGER USER")
            await conn.copy_to_table(
                "payments", source=io.BytesIO(payments), columns=[
                    "payment_key", "kind", "status", "currency", "amount", "amount_refunded",
                    "amount_disputed", "dispute_lost", "customer", "email", "campaign",
                    "settlement_currency", "settlement_amount", "created_at"])
            await conn.copy_to_table(
                "subscriptions", source=io.BytesIO(subscriptions), columns=[
                    "id", "customer", "status", "currency", "amount", "interval",
                    "interval_count", "percent_off", "founding", "campaign", "created_at"])
            await conn.execute("ALTER TABLE payments ENABLE TRIGGER USER")
            await conn.execute("ALTER TABLE subscriptions ENABLE TRIGGER USER")
            await conn.execute("SELECT totals_rebuild('*'), totals_rebuild('winter')")
        # VACUUM too: otherwise autovacuum takes the freshly loaded million rows on while the
        # service is measured, and the two share the machine's two cores
        await conn.execute("VACUUM ANALYZE")
        # and write the load's dirty pages out now rather than in a checkpoint that would fall
        # on whichever side happens to be measured then (a superuser's right; else skipped)
        with contextlib.suppress(asyncpg.InsufficientPrivilegeError):
            await conn.execute("CHECKPOINT")
    finally:
        await conn.close()
    return time.perf_counter() - started


async def verify(dsn: str) -> totals.Verification:
    conn = await asyncpg.connect(dsn)
    try:
        return await totals.verify(conn)
    finally:
        await conn.close()


# --- load generation --------------------------------------------------------------------------


@dataclass
class Result:
    name: str
    requests: int
    seconds: float
    p50_ms: float
    p99_ms: float
    failed: int
    cpu_us: float = math.nan  # the server process's CPU (user + system) per request


    @property
    def rate(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0


_UNITS = {"us": 0.001, "ms": 1.0, "s": 1000.0}


def _ms(text: str) -> float:
    match = re.fullmatch(r"([\d.]+)(us|ms|s)", text)
    if not match:
        raise ValueError(f"not a wrk duration: {text!r}")
    return float(match.group(1)) * _UNITS[match.group(2)]


def _find(pattern: str, text: str) -> str:
    match = re.search(pattern, text)
    if match is None:
        raise RuntimeError(f"wrk's output has no {pattern!r}:\n{text}")
    return match.group(1)


async def with_wrk(name: str, url: str, concurrency: int, seconds: float) -> Result:
    process = await asyncio.create_subprocess_exec(
        "wrk", "-t2", f"-c{concurrency}", f"-d{int(seconds)}s", "--latency", url,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await process.communicate()
    text = out.decode()
    if process.returncode != 0:
        raise RuntimeError(f"wrk failed: {err.decode()}")
    requests = int(_find(r"(\d+) requests in", text))
    elapsed = _find(r"requests in ([\d.]+\w+)", text)
    # the "Latency Distribution" lines only: other lines end in percentages too
    p50, p99 = _find(r"(?m)^\s+50%\s+(\S+)$", text), _find(r"(?m)^\s+99%\s+(\S+)$", text)
    bad = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
    errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)",
                       text)
    failed = (int(bad.group(1)) if bad else 0) + (
        sum(int(g) for g in errors.groups()) if errors else 0)
    return Result(name, requests, _ms(elapsed) / 1000, _ms(p50), _ms(p99), failed)


async def with_aiohttp(name: str, url: str, concurrency: int, seconds: float) -> Result:
    measured = Measurement(name)
    failed = 0
    deadline = time.perf_counter() + seconds
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def worker() -> None:
            nonlocal failed
            while time.perf_counter() < deadline:
                began = time.perf_counter()
                async with session.get(url) as response:
                    await response.read()
                    if response.status != 200:
                        failed += 1
                measured.latencies.append(time.perf_counter() - began)

        began = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        measured.seconds = time.perf_counter() - began
    return Result(name, measured.count, measured.seconds, measured.ms(50), measured.ms(99),
                  failed)


async def measure(name: str, url: str, pid: int, concurrency: int, seconds: float) -> Result:
    """Warm up, then load `url`; with the CPU the server process `pid` spent per request (less
    noisy than requests/s on a machine the load generator and other work share)."""
    run = with_wrk if shutil.which("wrk") else with_aiohttp
    await run(name, url, concurrency, min(2.0, seconds))  # warm-up, not measured
    before = cpu_seconds(pid)
    result = await run(name, url, concurrency, seconds)
    if result.requests:
        result.cpu_us = (cpu_seconds(pid) - before) / result.requests * 1e6
    return result


# --- the run ----------------------------------------------------------------------------------


async def bare_server(body: bytes) -> tuple[asyncio.subprocess.Process, str, Path]:
    folder = Path(tempfile.mkdtemp(prefix="donations-bench-bare-"))
    (folder / "body.json").write_bytes(body)
    port = free_port()
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-c", BARE_SERVER, str(port), str(folder / "body.json"),
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}/v1/totals"
    async with aiohttp.ClientSession() as session:
        for _ in range(100):
            try:
                async with session.get(url) as response:
                    if response.status == 200:
                        break
            except aiohttp.ClientError:
                await asyncio.sleep(0.1)
    return process, url, folder


async def run_size(admin: str, count: int, args: argparse.Namespace) -> list[list[object]]:
    async with scratch_database(admin, "donations_bench_totals") as dsn:
        loaded = await load(dsn, count, args.seed)
        checked = await verify(dsn)
        print(f"{count:,} contributions: loaded and totals built in {loaded:.1f} s; verify: "
              f"{len(checked.differences)} difference(s) in {checked.buckets} buckets",
              flush=True)
        async with running_service(dsn, env={"TOTALS_TTL": "5"}) as service:
            url = f"{service.base_url}/v1/totals"
            async with aiohttp.ClientSession() as session, session.get(url) as response:
                body = await response.read()
                figures = json.loads(body)
            print(f"  raised {figures['raised']}, contributions {figures['contributions']:,}, "
                  f"supporters {figures['supporters']:,}; body {len(body)} bytes", flush=True)
            bare, bare_url, folder = await bare_server(body)
            try:
                base = await measure("bare aiohttp", bare_url, bare.pid, args.concurrency,
                                     args.seconds)
                mine = await measure("GET /v1/totals", url, service.process.pid,
                                     args.concurrency, args.seconds)
            finally:
                bare.terminate()
                await bare.wait()
                shutil.rmtree(folder, ignore_errors=True)
    if checked.differences or mine.failed or base.failed:
        args.failed = True
    return [
        [f"{count:,}", r.name, r.requests, r.rate, r.p50_ms, r.p99_ms, r.failed, r.cpu_us,
         f"{mine.rate / base.rate:.2f}" if r is mine else "",
         f"{base.cpu_us / mine.cpu_us:.2f}" if r is mine else ""]
        for r in (base, mine)
    ]


async def main(args: argparse.Namespace) -> int:
    args.failed = False
    async with postgres_server(database_url_from(args.database_url)) as admin:
        print(f"PostgreSQL {await server_version(admin)} at {describe_server(admin)}; "
              f"{os.cpu_count()} cores; Python {platform.python_version()}; load: "
              f"{'wrk' if shutil.which('wrk') else 'aiohttp client'}, "
              f"{args.concurrency} connections, {args.seconds:.0f} s each; load average "
              f"{os.getloadavg()[0]:.2f}", flush=True)
        rows: list[list[object]] = []
        for count in args.sizes:
            rows += await run_size(admin, count, args)
    print()
    print_table(["contributions", "server", "requests", "req/s", "p50 ms", "p99 ms", "failed",
                 "CPU µs/req", "ratio", "CPU ratio"], rows)
    totals_rates = [float(str(r[3])) for r in rows if r[1] == "GET /v1/totals"]
    if len(totals_rates) >= 2:
        print(f"\nGET /v1/totals at {args.sizes[-1]:,} ÷ at {args.sizes[0]:,}: "
              f"{totals_rates[-1] / totals_rates[0]:.2f}")
    print(f"load average at the end {os.getloadavg()[0]:.2f}")
    return 1 if args.failed else 0


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1_000, 1_000_000])
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--database-url", help="an administrative postgresql:// URL")
    parser.add_argument("--seed", type=int, default=2026)
    return parser.parse_args(argv)


if __name__ == "__main__":
    sys.exit(asyncio.run(main(parse())))
