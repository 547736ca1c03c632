"""PostgreSQL going away: 503 with Retry-After, nothing lost or half-written, and recovery after.

These tests stop and start a PostgreSQL of their own (embedded, in a temporary folder), so that the
rest of the suite's database is never touched, with or without DATABASE_URL.
"""

from __future__ import annotations

import asyncio
import shutil
import tempfile
from collections.abc import AsyncIterator, MutableMapping
from pathlib import Path
from typing import Any

import asyncpg
import pytest
import structlog
from aiohttp import web
from pytest_aiohttp import AiohttpClient

from donations import db, reconcile
from donations.app import create_app
from donations.appkeys import POOL
from tests.conftest import (
    WEBHOOK_SECRET,
    Client,
    empty_tables,
    make_settings,
    payments_held,
    scratch_database,
    waiting_on_a_lock,
)
from tests.fakestripe.signing import signed_request
from tests.fakestripe.world import World
from tests.ledger_check import dump, reference
from tests.test_fees import stripe_against
from tests.test_reconcile import OFFER as RECONCILE_OFFER
from tests.test_reconcile import START as RECONCILE_START
from tests.webhook_helpers import post_event

ANSWER_TIMEOUT = 20.0  # no answer may take longer: a hang fails the test instead of the suite


class Outage:
    """A PostgreSQL that can be stopped and started again on the same data folder."""

    def __init__(self, data_dir: Path) -> None:
        self.server = db.EmbeddedPostgres(data_dir)
        self.dsn = ""
        self.up = False

    async def start(self) -> None:
        dsn = await asyncio.to_thread(self.server.start)
        assert not self.dsn or dsn == self.dsn, "the restarted server is at another address"
        self.dsn, self.up = dsn, True

    async def stop(self) -> None:
        await asyncio.to_thread(self.server.stop)
        self.up = False


@pytest.fixture(scope="module")
async def outage() -> AsyncIterator[Outage]:
    folder = Path(tempfile.mkdtemp(prefix="donations-outage-"))
    server = Outage(folder)
    await server.start()
    await server.server.ensure_database()
    try:
        yield server
    finally:
        if server.up:
            await server.stop()
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
async def service(outage: Outage, aiohttp_client: AiohttpClient) -> AsyncIterator[Client]:
    """The service on the PostgreSQL that the test may stop; restarted, if need be, after it."""
    if not outage.up:
        await outage.start()
    # emptied before the app starts, so that its totals compaction cannot deadlock with it
    await db.migrate(outage.dsn)
    scratch = await db.create_pool(outage.dsn, min_size=1, max_size=1)
    try:
        await empty_tables(scratch)
    finally:
        await scratch.close()
    client = await aiohttp_client(create_app(make_settings(outage.dsn)))
    yield client
    if not outage.up:  # so that the app can close its pool cleanly
        await outage.start()


