"""The order-independence properties of tests/test_ledger_order.py run long, over wider
histories than tests/scenarios.py draws.

They are skipped unless `DEEP_ORDER=1` (run them by hand: `DEEP_ORDER=1 pytest
tests/test_ledger_order_deep.py`; `DEEP_EXAMPLES`, `DEEP_DB_EXAMPLES` and `DEEP_DB_STEPS` size
them, 2,000, 300 and 14 by default). They add to the simulator's histories what it can make but
the suite's strategy never asks for, and a few Stripe flows the simulator has no helper for,
emitted through its own `_emit` (DeepWorld below):

- currencies: gbp, usd, eur, jpy and a three-decimal one (bhd);
- balance transactions attached with charge.succeeded or after it (deferred or not);
- refunds left pending and settled later, refunds failed, disputes on partly refunded charges
  (for what is left), inquiries that stay inquiries (refundable, and refunded), inquiries
  closed, prevented disputes, disputes closed long after, appeals;
- bank debits that fail after Stripe booked them (`async_checkout(..., booked=True)`);
- manual capture for less than authorised (charge.captured), then refunds and disputes of it;
- payment intents abandoned (payment_intent.canceled);
- coupons stacked on the founding one (discount_subscription), coupons on the item
  (discount_item), a 100 % coupon (an invoice paid with nothing to collect), a discount removed
  (customer.discount.deleted);
- subscriptions cancelled while past_due or paused; a failed renewal's invoice voided (its
  payment intent canceled) or marked uncollectible, then the subscription deleted;
- customers changing their e-mail (customer.updated);
- the balance transactions stored (fee worker, payouts) at any point of the delivery.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
from fractions import Fraction
from typing import Any, Literal

import asyncpg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from donations import db, fees, totals
from donations.events import parse_event
from donations.ingest import ingest
from donations.ledger import DISPUTE_HOLDS, BalanceTransaction, FoundingOffer
from donations.money import apply_percent_off
from tests.fakestripe import objects as o
from tests.fakestripe.world import DAY, DEFAULT_RATES, Emitted, Payment, World
from tests.ledger_check import dump, reference
from tests.scenarios import deliveries
from tests.test_ledger_order import _deliver_in_groups

OFFER = FoundingOffer()
DEEP = os.environ.get("DEEP_ORDER") == "1"
long_run = pytest.mark.skipif(not DEEP, reason="long run, by hand (DEEP_ORDER=1)")
EXAMPLES = int(os.environ.get("DEEP_EXAMPLES", "2000"))
DB_EXAMPLES = int(os.environ.get("DEEP_DB_EXAMPLES", "300"))
DB_STEPS = int(os.environ.get("DEEP_DB_STEPS", "14"))

CURRENCIES = ("gbp", "usd", "eur", "jpy", "bhd")
AMOUNTS = {"gbp": (100, 50_000), "usd": (100, 50_000), "eur": (100, 50_000),
           "jpy": (100, 100_000), "bhd": (200, 500_000)}
RATES = {**DEFAULT_RATES, "bhd": Fraction(21, 10)}


class DeepWorld(World):
    """The simulator with a few more of Stripe's flows, emitted as Stripe emits them."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.released: dict[str, int] = {}  # charge -> part of its authorisation never captured
        self.chargebacks: set[str] = set()  # charges with a dispute past the inquiry stage
        self.founding_subs: set[str] = set()

    def abandon(self, amount: int, currency: str) -> Payment:
        """A payment intent never paid, canceled a day later (Checkout expiry, or our form)."""
        out = Payment()
        self.advance(1)
        pi = self._pi(amount, currency, status="requires_payment_method")
        self._emit(out, "payment_intent.created", pi)
        self.advance(DAY)
        pi.update(status="canceled", cancellation_reason="abandoned", canceled_at=self.now)
        self._emit(out, "payment_intent.canceled", pi)
        out.payment_intent = pi["id"]
        return out

    def partial_capture(self, amount: int, captured: int, currency: str) -> Payment:
        """Manual capture of `captured` of an authorisation of `amount`: charge.succeeded
        (captured false), an hour later charge.captured (amount_captured, the rest released into
        amount_refunded), payment_intent.succeeded, then charge.updated with the balance
        transaction of what was captured."""
        out = Payment()
        req = self._new_request()
        self.advance(1)
        pi = self._pi(amount, currency, status="requires_payment_method")
        pi["capture_method"] = "manual"
        self._emit(out, "payment_intent.created", pi, request=req)
        self.advance(1)
        pm = self.ids.new("pm")
        ch = self._put(o.charge(ids=self.ids, amount=amount, currency=currency,
                                created=self.now, payment_intent=pi["id"], payment_method=pm,
                                description=None))
        ch.update(captured=False, amount_captured=0)
        self._emit(out, "charge.succeeded", ch, request=req)
        pi.update(status="requires_capture", amount_capturable=amount, latest_charge=ch["id"],
                  payment_method=pm)
        self.advance(3600)
        prev = self._changes(ch, captured=True, amount_captured=captured,
                             amount_refunded=amount - captured, refunded=captured == 0)
        self._emit(out, "charge.captured", ch, previous=prev)
        pi.update(status="succeeded", amount_received=captured, amount_capturable=0)
        self._emit(out, "payment_intent.succeeded", pi)
        self.advance(2)
        settled, rate = self.settle(captured, currency)
        bt = self._bt(amount=settled, currency=self.settlement_currency, source=ch["id"],
                      type="charge", reporting_category="charge",
                      fee=self.processing_fee(settled), exchange_rate=rate)
        self._emit(out, "charge.updated", ch, previous=self._changes(
            ch, balance_transaction=bt["id"]))
        self.released[ch["id"]] = amount - captured
        out.payment_intent, out.charge, out.balance_transaction = pi["id"], ch["id"], bt["id"]
        return out

    def left(self, charge_id: str) -> int:
        """What of a charge is neither refunded nor released."""
        ch = self.objects[charge_id]
        return int(ch["amount"]) - int(ch["amount_refunded"])

    def inquiry(self, charge_id: str, closed: bool) -> Emitted:
        """An inquiry the bank never escalates: charge.dispute.created
        (warning_needs_response), charge.dispute.updated (warning_under_review), and with
        `closed` charge.dispute.closed (warning_closed). No money moves."""
        ch = self._charge(charge_id)
        out = Emitted()
        self.advance(DAY)
        dp = self._put(o.dispute(ids=self.ids, amount=self.left(charge_id),
                                 currency=ch["currency"], created=self.now, charge=charge_id,
                                 payment_intent=ch["payment_intent"],
                                 status="warning_needs_response", is_charge_refundable=True))
        ch["disputed"] = True
        self._emit(out, "charge.dispute.created", dp)
        self.advance(DAY)
        self._emit(out, "charge.dispute.updated", dp,
                   previous=self._changes(dp, status="warning_under_review"))
        if closed:
            self.advance(10 * DAY)
            self._emit(out, "charge.dispute.closed", dp,
                       previous=self._changes(dp, status="warning_closed"))
        return out

    def end_failed(self, sub_id: str, how: Literal["void", "uncollectible"]) -> Emitted:
        """Dunning gives up on a past_due subscription: its open invoice voided (its payment
        intent canceled) or marked uncollectible, then customer.subscription.deleted."""
        sub = self._sub(sub_id)
        run = self._failed_runs.pop(sub_id)
        out = Emitted()
        self.advance(7 * DAY)
        inv = self.objects[run.invoice]
        if how == "void":
            inv.update(status="void", next_payment_attempt=None)
            inv["status_transitions"]["voided_at"] = self.now
            self._emit(out, "invoice.voided", inv)
            pi = self.objects[run.payment_intent] if run.payment_intent else None
            if pi is not None:
                pi.update(status="canceled", cancellation_reason="void_invoice",
                          canceled_at=self.now)
                self._emit(out, "payment_intent.canceled", pi)
        else:
            inv.update(status="uncollectible", next_payment_attempt=None)
            inv["status_transitions"]["marked_uncollectible_at"] = self.now
            self._emit(out, "invoice.marked_uncollectible", inv)
        self._changes(sub, status="canceled", canceled_at=self.now, ended_at=self.now)
        self._emit(out, "customer.subscription.deleted", sub)
        return out

    def remove_discount(self, sub_id: str) -> Emitted:
        """Staff remove the subscription's last discount: customer.discount.deleted, then
        customer.subscription.updated without it."""
        sub = self._sub(sub_id)
        out = Emitted()
        self.advance(1)
        di_id = sub["discounts"][-1]
        di = self.objects[di_id]
        di["end"] = self.now
        self._emit(out, "customer.discount.deleted", di)
        prev = {"discounts": list(sub["discounts"])}
        sub["discounts"] = sub["discounts"][:-1]
        self._emit(out, "customer.subscription.updated", sub, previous=prev)
        return out

    def change_email(self, customer_id: str, n: int) -> Emitted:
        out = Emitted()
        self.advance(1)
        cus = self.objects[customer_id]
        prev = self._changes(cus, email=f"changed{n}@example.org")
        self._emit(out, "customer.updated", cus, previous=prev)
        return out


