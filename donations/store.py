"""SQL for the event store, the snapshots and the ledger tables; the connection is passed in."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import fields
from datetime import datetime
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


# A snapshot replaces the stored one only if its version is greater: the one rule that makes the
# ledger the same whatever order and however often the events come (donations/events.py).
_KEEP_GREATER = """
ON CONFLICT (id) DO UPDATE
   SET rank = excluded.rank, progress = excluded.progress,
       event_created = excluded.event_created, type_rank = excluded.type_rank,
       event_id = excluded.event_id, payment_key = excluded.payment_key,
       invoice_id = excluded.invoice_id, subscription_id = excluded.subscription_id,
       data = excluded.data
 WHERE (excluded.rank, excluded.progress, excluded.event_created, excluded.type_rank,
        excluded.event_id)
     > (o.rank, o.progress, o.event_created, o.type_rank, o.event_id)"""


# A subscription snapshot's status as a fact of its event (sql/030): a row per snapshot stored,
# whether or not it outranks the kept one, and the same rows whatever order and however often
# the events come. The finance summary reads them for the status at a past window's end.
# `rows` names a relation with the snapshot's columns (and `status`, NULL for other objects).
_STATUS_HISTORY = """
            INSERT INTO subscription_statuses (subscription_id, at, event_id, rank, type_rank,
                                               status)
            SELECT s.id, to_timestamp(s.event_created), s.event_id, s.rank, s.type_rank,
                   s.status
              FROM {rows}
             WHERE s.object = 'subscription' AND s.status IS NOT NULL
            ON CONFLICT DO NOTHING"""


def _status(snapshot: Snapshot) -> str | None:
    """A subscription snapshot's status, for its history; None for any other object."""
    status = snapshot.get("status") if snapshot.kind == "subscription" else None
    return status if isinstance(status, str) else None


async def store_events(
    conn: asyncpg.Connection, locks: list[str], events: list[tuple[Event, str, str]],
    snapshots: list[Snapshot], source: str,
) -> tuple[set[str], dict[str, str]]:
    """In one round trip: take `locks` (in order), store the events (event, raw body, status) that
    are not stored yet, and keep, for each object, the greatest of the new events' snapshots if it
    outranks the stored one; and record the status each new subscription snapshot tells (its
    history, sql/030). Returns the ids of the events stored now, and the objects whose snapshot
    was kept with the id of the event that carried it.

    The events' insert reads the locks' row and the snapshots' insert reads the events', so
    PostgreSQL takes the locks first whatever order it runs the parts of the statement in.
    """
    row = await conn.fetchrow(
        f"""
        WITH locks AS MATERIALIZED (
            SELECT count(pg_advisory_xact_lock(hashtextextended(k, 0))) AS n
              FROM unnest($1::text[]) WITH ORDINALITY AS t(k, i)
        ), event AS (
            INSERT INTO stripe_events (id, type, api_version, livemode, created, payload,
                                       source, status, attempts, processed_at)
            SELECT e.id, e.type, e.api_version, e.livemode, to_timestamp(e.created),
                   e.payload::json, $8, e.status, 1, now()
              FROM locks, unnest($2::text[], $3::text[], $4::text[], $5::boolean[],
                                 $6::bigint[], $7::text[], $9::text[])
                          AS e(id, type, api_version, livemode, created, payload, status)
            ON CONFLICT (id) DO NOTHING
            RETURNING id, payload
        ), given AS (
            SELECT * FROM unnest($10::text[], $11::text[], $12::integer[], $13::bigint[],
                                 $14::bigint[], $15::integer[], $16::text[], $17::text[],
                                 $18::text[], $19::text[], $20::text[])
                   AS s(id, object, rank, progress, event_created, type_rank, event_id,
                        payment_key, invoice_id, subscription_id, status)
        ), history AS (
            {_STATUS_HISTORY.format(rows="given s JOIN event ON event.id = s.event_id")}
        ), snapshot AS (
            INSERT INTO stripe_objects AS o (id, object, rank, progress, event_created,
                                             type_rank, event_id, payment_key, invoice_id,
                                             subscription_id, data)
            SELECT DISTINCT ON (s.id)
                   s.id, s.object, s.rank, s.progress, s.event_created, s.type_rank,
                   s.event_id, s.payment_key, s.invoice_id, s.subscription_id,
                   event.payload::jsonb -> 'data' -> 'object'
              FROM given s
              JOIN event ON event.id = s.event_id
             ORDER BY s.id, s.rank DESC, s.progress DESC, s.event_created DESC,
                      s.type_rank DESC, s.event_id COLLATE "C" DESC
            {_KEEP_GREATER}
            RETURNING o.id, o.event_id
        )
        SELECT ARRAY(SELECT id FROM event) AS stored,
               ARRAY(SELECT id FROM snapshot) AS kept_ids,
               ARRAY(SELECT event_id FROM snapshot) AS kept_events
        """,  # noqa: S608 - the interpolated text is a constant clause
        locks,
        [e.id for e, _, _ in events], [e.type for e, _, _ in events],
        [e.api_version for e, _, _ in events], [e.livemode for e, _, _ in events],
        [e.created for e, _, _ in events], [raw for _, raw, _ in events], source,
        [status for _, _, status in events],
        [s.id for s in snapshots], [s.kind for s in snapshots],
        [s.version.stage for s in snapshots], [s.version.progress for s in snapshots],
        [s.version.created for s in snapshots], [s.version.type_rank for s in snapshots],
        [s.version.event_id for s in snapshots], [s.links.payment_key for s in snapshots],
        [s.links.invoice_id for s in snapshots], [s.links.subscription_id for s in snapshots],
        [_status(s) for s in snapshots],
    )
    assert row is not None
    return set(row["stored"]), dict(zip(row["kept_ids"], row["kept_events"], strict=True))


