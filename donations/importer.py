"""`donations import --since`: history older than Stripe's 30 days of events, from its objects.

Stripe lists events for 30 days only; a publisher moving an existing account onto the service has
years of charges, subscriptions and refunds. Those are listed (newest first, through the stripe
library) and each object is stored as a synthetic event, `evt_import_<object id>_<content>`
(`<content>`: 16 hex digits of the SHA-256 of the object's canonical JSON), applied by `ingest`
like any other, with source `import`. The discounts a subscription is listed with (expanded) are
stored too, each as the `customer.discount.updated` its creation would have been, since the
subscription's later events name them by id only. Then what the charges and invoice payments
listed refer to is fetched whenever it was made (REFERENCES), so that a payment made after --since
is tied to the invoice and subscription it paid even when they are older.

Why a synthetic event and not a snapshot written directly: the event store keeps what the ledger
was derived from, and `events retry` and every other tool work on it unchanged. The id follows the
object's content: importing an object again as it was is a duplicate event, while an object that
changed since it was imported (an import over a later gap) is a new one. An object whose kept
snapshot is already what Stripe lists is not stored again at all (so an object imported by an
earlier release, as `evt_import_<object id>`, is not stored twice); one that went back to a
state imported before (A, then B by a real event, then A again) gets an id salted with the time it
was listed, since the A stored before no longer wins.

How its snapshot ranks (events.snapshot_version: stage, progress, created, type, id): the stage
and progress are the object's own, so a later state is never lost; `created` is the second before
Stripe answered the page that listed it (by Stripe's clock: the answer's Date header), since the
object as listed is what Stripe says now. So among snapshots at the same stage and progress, the
imported one outranks every real event stamped before it was listed (whose changes it already
holds: an import covering a gap in the events brings in what changed in it) and every real event
stamped after outranks it, whatever order they arrive in. An import run again over objects that
did not change stores nothing new and changes nothing.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
import time
from dataclasses import dataclass
from typing import Any, TextIO

import asyncpg
import stripe
import structlog

from donations import db
from donations.events import PINNED_API_VERSION
from donations.ingest import FINAL, Outcome, retry_unfinished
from donations.ledger import FoundingOffer
from donations.reconcile import call_stripe, dated_pages, store_missing, stripe_time

log = structlog.get_logger(__name__)

PAGE_SIZE = 100


@dataclass(frozen=True, slots=True)
class Resource:
    """A Stripe list to import, and the event type its objects are wrapped as."""

    name: str
    event_type: str  # one the ledger handles for this object (events.HANDLED)
    path: str  # of its list in Stripe's API
    params: tuple[tuple[str, Any], ...] = ()
    # listed whatever their creation date: objects that keep changing long after they are made
    # (a subscription started before --since still renews, is cancelled; a dispute is decided,
    # a refund fails, a payout is paid), so that what changed since is brought in too; and the
    # customers those name (a supporter since before --since)
    every: bool = False
    # the discounts (expanded) of the subscriptions listed are stored as snapshots of their own
    discounts: bool = False
    # listed from this many seconds before --since: a Checkout session made up to a day before
    # it (its longest life) can be paid after it
    lead: int = 0


SESSION_LIFE = 24 * 3600  # the longest a Checkout session stays open (Stripe's expires_at)

# Customers first, then payments, then what refers to them; the ledger does not depend on the
# order, but a partial import is easier to read this way.
RESOURCES: tuple[Resource, ...] = (
    # Every customer, whenever made: a supporter since before --since has a subscription (listed
    # whatever its age) and payments after --since, and is found by e-mail (the portal) and
    # named in the reports through the customer. Listing them all costs one request per 100
    # customers; fetching those the imported rows name would cost one per supporter older
    # than --since, far more on an account with many.
    Resource("customers", "customer.updated", "/v1/customers", every=True),
    Resource("checkout_sessions", "checkout.session.completed", "/v1/checkout/sessions",
             lead=SESSION_LIFE),
    Resource("payment_intents", "payment_intent.succeeded", "/v1/payment_intents"),
    Resource("charges", "charge.updated", "/v1/charges"),
    # canceled ones are left out unless asked for; discounts (the subscription's and its
    # items') expanded to tell founding supporters and which coupons to look up
    Resource("subscriptions", "customer.subscription.updated", "/v1/subscriptions",
             (("status", "all"), ("expand", ["data.discounts", "data.items.data.discounts"])),
             every=True, discounts=True),
    Resource("invoices", "invoice.finalized", "/v1/invoices"),
    Resource("invoice_payments", "invoice_payment.paid", "/v1/invoice_payments"),
    Resource("refunds", "refund.updated", "/v1/refunds", every=True),
    Resource("disputes", "charge.dispute.updated", "/v1/disputes", every=True),
    Resource("payouts", "payout.updated", "/v1/payouts", every=True),
)

# After the listings, what a listed charge or invoice payment refers to that --since left out:
# a renewal invoiced (and its payment intent and invoice payment made) before --since and paid
# after it (Smart Retries, a bank debit) would otherwise be a one-off with no subscription.
REFERENCES = "references"

LOCK_KEY = 0x696D706F7274696E  # "importin": one import at a time across replicas


class AlreadyImporting(Exception):
    """Another import holds the lock."""


# What an object id may be to go into an event id as it is (events.py: `evt_[A-Za-z0-9_]{1,250}`,
# with room for the rest); Stripe's ids all are, anything else goes in hashed.
_PLAIN_ID = re.compile(r"[A-Za-z0-9_]{1,200}")


def synthetic_id(obj: dict[str, Any], salt: str = "") -> str:
    """`evt_import_<object id>_<16 hex digits of the SHA-256 of its canonical JSON>`: the same
    for the same content, another once the object changed (see the module docstring)."""
    canonical = json.dumps(obj, sort_keys=True, separators=(",", ":"))
    content = hashlib.sha256((canonical + salt).encode()).hexdigest()[:16]
    own = str(obj["id"])
    if not _PLAIN_ID.fullmatch(own):
        own = hashlib.sha256(own.encode()).hexdigest()[:40]
    return f"evt_import_{own}_{content}"


def synthetic_event(obj: dict[str, Any], event_type: str, listed_at: int, salt: str = ""
                    ) -> dict[str, Any]:
    """An event-shaped envelope for an object Stripe listed at `listed_at` (its clock; see the
    module docstring)."""
    return {
        "id": synthetic_id(obj, salt),
        "object": "event",
        "api_version": PINNED_API_VERSION,  # the client is pinned: objects come in this shape
        "created": max(0, listed_at - 1),
        "data": {"object": obj},
        "livemode": bool(obj.get("livemode")),
        "pending_webhooks": 0,
        "request": {"id": None, "idempotency_key": None},
        "type": event_type,
    }


@dataclass
class Progress:
    """A line per resource on a terminal: a bar of the time span covered so far; for a list read
    whatever its age (no start to measure against), the creation date reached and the count."""

    out: TextIO | None
    width: int = 30

    def show(self, resource: str, since: int, until: int, reached: int, imported: int,
             done: bool = False, every: bool = False) -> None:
        if self.out is None:
            return
        if every and not done:
            day = time.strftime("%Y-%m-%d", time.gmtime(max(0, reached)))
            shown = f"[{'back to ' + day:<{self.width}}]     "  # as wide as the bar and its %
        else:
            span = max(1, until - since)
            share = 1.0 if done else min(1.0, max(0.0, (until - reached) / span))
            filled = int(share * self.width)
            shown = f"[{'#' * filled + '.' * (self.width - filled)}] {share:4.0%}"
        end = "\n" if done else ""
        self.out.write(f"\r{resource:<18} {shown} {imported:>9,} imported{end}")
        self.out.flush()


@dataclass
class ImportResult:
    imported: dict[str, int]
    applied: int = 0
    failed: int = 0
    skipped: tuple[str, ...] = ()  # finished by an earlier import with the same --since


async def run(
    pool: asyncpg.Pool,
    client: stripe.StripeClient,
    offer: FoundingOffer,
    since: int,
    *,
    progress: TextIO | None = None,
    now: int | None = None,
    resources: tuple[Resource, ...] = RESOURCES,
    page_size: int = PAGE_SIZE,
) -> ImportResult:
    """Import every object created since `since` (and every subscription, refund, dispute and
    payout, whenever made); resumes where an interrupted import stopped. One at a time: raises
    AlreadyImporting while another holds the lock (two would reset each other's progress)."""
    async with db.connection(pool) as lock:
        if not await lock.fetchval("SELECT pg_try_advisory_lock($1)", LOCK_KEY):
            raise AlreadyImporting("another import is running")
        try:
            return await _locked_run(pool, client, offer, since, progress, now, resources,
                                     page_size)
        finally:
            with contextlib.suppress(*db.UNAVAILABLE_ERRORS, asyncpg.InterfaceError):
                await lock.execute("SELECT pg_advisory_unlock($1)", LOCK_KEY)


async def _locked_run(
    pool: asyncpg.Pool, client: stripe.StripeClient, offer: FoundingOffer, since: int,
    progress: TextIO | None, now: int | None, resources: tuple[Resource, ...], page_size: int,
) -> ImportResult:
    until_default = int(time.time()) if now is None else now
    bar = Progress(progress if progress is not None and progress.isatty() else None)
    result = ImportResult(imported={})
    skipped: list[str] = []
    until = max(since, until_default)
    # What an earlier run could not apply (its listing went on past it) is applied again
    # first, so that running the import again resumes it; what fails again counts as failed.
    retried = await retry_unfinished(pool, offer, ("failed",), sources=("import",))
    result.applied += retried.get(Outcome.PROCESSED.value, 0)
    result.failed += retried.get(Outcome.FAILED.value, 0)
    for resource in resources:
        row = await _progress(pool, resource.name, since, until)
        if row["finished_at"] is not None:
            skipped.append(resource.name)
            result.imported[resource.name] = row["imported"]
            continue
        await _import_one(pool, client, offer, resource, row, bar, result, page_size)
    row = await _progress(pool, REFERENCES, since, until)
    if row["finished_at"] is not None:
        skipped.append(REFERENCES)
        result.imported[REFERENCES] = row["imported"]
    else:
        await _import_references(pool, client, offer, since, until, result)
    result.skipped = tuple(skipped)
    if resources == RESOURCES and result.failed == 0:
        async with db.connection(pool) as conn:
            # A gap reconciliation found in the events (older than Stripe keeps) is covered by
            # an import of every kind of object from at or before its start, listed up to at or
            # after its end (the `until` each listing was made with) without a failure.
            covered = await conn.fetchrow(
                """
                SELECT count(*) AS kinds, min(until) AS until,
                       bool_and(finished_at IS NOT NULL) AS finished
                  FROM import_progress WHERE since = $1 AND resource = any($2::text[])
                """,
                since, [r.name for r in RESOURCES] + [REFERENCES],
            )
            if covered is not None and covered["kinds"] == len(RESOURCES) + 1 \
                    and covered["finished"]:
                await conn.execute(
                    """
                    UPDATE reconciliation_checkpoint
                       SET gap_from = NULL, gap_to = NULL, updated_at = now()
                     WHERE gap_from >= $1 AND gap_to <= $2
                    """,
                    since, covered["until"],
                )
    return result


async def _import_one(
    pool: asyncpg.Pool, client: stripe.StripeClient, offer: FoundingOffer, resource: Resource,
    row: asyncpg.Record, bar: Progress, result: ImportResult, page_size: int,
) -> None:
    since, until, imported = row["since"], row["until"], row["imported"]
    created = {"lte": until} if resource.every else {"gte": since - resource.lead, "lte": until}
    params: Any = {"created": created, "limit": page_size, **dict(resource.params)}
    if row["cursor"] is not None:
        params["starting_after"] = row["cursor"]
    reached = until
    bar.show(resource.name, since, until, reached, imported, every=resource.every)
    while True:
        try:
            async for page in dated_pages(client, resource.path, params,
                                          f"{resource.name}.list"):
                items = page.items
                if not items:
                    continue
                # (without a Date from Stripe, the local time the listing was started at)
                listed_at = page.listed_at if page.listed_at is not None else until
                listed = [(obj, resource.event_type, listed_at) for obj in items]
                if resource.discounts:
                    listed += [(d, DISCOUNT_EVENT, listed_at) for d in _discounts(items)]
                await _store(pool, offer, listed, result)
                imported += len(items)
                reached = min(reached, *(int(o.get("created") or until) for o in items))
                if not resource.every:
                    reached = max(since, reached)
                async with db.connection(pool) as conn:
                    # after the page is stored: an interrupted import resumes from the next one
                    await conn.execute(
                        "UPDATE import_progress SET cursor = $2, imported = $3"
                        " WHERE resource = $1",
                        resource.name, items[-1]["id"], imported,
                    )
                bar.show(resource.name, since, until, reached, imported, every=resource.every)
            break
        except stripe.InvalidRequestError as exc:
            if "starting_after" not in params or exc.param != "starting_after":
                raise
            # the object the saved cursor names is gone at Stripe (deleted): the listing
            # starts over (what is stored stays; storing it again changes nothing)
            log.warning("import_cursor_gone", resource=resource.name,
                        cursor=params["starting_after"])
            del params["starting_after"]
            imported, reached = 0, until  # counted again from the top
    async with db.connection(pool) as conn:
        await conn.execute(
            "UPDATE import_progress SET finished_at = now() WHERE resource = $1", resource.name
        )
    bar.show(resource.name, since, until, since, imported, done=True)
    result.imported[resource.name] = imported
    log.info("import_finished", resource=resource.name, imported=imported)


# A discount the import finds expanded on a subscription is stored as the event that made it
# would have stored it (customer.discount.created; `.updated` ranks it as the import's other
# snapshots): the subscription's next event names it by id only, and the ledger then finds its
# coupon (a founding seat, the price after it) in the discount's own snapshot.
DISCOUNT_EVENT = "customer.discount.updated"


def _discounts(subscriptions: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The discounts the subscriptions and their items list expanded, each once."""
    found: dict[str, dict[str, Any]] = {}
    for sub in subscriptions:
        listed = list(sub.get("discounts") or [])
        items = sub.get("items")
        for item in (items.get("data") or []) if isinstance(items, dict) else []:
            if isinstance(item, dict):
                listed += item.get("discounts") or []
        for discount in listed:
            if isinstance(discount, dict) and isinstance(discount.get("id"), str) \
                    and discount["id"]:
                found.setdefault(discount["id"], discount)
    return list(found.values())


async def _store(pool: asyncpg.Pool, offer: FoundingOffer,
                 listed: list[tuple[dict[str, Any], str, int]], result: ImportResult) -> None:
    """Store and apply the synthetic events of the objects listed (object, event type, when
    Stripe listed it) that can change something: not one whose kept snapshot is already the
    object as listed (whichever event brought it); one stored before as it is now but outranked
    since (it went back to a state imported before) under an id salted with `listed_at`."""
    if not listed:
        return
    events = [synthetic_event(obj, kind, at) for obj, kind, at in listed]
    async with db.connection(pool) as conn:
        rows = await conn.fetch(
            """
            SELECT l.n, o.data = l.data::jsonb AS kept, e.status = any($4::text[]) AS done
              FROM unnest($1::text[], $2::text[], $3::text[]) WITH ORDINALITY
                   AS l(id, data, event, n)
              LEFT JOIN stripe_objects o ON o.id = l.id
              LEFT JOIN stripe_events e ON e.id = l.event
            """,
            [str(obj["id"]) for obj, _, _ in listed],
            [json.dumps(obj) for obj, _, _ in listed],
            [e["id"] for e in events], [o.value for o in FINAL],
        )
    todo: dict[str, dict[str, Any]] = {}
    for row in rows:
        n = row["n"] - 1
        obj, kind, at = listed[n]
        if row["kept"]:
            continue  # the ledger has it as it is
        event = events[n]
        if row["done"]:
            if row["kept"] is None:
                continue  # applied before, with nothing kept of it (ignored): as before
            event = synthetic_event(obj, kind, at, salt=f"@{at}")
        todo.setdefault(event["id"], event)
    if todo:
        stored = await store_missing(pool, offer, list(todo.values()), "import")
        result.applied += stored.applied
        result.failed += stored.failed


async def _progress(pool: asyncpg.Pool, name: str, since: int, until: int) -> asyncpg.Record:
    """The progress row of one step of the import, started over under a new --since (what is
    stored stays: storing it again changes nothing)."""
    async with db.connection(pool) as conn:
        row = await conn.fetchrow("SELECT * FROM import_progress WHERE resource = $1", name)
        if row is None or row["since"] != since:
            row = await conn.fetchrow(
                """
                INSERT INTO import_progress (resource, since, until) VALUES ($1, $2, $3)
                ON CONFLICT (resource) DO UPDATE
                   SET since = excluded.since, until = excluded.until, cursor = NULL,
                       imported = 0, finished_at = NULL
                RETURNING *
                """,
                name, since, until,
            )
    assert row is not None
    return row


# The payment intents of the charges and invoice payments made since --since, and of the
# Checkout sessions, refunds and disputes stored, that are not stored (made before it, or paid by
# a bank debit that settled after a gap began; a refund or dispute of an older payment, as the
# window's charge.refunded or charge.dispute.* would have brought it).
_MISSING_INTENTS = """
SELECT DISTINCT r.id FROM (
       SELECT data ->> 'payment_intent' AS id FROM stripe_objects
        WHERE object = 'charge' AND (data ->> 'created')::bigint >= $1
       UNION ALL
       SELECT data -> 'payment' ->> 'payment_intent' FROM stripe_objects
        WHERE object = 'invoice_payment' AND (data ->> 'created')::bigint >= $1
       UNION ALL
       SELECT data ->> 'payment_intent' FROM stripe_objects
        WHERE object IN ('checkout.session', 'refund', 'dispute')
          AND jsonb_typeof(data -> 'payment_intent') = 'string'
       ) AS r
 WHERE r.id IS NOT NULL
   AND NOT EXISTS (SELECT 1 FROM stripe_objects o WHERE o.id = r.id)
 ORDER BY r.id
"""

# The latest charges of stored payment intents, and the charges of stored refunds and disputes,
# that are not stored (a payment intent brought in above, made before --since; a charge of
# before payment intents).
_MISSING_CHARGES = """
SELECT DISTINCT r.id FROM (
       SELECT data ->> 'latest_charge' AS id FROM stripe_objects
        WHERE object = 'payment_intent' AND jsonb_typeof(data -> 'latest_charge') = 'string'
       UNION ALL
       SELECT data ->> 'charge' FROM stripe_objects
        WHERE object IN ('refund', 'dispute') AND jsonb_typeof(data -> 'charge') = 'string'
       ) AS r
 WHERE NOT EXISTS (SELECT 1 FROM stripe_objects o WHERE o.id = r.id)
 ORDER BY 1
"""

# Payment intents made before --since and charged after it, with no invoice payment nor checkout
# session stored: whether an invoice was paid through them is asked of Stripe.
_INTENTS_TO_PLACE = """
SELECT DISTINCT p.id FROM stripe_objects c
  JOIN stripe_objects p ON p.id = c.data ->> 'payment_intent' AND p.object = 'payment_intent'
 WHERE c.object = 'charge' AND (c.data ->> 'created')::bigint >= $1
   AND (p.data ->> 'created')::bigint < $1
   AND NOT EXISTS (SELECT 1 FROM stripe_objects l
                    WHERE l.payment_key = p.id
                      AND l.object IN ('invoice_payment', 'checkout.session'))
 ORDER BY p.id
"""

# Objects stored from before --since (their events read before a gap, say) that were still in
# flight: a bank debit pending, an authorisation not captured, a payment intent processing, a
# Checkout payment by bank debit not yet paid, an invoice open or draft. What became of them
# may lie in the span the import covers, which no listing by creation date reaches: each is
# asked for again.
_UNFINISHED = """
SELECT object, id FROM stripe_objects
 WHERE (data ->> 'created')::bigint < $1
   AND ((object = 'charge' AND (data ->> 'status' = 'pending'
                                OR (data ->> 'status' = 'succeeded'
                                    AND data ->> 'captured' = 'false')))
        OR (object = 'payment_intent'
            AND data ->> 'status' IN ('processing', 'requires_capture'))
        OR (object = 'checkout.session'
            AND (data ->> 'status' = 'open'
                 OR (data ->> 'status' = 'complete' AND data ->> 'payment_status' = 'unpaid')))
        OR (object = 'invoice' AND data ->> 'status' IN ('draft', 'open')))
 ORDER BY object, id
"""
# Per kind of object asked for again: the path to retrieve it, the operation (for the logs),
# and the event type it is stored as.
_RETRIEVE = {
    "charge": ("/v1/charges", "charges.retrieve", "charge.updated"),
    "payment_intent": ("/v1/payment_intents", "payment_intents.retrieve",
                       "payment_intent.succeeded"),
    "checkout.session": ("/v1/checkout/sessions", "checkout.sessions.retrieve",
                         "checkout.session.completed"),
    "invoice": ("/v1/invoices", "invoices.retrieve", "invoice.finalized"),
}

# The invoices of stored invoice payments that are not stored.
_MISSING_INVOICES = """
SELECT DISTINCT data ->> 'invoice' AS id FROM stripe_objects i
 WHERE object = 'invoice_payment' AND data ->> 'invoice' IS NOT NULL
   AND NOT EXISTS (SELECT 1 FROM stripe_objects o WHERE o.id = i.data ->> 'invoice')
 ORDER BY 1
"""


async def _import_references(
    pool: asyncpg.Pool, client: stripe.StripeClient, offer: FoundingOffer, since: int,
    until: int, result: ImportResult,
) -> None:
    """Bring in, whenever they were made, the payment intents, invoice payments and invoices
    that the charges and invoice payments listed since --since refer to (see REFERENCES), and
    what became of the objects stored from before --since that were still in flight
    (_UNFINISHED). Driven by what is stored, so an interrupted import does it all again on
    resuming."""
    imported = 0

    async def store(objs: list[tuple[dict[str, Any], int]], event_type: str) -> None:
        nonlocal imported
        await _store(pool, offer, [(obj, event_type, at) for obj, at in objs], result)
        imported += len(objs)

    async def ids(query: str, *args: Any) -> list[str]:
        async with db.connection(pool) as conn:
            return [r["id"] for r in await conn.fetch(query, *args)]

    async with db.connection(pool) as conn:
        in_flight = [(r["object"], r["id"]) for r in await conn.fetch(_UNFINISHED, since)]
    for kind, (path, what, event_type) in _RETRIEVE.items():
        found = [await _retrieve(client, f"{path}/{i}", what, until)
                 for k, i in in_flight if k == kind]
        await store([o for o in found if o is not None], event_type)
    intents = [await _retrieve(client, f"/v1/payment_intents/{i}", "payment_intents.retrieve",
                               until) for i in await ids(_MISSING_INTENTS, since)]
    await store([o for o in intents if o is not None], "payment_intent.succeeded")
    charges = [await _retrieve(client, f"/v1/charges/{i}", "charges.retrieve", until)
               for i in await ids(_MISSING_CHARGES)]
    await store([o for o in charges if o is not None], "charge.updated")
    payments: list[tuple[dict[str, Any], int]] = []
    for intent in await ids(_INTENTS_TO_PLACE, since):
        params: Any = {"payment": {"type": "payment_intent", "payment_intent": intent},
                       "limit": PAGE_SIZE}
        async for page in dated_pages(client, "/v1/invoice_payments", params,
                                      "invoice_payments.list"):
            at = page.listed_at if page.listed_at is not None else until
            payments += [(obj, at) for obj in page.items]
    await store(payments, "invoice_payment.paid")
    invoices = [await _retrieve(client, f"/v1/invoices/{i}", "invoices.retrieve", until)
                for i in await ids(_MISSING_INVOICES)]
    await store([o for o in invoices if o is not None], "invoice.finalized")
    async with db.connection(pool) as conn:
        await conn.execute(
            "UPDATE import_progress SET imported = $2, finished_at = now() WHERE resource = $1",
            REFERENCES, imported,
        )
    result.imported[REFERENCES] = imported
    log.info("import_finished", resource=REFERENCES, imported=imported)


async def _retrieve(client: stripe.StripeClient, path: str, what: str, until: int
                    ) -> tuple[dict[str, Any], int] | None:
    """One object and when Stripe answered (else `until`); None when Stripe has it no more."""
    try:
        response = await call_stripe(lambda: client.raw_request_async("get", path), what)
    except stripe.InvalidRequestError as exc:
        if exc.code != "resource_missing":
            raise
        log.warning("import_reference_gone", path=path)
        return None
    obj = response.data if isinstance(response.data, dict) else None
    if obj is None or not obj.get("id"):
        return None
    at = stripe_time(response.headers)
    return obj, at if at is not None else until
