"""The upgrade path from 018 on a populated database, a rolling deploy with 018-era
replicas still running, and the background workers that fill payments.settled_at.

The 018 database is built and filled by the code as of commit 43f94b7 (extracted with
`git archive`, run in a subprocess from that tree): webhooks through its app, fees through its fee
worker, a payout through its payout worker, a few look-ups still queued. Each test upgrades a copy
of it (CREATE DATABASE … TEMPLATE) with this tree's migrations.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import secrets
import subprocess
import sys
import tarfile
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from donations import auth, db, fees, payouts, reports, seats, totals
from donations.events import parse_event, subscription_period_start
from donations.ingest import ingest
from donations.ledger import FoundingOffer, snapshot_of
from donations.metrics import Metrics
from tests.conftest import Client, _admin, _with_database, scratch_database
from tests.fakestripe.world import World
from tests.test_fees import stripe_against
from tests.test_ledger_shapes_more import _one_off_invoice
from tests.webhook_helpers import post_all

REPO = Path(__file__).resolve().parent.parent
OLD_COMMIT = "43f94b7"
UPGRADE = ("019_payments_settled_at.sql", "020_founding_coupon_used_up.sql",
           "021_staff_sessions.sql", "022_founding_holds_per_client.sql",
           "023_ledger_ties_and_settlement.sql", "024_summary_rates.sql",
           "025_metrics_counts.sql", "026_discrepancies_by_run.sql",
           "027_discrepancy_pages.sql", "028_discrepancies_by_status.sql",
           "029_founding_seats_never_started.sql",
           "030_subscription_statuses.sql", "031_coupons.sql", "032_failed_bank_debits.sql",
           "033_subscription_period_progress.sql", "034_founding_holds_per_site.sql",
           "035_supporter_emails.sql", "036_one_off_invoices.sql",
           "037_booked_debits_by_transaction.sql", "038_coupon_progress.sql",
           "039_failed_debits.sql", "040_booked_debits_indexes_dropped.sql",
           "041_failed_debits_fees.sql")

# Run with the 018-era code (cwd: its tree): fill a database at 018 as that code would.
POPULATE = r'''
import asyncio, json, sys
from aiohttp.test_utils import TestClient, TestServer
from donations import db, fees, payouts, campaigns, auth
from donations.app import create_app
from donations.metrics import Metrics
from tests.conftest import make_settings
from tests.fakestripe.world import World
from tests.webhook_helpers import post_all
from tests.test_fees import stripe_against

async def main(dsn, out_path):
    await db.migrate(dsn)
    pool = await db.create_pool(dsn)
    async with db.connection(pool) as conn:
        await campaigns.create(conn, "spring", "Spring", None, None, None, None, "gbp")
        await auth.create_token(conn, "finance", ["reports:read"])
    world = World(seed=18)
    posted = 0
    app = create_app(make_settings(dsn))
    async with TestClient(TestServer(app)) as client:
        async def flush():
            nonlocal posted
            await post_all(client, world.events[posted:])
            posted = len(world.events)
        # fees fetched by the 018 fee worker
        a = world.one_off(2500, "gbp", email="a@example.org")
        world.one_off(1500, "usd", campaign="spring", email="b@example.org")
        c = world.one_off(1000, "jpy", email="c@example.org")
        world.async_checkout(3000, "eur", True, email="d@example.org")
        sub = world.subscribe(500, "gbp", founding=True, email="e@example.org", campaign="spring")
        world.renew(sub.subscription)
        world.refund(a.charge, 500)
        world.dispute(c.charge, "lost")
        await flush()
        async with stripe_against(world) as (fake, sc):
            while await fees.run_once(pool, sc, Metrics()):
                pass
        # balance transactions stored by the 018 payout worker only
        world.one_off(4200, "gbp", email="f@example.org")
        world.async_checkout(2200, "eur", True, email="g@example.org", campaign="spring")
        await flush()
        world.payout()
        await flush()
        async with stripe_against(world) as (fake, sc):
            while await payouts.run_once(pool, sc):
                pass
        # still queued at the upgrade: a card payment and a SEPA debit
        late_card = world.one_off(900, "gbp", email="h@example.org")
        late_sepa = world.async_checkout(1800, "eur", True, email="i@example.org")
        await flush()
    await pool.close()
    with open(out_path, "w") as out:
        json.dump({"balance_transactions": world.balance_transactions,
                   "late_sepa": late_sepa.payment_intent,
                   "late_card": late_card.payment_intent}, out, default=str)

asyncio.run(main(sys.argv[1], sys.argv[2]))
'''


# --- fixtures ---------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def old_tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The code as of 43f94b7 (the 018-era replicas), extracted read-only with git archive."""
    target = tmp_path_factory.mktemp("old-donations")
    try:
        archive = subprocess.run(["git", "-C", str(REPO), "archive", OLD_COMMIT],  # noqa: S603, S607
                                 check=True, capture_output=True).stdout
    except (OSError, subprocess.CalledProcessError) as exc:  # a tree without its git history
        pytest.skip(f"the upgrade tests need git and commit {OLD_COMMIT} in the history: {exc}")
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(target, filter="data")
    return target


