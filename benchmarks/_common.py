"""Shared by the benchmarks: a PostgreSQL to measure against, the service as a subprocess,
latency percentiles and a small result table.

Every benchmark measures the real thing: `donations serve` in its own process, over HTTP, on a
real PostgreSQL (the embedded one in a temporary folder, or a server the caller names), in a
scratch database created for the run and dropped after it.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import multiprocessing
import os
import secrets
import shutil
import signal
import socket
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import aiohttp
import asyncpg

from donations import db
from tests.fakestripe.server import FakeStripe
from tests.fakestripe.world import World

# --- PostgreSQL -----------------------------------------------------------------------------


def database_url_from(given: str | None) -> str | None:
    """The server to use: the --database-url given, else DATABASE_URL, else None (embedded)."""
    return given or os.environ.get("DATABASE_URL") or None


def with_database(dsn: str, name: str) -> str:
    """The same server URL, naming another database."""
    return urlunsplit(urlsplit(dsn)._replace(path=f"/{name}"))


def describe_server(dsn: str) -> str:
    """host:port/database of a URL, without the user or password, for printing."""
    parts = urlsplit(dsn)
    return f"{parts.hostname or 'localhost'}:{parts.port or 5432}{parts.path}"


@contextlib.asynccontextmanager
async def postgres_server(database_url: str | None) -> AsyncIterator[str]:
    """An administrative URL of the server to measure against.

    With a URL, that server (left as it is). Without one, an embedded PostgreSQL 18 started in
    a temporary folder, stopped and removed when the block ends.
    """
    if database_url:
        yield database_url
        return
    folder = Path(tempfile.mkdtemp(prefix="donations-bench-"))
    embedded = db.EmbeddedPostgres(folder)
    try:
        dsn = await asyncio.to_thread(embedded.start)
        yield dsn.replace(f"/{db.EmbeddedPostgres.DATABASE}?", "/postgres?", 1)
    finally:
        await asyncio.to_thread(embedded.stop)
        shutil.rmtree(folder, ignore_errors=True)


@contextlib.asynccontextmanager
async def scratch_database(admin_dsn: str, prefix: str = "donations_bench") -> AsyncIterator[str]:
    """A fresh, empty database on the server for the run; dropped (WITH FORCE) afterwards."""
    name = f"{prefix}_{secrets.token_hex(4)}"
    admin = await asyncpg.connect(admin_dsn)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    try:
        yield with_database(admin_dsn, name)
    finally:
        admin = await asyncpg.connect(admin_dsn)
        try:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await admin.close()


async def server_version(dsn: str) -> str:
    conn = await asyncpg.connect(dsn)
    try:
        version: str = await conn.fetchval("SHOW server_version")
    finally:
        await conn.close()
    return version


async def transaction_counts(dsn: str) -> tuple[int, int]:
    """(commits, rollbacks) PostgreSQL has counted for the URL's database so far.

    The cumulative statistics are flushed by each backend when it goes idle (at most about a
    second late), so read them after a pause when the load has stopped.
    """
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute("SELECT pg_stat_clear_snapshot()")
        row = await conn.fetchrow(
            "SELECT xact_commit, xact_rollback FROM pg_stat_database WHERE datname = $1",
            urlsplit(dsn).path.lstrip("/"),
        )
    finally:
        await conn.close()
    return (int(row["xact_commit"]), int(row["xact_rollback"])) if row else (0, 0)


# --- the service ----------------------------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds a process has used, from /proc (nan where there is none)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return math.nan
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def _serve_fake_stripe(world: World, port: int, ready: Any,
                       configure: Callable[[FakeStripe], None] | None) -> None:
    async def main() -> None:
        fake = FakeStripe(world)
        if configure is not None:
            configure(fake)
        await fake.start(port=port)
        ready.set()
        await asyncio.Event().wait()

    asyncio.run(main())


@contextlib.contextmanager
def fake_stripe_process(
    world: World, configure: Callable[[FakeStripe], None] | None = None, within: float = 60,
) -> Iterator[tuple[str, int]]:
    """The fake Stripe serving `world` (after `configure`) from a forked child process of its
    own, so that it does not share the measuring process's interpreter: (base URL, its pid)."""
    port = free_port()
    context = multiprocessing.get_context("fork")  # the child gets the World without pickling
    ready = context.Event()
    child = context.Process(target=_serve_fake_stripe, args=(world, port, ready, configure),
                            daemon=True)
    child.start()
    try:
        if not ready.wait(within):
            raise RuntimeError("the fake Stripe did not start")
        assert child.pid is not None
        yield f"http://127.0.0.1:{port}", child.pid
    finally:
        child.terminate()
        child.join(10)


def service_command() -> list[str]:
    """`donations serve` from the same environment as this interpreter."""
    script = Path(sys.executable).parent / "donations"
    if script.exists():
        return [str(script), "serve"]
    return [sys.executable, "-m", "donations", "serve"]


@dataclass
class Service:
    base_url: str
    process: asyncio.subprocess.Process
    log_path: Path

    def log_tail(self, lines: int = 30) -> str:
        try:
            text = self.log_path.read_text("utf-8", errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])