async def event_statuses(conn: asyncpg.Connection, event_ids: list[str]) -> dict[str, str]:
    """The stored events' statuses, their rows locked until the end of the transaction."""
    rows = await conn.fetch(
        "SELECT id, status FROM stripe_events WHERE id = any($1::text[]) ORDER BY id FOR UPDATE",
        event_ids,
    )
    return {r["id"]: r["status"] for r in rows}


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


async def finish_event(conn: asyncpg.Connection, event_id: str, status: str,
                       copy: tuple[str, str | None] | None = None) -> None:
    """Record what became of a stored event; with `copy` (its body and API version), that copy
    of it replaces the one stored (a copy in a version the ledger reads, of an event stored in
    one it does not)."""
    await conn.execute(
        """
        UPDATE stripe_events
           SET status = $2, attempts = attempts + 1, processed_at = now(), last_error = NULL,
               payload = CASE WHEN $3 THEN $4::json ELSE payload END,
               api_version = CASE WHEN $3 THEN $5 ELSE api_version END
         WHERE id = $1
        """,
        event_id, status, copy is not None, copy[0] if copy else None,
        copy[1] if copy else None,
    )


def _page(sql: str, after: tuple[datetime, str] | None, key: str, first: int = 3
          ) -> tuple[str, tuple[Any, ...]]:
    """`sql` (its WHERE ending in `{after}`) for the first page, or for the one after the last
    page's last (key, id), given as parameters `first` and the next: a statement of its own,
    so that even a generic plan starts the index scan at `after` instead of filtering from the
    beginning."""
    if after is None:
        return sql.format(after=""), ()
    return sql.format(
        after=f"AND ({key}, id) > (${first}::timestamptz, ${first + 1}::text)"), after


async def unfinished_events(
    conn: asyncpg.Connection, statuses: list[str], after: tuple[datetime, str] | None = None,
    limit: int = 500, sources: Sequence[str] | None = None,
) -> list[tuple[str, datetime, str]]:
    """A page of the events to apply again (of these sources, or any): (id, received_at, payload
    text), oldest first, after `after` (the last page's last (received_at, id)). The first
    clause is the partial index stripe_events_unfinished's own: a generic plan uses it too."""
    sql, cursor = _page(
        """
        SELECT id, received_at, payload::text AS payload FROM stripe_events
         WHERE status IN ('pending', 'failed', 'needs_attention') AND status = any($1::text[])
           AND ($3::text[] IS NULL OR source = any($3::text[]))
           {after}
         ORDER BY received_at, id
         LIMIT $2
        """, after, "received_at", first=4)
    rows = await conn.fetch(sql, statuses, limit, None if sources is None else list(sources),
                            *cursor)
    return [(r["id"], r["received_at"], r["payload"]) for r in rows]


