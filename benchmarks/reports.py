"""The contributions CSV export over HTTP against PostgreSQL's own COPY of the same rows.

    python -m benchmarks.reports [--rows 1000000] [--database-url URL]

Fills a scratch database with `--rows` succeeded payments (with their balance transactions,
some with public text a spreadsheet would run), starts `donations serve`, downloads
GET /v1/reports/contributions as CSV, then runs COPY (the same query) TO STDOUT WITH CSV through
asyncpg. Prints rows/s of each, their ratio, and the service's peak memory.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path

import aiohttp
import asyncpg

from benchmarks._common import (
    describe_server,
    postgres_server,
    print_table,
    running_service,
    scratch_database,
    server_version,
)
from donations import auth, db, reports

TARGET_RATIO = 0.4
TARGET_MEMORY_MB = 150
WINDOW = {"from": "2026-01-01", "to": "2027-01-01"}

# One year of payments in four currencies, a third recurring, every 50th with a campaign that
# would run as a formula; each settled in GBP with a balance transaction paid out.
FILL = """
INSERT INTO payments (payment_key, kind, status, currency, amount, payment_intent, charge,
                      customer, email, campaign, metadata, balance_transaction, fee, net,
                      settlement_currency, settlement_amount, created_at)
SELECT 'pi_bench' || i, CASE WHEN i % 3 = 0 THEN 'recurring' ELSE 'one_off' END, 'succeeded',
       (ARRAY['gbp', 'usd', 'eur', 'jpy'])[i % 4 + 1], 500 + i % 5000,
       'pi_bench' || i, 'ch_bench' || i, 'cus_bench' || i % 50000,
       'reader' || i || '@example.org',
       CASE WHEN i % 50 = 0 THEN '=HYPERLINK("x")' WHEN i % 7 = 0 THEN 'winter' END,
       jsonb_build_object('form', 'support-us'), 'txn_bench' || i, 20 + i % 80,
       480 + i % 5000 - (20 + i % 80), 'gbp', 480 + i % 5000,
       timestamptz '2026-01-01' + make_interval(secs => (i - 1) * 31536000.0 / $1)
  FROM generate_series(1, $1) AS i
"""
FILL_BALANCE = """
INSERT INTO balance_transactions (id, type, source, amount, currency, fee, net, payout,
                                  created_at, data)
SELECT balance_transaction, 'charge', charge, settlement_amount, 'gbp', fee, net,
       'po_bench' || (extract(doy FROM created_at))::int, created_at, '{}'
  FROM payments
"""


def peak_memory_mb(pid: int) -> tuple[float, float]:
    """(current RSS, peak RSS since the process started) in MB, from /proc."""
    values = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            values[key] = int(rest.split()[0]) / 1024
    return values["VmRSS"], values["VmHWM"]


async def fill(dsn: str, rows: int) -> None:
    await db.migrate(dsn)
    conn = await asyncpg.connect(dsn)
    try:
        started = time.perf_counter()
        # Bulk load without the ledger's triggers (the public totals of 004): they are not what
        # is measured, and per-row they would make the fill take an hour. Needs a superuser.
        await conn.execute("SET session_replication_role = replica")
        await conn.execute(FILL, rows)
        await conn.execute(FILL_BALANCE)
        await conn.execute("ANALYZE payments; ANALYZE balance_transactions")
        print(f"filled {rows:,} payments in {time.perf_counter() - started:.1f} s",
              file=sys.stderr)
    finally:
        await conn.close()


async def http_export(base_url: str, token: str, pid: int) -> tuple[int, int, float, float]:
    """(rows, bytes, seconds, highest RSS seen while streaming in MB)."""
    lines = size = 0
    highest = 0.0
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600)) as session:
        started = time.perf_counter()
        async with session.get(f"{base_url}/v1/reports/contributions",
                               params={**WINDOW, "format": "csv"},
                               headers={"Authorization": f"Bearer {token}"}) as response:
            if response.status != 200:
                raise RuntimeError(f"export answered {response.status}: "
                                   f"{await response.text()}")
            sampled = 0.0
            async for chunk in response.content.iter_chunked(1 << 16):
                size += len(chunk)
                lines += chunk.count(b"\n")
                now = time.perf_counter()
                if now - sampled > 0.05:
                    highest = max(highest, peak_memory_mb(pid)[0])
                    sampled = now
        seconds = time.perf_counter() - started
    return lines - 1, size, seconds, highest  # less the header


async def copy_export(dsn: str, formatted: bool = True) -> tuple[int, int, float]:
    """(rows, bytes, seconds) of COPY (the report's own query) TO STDOUT WITH CSV; unformatted,
    the same movements with amounts in minor units and raw timestamps, for information."""
    win = reports.window(WINDOW["from"], WINDOW["to"])
    query, arguments = ((reports.CONTRIBUTIONS_CSV, reports.csv_arguments(win)) if formatted
                        else (reports.CONTRIBUTIONS, (win.start, win.end)))
    conn = await asyncpg.connect(dsn)
    lines = size = 0

    async def sink(chunk: bytes) -> None:
        nonlocal lines, size
        size += len(chunk)
        lines += chunk.count(b"\n")

    try:
        started = time.perf_counter()
        # the report's own query, so the same rows, cells and order; PostgreSQL writes the CSV
        await conn.copy_from_query(query, *arguments, output=sink, format="csv")
        seconds = time.perf_counter() - started
    finally:
        await conn.close()
    return lines, size, seconds


async def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--database-url")
    args = parser.parse_args(argv)

    async with postgres_server(args.database_url) as admin, \
            scratch_database(admin, "donations_bench_reports") as dsn:
        version = await server_version(dsn)
        await fill(dsn, args.rows)
        conn = await asyncpg.connect(dsn)
        try:
            token = await auth.create_token(conn, "bench", ["reports:read"])
        finally:
            await conn.close()
        async with running_service(dsn) as service:
            pid = service.process.pid
            rss_before, _ = peak_memory_mb(pid)
            http_rows, http_bytes, http_seconds, highest = await http_export(
                service.base_url, token, pid)
            _, peak = peak_memory_mb(pid)
        copy_rows, copy_bytes, copy_seconds = await copy_export(dsn)
        raw_rows, raw_bytes, raw_seconds = await copy_export(dsn, formatted=False)

    http_rate, copy_rate = http_rows / http_seconds, copy_rows / copy_seconds
    ratio = http_rate / copy_rate
    print(f"PostgreSQL {version} at {describe_server(admin)}; {args.rows:,} payments")
    print_table(
        ["export", "rows", "MB", "seconds", "rows/s"],
        [["HTTP CSV (service)", http_rows, http_bytes / 1e6, http_seconds, http_rate],
         ["COPY TO STDOUT CSV", copy_rows, copy_bytes / 1e6, copy_seconds, copy_rate],
         ["COPY, unformatted", raw_rows, raw_bytes / 1e6, raw_seconds, raw_rows / raw_seconds]],
    )
    print(f"ratio HTTP/COPY: {ratio:.2f} (target >= {TARGET_RATIO}: "
          f"{'PASS' if ratio >= TARGET_RATIO else 'FAIL'}); against the unformatted COPY: "
          f"{http_rate / (raw_rows / raw_seconds):.2f}")
    print(f"service memory: {rss_before:.0f} MB before the export, {highest:.0f} MB highest "
          f"seen during it, {peak:.0f} MB peak since start (VmHWM; target < "
          f"{TARGET_MEMORY_MB} MB: {'PASS' if peak < TARGET_MEMORY_MB else 'FAIL'})")
    return 0 if http_rows == copy_rows == args.rows else 1


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
