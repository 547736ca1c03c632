"""The coupon worker: the terms of the coupons that subscriptions' discounts name by id only.

The monthly recurring counts each subscription at its price after its discounts, and a webhook
names a discount's coupon by id only. A coupon's own events (`coupon.created` …) bring its terms
and derive the subscriptions that use it again (under the coupon's lock: see ingest.Plan); when a
subscription's derivation needs a coupon none of them has brought, it queues a look-up
(`coupon_lookups`, in the derivation's transaction) and counts the subscription at its full
price meanwhile. This worker takes the look-ups that are due:

- a coupon known by now (its event came since, or another replica fetched it): the subscriptions
  that use it are derived again, and the look-up ends;
- else, with a Stripe key, the coupon is fetched and applied as the importer applies what it
  lists (a synthetic event, `evt_import_coupon_<hash of its id>`), which does the same; a
  failure is retried with the balance-transaction worker's backoff, and a coupon Stripe keeps
  saying does not exist (deleted before we asked) is set aside (`donations lookups list|retry`);
- else it waits, pushed back, for the coupon's event.

A coupon's terms never change once it is created, so whichever snapshot of it is kept gives them.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import time

import asyncpg
import stripe
import structlog

from donations import db, fees, ingest, store
from donations.events import parse_event
from donations.importer import synthetic_event
from donations.ledger import FoundingOffer, lacks_options
from donations.stripe_api import plain

log = structlog.get_logger(__name__)

QUEUE, KEY = "coupon_lookups", "coupon_id"
# Without a Stripe key a look-up can only end when the coupon's event comes, which ends it by
# itself: the worker looks again this often, not at the backoff's pace.
WITHOUT_KEY_SECONDS = 3600
_END = "DELETE FROM coupon_lookups WHERE coupon_id = $1"


def event_id(coupon_id: str, looked_up_at: int) -> str:
    """The synthetic event's id: a coupon's id is the account's own choice (`founding-supporter`),
    not always made of the characters an event id may hold. One per look-up (its time): a
    coupon looked up again (a later `coupon.updated`, which leaves its options out, outranked
    the one fetched) must be stored again, not taken for the earlier look-up's event."""
    return (f"evt_import_coupon_{hashlib.sha256(coupon_id.encode()).hexdigest()[:40]}"
            f"_{looked_up_at}")


async def derive_users(pool: asyncpg.Pool, coupon_id: str, offer: FoundingOffer) -> bool:
    """If the coupon's terms are known, derive the subscriptions that use it again and end its
    look-up (one transaction); False when they are not known."""

    async def work(conn: asyncpg.Connection) -> bool:
        if coupon_id != offer.coupon_id:  # (the founding coupon's terms are the settings')
            # the coupon's lock first (first in the lock order), as a webhook bringing it or a
            # discount naming it holds it: whatever such a one committed is seen below, and
            # whatever it asks for after waits for this
            lock = ingest.COUPON_LOCK + coupon_id
            await db.lock(conn, [lock])
            snapshot = await store.load_snapshot(conn, coupon_id)
            if snapshot is None or snapshot.kind != "coupon":
                return False
            if lacks_options(snapshot.data) and await conn.fetchval(
                    "SELECT EXISTS (SELECT 1 FROM subscriptions"
                    " WHERE coupons && $1::text[] AND currency <> $2)",
                    [coupon_id], snapshot.data.get("currency")):
                return False  # its amount in another currency comes only when asked for
            held = ingest.Plan.of([], offer)
            held.locked.add(lock)
            await ingest.apply_snapshots(conn, [snapshot], offer, held)
        await conn.execute(_END, coupon_id)
        return True

    return await db.transaction(pool, work)


async def run_once(
    pool: asyncpg.Pool, client: stripe.StripeClient | None, offer: FoundingOffer, batch: int = 25
) -> int:
    """Take the look-ups that are due; returns how many ended."""
    async with db.connection(pool) as conn:
        claimed = await fees.claim(conn, batch, QUEUE, KEY)
    ended = 0
    left = dict(claimed)  # claimed (with its attempt count) and not yet ended or postponed
    try:
        for coupon_id, attempts in claimed:
            if await derive_users(pool, coupon_id, offer):
                del left[coupon_id]
                ended += 1
                continue
            if client is None:
                async with db.connection(pool) as conn:
                    await conn.execute(
                        "UPDATE coupon_lookups SET attempts = 0, next_attempt_at = now()"
                        " + make_interval(secs => $2) WHERE coupon_id = $1",
                        coupon_id, WITHOUT_KEY_SECONDS)
                del left[coupon_id]
                continue
            if not await fees.still_leased(pool, QUEUE, KEY, coupon_id, attempts):
                del left[coupon_id]
                continue
            try:
                # its amounts in other currencies are included only when asked for
                coupon = plain(await client.v1.coupons.retrieve_async(
                    coupon_id, params={"expand": ["currency_options"]}))
            except stripe.StripeError as exc:
                delay = await fees.postpone(pool, QUEUE, KEY, coupon_id, attempts, exc)
                fees.log_failure("coupon_lookup_failed", attempts, exc, delay, coupon=coupon_id)
                del left[coupon_id]
                continue
            now = int(time.time())
            body = synthetic_event(coupon, "coupon.updated", now)
            body["id"] = event_id(coupon_id, now)
            outcome = await ingest.ingest(pool, parse_event(body), json.dumps(body), offer,
                                          source="import")
            del left[coupon_id]
            if outcome is ingest.Outcome.FAILED:  # (logged; tried again once its lease ends)
                continue
            # the event's transaction kept the coupon and derived its users; the look-up ends
            # if what is kept now gives every user its terms (a rename's event, without the
            # options, may have outranked the coupon fetched while Stripe answered: then it
            # stays, and is asked for again once its lease ends)
            if await derive_users(pool, coupon_id, offer):
                ended += 1
                log.info("coupon_looked_up", coupon=coupon_id)
    except asyncio.CancelledError:
        await fees.give_back(pool, QUEUE, KEY, left)
        raise
    return ended


async def worker(
    pool: asyncpg.Pool, client: stripe.StripeClient | None, offer: FoundingOffer, interval: float
) -> None:
    """The coupon worker, until cancelled."""
    await fees.keep_running("coupon_worker", lambda: run_once(pool, client, offer), interval)
