"""Months built with the fake Stripe, the reports tied to Stripe's side to the penny: dates at
month ends and time-zone edges, currencies of every exponent, refunds, disputes and payouts."""

from __future__ import annotations

import csv
import io
import itertools
import json
from datetime import UTC, datetime
from fractions import Fraction
from typing import Any

import asyncpg

from donations import db, fees, payouts, reports
from donations.metrics import Metrics
from donations.money import from_major
from tests.conftest import Client
from tests.fakestripe.world import DAY, DEFAULT_RATES, Emitted, World
from tests.test_fees import stripe_against
from tests.webhook_helpers import post_all

RATES = {**DEFAULT_RATES, "kwd": Fraction(5, 2), "bhd": Fraction(2)}


def ts(text: str) -> int:
    return int(datetime.fromisoformat(text).replace(tzinfo=UTC).timestamp())


async def settle(client: Client, pool: asyncpg.Pool, world: World) -> None:
    """The events delivered, then what the fee and payout workers do once Stripe answers."""
    await post_all(client, world.events)
    async with stripe_against(world) as (_, stripe_client):
        while await fees.run_once(pool, stripe_client, Metrics()):
            pass
        while await payouts.run_once(pool, stripe_client):
            pass


async def rows(pool: asyncpg.Pool, start: str, end: str, tz: str | None = None,
               fmt: str = "json") -> Any:
    win = reports.window(start, end, tz)
    out: list[bytes] = []

    async def write(chunk: bytes) -> None:
        out.append(chunk)

    async with db.connection(pool) as conn:
        await reports.stream_contributions(conn, win, fmt, write)
    body = b"".join(out)
    if fmt == "json":
        return json.loads(body)["data"]
    return list(csv.DictReader(io.StringIO(body.decode("utf-8"), newline="")))


async def summary(pool: asyncpg.Pool, start: str, end: str, tz: str | None = None) -> Any:
    async with db.connection(pool) as conn:
        return await reports.summary(conn, reports.window(start, end, tz), "gbp")




async def test_a_bacs_debit_collected_in_december_is_a_december_movement_as_at_stripe(
    client: Client, pool: asyncpg.Pool
) -> None:
    """A Bacs/SEPA debit started on 29 November and collected by the bank on 2 December is
    money received in December: its balance transaction (what the payout and Stripe's own
    balance report count) is dated 2 December, and so is its movement. November, closed on
    1 December with the debit still pending, does not change afterwards."""
    world = World(seed=7002, start=ts("2026-11-29T22:00:00"), rates=RATES)
    first = world.async_checkout(3000, "gbp", True, settle_after=3 * DAY)
    pending = [e for e in world.events if e["created"] < ts("2026-12-01T00:00:00")]
    await post_all(client, pending)
    november_at_close = await summary(pool, "2026-11-01", "2026-12-01", "Europe/London")
    assert november_at_close["reporting"]["gross"]["amount"] == 0  # still pending at close

    await settle(client, pool, world)  # the bank collects it on 2 December
    bt = world.balance_transactions[str(first.balance_transaction)]
    assert datetime.fromtimestamp(bt["created"], UTC).date().isoformat() == "2026-12-02"

    november = await summary(pool, "2026-11-01", "2026-12-01", "Europe/London")
    december = await summary(pool, "2026-12-01", "2027-01-01", "Europe/London")
    # Stripe's side: the month the balance transaction falls in
    assert (november["reporting"]["gross"]["amount"],
            december["reporting"]["gross"]["amount"]) == (0, 3000)
    december_rows = await rows(pool, "2026-12-01", "2027-01-01", "Europe/London")
    assert [r["payment_intent"] for r in december_rows] == [first.payment_intent]


async def test_a_payout_arriving_on_the_first_is_in_that_month_in_a_zone_west_of_utc(
    client: Client, pool: asyncpg.Pool
) -> None:
    """Stripe's arrival_date is a calendar day (given as its midnight UTC): a payout that
    reaches the bank on 1 January is January's on the bank statement whatever --tz finance
    picks, west of UTC too."""
    world = World(seed=7003, start=ts("2026-12-20T10:00:00"), rates=RATES)
    world.one_off(2500, "gbp")
    world.advance(ts("2026-12-30T09:00:00") - world.now)
    paid = world.payout(arrival_days=2)
    po = world.get(paid.payout)
    assert datetime.fromtimestamp(po["arrival_date"], UTC).date().isoformat() == "2027-01-01"
    await settle(client, pool, world)
    async with db.connection(pool) as conn:
        december = await payouts.list_payouts(
            conn, reports.window("2026-12-01", "2027-01-01", "America/Los_Angeles"))
        january = await payouts.list_payouts(
            conn, reports.window("2027-01-01", "2027-02-01", "America/Los_Angeles"))
    assert ([p["id"] for p in december], [p["id"] for p in january]) == ([], [paid.payout])


