"""The command line: `donations serve | migrate | events | tokens | campaigns …`."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import os
import secrets
import signal
import socket
import stat
import sys
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from pathlib import Path
from typing import Any, BinaryIO, TypeVar
from urllib.parse import unquote, urlsplit

import asyncpg
import structlog
from aiohttp import web

from donations import __version__, auth, campaigns, db, fees, ingest, inputs, totals
from donations import logging as donations_logging
from donations.errors import ApiError, Unprocessable
from donations.ledger import FoundingOffer
from donations.money import from_major
from donations.settings import ConfigError, Settings

log = structlog.get_logger(__name__)

T = TypeVar("T")

# How long `serve` lets the requests in flight finish after SIGTERM or SIGINT (README: 30 s).
SHUTDOWN_TIMEOUT = 30.0


def new_event_loop() -> asyncio.AbstractEventLoop:
    """uvloop's event loop where it is installed (every platform but Windows): the same asyncio
    API, with sockets and callbacks in C. Measured on checkout creation, it took the service's
    CPU per checkout from 1.28 to 0.90 ms (benchmarks/README.md)."""
    try:
        import uvloop  # noqa: PLC0415 - optional: not built for Windows
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


def run(main: Coroutine[Any, Any, T]) -> T:
    """`asyncio.run` on the loop `serve` uses, SIGTERM handled as SIGINT is: the work is
    cancelled and its clean-up runs (an embedded PostgreSQL it started is stopped), so that a
    supervisor, `timeout` or a job runner stopping a command leaves nothing behind."""
    with asyncio.Runner(loop_factory=new_event_loop) as runner:
        return runner.run(_stopped_by_sigterm(main))


async def _stopped_by_sigterm(main: Coroutine[Any, Any, T]) -> T:
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    assert task is not None
    try:
        loop.add_signal_handler(signal.SIGTERM, task.cancel)
    except NotImplementedError:  # Windows: no signal handlers on the loop
        return await main
    try:
        return await main
    finally:
        loop.remove_signal_handler(signal.SIGTERM)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="donations", description=__doc__)
    parser.add_argument("--version", action="version", version=f"donations {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    commands.add_parser("serve", help="migrate, then serve HTTP until SIGTERM/SIGINT")
    commands.add_parser("migrate", help="apply the sql/ migrations")
    events = commands.add_parser("events", help="stored Stripe events")
    events_commands = events.add_subparsers(dest="events_command", required=True)
    retry = events_commands.add_parser("retry", help="apply again the events that failed")
    retry.add_argument("--include-attention", action="store_true",
                       help="also events set aside for an API version not understood")
    events_commands.add_parser("list", help="count stored events by status")
    reapply = events_commands.add_parser(
        "reapply", help="offer applied events again and derive their objects' ledger rows again "
                   "(after a change to which snapshot wins or to how a row is derived)")
    reapply.add_argument("--type", required=True, dest="type_pattern", metavar="PATTERN",
                         help="event types, SQL LIKE: 'charge.dispute.%%'")

    lookups = commands.add_parser(
        "lookups", help="look-ups at Stripe (balance transactions, payouts' transactions)")
    lookups_commands = lookups.add_subparsers(dest="lookups_command", required=True)
    lookups_commands.add_parser("list", help="the look-ups waiting or set aside, with their "
                                "last error")
    lookups_commands.add_parser("retry", help="put the look-ups set aside back in the queue")
    tokens = commands.add_parser("tokens", help="staff access tokens")
    tokens_commands = tokens.add_subparsers(dest="tokens_command", required=True)
    create = tokens_commands.add_parser("create", help="make a token and print it once")
    create.add_argument("--name", required=True)
    # (given twice, `--scope admin --scope reports:read`, both are kept)
    create.add_argument("--scope", required=True, nargs="+", action="extend",
                        choices=auth.SCOPES)
    tokens_commands.add_parser("list", help="names, scopes, created, last used")
    revoke = tokens_commands.add_parser("revoke", help="revoke the live token of that name")
    revoke.add_argument("name")

    campaigns_parser = commands.add_parser("campaigns", help="campaigns")
    campaigns_commands = campaigns_parser.add_subparsers(dest="campaigns_command", required=True)
    new = campaigns_commands.add_parser("create", help="create a campaign")
    new.add_argument("--slug", required=True)
    new.add_argument("--title", required=True)
    new.add_argument("--goal", help="the goal in major units, e.g. 50000 or 50000.00")
    new.add_argument("--currency", help="the goal's currency (the reporting currency)")
    new.add_argument("--starts", help="RFC 3339 timestamp or ISO date (UTC)")
    new.add_argument("--ends", help="RFC 3339 timestamp or ISO date (UTC)")
    campaigns_commands.add_parser("list", help="list campaigns")
    totals_parser = commands.add_parser("totals", help="the public totals")
    totals_commands = totals_parser.add_subparsers(dest="totals_command", required=True)
    totals_commands.add_parser("verify", help="recompute every total from the ledger and list "
                               "any difference from those kept (exit 1 if there is one)")
    commands.add_parser("stripe-setup", help="create or find, idempotently, the coupon and "
                        "products checkout needs in the Stripe account")

    reconcile_parser = commands.add_parser(
        "reconcile", help="replay missed Stripe events, compare balance transactions, repair; "
        "exit 1 while unresolved discrepancies remain")
    reconcile_parser.add_argument(
        "--since", help="read Stripe's events from this ISO date or RFC 3339 time (UTC) instead "
        "of from the checkpoint; Stripe keeps 30 days")
    import_parser = commands.add_parser(
        "import", help="bring in Stripe history older than its 30 days of events, from its "
        "objects; idempotent and resumable")
    import_parser.add_argument("--since", required=True,
                               help="objects created from this ISO date or RFC 3339 time (UTC)")

    report = commands.add_parser("report", help="finance reports (as GET /v1/reports/…)")
    report_commands = report.add_subparsers(dest="report_command", required=True)
    for name, text in (("contributions", "payments, refunds and dispute movements"),
                       ("summary", "gross, refunds, disputes, fees, net, counts (JSON)"),
                       ("payouts", "payouts with the balance transactions that make them up")):
        sub = report_commands.add_parser(name, help=text)
        sub.add_argument("--from", dest="start", required=True,
                         help="inclusive: ISO date or timestamp")
        sub.add_argument("--to", dest="end", required=True, help="exclusive: ISO date or timestamp")
        sub.add_argument("--tz", help="IANA time zone for dates and naive times (default UTC)")
        # the summary is nested figures: JSON only, but --format json is taken as for the others
        formats = ("json",) if name == "summary" else ("csv", "json")
        sub.add_argument("--format", choices=formats, default=formats[0])
        sub.add_argument("--out", help="write to this file instead of standard output")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        settings = Settings.from_env()
    except ConfigError as exc:
        print(f"donations: configuration error: {exc}", file=sys.stderr)
        return 2
    donations_logging.configure(settings.log_format, settings.log_level)
    try:
        if args.command == "serve":
            return serve(settings)
        if args.command == "migrate":
            return run(_migrate(settings))
        if args.command == "events":
            return run(_events(settings, args))
        if args.command == "lookups":
            return run(
                _in_transaction(settings, lambda conn: _lookups(conn, args.lookups_command)))
        if args.command == "tokens":
            return run(_in_transaction(settings, lambda conn: _tokens(conn, args)))
        if args.command in ("reconcile", "import"):
            return run(_with_stripe(settings, args))
        if args.command == "report":
            return run(_report(settings, args))
        if args.command == "stripe-setup":
            return run(_stripe_setup(settings))
        if args.command == "totals":
            return run(_totals_verify(settings))
        if args.command == "campaigns":
            return run(
                _in_transaction(settings, lambda conn: _campaigns(conn, args, settings))
            )
    except ApiError as exc:
        field = f" ({exc.field})" if exc.field else ""
        print(f"donations: {exc.message}{field}", file=sys.stderr)
        return 1
    except OutputError as exc:
        print(f"donations: {exc}", file=sys.stderr)
        return 1
    except asyncpg.ClientConfigurationError as exc:
        # a connection parameter asyncpg refuses that settings.py does not know of (the common
        # ones it refuses at start): from the URL, or a PG… variable asyncpg reads beside it
        print(f"donations: configuration error: DATABASE_URL (or a PG… environment variable): "
              f"{_without_password(str(exc), settings)}", file=sys.stderr)
        return 2
    except db.MigrationError as exc:
        print(f"donations: migration error: {exc}", file=sys.stderr)
        return 1
    except db.DatabaseUnavailable as exc:
        print(f"donations: database unavailable (DATABASE_URL): {exc}", file=sys.stderr)
        return 1
    except db.EmbeddedUnavailable as exc:
        print(f"donations: DONATIONS_DATA_DIR: {exc}", file=sys.stderr)
        return 1
    except asyncio.CancelledError:  # SIGTERM (see run): the work was stopped and cleaned up
        print("donations: stopped by SIGTERM", file=sys.stderr)
        return 128 + signal.SIGTERM
    except KeyboardInterrupt:
        print("donations: stopped by SIGINT", file=sys.stderr)
        return 128 + signal.SIGINT
    return 2


def _without_password(text: str, settings: Settings) -> str:
    """`text` with DATABASE_URL's password, as written and decoded, blotted out."""
    if settings.database_url is None:
        return text
    password = urlsplit(settings.database_url.reveal()).password or ""
    for form in (password, unquote(password)):
        if form:
            text = text.replace(form, "**********")
    return text


