"""The command line as an operator runs it: `donations serve`, `migrate` and `events retry`."""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import socket
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import aiohttp
import asyncpg
import pytest

from donations.events import parse_event
from donations.ingest import ingest, reapply, retry_unfinished
from donations.ledger import BalanceTransaction, FoundingOffer
from tests.conftest import WEBHOOK_SECRET, payments_refused, until_ready
from tests.fakestripe import running_fake_stripe
from tests.fakestripe.signing import signed_request
from tests.fakestripe.world import World
from tests.ledger_check import dump, reference
from tests.test_fees import TEST_KEY


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _env(**values: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL",)}
    env.update({"LOG_FORMAT": "json", "LOG_LEVEL": "info", "HOST": "127.0.0.1"})
    env.update(values)
    return env


async def _run(*args: str, env: dict[str, str]) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "donations", *args, env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(process.communicate(), timeout=60)
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


@asynccontextmanager
async def serving(env: dict[str, str]) -> AsyncIterator[str]:
    """`donations serve` in a subprocess until it is ready; SIGTERM afterwards, exit 0 expected."""
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "donations", "serve", env=env,
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
    base = f"http://127.0.0.1:{env['PORT']}"
    try:
        await until_ready(env["PORT"], process)  # (exited: its stderr says why, below)
        yield base
    finally:
        if process.returncode is None:
            process.send_signal(signal.SIGTERM)
        assert process.stderr is not None
        stderr = (await asyncio.wait_for(process.stderr.read(), timeout=30)).decode()
        code = await asyncio.wait_for(process.wait(), timeout=30)
    assert code == 0, stderr[-2000:]


async def _post(base: str, events: list[dict[str, object]]) -> list[int]:
    statuses = []
    async with aiohttp.ClientSession() as session:
        for event in events:
            body, headers = signed_request(event, WEBHOOK_SECRET)
            async with session.post(f"{base}/webhooks/stripe", data=body,
                                    headers=headers) as response:
                statuses.append(response.status)
    return statuses


async def test_serve_ledgers_signed_events_and_stops_cleanly_on_sigterm(
    pool: asyncpg.Pool, dsn: str
) -> None:
    world = World(seed=21)
    world.one_off(1500, "gbp", campaign="spring")
    world.subscribe(1000, "usd", founding=True)
    env = _env(DATABASE_URL=dsn, PORT=str(_free_port()), STRIPE_WEBHOOK_SECRET=WEBHOOK_SECRET)
    async with serving(env) as base:
        assert set(await _post(base, world.events)) == {200}
        async with aiohttp.ClientSession() as session, session.get(f"{base}/metrics") as r:
            metrics = await r.text()
        first = await dump(pool)
        # the same set again: shuffled, with duplicates, eight at a time
        again = random.Random(5).sample(world.events * 2, k=2 * len(world.events))
        answers = await asyncio.gather(*(_post(base, again[i::8]) for i in range(8)))
        assert {status for batch in answers for status in batch} == {200}
        # what aiohttp's parser refuses is answered in the service's shape here too
        reader, writer = await asyncio.open_connection("127.0.0.1", int(env["PORT"]))
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Probe: a\x00b\r\n\r\n")
        refused = await asyncio.wait_for(reader.read(), 10)
        writer.close()
        assert b" 400 " in refused.split(b"\r\n", 1)[0], refused
        assert b"\r\n\r\n{\"error\": {\"code\": \"malformed_request\"" in refused, refused
    assert first == await dump(pool) == reference(world.events)
    assert 'donations_ledger_contributions{currency="gbp",kind="one_off"} 1' in metrics


async def test_embedded_postgres_keeps_the_ledger_across_restarts(embedded_tmp: Path) -> None:
    data_dir = embedded_tmp / "data"
    env = _env(DONATIONS_DATA_DIR=str(data_dir), PORT=str(_free_port()),
               STRIPE_WEBHOOK_SECRET=WEBHOOK_SECRET)
    world = World(seed=22)
    world.one_off(4200, "gbp")
    async with serving(env) as base:
        assert set(await _post(base, world.events)) == {200}
    # stopped with the service: no server left running on the data folder
    assert not (data_dir / "pgdata" / "postmaster.pid").exists()
    async with (
        serving(env) as base,
        aiohttp.ClientSession() as session,
        session.get(f"{base}/metrics") as response,
    ):
        metrics = await response.text()
    assert 'donations_ledger_net_minor_units{currency="gbp",kind="one_off"} 4200' in metrics


async def test_migrate_command_applies_then_has_nothing_to_do(pool: asyncpg.Pool, dsn: str) -> None:
    code, out, _ = await _run("migrate", env=_env(DATABASE_URL=dsn))
    assert (code, out.strip()) == (0, "applied 0 migration(s)")


async def test_events_retry_applies_what_failed(pool: asyncpg.Pool, dsn: str) -> None:
    events = World(seed=23).one_off(900, "gbp").events
    async with payments_refused(pool):
        outcomes = [await ingest(pool, parse_event(e), json.dumps(e), FoundingOffer())
                    for e in events]
    failed = sum(1 for o in outcomes if o.value == "failed")
    assert failed >= 1

    code, out, err = await _run("events", "retry", env=_env(DATABASE_URL=dsn))
    assert code == 0, err
    assert out.strip() == f"processed: {failed}"
    assert await dump(pool) == reference(events)
    code, out, _ = await _run("events", "list", env=_env(DATABASE_URL=dsn))
    assert "failed" not in out


async def test_events_retry_goes_past_a_page_of_events_that_keep_failing(
    pool: asyncpg.Pool
) -> None:
    """`events retry` reads the unfinished events a page at a time and passes those that fail
    again: however many older ones keep failing, the newer ones are retried too (it used to
    take the oldest 1,000, so 1,000 that kept failing hid every later one for good)."""
    world = World(seed=26)
    yen = world.one_off(90000, "jpy").events
    sterling = world.one_off(900, "gbp").events
    await pool.execute("""
        CREATE FUNCTION refuse_currency() RETURNS trigger LANGUAGE plpgsql AS
        $$ BEGIN RAISE EXCEPTION 'refused for this test'; END $$;
        CREATE TRIGGER refuse_jpy BEFORE INSERT OR UPDATE ON payments
            FOR EACH ROW WHEN (NEW.currency = 'jpy') EXECUTE FUNCTION refuse_currency();
        CREATE TRIGGER refuse_gbp BEFORE INSERT OR UPDATE ON payments
            FOR EACH ROW WHEN (NEW.currency = 'gbp') EXECUTE FUNCTION refuse_currency();
    """)
    try:
        outcomes = {e["id"]: await ingest(pool, parse_event(e), json.dumps(e), FoundingOffer())
                    for e in yen + sterling}
        failing = [i for i, o in outcomes.items() if o.value == "failed"]
        stuck = [e["id"] for e in yen if e["id"] in failing]
        assert len(stuck) >= 3 and len(failing) > len(stuck)  # the sterling ones came after
        await pool.execute("DROP TRIGGER refuse_gbp ON payments")
        counts = await retry_unfinished(pool, FoundingOffer(), page=2)
    finally:
        await pool.execute("DROP TRIGGER IF EXISTS refuse_gbp ON payments;"
                           " DROP TRIGGER refuse_jpy ON payments; DROP FUNCTION refuse_currency()")
    assert counts == {"failed": len(stuck), "processed": len(failing) - len(stuck)}
    assert await pool.fetchval("SELECT count(*) FROM payments WHERE currency = 'gbp'") == 1
    assert sorted(await pool.fetchval(
        "SELECT array_agg(id) FROM stripe_events WHERE status = 'failed'")) == sorted(stuck)


async def test_events_reapply_reads_the_events_a_page_at_a_time(pool: asyncpg.Pool) -> None:
    """`events reapply` reads the matching events a page at a time, oldest first, by (created,
    id): events stamped in the same second on either side of a page's end are all offered, and
    every object they are about is derived again, as when they were read at once."""
    world = World(seed=27)
    for amount in (1200, 900, 700):
        world.one_off(amount, "gbp")
    events = world.events
    for e in events:
        await ingest(pool, parse_event(e), json.dumps(e), FoundingOffer())
    # a type the ledger does not apply matches the pattern too: it has nothing to offer
    await pool.execute(
        "INSERT INTO stripe_events (id, type, livemode, created, payload, status)"
        " VALUES ('evt_expired', 'charge.expired', false, now(), '{}', 'processed')")
    # the charges' events of each payment stamped in one second (a page ends between them)
    await pool.execute("UPDATE stripe_events SET created = date_trunc('minute', created)"
                       " WHERE type LIKE 'charge.%'")
    assert await pool.fetchval("SELECT count(DISTINCT created) < count(*) FROM stripe_events"
                               " WHERE type LIKE 'charge.%'")
    assert await dump(pool) == reference(events)
    for page in (1, 2, 1000):
        await pool.execute("UPDATE payments SET amount = amount + 1, campaign = 'stale'")
        assert await reapply(pool, FoundingOffer(), "charge.%", page=page) == (0, 3), page
        assert await dump(pool) == reference(events), page


async def test_events_reapply_lets_a_snapshot_kept_out_by_an_old_ranking_win(
    pool: asyncpg.Pool, dsn: str
) -> None:
    world = World(seed=24)
    paid = world.one_off(900, "gbp")
    world.dispute(paid.charge, inquiry=True)  # escalated: needs_response, 900 withdrawn
    events = world.events
    for e in events:
        await ingest(pool, parse_event(e), json.dumps(e), FoundingOffer())
    assert await dump(pool) == reference(events)

    # the state before sql/013: the inquiry's snapshot kept (it outranked the chargeback's),
    # its ledger rows derived from it
    inquiry = next(e for e in events if e["data"]["object"].get("status")
                   == "warning_under_review")
    await pool.execute(
        """
        UPDATE stripe_objects o SET rank = 1, event_id = e.id,
               event_created = extract(epoch FROM e.created)::bigint,
               data = e.payload::jsonb -> 'data' -> 'object'
          FROM stripe_events e WHERE e.id = $1 AND o.object = 'dispute';
        UPDATE disputes SET status = 'warning_under_review', amount_held = 0;
        UPDATE payments SET amount_disputed = 0;
        """.replace("$1", f"'{inquiry['id']}'"),
    )
    assert await dump(pool) != reference(events)

    code, out, err = await _run("events", "reapply", "--type", "charge.dispute.%",
                                env=_env(DATABASE_URL=dsn))
    assert code == 0, err
    assert out.startswith("1 object(s) took a snapshot that outranks the one they had")
    assert await dump(pool) == reference(events)
    code, out, _ = await _run("events", "reapply", "--type", "charge.dispute.%",
                              env=_env(DATABASE_URL=dsn))
    assert out.startswith("0 object(s) took")


async def test_events_reapply_derives_the_rows_again_from_the_snapshots_kept(
    pool: asyncpg.Pool, dsn: str
) -> None:
    """After a change to how a row is derived (the snapshots kept stay the same), reapplying an
    event type derives the rows of the objects it is about again: a row an older derivation
    left wrong is put right."""
    world = World(seed=25)
    world.one_off(1200, "gbp", campaign="spring")
    world.one_off(900, "gbp")
    events = world.events
    for e in events:
        await ingest(pool, parse_event(e), json.dumps(e), FoundingOffer())
    assert await dump(pool) == reference(events)
    await pool.execute("UPDATE payments SET amount = amount + 1, campaign = 'stale'")
    assert await dump(pool) != reference(events)

    code, out, err = await _run("events", "reapply", "--type", "charge.%",
                                env=_env(DATABASE_URL=dsn))
    assert code == 0, err
    assert out.startswith("0 object(s) took a snapshot")
    assert "the ledger rows of 2 object(s) were derived again" in out
    assert await dump(pool) == reference(events)


async def test_lookups_list_and_retry_put_back_what_was_set_aside(
    pool: asyncpg.Pool, dsn: str
) -> None:
    await pool.execute(
        """
        INSERT INTO balance_transaction_fetches (id, attempts, last_error, gave_up_at)
        VALUES ('txn_gone', 3, 'set aside after 3 tries; InvalidRequestError: No such', now()),
               ('txn_waiting', 1, NULL, NULL)
        """
    )
    code, out, err = await _run("lookups", "list", env=_env(DATABASE_URL=dsn))
    assert code == 0, err
    lines = {line.split("\t")[1]: line.split("\t") for line in out.splitlines()[1:]}
    assert lines["txn_gone"][2:4] == ["3", "-"] and lines["txn_gone"][4] != "-"
    assert lines["txn_gone"][5].startswith("set aside after 3 tries")
    assert lines["txn_waiting"][4] == "-" and lines["txn_waiting"][3] != "-"

    code, out, err = await _run("lookups", "retry", env=_env(DATABASE_URL=dsn))
    assert code == 0, err
    assert out.strip() == "balance_transactions: 1, payouts: 0, coupons: 0 put back in the queue"
    row = await pool.fetchrow("SELECT attempts, gave_up_at, next_attempt_at <= now() AS due "
                              "FROM balance_transaction_fetches WHERE id = 'txn_gone'")
    assert row is not None and tuple(row) == (0, None, True)


async def test_reconcile_and_import_commands_exit_by_what_they_found(
    pool: asyncpg.Pool, dsn: str
) -> None:
    """`donations reconcile` prints its summary and exits 0 when the ledger matches Stripe, 1
    while a difference is unresolved; `donations import` brings older history in, exits 0."""
    world = World(seed=24)  # its clock starts a week before today: within Stripe's 30 days
    paid = world.one_off(4200, "gbp")
    world.one_off(1500, "usd")
    async with running_fake_stripe(world) as fake:
        env = _env(DATABASE_URL=dsn, STRIPE_SECRET_KEY=TEST_KEY,
                   STRIPE_API_BASE=fake.base_url, LOG_LEVEL="warning")
        code, out, err = await _run("reconcile", env=env)  # the first: Stripe's 30 days
        assert code == 0, err
        assert "the ledger matches Stripe" in out
        assert f"events: {len(world.events)} listed" in out
        assert await dump(pool) == reference(world.events, balance_transactions={
            i: BalanceTransaction.from_stripe(bt)
            for i, bt in world.balance_transactions.items()})

        world.balance_transactions[str(paid.balance_transaction)]["fee"] += 5
        world.balance_transactions[str(paid.balance_transaction)]["net"] -= 5
        # a later run compares its own window (from the checkpoint); --since looks again further
        code, out, err = await _run("reconcile", env=env)
        assert code == 0, err
        code, out, err = await _run("reconcile", "--since", "2026-11-01", env=env)
        assert code == 1, err
        assert "fee_mismatch" in out and paid.charge in out
        assert "1 unresolved discrepancies" in out

        code, out, err = await _run("import", "--since", "2026-11-01", env=env)
        assert code == 0, err
        assert "applied" in out


@pytest.mark.parametrize(("command", "query"), [
    ("migrate", "sslmode=bogus"),  # refused by settings.py at start
    ("migrate", "target_session_attrs=bogus"),
    ("serve", "sslmode=bogus"),
    ("serve", "gsslib=bogus"),  # by asyncpg at the first connection: cli.main says it
    ("migrate", "ssl_min_protocol_version=bogus"),
])
async def test_a_database_url_with_a_parameter_asyncpg_refuses_is_one_line(
    command: str, query: str
) -> None:
    """CONTRACT: "Invalid configuration stops the service at start with one line naming the
    variable and the problem"; README: exit status 2. A DATABASE_URL whose query asyncpg
    refuses (a misspelt `sslmode`, the edit most often made to such a URL) was asyncpg's
    ClientConfigurationError out of `main`: a traceback, exit 1, the variable never named."""
    env = _env(DATABASE_URL=f"postgresql://u:supersecret99@127.0.0.1:1/db?{query}",
               PORT=str(_free_port()), LOG_LEVEL="warning")
    code, out, err = await _run(command, env=env)
    lines = [line for line in err.splitlines() if line.strip()]
    assert (code, len(lines)) == (2, 1), err[-1500:]
    assert lines[0].startswith("donations: configuration error: DATABASE_URL")
    assert "supersecret99" not in err + out
