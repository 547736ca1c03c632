"""Upgrading across the release that keeps every refused try of a bank debit in failed_debits
(sql/039, sql/041): the tries already ledgered get their fees, and those a replica of the
previous release ledgered during the deploy are brought in by the reapply the README names."""

from __future__ import annotations

import json
from dataclasses import replace
from typing import Any

import asyncpg

from donations import db, ledger
from donations import ingest as ingest_module
from donations.events import parse_event
from donations.ingest import ingest_many, reapply
from donations.ledger import FoundingOffer
from tests.conftest import Client
from tests.fakestripe.world import World
from tests.webhook_helpers import post_event


async def test_sql_039_queues_the_fees_of_the_earlier_tries_it_adds(
    server_dsn: str, monkeypatch: Any
) -> None:
    """A payment intent whose SEPA debit Stripe booked and the bank refused twice, ledgered
    before sql/039 (the payment kept one try's booking and reversal, and only those two were
    queued for the fee worker, sql/032 and put_payments). sql/039 adds the other try to
    failed_debits, so the contributions report lists its booking and reversal. Expected: as on
    a database that had the new code from the start (put_payments queues every try's balance
    transactions), the fee worker fetches them, and the report's rows carry the fee Stripe
    kept and the settled amounts (the summary's fees and net tie to Stripe's). What happens:
    the backfill queues nothing, and a re-derivation of the payment queues nothing either (the
    upsert returns only rows it changed), so those rows keep no fee, no net and no settlement
    until a payout or reconciliation happens to store the transactions."""
    from donations import fees, reports
    from donations.metrics import Metrics
    from tests.conftest import scratch_database
    from tests.test_fees import stripe_against
    from tests.test_reports import START, _retry_debit_that_fails_again

    world = World(seed=4401, start=START)
    first = world.async_checkout(4500, "eur", False, booked=True)
    _retry_debit_that_fails_again(world, first.payment_intent)

    original = ledger.derive_payment

    def as_before_039(key: str, cluster: Any) -> Any:
        row = original(key, cluster)
        return None if row is None else replace(row, failed_debits=())

    async with scratch_database(server_dsn, "review_039", migrated=False) as (url, _):
        await db.migrate(url, [m for m in db.load_migrations() if m.version <= 38])
        pool = await db.create_pool(url, min_size=1, max_size=4)
        try:
            with monkeypatch.context() as patch:
                patch.setattr(ingest_module, "derive_payment", as_before_039)
                # as `donations import` or a catch-up brings them: all at once
                await ingest_many(pool, [(parse_event(e), json.dumps(e)) for e in world.events],
                                  FoundingOffer())
            await db.migrate(url)  # 039 and 040
            assert await pool.fetchval("SELECT count(*) FROM failed_debits") == 2
            async with stripe_against(world) as (_, stripe_client):
                while await fees.run_once(pool, stripe_client, Metrics()):
                    pass
            win = reports.window("2026-11-01", "2027-02-01")
            rows = [dict(r) for r in await pool.fetch(reports.CONTRIBUTIONS, win.start, win.end)
                    if r["payment_intent"] == first.payment_intent]
        finally:
            await pool.close()
    assert len(rows) == 4
    assert [(r["status"], r["balance_transaction"]) for r in rows
            if r["settlement_amount"] is None] == [], rows


async def test_a_failed_debit_a_previous_release_ledgered_during_the_deploy_is_in_the_report(
    client: Client, pool: asyncpg.Pool, monkeypatch: Any
) -> None:
    """During a deploy of this release, replicas of the previous one keep applying webhooks
    (README: "replicas of the previous release keep working meanwhile"); they write a bank
    debit that Stripe booked and the bank refused into the payment's own columns
    (booked_balance_transaction, failure_balance_transaction: sql/032), which the
    contributions report read until now. Expected: the booking (with the fee Stripe keeps) and
    its reversal are in the contributions report, as they were for such a row before, so the
    month ties to its payout. What happens: the report now reads failed_debits only (filled by
    this release's derivation and by sql/039's one-off backfill, which ran before), so those
    two movements are missing, until the step the README names after sql/039 (`events reapply
    --type 'charge.failed'` once the previous release's replicas have stopped) derives the
    payment again."""
    from tests.test_reports import START, WIDE, _bearer

    world = World(seed=4402, start=START)
    first = world.async_checkout(4500, "eur", False, booked=True)
    original = ledger.derive_payment

    def previous_release(key: str, cluster: Any) -> Any:
        row = original(key, cluster)
        return None if row is None else replace(row, failed_debits=())

    monkeypatch.setattr(ingest_module, "derive_payment", previous_release)
    for event in world.events:
        status, body = await post_event(client, event)
        assert status == 200, body
    monkeypatch.undo()
    await reapply(pool, FoundingOffer(), "charge.failed")
    kept = await pool.fetchrow(
        "SELECT booked_balance_transaction, failure_balance_transaction FROM payments"
        " WHERE payment_key = $1", first.payment_intent)
    assert kept is not None and kept["booked_balance_transaction"] is not None

    headers = await _bearer(pool)
    response = await client.get("/v1/reports/contributions", headers=headers,
                                params={**WIDE, "format": "json"})
    assert response.status == 200
    listed = sorted(r["balance_transaction"] for r in (await response.json())["data"]
                    if r["payment_intent"] == first.payment_intent)
    assert listed == sorted([kept["booked_balance_transaction"],
                             kept["failure_balance_transaction"]])