def serve(settings: Settings) -> int:
    """Serve until SIGTERM or SIGINT (exit 0); 1 when HOST and PORT cannot be listened on."""
    from donations.app import create_app  # noqa: PLC0415 - keeps `--help` fast

    log.info("starting", host=settings.host, port=settings.port,
             database="external" if settings.database_url else "embedded")
    app = create_app(settings)
    # What is loaded by now (modules, the app) lives as long as the process: out of the garbage
    # collector's sight, so that its full collections stay short pauses on the request path.
    gc.collect()
    gc.freeze()
    # aiohttp's run_app, with the listening told apart from the start before it (see _serve).
    loop = new_event_loop()
    asyncio.set_event_loop(loop)
    main = loop.create_task(_serve(app, settings.host, settings.port))
    try:
        code = loop.run_until_complete(main)
    except (web.GracefulExit, KeyboardInterrupt):  # SIGTERM, SIGINT: stopped below
        code = 0
        # aiohttp's handlers stay installed until its clean-up ends: a second SIGTERM or SIGINT
        # (a supervisor repeating itself, Ctrl-C pressed again) would raise out of that clean-up
        # and cancel everything out of order. Now it is only said; the stop goes on in order.
        for signum in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(signum, _already_stopping, signum)
    finally:
        try:
            if not main.done():
                main.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    loop.run_until_complete(main)
        finally:
            _cancel_remaining(loop)
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()
    if code == 0:
        log.info("stopped")
    return code


