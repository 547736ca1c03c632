"""Test fixtures: a real PostgreSQL (embedded, or the server DATABASE_URL names), a fresh database
for the session with migrations applied, tables emptied before each test, and the app on top."""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import shutil
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import aiohttp
import asyncpg
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from pytest_aiohttp import AiohttpClient

from donations import db
from donations.app import Runner, create_app
from donations.appkeys import SETTINGS
from donations.settings import Secret, Settings

WEBHOOK_SECRET = "whsec_test_secret_for_the_donations_suite"

# Every table the tests write to; emptied before each test so that tests cannot see each other.
TABLES = (
    "stripe_events", "stripe_objects", "payments", "refunds", "disputes", "subscriptions",
    "customers", "payouts", "balance_transactions", "balance_transaction_fetches", "api_tokens",
    "campaigns", "payout_balance_transactions", "payout_fetches",
    "reconciliation_checkpoint", "reconciliation_discrepancies", "reconciliation_runs",
    "import_progress", "checkout_requests", "founding_holds", "rate_limit_hits",
    "totals", "totals_deltas", "totals_supporters", "totals_scopes", "founding_coupons_used_up",
    "staff_sessions", "stored_event_counts", "stored_event_count_deltas", "ledger_counts",
    "ledger_count_deltas", "subscription_statuses", "coupon_lookups", "failed_debits",
)


@pytest.fixture(scope="session")
def server_dsn() -> Iterator[str]:
    """An administrative URL of the PostgreSQL the suite runs against."""
    given = os.environ.get("DATABASE_URL")
    if given:
        yield given
        return
    embedded = db.EmbeddedPostgres(Path(tempfile.mkdtemp(prefix="donations-test-")))
    dsn = embedded.start()
    try:
        yield dsn.replace(f"/{db.EmbeddedPostgres.DATABASE}?", "/postgres?", 1)
    finally:
        embedded.stop()


@pytest.fixture
def embedded_tmp() -> Iterator[Path]:
    """A temporary folder for the data folders of embedded servers that their own user can reach
    when the suite runs as root (mode 0755, in the system's temporary folder). pytest's tmp_path
    will not do: its folders are private (0700, and closed again by every pytest session that
    starts), and the service refuses to have the wheel open them up."""
    folder = Path(tempfile.mkdtemp(prefix="donations-data-"))
    folder.chmod(0o755)
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _with_database(dsn: str, name: str) -> str:
    parts = urlsplit(dsn)
    return urlunsplit(parts._replace(path=f"/{name}"))


async def _admin(server_dsn: str, sql: str) -> None:
    admin = await asyncpg.connect(server_dsn)
    try:
        await admin.execute(sql)
    finally:
        await admin.close()


@contextlib.asynccontextmanager
async def scratch_database(
    server_dsn: str, prefix: str, *, migrated: bool = True
) -> AsyncIterator[tuple[str, str]]:
    """A database of its own on the suite's server (migrated unless told not), its URL and
    name; dropped at the end, whatever was done to it (its connections refused, say)."""
    name = f"{prefix}_{secrets.token_hex(4)}"
    await _admin(server_dsn, f'CREATE DATABASE "{name}"')
    try:
        url = _with_database(server_dsn, name)
        if migrated:
            await db.migrate(url)
        yield url, name
    finally:
        await _admin(server_dsn, f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true')
        await _admin(server_dsn, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="session")
async def dsn(server_dsn: str) -> AsyncIterator[str]:
    """A database of the suite's own, created fresh and dropped at the end."""
    async with scratch_database(server_dsn, "donations_test") as (url, _):
        yield url


# Which of them hold rows: TRUNCATE costs about 1.5 ms a table whether it holds any or not (57 ms
# for all of them, before every test), a look costs next to nothing.
_HOLDING_ROWS = " UNION ALL ".join(
    f"SELECT '{table}' WHERE EXISTS (SELECT FROM {table})" for table in TABLES)  # noqa: S608


async def empty_tables(pool: asyncpg.Pool) -> None:
    """Empty every table the tests write to, before the test's app starts its background work
    (those that hold rows, and, CASCADE, whatever refers to them)."""
    for attempt in range(10):
        try:
            holding = [r[0] for r in await pool.fetch(_HOLDING_ROWS)]
            if holding:
                await pool.execute(f"TRUNCATE {', '.join(holding)} CASCADE")
            return
        except asyncpg.DeadlockDetectedError:
            # a previous test's app may still be compacting totals as it shuts down
            if attempt == 9:
                raise
            await asyncio.sleep(0.1)


@pytest.fixture
async def pool(dsn: str) -> AsyncIterator[asyncpg.Pool]:
    pool = await db.create_pool(dsn, min_size=1, max_size=10)
    await empty_tables(pool)
    yield pool
    await pool.close()


def make_settings(dsn: str, **overrides: object) -> Settings:
    values: dict[str, object] = {
        "database_url": Secret(dsn),
        "stripe_webhook_secrets": (Secret(WEBHOOK_SECRET),),
        "log_format": "json",
    }
    values.update(overrides)
    return Settings(**values)  # type: ignore[arg-type]


Client = TestClient[web.Request, web.Application]


class ServiceServer(TestServer):
    """aiohttp's test server, serving the app as `donations serve` does (donations.app.Runner:
    what aiohttp's HTTP parser refuses is answered in the service's own shape)."""

    async def _make_runner(self, **kwargs: Any) -> Runner:
        return Runner(self.app, **kwargs)


@pytest.fixture
def aiohttp_client(aiohttp_client: AiohttpClient) -> AiohttpClient:
    """pytest-aiohttp's, with the service's app (not the fake Stripe's) in a ServiceServer."""

    async def serve(app: Any, *args: Any, server_kwargs: dict[str, Any] | None = None,
                    **kwargs: Any) -> Any:
        if isinstance(app, web.Application) and SETTINGS in app:
            app = ServiceServer(app, **(server_kwargs or {}))
        elif server_kwargs is not None:
            kwargs["server_kwargs"] = server_kwargs
        return await aiohttp_client(app, *args, **kwargs)

    return serve  # type: ignore[return-value]


@pytest.fixture
async def client(pool: asyncpg.Pool, dsn: str, aiohttp_client: AiohttpClient) -> Client:
    """The service, with a webhook secret and no Stripe key (so no fee look-ups)."""
    return await aiohttp_client(create_app(make_settings(dsn)))


async def raw_request(client: Client, request: bytes) -> tuple[int, bytes]:
    """Send bytes as they are (headers aiohttp's client would not send, such as bytes that are
    not UTF-8) and read back the status and the body."""
    server = client.server
    reader, writer = await asyncio.open_connection(server.host, server.port)
    writer.write(request)
    await writer.drain()
    data = await asyncio.wait_for(reader.read(1 << 20), 10)
    writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), body


