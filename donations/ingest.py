"""Apply a verified Stripe event to the ledger exactly once: store it, keep its snapshot, derive.

Concurrency: each event runs in one READ COMMITTED transaction that first takes advisory locks on
what it can change: the subscription, then the invoices, then the payments (each group sorted),
always in that order so that two events can never wait on each other in a cycle. Whoever derives
a payment holds that payment's lock and sees every snapshot committed before it, and every event
whose snapshot a payment's derivation reads derives that payment again while holding its lock, so
the last derivation always sees everything.
"""

from __future__ import annotations

import enum
import json
from collections.abc import Iterable
from dataclasses import dataclass

import asyncpg
import structlog

from donations import db, store
from donations.events import Event, parse_event
from donations.ledger import (
    FoundingOffer,
    Snapshot,
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


FINAL = frozenset({Outcome.PROCESSED, Outcome.IGNORED, Outcome.NEEDS_ATTENTION})

# Not the event's fault: the caller answers 503 and Stripe delivers it again later.
_OUTAGES: tuple[type[BaseException], ...] = (
    db.DatabaseUnavailable, db.DatabaseBusy, *db.UNAVAILABLE_ERRORS
)


def classify(event: Event) -> tuple[Outcome, Snapshot | None]:
    """What the ledger will do with the event, before touching the database."""
    if event.object_kind is None:
        return Outcome.IGNORED, None
    snapshot = snapshot_of(event)
    if snapshot is None:
        return Outcome.NEEDS_ATTENTION, None
    return Outcome.PROCESSED, snapshot


async def ingest(
    pool: asyncpg.Pool, event: Event, raw: str, offer: FoundingOffer, *, source: str = "webhook"
) -> Outcome:
    """Store and apply one event in one transaction; safe to call any number of times, at once.

    A failure while applying rolls everything back and then records the event as failed in a
    transaction of its own, so that Stripe's retry (or `events retry`) applies it later.
    """
    outcome, snapshot = classify(event)
    if outcome is Outcome.NEEDS_ATTENTION:
        log.warning("event_api_version_not_understood", api_version=event.api_version)

    async def work(conn: asyncpg.Connection) -> Outcome:
        if snapshot is None:  # stored, nothing to apply
            if await store.insert_event(conn, event, raw, source, outcome.value):
                return outcome
        else:
            plan = Plan.of(snapshot)
            stored, kept = await store.insert_event_and_snapshot(
                conn, event, raw, source, outcome.value, plan.first_locks(), snapshot
            )
            if stored:
                if kept:
                    await apply_snapshot(conn, snapshot, offer, plan)
                return outcome
        # stored before: a duplicate, or one that failed and is applied now
        if await store.event_status(conn, event.id) in FINAL:
            return Outcome.DUPLICATE
        if snapshot is not None:
            await apply_stored(conn, event.id, snapshot, offer)
        await store.finish_event(conn, event.id, outcome.value)
        return outcome

    try:
        return await db.transaction(pool, work)
    except _OUTAGES:
        raise
    except Exception as exc:
        log.exception("event_apply_failed", error=type(exc).__name__)
        error = f"{type(exc).__name__}: {exc}"

        async def record(conn: asyncpg.Connection) -> None:
            await store.record_failure(conn, event, raw, source, error)

        await db.transaction(pool, record)
        return Outcome.FAILED


@dataclass(slots=True)
class Plan:
    """What one snapshot can change, in lock order: its subscription, invoices, payments."""

    subscriptions: list[str]
    invoices: list[str]
    payments: set[str]

    @classmethod
    def of(cls, snapshot: Snapshot) -> Plan:
        own = snapshot.links
        return cls(
            subscriptions=[own.subscription_id] if own.subscription_id else [],
            invoices=[own.invoice_id] if own.invoice_id else [],
            payments={own.payment_key} if own.payment_key else set(),
        )

    def first_locks(self) -> list[str]:
        """The locks known from the snapshot alone, in order: subscription, invoice, payment."""
        return [*self.subscriptions, *sorted(set(self.invoices)),
                *sorted(self.payments - set(self.invoices))]


async def apply_stored(
    conn: asyncpg.Connection, event_id: str, snapshot: Snapshot, offer: FoundingOffer
) -> None:
    """Apply an event stored earlier (a retry of one that failed)."""
    plan = Plan.of(snapshot)
    await db.lock(conn, plan.first_locks())
    if await store.put_snapshot(conn, snapshot, event_id):
        await apply_snapshot(conn, snapshot, offer, plan)


async def apply_snapshot(
    conn: asyncpg.Connection, snapshot: Snapshot, offer: FoundingOffer, plan: Plan
) -> None:
    """The ledger changes a snapshot that was just kept makes; the same in any order.

    Called with the plan's first locks held. What a subscription or an invoice touches further
    down is read only once the lock above it is held, then locked in turn.
    """
    kind = snapshot.kind
    invoices, payments = list(plan.invoices), set(plan.payments)
    more_invoices: list[str] = []
    if kind == "subscription":
        more_invoices = await store.invoices_of_subscription(conn, snapshot.id)
        await db.lock(conn, sorted(set(more_invoices) - set(invoices)))
        invoices += more_invoices
    if invoices:
        found = set(await store.payment_keys_of_invoices(conn, invoices))
        await db.lock(conn, sorted(found - payments - set(invoices)))
        payments |= found

    match kind:
        case "refund":
            refund = derive_refund(snapshot)
            await store.put_refund(conn, refund)
            if refund.balance_transaction:  # its fee, for finance's reports
                await store.queue_balance_transaction(conn, refund.balance_transaction)
        case "dispute":
            await store.put_dispute(conn, derive_dispute(snapshot))
        case "subscription" | "discount":
            if plan.subscriptions:
                subscription, discounts = await store.load_subscription(
                    conn, plan.subscriptions[0])
                if subscription is not None:
                    await store.put_subscription(
                        conn, derive_subscription(subscription, discounts, offer)
                    )
            if kind == "discount":
                return
        case "customer":
            await store.put_customer(conn, derive_customer(snapshot))
            return
        case "payout":
            await store.put_payout(conn, derive_payout(snapshot))
            return

    # an invoice-keyed payment stands until its invoice payment is known, so both are due
    for key in sorted(payments | set(invoices)):
        cluster = await store.load_cluster(conn, key)
        await store.put_payment(conn, key, derive_payment(key, cluster))


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
            outcome = await ingest(pool, event, payload, offer)
        if outcome is Outcome.DUPLICATE:  # set aside for attention, now understood or not
            outcome = await _reapply_attention(pool, event, offer)
        counts[outcome.value] = counts.get(outcome.value, 0) + 1
    return counts


async def _reapply_attention(pool: asyncpg.Pool, event: Event, offer: FoundingOffer) -> Outcome:
    outcome, snapshot = classify(event)

    async def work(conn: asyncpg.Connection) -> Outcome:
        if await store.event_status(conn, event.id) != Outcome.NEEDS_ATTENTION:
            return Outcome.DUPLICATE
        if snapshot is not None:
            await apply_stored(conn, event.id, snapshot, offer)
        await store.finish_event(conn, event.id, outcome.value)
        return outcome

    return await db.transaction(pool, work)
