"""Apply a verified Stripe event to the ledger exactly once: store it, keep its snapshot, derive."""

from __future__ import annotations

import enum
import json
from collections.abc import Iterable

import asyncpg
import structlog

from donations import db, store
from donations.events import (
    Event,
    Links,
    parse_event,
)
from donations.ledger import (
    FoundingOffer,
    derive_customer,
    derive_dispute,
    derive_payment,
    derive_payout,
    derive_refund,
    derive_subscription,
    snapshot_of,
)

log = structlog.get_logger(__name__)


class Outcome(enum.StrEnum):
    """What became of one delivery of an event."""

    PROCESSED = "processed"  # its effects are in the ledger
    IGNORED = "ignored"  # stored; a type the ledger does not need
    NEEDS_ATTENTION = "needs_attention"  # stored; an API version whose shape we do not read
    DUPLICATE = "duplicate"  # stored and handled before: nothing changed
    FAILED = "failed"  # stored; applying it raised, the effects were rolled back


async def ingest(
    pool: asyncpg.Pool, event: Event, raw: str, offer: FoundingOffer, *, source: str = "webhook"
) -> Outcome:
    """Store and apply one event in one transaction; safe to call any number of times, at once."""

    async def work(conn: asyncpg.Connection) -> Outcome:
        if not await store.insert_event(conn, event, raw, source):
            status = await store.event_status(conn, event.id)
            if status in ("processed", "ignored", "needs_attention"):
                return Outcome.DUPLICATE
        return await _apply_and_record(conn, event, offer)

    return await db.serializable(pool, work)


async def _apply_and_record(
    conn: asyncpg.Connection, event: Event, offer: FoundingOffer
) -> Outcome:
    try:
        # A savepoint: a failure undoes the ledger changes but keeps the event, marked failed.
        async with conn.transaction():
            outcome = await apply_event(conn, event, offer)
    except (*db.RETRYABLE_ERRORS, *db.UNAVAILABLE_ERRORS):
        raise
    except Exception as exc:
        log.exception("event_apply_failed", error=type(exc).__name__)
        await store.fail_event(conn, event.id, f"{type(exc).__name__}: {exc}")
        return Outcome.FAILED
    await store.finish_event(conn, event.id, outcome.value)
    return outcome


async def apply_event(conn: asyncpg.Connection, event: Event, offer: FoundingOffer) -> Outcome:
    """The ledger changes one event makes; idempotent, and the same in any order."""
    if event.object_kind is None:
        return Outcome.IGNORED
    snapshot = snapshot_of(event)
    if snapshot is None:
        log.warning("event_api_version_not_understood", api_version=event.api_version)
        return Outcome.NEEDS_ATTENTION
    kind, object_id, own_links = snapshot.kind, snapshot.id, snapshot.links
    if not await store.put_snapshot(
        conn, kind, object_id, snapshot.version, own_links, snapshot.data
    ):
        return Outcome.PROCESSED  # an older or equal snapshot: the ledger already reflects better

    match kind:
        case "refund":
            await store.put_refund(conn, derive_refund(snapshot))
            if snapshot.data.get("balance_transaction"):
                await store.queue_balance_transaction(
                    conn, str(snapshot.data["balance_transaction"])
                )
        case "dispute":
            await store.put_dispute(conn, derive_dispute(snapshot))
        case "subscription" | "discount":
            subscription, discounts = await store.load_subscription(
                conn, own_links.subscription_id or ""
            )
            if subscription is not None:
                await store.put_subscription(
                    conn, derive_subscription(subscription, discounts, offer)
                )
            if kind == "discount":
                return Outcome.PROCESSED
        case "customer":
            await store.put_customer(conn, derive_customer(snapshot))
            return Outcome.PROCESSED
        case "payout":
            await store.put_payout(conn, derive_payout(snapshot))
            return Outcome.PROCESSED

    for key in sorted(await _affected_payments(conn, kind, object_id, own_links)):
        cluster = await store.load_cluster(conn, key)
        await store.put_payment(conn, key, derive_payment(key, cluster))
    return Outcome.PROCESSED


async def _affected_payments(
    conn: asyncpg.Connection, kind: str, object_id: str, own: Links
) -> set[str]:
    """Every payment whose derivation may read the snapshot just stored."""
    keys: set[str] = {own.payment_key} if own.payment_key else set()
    invoice_ids: list[str] = [own.invoice_id] if own.invoice_id else []
    if kind == "subscription":
        invoice_ids += await store.invoices_of_subscription(conn, object_id)
    if invoice_ids:
        # an invoice-keyed payment stands until its invoice payment is known, so both are due
        keys.update(invoice_ids)
        keys.update(await store.payment_keys_of_invoices(conn, invoice_ids))
    return keys


async def retry_unfinished(
    pool: asyncpg.Pool, offer: FoundingOffer, statuses: Iterable[str] = ("failed", "pending")
) -> dict[str, int]:
    """Apply again the stored events that did not apply (the `events retry` command)."""
    async with db.connection(pool) as conn:
        todo = await store.unfinished_events(conn, list(statuses))
    counts: dict[str, int] = {}
    for event_id, payload in todo:
        event = parse_event(json.loads(payload))
        with structlog.contextvars.bound_contextvars(event_id=event_id, event_type=event.type):
            outcome = await _reapply(pool, event, offer)
        counts[outcome.value] = counts.get(outcome.value, 0) + 1
    return counts


async def _reapply(pool: asyncpg.Pool, event: Event, offer: FoundingOffer) -> Outcome:
    async def work(conn: asyncpg.Connection) -> Outcome:
        if await store.event_status(conn, event.id) not in ("failed", "pending", "needs_attention"):
            return Outcome.DUPLICATE
        return await _apply_and_record(conn, event, offer)

    return await db.serializable(pool, work)
