"""Background workers when several replicas (and webhooks) work at once: a look-up is made by
the replica holding its lease, and what another asked for while one was in flight is not lost."""

from __future__ import annotations

import asyncio
import time

import asyncpg

from donations import coupons, db, fees, payouts
from donations.ledger import FoundingOffer
from donations.metrics import Metrics
from tests.conftest import Client, waiting_on_a_lock
from tests.fakestripe import objects as o
from tests.fakestripe.world import Emitted, World
from tests.test_fees import stripe_against
from tests.webhook_helpers import post_all, post_event


async def test_a_payout_requeued_by_a_status_change_mid_fetch_is_fetched_again(
    client: Client, pool: asyncpg.Pool
) -> None:
    """Replica A lists a paid payout's transactions; while Stripe answers, the payout fails
    (`payout.failed`: Stripe books a `payout_failure` transaction that brings the money back)
    and replica B's pass queues it again for its new status. A's listing, asked for before the
    failure, must not mark the new status's look-up done: the payout is to be listed again, so
    that the report holds the failure's transaction. (Today A's store sets `fetched_at` on the
    row B put back, whatever status it was claimed for: the failed payout keeps the paid one's
    transactions and is never listed again.)"""
    world = World(seed=7101)
    world.one_off(2500, "gbp")
    paid_out = world.payout()
    await post_all(client, world.events)
    async with stripe_against(world) as (fake, stripe_client):
        listing = fake.hold("/v1/balance_transactions")
        replica_a = asyncio.create_task(payouts.run_once(pool, stripe_client))
        await asyncio.wait_for(listing.arrived.wait(), 10)

        # meanwhile the payout fails at the bank: Stripe books the money back and says so
        po = world.get(paid_out.payout)
        world.advance(3600)
        back = world._bt(amount=int(po["amount"]), currency="gbp", source=po["id"],
                         type="payout_failure", reporting_category="payout_reversal")
        world.payout_members[po["id"]].append(back["id"])
        previous = world._changes(po, status="failed", failure_code="account_closed")
        failed = world._emit(Emitted(), "payout.failed", po, previous=previous)
        status, body = await post_event(client, failed)
        assert status == 200, body
        # replica B's pass queues every payout whose status changed (what run_once does first)
        async with db.connection(pool) as conn:
            await payouts.enqueue(conn)
        assert await pool.fetchval("SELECT fetched_at IS NULL FROM payout_fetches")

        listing.release()
        assert await replica_a == 1
        # the payout's look-up for its new status is still to do: the next pass lists it again
        assert await payouts.run_once(pool, stripe_client) == 1


async def test_a_lookup_another_replica_did_after_the_lease_ran_out_is_not_asked_again(
    client: Client, pool: asyncpg.Pool
) -> None:
    """The fee worker leases a batch (up to 25) for two minutes and then asks Stripe for each
    in turn; a slow Stripe (each call may take 4 tries of 20 s) outlasts the lease, another
    replica claims the rest of the batch and does them. The first worker must not then ask
    Stripe again for what is no longer its own (done, or leased by someone else): the queue is
    shared so that each look-up is made once, and during an outage a second round of calls for
    the same objects is exactly the load the backoff is there to spare Stripe. (Today it asks
    again for every item of its batch, whatever became of the lease.)"""
    world = World(seed=7102)
    bts = [str(world.one_off(1500 + i, "gbp").balance_transaction) for i in range(3)]
    await post_all(client, world.events)
    async with stripe_against(world) as (fake, stripe_client):
        holds = {bt: fake.hold(f"/v1/balance_transactions/{bt}") for bt in bts}
        replica_a = asyncio.create_task(fees.run_once(pool, stripe_client, Metrics()))
        waits = [asyncio.create_task(h.arrived.wait()) for h in holds.values()]
        await asyncio.wait(waits, timeout=10, return_when=asyncio.FIRST_COMPLETED)
        for wait in waits:
            wait.cancel()
        first = next(bt for bt, h in holds.items() if h.arrived.is_set())
        for bt, held in holds.items():
            if bt != first:
                held.release()
        # two minutes on, A's lease on the rest of its batch has run out: replica B does them
        await pool.execute(
            "UPDATE balance_transaction_fetches SET next_attempt_at = now() WHERE id <> $1", first)
        assert await fees.run_once(pool, stripe_client, Metrics()) == 2
        assert await pool.fetchval("SELECT count(*) FROM balance_transaction_fetches") == 1

        holds[first].release()
        await replica_a
        asked = {bt: len(fake.requests_to(f"/v1/balance_transactions/{bt}")) for bt in bts}
    assert asked == {bt: 1 for bt in bts}
    assert await pool.fetchval("SELECT count(*) FROM payments WHERE fee IS NULL") == 0