def _already_stopping(signum: int) -> None:
    log.warning("already_stopping", signal=signal.Signals(signum).name)


async def _serve(app: web.Application, host: str, port: int) -> int:
    """Start the app (embedded PostgreSQL, migrations, pool, background tasks), listen on
    host:port until SIGTERM or SIGINT (aiohttp raises GracefulExit), and stop everything that
    was started, whatever happened: requests in flight finish (up to SHUTDOWN_TIMEOUT), then
    the cleanup contexts run (pool, workers, embedded server). A host that does not resolve or
    a port taken by another process is one line through the log and exit status 1, not a
    traceback."""
    from donations.app import Runner  # noqa: PLC0415 - keeps `--help` fast

    # A client that hangs up does not cancel its request (handler_cancellation): a checkout goes
    # on to store the session Stripe made, so that the reader's retry with its key gets it.
    runner = Runner(app, handle_signals=True, access_log=None,
                    shutdown_timeout=SHUTDOWN_TIMEOUT, handler_cancellation=False)
    try:
        await runner.setup()
        try:
            await web.TCPSite(runner, host, port).start()
        except OSError as exc:  # socket.gaierror too: a host name that does not resolve
            log.error("cannot_listen", address=_address(host, port), error=_listen_error(exc))
            return 1
        await asyncio.get_running_loop().create_future()  # until a signal ends the run
        raise AssertionError("unreachable: the future is never done")
    finally:
        await runner.cleanup()


