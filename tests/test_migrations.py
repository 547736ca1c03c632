"""Migrations: applied once, safe when replicas start together, and refusing edited history."""

from __future__ import annotations

import asyncio
import re
import shutil
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import pytest
from pytest_aiohttp import AiohttpClient

from donations import db
from donations.app import create_app
from donations.appkeys import MIGRATIONS
from tests.conftest import make_settings, scratch_database
from tests.test_cli import _env, _free_port, _run

NEW_MIGRATION = "CREATE TABLE campaign_goals (campaign text PRIMARY KEY, goal bigint NOT NULL);\n"
ON_DISK = db.load_migrations()
NEXT = ON_DISK[-1].version + 1
NEW_NAME = f"{NEXT:03d}_campaign_goals.sql"


@pytest.fixture
async def scratch_dsn(server_dsn: str) -> AsyncIterator[str]:
    """An empty database of the test's own, dropped after it."""
    async with scratch_database(server_dsn, "donations_migrations", migrated=False) as (url, _):
        yield url


@pytest.fixture
def sql_copy(tmp_path: Path) -> Path:
    """A copy of sql/ to add to or edit."""
    copy = tmp_path / "sql"
    shutil.copytree(Path(str(db.sql_directory())), copy)
    return copy


async def recorded(dsn: str) -> list[tuple[int, str, str]]:
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch(
            "SELECT version, name, checksum FROM schema_migrations ORDER BY version")
    finally:
        await conn.close()
    return [(r["version"], r["name"], r["checksum"]) for r in rows]


async def table_exists(dsn: str, name: str) -> bool:
    conn = await asyncpg.connect(dsn)
    try:
        found: bool = await conn.fetchval("SELECT to_regclass($1) IS NOT NULL", name)
    finally:
        await conn.close()
    return found


async def test_migrate_applies_every_migration_once_and_then_nothing(scratch_dsn: str) -> None:
    on_disk = db.load_migrations()
    assert on_disk == ON_DISK
    assert on_disk[0].name == "001_ledger.sql"
    assert [m.version for m in on_disk] == sorted({m.version for m in on_disk})

    assert await db.migrate(scratch_dsn) == [m.name for m in on_disk]
    assert await db.migrate(scratch_dsn) == []

    assert await recorded(scratch_dsn) == [(m.version, m.name, m.checksum) for m in on_disk]
    assert await table_exists(scratch_dsn, "payments")
    conn = await asyncpg.connect(scratch_dsn)
    try:
        assert await db.pending_migrations(conn) == []
    finally:
        await conn.close()


async def test_replicas_migrating_at_once_apply_each_migration_once(scratch_dsn: str) -> None:
    results = await asyncio.gather(*(db.migrate(scratch_dsn) for _ in range(3)))

    names = [m.name for m in db.load_migrations()]
    # exactly one of them applied the migrations; the others found nothing left to do
    assert sorted(results, key=len) == [[], [], names]
    assert [name for _, name, _ in await recorded(scratch_dsn)] == names


async def test_a_new_migration_file_is_pending_until_migrate_applies_it(
    scratch_dsn: str, sql_copy: Path
) -> None:
    await db.migrate(scratch_dsn)
    (sql_copy / NEW_NAME).write_text(NEW_MIGRATION)
    migrations = db.load_migrations(sql_copy)

    conn = await asyncpg.connect(scratch_dsn)
    try:
        pending = await db.pending_migrations(conn, migrations)
    finally:
        await conn.close()
    assert [(m.version, m.name) for m in pending] == [(NEXT, NEW_NAME)]

    assert await db.migrate(scratch_dsn, migrations) == [NEW_NAME]
    assert await table_exists(scratch_dsn, "campaign_goals")
    assert [v for v, _, _ in await recorded(scratch_dsn)] == [m.version for m in ON_DISK] + [NEXT]


