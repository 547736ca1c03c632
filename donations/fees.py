"""The background worker that fetches balance transactions: fees, net and the settled amount.

Never on the webhook's path: a charge's fee is filled in seconds later, retried with backoff while
Stripe is slow or down, and stays unknown (NULL) without a Stripe key.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Awaitable, Callable
from typing import Any

import asyncpg
import stripe
import structlog

from donations import db
from donations.events import ref
from donations.metrics import Metrics
from donations.stripe_api import plain

log = structlog.get_logger(__name__)

LEASE_SECONDS = 120
MAX_BACKOFF_SECONDS = 6 * 3600
# Stripe answering "no such object" this many times running is an answer, not an outage: the
# look-up is set aside (counted in /metrics, back in the queue with `donations lookups retry`).
GIVE_UP_AFTER_NOT_FOUND = 3


def backoff(attempts: int) -> int:
    """Seconds until the next try: 10 s, 20 s, 40 s … at most six hours."""
    return min(MAX_BACKOFF_SECONDS, 10 * (1 << min(max(0, attempts - 1), 20)))


async def claim(
    conn: asyncpg.Connection, batch: int, queue: str = "balance_transaction_fetches",
    key_column: str = "id",
) -> list[tuple[str, int]]:
    """Lease due look-ups so that several replicas never fetch the same one at once.

    Shared by the queues of look-ups whose rows leave the queue when done (balance
    transactions, coupons)."""
    rows = await conn.fetch(
        f"""
        UPDATE {queue} AS q
           SET attempts = q.attempts + 1,
               next_attempt_at = now() + make_interval(secs => $2)
         WHERE q.{key_column} IN (SELECT {key_column} FROM {queue}
                                   WHERE next_attempt_at <= now() AND gave_up_at IS NULL
                                   ORDER BY next_attempt_at
                                   LIMIT $1
                                   FOR UPDATE SKIP LOCKED)
        RETURNING q.{key_column} AS key, q.attempts
        """,  # noqa: S608 - the table and column are constants of the callers
        batch, LEASE_SECONDS,
    )
    return [(r["key"], r["attempts"]) for r in rows]


async def store_balance_transaction(conn: asyncpg.Connection, bt: dict[str, Any]) -> None:
    """Keep the balance transaction; fill fee, net and settlement into the payments it settles."""
    await store_balance_transactions(conn, [bt])


async def store_balance_transactions(conn: asyncpg.Connection, bts: list[dict[str, Any]]) -> None:
    """Keep the balance transactions and fill fee, net and settlement into the payments they
    settle, in one transaction and a handful of round trips however many there are."""
    if not bts:
        return
    unique = list({bt["id"]: bt for bt in bts}.values())  # (a balance transaction listed twice)
    ids = [bt["id"] for bt in unique]
    async with conn.transaction():
        await conn.execute(
            """
            INSERT INTO balance_transactions (id, type, source, amount, currency, fee, net,
                exchange_rate, status, reporting_category, available_on, created_at, data)
            SELECT id, type, source, amount, currency, fee, net, exchange_rate, status,
                   reporting_category, to_timestamp(available_on), to_timestamp(created),
                   data::jsonb
              FROM unnest($1::text[], $2::text[], $3::text[], $4::bigint[], $5::text[],
                          $6::bigint[], $7::bigint[], $8::numeric[], $9::text[], $10::text[],
                          $11::bigint[], $12::bigint[], $13::text[])
                   AS b(id, type, source, amount, currency, fee, net, exchange_rate, status,
                        reporting_category, available_on, created, data)
            ON CONFLICT (id) DO UPDATE
               SET type = excluded.type, source = excluded.source, amount = excluded.amount,
                   currency = excluded.currency, fee = excluded.fee, net = excluded.net,
                   exchange_rate = excluded.exchange_rate, status = excluded.status,
                   reporting_category = excluded.reporting_category,
                   available_on = excluded.available_on, created_at = excluded.created_at,
                   data = excluded.data, fetched_at = now()
            """,
            ids, [bt.get("type") or "unknown" for bt in unique],
            [ref(bt.get("source")) for bt in unique], [int(bt["amount"]) for bt in unique],
            [str(bt["currency"]) for bt in unique], [int(bt.get("fee") or 0) for bt in unique],
            [int(bt["net"]) for bt in unique],
            # the rate is a decimal string to PostgreSQL's numeric; never a float on our side
            [None if bt.get("exchange_rate") is None else str(bt["exchange_rate"])
             for bt in unique],
            [bt.get("status") for bt in unique], [bt.get("reporting_category") for bt in unique],
            [int(bt.get("available_on") or 0) for bt in unique],
            [int(bt.get("created") or 0) for bt in unique],
            [json.dumps(bt, separators=(",", ":")) for bt in unique],
        )
        # The payments' locks, as a webhook deriving the same payment holds them: whichever
        # comes second sees the other's committed work, so a fee is never overwritten with NULL.
        keys = await conn.fetch(
            "SELECT payment_key FROM payments WHERE balance_transaction = any($1::text[])", ids
        )
        await db.lock(conn, sorted(r["payment_key"] for r in keys))
        # Only what the ledger does not have yet: a value that disagrees with Stripe's is left
        # as it is, for reconciliation to report (never overwritten).
        await conn.execute(
            """
            UPDATE payments p
               SET fee = coalesce(p.fee, b.fee), net = coalesce(p.net, b.net),
                   settlement_currency = coalesce(p.settlement_currency, b.currency),
                   settlement_amount = coalesce(p.settlement_amount, b.amount),
                   settled_at = coalesce(p.settled_at, to_timestamp(b.created))
              FROM unnest($1::text[], $2::bigint[], $3::bigint[], $4::text[], $5::bigint[],
                          $6::bigint[])
                   AS b(id, fee, net, currency, amount, created)
             WHERE p.balance_transaction = b.id
               AND (p.fee IS NULL OR p.net IS NULL OR p.settlement_currency IS NULL
                    OR p.settlement_amount IS NULL OR p.settled_at IS NULL)
            """,
            ids, [int(bt.get("fee") or 0) for bt in unique], [int(bt["net"]) for bt in unique],
            [str(bt["currency"]) for bt in unique], [int(bt["amount"]) for bt in unique],
            [int(bt["created"]) for bt in unique],
        )
        await conn.execute(
            "DELETE FROM balance_transaction_fetches WHERE id = any($1::text[])", ids)


async def still_leased(
    pool: asyncpg.Pool, queue: str, key_column: str, key: str, attempts: int
) -> bool:
    """Whether the look-up is still this worker's (claimed with `attempts`, not done since nor
    taken over by another replica once its lease ran out), its lease renewed if so: asked
    before each Stripe call of a batch, so that a slow Stripe, which outlasts a batch's lease,
    is never asked for the same object by several replicas.

    Shared by the queues of look-ups at Stripe (balance transactions, payouts' members,
    coupons)."""
    async with db.connection(pool) as conn:
        return bool(await conn.fetchval(
            f"""
            UPDATE {queue} SET next_attempt_at = now() + make_interval(secs => $3)
             WHERE {key_column} = $1 AND attempts = $2 AND gave_up_at IS NULL
            RETURNING true
            """,  # noqa: S608 - the table and column are constants of the callers
            key, attempts, LEASE_SECONDS,
        ))


async def postpone(
    pool: asyncpg.Pool, queue: str, key_column: str, key: str, attempts: int,
    error: stripe.StripeError,
) -> int | None:
    """Record a failed Stripe look-up in its queue and push its next try back; returns the
    seconds until then, or None when the look-up is set aside: Stripe has said, the last
    GIVE_UP_AFTER_NOT_FOUND times running, that the object does not exist (a key of another
    account or mode, an id from a deleted test object). Any other error starts that count again.

    Shared by the queues of look-ups at Stripe (balance transactions, payouts' members,
    coupons)."""
    delay = backoff(attempts)
    not_found = error.http_status == 404
    async with db.connection(pool) as conn:
        row = await conn.fetchrow(
            f"""
            UPDATE {queue}
               SET not_found_in_a_row = CASE WHEN $4 THEN not_found_in_a_row + 1 ELSE 0 END,
                   next_attempt_at = now() + make_interval(secs => $3),
                   gave_up_at = CASE WHEN $4 AND not_found_in_a_row + 1 >= $5 THEN now() END,
                   last_error = CASE WHEN $4 AND not_found_in_a_row + 1 >= $5
                                     THEN 'set aside after ' || (not_found_in_a_row + 1)
                                          || ' "no such object" answers running; ' || $2
                                     ELSE $2 END
             WHERE {key_column} = $1
            RETURNING gave_up_at IS NOT NULL AS set_aside
            """,  # noqa: S608 - the table and column are constants of the callers
            key, _error_text(error), delay, not_found, GIVE_UP_AFTER_NOT_FOUND,
        )
    return None if row is not None and row["set_aside"] else delay


async def give_back(
    pool: asyncpg.Pool, queue: str, key_column: str, leases: dict[str, int]
) -> None:
    """The leases of look-ups a worker claimed but had not finished when it was stopped (a
    shutdown, a deploy): due again at once, the attempt not counted, so that the next replica
    up, or another one, does them now rather than once the lease runs out. Only leases still
    ours (the attempt count as we claimed it: a lease that ran out and was claimed again by
    another replica is theirs). Best effort: when the database will not take it, the lease
    runs out as after a crash.

    Shared by the queues of look-ups at Stripe (balance transactions, payouts' members,
    coupons)."""
    if not leases:
        return
    with contextlib.suppress(Exception):
        async with db.connection(pool, wait=1) as conn:
            await conn.execute(
                f"""
                UPDATE {queue} AS q
                   SET attempts = greatest(q.attempts - 1, 0), next_attempt_at = now()
                  FROM unnest($1::text[], $2::int[]) AS ours(key, attempts)
                 WHERE q.{key_column} = ours.key AND q.attempts = ours.attempts
                """,  # noqa: S608 - the table and column are constants of the callers
                list(leases), list(leases.values()),
            )


def _error_text(error: stripe.StripeError) -> str:
    return f"{type(error).__name__}: {error.user_message or error}"[:400]


async def requeue_set_aside(conn: asyncpg.Connection) -> dict[str, int]:
    """Put every look-up set aside back in its queue, due now (`donations lookups retry`)."""
    counts = {}
    for name, queue in (("balance_transactions", "balance_transaction_fetches"),
                        ("payouts", "payout_fetches"), ("coupons", "coupon_lookups")):
        result: str = await conn.execute(
            f"""
            UPDATE {queue}
               SET gave_up_at = NULL, attempts = 0, not_found_in_a_row = 0,
                   next_attempt_at = now()
             WHERE gave_up_at IS NOT NULL
            """  # noqa: S608 - constant table names
        )
        counts[name] = int(result.rsplit(maxsplit=1)[-1])
    return counts


def log_failure(event: str, attempts: int, error: stripe.StripeError, delay: int | None,
                **ids: str) -> None:
    """One line for a failed look-up: a warning while it is retried, an error when set aside."""
    if delay is None:
        log.error(f"{event}_set_aside", **ids, error=type(error).__name__,
                  http_status=error.http_status, attempts=attempts)
    else:
        log.warning(event, **ids, error=type(error).__name__, http_status=error.http_status,
                    retry_in_seconds=delay)


async def run_once(
    pool: asyncpg.Pool, client: stripe.StripeClient, metrics: Metrics, batch: int = 25
) -> int:
    """Fetch what is due; returns how many were stored."""
    async with db.connection(pool) as conn:
        claimed = await claim(conn, batch)
    stored = 0
    left = dict(claimed)  # claimed (with its attempt count) and not yet stored or postponed
    try:
        for bt_id, attempts in claimed:
            if not await still_leased(pool, "balance_transaction_fetches", "id", bt_id,
                                      attempts):
                del left[bt_id]
                continue
            try:
                bt = plain(await client.v1.balance_transactions.retrieve_async(bt_id))
            except stripe.StripeError as exc:
                metrics.balance_fetches.inc(outcome="error")
                delay = await postpone(pool, "balance_transaction_fetches", "id", bt_id,
                                       attempts, exc)
                log_failure("balance_transaction_fetch_failed", attempts, exc, delay,
                            balance_transaction=bt_id)
                del left[bt_id]
                continue
            async with db.connection(pool) as conn:
                await store_balance_transaction(conn, bt)
            del left[bt_id]
            metrics.balance_fetches.inc(outcome="stored")
            stored += 1
    except asyncio.CancelledError:
        await give_back(pool, "balance_transaction_fetches", "id", left)
        raise
    return stored


async def keep_running(
    name: str, once: Callable[[], Awaitable[int]], interval: float
) -> None:
    """Run `once` until it finds nothing to do, sleep, again, until cancelled; a database or
    Stripe outage only delays the work."""
    while True:
        try:
            while await once():
                pass
        except db.DatabaseUnavailable:
            log.warning(f"{name}_database_unavailable")
        except Exception:
            log.exception(f"{name}_failed")
        await asyncio.sleep(interval)


async def worker(
    pool: asyncpg.Pool, client: stripe.StripeClient, metrics: Metrics, interval: float
) -> None:
    """The balance-transaction worker, until cancelled."""
    await keep_running(
        "balance_transaction_worker", lambda: run_once(pool, client, metrics), interval
    )
