"""The command line: `donations serve | migrate | events | tokens | campaigns …`."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Awaitable, Callable, Sequence

import asyncpg
import structlog
from aiohttp import web

from donations import __version__, auth, campaigns, db, ingest, inputs
from donations import logging as donations_logging
from donations.errors import ApiError, Unprocessable
from donations.ledger import FoundingOffer
from donations.money import from_major
from donations.settings import ConfigError, Settings

log = structlog.get_logger(__name__)


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

    tokens = commands.add_parser("tokens", help="staff access tokens")
    tokens_commands = tokens.add_subparsers(dest="tokens_command", required=True)
    create = tokens_commands.add_parser("create", help="make a token and print it once")
    create.add_argument("--name", required=True)
    create.add_argument("--scope", required=True, nargs="+", choices=auth.SCOPES)
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
            return asyncio.run(_migrate(settings))
        if args.command == "events":
            return asyncio.run(_events(settings, args.events_command, args.include_attention
                                       if args.events_command == "retry" else False))
        if args.command == "tokens":
            return asyncio.run(_in_transaction(settings, lambda conn: _tokens(conn, args)))
        if args.command == "campaigns":
            return asyncio.run(
                _in_transaction(settings, lambda conn: _campaigns(conn, args, settings))
            )
    except ApiError as exc:
        field = f" ({exc.field})" if exc.field else ""
        print(f"donations: {exc.message}{field}", file=sys.stderr)
        return 1
    except db.MigrationError as exc:
        print(f"donations: migration error: {exc}", file=sys.stderr)
        return 1
    except db.DatabaseUnavailable as exc:
        print(f"donations: database unavailable: {exc}", file=sys.stderr)
        return 1
    return 2


def serve(settings: Settings) -> int:
    from donations.app import create_app  # noqa: PLC0415 - keeps `--help` fast

    log.info("starting", host=settings.host, port=settings.port,
             database="external" if settings.database_url else "embedded")
    # run_app handles SIGINT and SIGTERM: it stops accepting, lets requests in flight finish
    # (up to shutdown_timeout), then runs the cleanup contexts (pool, worker, embedded server).
    web.run_app(create_app(settings), host=settings.host, port=settings.port,
                access_log=None, print=None, shutdown_timeout=30)
    log.info("stopped")
    return 0


async def _with_database(settings: Settings) -> tuple[str, db.EmbeddedPostgres | None]:
    if settings.database_url is not None:
        return settings.database_url.reveal(), None
    embedded = db.EmbeddedPostgres(settings.data_dir)
    dsn = await asyncio.to_thread(embedded.start)
    await embedded.ensure_database()
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


async def _events(settings: Settings, command: str, include_attention: bool) -> int:
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
            statuses = ["failed", "pending"] + (["needs_attention"] if include_attention else [])
            offer = FoundingOffer(settings.founding_coupon_id, settings.founding_percent_off)
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