async def matching_types(conn: asyncpg.Connection, types: Iterable[str], pattern: str) -> list[str]:
    """Those of `types` that match `pattern` (SQL LIKE, as PostgreSQL reads it)."""
    return [r["t"] for r in await conn.fetch(
        "SELECT t FROM unnest($1::text[]) AS t WHERE t LIKE $2 ORDER BY t", sorted(types),
        pattern)]


async def applied_events(
    conn: asyncpg.Connection, types: list[str], after: tuple[datetime, str] | None,
    limit: int = 500,
) -> list[tuple[str, datetime, str]]:
    """A page of the applied events of these types: (id, created, payload text), oldest first,
    after `after` (the last page's last (created, id)). By a list of types, not LIKE, so that a
    rare type is found through stripe_events_status_type; a common one walks
    stripe_events_created."""
    sql, cursor = _page(
        """
        SELECT id, created, payload::text AS payload FROM stripe_events
         WHERE status = 'processed' AND type = any($1::text[])
           {after}
         ORDER BY created, id
         LIMIT $2
        """, after, "created")
    rows = await conn.fetch(sql, types, limit, *cursor)
    return [(r["id"], r["created"], r["payload"]) for r in rows]


# --- snapshots ------------------------------------------------------------------------------


async def put_snapshot(conn: asyncpg.Connection, snapshot: Snapshot, event_id: str) -> bool:
    """Keep the snapshot if it outranks the one stored; True when it did (the state changed).
    A subscription's status is added to its history either way (sql/030).

    The object is taken from the stored event's body inside PostgreSQL rather than encoded again.
    """
    version, links = snapshot.version, snapshot.links
    won = await conn.fetchval(
        f"""
        WITH s AS (
            SELECT $1::text AS id, $2::text AS object, $3::integer AS rank,
                   $5::bigint AS event_created, $6::integer AS type_rank,
                   $7::text AS event_id, $12::text AS status
        ), history AS (
            {_STATUS_HISTORY.format(rows="s")}
        )
        INSERT INTO stripe_objects AS o (id, object, rank, progress, event_created, type_rank,
                                         event_id, payment_key, invoice_id, subscription_id, data)
        SELECT $1, $2, $3, $4, $5, $6, $7, $8, $9, $10, payload::jsonb -> 'data' -> 'object'
          FROM stripe_events WHERE id = $11
        {_KEEP_GREATER}
        RETURNING true
        """,  # noqa: S608 - the interpolated text is a constant clause
        snapshot.id, snapshot.kind, version.stage, version.progress, version.created,
        version.type_rank, version.event_id, links.payment_key, links.invoice_id,
        links.subscription_id, event_id, _status(snapshot),
    )
    return bool(won)


_SNAPSHOT_COLUMNS = (
    "id, object, rank, progress, event_created, type_rank, event_id, payment_key, invoice_id,"
    " subscription_id, data"
)


def _snapshot(row: asyncpg.Record) -> Snapshot:
    return Snapshot(
        kind=row["object"],
        data=row["data"],
        version=Version(
            row["rank"], row["progress"], row["event_created"], row["type_rank"], row["event_id"]
        ),
    )


async def load_snapshot(conn: asyncpg.Connection, object_id: str) -> Snapshot | None:
    """The snapshot kept for an object, if any."""
    row = await conn.fetchrow(
        f"SELECT {_SNAPSHOT_COLUMNS} FROM stripe_objects WHERE id = $1",  # noqa: S608 - constant
        object_id,
    )
    return _snapshot(row) if row is not None else None