async def answer(client: Client, event: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    return await asyncio.wait_for(post_event(client, event), ANSWER_TIMEOUT)


def history(seed: int, payments: int) -> World:
    world = World(seed=seed)
    for i in range(payments):
        world.one_off(500 + 100 * i, ("gbp", "usd", "jpy")[i % 3], email=f"reader{i}@example.org")
    world.subscribe(1000, "gbp", founding=True)
    return world


async def event_statuses(pool: asyncpg.Pool) -> dict[str, int]:
    rows = await pool.fetch("SELECT status, count(*) AS n FROM stripe_events GROUP BY status")
    return {r["status"]: r["n"] for r in rows}


def app_of(client: Client) -> web.Application:
    app = client.app
    assert app is not None
    return app


def assert_warned_without_traceback(logs: list[MutableMapping[str, Any]]) -> None:
    assert any(
        e["event"] == "database_unavailable" and e["log_level"] == "warning" for e in logs
    ), logs
    loud = [e for e in logs if e["log_level"] not in ("debug", "info", "warning")]
    assert loud == []
    assert [e for e in logs if e.get("exc_info") or "exception" in e] == []


async def test_database_down_answers_503_and_redelivery_after_restart_completes_the_ledger(
    outage: Outage, service: Client
) -> None:
    world = history(seed=201, payments=3)
    events = world.events
    half = len(events) // 2
    for event in events[:half]:
        status, _ = await answer(service, event)
        assert status == 200

    await outage.stop()
    refused: list[dict[str, Any]] = []
    with structlog.testing.capture_logs() as logs:
        for event in events[half:]:
            response = await asyncio.wait_for(
                service.post("/webhooks/stripe", **_signed(event)), ANSWER_TIMEOUT)
            assert response.status == 503
            assert response.headers["Retry-After"].isdigit()
            body = await response.json()
            assert body["error"]["code"] == "database_unavailable"
            assert body["error"]["message"]
            refused.append(event)
        ready = await service.get("/readyz")
        assert ready.status == 503
        assert (await ready.json())["status"] == "unavailable"
        healthy = await service.get("/healthz")
        assert (healthy.status, await healthy.json()) == (200, {"status": "ok"})
        metrics = await service.get("/metrics")
        assert metrics.status == 200
        assert "donations_database_up 0" in await metrics.text()
    assert_warned_without_traceback(logs)

    await outage.start()
    for event in refused:  # Stripe delivers again what was not answered 2xx
        status, body = await answer(service, event)
        assert status == 200, body
    assert (await service.get("/readyz")).status == 200

    pool = app_of(service)[POOL]
    assert await dump(pool) == reference(events)
    assert sum((await event_statuses(pool)).values()) == len(events)


async def test_a_database_stopped_mid_way_loses_nothing_and_leaves_nothing_half_written(
    outage: Outage, service: Client
) -> None:
    world = history(seed=202, payments=24)
    events = world.events
    first_answer = asyncio.Event()

    async def deliver(event: dict[str, Any], delay: float) -> int:
        # spread over about a second, as Stripe's deliveries are, so that the stop surely
        # lands among them however fast each is applied
        await asyncio.sleep(delay)
        try:
            status, _ = await answer(service, event)
        finally:
            first_answer.set()
        return status

    with structlog.testing.capture_logs() as logs:
        deliveries = [asyncio.create_task(deliver(e, 0.008 * i)) for i, e in enumerate(events)]
        await asyncio.wait_for(first_answer.wait(), ANSWER_TIMEOUT)
        await outage.stop()  # while the rest are in flight or waiting for a connection
        statuses = await asyncio.gather(*deliveries)

    assert set(statuses) <= {200, 503}, [e for e in logs if e["log_level"] == "error"]
    assert 503 in statuses, "the server stopped after every event was answered"
    assert [e for e in logs if e["event"] == "request_crashed"] == []

    await outage.start()
    pool = app_of(service)[POOL]
    # before any redelivery: every event answered 200 is stored, and every stored event is
    # wholly applied (a 503 may still have committed, if only the answer was lost)
    stored = {r["id"] for r in await pool.fetch("SELECT id FROM stripe_events")}
    assert {e["id"] for e, s in zip(events, statuses, strict=True) if s == 200} <= stored
    assert await dump(pool) == reference([e for e in events if e["id"] in stored])

    missed = [e for e, s in zip(events, statuses, strict=True) if s != 200]
    for event in missed:  # Stripe's retries, spread out over time as Stripe spreads them
        status, body = await answer(service, event)
        assert status == 200, body

    assert await dump(pool) == reference(events)
    statuses_stored = await event_statuses(pool)
    assert "pending" not in statuses_stored
    assert "failed" not in statuses_stored
    assert sum(statuses_stored.values()) == len(events)
    # an outage, not a failure of the events: warnings without a traceback, and none marked
    assert [e for e in logs if e["event"] == "event_apply_failed"] == []
    assert_warned_without_traceback(logs)


async def test_the_pool_recovers_without_a_restart_of_the_service(
    outage: Outage, service: Client
) -> None:
    assert (await service.get("/readyz")).status == 200
    for _ in range(2):  # twice: a recovered pool must survive another outage too
        await outage.stop()
        assert (await service.get("/readyz")).status == 503
        await outage.start()
        ready = await service.get("/readyz")
        assert (ready.status, await ready.json()) == (200, {"status": "ok"})
    event = World(seed=203).one_off(900, "gbp").events[0]
    status, body = await answer(service, event)
    assert status == 200, body


def _signed(event: dict[str, Any]) -> dict[str, Any]:
    body, headers = signed_request(event, WEBHOOK_SECRET)
    return {"data": body, "headers": headers}


@pytest.fixture
async def refusing_database(server_dsn: str) -> AsyncIterator[tuple[str, str]]:
    """A migrated database of this test's own on the suite's server, and its name."""
    async with scratch_database(server_dsn, "donations_refusing") as made:
        yield made


async def _stop_accepting_connections(server_dsn: str, name: str) -> None:
    """The database stops taking connections (maintenance), its open ones ended."""
    admin = await asyncpg.connect(server_dsn)
    try:
        await admin.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS false')
        await admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1", name)
    finally:
        await admin.close()
    await asyncio.sleep(0.5)


async def test_a_database_not_accepting_connections_is_503_not_500(
    refusing_database: tuple[str, str], server_dsn: str, aiohttp_client: AiohttpClient
) -> None:
    """A database that does not take connections (`ALTER DATABASE … ALLOW_CONNECTIONS false`,
    during maintenance) is an outage like any other: webhooks 503 (Stripe retries), /readyz
    503, /metrics 200 with `donations_database_up 0`; nothing is answered 500."""
    url, name = refusing_database
    client = await aiohttp_client(create_app(make_settings(url)))
    await _stop_accepting_connections(server_dsn, name)
    world = World(seed=71)
    world.one_off(1500, "gbp")
    webhook, _ = await post_event(client, world.events[0])
    readyz = await client.get("/readyz")
    metrics = await client.get("/metrics")
    metrics_text = await metrics.text()
    assert (webhook, readyz.status, metrics.status) == (503, 503, 200), (
        webhook, readyz.status, metrics.status)
    assert "donations_database_up 0" in metrics_text


@pytest.mark.parametrize(("path", "headers"), [
    ("/v1/checkout/options", {}),
    ("/staff/", {"Cookie": "donations_staff=dns_any_session"}),
], ids=["checkout-options", "staff-page-with-a-cookie"])
async def test_a_503_of_the_database_being_unavailable_is_in_the_openapi_document(
    refusing_database: tuple[str, str], server_dsn: str, aiohttp_client: AiohttpClient,
    path: str, headers: dict[str, str],
) -> None:
    """With PostgreSQL not taking connections, the checkout options and the staff page with a
    session cookie (to check) are 503 database_unavailable (app.py `error_answer`), and
    /openapi.json lists that answer for them: a client generated from it expects it."""
    url, name = refusing_database
    client = await aiohttp_client(create_app(make_settings(url)))
    await _stop_accepting_connections(server_dsn, name)
    response = await client.get(path, headers=headers)
    body = await response.json()
    assert (response.status, body["error"]["code"]) == (503, "database_unavailable"), body
    assert response.headers["Retry-After"] == "5"
    spec = await (await client.get("/openapi.json")).json()
    assert "503" in spec["paths"][path]["get"]["responses"], spec["paths"][path]["get"]


async def test_a_webhook_groups_connection_killed_mid_transaction_is_503_and_rolled_back(
    client: Client, pool: asyncpg.Pool, dsn: str
) -> None:
    """One connection killed (`pg_terminate_backend`, a failover, a proxy's idle cut) while a
    webhook group's transaction is half-way (its event stored, its ledger write waiting): the
    delivery is answered 503 so that Stripe delivers it again, nothing of it is committed, and
    the group commit and the pool carry on: the redelivery is applied and the ledger is whole."""
    world = World(seed=204)
    paid = world.one_off(2500, "gbp")
    first, rest = paid.events[0], list(paid.events[1:])
    assert (await post_event(client, first))[0] == 200
    async with payments_held(dsn):
        delivery = asyncio.create_task(post_event(client, rest[0]))
        pid = await waiting_on_a_lock(pool, "%payments%")
        assert await pool.fetchval("SELECT pg_terminate_backend($1)", pid)
        status, body = await asyncio.wait_for(delivery, ANSWER_TIMEOUT)
    assert (status, body["error"]["code"]) == (503, "database_unavailable"), body
    assert await pool.fetchval("SELECT count(*) FROM stripe_events WHERE id = $1",
                               rest[0]["id"]) == 0
    assert await dump(pool) == reference([first])
    for event in rest:
        status, body = await post_event(client, event)
        assert status == 200, body
    assert await dump(pool) == reference(paid.events)
    assert (await client.get("/readyz")).status == 200


async def test_a_reconciliation_that_cannot_read_its_outcome_never_says_the_ledger_matches(
    refusing_database: tuple[str, str], server_dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Stripe settled another amount than the ledger has (an amount_mismatch, stored open);
    then the database stops taking connections (a fail-over, maintenance) just as the run
    reads back what is still open. The run cannot know whether the ledger matches: it fails
    (`reconcile` exits 1), never answering `matches` with the empty list of open discrepancies
    it could not read (the command printed "the ledger matches Stripe" and exited 0)."""
    url, name = refusing_database
    world = World(seed=88003)
    paid = world.one_off(4000, "gbp")
    world.balance_transactions[str(paid.balance_transaction)]["amount"] += 100
    compare = reconcile._compare_window

    async def compare_then_fail_over(*args: Any, **kwargs: Any) -> None:
        await compare(*args, **kwargs)  # the real comparison, then the real outage
        await _stop_accepting_connections(server_dsn, name)

    monkeypatch.setattr(reconcile, "_compare_window", compare_then_fail_over)
    pool = await db.create_pool(url)
    try:
        async with stripe_against(world) as (_, stripe_client):
            with pytest.raises(db.DatabaseUnavailable):
                await reconcile.run(pool, stripe_client, RECONCILE_OFFER, since=RECONCILE_START,
                                    now=world.now + 60)
    finally:
        pool.terminate()
