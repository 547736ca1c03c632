"""Reading the ledger back from PostgreSQL, and the reference ledger derived from events alone."""

from __future__ import annotations

import json
from dataclasses import asdict
from typing import Any

import asyncpg

from donations.events import parse_event
from donations.ledger import BalanceTransaction, FoundingOffer, Snapshot, derive_ledger, snapshot_of

LedgerDump = dict[str, dict[str, dict[str, Any]]]

_TABLES = {
    "payments": "payment_key",
    "refunds": "id",
    "disputes": "id",
    "subscriptions": "id",
    "customers": "id",
    "payouts": "id",
}


async def dump(pool: asyncpg.Pool) -> LedgerDump:
    """Every ledger table as {table: {key: row}}."""
    result: LedgerDump = {}
    for table, key in _TABLES.items():
        rows = await pool.fetch(f"SELECT * FROM {table}")  # noqa: S608 - constant names
        result[table] = {r[key]: _normalise(dict(r)) for r in rows}
    # each payment's failed bank debits, kept in a table of their own (as PaymentRow has them)
    for payment in result["payments"].values():
        payment["failed_debits"] = []
    for r in await pool.fetch("SELECT * FROM failed_debits ORDER BY charge"):
        result["payments"][r["payment_key"]]["failed_debits"].append(
            [r["charge"], r["booked_balance_transaction"], r["failure_balance_transaction"]])
    return result


def reference(
    events: list[dict[str, Any]],
    offer: FoundingOffer | None = None,
    balance_transactions: dict[str, BalanceTransaction] | None = None,
) -> LedgerDump:
    """The ledger the events describe, derived all at once and in no particular order."""
    snapshots: list[Snapshot] = []
    for body in events:
        snapshot = snapshot_of(parse_event(body))
        if snapshot is not None:
            snapshots.append(snapshot)
    ledger = derive_ledger(snapshots, offer or FoundingOffer(), balance_transactions)
    return {
        table: {k: _normalise(asdict(v)) for k, v in getattr(ledger, table).items()}
        for table in _TABLES
    }


def _normalise(row: dict[str, Any]) -> dict[str, Any]:
    # jsonb comes back as the dict it was; text[] as a list; keep both comparable
    for name, value in row.items():
        if isinstance(value, str) and name == "metadata":
            row[name] = json.loads(value)
        elif isinstance(value, tuple):
            row[name] = [list(v) if isinstance(v, tuple) else v for v in value]
    return row
