"""`donations import`: history from Stripe's objects gives the ledger its events would, is
idempotent, resumes where it stopped, and ranks what it lists at the time Stripe listed it:
above the real events stamped before, below those stamped after."""

from __future__ import annotations

import io
import random
import signal

import asyncpg
import pytest
import stripe

from donations import cli, importer
from donations.ledger import FoundingOffer
from tests.conftest import Client, payments_refused
from tests.fakestripe.server import running_fake_stripe
from tests.fakestripe.world import DAY, World
from tests.ledger_check import dump, reference
from tests.test_cli import _env, _run
from tests.test_fees import TEST_KEY, stripe_against
from tests.test_reconcile import scenario, signalled_half_way
from tests.webhook_helpers import post_all

OFFER = FoundingOffer()
SINCE = 1_795_000_000


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


async def test_import_gives_the_ledger_the_events_would(pool: asyncpg.Pool) -> None:
    world = scenario(seed=701, steps=60)
    async with stripe_against(world) as (fake, stripe_client):
        shown = Terminal()
        result = await importer.run(pool, stripe_client, OFFER, SINCE, progress=shown,
                                    now=world.now + 60)
        assert fake.requests_to("/v1/events") == []
    assert result.failed == 0
    assert await dump(pool) == reference(world.events, OFFER)
    assert result.imported["charges"] == sum(
        1 for o in world.objects.values() if o.get("object") == "charge")
    assert await pool.fetchval(
        "SELECT count(*) FROM stripe_events WHERE source <> 'import'") == 0
    assert "charges" in shown.getvalue()
    assert "100%" in shown.getvalue()


async def test_importing_again_changes_nothing(pool: asyncpg.Pool) -> None:
    world = scenario(seed=702, steps=20)
    async with stripe_against(world) as (fake, stripe_client):
        await importer.run(pool, stripe_client, OFFER, SINCE, now=world.now + 60)
        before = await dump(pool)
        events = await pool.fetchval("SELECT count(*) FROM stripe_events")
        fake.requests.clear()
        again = await importer.run(pool, stripe_client, OFFER, SINCE, now=world.now + 60)
        assert set(again.skipped) == {r.name for r in importer.RESOURCES} | {importer.REFERENCES}
        assert fake.requests == []
        # another --since lists everything again: all of it already stored
        wider = await importer.run(pool, stripe_client, OFFER, SINCE - 86400,
                                   now=world.now + 60)
        assert (wider.applied, wider.failed) == (0, 0)
    assert await dump(pool) == before
    assert await pool.fetchval("SELECT count(*) FROM stripe_events") == events


async def test_an_interrupted_import_resumes_where_it_stopped(pool: asyncpg.Pool) -> None:
    world = scenario(seed=703, steps=60)
    charges = sum(1 for o in world.objects.values() if o.get("object") == "charge")
    assert charges > 20
    async with stripe_against(world) as (fake, stripe_client):
        fake.fail_next(1, 500, "/v1/charges", should_retry=False, after=1)
        with pytest.raises(stripe.APIError):
            await importer.run(pool, stripe_client, OFFER, SINCE, now=world.now + 60,
                               page_size=10)
        row = await pool.fetchrow("SELECT * FROM import_progress WHERE resource = 'charges'")
        assert row is not None
        assert row["finished_at"] is None
        assert row["imported"] == 10
        cursor = row["cursor"]
        fake.requests.clear()
        result = await importer.run(pool, stripe_client, OFFER, SINCE, now=world.now + 60,
                                    page_size=10)
        assert fake.requests_to("/v1/charges")[0].query["starting_after"] == cursor
        # customers, sessions and payment intents were finished before
        assert {"customers", "checkout_sessions", "payment_intents"} <= set(result.skipped)
        assert fake.requests_to("/v1/customers") == []
    assert result.imported["charges"] == charges
    assert await dump(pool) == reference(world.events, OFFER)


async def test_the_import_command_stopped_half_way_resumes_where_it_stopped(
    pool: asyncpg.Pool, dsn: str
) -> None:
    """`donations import` stopped by Ctrl-C (SIGINT; SIGTERM is the reconcile command's test)
    between two pages of charges (the second in flight at Stripe) exits 130 with the first page
    stored and its cursor saved; the next import goes on from that cursor and the ledger is
    whole."""
    sig = signal.SIGINT
    world = World(seed=705)
    for i in range(130):
        world.one_off(600 + i, ("gbp", "usd")[i % 2])
    async with running_fake_stripe(world) as fake:
        second_page = fake.hold("/v1/charges", after=1)

        async def first_page_stored() -> bool:
            return second_page.arrived.is_set() and bool(await pool.fetchval(
                "SELECT imported = 100 FROM import_progress WHERE resource = 'charges'"))

        code, err = await signalled_half_way(
            ["import", "--since", "2026-11-01"],
            _env(DATABASE_URL=dsn, STRIPE_SECRET_KEY=TEST_KEY, STRIPE_API_BASE=fake.base_url,
                 LOG_LEVEL="warning"), sig, first_page_stored)
        second_page.release()
    assert code == 128 + sig, err[-2000:]
    row = await pool.fetchrow("SELECT * FROM import_progress WHERE resource = 'charges'")
    assert row is not None and row["finished_at"] is None and row["cursor"] is not None
    async with stripe_against(world) as (fake, stripe_client):
        result = await importer.run(pool, stripe_client, OFFER, int(row["since"]))
        assert fake.requests_to("/v1/charges")[0].query["starting_after"] == row["cursor"]
    assert (result.failed, result.imported["charges"]) == (0, 130)
    assert await dump(pool) == reference(world.events, OFFER)