@contextlib.asynccontextmanager
async def running_service(
    database_url: str,
    *,
    env: Mapping[str, str] | None = None,
    log_level: str = "warning",
    ready_timeout: float = 60.0,
) -> AsyncIterator[Service]:
    """One `donations serve` process on a free port, ready (GET /readyz is 200) when yielded.

    It logs at `log_level` (warning by default, so that a log line per request does not become
    what is measured) to a temporary file, shown if it fails to start. SIGTERM at the end.
    """
    port = free_port()
    folder = Path(tempfile.mkdtemp(prefix="donations-bench-service-"))
    log_path = folder / "service.log"
    child_env = {
        **os.environ,
        "DATABASE_URL": database_url,
        "HOST": "127.0.0.1",
        "PORT": str(port),
        "LOG_LEVEL": log_level,
        "LOG_FORMAT": "json",
        "DONATIONS_DATA_DIR": str(folder / "data"),
        # no Stripe key: the balance-transaction worker stays off and makes no calls out
        "STRIPE_SECRET_KEY": "",
        **(env or {}),
    }
    with log_path.open("wb") as log_file:
        process = await asyncio.create_subprocess_exec(
            *service_command(), env=child_env, stdout=log_file, stderr=log_file,
            stdin=asyncio.subprocess.DEVNULL,
        )
    service = Service(f"http://127.0.0.1:{port}", process, log_path)
    try:
        await _wait_ready(service, ready_timeout)
        yield service
    finally:
        await _stop(process)
        shutil.rmtree(folder, ignore_errors=True)


async def _wait_ready(service: Service, within: float) -> None:
    deadline = time.monotonic() + within
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as session:
        while time.monotonic() < deadline:
            if service.process.returncode is not None:
                raise RuntimeError(
                    f"donations serve exited with {service.process.returncode}:\n"
                    + service.log_tail()
                )
            with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                async with session.get(f"{service.base_url}/readyz") as response:
                    if response.status == 200:
                        return
            await asyncio.sleep(0.1)
    raise RuntimeError(f"donations serve not ready after {within:.0f}s:\n" + service.log_tail())


async def _stop(process: asyncio.subprocess.Process) -> None:
    if process.returncode is None:
        process.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(process.wait(), 40)
        except TimeoutError:
            process.kill()
            await process.wait()


# --- figures --------------------------------------------------------------------------------


def percentile(ordered: Sequence[float], p: float) -> float:
    """The nearest-rank p-th percentile (0 < p <= 100) of values sorted ascending."""
    if not ordered:
        return math.nan
    rank = max(1, math.ceil(p / 100 * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


@dataclass
class Measurement:
    """What one measured phase did: how many operations, in how long, each how long."""

    name: str
    seconds: float = 0.0
    latencies: list[float] = field(default_factory=list)  # seconds, one per operation
    failures: int = 0

    @property
    def count(self) -> int:
        return len(self.latencies)

    @property
    def rate(self) -> float:
        return self.count / self.seconds if self.seconds > 0 else math.nan

    def ms(self, p: float) -> float:
        return percentile(sorted(self.latencies), p) * 1000

    @property
    def mean_ms(self) -> float:
        return sum(self.latencies) / len(self.latencies) * 1000 if self.latencies else math.nan


def print_table(headers: Sequence[str], rows: Iterable[Sequence[object]]) -> None:
    """A plain, aligned text table: text left, numbers right."""
    cells = [[_cell(v) for v in row] for row in rows]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]
    numeric = [bool(cells) and all(_is_number(r[i]) for r in cells) for i in range(len(headers))]

    def line(values: Sequence[str]) -> str:
        padded = zip(values, widths, numeric, strict=True)
        return "  ".join(v.rjust(w) if right else v.ljust(w) for v, w, right in padded).rstrip()

    print(line(headers))
    print("  ".join("-" * w for w in widths))
    for row in cells:
        print(line(row))


def _cell(value: object) -> str:
    if isinstance(value, float):
        if math.isnan(value):
            return "-"
        return f"{value:,.0f}" if abs(value) >= 100 else f"{value:.2f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def _is_number(text: str) -> bool:
    return bool(text) and (text == "-" or text.replace(",", "").replace(".", "", 1).isdigit())


class KeepAlive:
    """One keep-alive HTTP/1.1 connection that sends requests written out in full and reads
    answers with a Content-Length: a load generator that costs the machine little, so that the
    measured side, not the client, gets the cores (aiohttp's client costs ~0.3 ms of CPU a
    request, as much as some of what is measured). Not a general client: no chunked answers,
    no redirects, one request at a time per connection."""

    def __init__(self, base_url: str) -> None:
        parts = urlsplit(base_url)
        self.host, self.port = parts.hostname or "127.0.0.1", parts.port or 80
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None

    @staticmethod
    def request(method: str, path: str, headers: dict[str, str], body: bytes) -> bytes:
        head = "".join(f"{name}: {value}\r\n" for name, value in headers.items())
        return (f"{method} {path} HTTP/1.1\r\nHost: bench\r\n{head}"
                f"Content-Length: {len(body)}\r\n\r\n").encode() + body

    async def send(self, request: bytes) -> tuple[int, bytes]:
        """(status, body) of the answer to a request made by `request`."""
        if self._writer is None:
            self._reader, self._writer = await asyncio.open_connection(self.host, self.port)
        assert self._reader is not None
        self._writer.write(request)
        status_line = await self._reader.readline()
        if not status_line:
            raise ConnectionError("the server closed the connection")
        length = 0
        while (line := await self._reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        body = await self._reader.readexactly(length) if length else b""
        return int(status_line.split()[1]), body

    async def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            with contextlib.suppress(OSError):
                await self._writer.wait_closed()
            self._writer = None
