"""SQL for the event store, the snapshots and the ledger tables; the connection is passed in."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

import asyncpg

from donations.events import Event, Version
from donations.ledger import (
    BalanceTransaction,
    Cluster,
    CustomerRow,
    DisputeRow,
    PaymentRow,
    PayoutRow,
    RefundRow,
    Snapshot,
    SubscriptionRow,
)

# --- events ---------------------------------------------------------------------------------


async def insert_event(
    conn: asyncpg.Connection, event: Event, raw: str, source: str, status: str
) -> bool:
    """Store the event with the status it will have once this transaction commits; False when
    it was stored before (a duplicate, or a racing delivery that committed first)."""
    inserted = await conn.fetchval(
        """
        INSERT INTO stripe_events (id, type, api_version, livemode, created, payload, source,
                                   status, attempts, processed_at)
        VALUES ($1, $2, $3, $4, to_timestamp($5), $6::json, $7, $8, 1, now())
        ON CONFLICT (id) DO NOTHING
        RETURNING true
        """,
        event.id, event.type, event.api_version, event.livemode, event.created, raw, source,
        status,
    )
    return bool(inserted)


async def insert_event_and_snapshot(
    conn: asyncpg.Connection, event: Event, raw: str, source: str, status: str,
    locks: list[str], snapshot: Snapshot,
) -> tuple[bool, bool]:
    """In one round trip: take `locks` (in order), store the event, keep its snapshot if it
    outranks the stored one. Returns (event stored now, snapshot kept).

    The insert of the event reads the locks' row and the snapshot's insert reads the event's, so
    PostgreSQL takes the locks first whatever order it runs the parts of the statement in.
    """
    version, links = snapshot.version, snapshot.links
    row = await conn.fetchrow(
        """
        WITH locks AS MATERIALIZED (
            SELECT count(pg_advisory_xact_lock(hashtextextended(k, 0))) AS n
              FROM unnest($9::text[]) WITH ORDINALITY AS t(k, i)
        ), event AS (
            INSERT INTO stripe_events (id, type, api_version, livemode, created, payload,
                                       source, status, attempts, processed_at)
            SELECT $1, $2, $3, $4, to_timestamp($5), $6::json, $7, $8, 1, now() FROM locks
            ON CONFLICT (id) DO NOTHING
            RETURNING payload
        ), snapshot AS (
            INSERT INTO stripe_objects AS o (id, object, rank, progress, event_created,
                                             type_rank, event_id, payment_key, invoice_id,
                                             subscription_id, data)
            SELECT $10, $11, $12, $13, $14, $15, $1, $16, $17, $18,
                   payload::jsonb -> 'data' -> 'object'
              FROM event
            ON CONFLICT (id) DO UPDATE
               SET rank = excluded.rank, progress = excluded.progress,
                   event_created = excluded.event_created, type_rank = excluded.type_rank,
                   event_id = excluded.event_id, payment_key = excluded.payment_key,
                   invoice_id = excluded.invoice_id, subscription_id = excluded.subscription_id,
                   data = excluded.data
             WHERE (excluded.rank, excluded.progress, excluded.event_created,
                    excluded.type_rank, excluded.event_id)
                 > (o.rank, o.progress, o.event_created, o.type_rank, o.event_id)
            RETURNING true
        )
        SELECT (SELECT count(*) FROM event) AS stored, (SELECT count(*) FROM snapshot) AS kept
        """,
        event.id, event.type, event.api_version, event.livemode, event.created, raw, source,
        status, locks, snapshot.id, snapshot.kind, version.stage, version.progress,
        version.created, version.type_rank, links.payment_key, links.invoice_id,
        links.subscription_id,
    )
    assert row is not None
    return bool(row["stored"]), bool(row["kept"])


async def record_failure(
    conn: asyncpg.Connection, event: Event, raw: str, source: str, error: str
) -> None:
    """Keep an event whose effects were rolled back, marked failed with the error."""
    await conn.execute(
        """
        INSERT INTO stripe_events AS e (id, type, api_version, livemode, created, payload,
                                        source, status, attempts, last_error)
        VALUES ($1, $2, $3, $4, to_timestamp($5), $6::json, $7, 'failed', 1, $8)
        ON CONFLICT (id) DO UPDATE
           SET attempts = e.attempts + 1, last_error = excluded.last_error,
               status = 'failed', processed_at = NULL
         WHERE e.status IN ('failed', 'pending')
        """,
        event.id, event.type, event.api_version, event.livemode, event.created, raw, source,
        error[:2000],
    )


async def event_status(conn: asyncpg.Connection, event_id: str) -> str | None:
    status: str | None = await conn.fetchval(
        "SELECT status FROM stripe_events WHERE id = $1 FOR UPDATE", event_id
    )
    return status


async def finish_event(conn: asyncpg.Connection, event_id: str, status: str) -> None:
    await conn.execute(
        """
        UPDATE stripe_events
           SET status = $2, attempts = attempts + 1, processed_at = now(), last_error = NULL
         WHERE id = $1
        """,
        event_id, status,
    )


async def unfinished_events(
    conn: asyncpg.Connection, statuses: list[str], limit: int = 1000
) -> list[tuple[str, str]]:
    """Events to apply again: (id, payload text), oldest first."""
    rows = await conn.fetch(
        """
        SELECT id, payload::text AS payload FROM stripe_events
         WHERE status = any($1::text[])
         ORDER BY received_at, id
         LIMIT $2
        """,
        statuses, limit,
    )
    return [(r["id"], r["payload"]) for r in rows]


# --- snapshots ------------------------------------------------------------------------------


async def put_snapshot(conn: asyncpg.Connection, snapshot: Snapshot, event_id: str) -> bool:
    """Keep the snapshot if it outranks the one stored; True when it did (the state changed).

    The object is taken from the stored event's body inside PostgreSQL rather than encoded again.
    """
    version, links = snapshot.version, snapshot.links
    won = await conn.fetchval(
        """
        INSERT INTO stripe_objects AS o (id, object, rank, progress, event_created, type_rank,
                                         event_id, payment_key, invoice_id, subscription_id, data)
        SELECT $1, $2, $3, $4, $5, $6, $7, $8, $9, $10, payload::jsonb -> 'data' -> 'object'
          FROM stripe_events WHERE id = $11
        ON CONFLICT (id) DO UPDATE
           SET rank = excluded.rank, progress = excluded.progress,
               event_created = excluded.event_created, type_rank = excluded.type_rank,
               event_id = excluded.event_id, payment_key = excluded.payment_key,
               invoice_id = excluded.invoice_id, subscription_id = excluded.subscription_id,
               data = excluded.data
         WHERE (excluded.rank, excluded.progress, excluded.event_created, excluded.type_rank,
                excluded.event_id)
             > (o.rank, o.progress, o.event_created, o.type_rank, o.event_id)
        RETURNING true
        """,
        snapshot.id, snapshot.kind, version.stage, version.progress, version.created,
        version.type_rank, version.event_id, links.payment_key, links.invoice_id,
        links.subscription_id, event_id,
    )
    return bool(won)


_SNAPSHOT_COLUMNS = (
    "id, object, rank, progress, event_created, type_rank, event_id, invoice_id, subscription_id,"
    " data"
)


def _snapshot(row: asyncpg.Record) -> Snapshot:
    return Snapshot(
        kind=row["object"],
        data=row["data"],
        version=Version(
            row["rank"], row["progress"], row["event_created"], row["type_rank"], row["event_id"]
        ),
    )


async def load_cluster(conn: asyncpg.Connection, payment_key: str) -> Cluster:
    """The payment's own snapshots, its invoices' (and their sessions'), their subscriptions'.

    Separate index look-ups rather than one query with IN (subquery): the planner would turn
    those into sequential scans of stripe_objects on a young table.
    """
    rows = list(await conn.fetch(
        f"SELECT {_SNAPSHOT_COLUMNS} FROM stripe_objects WHERE payment_key = $1",  # noqa: S608
        payment_key,
    ))
    invoices = {r["invoice_id"] for r in rows if r["invoice_id"]}
    if payment_key.startswith("in_"):
        invoices.add(payment_key)
    if invoices:
        rows += await conn.fetch(
            f"SELECT {_SNAPSHOT_COLUMNS} FROM stripe_objects"  # noqa: S608
            " WHERE invoice_id = any($1::text[])",
            sorted(invoices),
        )
    subscriptions = {r["subscription_id"] for r in rows if r["subscription_id"]}
    if subscriptions:
        rows += await conn.fetch(
            f"SELECT {_SNAPSHOT_COLUMNS} FROM stripe_objects"  # noqa: S608
            " WHERE id = any($1::text[]) AND object = 'subscription'",
            sorted(subscriptions),
        )
    seen: dict[str, Snapshot] = {}
    for row in rows:
        seen.setdefault(row["id"], _snapshot(row))
    cluster = Cluster(snapshots=list(seen.values()))
    bt_ids = sorted({
        s.data["balance_transaction"] for s in cluster.snapshots
        if s.kind == "charge" and isinstance(s.data.get("balance_transaction"), str)
    })
    if bt_ids:
        for row in await conn.fetch(
            "SELECT id, amount, currency, fee, net FROM balance_transactions WHERE id = any($1)",
            bt_ids,
        ):
            cluster.balance_transactions[row["id"]] = BalanceTransaction(**dict(row))
    return cluster


async def load_subscription(
    conn: asyncpg.Connection, subscription_id: str
) -> tuple[Snapshot | None, list[Snapshot]]:
    """The subscription's snapshot and those of the discounts applied to it."""
    rows = await conn.fetch(
        f"""
        SELECT {_SNAPSHOT_COLUMNS} FROM stripe_objects
         WHERE subscription_id = $1 AND object IN ('subscription', 'discount')
        """,  # noqa: S608 - the interpolated text is a constant column list
        subscription_id,
    )
    snapshots = [_snapshot(r) for r in rows]
    own = next((s for s in snapshots if s.kind == "subscription"), None)
    return own, [s for s in snapshots if s.kind == "discount"]


async def payment_keys_of_invoices(conn: asyncpg.Connection, invoice_ids: list[str]) -> list[str]:
    rows = await conn.fetch(
        """
        SELECT DISTINCT payment_key FROM stripe_objects
         WHERE object = 'invoice_payment' AND invoice_id = any($1) AND payment_key IS NOT NULL
        """,
        invoice_ids,
    )
    return [r["payment_key"] for r in rows]


async def invoices_of_subscription(conn: asyncpg.Connection, subscription_id: str) -> list[str]:
    rows = await conn.fetch(
        "SELECT id FROM stripe_objects WHERE object = 'invoice' AND subscription_id = $1",
        subscription_id,
    )
    return [r["id"] for r in rows]


# --- the ledger -----------------------------------------------------------------------------


def _upsert(table: str, row: dict[str, Any], key: str) -> tuple[str, list[Any]]:
    columns = list(row)
    placeholders = ", ".join(f"${i}" for i in range(1, len(columns) + 1))
    updates = ", ".join(f"{c} = excluded.{c}" for c in columns if c != key)
    sql = (
        f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({placeholders}) "  # noqa: S608
        f"ON CONFLICT ({key}) DO UPDATE SET {updates}"
    )
    return sql, list(row.values())


async def _put(conn: asyncpg.Connection, table: str, row: object, key: str = "id") -> None:
    sql, args = _upsert(table, asdict(row), key)  # type: ignore[call-overload]
    await conn.execute(sql, *args)


async def put_payment(conn: asyncpg.Connection, key: str, row: PaymentRow | None) -> None:
    if row is None:
        await conn.execute("DELETE FROM payments WHERE payment_key = $1", key)
        return
    sql, args = _upsert("payments", asdict(row), "payment_key")
    if row.balance_transaction and row.fee is None:
        # fees come later from the worker; queue the look-up in the same round trip
        sql = (
            f"WITH upsert AS ({sql} RETURNING balance_transaction) "  # noqa: S608
            "INSERT INTO balance_transaction_fetches (id) SELECT balance_transaction FROM upsert"
            " WHERE NOT EXISTS (SELECT 1 FROM balance_transactions b"
            "                    WHERE b.id = upsert.balance_transaction)"
            " ON CONFLICT (id) DO NOTHING"
        )
    await conn.execute(sql, *args)


async def put_refund(conn: asyncpg.Connection, row: RefundRow) -> None:
    await _put(conn, "refunds", row)


async def put_dispute(conn: asyncpg.Connection, row: DisputeRow) -> None:
    await _put(conn, "disputes", row)


async def put_subscription(conn: asyncpg.Connection, row: SubscriptionRow) -> None:
    await _put(conn, "subscriptions", row)


async def put_customer(conn: asyncpg.Connection, row: CustomerRow) -> None:
    await _put(conn, "customers", row)


async def put_payout(conn: asyncpg.Connection, row: PayoutRow) -> None:
    await _put(conn, "payouts", row)


# --- balance transactions -------------------------------------------------------------------


async def queue_balance_transaction(conn: asyncpg.Connection, bt_id: str) -> None:
    await conn.execute(
        """
        INSERT INTO balance_transaction_fetches (id)
        SELECT $1 WHERE NOT EXISTS (SELECT 1 FROM balance_transactions WHERE id = $1)
        ON CONFLICT (id) DO NOTHING
        """,
        bt_id,
    )