async def test_real_events_outrank_imported_snapshots_in_any_order(
    client: Client, pool: asyncpg.Pool
) -> None:
    world = World(seed=704)
    paid = world.one_off(4000, "gbp")
    sub = world.subscribe(1500, "gbp", founding=True)
    snapshot_world = World(seed=704)  # the same history, stopped before the later changes
    snapshot_world.one_off(4000, "gbp")
    snapshot_world.subscribe(1500, "gbp", founding=True)
    world.refund(paid.charge, 1000)
    world.change_amount(sub.subscription, 2500)
    async with stripe_against(snapshot_world) as (fake, stripe_client):
        fake.use_world_clock()  # listed at the snapshot's time, before the later changes
        await importer.run(pool, stripe_client, OFFER, SINCE, now=snapshot_world.now + 60)
    rng = random.Random(4)
    shuffled = list(world.events)
    rng.shuffle(shuffled)
    await post_all(client, shuffled)
    assert await dump(pool) == reference(world.events, OFFER)


# --- what keeps changing, and one import at a time -------------------------------------------


async def test_import_brings_in_a_live_subscription_created_before_since(
    pool: asyncpg.Pool,
) -> None:
    """A publisher moving an account over: a subscription started before --since is still
    live; it is imported with its renewals after --since (subscriptions are listed whenever
    they were made)."""
    world = World(seed=901)
    sub = world.subscribe(1500, "gbp", campaign="winter")
    world.advance(5 * DAY)
    since = world.now
    renewal = world.renew(sub.subscription)
    async with stripe_against(world) as (_, stripe_client):
        result = await importer.run(pool, stripe_client, OFFER, since, now=world.now + 60)
    assert result.failed == 0
    # the renewal after --since is in the ledger as a payment of that subscription ...
    renewed = await pool.fetchrow(
        "SELECT kind, subscription FROM payments WHERE invoice = $1", renewal.invoice)
    assert renewed is not None
    assert dict(renewed) == {"kind": "recurring", "subscription": sub.subscription}
    # ... and so is the subscription it belongs to, active at Stripe
    status = await pool.fetchval("SELECT status FROM subscriptions WHERE id = $1",
                                 sub.subscription)
    assert status == "active"


async def _cancelled_in_a_gap(pool: asyncpg.Pool, world: World, subscription: str) -> int:
    """Two days on, the subscription is cancelled while the service is away (its events are
    never delivered) and reconciliation has recorded that day as a gap; returns its start."""
    world.advance(2 * DAY)
    gap_from = world.now
    world.cancel(subscription, at_period_end=False)
    world.advance(DAY)
    await pool.execute(
        "INSERT INTO reconciliation_checkpoint (events_through, gap_from, gap_to)"
        " VALUES ($1, $1, $2) ON CONFLICT (id) DO UPDATE SET gap_from = $1, gap_to = $2",
        gap_from, world.now)
    return gap_from


async def test_import_covering_a_reconciliation_gap_brings_in_what_changed_in_it(
    client: Client, pool: asyncpg.Pool
) -> None:
    """The events of a reconciliation gap are brought in by `import --since <gap start>`,
    which clears the gap: a subscription created before the gap and cancelled inside it is
    cancelled in the ledger."""
    world = World(seed=902)
    sub = world.subscribe(1500, "gbp")
    await post_all(client, world.events)  # delivered before the service went away
    gap_from = await _cancelled_in_a_gap(pool, world, sub.subscription)
    async with stripe_against(world) as (_, stripe_client):
        await importer.run(pool, stripe_client, OFFER, gap_from, now=world.now + 60)
    # the import says the gap is covered ...
    assert await pool.fetchval("SELECT gap_from FROM reconciliation_checkpoint") is None
    # ... and the cancellation it held is in the ledger
    status = await pool.fetchval("SELECT status FROM subscriptions WHERE id = $1",
                                 sub.subscription)
    assert status == "canceled"


async def test_one_import_at_a_time(pool: asyncpg.Pool, dsn: str) -> None:
    """Two imports at once would reset each other's progress: the second is refused."""
    world = World(seed=903)
    world.one_off(1000, "gbp")
    async with pool.acquire() as holder:
        await holder.execute("SELECT pg_advisory_lock($1)", importer.LOCK_KEY)  # the first
        try:
            async with stripe_against(world) as (fake, stripe_client):
                with pytest.raises(importer.AlreadyImporting):
                    await importer.run(pool, stripe_client, OFFER, SINCE, now=world.now + 60)
                assert fake.requests == []
            code, _, err = await _run("import", "--since", "2026-11-01",
                                      env=_env(DATABASE_URL=dsn, STRIPE_SECRET_KEY=TEST_KEY,
                                               STRIPE_API_BASE="http://127.0.0.1:9"))
        finally:
            await holder.execute("SELECT pg_advisory_unlock($1)", importer.LOCK_KEY)
    assert code == 1 and "another import is running" in err