def _address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _listen_error(exc: OSError) -> str:
    """`address already in use`, `host name does not resolve (…)`: what went wrong, briefly."""
    if isinstance(exc, socket.gaierror):
        return f"host name does not resolve ({exc.strerror or exc})"
    if exc.errno:
        return os.strerror(exc.errno).lower()
    return str(exc)


def _cancel_remaining(loop: asyncio.AbstractEventLoop) -> None:
    """Cancel what is left on the loop and let it finish, as asyncio.run and run_app do."""
    remaining = asyncio.all_tasks(loop)
    for task in remaining:
        task.cancel()
    if remaining:
        loop.run_until_complete(asyncio.gather(*remaining, return_exceptions=True))


async def _with_database(settings: Settings) -> tuple[str, db.EmbeddedPostgres | None]:
    if settings.database_url is not None:
        return settings.database_url.reveal(), None
    dsn, embedded = await db.start_embedded(settings.data_dir)
    return dsn, embedded


async def _migrate(settings: Settings) -> int:
    dsn, embedded = await _with_database(settings)
    try:
        applied = await db.migrate(dsn)
        names = ": " + ", ".join(applied) if applied else ""
        print(f"applied {len(applied)} migration(s){names}")
        return 0
    finally:
        if embedded is not None:
            embedded.stop()


async def _events(settings: Settings, args: argparse.Namespace) -> int:
    command = args.events_command
    dsn, embedded = await _with_database(settings)
    try:
        await db.migrate(dsn)
        pool = await db.create_pool(dsn, min_size=1, max_size=2)
        try:
            if command == "list":
                async with db.connection(pool) as conn:
                    rows = await conn.fetch(
                        "SELECT status, count(*) AS n FROM stripe_events GROUP BY status ORDER BY 1"
                    )
                for row in rows:
                    print(f"{row['status']}\t{row['n']}")
                return 0
            offer = FoundingOffer(settings.founding_coupon_id, settings.founding_percent_off)
            if command == "reapply":
                kept, derived = await ingest.reapply(pool, offer, args.type_pattern)
                print(f"{kept} object(s) took a snapshot that outranks the one they had; "
                      f"the ledger rows of {derived} object(s) were derived again")
                return 0
            statuses = ["failed", "pending"] + (["needs_attention"] if args.include_attention
                                                else [])
            counts = await ingest.retry_unfinished(pool, offer, statuses)
            print(", ".join(f"{k}: {v}" for k, v in sorted(counts.items())) or "nothing to retry")
            return 1 if counts.get("failed") else 0
        finally:
            await pool.close()
    finally:
        if embedded is not None:
            embedded.stop()


async def _in_transaction(
    settings: Settings, work: Callable[[asyncpg.Connection], Awaitable[int]]
) -> int:
    """Run one command's work on a migrated database, in one transaction."""
    dsn, embedded = await _with_database(settings)
    try:
        await db.migrate(dsn)
        conn = await asyncpg.connect(dsn)
        try:
            async with conn.transaction():
                return await work(conn)
        finally:
            await conn.close()
    finally:
        if embedded is not None:
            embedded.stop()


async def _totals_verify(settings: Settings) -> int:
    dsn, embedded = await _with_database(settings)
    try:
        await db.migrate(dsn)
        conn = await asyncpg.connect(dsn)
        try:
            result = await totals.verify(conn)  # its own REPEATABLE READ transaction
        finally:
            await conn.close()
    finally:
        if embedded is not None:
            embedded.stop()
    for line in totals.describe(result):
        print(line)
    return 1 if result.differences else 0


