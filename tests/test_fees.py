"""The balance-transaction worker: fees, net and the settled amount, fetched off the webhook's path
through the real stripe library from the fake Stripe."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import asyncpg
import pytest
import stripe
from pytest_aiohttp import AiohttpClient

from donations import db, fees
from donations.app import create_app
from donations.ledger import BalanceTransaction
from donations.metrics import Metrics
from donations.settings import Secret
from donations.stripe_api import make_client
from tests.conftest import Client, make_settings
from tests.fakestripe.server import FakeStripe, running_fake_stripe
from tests.fakestripe.world import World
from tests.ledger_check import dump, reference
from tests.webhook_helpers import count, post_all

TEST_KEY = "sk_test_donations_fee_worker"
WORKER_TASK = "balance-transaction-worker"


@asynccontextmanager
async def stripe_against(world: World) -> AsyncIterator[tuple[FakeStripe, stripe.StripeClient]]:
    """The fake Stripe serving `world`, and a client built the way the app builds its own."""
    async with running_fake_stripe(world) as fake:
        http_client = stripe.AIOHTTPClient(timeout=5)
        settings = make_settings(
            "postgresql://unused", stripe_secret_key=Secret(TEST_KEY),
            stripe_api_base=fake.base_url,
        )
        client = make_client(settings, http_client)
        assert client is not None
        try:
            yield fake, client
        finally:
            await http_client.close_async()  # type: ignore[no-untyped-call]


async def payment_row(pool: asyncpg.Pool, key: str) -> dict[str, Any]:
    row = await pool.fetchrow("SELECT * FROM payments WHERE payment_key = $1", key)
    assert row is not None, key
    return dict(row)


async def queue_row(pool: asyncpg.Pool, bt_id: str) -> dict[str, Any] | None:
    row = await pool.fetchrow(
        "SELECT *, next_attempt_at - now() AS wait FROM balance_transaction_fetches WHERE id = $1",
        bt_id,
    )
    return None if row is None else dict(row)


def known(world: World, *bt_ids: str) -> dict[str, BalanceTransaction]:
    """The World's balance transactions as the ledger's reference derivation takes them."""
    return {
        i: BalanceTransaction.from_stripe(world.balance_transactions[i]) for i in bt_ids
    }


def fetched(metrics: Metrics, outcome: str) -> float:
    return metrics.balance_fetches.values.get((("outcome", outcome),), 0)


async def test_a_charges_balance_transaction_is_queued_by_the_webhook(
    client: Client, pool: asyncpg.Pool
) -> None:
    world = World(seed=101)
    paid = world.one_off(2500, "gbp")
    await post_all(client, paid.events)

    row = await payment_row(pool, paid.payment_intent)
    assert row["balance_transaction"] == paid.balance_transaction
    assert (row["fee"], row["net"], row["settlement_currency"], row["settlement_amount"]) == (
        None, None, None, None)
    queued = await queue_row(pool, str(paid.balance_transaction))
    assert queued is not None
    assert (queued["attempts"], queued["last_error"]) == (0, None)


async def test_fee_lookup_fills_fee_net_and_settlement(
    client: Client, pool: asyncpg.Pool
) -> None:
    world = World(seed=102)  # settles in GBP
    in_gbp = world.one_off(2500, "gbp")
    in_usd = world.one_off(2500, "usd")
    in_jpy = world.one_off(1000, "jpy")
    await post_all(client, world.events)
    assert await count(pool, "balance_transaction_fetches") == 3

    metrics = Metrics()
    async with stripe_against(world) as (fake, stripe_client):
        assert await fees.run_once(pool, stripe_client, metrics) == 3
    assert len(fake.requests_to("/v1/balance_transactions/")) == 3

    for paid in (in_gbp, in_usd, in_jpy):
        bt = world.balance_transactions[str(paid.balance_transaction)]
        row = await payment_row(pool, paid.payment_intent)
        assert (row["fee"], row["net"], row["settlement_currency"], row["settlement_amount"]) == (
            bt["fee"], bt["net"], bt["currency"], bt["amount"])
    # $25.00 at 0.8 is £20.00, less 1.5% + 20p; ¥1000 at 1/200 is £5.00, less 8p + 20p
    usd = await payment_row(pool, in_usd.payment_intent)
    assert (usd["currency"], usd["amount"]) == ("usd", 2500)
    assert (usd["settlement_currency"], usd["settlement_amount"], usd["fee"], usd["net"]) == (
        "gbp", 2000, 50, 1950)
    jpy = await payment_row(pool, in_jpy.payment_intent)
    assert (jpy["currency"], jpy["amount"]) == ("jpy", 1000)
    assert (jpy["settlement_currency"], jpy["settlement_amount"], jpy["fee"], jpy["net"]) == (
        "gbp", 500, 28, 472)

    assert await count(pool, "balance_transaction_fetches") == 0
    stored = await pool.fetchrow(
        "SELECT source, type, exchange_rate::text AS rate FROM balance_transactions WHERE id = $1",
        in_usd.balance_transaction)
    assert stored is not None
    assert dict(stored) == {"source": in_usd.charge, "type": "charge", "rate": "0.8"}
    assert fetched(metrics, "stored") == 3
    bts = [str(p.balance_transaction) for p in (in_gbp, in_usd, in_jpy)]
    assert await dump(pool) == reference(world.events, balance_transactions=known(world, *bts))


async def test_a_later_event_keeps_the_fetched_fee_and_queues_nothing(
    client: Client, pool: asyncpg.Pool
) -> None:
    world = World(seed=103)
    paid = world.one_off(3000, "gbp")
    await post_all(client, paid.events)
    async with stripe_against(world) as (_, stripe_client):
        assert await fees.run_once(pool, stripe_client, Metrics()) == 1

    refund = world.refund(paid.charge, 1000)
    await post_all(client, refund.events)
    bt = world.balance_transactions[str(paid.balance_transaction)]
    row = await payment_row(pool, paid.payment_intent)
    assert (row["amount_refunded"], row["fee"], row["net"]) == (1000, bt["fee"], bt["net"])
    # the charge's balance transaction is known now: it is not asked for again
    assert await queue_row(pool, str(paid.balance_transaction)) is None


async def test_a_stripe_500_leaves_the_lookup_queued_with_backoff_and_a_later_run_succeeds(
    client: Client, pool: asyncpg.Pool
) -> None:
    world = World(seed=104)
    paid = world.one_off(1500, "usd")
    await post_all(client, paid.events)
    bt_id = str(paid.balance_transaction)

    metrics = Metrics()
    async with stripe_against(world) as (fake, stripe_client):
        # Stripe-Should-Retry: false, so the library gives up at once instead of retrying
        fake.fail_next(1, 500, path_prefix="/v1/balance_transactions", should_retry=False)
        assert await fees.run_once(pool, stripe_client, metrics) == 0

        queued = await queue_row(pool, bt_id)
        assert queued is not None
        assert queued["attempts"] == 1
        assert queued["last_error"].startswith("APIError")
        # the first retry waits backoff(1) = 10 s, not the two-minute lease
        assert 5 < queued["wait"].total_seconds() <= fees.backoff(1)
        assert (await payment_row(pool, paid.payment_intent))["fee"] is None
        assert fetched(metrics, "error") == 1

        # not due yet: a run now leaves it alone
        assert await fees.run_once(pool, stripe_client, metrics) == 0
        assert len(fake.requests_to("/v1/balance_transactions/")) == 1

        await pool.execute(
            "UPDATE balance_transaction_fetches SET next_attempt_at = now() WHERE id = $1", bt_id)
        assert await fees.run_once(pool, stripe_client, metrics) == 1

    assert await queue_row(pool, bt_id) is None
    row = await payment_row(pool, paid.payment_intent)
    bt = world.balance_transactions[bt_id]
    assert (row["fee"], row["net"], row["settlement_amount"]) == (
        bt["fee"], bt["net"], bt["amount"])
    assert fetched(metrics, "stored") == 1


async def test_a_single_stripe_500_is_absorbed_by_the_librarys_retry(
    client: Client, pool: asyncpg.Pool
) -> None:
    world = World(seed=105)
    paid = world.one_off(1500, "gbp")
    await post_all(client, paid.events)
    async with stripe_against(world) as (fake, stripe_client):
        fake.fail_next(1, 500, path_prefix="/v1/balance_transactions")
        assert await fees.run_once(pool, stripe_client, Metrics()) == 1
        assert len(fake.requests_to("/v1/balance_transactions/")) == 2
    assert (await payment_row(pool, paid.payment_intent))["fee"] is not None


async def test_an_unknown_balance_transaction_is_recorded_and_does_not_stop_the_others(
    client: Client, pool: asyncpg.Pool
) -> None:
    world = World(seed=106)
    paid = world.one_off(1200, "gbp")
    await post_all(client, paid.events)
    await pool.execute("INSERT INTO balance_transaction_fetches (id) VALUES ('txn_not_at_stripe')")

    metrics = Metrics()
    async with stripe_against(world) as (_, stripe_client):
        assert await fees.run_once(pool, stripe_client, metrics) == 1

    missing = await queue_row(pool, "txn_not_at_stripe")
    assert missing is not None
    assert missing["attempts"] == 1
    assert missing["last_error"].startswith("InvalidRequestError")
    assert "txn_not_at_stripe" in missing["last_error"]
    assert missing["wait"].total_seconds() > 5
    assert (await payment_row(pool, paid.payment_intent))["fee"] is not None
    assert (fetched(metrics, "stored"), fetched(metrics, "error")) == (1, 1)


async def test_a_lookup_stripe_keeps_not_finding_is_set_aside_counted_and_can_be_put_back(
    client: Client, pool: asyncpg.Pool
) -> None:
    await pool.execute("INSERT INTO balance_transaction_fetches (id) VALUES ('txn_not_at_stripe')")
    metrics = Metrics()
    async with stripe_against(World(seed=107)) as (fake, stripe_client):
        for attempt in range(1, fees.GIVE_UP_AFTER_NOT_FOUND + 1):
            assert await fees.run_once(pool, stripe_client, metrics) == 0
            row = await queue_row(pool, "txn_not_at_stripe")
            assert row is not None and row["attempts"] == attempt
            if attempt < fees.GIVE_UP_AFTER_NOT_FOUND:
                assert row["gave_up_at"] is None
                assert 5 < row["wait"].total_seconds() <= fees.backoff(attempt)
                await pool.execute("UPDATE balance_transaction_fetches SET next_attempt_at = now()")
        asked = len(fake.requests_to("/v1/balance_transactions/txn_not_at_stripe"))
        assert asked == fees.GIVE_UP_AFTER_NOT_FOUND

        # set aside: not asked again even when due, its reason kept, and /metrics says so
        assert row is not None and row["gave_up_at"] is not None
        assert row["last_error"].startswith(
            f'set aside after {fees.GIVE_UP_AFTER_NOT_FOUND} "no such object" answers running; '
            "InvalidRequestError")
        await pool.execute("UPDATE balance_transaction_fetches SET next_attempt_at = now()")
        assert await fees.run_once(pool, stripe_client, metrics) == 0
        assert len(fake.requests_to("/v1/balance_transactions/")) == asked
        text = await (await client.get("/metrics")).text()
        assert 'donations_stripe_lookups_set_aside{queue="balance_transactions"} 1' in text
        assert 'donations_stripe_lookups_set_aside{queue="payouts"} 0' in text
        assert "donations_balance_transactions_queued 0" in text

        # put back: due at once, tried again from the start
        async with db.connection(pool) as conn:
            assert await fees.requeue_set_aside(conn) == {
                "balance_transactions": 1, "payouts": 0, "coupons": 0}
        again = await queue_row(pool, "txn_not_at_stripe")
        assert again is not None and (again["attempts"], again["gave_up_at"]) == (0, None)
        assert await fees.run_once(pool, stripe_client, metrics) == 0
        assert len(fake.requests_to("/v1/balance_transactions/")) == asked + 1
    assert fetched(metrics, "error") == fees.GIVE_UP_AFTER_NOT_FOUND + 1


async def test_other_stripe_errors_are_retried_however_often_they_come(
    client: Client, pool: asyncpg.Pool
) -> None:
    world = World(seed=108)
    paid = world.one_off(1500, "usd")
    await post_all(client, paid.events)
    bt_id = str(paid.balance_transaction)
    async with stripe_against(world) as (fake, stripe_client):
        for _ in range(fees.GIVE_UP_AFTER_NOT_FOUND + 1):
            fake.fail_next(1, 500, path_prefix="/v1/balance_transactions", should_retry=False)
            assert await fees.run_once(pool, stripe_client, Metrics()) == 0
            await pool.execute("UPDATE balance_transaction_fetches SET next_attempt_at = now()")
        row = await queue_row(pool, bt_id)
        assert row is not None and row["gave_up_at"] is None
        assert row["attempts"] == fees.GIVE_UP_AFTER_NOT_FOUND + 1
        assert await fees.run_once(pool, stripe_client, Metrics()) == 1
    assert await queue_row(pool, bt_id) is None


async def test_a_single_404_after_outage_errors_does_not_set_a_lookup_aside(
    client: Client, pool: asyncpg.Pool
) -> None:
    """Set aside after three "no such object" answers *running*: an outage before one 404 does
    not count towards it."""
    world = World(seed=905)
    paid = world.one_off(1500, "gbp")
    await post_all(client, paid.events)
    bt_id = str(paid.balance_transaction)
    async with stripe_against(world) as (fake, stripe_client):
        fake.fail_next(2, 500, path_prefix="/v1/balance_transactions", should_retry=False)
        for _ in range(2):
            assert await fees.run_once(pool, stripe_client, Metrics()) == 0
            await pool.execute("UPDATE balance_transaction_fetches SET next_attempt_at = now()")
        fake.fail_next(1, 404, path_prefix="/v1/balance_transactions")
        assert await fees.run_once(pool, stripe_client, Metrics()) == 0
    row = await pool.fetchrow("SELECT attempts, gave_up_at, last_error"
                              " FROM balance_transaction_fetches WHERE id = $1", bt_id)
    assert row is not None and row["attempts"] == 3
    assert row["gave_up_at"] is None, row["last_error"]


def test_backoff_doubles_from_ten_seconds_up_to_six_hours() -> None:
    assert [fees.backoff(n) for n in range(1, 6)] == [10, 20, 40, 80, 160]
    assert fees.backoff(0) == 10
    assert fees.backoff(30) == fees.backoff(1000) == 6 * 3600


async def test_without_a_stripe_key_no_worker_runs_and_fees_stay_unknown(
    client: Client, pool: asyncpg.Pool
) -> None:
    world = World(seed=107)
    paid = world.one_off(2000, "gbp")
    await post_all(client, paid.events)
    await asyncio.sleep(0.2)

    assert [t for t in asyncio.all_tasks() if t.get_name() == WORKER_TASK] == []
    assert (await payment_row(pool, paid.payment_intent))["fee"] is None
    assert await queue_row(pool, str(paid.balance_transaction)) is not None


async def test_the_webhook_answers_without_asking_stripe(
    pool: asyncpg.Pool, dsn: str, aiohttp_client: AiohttpClient
) -> None:
    world = World(seed=108)
    paid = world.one_off(2000, "usd")
    async with running_fake_stripe(world) as fake:
        settings = make_settings(
            dsn, stripe_secret_key=Secret(TEST_KEY), stripe_api_base=fake.base_url,
            fee_worker_interval=3600.0,
        )
        app_client = await aiohttp_client(create_app(settings))
        await asyncio.sleep(0.2)  # the worker's first pass, over an empty queue, is done
        assert [t for t in asyncio.all_tasks() if t.get_name() == WORKER_TASK]

        await post_all(app_client, paid.events)

        assert fake.requests == []
        assert await queue_row(pool, str(paid.balance_transaction)) is not None
        assert (await payment_row(pool, paid.payment_intent))["fee"] is None
        await app_client.close()


async def test_the_background_worker_fills_the_fee_soon_after_the_webhook(
    pool: asyncpg.Pool, dsn: str, aiohttp_client: AiohttpClient
) -> None:
    world = World(seed=109)
    paid = world.one_off(4000, "jpy")
    bt = world.balance_transactions[str(paid.balance_transaction)]
    async with running_fake_stripe(world) as fake:
        settings = make_settings(
            dsn, stripe_secret_key=Secret(TEST_KEY), stripe_api_base=fake.base_url,
            fee_worker_interval=0.05,
        )
        app_client = await aiohttp_client(create_app(settings))
        await post_all(app_client, paid.events)

        deadline = time.monotonic() + 3
        row = await payment_row(pool, paid.payment_intent)
        while row["fee"] is None and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
            row = await payment_row(pool, paid.payment_intent)

        assert (row["fee"], row["net"], row["settlement_currency"], row["settlement_amount"]) == (
            bt["fee"], bt["net"], "gbp", bt["amount"])
        assert await queue_row(pool, bt["id"]) is None
        assert [r.path for r in fake.requests] == [f"/v1/balance_transactions/{bt['id']}"]
        metrics = await (await app_client.get("/metrics")).text()
        assert 'donations_balance_transaction_fetches_total{outcome="stored"} 1' in metrics
        assert "donations_balance_transactions_queued 0" in metrics
        await app_client.close()


async def test_a_worker_stopped_mid_fetch_leaves_what_it_leased_due_at_once(
    client: Client, pool: asyncpg.Pool
) -> None:
    """The worker stopped by a shutdown (a deploy) while Stripe answers its first look-up: the
    look-ups it had leased are due again at once, their attempt not counted, for the next
    replica up (or another one) to do now rather than once the two-minute lease runs out."""
    world = World(seed=108)
    for i in range(3):
        world.one_off(1500 + i, "gbp")
    await post_all(client, world.events)
    async with stripe_against(world) as (fake, stripe_client):
        in_flight = fake.hold("/v1/balance_transactions/")
        worker = asyncio.create_task(fees.worker(pool, stripe_client, Metrics(), 60))
        await asyncio.wait_for(in_flight.arrived.wait(), 10)
        worker.cancel()  # as the app's shutdown stops it
        with pytest.raises(asyncio.CancelledError):
            await worker
        in_flight.release()
        queued = await pool.fetch("SELECT attempts, next_attempt_at <= now() AS due"
                                  " FROM balance_transaction_fetches")
        assert [tuple(r) for r in queued] == [(0, True)] * 3
        assert await fees.run_once(pool, stripe_client, Metrics()) == 3
    assert await pool.fetchval("SELECT count(*) FROM payments WHERE fee IS NULL") == 0


async def test_a_lease_another_replica_took_meanwhile_is_not_given_back(
    client: Client, pool: asyncpg.Pool
) -> None:
    """A worker stopped while its lease had already run out and another replica had claimed
    the look-up again gives back only what is still its own: the other replica's lease (and
    its attempt count) stands."""
    world = World(seed=109)
    world.one_off(1500, "gbp")
    await post_all(client, world.events)
    async with stripe_against(world) as (fake, stripe_client):
        in_flight = fake.hold("/v1/balance_transactions/")
        worker = asyncio.create_task(fees.worker(pool, stripe_client, Metrics(), 60))
        await asyncio.wait_for(in_flight.arrived.wait(), 10)
        # the lease runs out and another replica claims the look-up (its second attempt)
        await pool.execute("UPDATE balance_transaction_fetches SET next_attempt_at = now()")
        async with db.connection(pool) as conn:
            assert [attempts for _, attempts in await fees.claim(conn, 10)] == [2]
        worker.cancel()
        with pytest.raises(asyncio.CancelledError):
            await worker
        in_flight.release()
    row = await pool.fetchrow("SELECT attempts, next_attempt_at > now() AS leased"
                              " FROM balance_transaction_fetches")
    assert row is not None and tuple(row) == (2, True)