async def discover(
    conn: asyncpg.Connection, subscriptions: list[str], invoices: list[str],
    discounted: Sequence[str] = (), coupons: Sequence[str] = (),
) -> tuple[set[str], set[str], set[str], set[str]]:
    """What a change to these subscriptions and invoices reaches: the subscriptions' invoices,
    and the payments of those and of the given invoices (through their invoice payments); the
    coupons that the `discounted` subscriptions' discounts name (their discounts' snapshots, and
    the coupons their rows were derived with), and the subscriptions derived with one of the
    given `coupons` (sql/031's index)."""
    if not subscriptions and not invoices and not discounted and not coupons:
        return set(), set(), set(), set()
    rows = await conn.fetch(
        """
        WITH invoice AS (
            SELECT id FROM stripe_objects
             WHERE object = 'invoice' AND subscription_id = any($1::text[])
        )
        SELECT 'invoice' AS kind, id FROM invoice
        UNION ALL
        SELECT DISTINCT 'payment', payment_key FROM stripe_objects
         WHERE object = 'invoice_payment' AND payment_key IS NOT NULL
           AND invoice_id = any(ARRAY(SELECT id FROM invoice) || $2::text[])
        UNION ALL
        SELECT DISTINCT 'coupon', discount_coupon_id(data) FROM stripe_objects
         WHERE object = 'discount' AND subscription_id = any($3::text[])
           AND discount_coupon_id(data) IS NOT NULL
        UNION ALL
        SELECT DISTINCT 'coupon', unnest(coupons) FROM subscriptions
         WHERE id = any($3::text[])
        UNION ALL
        SELECT 'user', id FROM subscriptions
         WHERE cardinality($4::text[]) > 0 AND coupons && $4::text[]
        """,
        subscriptions, invoices, list(discounted), list(coupons),
    )
    found: dict[str, set[str]] = {"invoice": set(), "payment": set(), "coupon": set(),
                                  "user": set()}
    for row in rows:
        found[row["kind"]].add(row["id"])
    return found["invoice"], found["payment"], found["coupon"], found["user"]


async def load_clusters(
    conn: asyncpg.Connection, keys: list[str], known: Sequence[Snapshot] = ()
) -> dict[str, Cluster]:
    """For each payment key, what its row is derived from: the payment's own snapshots, its
    invoices' (and their sessions'), their subscriptions', and its charges' balance transactions.

    Read in one statement for all the keys (and one more for the balance transactions); each
    part is an index look-up by an array of ids, never a scan, whatever the planner's estimates.
    A stored snapshot that is one of the `known` ones (the same object and event: the group
    just stored it) is taken from memory instead of being sent and decoded again.
    """
    in_memory = {s.id: s for s in known}
    invoice_keys = [k for k in keys if k.startswith("in_")]  # invoice-keyed payments
    rows = await conn.fetch(
        f"""
        WITH own AS MATERIALIZED (
            SELECT {_SNAPSHOT_COLUMNS} FROM stripe_objects WHERE payment_key = any($1::text[])
        ), invoiced AS MATERIALIZED (
            SELECT {_SNAPSHOT_COLUMNS} FROM stripe_objects
             WHERE invoice_id = any(ARRAY(SELECT invoice_id FROM own
                                           WHERE invoice_id IS NOT NULL) || $2::text[])
               AND (payment_key IS NULL OR NOT payment_key = any($1::text[]))
        ), found AS (
            SELECT * FROM own
            UNION ALL
            SELECT * FROM invoiced
            UNION ALL
            SELECT {_SNAPSHOT_COLUMNS} FROM stripe_objects
             WHERE object = 'subscription'
               AND id = any(ARRAY(SELECT subscription_id FROM own
                                   WHERE subscription_id IS NOT NULL
                                  UNION
                                  SELECT subscription_id FROM invoiced
                                   WHERE subscription_id IS NOT NULL))
        )
        SELECT f.id, f.object, f.rank, f.progress, f.event_created, f.type_rank, f.event_id,
               f.payment_key, f.invoice_id, f.subscription_id,
               CASE WHEN k.id IS NULL THEN f.data END AS data
          FROM found f
          LEFT JOIN unnest($3::text[], $4::text[]) AS k(id, event_id)
            ON k.id = f.id AND k.event_id = f.event_id
        """,  # noqa: S608 - the interpolated text is a constant column list
        keys, invoice_keys, list(in_memory), [s.version.event_id for s in in_memory.values()],
    )
    snapshots = {row["id"]: _snapshot(row) if row["data"] is not None else in_memory[row["id"]]
                 for row in rows}
    links = {row["id"]: (row["invoice_id"], row["subscription_id"]) for row in rows}
    by_payment: dict[str, list[str]] = {}
    by_invoice: dict[str, list[str]] = {}
    for row in rows:
        if row["payment_key"]:
            by_payment.setdefault(row["payment_key"], []).append(row["id"])
        if row["invoice_id"]:
            by_invoice.setdefault(row["invoice_id"], []).append(row["id"])

    clusters: dict[str, Cluster] = {}
    for key in keys:
        ids = list(by_payment.get(key, []))
        invoices = {links[i][0] for i in ids if links[i][0]}
        if key.startswith("in_"):
            invoices.add(key)
        for invoice in sorted(invoices):
            ids += by_invoice.get(invoice, [])
        subscriptions = {links[i][1] for i in ids if links[i][1]}
        ids += [s for s in sorted(subscriptions)
                if s in snapshots and snapshots[s].kind == "subscription"]
        clusters[key] = Cluster(snapshots=[snapshots[i] for i in dict.fromkeys(ids)])

    bt_ids = sorted({
        s.data["balance_transaction"] for s in snapshots.values()
        if s.kind == "charge" and isinstance(s.data.get("balance_transaction"), str)
    })
    if bt_ids:
        found = {
            row["id"]: BalanceTransaction(**dict(row)) for row in await conn.fetch(
                "SELECT id, amount, currency, fee, net, created_at FROM balance_transactions"
                " WHERE id = any($1::text[])",
                bt_ids,
            )
        }
        for cluster in clusters.values():
            for charge in cluster.of("charge"):
                bt = charge.data.get("balance_transaction")
                if isinstance(bt, str) and bt in found:
                    cluster.balance_transactions[bt] = found[bt]
    return clusters