async def _lookups(conn: asyncpg.Connection, command: str) -> int:
    if command == "retry":
        counts = await fees.requeue_set_aside(conn)
        print(", ".join(f"{queue}: {n}" for queue, n in counts.items()) + " put back in the queue")
        return 0
    print("queue\tid\tattempts\tnext_attempt_at\tset_aside_at\tlast_error")
    for row in await conn.fetch(
        """
        SELECT 'balance_transactions' AS queue, id, attempts, next_attempt_at, gave_up_at,
               last_error
          FROM balance_transaction_fetches
        UNION ALL
        SELECT 'payouts', payout, attempts, next_attempt_at, gave_up_at, last_error
          FROM payout_fetches WHERE fetched_at IS NULL
        UNION ALL
        SELECT 'coupons', coupon_id, attempts, next_attempt_at, gave_up_at, last_error
          FROM coupon_lookups
         ORDER BY 1, 2
        """
    ):
        due = "-" if row["gave_up_at"] else inputs.rfc3339(row["next_attempt_at"]) or "-"
        print("\t".join([row["queue"], row["id"], str(row["attempts"]), due,
                         inputs.rfc3339(row["gave_up_at"]) or "-", row["last_error"] or "-"]))
    return 0


async def _tokens(conn: asyncpg.Connection, args: argparse.Namespace) -> int:
    if args.tokens_command == "create":
        value = await auth.create_token(conn, args.name, args.scope)
        print(value)
        print(f"token {args.name!r} created with {', '.join(sorted(set(args.scope)))}; "
              "it is shown only this once", file=sys.stderr)
    elif args.tokens_command == "list":
        print("name\tscopes\tcreated\tlast_used\trevoked")
        for token in await auth.list_tokens(conn):
            print("\t".join([
                token.name, ",".join(token.scopes), inputs.rfc3339(token.created_at) or "",
                inputs.rfc3339(token.last_used_at) or "-", inputs.rfc3339(token.revoked_at) or "-",
            ]))
    else:
        await auth.revoke_token(conn, args.name)
        print(f"token {args.name!r} revoked")
    return 0


async def _campaigns(conn: asyncpg.Connection, args: argparse.Namespace, settings: Settings) -> int:
    if args.campaigns_command == "create":
        currency = (args.currency or settings.reporting_currency).lower()
        try:
            goal = from_major(args.goal, currency) if args.goal else None
        except (ValueError, ArithmeticError):
            raise Unprocessable("invalid_goal", f"--goal {args.goal!r} is not an amount in "
                                f"{currency.upper()}", field="goal") from None
        starts = inputs.timestamp(args.starts, "starts") if args.starts else None
        ends = inputs.timestamp(args.ends, "ends") if args.ends else None
        campaign = await campaigns.create(conn, args.slug, args.title, goal,
                                          currency if goal else None, starts, ends,
                                          settings.reporting_currency)
        print(json.dumps(campaign.as_json()))
    else:
        for campaign in await campaigns.list_all(conn):
            print(json.dumps(campaign.as_json()))
    return 0