async def staff_cookie(client: Client, token: str) -> dict[str, str]:
    """Sign in to the staff page with `token`: the Cookie header of the session it gives."""
    response = await client.post("/staff/login", data={"token": token}, allow_redirects=False)
    assert response.status == 303, await response.text()
    return {"Cookie": f"donations_staff={response.cookies['donations_staff'].value}"}


async def wait_until(check: Callable[[], Awaitable[Any]], within: float = 10.0) -> Any:
    """Poll `check` until it gives something true (which is returned); fail after `within` s."""
    deadline = time.monotonic() + within
    while not (value := await check()):
        assert time.monotonic() < deadline, f"not so within {within} s"
        await asyncio.sleep(0.02)
    return value


@contextlib.asynccontextmanager
async def payments_held(dsn: str) -> AsyncIterator[None]:
    """Another connection's transaction that keeps every write to the payments table waiting
    (reads go on): a ledger transaction caught half-way for as long as the test needs."""
    blocker = await asyncpg.connect(dsn)
    try:
        await blocker.execute("BEGIN; LOCK TABLE payments IN SHARE ROW EXCLUSIVE MODE")
        yield
    finally:
        await blocker.close()  # (and its transaction is rolled back)


@contextlib.asynccontextmanager
async def payments_refused(pool: asyncpg.Pool) -> AsyncIterator[None]:
    """Every write to the payments table fails inside PostgreSQL ("payments are refused for this
    test"), as a bug or a dependency's outage would make it, until the block ends (then removed,
    as an operator's fix would be)."""
    await pool.execute("""
        CREATE FUNCTION refuse_payments() RETURNS trigger LANGUAGE plpgsql AS
        $$ BEGIN RAISE EXCEPTION 'payments are refused for this test'; END $$;
        CREATE TRIGGER refuse BEFORE INSERT OR UPDATE ON payments
            FOR EACH ROW EXECUTE FUNCTION refuse_payments();
    """)
    try:
        yield
    finally:
        await pool.execute("DROP TRIGGER refuse ON payments; DROP FUNCTION refuse_payments()")


async def until_ready(port: str | int, process: asyncio.subprocess.Process,
                      within: float = 60) -> bool:
    """Poll the /readyz of a `donations serve` subprocess listening on `port`: True once it
    answers 200, False if the process exits first; an AssertionError after `within` seconds."""
    deadline = time.monotonic() + within
    async with aiohttp.ClientSession() as session:
        while time.monotonic() < deadline:
            with contextlib.suppress(aiohttp.ClientConnectionError):
                async with session.get(f"http://127.0.0.1:{port}/readyz") as ready:
                    if ready.status == 200:
                        return True
            if process.returncode is not None:
                return False
            await asyncio.sleep(0.05)
    raise AssertionError(f"serve did not become ready within {within} s")


async def waiting_on_a_lock(pool: asyncpg.Pool, query_like: str) -> int:
    """The process id of the backend whose statement (SQL LIKE `query_like`) waits on a lock."""
    async def find() -> int | None:
        pid: int | None = await pool.fetchval(
            "SELECT pid FROM pg_stat_activity WHERE datname = current_database()"
            " AND wait_event_type = 'Lock' AND query LIKE $1", query_like)
        return pid

    found: int = await wait_until(find)
    return found