async def test_an_import_that_skipped_everything_does_not_clear_a_later_gap(
    client: Client, pool: asyncpg.Pool
) -> None:
    """An import clears a reconciliation gap only if it listed every kind of object over the
    gap without a failure: one with the --since of an import finished before, which lists
    nothing new, leaves a later gap open."""
    from donations import importer
    from donations.ledger import FoundingOffer
    from tests.fakestripe.world import DAY, World

    world = World(seed=902)
    sub = world.subscribe(1500, "gbp")
    await post_all(client, world.events)
    since = world.now - DAY
    async with stripe_against(world) as (_, stripe_client):
        await importer.run(pool, stripe_client, FoundingOffer(), since, now=world.now + 60)
    await _cancelled_in_a_gap(pool, world, sub.subscription)
    async with stripe_against(world) as (_, stripe_client):
        again = await importer.run(pool, stripe_client, FoundingOffer(), since,
                                   now=world.now + 60)
    assert set(again.skipped) == {r.name for r in importer.RESOURCES} | {importer.REFERENCES}
    status = await pool.fetchval("SELECT status FROM subscriptions WHERE id = $1",
                                 sub.subscription)
    gap = await pool.fetchval("SELECT gap_from FROM reconciliation_checkpoint")
    assert gap is not None or status == "canceled", (gap, status)


async def test_an_interrupted_import_starts_over_when_its_cursor_object_is_gone(
    pool: asyncpg.Pool,
) -> None:
    world = scenario(seed=704, steps=40)
    charges = [o["id"] for o in world.objects.values() if o.get("object") == "charge"]
    async with stripe_against(world) as (fake, stripe_client):
        fake.fail_next(1, 500, "/v1/charges", should_retry=False, after=1)
        with pytest.raises(stripe.APIError):
            await importer.run(pool, stripe_client, OFFER, SINCE, now=world.now + 60,
                               page_size=10)
        cursor = await pool.fetchval(
            "SELECT cursor FROM import_progress WHERE resource = 'charges'")
        assert cursor in charges
        del world.objects[cursor]  # deleted at Stripe meanwhile (a test-mode clean-up, say)
        result = await importer.run(pool, stripe_client, OFFER, SINCE, now=world.now + 60,
                                    page_size=10)
    assert result.failed == 0
    stored = {r["id"] for r in await pool.fetch(
        "SELECT data ->> 'id' AS id FROM stripe_objects WHERE object = 'charge'")}
    assert stored >= set(charges) - {cursor}


async def test_an_import_covering_a_gap_brings_in_a_subscription_changed_in_it(
    client: Client, pool: asyncpg.Pool
) -> None:
    """An imported snapshot is what Stripe said when it was listed: it outranks every real
    event stamped before. A subscription upgraded from 15.00 to 25.00 a month (and set to
    cancel at the period's end) during a reconciliation gap has, after the import covering the
    gap, the new price and the cancellation, not its `customer.subscription.created` event's;
    importing again changes nothing."""
    world = World(seed=9302)
    sub = world.subscribe(1500, "gbp")
    await post_all(client, world.events)  # delivered before the service went away
    world.advance(2 * DAY)
    gap_from = world.now
    world.change_amount(sub.subscription, 2500)  # webhooks lost, beyond Stripe's 30 days
    world.cancel(sub.subscription, at_period_end=True)
    world.advance(DAY)
    await pool.execute(
        "INSERT INTO reconciliation_checkpoint (events_through, gap_from, gap_to)"
        " VALUES ($1, $1, $2) ON CONFLICT (id) DO UPDATE SET gap_from = $1, gap_to = $2",
        gap_from, world.now)
    async with stripe_against(world) as (fake, stripe_client):
        fake.use_world_clock()
        done = await importer.run(pool, stripe_client, OFFER, gap_from, now=world.now + 60)
        assert done.failed == 0
        assert await pool.fetchval("SELECT gap_from FROM reconciliation_checkpoint") is None
        row = await pool.fetchrow(
            "SELECT amount, cancel_at_period_end FROM subscriptions WHERE id = $1",
            sub.subscription)
        assert row is not None
        assert dict(row) == {"amount": 2500, "cancel_at_period_end": True}
        before = await dump(pool)
        events = await pool.fetchval("SELECT count(*) FROM stripe_events")
        world.advance(3600)
        again = await importer.run(pool, stripe_client, OFFER, gap_from - DAY,
                                   now=world.now + 60)
    assert (again.applied, again.failed) == (0, 0)
    assert await dump(pool) == before
    assert await pool.fetchval("SELECT count(*) FROM stripe_events") == events