def _amount(draw: st.DrawFn, currency: str) -> int:
    low, high = AMOUNTS[currency]
    return draw(st.integers(min_value=low, max_value=high))


def _ensure_coupon(world: DeepWorld, coupon: str) -> None:
    if coupon in world.objects or coupon == "founding-supporter":
        return
    if coupon == "spring-20":
        world.create_coupon(coupon, percent_off=20)
    elif coupon == "off-300":
        world.create_coupon(coupon, amount_off=300, currency="gbp", currency_options={"usd": 350})
    elif coupon == "odd-12.5":
        world.create_coupon(coupon, percent_off=12.5)
    elif coupon == "all-100":
        world.create_coupon(coupon, percent_off=100)


SUB_ACTIONS = frozenset({"renew", "change", "cancel", "pause", "fail_renewal", "stack",
                         "item_coupon", "end_failed", "remove_discount", "resume"})
COUPONS = [None, "founding-supporter", "spring-20", "off-300", "odd-12.5", "all-100"]
ACTIONS = ["one_off", "refund", "subscribe", "dispute", "refund", "renew", "fail_refund",
           "inquiry", "stack", "capture", "one_off", "change", "cancel", "failed", "async",
           "pause", "fail_renewal", "payout", "settle_refund", "close_dispute", "prevented",
           "item_coupon", "abandon", "end_failed", "remove_discount", "email", "resume"]