async def load_subscriptions(
    conn: asyncpg.Connection, subscription_ids: list[str]
) -> dict[str, tuple[Snapshot | None, list[Snapshot]]]:
    """Each subscription's snapshot and those of the discounts applied to it."""
    rows = await conn.fetch(
        f"""
        SELECT {_SNAPSHOT_COLUMNS} FROM stripe_objects
         WHERE subscription_id = any($1::text[]) AND object IN ('subscription', 'discount')
        """,  # noqa: S608 - the interpolated text is a constant column list
        subscription_ids,
    )
    found: dict[str, tuple[Snapshot | None, list[Snapshot]]] = {
        s: (None, []) for s in subscription_ids
    }
    for row in rows:
        snapshot = _snapshot(row)
        if snapshot.kind == "subscription":
            found[row["subscription_id"]] = (snapshot, found[row["subscription_id"]][1])
        else:
            found[row["subscription_id"]][1].append(snapshot)
    return found


async def load_coupons(
    conn: asyncpg.Connection, coupon_ids: list[str]
) -> dict[str, dict[str, Any]]:
    """The coupons kept (from their events, or looked up at Stripe), by id."""
    if not coupon_ids:
        return {}
    rows = await conn.fetch(
        "SELECT id, data FROM stripe_objects WHERE id = any($1::text[]) AND object = 'coupon'",
        coupon_ids,
    )
    return {r["id"]: r["data"] for r in rows}


async def queue_coupon_lookups(conn: asyncpg.Connection, coupon_ids: list[str]) -> None:
    """Queue the look-up of coupons whose terms are not known (the coupon worker takes them)."""
    if coupon_ids:
        await conn.execute(
            "INSERT INTO coupon_lookups (coupon_id) SELECT unnest($1::text[])"
            " ON CONFLICT (coupon_id) DO NOTHING",
            coupon_ids,
        )


# --- the ledger -----------------------------------------------------------------------------


def _upsert(table: str, columns: list[str], key: str, types: list[str]) -> str:
    """Insert or update rows given as one array per column (`types`: the columns' SQL types);
    a row derived again unchanged is left alone (no new row version, no trigger: most events
    about a payment do not change it).

    One statement for all the rows, not one per row: the statement-level triggers (sql/025's
    counts) then run once per write instead of once per row.
    """
    arrays = ", ".join(f"${i}::{t}[]" for i, t in enumerate(types, start=1))
    return (f"INSERT INTO {table} AS t ({', '.join(columns)})"  # noqa: S608 - constant names
            f" SELECT * FROM unnest({arrays}){_changed_only(columns, key)}")