async def test_import_since_between_a_failed_renewal_and_its_retry_keeps_it_recurring(
    pool: asyncpg.Pool,
) -> None:
    """`import --since D` in the middle of a subscription's life: a renewal invoiced (its
    first attempt failed) before D and paid by Smart Retries after D is in the ledger as the
    events would give it (recurring, of its subscription, for its campaign): the payment
    intent, invoice payment and invoice a listed charge refers to are imported whenever they
    were made."""
    world = World(seed=9303)
    sub = world.subscribe(1500, "gbp", campaign="winter")
    world.fail_renewal(sub.subscription)
    world.advance(DAY)
    since = world.now
    retried = world.retry_renewal(sub.subscription, after=2 * DAY)
    async with stripe_against(world) as (fake, stripe_client):
        result = await importer.run(pool, stripe_client, OFFER, since, now=world.now + 60)
        assert result.failed == 0
        row = await pool.fetchrow(
            "SELECT kind, subscription, campaign FROM payments WHERE charge = $1",
            retried.charge)
        assert row is not None
        assert dict(row) == {"kind": "recurring", "subscription": sub.subscription,
                             "campaign": "winter"}
        # finished: run again, nothing is asked of Stripe
        fake.requests.clear()
        again = await importer.run(pool, stripe_client, OFFER, since, now=world.now + 60)
        assert importer.REFERENCES in again.skipped and fake.requests == []


# --- importing again later, old supporters, and how it reports -------------------------------


async def test_an_import_over_a_later_gap_brings_in_changes_to_objects_imported_before(
    pool: asyncpg.Pool,
) -> None:
    """The account is moved over with `import --since`; months later the service is away for
    longer than Stripe keeps events, reconciliation records the gap and `import --since <gap
    start>` covers it. A subscription the first import brought in and cancelled inside the gap
    is cancelled after the second import: the synthetic event's id follows the object's content,
    so the snapshot listed now is not taken for the one imported before."""
    world = World(seed=9401)
    sub = world.subscribe(1500, "gbp")
    world.advance(DAY)
    async with stripe_against(world) as (fake, stripe_client):
        fake.use_world_clock()
        first = await importer.run(pool, stripe_client, OFFER, world.now - 3 * DAY,
                                   now=world.now + 60)
        assert first.failed == 0
    assert await pool.fetchval("SELECT status FROM subscriptions WHERE id = $1",
                               sub.subscription) == "active"
    world.advance(40 * DAY)
    gap_from = await _cancelled_in_a_gap(pool, world, sub.subscription)
    async with stripe_against(world) as (fake, stripe_client):
        fake.use_world_clock()
        second = await importer.run(pool, stripe_client, OFFER, gap_from, now=world.now + 60)
    assert second.failed == 0
    assert await pool.fetchval("SELECT gap_from FROM reconciliation_checkpoint") is None
    assert await pool.fetchval("SELECT status FROM subscriptions WHERE id = $1",
                               sub.subscription) == "canceled"
    # one subscription row, two snapshots of it stored as events
    assert await pool.fetchval("SELECT count(*) FROM subscriptions") == 1
    assert await pool.fetchval(
        "SELECT count(*) FROM stripe_events WHERE id LIKE $1",
        f"evt\\_import\\_{sub.subscription}\\_%") == 2


async def test_an_object_back_in_a_state_imported_before_is_imported_again(
    client: Client, pool: asyncpg.Pool,
) -> None:
    """A subscription imported as it was (A), set to cancel at the period's end by a real event
    (B), then listed again as A by a later import (the reader changed their mind during a gap):
    A's synthetic event is stored already but no longer wins, so it is stored again under an id
    salted with when it was listed, and the ledger has A."""
    before = World(seed=9406)  # the subscription as listed, both times
    before.subscribe(1500, "gbp")
    world = World(seed=9406)  # the same history, with the cancellation after the first listing
    sub = world.subscribe(1500, "gbp")
    async with stripe_against(before) as (fake, stripe_client):
        fake.use_world_clock()
        await importer.run(pool, stripe_client, OFFER, before.now - DAY, now=before.now + 60)
    world.advance(DAY)
    await post_all(client, world.cancel(sub.subscription, at_period_end=True).events)
    query = "SELECT cancel_at_period_end FROM subscriptions WHERE id = $1"
    assert await pool.fetchval(query, sub.subscription) is True
    before.advance(3 * DAY)  # listed again after the cancellation's event
    async with stripe_against(before) as (fake, stripe_client):
        fake.use_world_clock()
        again = await importer.run(pool, stripe_client, OFFER, before.now - 2 * DAY,
                                   now=before.now + 60)
        assert (again.applied, again.failed) == (1, 0)
        assert await pool.fetchval(query, sub.subscription) is False
        # and once more: the kept snapshot is what Stripe lists, nothing is stored
        events = await pool.fetchval("SELECT count(*) FROM stripe_events")
        once_more = await importer.run(pool, stripe_client, OFFER, before.now - 4 * DAY,
                                       now=before.now + 60)
    assert (once_more.applied, once_more.failed) == (0, 0)
    assert await pool.fetchval("SELECT count(*) FROM stripe_events") == events


