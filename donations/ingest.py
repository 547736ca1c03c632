"""Apply a verified Stripe event to the ledger exactly once: store it, keep its snapshot, derive.

Concurrency: a group of events (one, or the webhooks' group commit, or a reconciliation page)
runs in one READ COMMITTED transaction that first takes advisory locks on what it can change: the
subscriptions, then the invoices, then the payments (each sorted), always in that order so that
two transactions can never wait on each other in a cycle. Whoever derives
a payment holds that payment's lock and sees every snapshot committed before it, and every event
whose snapshot a payment's derivation reads derives that payment again while holding its lock, so
the last derivation always sees everything.
"""

from __future__ import annotations

import enum
import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import asyncpg
import structlog

from donations import db, store
from donations.events import HANDLED, Event, NotAnEvent, parse_event
from donations.ledger import (
    FoundingOffer,
    Snapshot,
    coupons_named,
    coupons_to_look_up,
    derive_customer,
    derive_dispute,
    derive_payment,
    derive_payout,
    derive_refund,
    derive_subscription,
    lacks_options,
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
    """What the ledger will do with the event, before touching the database. An event of a
    connected account (`account` set: an endpoint that also listens to Connect) is about
    another Stripe account's balance, never this publisher's money: stored and ignored."""
    if event.object_kind is None or event.account is not None:
        return Outcome.IGNORED, None
    snapshot = snapshot_of(event)
    if snapshot is None:
        return Outcome.NEEDS_ATTENTION, None
    return Outcome.PROCESSED, snapshot


Item = tuple[Event, str]  # a verified event and its body as received


async def ingest(
    pool: asyncpg.Pool, event: Event, raw: str, offer: FoundingOffer, *, source: str = "webhook"
) -> Outcome:
    """Store and apply one event in one transaction; safe to call any number of times, at once."""
    (outcome,) = await ingest_many(pool, [(event, raw)], offer, source=source)
    return outcome


async def ingest_many(
    pool: asyncpg.Pool, items: Sequence[Item], offer: FoundingOffer, *, source: str = "webhook"
) -> list[Outcome]:
    """Store and apply a group of events in one transaction (a group commit: a few round trips
    for the whole group instead of a dozen per event), with the same ledger as one at a time.

    If applying the group fails, it is rolled back and each event is tried on its own, so that
    only the one at fault is recorded as failed (in a transaction of its own, with its error)
    for Stripe's retry, or `events retry`, to apply later. An outage is raised to the caller.
    """
    items = [_keepable(item) for item in items]
    first: dict[str, int] = {}  # the same event twice in a group: the later copies are duplicates
    for i, (event, _) in enumerate(items):
        first.setdefault(event.id, i)
    unique = [items[i] for i in first.values()]

    async def work(conn: asyncpg.Connection) -> dict[str, Outcome]:
        return await _apply(conn, unique, offer, source)

    try:
        outcomes = await db.transaction(pool, work)
    except _OUTAGES:
        raise
    except Exception as exc:
        if len(unique) == 1:
            outcomes = {unique[0][0].id: await _record_failure(pool, *unique[0], source, exc)}
        else:
            log.warning("event_group_failed", events=len(unique), error=type(exc).__name__)
            outcomes = {}
            for item in unique:  # one at a time, to find the one at fault
                (outcomes[item[0].id],) = await ingest_many(pool, [item], offer, source=source)
    # A later copy of an event in the group is a duplicate of the first, unless the first
    # failed: then every copy is answered as failed, so that Stripe delivers it again.
    return [outcomes[event.id] if first[event.id] == i or outcomes[event.id] is Outcome.FAILED
            else Outcome.DUPLICATE for i, (event, _) in enumerate(items)]


# What PostgreSQL cannot keep in text or jsonb: U+0000, and half a surrogate pair. In JSON text
# either can only be an escape (`\\u0000`, `\\ud800`…; a surrogate escape found may also be
# half of a valid pair, which decodes to one character and is kept).
_UNKEEPABLE_ESCAPE = re.compile(r"\\u(?:0000|[dD][89a-fA-F][0-9a-fA-F]{2})")
_UNKEEPABLE = re.compile("[\x00\ud800-\udfff]")


def _keepable(item: Item) -> Item:
    """The event with every U+0000 and lone surrogate in its strings replaced by U+FFFD: an
    event holding one would otherwise fail on every retry. Its body is then stored re-encoded,
    the one case where it is not stored as received."""
    raw = item[1]
    if not _UNKEEPABLE_ESCAPE.search(raw):
        return item
    body = _replace_unkeepable(json.loads(raw))
    return parse_event(body), json.dumps(body, separators=(",", ":"))


def _replace_unkeepable(value: Any) -> Any:
    if isinstance(value, str):
        return _UNKEEPABLE.sub("\ufffd", value)
    if isinstance(value, dict):
        return {_replace_unkeepable(k): _replace_unkeepable(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_replace_unkeepable(v) for v in value]
    return value


async def _record_failure(
    pool: asyncpg.Pool, event: Event, raw: str, source: str, exc: Exception
) -> Outcome:
    with structlog.contextvars.bound_contextvars(event_id=event.id, event_type=event.type):
        log.exception("event_apply_failed", error=type(exc).__name__)
    error = f"{type(exc).__name__}: {exc}"

    async def record(conn: asyncpg.Connection) -> None:
        await store.record_failure(conn, event, raw, source, error)

    try:
        await db.transaction(pool, record)
    except _OUTAGES:
        raise
    except Exception:  # not even its failure can be kept: it is answered failed all the same
        with structlog.contextvars.bound_contextvars(event_id=event.id, event_type=event.type):
            log.exception("event_failure_not_recorded")
    return Outcome.FAILED


async def _apply(
    conn: asyncpg.Connection, items: Sequence[Item], offer: FoundingOffer, source: str
) -> dict[str, Outcome]:
    """The group's transaction: lock, store, keep the snapshots that win, derive, write."""
    classified = {event.id: classify(event) for event, _ in items}
    for event, _ in items:
        if classified[event.id][0] is Outcome.NEEDS_ATTENTION:
            log.warning("event_api_version_not_understood", event_id=event.id,
                        event_type=event.type, api_version=event.api_version)
    snapshots = [s for _, s in classified.values() if s is not None]

    plan = Plan.of(snapshots, offer)
    await plan.look(conn)  # before the locks, so that they are all taken at once, in order
    locks = plan.lock_order()
    # inserted in the order of their ids: two groups that share events never wait on each
    # other's half-inserted rows in a cycle
    rows = sorted(((event, raw, classified[event.id][0].value) for event, raw in items),
                  key=lambda row: row[0].id)
    stored, kept = await store.store_events(conn, locks, rows, snapshots, source)
    plan.locked.update(locks)
    outcomes = {event_id: classified[event_id][0] for event_id in stored}
    changed = [s for s in snapshots if kept.get(s.id) == s.version.event_id]

    # stored before: a duplicate, or one that failed (or waits for attention) applied now
    again = {event.id: (event, raw) for event, raw in items if event.id not in stored}
    if again:
        statuses = await store.event_statuses(conn, list(again))
        for event_id, (event, raw) in again.items():
            outcome, snapshot = classified[event_id]
            status = statuses.get(event_id)
            # a copy this code reads of an event set aside in a version it does not (listed by
            # reconciliation in the account's older default version, then redelivered by the
            # endpoint in the pinned one) replaces the stored copy and applies
            readable = status == Outcome.NEEDS_ATTENTION and outcome is Outcome.PROCESSED
            if status in FINAL and not readable:
                outcomes[event_id] = Outcome.DUPLICATE
                continue
            # (before the snapshot: it is taken from the stored body, the copy's when replaced)
            await store.finish_event(conn, event_id, outcome.value,
                                     (raw, event.api_version) if readable else None)
            if snapshot is not None and await store.put_snapshot(conn, snapshot, event_id):
                changed.append(snapshot)
            outcomes[event_id] = outcome

    await apply_snapshots(conn, changed, offer, plan)
    return outcomes


COUPON_LOCK = "coupon:"  # a coupon's lock key: its own namespace among the locks' keys


@dataclass(slots=True)
class Plan:
    """What a group of snapshots can change: the keys to lock, in order coupons, subscriptions,
    invoices, payments (each sorted), so that two transactions never wait on each other in a
    cycle.

    A coupon is locked by what reads its terms (the derivation of a subscription whose discount
    names it) and by what brings them (its event, or the coupon worker's look-up, which then
    derives the subscriptions that use it): whichever comes second sees the other's work. The
    founding coupon is never locked: its terms are the settings', and every founding subscriber
    would otherwise wait on one lock."""

    snapshots: list[Snapshot]
    subscriptions: set[str]
    invoices: set[str]
    payments: set[str]
    coupons: set[str]
    founding_coupon: str
    coupon_users: set[str] = field(default_factory=set)  # subscriptions the coupons reach
    locked: set[str] = field(default_factory=set)

    @classmethod
    def of(cls, snapshots: list[Snapshot], offer: FoundingOffer) -> Plan:
        links = [s.links for s in snapshots]
        coupons = {s.id for s in snapshots if s.kind == "coupon"}
        coupons |= {c for s in snapshots for c in coupons_named(s)}
        return cls(
            snapshots=snapshots,
            subscriptions={x.subscription_id for x in links if x.subscription_id},
            invoices={x.invoice_id for x in links if x.invoice_id},
            payments={x.payment_key for x in links if x.payment_key},
            coupons=coupons - {offer.coupon_id},
            founding_coupon=offer.coupon_id,
        )

    async def look(self, conn: asyncpg.Connection) -> None:
        """Add what the snapshots reach through the database: a subscription's invoices, an
        invoice's payments, the coupons a subscription's discounts name, the subscriptions
        whose discounts name a coupon whose snapshot is here."""
        invoices, payments, coupons, users = await store.discover(
            conn,
            sorted({s.id for s in self.snapshots if s.kind == "subscription"}),
            sorted({s.links.invoice_id for s in self.snapshots if s.links.invoice_id}),
            sorted(self.subscriptions),
            sorted({s.id for s in self.snapshots if s.kind == "coupon"}),
        )
        self.invoices |= invoices
        self.payments |= payments
        self.coupons |= coupons - {self.founding_coupon}
        self.coupon_users |= users
        self.subscriptions |= users

    def lock_order(self) -> list[str]:
        """Every key, in lock order (an invoice-keyed payment is locked as its invoice)."""
        return [*(COUPON_LOCK + c for c in sorted(self.coupons)), *sorted(self.subscriptions),
                *sorted(self.invoices), *sorted(self.payments - self.invoices)]


async def apply_snapshots(
    conn: asyncpg.Connection, changed: list[Snapshot], offer: FoundingOffer, held: Plan
) -> None:
    """The ledger changes that the snapshots just kept make; the same in any order.

    Called with the `held` plan's locks taken. What the snapshots reach is looked up again under
    those locks (what committed since the first look is seen now) and anything new is locked
    too; then every row they feed is derived again from all that it is made of.
    """
    latest = list({s.id: s for s in changed}.values())  # an object kept twice: the later won
    if not latest:
        return
    reach = Plan.of(latest, offer)
    await reach.look(conn)
    more = [k for k in reach.lock_order() if k not in held.locked]
    await db.lock(conn, more)
    held.locked.update(more)

    refunds = [derive_refund(s) for s in latest if s.kind == "refund"]
    await store.put_rows(conn, "refunds", refunds)
    await store.queue_balance_transactions(  # the refunds' fees, for finance's reports
        conn, sorted({bt for r in refunds
                      for bt in (r.balance_transaction, r.failure_balance_transaction) if bt}))
    await store.put_rows(conn, "disputes", [derive_dispute(s) for s in latest
                                            if s.kind == "dispute"])
    await store.put_rows(conn, "customers", [derive_customer(s) for s in latest
                                             if s.kind == "customer"])
    await store.put_rows(conn, "payouts", [derive_payout(s) for s in latest
                                           if s.kind == "payout"])
    # (a coupon's terms reach the subscriptions whose discounts name it)
    subscription_ids = sorted(reach.coupon_users | {s.links.subscription_id for s in latest
                                                    if s.kind in ("subscription", "discount")
                                                    and s.links.subscription_id})
    if subscription_ids:
        found = [(own, discounts) for own, discounts
                 in (await store.load_subscriptions(conn, subscription_ids)).values()
                 if own is not None]
        needs = [(own, coupons_to_look_up(own, discounts, offer)) for own, discounts in found]
        wanted = sorted({c for _, named in needs for c in named})
        # a discount committed since the look names a coupon not locked yet: locked now
        late = [COUPON_LOCK + c for c in wanted if COUPON_LOCK + c not in held.locked]
        await db.lock(conn, late)
        held.locked.update(late)
        terms = await store.load_coupons(conn, wanted)
        # not known, or known from an event (without its options) while a subscription in
        # another currency uses it: asked of Stripe
        await store.queue_coupon_lookups(conn, sorted(
            {c for own, named in needs for c in named
             if c not in terms or lacks_options(terms[c], own.get("currency"))}))
        await store.put_rows(conn, "subscriptions", [
            derive_subscription(own, discounts, offer, terms) for own, discounts in found
        ])
    # an invoice-keyed payment stands until its invoice payment is known, so both are due
    keys = sorted(reach.payments | reach.invoices)
    if keys:
        clusters = await store.load_clusters(conn, keys, latest)
        await store.put_payments(conn, {k: derive_payment(k, clusters[k]) for k in keys})


async def apply_stored(
    conn: asyncpg.Connection, event_id: str, snapshot: Snapshot, offer: FoundingOffer
) -> bool:
    """Apply an event stored earlier (a retry of one that failed, or set aside for attention,
    or offered again); True when its snapshot was kept."""
    plan = Plan.of([snapshot], offer)
    await plan.look(conn)
    locks = plan.lock_order()
    await db.lock(conn, locks)
    plan.locked.update(locks)
    if not await store.put_snapshot(conn, snapshot, event_id):
        return False
    await apply_snapshots(conn, [snapshot], offer, plan)
    return True


PAGE = 500  # stored events read at a time by `events retry` and `events reapply`


async def retry_unfinished(
    pool: asyncpg.Pool, offer: FoundingOffer, statuses: Iterable[str] = ("failed", "pending"),
    page: int = PAGE, sources: Sequence[str] | None = None,
) -> dict[str, int]:
    """Apply again the stored events that did not apply (the `events retry` command; an import
    run, its own): every one, oldest first, a page at a time (those that fail again are
    passed, not read again)."""
    counts: dict[str, int] = {}
    after: tuple[datetime, str] | None = None
    while True:
        async with db.connection(pool) as conn:
            todo = await store.unfinished_events(conn, list(statuses), after, page, sources)
        if not todo:
            return counts
        after = (todo[-1][1], todo[-1][0])
        await _retry_page(pool, offer, [(event_id, payload) for event_id, _, payload in todo],
                          counts)


async def _retry_page(
    pool: asyncpg.Pool, offer: FoundingOffer, todo: list[tuple[str, str]],
    counts: dict[str, int],
) -> None:
    for event_id, payload in todo:
        try:
            event = parse_event(json.loads(payload))
        except NotAnEvent as exc:
            # stored before the envelope was checked this closely: it can never apply
            await _set_aside_unreadable(pool, event_id, str(exc))
            counts["unreadable"] = counts.get("unreadable", 0) + 1
            continue
        with structlog.contextvars.bound_contextvars(event_id=event_id, event_type=event.type):
            outcome = await ingest(pool, event, payload, offer)
        if outcome is Outcome.DUPLICATE:  # set aside for attention, now understood or not
            outcome = await _reapply_attention(pool, event, offer)
        counts[outcome.value] = counts.get(outcome.value, 0) + 1


async def _set_aside_unreadable(pool: asyncpg.Pool, event_id: str, problem: str) -> None:
    log.warning("stored_event_unreadable", event_id=event_id, problem=problem)

    async def work(conn: asyncpg.Connection) -> None:
        await conn.execute(
            "UPDATE stripe_events SET status = 'ignored', processed_at = now(), last_error = $2"
            " WHERE id = $1",
            event_id, f"not an event the service can read: {problem}"[:2000],
        )

    await db.transaction(pool, work)


async def reapply(
    pool: asyncpg.Pool, offer: FoundingOffer, type_pattern: str, page: int = PAGE
) -> tuple[int, int]:
    """Offer the applied events whose type matches `type_pattern` (SQL LIKE) again, oldest
    first: a snapshot that now outranks the one kept (after a change to the ranking) replaces it.
    Then every object they are about has its ledger rows derived again from the snapshot it
    keeps (after a change to a derivation). Returns (objects that took a snapshot they did not
    have, objects derived again). For the `events reapply` command.

    The events are read a page at a time (a release that changes how charges rank has every
    charge event offered again: millions of them); only the ids of the objects they are about
    are kept to the end."""
    async with db.connection(pool) as conn:
        # only the types the ledger applies have snapshots to offer again
        types = await store.matching_types(conn, HANDLED, type_pattern)
    changed: set[str] = set()
    objects: dict[str, None] = {}  # in the order first met
    after: tuple[datetime, str] | None = None
    while types:
        async with db.connection(pool) as conn:
            rows = await store.applied_events(conn, types, after, page)
        if not rows:
            break
        after = (rows[-1][1], rows[-1][0])
        for event_id, _, payload in rows:
            try:
                _, snapshot = classify(parse_event(json.loads(payload)))
            except NotAnEvent:
                continue  # (applied once, so readable then; nothing to offer again)
            if snapshot is None:
                continue
            objects[snapshot.id] = None

            async def work(conn: asyncpg.Connection, snapshot: Snapshot = snapshot,
                           event_id: str = event_id) -> bool:
                return await apply_stored(conn, event_id, snapshot, offer)

            if await db.transaction(pool, work):
                changed.add(snapshot.id)
    derived = 0
    for object_id in objects:

        async def derive(conn: asyncpg.Connection, object_id: str = object_id) -> bool:
            kept = await store.load_snapshot(conn, object_id)
            if kept is None:
                return False
            plan = Plan.of([kept], offer)
            await plan.look(conn)
            locks = plan.lock_order()
            await db.lock(conn, locks)
            plan.locked.update(locks)
            await apply_snapshots(conn, [kept], offer, plan)
            return True

        derived += await db.transaction(pool, derive)
    return len(changed), derived


async def _reapply_attention(pool: asyncpg.Pool, event: Event, offer: FoundingOffer) -> Outcome:
    outcome, snapshot = classify(event)

    async def work(conn: asyncpg.Connection) -> Outcome:
        if (await store.event_statuses(conn, [event.id])).get(event.id) != Outcome.NEEDS_ATTENTION:
            return Outcome.DUPLICATE
        if snapshot is not None:
            await apply_stored(conn, event.id, snapshot, offer)
        await store.finish_event(conn, event.id, outcome.value)
        return outcome

    return await db.transaction(pool, work)