def _changed_only(columns: list[str], key: str) -> str:
    """An upsert's conflict clause: the row updated only where a column differs."""
    others = [c for c in columns if c != key]
    return (
        f" ON CONFLICT ({key}) DO UPDATE SET {', '.join(f'{c} = excluded.{c}' for c in others)}"
        f" WHERE ({', '.join(f't.{c}' for c in others)})"
        f" IS DISTINCT FROM ({', '.join(f'excluded.{c}' for c in others)})"
    )


# Each ledger table's column types, read from the catalogue once per process (and again if a
# column is missing, as after a migration).
_COLUMN_TYPES: dict[str, dict[str, str]] = {}


async def _column_types(conn: asyncpg.Connection, table: str, columns: list[str]) -> list[str]:
    known = _COLUMN_TYPES.get(table, {})
    if any(c not in known for c in columns):
        rows = await conn.fetch(
            "SELECT attname, format_type(atttypid, NULL) AS type FROM pg_attribute"
            " WHERE attrelid = $1::regclass AND attnum > 0 AND NOT attisdropped",
            table,
        )
        known = _COLUMN_TYPES[table] = {r["attname"]: r["type"] for r in rows}
    return [known[c] for c in columns]


async def _upsert_rows(
    conn: asyncpg.Connection, table: str, rows: list[dict[str, Any]], key: str,
    then: str = "{upsert}",
) -> None:
    """Upsert `rows` (column: value, the same columns in each) into `table` in one statement;
    `then` wraps the upsert's SQL (to use what it returns). A table with an array column takes
    one statement per row (unnest would flatten the arrays)."""
    columns = list(rows[0])
    types = await _column_types(conn, table, columns)
    if any(t.endswith("[]") for t in types):
        await conn.executemany(
            then.format(upsert=_upsert_each(table, columns, key)),
            [list(row.values()) for row in rows],
        )
        return
    await conn.execute(
        then.format(upsert=_upsert(table, columns, key, types)),
        *([row[c] for row in rows] for c in columns),
    )


def _upsert_each(table: str, columns: list[str], key: str) -> str:
    """`_upsert` for one row given as one parameter per column."""
    placeholders = ", ".join(f"${i}" for i in range(1, len(columns) + 1))
    return (f"INSERT INTO {table} AS t ({', '.join(columns)})"  # noqa: S608 - constant names
            f" VALUES ({placeholders}){_changed_only(columns, key)}")


LedgerRow = RefundRow | DisputeRow | SubscriptionRow | CustomerRow | PayoutRow


def _columns(row: LedgerRow | PaymentRow) -> dict[str, Any]:
    """A ledger row's columns and values (`asdict` without its deep copy of every value); a
    field kept in a table of its own is not one."""
    return {f.name: getattr(row, f.name) for f in fields(row) if "table" not in f.metadata}


async def put_rows(
    conn: asyncpg.Connection, table: str, rows: Sequence[LedgerRow], key: str = "id"
) -> None:
    """Upsert ledger rows (dataclasses of one type) into `table`, in one round trip."""
    if rows:
        await _upsert_rows(conn, table, [_columns(row) for row in rows], key)


# A payment's bank debits that failed after Stripe booked them (ledger.PaymentRow.failed_debits),
# each by its charge, and the look-up of their balance transactions for the reports.
_FAILED_DEBITS = """
WITH upsert AS (
    INSERT INTO failed_debits AS f (charge, payment_key, booked_balance_transaction,
                                    failure_balance_transaction)
    SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[])
    ON CONFLICT (charge) DO UPDATE
       SET payment_key = excluded.payment_key,
           booked_balance_transaction = excluded.booked_balance_transaction,
           failure_balance_transaction = excluded.failure_balance_transaction
     WHERE (f.payment_key, f.booked_balance_transaction, f.failure_balance_transaction)
           IS DISTINCT FROM (excluded.payment_key, excluded.booked_balance_transaction,
                             excluded.failure_balance_transaction)
    RETURNING booked_balance_transaction, failure_balance_transaction
)
INSERT INTO balance_transaction_fetches (id)
SELECT DISTINCT t.id FROM upsert
 CROSS JOIN LATERAL (VALUES (upsert.booked_balance_transaction),
                            (upsert.failure_balance_transaction)) AS t(id)
 WHERE t.id IS NOT NULL AND NOT EXISTS (SELECT 1 FROM balance_transactions b WHERE b.id = t.id)
ON CONFLICT (id) DO NOTHING"""