def fail_payout(world: World, payout_id: str) -> str:
    """The bank returns a paid payout: payout.failed, and a payout_failure balance
    transaction puts the money back in the balance (paid out again by the next payout)."""
    po = world.get(payout_id)
    world.advance(DAY)
    back = world._bt(amount=int(po["amount"]), currency=po["currency"], source=payout_id,
                     type="payout_failure", reporting_category="payout_reversal",
                     description="PAYOUT FAILURE")
    back["status"] = "available"
    back["available_on"] = world.now
    prev = world._changes(po, status="failed", failure_code="account_closed",
                          failure_message="The bank account has been closed",
                          failure_balance_transaction=back["id"])
    world._emit(Emitted(), "payout.failed", po, previous=prev)
    return str(back["id"])




def at(world: World, iso: str) -> None:
    world.advance(ts(iso) - world.now)


MONTHS = ["2026-09-01", "2026-10-01", "2026-11-01", "2026-12-01", "2027-01-01", "2027-02-01",
          "2027-03-01", "2027-04-01", "2027-05-01"]


def minor(text: str, currency: str) -> int:
    return from_major(text, currency) if text else 0


async def test_months_partition_and_tie_in_every_time_zone(
    client: Client, pool: asyncpg.Pool
) -> None:
    """Movements placed just either side of local
    midnight on the London DST change days and at month ends, in GBP, USD, JPY, BHD and KWD,
    with partial refunds, a refund that fails a month later, a bank debit Stripe booked in
    November and reversed in December (its fee kept), disputes won (reinstated in a later
    month) and lost, and a payout. For UTC, Europe/London, Pacific/Kiritimati (+14) and
    America/Los_Angeles: each movement is in exactly one month; the monthly summaries add up to
    the whole window's; each month's CSV rows add up to its summary; gross - refunds -
    disputes + reinstated - fees = net to the penny; the money is in each currency's own units
    (JPY 1000, BHD 12.345) in CSV and in minor units in JSON; and over the whole window the
    reporting net equals Stripe's balance transactions (less payouts), which equals the
    payout."""
    world = World(seed=7010, start=ts("2026-09-30T23:00:00"), rates=RATES)
    gbp = world.one_off(2500, "gbp", email="edge@example.org")        # 23:00Z: 1 Oct in BST
    at(world, "2026-10-25T00:30:00")
    usd = world.one_off(4000, "usd")                                  # DST ends at 01:00Z
    at(world, "2026-10-31T23:50:00")
    jpy = world.one_off(1000, "jpy")                                  # Oct in London and UTC
    at(world, "2026-11-30T10:00:00")
    world.one_off(12345, "bhd")
    world.one_off(7777, "kwd")
    world.refund(usd.charge, 1500)                                    # partial, a month later
    failing = world.refund(gbp.charge, 1000)
    world.fail_refund(failing.refund)
    # a SEPA debit Stripe books on 30 November and reverses on 3 December, keeping its fee
    bounced = world.async_checkout(4500, "eur", False, booked=True, settle_after=3 * DAY)
    at(world, "2026-12-31T12:00:00")
    lost = world.one_off(3000, "gbp")
    world.dispute(lost.charge, "lost")
    won = world.one_off(5000, "usd")
    world.dispute(won.charge, "won")                                  # reinstated in March
    at(world, "2027-03-27T23:30:00")
    world.one_off(999, "jpy")
    at(world, "2027-03-31T23:30:00")
    world.one_off(1234, "eur")                                        # 1 April 00:30 BST
    world.payout()
    await settle(client, pool, world)
    everything = await rows(pool, MONTHS[0], MONTHS[-1])
    ids = {(r["balance_transaction"], r["type"], r["status"]) for r in everything}
    assert len(ids) == len(everything) == 17
    debit = world.get(bounced.charge)
    assert [(r["type"], r["status"], r["amount"], r["balance_transaction"])
            for r in everything if r["payment_intent"] == bounced.payment_intent] == [
        ("payment", "failed", {"amount": 4500, "currency": "eur"}, debit["balance_transaction"]),
        ("payment", "payment_failure", {"amount": -4500, "currency": "eur"},
         debit["failure_balance_transaction"])]

    for tz in ("UTC", "Europe/London", "Pacific/Kiritimati", "America/Los_Angeles"):
        whole = await summary(pool, MONTHS[0], MONTHS[-1], tz)
        seen: list[tuple[Any, ...]] = []
        totals = dict.fromkeys(("gross", "refunds", "disputes_withdrawn",
                                "disputes_reinstated", "fees", "net"), 0)
        for start, end in itertools.pairwise(MONTHS):
            month = await rows(pool, start, end, tz, fmt="csv")
            seen += [(r["balance_transaction"], r["type"], r["status"]) for r in month]
            rep = (await summary(pool, start, end, tz))["reporting"]
            for name in totals:
                totals[name] += rep[name]["amount"]
            assert (rep["gross"]["amount"] - rep["refunds"]["amount"]
                    - rep["disputes_withdrawn"]["amount"] + rep["disputes_reinstated"]["amount"]
                    - rep["fees"]["amount"]) == rep["net"]["amount"], (tz, start)
            assert rep["net"]["amount"] == sum(minor(r["net"], "gbp") for r in month)
            assert rep["fees"]["amount"] == sum(minor(r["fee"], "gbp") for r in month)
            assert rep["gross"]["amount"] == sum(minor(r["settlement_amount"], "gbp")
                                                 for r in month if r["type"] == "payment")
        assert sorted(seen) == sorted(ids), tz
        assert totals == {n: whole["reporting"][n]["amount"] for n in totals}, tz

    stripe_net = sum(int(bt["net"]) for bt in world.balance_transactions.values()
                     if bt["type"] != "payout")
    whole = await summary(pool, MONTHS[0], MONTHS[-1])
    assert whole["reporting"]["net"]["amount"] == stripe_net
    async with db.connection(pool) as conn:
        (po,) = await payouts.payouts_with_members(conn, reports.window(MONTHS[0], MONTHS[-1]))
    assert po["balanced"] is True and po["amount"]["amount"] == stripe_net

    csv_rows = {r["payment_intent"] + r["type"]: r for r in
                await rows(pool, MONTHS[0], MONTHS[-1], fmt="csv")}
    json_rows = {r["payment_intent"] + r["type"]: r for r in everything}
    assert csv_rows[jpy.payment_intent + "payment"]["amount"] == "1000"
    assert json_rows[jpy.payment_intent + "payment"]["amount"] == {"amount": 1000,
                                                                  "currency": "jpy"}
    bhd = next(r for r in csv_rows.values() if r["currency"] == "bhd")
    kwd = next(r for r in csv_rows.values() if r["currency"] == "kwd")
    assert (bhd["amount"], kwd["amount"]) == ("12.345", "7.777")
    # London: the 23:00Z payment of 30 September is October's, the 31 March 23:30Z one April's
    october = await rows(pool, "2026-10-01", "2026-11-01", "Europe/London")
    assert gbp.payment_intent in {r["payment_intent"] for r in october}
    march = await rows(pool, "2027-03-01", "2027-04-01", "Europe/London")
    assert "eur" not in {r["currency"] for r in march}
    april = await rows(pool, "2027-04-01", "2027-05-01", "Europe/London")
    assert [r["currency"] for r in april] == ["eur"]