async def test_an_applied_migration_that_was_edited_is_refused_by_name(
    scratch_dsn: str, sql_copy: Path
) -> None:
    await db.migrate(scratch_dsn)
    edited = sql_copy / "001_ledger.sql"
    edited.write_text(edited.read_text() + "\n-- a harmless-looking edit\n")
    migrations = db.load_migrations(sql_copy)

    with pytest.raises(db.MigrationError, match=r"001_ledger\.sql") as raised:
        await db.migrate(scratch_dsn, migrations)
    assert "edited" in str(raised.value)
    conn = await asyncpg.connect(scratch_dsn)
    try:
        with pytest.raises(db.MigrationError, match=r"001_ledger\.sql"):
            await db.pending_migrations(conn, migrations)
        # the advisory lock was let go: another migrate does not wait for it
        assert await conn.fetchval("SELECT pg_try_advisory_lock($1)", db.MIGRATION_LOCK_KEY)
        await conn.execute("SELECT pg_advisory_unlock($1)", db.MIGRATION_LOCK_KEY)
    finally:
        await conn.close()


async def test_a_failing_migration_leaves_nothing_behind_and_can_be_fixed(
    scratch_dsn: str, sql_copy: Path
) -> None:
    await db.migrate(scratch_dsn)
    broken = sql_copy / NEW_NAME
    broken.write_text(NEW_MIGRATION + "SELECT 1 / 0;\n")

    with pytest.raises(db.MigrationError) as failed:
        await db.migrate(scratch_dsn, db.load_migrations(sql_copy))
    # which file and PostgreSQL's own words: one line for the operator
    assert str(failed.value) == (f"{NEW_NAME} failed and was rolled back, nothing of it "
                                 "applied: DivisionByZeroError: division by zero")
    assert isinstance(failed.value.__cause__, asyncpg.DivisionByZeroError)
    # a syntax error: where in the file too
    broken.write_text(NEW_MIGRATION + "\nSELEC 1;\n")
    with pytest.raises(db.MigrationError) as failed:
        await db.migrate(scratch_dsn, db.load_migrations(sql_copy))
    line = NEW_MIGRATION.count("\n") + 2
    assert str(failed.value).startswith(f"{NEW_NAME}, line {line} failed and was rolled back")
    assert "PostgresSyntaxError" in str(failed.value)
    assert not await table_exists(scratch_dsn, "campaign_goals")
    assert [v for v, _, _ in await recorded(scratch_dsn)] == [m.version for m in ON_DISK]

    broken.write_text(NEW_MIGRATION)  # never applied, so it may still change
    assert await db.migrate(scratch_dsn, db.load_migrations(sql_copy)) == [
        NEW_NAME]
    assert await table_exists(scratch_dsn, "campaign_goals")


@pytest.mark.parametrize(
    "name", ["2_short_number.sql", "002-dashes.sql", "002_Capitals.sql", "ledger.sql"]
)
def test_a_badly_named_migration_file_is_refused(sql_copy: Path, name: str) -> None:
    (sql_copy / name).write_text(NEW_MIGRATION)
    with pytest.raises(db.MigrationError, match=re.escape(name)):
        db.load_migrations(sql_copy)


def test_two_migrations_with_one_number_are_refused(sql_copy: Path) -> None:
    (sql_copy / "001_again.sql").write_text(NEW_MIGRATION)
    with pytest.raises(db.MigrationError, match="share a number"):
        db.load_migrations(sql_copy)


def test_files_that_are_not_sql_are_not_migrations(sql_copy: Path) -> None:
    (sql_copy / "README.md").write_text("notes")
    assert db.load_migrations(sql_copy) == ON_DISK