async def test_objects_imported_by_an_earlier_release_are_not_stored_again(
    pool: asyncpg.Pool,
) -> None:
    """An earlier release named every synthetic event `evt_import_<object id>`. Importing again
    after the upgrade stores nothing for the objects that did not change since: their kept
    snapshot is already what Stripe lists."""
    world = scenario(seed=706, steps=20)
    async with stripe_against(world) as (_, stripe_client):
        await importer.run(pool, stripe_client, OFFER, SINCE, now=world.now + 60)
        # as the earlier release named them
        await pool.execute("UPDATE stripe_events SET id = regexp_replace(id, '_[0-9a-f]{16}$', '')"
                           " WHERE id LIKE 'evt\\_import\\_%'")
        await pool.execute(
            "UPDATE stripe_objects SET event_id = regexp_replace(event_id, '_[0-9a-f]{16}$', '')"
            " WHERE event_id LIKE 'evt\\_import\\_%'")
        before = await dump(pool)
        events = await pool.fetchval("SELECT count(*) FROM stripe_events")
        again = await importer.run(pool, stripe_client, OFFER, SINCE - DAY, now=world.now + 60)
    assert (again.applied, again.failed) == (0, 0)
    assert await dump(pool) == before
    assert await pool.fetchval("SELECT count(*) FROM stripe_events") == events


async def test_a_founding_subscription_imported_keeps_its_seat_and_discount_after_a_renewal(
    client: Client, pool: asyncpg.Pool,
) -> None:
    """A founding supporter who subscribed before --since: the import lists the subscription
    with its discounts expanded, so the row is founding and 50% off. Its next renewal's
    `customer.subscription.updated` (events name discounts by id) outranks the imported
    snapshot; the discount was stored as a snapshot of its own (as its
    `customer.discount.created` would have been), so the row keeps its seat and discount."""
    world = World(seed=9402)
    sub = world.subscribe(1500, "gbp", founding=True)
    world.advance(5 * DAY)
    since = world.now
    async with stripe_against(world) as (fake, stripe_client):
        fake.use_world_clock()
        done = await importer.run(pool, stripe_client, OFFER, since, now=world.now + 60)
    assert done.failed == 0
    query = "SELECT founding, percent_off FROM subscriptions WHERE id = $1"
    row = await pool.fetchrow(query, sub.subscription)
    assert row is not None and (row["founding"], row["percent_off"]) == (True, 50)
    assert await pool.fetchval(
        "SELECT count(*) FROM stripe_objects WHERE object = 'discount'"
        " AND subscription_id = $1", sub.subscription) == 1
    renewal = world.renew(sub.subscription)  # a month on, delivered by webhook
    await post_all(client, renewal.events)
    row = await pool.fetchrow(query, sub.subscription)
    assert row is not None
    assert (row["founding"], row["percent_off"]) == (True, 50)


async def test_the_customer_of_a_supporter_who_joined_before_since_is_imported(
    pool: asyncpg.Pool,
) -> None:
    """A monthly supporter since long before --since: their subscription is imported (listed
    whenever made) and so is their renewal after --since, and so is their customer (customers
    are listed whenever made too): the portal finds them by e-mail, the reports name them."""
    world = World(seed=9403)
    sub = world.subscribe(1500, "gbp", email="old.reader@example.org")
    world.advance(5 * DAY)
    since = world.now
    renewal = world.renew(sub.subscription)
    async with stripe_against(world) as (_, stripe_client):
        done = await importer.run(pool, stripe_client, OFFER, since, now=world.now + 60)
    assert done.failed == 0
    assert await pool.fetchval("SELECT customer FROM payments WHERE invoice = $1",
                               renewal.invoice) == sub.customer
    # the portal's own look-up by e-mail (donations/portal.py)
    found = await pool.fetchval(
        "SELECT c.id FROM customers c WHERE lower(c.email) = lower($1) AND NOT c.deleted",
        "old.reader@example.org")
    assert found == sub.customer


async def test_the_progress_bar_is_not_full_while_older_objects_are_still_listed(
    pool: asyncpg.Pool,
) -> None:
    """Refunds (like customers, subscriptions, disputes and payouts) are listed whatever their
    age: --since is no start to measure them against, so their line shows the creation date
    reached and the count, and only the finishing frame says 100%."""
    world = World(seed=9404)
    for i in range(12):
        paid = world.one_off(1000 + i, "gbp")
        assert paid.charge is not None
        world.refund(paid.charge, 100)
        world.advance(DAY)
    since = world.now  # every refund is older than --since
    shown = Terminal()
    async with stripe_against(world) as (_, stripe_client):
        done = await importer.run(pool, stripe_client, OFFER, since, now=world.now + 60,
                                  progress=shown, page_size=3,
                                  resources=tuple(r for r in importer.RESOURCES
                                                  if r.name == "refunds"))
    assert done.imported["refunds"] == 12
    frames = [f for f in shown.getvalue().split("\r") if f.startswith("refunds")]
    assert len(frames) >= 5  # the start, four pages, the end
    assert frames[-1].endswith("\n") and "100%" in frames[-1]
    early = [f for f in frames[:-1] if "%" in f]
    assert early == [], early
    assert "back to" in frames[-2] and frames[-2].rstrip().endswith("12 imported")
    assert len({len(f.rstrip("\n")) for f in frames}) == 1  # each frame covers the one before