def run_old(old_tree: Path, code: str, *args: str) -> str:
    """Run `code` with the 018-era code importable as `donations` (and its `tests`)."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "DATABASE_URL")}
    env["PYTHONPATH"] = str(old_tree)
    done = subprocess.run([sys.executable, "-c", code, *args], cwd=old_tree, env=env,  # noqa: S603
                          capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-4000:]
    return done.stdout


@pytest.fixture(scope="session")
def template_018(server_dsn: str, old_tree: Path,
                 tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, dict[str, Any]]]:
    """A database at 018 filled by the 018-era code; the World's data beside it."""
    name = f"upgrade_018_{secrets.token_hex(4)}"
    asyncio.run(_admin(server_dsn, f'CREATE DATABASE "{name}"'))
    out = tmp_path_factory.mktemp("world") / "world.json"
    try:
        run_old(old_tree, POPULATE, _with_database(server_dsn, name), str(out))
        yield name, json.loads(out.read_text())
    finally:
        asyncio.run(_admin(server_dsn, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


@pytest.fixture
async def at_018(server_dsn: str, template_018: tuple[str, dict[str, Any]]
                 ) -> AsyncIterator[tuple[str, dict[str, Any]]]:
    """A fresh copy of the populated 018 database, dropped after the test."""
    template, world = template_018
    name = f"upgrade_copy_{secrets.token_hex(4)}"
    await _admin(server_dsn, f'CREATE DATABASE "{name}" TEMPLATE "{template}"')
    try:
        yield _with_database(server_dsn, name), world
    finally:
        await _admin(server_dsn, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


async def _rows(conn: asyncpg.Connection, table: str, drop: tuple[str, ...] = ()) -> list[Any]:
    rows = await conn.fetch(f"SELECT * FROM {table}")  # noqa: S608
    return sorted(
        json.dumps({k: v for k, v in dict(r).items() if k not in drop}, default=str,
                    sort_keys=True) for r in rows)


LEDGER = ("payments", "refunds", "disputes", "subscriptions", "customers", "payouts",
          "balance_transactions", "balance_transaction_fetches", "payout_balance_transactions",
          "payout_fetches", "totals", "totals_deltas", "totals_supporters", "totals_scopes",
          "founding_holds", "campaigns", "api_tokens", "stripe_objects")


# --- the migrations on populated tables ------------------------------------------------------


async def test_upgrade_backfills_settled_at_from_balance_transactions_and_nothing_else(
    at_018: tuple[str, dict[str, Any]]
) -> None:
    """019-022 apply to a populated 018 database; settled_at is the balance transaction's time
    where one is stored and NULL where not; every other column and table (the kept totals and
    their deltas among them) is as it was, and `totals verify` still finds no difference."""
    dsn, _ = at_018
    conn = await asyncpg.connect(dsn)
    try:
        assert await conn.fetchval("SELECT max(version) FROM schema_migrations") == 18
        # (sql/023 and sql/033 put the stored charges' and subscriptions' progress on a new
        # scale: checked below)
        before = {t: await _rows(conn, t, ("progress",) if t == "stripe_objects" else ())
                  for t in LEDGER}
        assert await conn.fetchval("SELECT count(*) FROM payments") >= 10
        assert await conn.fetchval("SELECT count(*) FROM balance_transaction_fetches") == 2
    finally:
        await conn.close()

    assert await db.migrate(dsn) == list(UPGRADE)

    conn = await asyncpg.connect(dsn)
    try:
        for table in LEDGER:
            # (sql/032's columns: NULL here, no debit in this database failed after booking)
            drop = {"payments": ("settled_at", "booked_balance_transaction",
                                 "failure_balance_transaction"), "founding_holds": ("client",),
                    "stripe_objects": ("progress",), "subscriptions": ("coupons",)}.get(table, ())
            assert await _rows(conn, table, drop) == before[table], table
        assert await conn.fetchval(
            "SELECT count(*) FROM payments WHERE booked_balance_transaction IS NOT NULL"
            " OR failure_balance_transaction IS NOT NULL") == 0
        rows = await conn.fetch(
            """SELECT p.payment_key, p.settled_at, b.created_at AS bt_created FROM payments p
                 LEFT JOIN balance_transactions b ON b.id = p.balance_transaction""")
        assert all(r["settled_at"] == r["bt_created"] for r in rows), rows
        assert sum(r["settled_at"] is not None for r in rows) == len(rows) - 2
        # a debit settled days after its charge was made is dated by its settlement
        assert await conn.fetchval(
            "SELECT count(*) FROM payments WHERE settled_at - created_at > interval '1 day'") == 2
        # the stored charges' progress is on the scale events.snapshot_version now uses
        charges = await conn.fetch("SELECT progress, data FROM stripe_objects"
                                   " WHERE object = 'charge'")
        datas = [(r["progress"], json.loads(r["data"])) for r in charges]
        assert datas and all(
            progress == 4 * int(data["amount_refunded"]) + (0 if data["captured"] is False else 2)
            + (1 if data["balance_transaction"] else 0) for progress, data in datas)
        # and the stored subscriptions' is their period's start (sql/033), the renewed one's
        subscriptions = [(r["progress"], json.loads(r["data"])) for r in await conn.fetch(
            "SELECT progress, data FROM stripe_objects WHERE object = 'subscription'")]
        assert subscriptions and all(
            progress == subscription_period_start(data) == min(
                i["current_period_start"] for i in data["items"]["data"])
            for progress, data in subscriptions), subscriptions
        result = await totals.verify(conn)
        assert result.differences == (), totals.describe(result)
        # sql/031 queues a look-up of every coupon a stored discount names (the founding one
        # here), which the coupon worker ends
        named = {json.loads(r["data"])["source"]["coupon"] for r in await conn.fetch(
            "SELECT data FROM stripe_objects WHERE object = 'discount'")}
        queued = {r["coupon_id"] for r in await conn.fetch("SELECT coupon_id FROM coupon_lookups")}
        assert named and queued == named
    finally:
        await conn.close()


async def test_upgrade_backfills_subscription_statuses_as_ingest_writes_them(
    at_018: tuple[str, dict[str, Any]]
) -> None:
    """sql/030 fills each subscription's status history from the subscription events already
    applied: the rows are those ingest writes for the same events (the time, the rank and the
    type rank as events.snapshot_version gives them, the snapshot's status)."""
    dsn, _ = at_018
    assert await db.migrate(dsn) == list(UPGRADE)
    conn = await asyncpg.connect(dsn)
    try:
        backfilled = {tuple(r) for r in await conn.fetch(
            "SELECT subscription_id, at, event_id, rank, type_rank, status"
            "  FROM subscription_statuses")}
        payloads = [r["payload"] for r in await conn.fetch(
            "SELECT payload::text AS payload FROM stripe_events WHERE status = 'processed'")]
    finally:
        await conn.close()
    expected = set()
    for payload in payloads:
        snapshot = snapshot_of(parse_event(json.loads(payload)))
        if snapshot is not None and snapshot.kind == "subscription":
            version = snapshot.version
            expected.add((snapshot.id, datetime.fromtimestamp(version.created, UTC),
                          version.event_id, version.stage, version.type_rank,
                          snapshot.get("status")))
    assert expected
    assert backfilled == expected


async def test_report_payment_branch_can_use_the_booked_at_index(
    at_018: tuple[str, dict[str, Any]]
) -> None:
    """The report's payment branch (coalesce(settled_at, created_at) in a window, succeeded
    only) matches payments_booked_at's expression and predicate, as the report runs it
    (prepared, with parameters): with sequential scans priced out the index is what is used.

    sql/019 builds the index right after its UPDATE of the table, so PostgreSQL marks it
    indcheckxmin: no snapshot older than its creation may use it. While any transaction on the
    server (another database's, another test run's) that began before the migration is still
    open, every new snapshot is that old: the plan is asked for again until it is not."""
    dsn, _ = at_018
    await db.migrate(dsn)
    conn = await asyncpg.connect(dsn)
    try:
        for _ in range(600):  # a minute at most
            async with conn.transaction():
                await conn.execute("SET LOCAL enable_seqscan = off")
                await conn.execute("SET LOCAL plan_cache_mode = force_generic_plan")
                plan = "\n".join(r[0] for r in await conn.fetch(
                    f"EXPLAIN {reports.CONTRIBUTIONS}",
                    datetime(2026, 12, 1, tzinfo=UTC), datetime(2027, 1, 1, tzinfo=UTC)))
                waiting = "payments_booked_at" not in plan and await conn.fetchval(
                    "SELECT indcheckxmin AND txid_snapshot_xmin(txid_current_snapshot())"
                    " % 4294967296 <= xmin::text::bigint FROM pg_index"
                    " WHERE indexrelid = 'payments_booked_at'::regclass")
            if not waiting:
                break
            await asyncio.sleep(0.1)
        assert "payments_booked_at" in plan, plan
    finally:
        await conn.close()


# --- a rolling deploy: 018-era replicas against the upgraded database -------------------------

OLD_FEE_WORKER = r'''
import asyncio, json, sys
import asyncpg
from donations import db, fees
async def main(dsn, bt):
    pool = await db.create_pool(dsn, min_size=1, max_size=2)
    async with db.connection(pool) as conn:
        await fees.store_balance_transaction(conn, json.loads(bt))
    await pool.close()
asyncio.run(main(sys.argv[1], sys.argv[2]))
'''

OLD_PAYOUT_WORKER = r'''
import asyncio, json, sys
from donations import db, payouts
async def main(dsn, bt):
    pool = await db.create_pool(dsn, min_size=1, max_size=2)
    async with db.connection(pool) as conn:
        await payouts.store_members(conn, "po_upgradelate", [json.loads(bt)])
    await pool.close()
asyncio.run(main(sys.argv[1], sys.argv[2]))
'''


@pytest.mark.parametrize("worker", ["fee", "payout"])
async def test_a_fee_stored_by_an_018_replica_after_the_upgrade_still_dates_the_payment(
    at_018: tuple[str, dict[str, Any]], old_tree: Path, server_dsn: str, worker: str
) -> None:
    """During a rolling deploy an 018-era replica's fee (or payout) worker stores a balance
    transaction queued before the upgrade, knowing nothing of settled_at: the payments trigger
    (sql/023) fills it, so the payment is dated by its settlement (February, when its money
    arrived), not by its charge's creation."""
    dsn, world = at_018
    await db.migrate(dsn)
    pool = await db.create_pool(dsn, min_size=1, max_size=4)
    try:
        key = world["late_sepa"]
        bt_id = await pool.fetchval(
            "SELECT balance_transaction FROM payments WHERE payment_key = $1", key)
        bt = world["balance_transactions"][bt_id]
        run_old(old_tree, OLD_FEE_WORKER if worker == "fee" else OLD_PAYOUT_WORKER, dsn,
                json.dumps(bt))
        # the new replicas take over: their fee worker has nothing queued for it any more
        assert await pool.fetchval(
            "SELECT count(*) FROM balance_transaction_fetches WHERE id = $1", bt_id) == 0
        row = await pool.fetchrow(
            "SELECT fee, created_at, settled_at FROM payments WHERE payment_key = $1", key)
        assert row is not None and row["fee"] == bt["fee"]  # the 018 worker did store it
        settled = datetime.fromtimestamp(int(bt["created"]), UTC)
        assert row["created_at"].month != settled.month  # made in one month, settled the next
        assert row["settled_at"] == settled
    finally:
        await pool.close()


OLD_HOLD = r'''
import asyncio, sys
from datetime import UTC, datetime, timedelta
import asyncpg
from donations.seats import FoundingSeats
async def main(dsn):
    conn = await asyncpg.connect(dsn)
    seats = FoundingSeats(100)
    got = [await seats.hold(conn, datetime.now(UTC) + timedelta(hours=1)) for _ in range(3)]
    print(",".join(str(g) for g in got))
    await conn.close()
asyncio.run(main(sys.argv[1]))
'''


async def test_the_018_two_argument_seat_hold_still_works_after_022(
    at_018: tuple[str, dict[str, Any]], old_tree: Path
) -> None:
    """An 018-era replica's FoundingSeats.hold (founding_seat_hold(seats, until)) still holds
    seats after 022 (client NULL: counted for nobody), and a new replica's five-argument call
    sees those holds in its count and still caps its own client."""
    dsn, _ = at_018
    await db.migrate(dsn)
    held = run_old(old_tree, OLD_HOLD, dsn).strip().split(",")
    assert all(h.isdigit() for h in held), held
    conn = await asyncpg.connect(dsn)
    try:
        assert await conn.fetchval(
            "SELECT count(*) FROM founding_holds WHERE client IS NULL AND expires_at > now()") == 3
        new = seats.FoundingSeats(7)
        until = datetime.now(UTC) + timedelta(hours=1)
        mine = [await new.hold(conn, until, "198.51.100.7") for _ in range(3)]
        assert mine[0] is not None and mine[1] is not None
        assert mine[2] is None  # the client's cap, not the seats: one is still free
        assert await new.left(conn) == 1  # 7 less 1 founding subscription, 3 old holds, 2 new
        # lapsed holds, with a client or not, are cleared as before
        await conn.execute("UPDATE founding_holds SET created_at = now() - interval '3 days',"
                           " expires_at = now() - interval '2 days'")
        assert await seats.forget_lapsed(conn, timedelta(days=1)) == 5
    finally:
        await conn.close()


async def test_an_018_cookie_holding_the_token_is_no_session(
    client: Client, pool: asyncpg.Pool
) -> None:
    """The 018 staff page kept the token itself in the cookie. After the upgrade such a cookie
    opens nothing (it is no session), and the page answers with the login form, not a 500."""
    async with db.connection(pool) as conn:
        token = await auth.create_token(conn, "finance", ["reports:read"])
    response = await client.get("/staff/", headers={"Cookie": f"donations_staff={token}"})
    assert response.status == 200
    html = await response.text()
    assert 'action="/staff/login"' in html
    csv = await client.get("/staff/contributions.csv?from=2026-01-01&to=2026-02-01",
                           headers={"Cookie": f"donations_staff={token}"},
                           allow_redirects=False)
    assert csv.status == 303


async def test_staff_sessions_long_ended_are_cleared_at_the_next_sign_in(
    client: Client, pool: asyncpg.Pool
) -> None:
    """Sessions that ended more than a day ago are deleted when someone signs in; live ones
    and a token's revocation are respected."""
    async with db.connection(pool) as conn:
        token = await auth.create_token(conn, "finance", ["reports:read"])
        token_id = await conn.fetchval("SELECT id FROM api_tokens")
        await conn.execute(
            "INSERT INTO staff_sessions (session_hash, token_id, created_at, expires_at)"
            " VALUES ($1, $2, now() - interval '3 days', now() - interval '2 days')",
            b"x" * 32, token_id)
    response = await client.post("/staff/login", data={"token": token}, allow_redirects=False)
    assert response.status == 303
    assert await pool.fetchval("SELECT count(*) FROM staff_sessions") == 1


# --- the workers and derivation agree on settled_at, whichever comes first --------------------


async def _payment(pool: asyncpg.Pool, key: str) -> asyncpg.Record:
    row = await pool.fetchrow("SELECT * FROM payments WHERE payment_key = $1", key)
    assert row is not None
    return row


async def test_settled_at_is_the_same_whether_the_fee_worker_or_derivation_comes_first(
    client: Client, pool: asyncpg.Pool
) -> None:
    """A SEPA debit: derived first (settled_at NULL), then the fee worker (settled_at = the
    balance transaction's time), then derived again after a refund (unchanged). A second one
    whose balance transaction the payout worker stored before the charge.updated naming it
    arrived: derivation fills the same value and queues no look-up."""
    world = World(seed=4401)
    first = world.async_checkout(3000, "eur", True, email="x@example.org")
    await post_all(client, world.events)
    row = await _payment(pool, first.payment_intent)
    assert row["settled_at"] is None and row["fee"] is None
    bt = world.balance_transactions[row["balance_transaction"]]
    settled = datetime.fromtimestamp(int(bt["created"]), UTC)
    async with stripe_against(world) as (_, stripe_client):
        assert await fees.run_once(pool, stripe_client, Metrics()) == 1
    assert (await _payment(pool, first.payment_intent))["settled_at"] == settled
    posted = len(world.events)
    world.refund(str(first.charge), 1000)
    await post_all(client, world.events[posted:])
    again = await _payment(pool, first.payment_intent)
    assert again["amount_refunded"] == 1000 and again["settled_at"] == settled
    assert again["fee"] == bt["fee"]

    # the balance transaction first (payout worker), the event naming it after
    posted = len(world.events)
    second = world.async_checkout(2000, "eur", True, email="y@example.org")
    mine = world.events[posted:]
    last = max(i for i, e in enumerate(mine) if e["type"] == "charge.updated")
    await post_all(client, mine[:last])
    world.payout()
    payout_events = world.events[posted + len(mine):]
    await post_all(client, payout_events)
    async with stripe_against(world) as (_, stripe_client):
        assert await payouts.run_once(pool, stripe_client) == 1
    await post_all(client, mine[last:])
    row = await _payment(pool, second.payment_intent)
    bt2 = world.balance_transactions[row["balance_transaction"]]
    assert row["settled_at"] == datetime.fromtimestamp(int(bt2["created"]), UTC)
    assert row["fee"] == bt2["fee"]
    assert await pool.fetchval("SELECT count(*) FROM balance_transaction_fetches") == 0


async def test_sql_032_fills_the_failed_bank_debits_of_the_payments_already_kept(
    client: Client, pool: asyncpg.Pool
) -> None:
    """sql/032 gives the payments already in the ledger the booking and reversal of a bank debit
    that failed after Stripe booked it, from the charges kept, as derivation does (the charge's
    ids given as strings or expanded), and queues their look-up; nothing else. Run here on the
    ledger as it was before it (the columns dropped, in a transaction rolled back)."""
    world = World(seed=4402)
    world.one_off(2500, "gbp")
    world.async_checkout(3000, "eur", True, email="paid@example.org")
    bounced = world.async_checkout(3000, "eur", False, booked=True, email="a@example.org")
    expanded = world.async_checkout(1800, "gbp", False, booked=True, email="b@example.org")
    world.async_checkout(1200, "eur", False, email="never-booked@example.org")
    await post_all(client, world.events)
    columns = "payment_key, booked_balance_transaction, failure_balance_transaction"
    derived = {tuple(r) for r in await pool.fetch(f"SELECT {columns} FROM payments")}  # noqa: S608
    booked = {r[0]: r[1:] for r in derived if r[1] is not None}
    assert set(booked) == {bounced.payment_intent, expanded.payment_intent}
    for payment in (bounced, expanded):
        charge = world.get(payment.charge)
        assert booked[payment.payment_intent] == (charge["balance_transaction"],
                                                 charge["failure_balance_transaction"])
    (migration,) = [m for m in db.load_migrations() if m.version == 32]
    async with pool.acquire() as conn:
        tr = conn.transaction()
        await tr.start()
        try:
            await conn.execute(
                "ALTER TABLE payments DROP COLUMN booked_balance_transaction,"
                " DROP COLUMN failure_balance_transaction")
            await conn.execute("DELETE FROM balance_transaction_fetches")
            await conn.execute(
                """UPDATE stripe_objects
                      SET data = data || jsonb_build_object(
                          'balance_transaction', jsonb_build_object(
                              'id', data -> 'balance_transaction', 'object', 'balance_transaction'),
                          'failure_balance_transaction', jsonb_build_object(
                              'id', data -> 'failure_balance_transaction'))
                    WHERE id = $1""", expanded.charge)
            await conn.execute(migration.sql)
            assert {tuple(r) for r in await conn.fetch(
                f"SELECT {columns} FROM payments")} == derived  # noqa: S608
            assert {r["id"] for r in await conn.fetch(
                "SELECT id FROM balance_transaction_fetches")} == {
                    i for pair in booked.values() for i in pair}
        finally:
            await tr.rollback()
    assert {tuple(r) for r in await pool.fetch(f"SELECT {columns} FROM payments")} == derived  # noqa: S608


async def test_sql_033_ranks_the_subscriptions_kept_by_their_period_as_ingest_does(
    pool: asyncpg.Pool
) -> None:
    """sql/033 gives the subscriptions already kept the progress events.snapshot_version gives a
    subscription now (its items' earliest period start, else its own, else 0), whatever shape
    their periods have, and touches no other row. Run here on snapshots as the previous release
    stored them (progress 0; odd shapes written directly), in a transaction rolled back."""
    others_sql = "SELECT * FROM stripe_objects WHERE object <> 'subscription' ORDER BY id"
    world = World(seed=4403)
    renewed = world.subscribe(1000, "gbp").subscription
    world.renew(renewed)
    world.subscribe(700, "usd", interval="year")
    for e in world.events:
        await ingest(pool, parse_event(e), json.dumps(e), FoundingOffer())
    kept = {r["id"]: r["progress"] for r in await pool.fetch(
        "SELECT id, progress FROM stripe_objects WHERE object = 'subscription'")}
    assert len(kept) == 2 and all(kept.values())
    item: dict[str, Any] = {"object": "subscription_item", "current_period_start": 1_790_000_000}
    odd: dict[str, dict[str, Any]] = {  # id -> the subscription's data as stored
        "sub_odd_items": {"items": {"data": [
            dict(item), dict(item, current_period_start=1_795_000_000), "si_not_expanded", None]}},
        "sub_odd_own": {"current_period_start": 1_780_000_000, "items": {"data": []}},
        "sub_odd_items_first": {"current_period_start": 1_799_000_000,
                                "items": {"data": [dict(item)]}},
        "sub_odd_some_items_bad": {"items": {"data": [
            dict(item, current_period_start="1795000000"), dict(item),
            dict(item, current_period_start=1_795_000_000.5)]}},
        "sub_odd_all_items_bad": {"current_period_start": 1_770_000_000, "items": {"data": [
            dict(item, current_period_start=True), dict(item, current_period_start=-5),
            dict(item, current_period_start=10**13), dict(item, current_period_start=None),
            {"object": "subscription_item"}]}},
        "sub_odd_zero": {"items": {"data": [dict(item, current_period_start=0)]},
                         "current_period_start": 1_770_000_000},
        "sub_odd_items_not_listed": {"items": "si_1", "current_period_start": 1_760_000_000},
        "sub_odd_data_not_a_list": {"items": {"data": {"current_period_start": 1}}},
        "sub_odd_own_bad": {"current_period_start": "soon"},
        "sub_odd_nothing": {},
        "sub_odd_last_second": {"items": {"data": [
            dict(item, current_period_start=253_402_300_799),
            dict(item, current_period_start=253_402_300_800)]}},
    }
    (migration,) = [m for m in db.load_migrations() if m.version == 33]
    async with pool.acquire() as conn:
        tr = conn.transaction()
        await tr.start()
        try:
            others = await conn.fetch(others_sql)
            await conn.executemany(
                "INSERT INTO stripe_objects (id, object, rank, progress, event_created,"
                " type_rank, event_id, subscription_id, data)"
                " VALUES ($1, 'subscription', 1, 0, 1, 1, 'evt_odd', $1, $2::jsonb)",
                [(i, json.dumps({"id": i, "object": "subscription", **data}))
                 for i, data in odd.items()])
            await conn.execute("UPDATE stripe_objects SET progress = 0"
                               " WHERE object = 'subscription'")
            await conn.execute(migration.sql)
            rows = {r["id"]: (r["progress"], r["data"]) for r in await conn.fetch(
                "SELECT id, progress, data FROM stripe_objects WHERE object = 'subscription'")}
            assert {i: p for i, (p, _) in rows.items() if i in kept} == kept
            assert {i: p for i, (p, _) in rows.items()} == {
                i: subscription_period_start(data) for i, (_, data) in rows.items()}
            assert {i: rows[i][0] for i in odd} == {
                "sub_odd_items": 1_790_000_000, "sub_odd_own": 1_780_000_000,
                "sub_odd_items_first": 1_790_000_000, "sub_odd_some_items_bad": 1_790_000_000,
                "sub_odd_all_items_bad": 1_770_000_000, "sub_odd_zero": 0,
                "sub_odd_items_not_listed": 1_760_000_000, "sub_odd_data_not_a_list": 0,
                "sub_odd_own_bad": 0, "sub_odd_nothing": 0,
                "sub_odd_last_second": 253_402_300_799}
            assert await conn.fetch(others_sql) == others
        finally:
            await tr.rollback()


async def test_upgrade_makes_the_payments_of_invoices_of_no_subscription_one_off(
    server_dsn: str
) -> None:
    """sql/036: a payment of an invoice no subscription generated, stored as recurring by the
    derivation before it, becomes one_off as derive_payment now makes it, and the kept counts
    by kind (/metrics, sql/025) follow it; a subscription's payment stays recurring."""
    events, gift, _ = _one_off_invoice()
    world = World(seed=3601)
    renewal = world.subscribe(1000, "gbp")
    async with scratch_database(server_dsn, "upgrade_036") as (url, _):
        pool = await db.create_pool(url)
        try:
            for event in [*events, *world.events]:
                await ingest(pool, parse_event(event), json.dumps(event), FoundingOffer())
            # as the derivation before sql/036 stored it, sql/036 not applied yet
            await pool.execute("UPDATE payments SET kind = 'recurring' WHERE payment_key = $1",
                               gift)
            await pool.execute("DELETE FROM schema_migrations WHERE version = 36")
        finally:
            await pool.close()
        assert await db.migrate(url) == ["036_one_off_invoices.sql"]
        conn = await asyncpg.connect(url)
        try:
            kinds = {r["payment_key"]: r["kind"] for r in await conn.fetch(
                "SELECT payment_key, kind FROM payments WHERE status = 'succeeded'")}
            counts = {(r["kind"], r["contributions"]) for r in await conn.fetch(
                "SELECT kind, sum(contributions) AS contributions FROM ("
                " SELECT kind, contributions FROM ledger_counts"
                " UNION ALL SELECT kind, contributions FROM ledger_count_deltas) AS c"
                " GROUP BY kind")}
        finally:
            await conn.close()
    assert kinds == {gift: "one_off", renewal.payment_intent: "recurring"}
    assert counts == {("one_off", 1), ("recurring", 1)}


async def test_upgrade_lists_the_failed_bank_debits_already_in_the_ledger(
    server_dsn: str
) -> None:
    """sql/039 fills failed_debits from the charges kept: the same rows the derivation writes
    (a debit Stripe booked and the bank refused, by its charge, with its payment)."""
    world = World(seed=3901, start=1_795_000_000)
    world.async_checkout(4500, "eur", False, booked=True)
    world.async_checkout(2000, "eur", True, booked=True)
    async with scratch_database(server_dsn, "upgrade_039") as (url, _):
        pool = await db.create_pool(url)
        try:
            for event in world.events:
                await ingest(pool, parse_event(event), json.dumps(event), FoundingOffer())
            derived = [tuple(r) for r in await pool.fetch(
                "SELECT * FROM failed_debits ORDER BY charge")]
            await pool.execute("DROP TABLE failed_debits")
            await pool.execute("DELETE FROM schema_migrations WHERE version = 39")
        finally:
            await pool.close()
        assert await db.migrate(url) == ["039_failed_debits.sql"]
        conn = await asyncpg.connect(url)
        try:
            backfilled = [tuple(r) for r in await conn.fetch(
                "SELECT * FROM failed_debits ORDER BY charge")]
        finally:
            await conn.close()
    assert len(derived) == 1 and derived[0][2] is not None
    assert backfilled == derived