async def test_a_coupon_look_up_asked_for_again_while_in_flight_is_not_ended_by_the_stale_one(
    client: Client, pool: asyncpg.Pool
) -> None:
    """A £3-off coupon with a ¥100 option on a yen subscription: the coupon worker asks Stripe
    for it (with its options). While Stripe answers, the coupon is renamed in the Dashboard:
    its `coupon.updated` (without options, stamped after the worker's look-up) outranks what
    the worker fetched, so the subscription still does not know its yen amount and its
    derivation asks for the coupon again. That new request must survive: either the
    subscription ends up discounted or the look-up stays queued. (Today the worker, once its
    own synthetic event is stored, deletes the look-up row whatever happened meanwhile: the
    request the webhook made is lost, the yen subscription is counted at full price for good
    and nothing is left in `donations lookups list` to say so.)"""
    world = World(seed=7103, start=1_795_000_000)
    world.create_coupon("promo", amount_off=300, currency="gbp", currency_options={"jpy": 100})
    sub = world.subscribe(999, "jpy", email="reader@example.org")
    world.discount_subscription(sub.subscription, "promo")
    await post_all(client, world.events)
    assert [r["coupon_id"] for r in await pool.fetch("SELECT coupon_id FROM coupon_lookups")] \
        == ["promo"]
    async with stripe_against(world) as (fake, stripe_client):
        asked = fake.hold("/v1/coupons/promo")
        worker = asyncio.create_task(coupons.run_once(pool, stripe_client, FoundingOffer()))
        await asyncio.wait_for(asked.arrived.wait(), 10)
        if time.time() % 1 > 0.3:  # (early in a second: the rename and the answer share it)
            await asyncio.sleep(1 - time.time() % 1)
        renamed = dict(o.as_sent(world.objects["promo"]), name="Spring promotion")
        world.objects["promo"]["name"] = "Spring promotion"
        await post_all(client, [o.event("coupon.updated", renamed, created=int(time.time()),
                                        ids=world.ids)])
        asked.release()
        await worker
    # the rename's snapshot is the one kept (stamped after the worker's look-up)
    assert not (await pool.fetchval(
        "SELECT event_id FROM stripe_objects WHERE id = 'promo'")).startswith("evt_import")
    row = await pool.fetchrow("SELECT amount_off FROM subscriptions WHERE id = $1",
                              sub.subscription)
    queued = [r["coupon_id"] for r in await pool.fetch(
        "SELECT coupon_id FROM coupon_lookups WHERE gave_up_at IS NULL")]
    assert row is not None
    assert row["amount_off"] == 100 or queued == ["promo"], (row["amount_off"], queued)


async def test_a_coupon_user_committed_while_the_worker_derives_keeps_its_look_up(
    client: Client, pool: asyncpg.Pool, dsn: str
) -> None:
    """The same loss without Stripe: a £3-off coupon (with a ¥100 option) is known from its
    `coupon.created`, and a look-up queued before that event came is still in the queue. The
    coupon worker takes it and, as the coupon's terms are known and no subscription in another
    currency uses the coupon yet, derives its users and ends the look-up. Meanwhile a yen
    subscriber's discount is applied by a webhook: its derivation needs the yen amount, which
    the coupon's event does not give, and asks for a look-up. Once both have committed, the
    yen subscription must be discounted or its look-up still queued. (Today the worker checks
    for users in other currencies and finds the coupon's users before it takes the coupon's
    lock, then deletes the look-up the webhook asked for: the yen subscriber counts at full
    price for good, with nothing queued.)"""
    world = World(seed=7104, start=1_795_000_000)
    created = world.create_coupon("promo", amount_off=300, currency="gbp",
                                  currency_options={"jpy": 100})
    pounds = world.subscribe(1000, "gbp", email="a@example.org")
    pounds_discount = world.discount_subscription(pounds.subscription, "promo")
    yen = world.subscribe(999, "jpy", email="b@example.org")
    yen_discount = world.discount_subscription(yen.subscription, "promo")
    # the £ subscriber's discount before the coupon's event: a look-up is queued
    await post_all(client, [*pounds.events, *pounds_discount.events])
    await post_all(client, created.events)
    await post_all(client, [*yen.events, yen_discount.events[0]])
    assert [r["coupon_id"] for r in await pool.fetch("SELECT coupon_id FROM coupon_lookups")] \
        == ["promo"]

    blocker = await asyncpg.connect(dsn)
    try:
        # the yen subscriber's derivation caught half-way (after it asked for the look-up,
        # before its subscription row is written), holding the coupon's lock
        await blocker.execute("BEGIN; LOCK TABLE subscriptions IN SHARE ROW EXCLUSIVE MODE")
        webhook = asyncio.create_task(post_all(client, [yen_discount.events[1]]))
        await waiting_on_a_lock(pool, "%INSERT INTO subscriptions%")
        worker = asyncio.create_task(coupons.run_once(pool, None, FoundingOffer()))
        await waiting_on_a_lock(pool, "%pg_advisory_xact_lock%")
    finally:
        await blocker.close()
    await webhook
    await worker
    row = await pool.fetchrow("SELECT currency, amount_off FROM subscriptions WHERE id = $1",
                              yen.subscription)
    queued = [r["coupon_id"] for r in await pool.fetch(
        "SELECT coupon_id FROM coupon_lookups WHERE gave_up_at IS NULL")]
    assert row is not None and row["currency"] == "jpy"
    assert row["amount_off"] == 100 or queued == ["promo"], (row["amount_off"], queued)