async def test_the_import_command_says_in_one_line_that_stripe_failed(dsn: str) -> None:
    """Stripe failing (an outage, a revoked key) stops `donations import` as it stops
    `reconcile`: one line saying so, no traceback, exit 1."""
    world = World(seed=9405)
    world.one_off(1000, "gbp")
    async with running_fake_stripe(world) as fake:
        fake.fail_next(20, 500, "/v1/customers", should_retry=False)
        code, _, err = await _run(
            "import", "--since", "2026-11-01",
            env=_env(DATABASE_URL=dsn, STRIPE_SECRET_KEY=TEST_KEY,
                     STRIPE_API_BASE=fake.base_url, LOG_LEVEL="warning"))
    assert code == 1, err[-2000:]
    assert "Traceback" not in err, err[-2000:]
    lines = [line for line in err.splitlines() if line.startswith("donations: ")]
    assert len(lines) == 1, err[-2000:]
    assert lines[0].startswith("donations: Stripe failed: APIError: ")
    assert lines[0].endswith("; run it again to resume where it stopped")
    assert TEST_KEY not in err


async def _record_gap(pool: asyncpg.Pool, gap_from: int, gap_to: int) -> None:
    await pool.execute(
        "INSERT INTO reconciliation_checkpoint (events_through, gap_from, gap_to)"
        " VALUES ($1, $1, $2) ON CONFLICT (id) DO UPDATE SET gap_from = $1, gap_to = $2",
        gap_from, gap_to)


async def test_import_clearing_a_gap_brings_in_a_bank_debit_that_settled_in_it(
    client: Client, pool: asyncpg.Pool
) -> None:
    """A bank debit submitted before a reconciliation gap (charge pending, payment intent
    processing, session completed unpaid: delivered) settles inside the gap (its events older
    than Stripe's 30 days). The charge and intent were made before --since, so no listing by
    creation date reaches them: the import asks again for what it had stored in flight (and
    what that now names), and the gap it clears is really covered."""
    world = World(seed=95001)
    start = world.now
    world.async_checkout(2000, "gbp", succeed=True, settle_after=3 * DAY)
    gap_from = start + DAY  # after the debit was submitted, before it settled
    await post_all(client, [e for e in world.events if e["created"] < gap_from])
    world.advance(DAY)
    await _record_gap(pool, gap_from, world.now)
    async with stripe_against(world) as (fake, stripe_client):
        fake.use_world_clock()
        done = await importer.run(pool, stripe_client, OFFER, gap_from, now=world.now + 60)
    assert done.failed == 0
    assert await pool.fetchval("SELECT gap_from FROM reconciliation_checkpoint") is None
    assert await dump(pool) == reference(world.events, OFFER)


async def test_an_object_that_failed_to_apply_is_applied_by_running_the_import_again(
    pool: asyncpg.Pool,
) -> None:
    """An object that failed to apply makes the import exit 1 and keeps the gap; running it
    again with the same --since (its listings finished) applies what failed before
    (README: "run it again to resume"), and only then is the gap cleared."""
    world = World(seed=95003)
    world.one_off(1000, "gbp")
    world.advance(DAY)
    since = world.now - 3 * DAY
    await _record_gap(pool, since, world.now)
    async with stripe_against(world) as (fake, stripe_client):
        fake.use_world_clock()
        async with payments_refused(pool):
            first = await importer.run(pool, stripe_client, OFFER, since, now=world.now + 60)
        assert first.failed > 0
        assert await pool.fetchval("SELECT gap_from FROM reconciliation_checkpoint") is not None
        again = await importer.run(pool, stripe_client, OFFER, since, now=world.now + 60)
    gap = await pool.fetchval("SELECT gap_from FROM reconciliation_checkpoint")
    failed = await pool.fetchval("SELECT count(*) FROM stripe_events WHERE status = 'failed'")
    # either the run again applies what failed, or it does not claim the gap covered
    assert failed == 0 or (gap is not None and again.failed > 0), (failed, gap, again)
    assert await dump(pool) == reference(world.events, OFFER)


async def test_a_checkout_opened_before_since_and_paid_after_it_keeps_its_session(
    pool: asyncpg.Pool,
) -> None:
    """A reader opens the checkout page a few seconds before --since and pays after it:
    checkout sessions are listed from a day before --since (a session stays open up to 24 h),
    so the payment has its session, as its events give it."""
    world = World(seed=95004)
    start = world.now
    paid = world.one_off(2500, "gbp", email="reader@example.org", campaign="winter")
    since = start + 10  # the session was opened before --since, paid after it
    async with stripe_against(world) as (fake, stripe_client):
        fake.use_world_clock()
        done = await importer.run(pool, stripe_client, OFFER, since, now=world.now + 60)
    assert done.failed == 0
    assert paid.payment_intent is not None
    got = (await dump(pool))["payments"][paid.payment_intent]
    want = reference(world.events, OFFER)["payments"][paid.payment_intent]
    assert got["checkout_session"] == want["checkout_session"] == paid.checkout_session