async def put_payments(conn: asyncpg.Connection, derived: dict[str, PaymentRow | None]) -> None:
    """Write the payments derived for these keys (None: no payment stands, the row goes), and
    queue the look-up of each new settlement's fee (fees come later, from the worker), and of
    the booking and reversal of a bank debit that failed after Stripe booked it (for the
    reports, as a refund's are)."""
    gone = [key for key, row in derived.items() if row is None]
    if gone:
        await conn.execute(
            "WITH debits AS (DELETE FROM failed_debits WHERE payment_key = any($1::text[]))"
            " DELETE FROM payments WHERE payment_key = any($1::text[])", gone)
    debits = [(charge, row.payment_key, booked, failure) for row in derived.values()
              if row is not None for charge, booked, failure in row.failed_debits]
    if debits:  # (a failed charge stays failed: a payment's only grow, or move to a new key)
        await conn.execute(_FAILED_DEBITS, *map(list, zip(*debits, strict=True)))
    rows = [_columns(row) for row in derived.values() if row is not None]
    if not rows:
        return
    await _upsert_rows(
        conn, "payments", rows, "payment_key",
        "WITH upsert AS ({upsert} RETURNING balance_transaction, fee,"
        "                 booked_balance_transaction, failure_balance_transaction) "
        "INSERT INTO balance_transaction_fetches (id)"
        " SELECT DISTINCT t.id FROM upsert"
        " CROSS JOIN LATERAL (VALUES (CASE WHEN upsert.fee IS NULL"
        "                                  THEN upsert.balance_transaction END),"
        "                            (upsert.booked_balance_transaction),"
        "                            (upsert.failure_balance_transaction)) AS t(id)"
        "  WHERE t.id IS NOT NULL"
        "    AND NOT EXISTS (SELECT 1 FROM balance_transactions b WHERE b.id = t.id)"
        " ON CONFLICT (id) DO NOTHING",
    )


# --- balance transactions -------------------------------------------------------------------


async def queue_balance_transactions(conn: asyncpg.Connection, bt_ids: list[str]) -> None:
    """Queue the look-up of balance transactions not fetched yet (the fee worker takes them)."""
    if bt_ids:
        await conn.execute(
            """
            INSERT INTO balance_transaction_fetches (id)
            SELECT id FROM unnest($1::text[]) AS t(id)
             WHERE NOT EXISTS (SELECT 1 FROM balance_transactions b WHERE b.id = t.id)
            ON CONFLICT (id) DO NOTHING
            """,
            bt_ids,
        )


# --- the counts /metrics shows (sql/025) ----------------------------------------------------

STORED_EVENTS = """
SELECT type, status, sum(n) AS n
  FROM (SELECT type, status, n FROM stored_event_counts
        UNION ALL
        SELECT type, status, n FROM stored_event_count_deltas) AS counts
 GROUP BY type, status HAVING sum(n) <> 0 ORDER BY type, status
"""
LEDGER_CONTRIBUTIONS = """
SELECT currency, kind, sum(contributions) AS n, sum(net) AS net
  FROM (SELECT currency, kind, contributions, net FROM ledger_counts
        UNION ALL
        SELECT currency, kind, contributions, net FROM ledger_count_deltas) AS counts
 GROUP BY currency, kind HAVING sum(contributions) <> 0 ORDER BY currency, kind
"""


async def compact_counts(conn: asyncpg.Connection, batch: int = 50_000) -> int:
    """Move up to `batch` rows of the counts' differences into the counts; how many were moved
    (0: none left, or another replica is moving them)."""
    async with conn.transaction():
        if not await conn.fetchval("SELECT pg_try_advisory_xact_lock("
                                   "hashtextextended('donations:metrics_counts', 0))"):
            return 0
        moved: int = await conn.fetchval("SELECT metrics_counts_compact($1)", batch)
    return moved