async def _report(settings: Settings, args: argparse.Namespace) -> int:
    """A report to standard output or --out; the same rows and rules as the HTTP endpoints."""
    from donations import payouts, reports  # noqa: PLC0415 - keeps `--help` fast

    win = reports.window(args.start, args.end, args.tz)
    # where the report goes is opened first: one that cannot be written (a folder that does not
    # exist, a folder named) is one line before any database is started
    out, partial = _output(getattr(args, "out", None))
    embedded: db.EmbeddedPostgres | None = None
    finished, code = False, 0

    where = args.out if getattr(args, "out", None) else "standard output"

    def put(chunk: bytes) -> None:
        try:
            out.write(chunk)
        except OSError as exc:  # a full disk, a pipe closed by its reader
            raise OutputError(f"cannot write the report to {where}: "
                              f"{exc.strerror or exc}") from exc

    async def write(chunk: bytes) -> None:
        put(chunk)

    try:
        # inside the try: the output is closed (a partial report removed) and the embedded
        # PostgreSQL stopped on every path
        dsn, embedded = await _with_database(settings)
        await db.migrate(dsn)
        conn = await asyncpg.connect(dsn)
        try:
            if args.report_command == "contributions":
                rows = await reports.stream_contributions(conn, win, args.format, write)
                print(f"{rows} row(s)", file=sys.stderr)
            elif args.report_command == "summary":
                body = await reports.summary(conn, win, settings.reporting_currency)
                put((json.dumps(body, indent=2) + "\n").encode())
            else:
                written = await payouts.write_report(conn, win, args.format, write)
                unbalanced, unfetched = written.unbalanced, written.unfetched
                if unbalanced:
                    print("payouts whose transactions do not sum to them: "
                          + ", ".join(unbalanced), file=sys.stderr)
                if unfetched:
                    print("payouts whose transactions are not fetched from Stripe yet "
                          "(see donations lookups list): " + ", ".join(unfetched),
                          file=sys.stderr)
                if unbalanced or unfetched:
                    code = 1
            finished = True  # (a payout report that does not tie is whole all the same)
            return code
        finally:
            await conn.close()
    finally:
        try:
            try:
                out.flush()
                if out is not sys.stdout.buffer:
                    out.close()
            except OSError as exc:
                finished = False  # not whole on disk (the disk full, say): FILE stays as it was
                raise OutputError(f"cannot write the report to {where}: "
                                  f"{exc.strerror or exc}") from exc
            except BaseException:
                finished = False
                raise
            finally:
                if partial is not None:
                    _put_in_place(partial, Path(args.out), finished)
        finally:
            if embedded is not None:
                embedded.stop()


class OutputError(Exception):
    """A report that could not be written where it was to go (a full disk, a closed pipe)."""


def _output(path: str | None) -> tuple[BinaryIO, Path | None]:
    """Where a report goes: standard output, or --out. A regular file (or one still to make) is
    written beside it under a name of its own and put in place only once the report is whole
    (`_put_in_place`), so that a run stopped or failed half-way leaves the file as it was, never
    a shorter report that could pass for the whole; a device or pipe is written as it goes.
    OutputError, the README's one line, when it cannot be opened (a folder that does not exist,
    a folder named)."""
    if path is None:
        return sys.stdout.buffer, None
    try:
        return _open_output(Path(path))
    except (OSError, RuntimeError) as exc:  # (RuntimeError: a symbolic link loop, Python 3.11)
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
        raise OutputError(f"cannot write the report to {path}: {reason}") from exc


def _open_output(target: Path) -> tuple[BinaryIO, Path | None]:
    """`_output` for a path; OSError when it cannot be written (a folder that does not exist,
    a folder, one we may not write in)."""
    if target.exists() and not target.is_file():
        return open(target, "wb"), None  # (a folder: IsADirectoryError)
    real = target.resolve()  # (through a symbolic link: the file it names is replaced)
    while True:
        # a name of its own: one left by a run killed outright (its pid may be ours: a cron
        # job in a container has the same pid every run) is never taken for an unwritable folder
        partial = real.with_name(f".{real.name}.{os.getpid()}.{secrets.token_hex(4)}.partial")
        try:
            out = open(partial, "xb")  # noqa: SIM115 - closed by the caller
            break
        except FileExistsError:
            continue
        except OSError:  # a folder we may not write in, the file in it we may: as it goes
            return open(target, "wb"), None
    try:
        if real.exists():  # the report that replaces it keeps its permissions
            os.chmod(partial, stat.S_IMODE(real.stat().st_mode))
    except OSError:
        out.close()
        partial.unlink(missing_ok=True)
        raise
    return out, partial


def _put_in_place(partial: Path, target: Path, finished: bool) -> None:
    if finished:
        try:
            os.replace(partial, target.resolve())
        except (OSError, RuntimeError) as exc:  # (a folder put in its place meanwhile, say)
            partial.unlink(missing_ok=True)
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
            raise OutputError(f"cannot write the report to {target}: {reason}") from exc
    else:
        partial.unlink(missing_ok=True)