async def test_a_listing_started_over_does_not_count_its_objects_twice(
    pool: asyncpg.Pool,
) -> None:
    """When the saved cursor's object is gone at Stripe the listing starts over, and its count
    with it: the command does not print more charges imported than the account has."""
    world = World(seed=95005)
    for i in range(25):
        world.one_off(1000 + i, "gbp")
    charges = [o["id"] for o in world.objects.values() if o.get("object") == "charge"]
    only_charges = tuple(r for r in importer.RESOURCES if r.name == "charges")
    async with stripe_against(world) as (fake, stripe_client):
        fake.fail_next(1, 500, "/v1/charges", should_retry=False, after=1)
        try:
            await importer.run(pool, stripe_client, OFFER, world.now - 10 * DAY,
                               now=world.now + 60, page_size=10, resources=only_charges)
        except stripe.APIError:
            pass
        else:
            raise AssertionError("the listing was not interrupted")
        cursor = await pool.fetchval(
            "SELECT cursor FROM import_progress WHERE resource = 'charges'")
        del world.objects[cursor]  # deleted at Stripe meanwhile
        result = await importer.run(pool, stripe_client, OFFER, world.now - 10 * DAY,
                                    now=world.now + 60, page_size=10, resources=only_charges)
    assert result.failed == 0
    assert result.imported["charges"] <= len(charges), (result.imported, len(charges))


def _since(world: World, since: int) -> list[dict[str, object]]:
    """The events Stripe sent from `since` on: what webhooks delivered to a service started
    then (each carries the object it is about as it was then)."""
    return [e for e in world.events if int(e["created"]) >= since]


@pytest.mark.xfail(strict=True, reason=(
    "a known limitation: a fresh import lists charges, payment intents and sessions by when they "
    "were made, so a bank debit submitted before --since and settled after it (older than the 30 "
    "days of events reconciliation reads) is not brought in"))
async def test_a_bank_debit_submitted_before_since_and_settled_after_it_is_imported(
    pool: asyncpg.Pool,
) -> None:
    """A reader pays by SEPA/Bacs debit through Checkout two days before --since (charge
    pending, payment intent processing, session completed unpaid); the bank collects it two
    days after --since. The money arrived inside the window: the webhooks of the window
    (charge.succeeded, payment_intent.succeeded, checkout.session.async_payment_succeeded)
    give a succeeded one-off payment of 20.00. A fresh `import --since` must give the same
    payment; the charge, payment intent and session were all created before --since (the
    session more than a day before), so no listing by creation date reaches them, and
    REFERENCES only follows charges and invoice payments created after --since."""
    world = World(seed=99108)
    start = world.now
    paid = world.async_checkout(2000, "gbp", succeed=True, settle_after=4 * DAY)
    world.advance(DAY)
    since = start + 2 * DAY  # after the submission (and its session's day), before settlement
    async with stripe_against(world) as (fake, stripe_client):
        fake.use_world_clock()
        done = await importer.run(pool, stripe_client, OFFER, since, now=world.now + 60)
    assert done.failed == 0
    want = reference(_since(world, since), OFFER)["payments"][paid.payment_intent]
    assert (want["status"], want["amount"]) == ("succeeded", 2000)
    got = (await dump(pool))["payments"].get(paid.payment_intent)
    assert got == want


@pytest.mark.parametrize("settled", [True, False], ids=["refund", "failed_refund"])
async def test_a_refund_after_since_of_an_older_payment_brings_in_the_payment(
    pool: asyncpg.Pool, settled: bool,
) -> None:
    """A payment made five days before --since is refunded after it (or a refund made before
    it fails after it). Refunds are imported whatever their age, but the charge and payment
    intent they refund are not: the ledger gets a refund row whose payment does not exist,
    while the webhooks of the window (charge.refunded / charge.refund.updated carry the charge)
    give the payment with its refund. What a listed refund refers to must be brought in like
    what a listed charge or invoice payment refers to."""
    world = World(seed=99110)
    paid = world.one_off(4000, "gbp")
    pending = None if settled else world.refund(paid.charge, 1000, settle=False)
    world.advance(5 * DAY)
    since = world.now
    if pending is None:
        world.refund(paid.charge, 1000)
    else:
        world.fail_refund(pending.refund)
    async with stripe_against(world) as (fake, stripe_client):
        fake.use_world_clock()
        done = await importer.run(pool, stripe_client, OFFER, since, now=world.now + 60)
    assert done.failed == 0
    got = await dump(pool)
    want = reference(_since(world, since), OFFER)
    assert paid.payment_intent in want["payments"]
    assert got["refunds"] == want["refunds"]
    assert got["payments"].get(paid.payment_intent) == want["payments"][paid.payment_intent]


async def test_stripe_unreachable_is_said_on_one_line() -> None:
    """README: Stripe failing (an outage, a revoked key, retries exhausted) stops `import` and
    `reconcile` with one line, `donations: Stripe failed: <error>; …`. When Stripe cannot be
    reached at all (the commonest outage: DNS, a firewall, a proxy) the stripe library's
    APIConnectionError says so over several lines ("…If this problem persists,\nlet us know
    at support@stripe.com.\n\n(Network error: …)"): the commands put it on one."""
    http_client = stripe.AIOHTTPClient(timeout=5)
    client = stripe.StripeClient(TEST_KEY, base_addresses={"api": "http://127.0.0.1:9"},
                                 max_network_retries=0, http_client=http_client)
    try:
        with pytest.raises(stripe.APIConnectionError) as raised:
            await client.v1.charges.list_async()
    finally:
        await http_client.close_async()  # type: ignore[no-untyped-call]
    assert "\n" in str(raised.value.user_message or raised.value)  # as the library says it
    said = cli._stripe_said(raised.value)
    assert "\n" not in said and said.startswith("APIConnectionError: Unexpected error"), said
    assert "(Network error: " in said