@st.composite
def deep_histories(draw: st.DrawFn, max_steps: int = 30) -> tuple[DeepWorld, list[str]]:
    world = DeepWorld(seed=draw(st.integers(min_value=0, max_value=2**16)),
                      rates=RATES,
                      deferred_balance_transactions=draw(st.booleans()))
    charges: list[str] = []
    subs: list[str] = []
    customers: list[str] = []
    open_disputes: list[str] = []
    for _ in range(draw(st.integers(min_value=3, max_value=max_steps))):
        action = draw(st.sampled_from(ACTIONS))
        currency = draw(st.sampled_from(CURRENCIES))
        live = [c for c in charges if world.objects[c]["status"] == "succeeded"]
        if action == "one_off" or (not live and action in (
                "refund", "dispute", "inquiry", "prevented")):
            paid = world.one_off(_amount(draw, currency), currency,
                                 via=draw(st.sampled_from(["checkout", "payment_intent"])),
                                 campaign=draw(st.sampled_from([None, "winter", "spring"])),
                                 email=draw(st.sampled_from([None, "a@example.org"])))
            charges.append(paid.charge)
        elif action == "capture":
            amount = _amount(draw, currency)
            captured = draw(st.integers(min_value=1, max_value=amount))
            charges.append(world.partial_capture(amount, captured, currency).charge)
        elif action == "abandon":
            world.abandon(_amount(draw, currency), currency)
        elif action == "failed":
            world.failed_payment(_amount(draw, currency), currency)
        elif action == "async":
            currency = draw(st.sampled_from(["gbp", "eur"]))
            succeed = draw(st.booleans())
            paid = world.async_checkout(_amount(draw, currency), currency, succeed=succeed,
                                        booked=draw(st.booleans()))
            charges.append(paid.charge)
        elif action == "fail_refund":
            refunds = [r for r in world.objects.values()
                       if r.get("object") == "refund" and r["status"] in ("pending", "succeeded")]
            if refunds:
                world.fail_refund(draw(st.sampled_from(refunds))["id"])
        elif action == "settle_refund":
            pending = [r for r in world.objects.values()
                       if r.get("object") == "refund" and r["status"] == "pending"]
            if pending:
                world.settle_refund(draw(st.sampled_from(pending))["id"])
        elif action == "payout":
            if any(world.payout_of.get(b) is None for b in world.balance_transactions):
                with contextlib.suppress(ValueError):  # nothing positive to pay out
                    world.payout()
        elif action == "subscribe" or (not subs and action in (
                "renew", "change", "cancel", "pause", "fail_renewal", "stack", "item_coupon",
                "end_failed", "remove_discount", "resume")):
            coupon = draw(st.sampled_from(COUPONS))
            if coupon is not None:
                _ensure_coupon(world, coupon)
            started = world.subscribe(
                _amount(draw, currency), currency,
                interval=draw(st.sampled_from(["month", "year"])),
                founding=coupon is not None, coupon=coupon or "founding-supporter",
                campaign=draw(st.sampled_from([None, "founders"])))
            subs.append(started.subscription)
            customers.append(started.customer)
            if coupon == "founding-supporter":
                world.founding_subs.add(started.subscription)
            if started.charge:
                charges.append(started.charge)
        elif action == "email":
            if customers:
                world.change_email(draw(st.sampled_from(customers)),
                                   draw(st.integers(0, 1000)))
        elif action in SUB_ACTIONS and subs:
            sub = draw(st.sampled_from(subs))
            state = world.objects[sub]
            status = state["status"]
            # (a renewal due in the past is emitted now, maybe in the second of the
            # subscription's event before it: its new period ranks it above that one, as
            # tests/test_ledger_order_shapes.py checks)
            if action == "renew" and status == "active":
                run = world.renew(sub)
                if run.charge:
                    charges.append(run.charge)
            elif action == "change" and status in ("active", "past_due", "paused"):
                world.change_amount(sub, _amount(draw, state["currency"]))
            elif action == "cancel" and status in ("active", "past_due", "paused") \
                    and not state["cancel_at_period_end"]:
                at_end = draw(st.booleans()) and status == "active"
                world.cancel(sub, at_period_end=at_end)
                if not at_end:
                    world._failed_runs.pop(sub, None)
            elif action == "pause" and status == "active" and not state["cancel_at_period_end"]:
                world.pause(sub)
            elif action == "resume" and status == "paused":
                run = world.resume(sub)
                if run.charge:
                    charges.append(run.charge)
            elif action == "fail_renewal" and status == "active" \
                    and not state["cancel_at_period_end"]:
                world.fail_renewal(sub)
                if draw(st.booleans()):
                    run = world.retry_renewal(sub)
                    if run.charge:
                        charges.append(run.charge)
            elif action == "end_failed" and status == "past_due" and sub in world._failed_runs:
                world.end_failed(sub, draw(st.sampled_from(["void", "uncollectible"])))
            elif action == "stack" and status not in ("canceled",):
                coupon = draw(st.sampled_from(["spring-20", "off-300", "odd-12.5"]))
                _ensure_coupon(world, coupon)
                world.discount_subscription(sub, coupon)
            elif action == "item_coupon" and status not in ("canceled",):
                coupon = draw(st.sampled_from(["spring-20", "off-300", "founding-supporter"]))
                _ensure_coupon(world, coupon)
                world.discount_item(sub, coupon)
                if coupon == "founding-supporter":
                    world.founding_subs.add(sub)
            elif action == "remove_discount" and state["discounts"] \
                    and status not in ("canceled",):
                world.remove_discount(sub)
        if action in ("refund", "dispute", "inquiry", "prevented", "close_dispute") and live:
            charge_id = draw(st.sampled_from(live))
            ch = world.objects[charge_id]
            left = world.left(charge_id)
            if action == "refund" and left > 0 and charge_id not in world.chargebacks:
                part = draw(st.one_of(st.none(), st.integers(min_value=1, max_value=left)))
                refunded = world.refund(charge_id, part, settle=draw(st.booleans()))
                if draw(st.integers(min_value=0, max_value=3)) == 0:
                    world.fail_refund(refunded.refund)
            elif action == "dispute" and not ch["disputed"] and left > 0:
                outcome: Literal["won", "lost"] | None = draw(
                    st.sampled_from(["won", "lost", None]))
                disputed = world.dispute(charge_id, outcome, amount=left,
                                         inquiry=draw(st.booleans()))
                world.chargebacks.add(charge_id)
                if outcome is None:
                    open_disputes.append(disputed.dispute)
                elif outcome == "lost" and draw(st.booleans()):
                    world.appeal_dispute(str(disputed.dispute),
                                         draw(st.sampled_from(["won", "lost", None])))
            elif action == "inquiry" and not ch["disputed"] and left > 0:
                world.inquiry(charge_id, closed=draw(st.booleans()))
            elif action == "prevented" and not ch["disputed"]:
                world.prevented_dispute(charge_id)
            elif action == "close_dispute" and open_disputes:
                dp = draw(st.sampled_from(open_disputes))
                if world.objects[dp]["status"] in ("needs_response", "under_review"):
                    world.close_dispute(dp, draw(st.sampled_from(["won", "lost"])))
                open_disputes.remove(dp)
    return world, subs