async def _with_stripe(settings: Settings, args: argparse.Namespace) -> int:
    """`reconcile` and `import`: a migrated database, a Stripe client, one run."""
    import stripe  # noqa: PLC0415 - keeps `--help` fast

    from donations import importer, reconcile  # noqa: PLC0415
    from donations.stripe_api import make_client  # noqa: PLC0415

    since = int(inputs.timestamp(args.since, "since").timestamp()) if args.since else None
    http_client = stripe.AIOHTTPClient(timeout=30)
    client = make_client(settings, http_client)
    if client is None:
        print("donations: STRIPE_SECRET_KEY is not set", file=sys.stderr)
        return 2
    offer = FoundingOffer(settings.founding_coupon_id, settings.founding_percent_off)
    dsn, embedded = await _with_database(settings)
    try:
        await db.migrate(dsn)
        pool = await db.create_pool(dsn, min_size=1, max_size=4)
        try:
            if args.command == "import":
                assert since is not None  # --since is required
                try:
                    try:
                        done = await importer.run(pool, client, offer, since,
                                                  progress=sys.stderr)
                    except importer.AlreadyImporting:
                        raise
                    except BaseException:  # a Stripe failure, a signal, the database gone
                        if sys.stderr.isatty():
                            print(file=sys.stderr)  # ends the progress bar's line first
                        raise
                except importer.AlreadyImporting as exc:
                    print(f"donations: {exc}", file=sys.stderr)
                    return 1
                except stripe.StripeError as exc:
                    print(f"donations: Stripe failed: {_stripe_said(exc)}; run it again to "
                          "resume where it stopped", file=sys.stderr)
                    return 1
                for name, count in done.imported.items():
                    note = " (finished before)" if name in done.skipped else ""
                    print(f"{name}\t{count}{note}")
                print(f"applied {done.applied}, failed {done.failed}")
                return 1 if done.failed else 0
            try:
                result = await reconcile.run(pool, client, offer, since=since)
            except reconcile.AlreadyRunning as exc:
                print(f"donations: {exc}", file=sys.stderr)
                return 1
            except stripe.StripeError as exc:
                print(f"donations: Stripe failed: {_stripe_said(exc)}; the next run resumes "
                      "where this one stopped", file=sys.stderr)
                return 1
            print(result.summary())
            return 0 if result.matches else 1
        finally:
            await pool.close()
    finally:
        await http_client.close_async()  # type: ignore[no-untyped-call]  # unannotated upstream
        if embedded is not None:
            embedded.stop()


def _stripe_said(exc: Exception) -> str:
    """A Stripe error for a one-line message: its type and what it says, on one line (the
    library's connection error says it over several)."""
    said = getattr(exc, "user_message", None) or exc
    return f"{type(exc).__name__}: {' '.join(str(said).split())}"


async def _stripe_setup(settings: Settings) -> int:
    """Exit 0 when the account has what checkout needs, 1 when a person must step in."""
    import stripe  # noqa: PLC0415 - keeps `--help` fast

    from donations import stripe_api, stripe_setup  # noqa: PLC0415

    http_client = stripe.AIOHTTPClient(timeout=20)
    client = stripe_api.make_client(settings, http_client)
    if client is None:
        print("donations: stripe-setup needs STRIPE_SECRET_KEY", file=sys.stderr)
        await http_client.close_async()  # type: ignore[no-untyped-call]  # unannotated upstream
        return 2
    try:
        outcome = await stripe_setup.run(client, settings)
    except stripe.StripeError as exc:
        error = stripe_api.failure(exc)
        said = " ".join(str(exc.user_message or type(exc).__name__).split())
        print(f"donations: stripe-setup failed: {error.message} ({error.code}; Stripe said: "
              f"{said})", file=sys.stderr)
        return 1
    finally:
        await http_client.close_async()  # type: ignore[no-untyped-call]
    for line in outcome.lines:
        print(line)
    for problem in outcome.problems:
        print(f"problem: {problem}", file=sys.stderr)
    return 1 if outcome.problems else 0