async def test_readyz_lists_pending_migrations_and_refuses_edited_ones(
    scratch_dsn: str, sql_copy: Path, aiohttp_client: AiohttpClient
) -> None:
    (sql_copy / NEW_NAME).write_text(NEW_MIGRATION)
    app = create_app(make_settings(scratch_dsn))
    app[MIGRATIONS] = db.load_migrations(sql_copy)
    client = await aiohttp_client(app)  # starting migrates: both are applied
    ready = await client.get("/readyz")
    assert (ready.status, await ready.json()) == (200, {"status": "ok"})

    conn = await asyncpg.connect(scratch_dsn)
    try:
        # as if this replica's code were newer than the database it is pointed at
        await conn.execute("DROP TABLE campaign_goals")
        await conn.execute("DELETE FROM schema_migrations WHERE version = $1", NEXT)
        ready = await client.get("/readyz")
        assert ready.status == 503
        assert await ready.json() == {
            "status": "unavailable", "pending_migrations": [NEW_NAME]}

        # as if the database had been migrated by a replica with another 001
        await conn.execute("UPDATE schema_migrations SET checksum = 'other' WHERE version = 1")
        ready = await client.get("/readyz")
        assert ready.status == 503
        body = await ready.json()
        assert body["status"] == "unavailable"
        assert "001_ledger.sql" in body["migrations"]
    finally:
        await conn.close()
    assert (await client.get("/healthz")).status == 200


def _error_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.strip()]


@pytest.mark.parametrize("command", ["migrate", "serve"])
async def test_a_database_not_accepting_connections_is_one_line(
    server_dsn: str, command: str
) -> None:
    """A database closed for maintenance (ALLOW_CONNECTIONS false: PostgreSQL answers, and
    refuses) stops `migrate` and `serve` with one line, exit status 1, as an unreachable one
    does."""
    async with scratch_database(server_dsn, "closed", migrated=False) as (url, name):
        conn = await asyncpg.connect(server_dsn)
        try:
            await conn.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS false')
        finally:
            await conn.close()
        code, _, err = await _run(command, env=_env(DATABASE_URL=url, PORT=str(_free_port()),
                                                    LOG_LEVEL="warning"))
    assert "Traceback" not in err, err[-1500:]
    assert code == 1, err[-800:]
    lines = _error_lines(err)
    assert len(lines) == 1 and "DATABASE_URL" in lines[0], err[-800:]


async def test_a_database_url_parameter_the_server_refuses_is_one_line_naming_it(
    dsn: str,
) -> None:
    """A query parameter asyncpg does not know goes to the server as a setting; a misspelt one
    (`sslmdoe=require` for `sslmode`) the server refuses: one line naming it, exit status 1."""
    joined = "&" if "?" in dsn else "?"  # (the embedded server's URL names its socket folder)
    code, _, err = await _run("migrate", env=_env(DATABASE_URL=f"{dsn}{joined}sslmdoe=require"))
    assert "Traceback" not in err, err[-1500:]
    lines = _error_lines(err)
    assert len(lines) == 1 and "DATABASE_URL" in lines[0] and "sslmdoe" in lines[0], err[-800:]
    assert code == 1


async def test_the_server_going_away_mid_migration_is_database_unavailable(
    server_dsn: str,
) -> None:
    """A failover or restart while a migration runs ends the migrating session: asyncpg says so
    with an InterfaceError once the connection is closed under it, and the advisory lock went
    with the session. It is DatabaseUnavailable (one line from the CLI), the migration rolled
    back, and the next start applies it."""
    migrations = [
        db.Migration(1, "001_first.sql", "CREATE TABLE lost_first (x int)"),
        db.Migration(2, "002_lost.sql", "SELECT pg_terminate_backend(pg_backend_pid())"),
    ]
    async with scratch_database(server_dsn, "lost", migrated=False) as (url, _):
        with pytest.raises(db.DatabaseUnavailable, match=r"lost while applying 002_lost\.sql"):
            await db.migrate(url, migrations)
        conn = await asyncpg.connect(url)
        try:
            applied = await conn.fetchval("SELECT array_agg(name) FROM schema_migrations")
        finally:
            await conn.close()
    assert applied == ["001_first.sql"]