def bt_rows(world: World) -> dict[str, BalanceTransaction]:
    return {i: BalanceTransaction.from_stripe(bt) for i, bt in world.balance_transactions.items()}


def check_against_stripe(ledger: dict[str, Any], world: DeepWorld, subs: list[str]) -> None:
    """The ledger says what Stripe's objects say in the end."""
    payments = ledger["payments"]
    assert not [k for k in payments if k.startswith("in_")], "an invoice-keyed payment remains"
    objects = world.objects
    charges = {i: c for i, c in objects.items() if c.get("object") == "charge"}
    for charge_id, ch in charges.items():
        if ch["status"] != "succeeded":
            continue
        row = payments[ch["payment_intent"]]
        released = world.released.get(charge_id, 0)
        assert row["status"] == "succeeded", (charge_id, row)
        assert row["charge"] == charge_id
        assert (row["amount"], row["currency"]) == (int(ch["amount_captured"]), ch["currency"])
        assert row["amount_refunded"] == int(ch["amount_refunded"]) - released, (
            charge_id, row["amount_refunded"], ch["amount_refunded"], released)
        disputes = [d for d in objects.values()
                    if d.get("object") == "dispute" and d["charge"] == charge_id]
        held = sum(int(d["amount"]) for d in disputes if d["status"] in DISPUTE_HOLDS)
        held = min(held, row["amount"] - row["amount_refunded"])
        assert row["amount_disputed"] == held, (charge_id, row, [d["status"] for d in disputes])
    for key, row in payments.items():
        pi = objects[key]
        if pi["status"] == "succeeded":
            assert row["status"] == "succeeded", (key, row)
        elif pi["status"] == "canceled":
            assert row["status"] == "canceled", (key, row)
        elif pi["status"] == "processing":
            assert row["status"] == "pending", (key, row)
        else:
            assert row["status"] == "failed", (key, row, pi["status"])
    for re_id, row in ledger["refunds"].items():
        re = objects[re_id]
        assert (row["status"], row["amount"]) == (re["status"], re["amount"]), (re_id, row)
        assert row["failure_balance_transaction"] == re["failure_balance_transaction"]
    for dp_id, row in ledger["disputes"].items():
        assert row["status"] == objects[dp_id]["status"], (dp_id, row)
    for cus_id, row in ledger["customers"].items():
        assert row["email"] == objects[cus_id]["email"]
    for po_id, row in ledger["payouts"].items():
        po = objects[po_id]
        assert (row["status"], row["reconciliation_status"]) == (
            po["status"], po["reconciliation_status"])
    for sub_id in subs:
        sub = objects[sub_id]
        row = ledger["subscriptions"][sub_id]
        item = sub["items"]["data"][0]
        price = item["price"]
        assert row["status"] == sub["status"], (sub_id, row["status"], sub["status"])
        assert row["cancel_at_period_end"] == sub["cancel_at_period_end"]
        assert row["amount"] == price["unit_amount"]
        assert row["interval"] == price["recurring"]["interval"]
        assert int(row["current_period_start"].timestamp()) == item["current_period_start"], (
            sub_id, row["current_period_start"], item["current_period_start"])
        assert int(row["current_period_end"].timestamp()) == item["current_period_end"]
        assert row["founding"] == (sub_id in world.founding_subs), sub_id
        assert sorted(row["discounts"]) == sorted([*sub["discounts"], *item["discounts"]])
        off, _ = world._discount_amount(sub, price["unit_amount"])
        after = (apply_percent_off(row["amount"], row["percent_off"])
                 if row["percent_off"] is not None
                 else max(0, row["amount"] - (row["amount_off"] or 0)))
        assert after == price["unit_amount"] - off, (row, sub["discounts"], item["discounts"])
        for name in ("canceled_at", "ended_at"):
            want = sub.get(name)
            got = row[name]
            assert (int(got.timestamp()) if got else None) == want, (sub_id, name, got, want)