async def test_a_failed_payout_and_its_retry_each_tie(
    client: Client, pool: asyncpg.Pool, dsn: str
) -> None:
    """A paid payout that the bank returns
    (payout.failed, a payout_failure balance transaction back into the balance) and the next
    payout that carries that money again with a new payment. Both payouts tie to their parts,
    the failed one is shown as failed, the retry carries the failed payout's money as one
    payout_failure line naming it, and `report payouts` exits 0."""
    world = World(seed=7004, start=ts("2026-12-01T10:00:00"), rates=RATES)
    world.one_off(2500, "gbp")
    world.one_off(4000, "usd")
    first = world.payout()
    fail_payout(world, first.payout)
    world.one_off(1000, "gbp")
    retry = world.payout()
    await settle(client, pool, world)
    async with db.connection(pool) as conn:
        found = await payouts.payouts_with_members(conn, reports.window("2026-12-01",
                                                                        "2027-01-01"))
    by_id = {p["id"]: p for p in found}
    assert (by_id[first.payout]["status"], by_id[first.payout]["balanced"]) == ("failed", True)
    assert (by_id[retry.payout]["status"], by_id[retry.payout]["balanced"]) == ("paid", True)
    carried = [m for m in by_id[retry.payout]["balance_transactions"]
               if m["type"] == "payout_failure"]
    assert [(m["source"], m["net"]) for m in carried] == [(first.payout,
                                                          by_id[first.payout]["amount"])]
    from tests.test_cli import _env, _run
    code, _, err = await _run("report", "payouts", "--from", "2026-12-01", "--to", "2027-01-01",
                              env=_env(DATABASE_URL=dsn))
    assert (code, err) == (0, "")