async def test_the_import_command_stopped_on_a_terminal_says_so_on_a_line_of_its_own(
    pool: asyncpg.Pool, dsn: str,
) -> None:
    """On a terminal `donations import` draws a progress line per object type (`\\r`, no
    newline until the type is finished). Stopped by Ctrl-C between two pages of charges, it
    must end that line before saying `donations: stopped by SIGINT`, as it does before
    `donations: Stripe failed: …` (cli.py ends the bar's line there): otherwise the one line
    the operator reads is glued to the end of the bar, `… 100 importeddonations: stopped by
    SIGINT`."""
    import asyncio
    import os
    import pty
    import signal
    import sys

    from tests.conftest import wait_until
    from tests.fakestripe.server import running_fake_stripe

    world = World(seed=99120)
    for i in range(130):
        world.one_off(600 + i, "gbp")
    async with running_fake_stripe(world) as fake:
        second_page = fake.hold("/v1/charges", after=1)
        master, slave = pty.openpty()
        env = _env(DATABASE_URL=dsn, STRIPE_SECRET_KEY=TEST_KEY, STRIPE_API_BASE=fake.base_url,
                   LOG_LEVEL="error")
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "donations", "import", "--since", "2026-11-01", env=env,
            stdout=asyncio.subprocess.DEVNULL, stderr=slave)
        os.close(slave)
        chunks: list[bytes] = []

        def drain() -> None:
            while True:
                try:
                    data = os.read(master, 4096)
                except OSError:
                    return
                if not data:
                    return
                chunks.append(data)

        reader = asyncio.get_running_loop().run_in_executor(None, drain)
        try:
            async def first_page_stored() -> bool:
                return second_page.arrived.is_set() and bool(await pool.fetchval(
                    "SELECT imported = 100 FROM import_progress WHERE resource = 'charges'"))

            await wait_until(first_page_stored, within=30)
            process.send_signal(signal.SIGINT)
            second_page.release()
            code = await asyncio.wait_for(process.wait(), 30)
        finally:
            if process.returncode is None:
                process.kill()
                await process.wait()
        await asyncio.wait_for(reader, 10)
        os.close(master)
    shown = b"".join(chunks).decode()
    assert code == 130, shown[-2000:]
    assert "charges" in shown and "imported" in shown  # the bar was drawn
    said = [line for line in shown.split("\n") if "donations: stopped by SIGINT" in line]
    assert len(said) == 1, shown[-2000:]
    # what stays on the screen of that line: from its last carriage return on
    assert said[0].rstrip("\r").split("\r")[-1].startswith("donations: "), repr(said[0])


@pytest.mark.xfail(strict=True, reason=(
    "a known limitation: Stripe's customer listing leaves deleted customers out, and the import "
    "does not ask again for the stored ones it did not list: one deleted in a gap older than 30 "
    "days stays live in the ledger"))
async def test_an_import_covering_a_gap_brings_in_a_customer_deleted_in_it(
    client: Client, pool: asyncpg.Pool,
) -> None:
    """A supporter's customer, delivered by webhooks, is deleted at Stripe during a
    reconciliation gap (its `customer.deleted` older than Stripe's 30 days). Stripe's
    `GET /v1/customers` leaves deleted customers out, so the listing cannot tell; the import
    covering the gap clears it all the same, and the ledger keeps the customer live: the portal
    still finds them by e-mail and the reports name them. Expected: either the import asks
    again for the stored customers the listing no longer has (Stripe answers `deleted: true`)
    and marks them deleted, or it does not claim the gap covered."""
    from tests.test_import import _record_gap
    from tests.webhook_helpers import post_all

    world = World(seed=99130)
    sub = world.subscribe(1500, "gbp", email="leaving@example.org")
    await post_all(client, world.events)
    world.advance(DAY)
    gap_from = world.now
    world.cancel(sub.subscription, at_period_end=False)
    del world.objects[sub.customer]  # deleted at Stripe: no longer listed
    world.advance(DAY)
    await _record_gap(pool, gap_from, world.now)
    async with stripe_against(world) as (fake, stripe_client):
        fake.use_world_clock()
        done = await importer.run(pool, stripe_client, OFFER, gap_from, now=world.now + 60)
    assert done.failed == 0
    assert await pool.fetchval("SELECT status FROM subscriptions WHERE id = $1",
                               sub.subscription) == "canceled"
    deleted = await pool.fetchval("SELECT deleted FROM customers WHERE id = $1", sub.customer)
    gap = await pool.fetchval("SELECT gap_from FROM reconciliation_checkpoint")
    assert deleted is True or gap is not None, (deleted, gap)