# --- pure: the reference ledger -------------------------------------------------------------


@long_run
@settings(max_examples=EXAMPLES, deadline=None, derandomize=False,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(data=st.data())
def test_deep_any_order_gives_the_ledger_stripe_ends_with(data: st.DataObject) -> None:
    world, subs = data.draw(deep_histories())
    bts = bt_rows(world)
    ordered = reference(world.events, OFFER, bts)
    check_against_stripe(ordered, world, subs)
    shuffled = data.draw(deliveries(world.events))
    assert reference(shuffled, OFFER, bts) == ordered


# --- the database --------------------------------------------------------------------------


async def _reset(pool: asyncpg.Pool) -> None:
    from tests.conftest import empty_tables
    await empty_tables(pool)
    await pool.execute(
        "INSERT INTO campaigns (slug, title, starts_at, ends_at) VALUES"
        " ('winter', 'Winter', NULL, NULL),"
        " ('spring', 'Spring', '1999-03-01', '1999-06-01'),"
        " ('founders', 'Founders', '2000-01-01', NULL)")


async def _deliver(pool: asyncpg.Pool, events: list[dict[str, Any]], mode: int, racing: int,
                   sizes: list[int]) -> None:
    if mode == 0:
        for start in range(0, len(events), racing):
            await asyncio.gather(*(ingest(pool, parse_event(e), json.dumps(e), OFFER)
                                   for e in events[start:start + racing]))
        return
    await _deliver_in_groups(pool, events, sizes, racing, sources=("webhook", "reconcile"))


async def _check_db(pool: asyncpg.Pool, events: list[dict[str, Any]],
                    bts: dict[str, BalanceTransaction]) -> None:
    expected = reference(events, OFFER, bts)
    got = await dump(pool)
    for table in expected:
        for key in sorted(set(expected[table]) | set(got[table])):
            assert got[table].get(key) == expected[table].get(key), (
                table, key, _diff(got[table].get(key), expected[table].get(key)))
    async with db.connection(pool) as conn:
        result = await totals.verify(conn)
    assert result.differences == (), list(totals.describe(result))


def _diff(got: dict[str, Any] | None, want: dict[str, Any] | None) -> Any:
    if got is None or want is None:
        return {"got": got, "want": want}
    return {k: (got.get(k), want.get(k)) for k in set(got) | set(want)
            if got.get(k) != want.get(k)}


@long_run
@settings(max_examples=DB_EXAMPLES, deadline=None, derandomize=False,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                 HealthCheck.data_too_large])
@given(data=st.data())
async def test_deep_database_ledger_equals_the_reference(
    pool: asyncpg.Pool, data: st.DataObject
) -> None:
    world, _ = data.draw(deep_histories(max_steps=DB_STEPS))
    shuffled = data.draw(deliveries(world.events))
    mode = data.draw(st.sampled_from([0, 1]))
    racing = data.draw(st.sampled_from([1, 2, 4, 8]))
    sizes = data.draw(st.lists(st.integers(1, 12), min_size=1, max_size=4))
    bts_at = data.draw(st.integers(0, len(shuffled)))
    await _reset(pool)
    await _deliver(pool, shuffled[:bts_at], mode, racing, sizes)
    async with db.connection(pool) as conn:
        await fees.store_balance_transactions(conn, list(world.balance_transactions.values()))
    await _deliver(pool, shuffled[bts_at:], mode, racing, sizes)
    await _check_db(pool, world.events, bt_rows(world))
