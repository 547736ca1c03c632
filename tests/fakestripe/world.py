"""A small deterministic Stripe simulator: consistent objects and the webhook events it sends."""

from __future__ import annotations

import calendar
import copy
import datetime as dt
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any, Literal, overload

from . import objects as o
from .objects import Obj

DAY = 86400

# Value of one major unit of each currency in the settlement currency's major unit. Fractions keep
# the conversion exact, so a test can predict every settled amount.
DEFAULT_RATES: Mapping[str, Fraction] = {
    "gbp": Fraction(1),
    "usd": Fraction(4, 5),
    "eur": Fraction(17, 20),
    "jpy": Fraction(1, 200),
}

# A delayed payment method per currency for async_checkout (what Checkout offers for it).
_ASYNC_METHODS: Mapping[str, str] = {"gbp": "bacs_debit", "eur": "sepa_debit"}


def exponent(currency: str) -> int:
    """Decimal places of a currency's minor unit (0 for JPY and the other zero-decimal ones)."""
    return 0 if currency.lower() in o.ZERO_DECIMAL else 2


def _round_half_up(x: Fraction) -> int:
    # Stripe rounds fees and conversions half away from zero; int() alone would truncate.
    sign = -1 if x < 0 else 1
    return sign * int(abs(x) + Fraction(1, 2))


def add_interval(ts: int, interval: str, count: int = 1) -> int:
    """`ts` moved on by `count` intervals, clamping the day as Stripe does (31 Jan + 1 month)."""
    if interval == "day":
        return ts + count * DAY
    if interval == "week":
        return ts + count * 7 * DAY
    t = dt.datetime.fromtimestamp(ts, dt.UTC)
    months = count * (12 if interval == "year" else 1)
    if interval not in ("month", "year"):
        raise ValueError(f"unknown interval {interval!r}")
    y, m = divmod(t.month - 1 + months, 12)
    year, month = t.year + y, m + 1
    day = min(t.day, calendar.monthrange(year, month)[1])
    return int(t.replace(year=year, month=month, day=day).timestamp())


@dataclass
class Emitted:
    """What a World action produced. Iterates (and indexes) as its list of events."""

    events: list[Obj] = field(default_factory=list)

    def __iter__(self) -> Iterator[Obj]:
        return iter(self.events)

    def __len__(self) -> int:
        return len(self.events)

    @overload
    def __getitem__(self, i: int) -> Obj: ...
    @overload
    def __getitem__(self, i: slice) -> list[Obj]: ...
    def __getitem__(self, i: int | slice) -> Obj | list[Obj]:
        return self.events[i]

    @property
    def types(self) -> list[str]:
        """The event types, in emission order."""
        return [e["type"] for e in self.events]

    def of_type(self, type: str) -> list[Obj]:
        return [e for e in self.events if e["type"] == type]


@dataclass
class Payment(Emitted):
    """A one-off payment (checkout or bare payment intent)."""

    payment_intent: str = ""
    charge: str = ""
    checkout_session: str | None = None
    customer: str | None = None
    balance_transaction: str | None = None


@dataclass
class InvoiceRun(Emitted):
    """One subscription invoice and its payment attempt (charge is the last attempt's)."""

    subscription: str = ""
    invoice: str = ""
    invoice_payment: str | None = None
    payment_intent: str | None = None
    charge: str | None = None
    balance_transaction: str | None = None


@dataclass
class Subscribed(InvoiceRun):
    """A new subscription started through Checkout, with its first invoice."""

    customer: str = ""
    checkout_session: str = ""
    price: str = ""
    discount: str | None = None


@dataclass
class RefundResult(Emitted):
    refund: str = ""
    balance_transaction: str | None = None


@dataclass
class DisputeResult(Emitted):
    dispute: str = ""
    balance_transactions: list[str] = field(default_factory=list)


@dataclass
class PayoutResult(Emitted):
    payout: str = ""
    balance_transactions: list[str] = field(default_factory=list)


class World:
    """Holds Stripe objects consistently and emits, in Stripe's order, the events it would send.

    Every action advances the clock (`now`) a little, so event `created` values increase, with
    several events sharing a second where Stripe's would. `events` records everything emitted;
    `objects` holds the latest state of every object by id; `balance_transactions` the balance
    transactions, settled in `settlement_currency`.
    """

    def __init__(
        self,
        seed: int = 0,
        start: int = 1_795_000_000,
        *,
        settlement_currency: str = "gbp",
        rates: Mapping[str, Fraction] | None = None,
        founding_percent_off: float = 50,
        dispute_fee: int = 2000,
        deferred_balance_transactions: bool = True,
        livemode: bool = False,
    ) -> None:
        self.ids = o.IdGenerator(seed)
        self.now = start
        self.settlement_currency = settlement_currency
        self.rates: dict[str, Fraction] = dict(rates or DEFAULT_RATES)
        self.founding_percent_off = founding_percent_off
        self.dispute_fee = dispute_fee
        # Since API 2024-04-10 card payments are captured asynchronously: charge.succeeded often
        # arrives with `balance_transaction: null` and a charge.updated follows once it exists.
        self.deferred_balance_transactions = deferred_balance_transactions
        self.livemode = livemode
        self.events: list[Obj] = []
        self.objects: dict[str, Obj] = {}
        self.balance_transactions: dict[str, Obj] = {}
        self.refunds_by_charge: dict[str, list[str]] = {}
        self.payout_of: dict[str, str] = {}  # balance transaction id -> payout id
        self.payout_members: dict[str, list[str]] = {}  # payout id -> balance transaction ids
        self._invoice_seq: dict[str, int] = {}
        self._products: dict[str, str] = {}
        self._failed_runs: dict[str, InvoiceRun] = {}  # subscription id -> unpaid renewal
        # sessions created through the API (tests/fakestripe/writes.py) -> what they sell
        self.checkout_orders: dict[str, CheckoutOrder] = {}

    # -- clock, storage, emission --------------------------------------------------------------

    def advance(self, seconds: int) -> int:
        """Move the clock on; returns the new time."""
        if seconds < 0:
            raise ValueError("the clock only moves forward")
        self.now += seconds
        return self.now

    def get(self, object_id: str) -> Obj:
        """The latest state of an object (the live dict: copy it before changing it)."""
        return self.objects[object_id]

    def _put(self, obj: Obj) -> Obj:
        self.objects[obj["id"]] = obj
        if obj.get("object") == "balance_transaction":
            self.balance_transactions[obj["id"]] = obj
        return obj

    def _new_request(self) -> tuple[str, str]:
        return self.ids.new("req"), self.ids.uuid()

    def _emit(
        self,
        out: Emitted,
        type: str,
        obj: Obj,
        *,
        previous: Mapping[str, Any] | None = None,
        request: tuple[str, str] | None = None,
    ) -> Obj:
        # Events carry a snapshot: later changes to the object must not leak into old events.
        # (Without what Stripe includes only when asked to expand it.)
        ev = o.event(
            type,
            copy.deepcopy(o.as_sent(obj)),
            created=self.now,
            ids=self.ids,
            livemode=self.livemode,
            previous_attributes=copy.deepcopy(dict(previous)) if previous is not None else None,
            request_id=request[0] if request else None,
            idempotency_key=request[1] if request else None,
        )
        self.events.append(ev)
        out.events.append(ev)
        return ev

    @staticmethod
    def _changes(obj: Obj, **changes: Any) -> dict[str, Any]:
        """Apply `changes` to `obj`; return the previous values of the fields that changed."""
        previous: dict[str, Any] = {}
        for key, value in changes.items():
            if obj.get(key) != value:
                previous[key] = copy.deepcopy(obj.get(key))
            obj[key] = value
        return previous

    # -- money ---------------------------------------------------------------------------------

    def settle(self, amount: int, currency: str) -> tuple[int, float | None]:
        """`amount` (minor units of `currency`) in settlement minor units, and the rate used."""
        currency = currency.lower()
        if currency == self.settlement_currency:
            return amount, None
        try:
            rate = self.rates[currency] / self.rates[self.settlement_currency]
        except KeyError:
            raise ValueError(f"no exchange rate for {currency!r}") from None
        major = Fraction(amount, 10 ** exponent(currency))
        settled = _round_half_up(major * rate * 10 ** exponent(self.settlement_currency))
        return settled, float(rate)

    def processing_fee(self, settled_amount: int) -> int:
        """Stripe's fee on a settled charge: 1.5% + 20 minor units."""
        return _round_half_up(Fraction(settled_amount * 15, 1000)) + 20

    def _available_on(self, created: int) -> int:
        # Funds become available at a midnight UTC a few days later, as Stripe's are.
        return (created // DAY + 3) * DAY

    def _bt(self, **kwargs: Any) -> Obj:
        bt = o.balance_transaction(ids=self.ids, created=self.now, **kwargs)
        bt["available_on"] = self._available_on(self.now)
        return self._put(bt)

    def _charge_bt(self, ch: Obj, type: str = "charge") -> Obj:
        """The charge's balance transaction: `charge` for a card, `payment` for other methods
        (category `charge` either way)."""
        settled, rate = self.settle(ch["amount"], ch["currency"])
        return self._bt(
            amount=settled,
            currency=self.settlement_currency,
            source=ch["id"],
            type=type,
            reporting_category="charge",
            fee=self.processing_fee(settled),
            exchange_rate=rate,
            description=ch["description"],
        )

    # -- building blocks -----------------------------------------------------------------------

    def _product(self, kind: str) -> str:
        if kind not in self._products:
            name = "Recurring support" if kind == "recurring" else "One-off support"
            p = o.product(ids=self.ids, created=self.now, name=name, livemode=self.livemode)
            self._products[kind] = self._put(p)["id"]
        return self._products[kind]

    def _coupon(self, coupon_id: str = "founding-supporter") -> Obj:
        if coupon_id not in self.objects:
            self._put(
                o.coupon(
                    id=coupon_id,
                    created=self.now,
                    percent_off=self.founding_percent_off,
                    livemode=self.livemode,
                )
            )
        return self.objects[coupon_id]

    def create_coupon(self, coupon_id: str, *, percent_off: float | None = None,
                      amount_off: int | None = None, currency: str | None = None,
                      currency_options: Mapping[str, int] | None = None) -> Emitted:
        """A coupon made in the Dashboard (a promotion, a hardship discount): coupon.created.
        `currency_options` gives an amount-off coupon's amount in other currencies."""
        out = Emitted()
        self.advance(1)
        cp = o.coupon(id=coupon_id, created=self.now, percent_off=percent_off,
                      amount_off=amount_off, currency=currency, name=coupon_id,
                      livemode=self.livemode)
        if currency_options:
            cp["currency_options"] = {c: {"amount_off": a} for c, a in currency_options.items()}
        self._emit(out, "coupon.created", self._put(cp))
        return out

    def _pi(self, amount: int, currency: str, **kwargs: Any) -> Obj:
        return self._put(
            o.payment_intent(
                ids=self.ids,
                amount=amount,
                currency=currency,
                created=self.now,
                livemode=self.livemode,
                **kwargs,
            )
        )

    def _attempt(
        self,
        out: Emitted,
        pi: Obj,
        *,
        succeed: bool,
        email: str | None,
        request: tuple[str, str] | None,
        method: str = "card",
        emit_pi_event: bool = True,
    ) -> Obj:
        """Charge a payment intent once: the charge event, then the payment intent's."""
        pm = pi["payment_method"] or self.ids.new("pm")
        ch = self._put(
            o.charge(
                ids=self.ids,
                amount=pi["amount"],
                currency=pi["currency"],
                created=self.now,
                status="succeeded" if succeed else "failed",
                payment_intent=pi["id"],
                customer=pi["customer"],
                email=email,
                metadata=pi["metadata"],
                description=pi["description"],
                payment_method=pm,
                method=method,
                livemode=self.livemode,
            )
        )
        if not succeed:
            if method != "card":
                ch["failure_code"] = "debit_not_authorized"
                ch["failure_message"] = "The customer's bank account could not be debited."
            self._emit(out, "charge.failed", ch, request=request)
            pi.update(
                status="requires_payment_method",
                latest_charge=ch["id"],
                payment_method=None,
                last_payment_error={
                    "advice_code": None,
                    "charge": ch["id"],
                    "code": ch["failure_code"],
                    "decline_code": "generic_decline" if method == "card" else None,
                    "doc_url": "https://docs.stripe.com/error-codes/card-declined",
                    "message": ch["failure_message"],
                    "network_advice_code": None,
                    "network_decline_code": None,
                    "param": None,
                    "payment_method": {"id": pm, "object": "payment_method", "type": method},
                    "payment_method_type": method,
                    "request_log_url": None,
                    "type": "card_error" if method == "card" else "invalid_request_error",
                },
            )
            if emit_pi_event:
                self._emit(out, "payment_intent.payment_failed", pi, request=request)
            return ch
        if not self.deferred_balance_transactions:
            ch["balance_transaction"] = self._charge_bt(ch)["id"]
        self._emit(out, "charge.succeeded", ch, request=request)
        pi.update(
            status="succeeded",
            amount_received=pi["amount"],
            latest_charge=ch["id"],
            payment_method=pm,
            last_payment_error=None,
            processing=None,
        )
        if emit_pi_event:
            self._emit(out, "payment_intent.succeeded", pi, request=request)
        return ch

    def _attach_bt(self, out: Emitted, ch: Obj) -> str:
        """The balance transaction Stripe attaches a few seconds after capture: charge.updated."""
        if ch["balance_transaction"] is not None:
            return str(ch["balance_transaction"])
        self.advance(2)
        bt = self._charge_bt(ch, "charge" if _paid_by_card(ch) else "payment")
        prev = self._changes(ch, balance_transaction=bt["id"])
        self._emit(out, "charge.updated", ch, previous=prev)
        return str(bt["id"])

    @staticmethod
    def _metadata(metadata: Mapping[str, str] | None, campaign: str | None) -> dict[str, str]:
        md = dict(metadata or {})
        if campaign is not None:
            md["campaign"] = campaign
        return md

    # -- one-off payments ----------------------------------------------------------------------

    def one_off(
        self,
        amount: int,
        currency: str,
        *,
        email: str | None = None,
        customer: str | None = None,
        campaign: str | None = None,
        metadata: Mapping[str, str] | None = None,
        via: Literal["checkout", "payment_intent"] = "checkout",
        checkout_session: str | None = None,
    ) -> Payment:
        """A successful one-off card payment.

        checkout: payment_intent.created; charge.succeeded, payment_intent.succeeded,
        checkout.session.completed (one second later, same second); charge.updated (+2 s, the
        balance transaction). payment_intent: the same without the session.
        """
        out = Payment()
        md = self._metadata(metadata, campaign)
        req = self._new_request()
        self.advance(1)
        cs: Obj | None = None
        if checkout_session is not None:  # a session made through the API, paid now
            cs = self._open_session(checkout_session)
            self.advance(30)
        elif via == "checkout":
            cs = self._put(
                o.checkout_session(
                    ids=self.ids,
                    amount_total=amount,
                    currency=currency,
                    created=self.now,
                    status="open",
                    payment_status="unpaid",
                    customer=customer,
                    customer_email=email,
                    metadata=md,
                    livemode=self.livemode,
                )
            )
            self.advance(30)  # the payer fills in the form
        # Checkout copies payment_intent_data.metadata onto the payment intent, which gives it
        # to its charges.
        pi = self._pi(
            amount, currency, status="requires_payment_method", customer=customer, metadata=md
        )
        self._emit(out, "payment_intent.created", pi, request=req)
        self.advance(1)
        ch = self._attempt(out, pi, succeed=True, email=email, request=req)
        if cs is not None:
            cs.update(self._completed_session(cs, email, payment_status="paid"))
            cs["payment_intent"] = pi["id"]
            self._emit(out, "checkout.session.completed", cs, request=req)
        out.balance_transaction = self._attach_bt(out, ch)
        out.payment_intent, out.charge = pi["id"], ch["id"]
        out.checkout_session = cs["id"] if cs else None
        out.customer = customer
        return out

    def _completed_session(self, cs: Obj, email: str | None, *, payment_status: str) -> Obj:
        done = o.checkout_session(
            id=cs["id"],
            amount_total=cs["amount_total"],
            amount_subtotal=cs["amount_subtotal"],
            amount_discount=cs["total_details"]["amount_discount"],
            discounts=cs["discounts"],
            currency=cs["currency"],
            created=cs["created"],
            mode=cs["mode"],
            status="complete",
            payment_status=payment_status,
            payment_intent=cs["payment_intent"],
            subscription=cs["subscription"],
            invoice=cs["invoice"],
            customer=cs["customer"],
            customer_email=cs["customer_email"],
            email=email,
            metadata=cs["metadata"],
            payment_method_types=cs["payment_method_types"],
            success_url=cs["success_url"],
            cancel_url=cs["cancel_url"],
            livemode=self.livemode,
        )
        done["expires_at"] = cs["expires_at"]
        return done

    def failed_payment(
        self,
        amount: int,
        currency: str,
        *,
        email: str | None = None,
        campaign: str | None = None,
        metadata: Mapping[str, str] | None = None,
    ) -> Payment:
        """A declined card: payment_intent.created; charge.failed, payment_intent.payment_failed."""
        out = Payment()
        req = self._new_request()
        self.advance(1)
        md = self._metadata(metadata, campaign)
        pi = self._pi(amount, currency, status="requires_payment_method", metadata=md)
        self._emit(out, "payment_intent.created", pi, request=req)
        self.advance(1)
        ch = self._attempt(out, pi, succeed=False, email=email, request=req)
        out.payment_intent, out.charge = pi["id"], ch["id"]
        return out

    def async_checkout(
        self,
        amount: int,
        currency: str,
        succeed: bool,
        *,
        email: str | None = None,
        campaign: str | None = None,
        metadata: Mapping[str, str] | None = None,
        method: str | None = None,
        settle_after: int = 3 * DAY,
        booked: bool = False,
    ) -> Payment:
        """A Checkout payment by a delayed method (Bacs/SEPA debit).

        payment_intent.created; charge.pending, payment_intent.processing,
        checkout.session.completed (payment_status unpaid); `settle_after` later either
        charge.succeeded, payment_intent.succeeded, checkout.session.async_payment_succeeded,
        charge.updated — or charge.failed, payment_intent.payment_failed,
        checkout.session.async_payment_failed.

        With `booked`, a debit that fails is one Stripe had booked in the balance when it was
        submitted and reverses when the bank refuses it (stripe/_charge.py
        `failure_balance_transaction`: "the reversal of the balance on your account due to
        payment failure"): the booking (type `payment`, category `charge`, with Stripe's fee)
        is the charge's `balance_transaction` from charge.pending on, and the reversal (type
        `payment_failure_refund`, category `charge_failure`, the settled amount back out; the
        fee is not given back) its `failure_balance_transaction` in charge.failed. Both are
        paid out like any other. Off by default, as tests written before it expect a charge
        that did not succeed to have no balance transaction; a debit that succeeds gets its
        balance transaction when the bank collects it either way.
        """
        out = Payment()
        method = method or _ASYNC_METHODS.get(currency, "sepa_debit")
        md = self._metadata(metadata, campaign)
        req = self._new_request()
        self.advance(1)
        cs = self._put(
            o.checkout_session(
                ids=self.ids,
                amount_total=amount,
                currency=currency,
                created=self.now,
                status="open",
                payment_status="unpaid",
                customer_email=email,
                metadata=md,
                payment_method_types=(method,),
                livemode=self.livemode,
            )
        )
        self.advance(45)
        pi = self._pi(
            amount,
            currency,
            status="requires_payment_method",
            metadata=md,
            payment_method_types=(method,),
        )
        self._emit(out, "payment_intent.created", pi, request=req)
        self.advance(1)
        pm = self.ids.new("pm")
        ch = self._put(
            o.charge(
                ids=self.ids,
                amount=amount,
                currency=currency,
                created=self.now,
                status="pending",
                payment_intent=pi["id"],
                email=email,
                metadata=md,
                payment_method=pm,
                method=method,
                livemode=self.livemode,
            )
        )
        if booked and not succeed:
            ch["balance_transaction"] = self._charge_bt(ch, type="payment")["id"]
        self._emit(out, "charge.pending", ch, request=req)
        pi.update(
            status="processing",
            latest_charge=ch["id"],
            payment_method=pm,
            processing={"type": method, method: {}},
        )
        self._emit(out, "payment_intent.processing", pi, request=req)
        cs.update(self._completed_session(cs, email, payment_status="unpaid"))
        cs["payment_intent"] = pi["id"]
        self._emit(out, "checkout.session.completed", cs, request=req)

        self.advance(settle_after)
        if succeed:
            ch.update(
                status="succeeded",
                paid=True,
                captured=True,
                amount_captured=amount,
                outcome=o.outcome(failed=False),
                receipt_url=f"https://pay.stripe.com/receipts/payment/{ch['id'][3:]}",
            )
            if not self.deferred_balance_transactions:
                ch["balance_transaction"] = self._charge_bt(ch)["id"]
            self._emit(out, "charge.succeeded", ch)
            pi.update(status="succeeded", amount_received=amount, processing=None)
            self._emit(out, "payment_intent.succeeded", pi)
            cs["payment_status"] = "paid"
            self._emit(out, "checkout.session.async_payment_succeeded", cs)
            out.balance_transaction = self._attach_bt(out, ch)
        else:
            if booked:
                booking = self.balance_transactions[ch["balance_transaction"]]
                ch["failure_balance_transaction"] = self._bt(
                    amount=-int(booking["amount"]),
                    currency=self.settlement_currency,
                    source=ch["id"],
                    type="payment_failure_refund",
                    reporting_category="charge_failure",
                    exchange_rate=booking["exchange_rate"],
                    description="PAYMENT FAILURE",
                )["id"]
                out.balance_transaction = ch["balance_transaction"]
            ch.update(
                status="failed",
                failure_code="debit_not_authorized",
                failure_message="The customer's bank account could not be debited.",
                outcome=o.outcome(failed=True),
            )
            self._emit(out, "charge.failed", ch)
            pi.update(
                status="requires_payment_method",
                processing=None,
                payment_method=None,
                last_payment_error={
                    "charge": ch["id"],
                    "code": "debit_not_authorized",
                    "message": ch["failure_message"],
                    "payment_method_type": method,
                    "type": "invalid_request_error",
                },
            )
            self._emit(out, "payment_intent.payment_failed", pi)
            self._emit(out, "checkout.session.async_payment_failed", cs)
        out.payment_intent, out.charge, out.checkout_session = pi["id"], ch["id"], cs["id"]
        return out

    # -- subscriptions -------------------------------------------------------------------------

    def _sub(self, sub_id: str) -> Obj:
        sub = self.objects.get(sub_id)
        if sub is None or sub.get("object") != "subscription":
            raise KeyError(f"no subscription {sub_id!r}")
        return sub

    def _discount_amounts(self, sub: Obj, subtotal: int) -> list[tuple[str, int]]:
        """What each discount takes off the item's `subtotal`, as Stripe applies them: the item's
        discounts first, then the subscription's, each in its listed order and on what the ones
        before it left (a percentage's discount rounded half up; an amount off, in the
        subscription's currency (the coupon's own, else its currency option), never more than
        is left)."""
        left = subtotal
        taken: list[tuple[str, int]] = []
        for di_id in [*sub["items"]["data"][0]["discounts"], *sub["discounts"]]:
            cp = self.objects[self.objects[di_id]["source"]["coupon"]]
            off = 0
            if cp["percent_off"] is not None:
                off = _round_half_up(Fraction(left) * Fraction(str(cp["percent_off"])) / 100)
            elif cp["amount_off"] is not None:
                amount = cp["amount_off"] if cp["currency"] == sub["currency"] else (
                    (cp.get("currency_options") or {}).get(sub["currency"]) or {}).get("amount_off")
                off = min(int(amount or 0), left)
            left -= off
            taken.append((di_id, off))
        return taken

    def _discount_amount(self, sub: Obj, subtotal: int) -> tuple[int, list[str]]:
        """What the discounts take off the item's `subtotal` in all, and the discounts applied."""
        taken = self._discount_amounts(sub, subtotal)
        return sum(off for _, off in taken), [di_id for di_id, _ in taken]

    def _new_invoice(self, sub: Obj, billing_reason: str, period: tuple[int, int]) -> Obj:
        """A draft invoice for the subscription's current item period."""
        cus = self.objects[sub["customer"]]
        inv_id = self.ids.new("in")
        item = sub["items"]["data"][0]
        price = item["price"]
        subtotal = int(price["unit_amount"]) * int(item["quantity"])
        taken = self._discount_amounts(sub, subtotal)
        discounts = [di_id for di_id, _ in taken]
        discount_amounts = [{"amount": off, "discount": di_id} for di_id, off in taken]
        line = o.invoice_line_item(
            ids=self.ids,
            invoice=inv_id,
            subscription=sub["id"],
            subscription_item=item["id"],
            price=price,
            period_start=item["current_period_start"],
            period_end=item["current_period_end"],
            quantity=int(item["quantity"]),
            discount_amounts=discount_amounts,
            metadata=sub["metadata"],
            description=f"{item['quantity']} x Recurring support",
            livemode=self.livemode,
        )
        inv = o.invoice(
            id=inv_id,
            customer=cus["id"],
            currency=sub["currency"],
            created=self.now,
            lines=[line],
            status="draft",
            subscription=sub["id"],
            subscription_metadata=sub["metadata"],
            billing_reason=billing_reason,
            customer_email=cus["email"],
            customer_name=cus["name"],
            discounts=discounts,
            total_discount_amounts=discount_amounts,
            period_start=period[0],
            period_end=period[1],
            livemode=self.livemode,
        )
        return self._put(inv)

    def _finalize(self, out: Emitted, inv: Obj, request: tuple[str, str] | None) -> None:
        cus = self.objects[inv["customer"]]
        seq = self._invoice_seq.get(cus["id"], 0) + 1
        self._invoice_seq[cus["id"]] = seq
        finalized = o.invoice(
            id=inv["id"],
            customer=inv["customer"],
            currency=inv["currency"],
            created=inv["created"],
            lines=inv["lines"]["data"],
            status="open",
            subscription=inv["parent"]["subscription_details"]["subscription"],
            subscription_metadata=inv["parent"]["subscription_details"]["metadata"],
            billing_reason=inv["billing_reason"],
            customer_email=inv["customer_email"],
            customer_name=inv["customer_name"],
            discounts=inv["discounts"],
            total_discount_amounts=inv["total_discount_amounts"],
            period_start=inv["period_start"],
            period_end=inv["period_end"],
            number=f"{cus['invoice_prefix']}-{seq:04d}",
            finalized_at=self.now,
            livemode=self.livemode,
        )
        inv.clear()
        inv.update(finalized)
        cus["next_invoice_sequence"] = seq + 1
        self._emit(out, "invoice.finalized", inv, request=request)

    def _pay_invoice(
        self,
        out: InvoiceRun,
        inv: Obj,
        sub: Obj,
        *,
        succeed: bool,
        request: tuple[str, str] | None,
        description: str,
    ) -> None:
        """Create or reuse the invoice's payment intent and charge it once."""
        cus = self.objects[inv["customer"]]
        amount = int(inv["amount_due"])
        out.invoice = inv["id"]
        if amount == 0:
            # Nothing to collect (e.g. 100% off): Stripe marks the invoice paid without a payment.
            self._mark_paid(out, inv, None, request)
            return
        inpay_id = out.invoice_payment
        pi: Obj
        if inpay_id is None:
            # Finalizing creates the invoice's default payment intent and InvoicePayment.
            pi = self._pi(
                amount,
                inv["currency"],
                status="requires_payment_method",
                customer=cus["id"],
                description=description,
                payment_method=sub["default_payment_method"],
            )
            ip = self._put(
                o.invoice_payment(
                    ids=self.ids,
                    invoice=inv["id"],
                    amount_requested=amount,
                    currency=inv["currency"],
                    created=self.now,
                    status="open",
                    payment_intent=pi["id"],
                    livemode=self.livemode,
                )
            )
            out.invoice_payment = ip["id"]
            self._emit(out, "payment_intent.created", pi, request=request)
            self.advance(1)
        else:
            ip = self.objects[inpay_id]
            pi = self.objects[ip["payment"]["payment_intent"]]
        out.payment_intent = pi["id"]
        ch = self._attempt(out, pi, succeed=succeed, email=cus["email"], request=request)
        out.charge = ch["id"]
        if not succeed:
            inv.update(
                attempted=True,
                attempt_count=int(inv["attempt_count"]) + 1,
                next_payment_attempt=self.now + 3 * DAY,
            )
            self._emit(out, "invoice.payment_failed", inv, request=request)
            if sub["status"] != "past_due" and sub["status"] != "incomplete":
                prev = self._changes(sub, status="past_due")
                self._emit(out, "customer.subscription.updated", sub, previous=prev)
            return
        if sub["default_payment_method"] is None:
            sub["default_payment_method"] = pi["payment_method"]
        ip.update(status="paid", amount_paid=amount)
        ip["status_transitions"]["paid_at"] = self.now
        self._emit(out, "invoice_payment.paid", ip, request=request)
        self._mark_paid(out, inv, ch, request)

    def _mark_paid(
        self, out: InvoiceRun, inv: Obj, ch: Obj | None, request: tuple[str, str] | None
    ) -> None:
        sub = self.objects[inv["parent"]["subscription_details"]["subscription"]]
        if sub["status"] in ("incomplete", "past_due"):
            prev = self._changes(sub, status="active")
            self._emit(out, "customer.subscription.updated", sub, previous=prev)
        inv.update(
            status="paid",
            amount_paid=inv["amount_due"],
            amount_remaining=0,
            attempted=True,
            attempt_count=max(1, int(inv["attempt_count"])) if ch else 0,
            auto_advance=False,
            next_payment_attempt=None,
        )
        inv["status_transitions"]["paid_at"] = self.now
        self._emit(out, "invoice.paid", inv, request=request)
        self._emit(out, "invoice.payment_succeeded", inv, request=request)

    def subscribe(
        self,
        amount: int,
        currency: str,
        interval: str = "month",
        *,
        campaign: str | None = None,
        founding: bool = False,
        email: str | None = None,
        customer: str | None = None,
        metadata: Mapping[str, str] | None = None,
        coupon: str = "founding-supporter",
        checkout_session: str | None = None,
    ) -> Subscribed:
        """A subscription started through Checkout (mode subscription), first invoice paid.

        customer.created (unless `customer` is given), customer.subscription.created
        (incomplete), customer.discount.created (founding), invoice.created, invoice.finalized,
        payment_intent.created; then one second later charge.succeeded,
        payment_intent.succeeded, invoice_payment.paid, customer.subscription.updated (active),
        invoice.paid, invoice.payment_succeeded, checkout.session.completed; charge.updated
        (+2 s). `subscription_data.metadata` (with `campaign`) lands on the subscription and is
        copied into every invoice's `parent.subscription_details.metadata`.
        """
        out = Subscribed()
        md = self._metadata(metadata, campaign)
        req = self._new_request()
        self.advance(1)
        if checkout_session is not None:  # a session made through the API, paid now
            cs = self._open_session(checkout_session)
        else:
            cs = self._put(
                o.checkout_session(
                    ids=self.ids,
                    amount_total=None,
                    currency=currency,
                    created=self.now,
                    mode="subscription",
                    status="open",
                    payment_status="unpaid",
                    customer=customer,
                    customer_email=email,
                    metadata=md,
                    livemode=self.livemode,
                )
            )
        self.advance(40)
        if customer is None:
            cus = self._put(
                o.customer(ids=self.ids, created=self.now, email=email, livemode=self.livemode)
            )
            self._emit(out, "customer.created", cus, request=req)
        else:
            cus = self.objects[customer]
            email = email or cus["email"]
        price = self._put(
            o.price(
                ids=self.ids,
                unit_amount=amount,
                currency=currency,
                created=self.now,
                product=self._product("recurring"),
                interval=interval,
                livemode=self.livemode,
            )
        )
        sub_id = self.ids.new("sub")
        end = add_interval(self.now, interval)
        item = o.subscription_item(
            ids=self.ids,
            price=price,
            subscription=sub_id,
            created=self.now,
            current_period_start=self.now,
            current_period_end=end,
        )
        discounts: list[str] = []
        di: Obj | None = None
        if founding:
            cp = self._coupon(coupon)
            cp["times_redeemed"] += 1
            di = self._put(
                o.discount(
                    ids=self.ids,
                    coupon=cp["id"],
                    start=self.now,
                    customer=cus["id"],
                    subscription=sub_id,
                    checkout_session=cs["id"],
                )
            )
            discounts.append(di["id"])
        sub = self._put(
            o.subscription(
                id=sub_id,
                customer=cus["id"],
                currency=currency,
                created=self.now,
                items=[item],
                status="incomplete",
                discounts=discounts,
                metadata=md,
                livemode=self.livemode,
            )
        )
        inv = self._new_invoice(sub, "subscription_create", (self.now, self.now))
        sub["latest_invoice"] = inv["id"]
        self._emit(out, "customer.subscription.created", sub, request=req)
        if di is not None:
            self._emit(out, "customer.discount.created", di, request=req)
        self._emit(out, "invoice.created", inv, request=req)
        self._finalize(out, inv, req)
        out.subscription = sub_id
        self._pay_invoice(
            out, inv, sub, succeed=True, request=req, description="Subscription creation"
        )
        cs["customer"] = cus["id"]
        cs["subscription"] = sub_id
        cs["invoice"] = inv["id"]
        cs["amount_subtotal"] = inv["subtotal"]
        cs["amount_total"] = inv["total"]
        cs["total_details"]["amount_discount"] = inv["subtotal"] - inv["total"]
        if di is not None:
            cs["discounts"] = [{"coupon": di["source"]["coupon"], "promotion_code": None}]
        # (a first invoice of nothing, under a 100% coupon, is no payment: Stripe says so)
        cs.update(self._completed_session(
            cs, email, payment_status="paid" if inv["total"] else "no_payment_required"))
        self._emit(out, "checkout.session.completed", cs, request=req)
        if out.charge:
            out.balance_transaction = self._attach_bt(out, self.objects[out.charge])
        out.customer, out.checkout_session, out.price = cus["id"], cs["id"], price["id"]
        out.discount = di["id"] if di else None
        return out

    def _new_period(self, sub: Obj, start: int) -> tuple[int, int]:
        """Move every item to the period starting at `start`; returns the previous period."""
        item = sub["items"]["data"][0]
        previous = (int(item["current_period_start"]), int(item["current_period_end"]))
        interval = item["price"]["recurring"]["interval"]
        for it in sub["items"]["data"]:
            it["current_period_start"] = start
            it["current_period_end"] = add_interval(start, interval)
        return previous

    def _cycle(
        self,
        sub: Obj,
        *,
        succeed: bool,
        billing_reason: str = "subscription_cycle",
        start: int | None = None,
        extra_updates: Mapping[str, Any] | None = None,
        before_invoice: Sequence[str] = (),
    ) -> InvoiceRun:
        out = InvoiceRun(subscription=sub["id"])
        if start is None:
            start = int(sub["items"]["data"][0]["current_period_end"])
        self.now = max(self.now, start)
        old_items = copy.deepcopy(sub["items"])
        old_latest = sub["latest_invoice"]
        previous_period = self._new_period(sub, start)
        # A renewal invoice's own period_start/period_end cover the period just ended (it
        # bills pending items for that period); the line's `period` is the new one.
        inv = self._new_invoice(sub, billing_reason, previous_period)
        prev: dict[str, Any] = {"items": old_items, "latest_invoice": old_latest}
        for key, value in (extra_updates or {}).items():
            prev[key] = copy.deepcopy(sub.get(key))
            sub[key] = value
        sub["latest_invoice"] = inv["id"]
        for t in before_invoice:
            self._emit(out, t, sub)
        self._emit(out, "customer.subscription.updated", sub, previous=prev)
        self._emit(out, "invoice.created", inv)
        # Stripe waits about an hour after invoice.created before finalizing and charging.
        self.advance(3600)
        self._finalize(out, inv, None)
        description = "Subscription update" if billing_reason != "subscription_create" else ""
        self._pay_invoice(out, inv, sub, succeed=succeed, request=None, description=description)
        if succeed and out.charge:
            out.balance_transaction = self._attach_bt(out, self.objects[out.charge])
        return out

    def renew(self, sub_id: str) -> InvoiceRun:
        """The next period starts (the clock jumps to it) and its invoice is paid.

        customer.subscription.updated (items' period, latest_invoice), invoice.created; an hour
        later invoice.finalized, payment_intent.created; charge.succeeded,
        payment_intent.succeeded, invoice_payment.paid, invoice.paid,
        invoice.payment_succeeded; charge.updated. A subscription set to cancel at period end
        ends instead: customer.subscription.deleted.
        """
        sub = self._sub(sub_id)
        if sub["cancel_at_period_end"]:
            out = InvoiceRun(subscription=sub_id)
            self.now = max(self.now, int(sub["cancel_at"]))
            self._changes(sub, status="canceled", ended_at=self.now)
            self._emit(out, "customer.subscription.deleted", sub)
            return out
        if sub["status"] not in ("active", "trialing"):
            raise ValueError(f"cannot renew a {sub['status']} subscription")
        return self._cycle(sub, succeed=True)

    def fail_renewal(self, sub_id: str) -> InvoiceRun:
        """The next period's invoice cannot be paid.

        customer.subscription.updated, invoice.created; an hour later invoice.finalized,
        payment_intent.created; charge.failed, payment_intent.payment_failed,
        invoice.payment_failed, customer.subscription.updated (status past_due).
        """
        sub = self._sub(sub_id)
        if sub["status"] not in ("active", "trialing"):
            raise ValueError(f"cannot renew a {sub['status']} subscription")
        run = self._cycle(sub, succeed=False)
        self._failed_runs[sub_id] = run
        return run

    def retry_renewal(self, sub_id: str, *, after: int = 3 * DAY) -> InvoiceRun:
        """Smart Retries succeed on the open invoice of a past_due subscription.

        charge.succeeded (a new charge on the same payment intent), payment_intent.succeeded,
        invoice_payment.paid, customer.subscription.updated (active), invoice.paid,
        invoice.payment_succeeded; charge.updated.
        """
        sub = self._sub(sub_id)
        failed = self._failed_runs.pop(sub_id, None)
        if failed is None:
            raise ValueError(f"{sub_id} has no failed invoice to retry")
        self.advance(after)
        inv = self.objects[failed.invoice]
        out = InvoiceRun(
            subscription=sub_id,
            invoice=inv["id"],
            invoice_payment=failed.invoice_payment,
            payment_intent=failed.payment_intent,
        )
        self._pay_invoice(out, inv, sub, succeed=True, request=None, description="")
        if out.charge:
            out.balance_transaction = self._attach_bt(out, self.objects[out.charge])
        return out

    def change_amount(self, sub_id: str, new_amount: int) -> Emitted:
        """Switch the subscription's item to a new price of `new_amount` (no proration).

        customer.subscription.updated with `previous_attributes.items` the old item list.
        """
        sub = self._sub(sub_id)
        out = Emitted()
        req = self._new_request()
        self.advance(1)
        item = sub["items"]["data"][0]
        old = item["price"]
        price = self._put(
            o.price(
                ids=self.ids,
                unit_amount=new_amount,
                currency=old["currency"],
                created=self.now,
                product=old["product"],
                interval=old["recurring"]["interval"],
                livemode=self.livemode,
            )
        )
        prev = {"items": copy.deepcopy(sub["items"])}
        item["price"] = dict(price)
        item["plan"] = o.plan_from_price(price)
        self._emit(out, "customer.subscription.updated", sub, previous=prev, request=req)
        return out

    def cancel(self, sub_id: str, at_period_end: bool) -> Emitted:
        """Cancel now (customer.subscription.deleted, status canceled) or at period end
        (customer.subscription.updated with cancel_at_period_end true; `renew` then ends it)."""
        sub = self._sub(sub_id)
        out = Emitted()
        req = self._new_request()
        self.advance(1)
        details = {"comment": None, "feedback": None, "reason": "cancellation_requested"}
        if at_period_end:
            end = int(sub["items"]["data"][0]["current_period_end"])
            prev = self._changes(
                sub,
                cancel_at_period_end=True,
                cancel_at=end,
                canceled_at=self.now,
                cancellation_details=details,
            )
            self._emit(out, "customer.subscription.updated", sub, previous=prev, request=req)
        else:
            self._changes(
                sub,
                status="canceled",
                canceled_at=self.now,
                ended_at=self.now,
                cancellation_details=details,
            )
            self._emit(out, "customer.subscription.deleted", sub, request=req)
        return out

    def discount_item(self, sub_id: str, coupon_id: str) -> Emitted:
        """Staff put a coupon on the subscription's item in the Dashboard: a discount naming the
        item and its subscription, customer.discount.created, then customer.subscription.updated
        with the discount's id in the item's `discounts` (the subscription's own unchanged).
        Later invoices take it off the item's price."""
        sub = self._sub(sub_id)
        out = Emitted()
        req = self._new_request()
        self.advance(1)
        item = sub["items"]["data"][0]
        di = self._put(o.discount(ids=self.ids, coupon=self._coupon(coupon_id)["id"],
                                  start=self.now, customer=sub["customer"], subscription=sub_id,
                                  subscription_item=item["id"]))
        self.objects[coupon_id]["times_redeemed"] += 1
        self._emit(out, "customer.discount.created", di, request=req)
        prev = {"items": copy.deepcopy(sub["items"])}
        item["discounts"] = [*item["discounts"], di["id"]]
        self._emit(out, "customer.subscription.updated", sub, previous=prev, request=req)
        return out

    def discount_subscription(self, sub_id: str, coupon_id: str) -> Emitted:
        """Staff add a coupon (a promotion) to the subscription in the Dashboard, beside any it
        has: a discount naming the subscription, customer.discount.created, then
        customer.subscription.updated with the discount's id last in its `discounts`. Later
        invoices take it off after the discounts listed before it."""
        sub = self._sub(sub_id)
        out = Emitted()
        req = self._new_request()
        self.advance(1)
        di = self._put(o.discount(ids=self.ids, coupon=self._coupon(coupon_id)["id"],
                                  start=self.now, customer=sub["customer"], subscription=sub_id))
        self.objects[coupon_id]["times_redeemed"] += 1
        self._emit(out, "customer.discount.created", di, request=req)
        prev = {"discounts": list(sub["discounts"])}
        sub["discounts"] = [*sub["discounts"], di["id"]]
        self._emit(out, "customer.subscription.updated", sub, previous=prev, request=req)
        return out

    def pause(self, sub_id: str) -> Emitted:
        """The subscription enters status paused: customer.subscription.updated, ….paused."""
        sub = self._sub(sub_id)
        out = Emitted()
        self.advance(1)
        prev = self._changes(sub, status="paused")
        self._emit(out, "customer.subscription.updated", sub, previous=prev)
        self._emit(out, "customer.subscription.paused", sub)
        return out

    def resume(self, sub_id: str) -> InvoiceRun:
        """Resume a paused subscription with a new billing cycle starting now.

        customer.subscription.resumed, customer.subscription.updated (active, new period),
        then the invoice events of `renew`.
        """
        sub = self._sub(sub_id)
        if sub["status"] != "paused":
            raise ValueError(f"{sub_id} is not paused")
        self.advance(1)
        return self._cycle(
            sub,
            succeed=True,
            start=self.now,
            extra_updates={"billing_cycle_anchor": self.now, "status": "active"},
            before_invoice=("customer.subscription.resumed",),
        )

    # -- refunds -------------------------------------------------------------------------------

    def _charge(self, charge_id: str) -> Obj:
        ch = self.objects.get(charge_id)
        if ch is None or ch.get("object") != "charge":
            raise KeyError(f"no charge {charge_id!r}")
        return ch

    def refund(
        self,
        charge_id: str,
        amount: int | None = None,
        *,
        reason: str | None = "requested_by_customer",
        settle: bool = True,
    ) -> RefundResult:
        """Refund all that is left of a charge, or `amount` of it (several refunds may follow).

        refund.created (pending), charge.refunded (the charge with amount_refunded and refunded
        updated; its refunds are not listed on it), then with `settle` refund.updated
        (succeeded, one second later). The refund's negative balance transaction exists from the
        start; Stripe keeps its fee.
        """
        ch = self._charge(charge_id)
        if ch["status"] != "succeeded":
            raise ValueError("only a succeeded charge can be refunded")
        remaining = int(ch["amount"]) - int(ch["amount_refunded"])
        amount = remaining if amount is None else amount
        if not 0 < amount <= remaining:
            raise ValueError(f"cannot refund {amount}: {remaining} left on {charge_id}")
        out = RefundResult()
        req = self._new_request()
        self.advance(1)
        settled, rate = self.settle(amount, ch["currency"])
        re_id = self.ids.new("re")
        bt = self._bt(
            amount=-settled,
            currency=self.settlement_currency,
            source=re_id,
            type="refund" if _paid_by_card(ch) else "payment_refund",
            reporting_category="refund",
            exchange_rate=rate,
            description="REFUND FOR CHARGE",
        )
        re = self._put(
            o.refund(
                id=re_id,
                amount=amount,
                currency=ch["currency"],
                created=self.now,
                charge=charge_id,
                status="pending",
                payment_intent=ch["payment_intent"],
                balance_transaction=bt["id"],
                reason=reason,
            )
        )
        self.refunds_by_charge.setdefault(charge_id, []).append(re_id)
        self._emit(out, "refund.created", re, request=req)
        refunded_total = int(ch["amount_refunded"]) + amount
        prev = self._changes(
            ch, amount_refunded=refunded_total, refunded=refunded_total >= int(ch["amount"])
        )
        self._emit(out, "charge.refunded", ch, previous=prev, request=req)
        if settle:
            self.advance(1)
            card = re["destination_details"]["card"]
            card.update(reference="1234567890", reference_status="available")
            prev = self._changes(re, status="succeeded")
            self._emit(out, "refund.updated", re, previous=prev)
        out.refund, out.balance_transaction = re_id, bt["id"]
        return out

    def settle_refund(self, refund_id: str) -> RefundResult:
        """A pending refund succeeds: refund.updated."""
        re = self.objects[refund_id]
        out = RefundResult(refund=refund_id, balance_transaction=re["balance_transaction"])
        self.advance(1)
        prev = self._changes(re, status="succeeded")
        self._emit(out, "refund.updated", re, previous=prev)
        return out

    def fail_refund(
        self, refund_id: str, *, reason: str = "expired_or_canceled_card"
    ) -> RefundResult:
        """The bank returns a refund (days later): the money comes back to the balance.

        refund.updated and charge.refund.updated (status failed, with previous_attributes),
        refund.failed, then charge.updated with amount_refunded reduced — Stripe sends no
        second charge.refunded. The refund gains a positive `failure_balance_transaction`
        (type refund_failure) reversing its balance transaction.
        """
        re = self.objects[refund_id]
        if re["status"] in ("failed", "canceled"):
            raise ValueError(f"{refund_id} already {re['status']}")
        ch = self._charge(re["charge"])
        out = RefundResult(refund=refund_id)
        self.advance(2 * DAY)
        orig = self.balance_transactions[re["balance_transaction"]]
        fbt = self._bt(
            amount=-int(orig["amount"]),
            currency=self.settlement_currency,
            source=refund_id,
            type="refund_failure",
            reporting_category="refund_failure",
            exchange_rate=orig["exchange_rate"],
            description="REFUND FAILURE",
        )
        prev = self._changes(
            re, status="failed", failure_reason=reason, failure_balance_transaction=fbt["id"]
        )
        self._emit(out, "refund.updated", re, previous=prev)
        self._emit(out, "charge.refund.updated", re, previous=prev)
        self._emit(out, "refund.failed", re)
        refunded_total = int(ch["amount_refunded"]) - int(re["amount"])
        prev = self._changes(
            ch, amount_refunded=refunded_total, refunded=refunded_total >= int(ch["amount"])
        )
        self._emit(out, "charge.updated", ch, previous=prev)
        out.balance_transaction = fbt["id"]
        return out

    # -- disputes ------------------------------------------------------------------------------

    def dispute(
        self,
        charge_id: str,
        outcome: Literal["won", "lost"] | None = None,
        *,
        amount: int | None = None,
        reason: str = "fraudulent",
        inquiry: bool = False,
    ) -> DisputeResult:
        """A chargeback: Stripe withdraws the amount plus its dispute fee at once.

        charge.dispute.created (needs_response), charge.dispute.funds_withdrawn; two days later
        charge.dispute.updated (under_review, evidence submitted); with an `outcome`, 30 days
        later charge.dispute.closed (won/lost) and, when won, charge.dispute.funds_reinstated.
        Each dispute event embeds the full balance transactions so far.

        With `inquiry`, the same dispute object starts as an inquiry the bank later escalates:
        charge.dispute.created (warning_needs_response, no money moved), a day later
        charge.dispute.updated (warning_under_review), five days later charge.dispute.updated
        (needs_response) with the withdrawal and charge.dispute.funds_withdrawn, then as above;
        without an `outcome` it stops there (just escalated, awaiting evidence).
        """
        ch = self._charge(charge_id)
        out = DisputeResult()
        self.advance(DAY)
        amount = int(ch["amount"]) if amount is None else amount
        dp_id = self.ids.new("dp")
        if inquiry:
            dp = self._put(o.dispute(
                id=dp_id, amount=amount, currency=ch["currency"], created=self.now,
                charge=charge_id, payment_intent=ch["payment_intent"], reason=reason,
                livemode=self.livemode, status="warning_needs_response"))
            ch["disputed"] = True
            self._emit(out, "charge.dispute.created", dp)
            self.advance(DAY)
            self._emit(out, "charge.dispute.updated", dp,
                       previous=self._changes(dp, status="warning_under_review"))
            self.advance(5 * DAY)
        settled, rate = self.settle(amount, ch["currency"])
        withdrawal = self._bt(
            amount=-settled,
            currency=self.settlement_currency,
            source=dp_id,
            type="adjustment",
            reporting_category="dispute",
            fee=self.dispute_fee,
            fee_description="Dispute fee",
            exchange_rate=rate,
            description=f"Chargeback withdrawal for {charge_id}",
        )
        if inquiry:  # escalated: the same object becomes a chargeback
            dp = self.objects[dp_id]
            dp["balance_transactions"] = [withdrawal]
            self._emit(out, "charge.dispute.updated", dp,
                       previous=self._changes(dp, status="needs_response"))
        else:
            dp = self._put(
                o.dispute(
                    id=dp_id,
                    amount=amount,
                    currency=ch["currency"],
                    created=self.now,
                    charge=charge_id,
                    payment_intent=ch["payment_intent"],
                    balance_transactions=[withdrawal],
                    reason=reason,
                    livemode=self.livemode,
                )
            )
            ch["disputed"] = True
            self._emit(out, "charge.dispute.created", dp)
        self._emit(out, "charge.dispute.funds_withdrawn", dp)
        if inquiry and outcome is None:  # just escalated: no evidence submitted yet
            out.dispute = dp_id
            out.balance_transactions = [withdrawal["id"]]
            return out
        self.advance(2 * DAY)
        prev_details = copy.deepcopy(dp["evidence_details"])
        dp["evidence"]["uncategorized_text"] = "Supporter confirmed the donation by e-mail."
        dp["evidence_details"].update(
            has_evidence=True, submission_count=1, submission_method="manual"
        )
        prev = self._changes(dp, status="under_review")
        prev["evidence_details"] = prev_details
        self._emit(out, "charge.dispute.updated", dp, previous=prev)
        out.dispute = dp_id
        out.balance_transactions = [withdrawal["id"]]
        if outcome is not None:
            closed = self.close_dispute(dp_id, outcome)
            out.events.extend(closed.events)
            out.balance_transactions = closed.balance_transactions
        return out

    def prevented_dispute(self, charge_id: str) -> DisputeResult:
        """A dispute Stripe's dispute prevention stopped before it became a chargeback
        (2025-08-27.basil: status `prevented`): charge.dispute.created, already prevented. No
        money moved for it: it has no balance transactions and withdraws nothing."""
        ch = self._charge(charge_id)
        out = DisputeResult()
        self.advance(DAY)
        dp = self._put(o.dispute(
            ids=self.ids, amount=int(ch["amount"]), currency=ch["currency"], created=self.now,
            charge=charge_id, payment_intent=ch["payment_intent"], livemode=self.livemode,
            status="prevented"))
        ch["disputed"] = True
        self._emit(out, "charge.dispute.created", dp)
        out.dispute = dp["id"]
        return out

    def close_dispute(
        self, dispute_id: str, outcome: Literal["won", "lost"], *, after: int = 30 * DAY
    ) -> DisputeResult:
        """charge.dispute.closed; when won, charge.dispute.funds_reinstated (amount given back,
        the fee is not)."""
        dp = self.objects[dispute_id]
        out = DisputeResult(dispute=dispute_id)
        self.advance(after)
        if outcome == "won":
            w = dp["balance_transactions"][0]
            back = self._bt(
                amount=-int(w["amount"]),
                currency=self.settlement_currency,
                source=dispute_id,
                type="adjustment",
                reporting_category="dispute_reversal",
                exchange_rate=w["exchange_rate"],
                description=f"Chargeback reversal for {dp['charge']}",
            )
            dp["balance_transactions"].append(copy.deepcopy(back))
        prev = self._changes(dp, status=outcome)
        self._emit(out, "charge.dispute.closed", dp, previous=prev)
        if outcome == "won":
            self._emit(out, "charge.dispute.funds_reinstated", dp)
        out.balance_transactions = [bt["id"] for bt in dp["balance_transactions"]]
        return out

    def appeal_dispute(
        self, dispute_id: str, outcome: Literal["won", "lost"] | None = None
    ) -> DisputeResult:
        """A lost dispute appealed: a day later charge.dispute.updated (appeal_needs_response),
        two days later charge.dispute.updated (appeal_under_review, evidence submitted); with an
        `outcome`, as `close_dispute` (won: the funds reinstated)."""
        dp = self.objects[dispute_id]
        out = DisputeResult(dispute=dispute_id)
        self.advance(DAY)
        self._emit(out, "charge.dispute.updated", dp,
                   previous=self._changes(dp, status="appeal_needs_response"))
        self.advance(2 * DAY)
        self._emit(out, "charge.dispute.updated", dp,
                   previous=self._changes(dp, status="appeal_under_review"))
        out.balance_transactions = [bt["id"] for bt in dp["balance_transactions"]]
        if outcome is not None:
            closed = self.close_dispute(dispute_id, outcome, after=20 * DAY)
            out.events.extend(closed.events)
            out.balance_transactions = closed.balance_transactions
        return out

    # -- payouts -------------------------------------------------------------------------------

    def payout(self, *, arrival_days: int = 2) -> PayoutResult:
        """Pay out every balance transaction not yet paid out (the clock moves on to when the
        last of them is available): payout.created, then at arrival payout.paid, both while
        Stripe is still reconciling it, then payout.reconciliation_completed.

        `payout_members[po]` (and GET /v1/balance_transactions?payout=po) lists the paid-out
        transactions and the payout's own (type payout) transaction.
        """
        members = [
            bt
            for bt in self.balance_transactions.values()
            if bt["id"] not in self.payout_of and bt["type"] != "payout"
        ]
        if not members:
            raise ValueError("nothing to pay out")
        total = sum(int(bt["net"]) for bt in members)
        if total <= 0:
            raise ValueError(f"balance {total} is not positive")
        self.now = max(self.now, *(int(bt["available_on"]) for bt in members)) + 1
        for bt in members:
            bt["status"] = "available"
        out = PayoutResult()
        po_id = self.ids.new("po")
        own = self._bt(
            amount=-total,
            currency=self.settlement_currency,
            source=po_id,
            type="payout",
            reporting_category="payout",
            description="STRIPE PAYOUT",
        )
        own.update(available_on=self.now, status="available")
        po = self._put(
            o.payout(
                id=po_id,
                amount=total,
                currency=self.settlement_currency,
                created=self.now,
                arrival_date=(self.now // DAY + arrival_days) * DAY,
                status="pending",
                balance_transaction=own["id"],
                livemode=self.livemode,
            )
        )
        po["reconciliation_status"] = "in_progress"
        ids = [bt["id"] for bt in members] + [own["id"]]
        for txn in ids:
            self.payout_of[txn] = po_id
        self.payout_members[po_id] = ids
        self._emit(out, "payout.created", po)
        self.now = max(self.now + 1, int(po["arrival_date"]))
        po.update(
            o.payout(
                id=po_id,
                amount=total,
                currency=self.settlement_currency,
                created=po["created"],
                arrival_date=po["arrival_date"],
                status="paid",
                balance_transaction=own["id"],
                livemode=self.livemode,
            )
        )
        po["reconciliation_status"] = "in_progress"
        self._emit(out, "payout.paid", po)
        self.advance(3600)
        self._emit(out, "payout.reconciliation_completed", po,
                   previous=self._changes(po, reconciliation_status="completed"))
        out.payout, out.balance_transactions = po_id, ids
        return out

    # -- sessions made through the API ---------------------------------------------------------

    def sync_clock(self, now: int) -> int:
        """Bring the clock up to `now` (real time, for objects the service creates with real
        expiry times); it never goes back."""
        self.now = max(self.now, now)
        return self.now

    def _open_session(self, session_id: str) -> Obj:
        cs = self.objects.get(session_id)
        if cs is None or cs.get("object") != "checkout.session":
            raise KeyError(f"no checkout session {session_id!r}")
        if cs["status"] != "open":
            raise ValueError(f"{session_id} is {cs['status']}, not open")
        return cs

    def complete_checkout(self, session_id: str, *, email: str | None = None) -> Emitted:
        """The payer completes a session created through POST /v1/checkout/sessions: the events
        of `one_off` (payment mode) or `subscribe` (subscription mode) for that session, with
        the metadata it was given for its payment intent or subscription and its coupon."""
        cs = self._open_session(session_id)
        order = self.checkout_orders[session_id]
        email = email or cs["customer_email"] or "supporter@example.org"
        if cs["mode"] == "payment":
            return self.one_off(order.amount, order.currency, email=email,
                                metadata=order.object_metadata, checkout_session=session_id)
        return self.subscribe(order.amount, order.currency, order.interval or "month",
                              founding=order.coupon is not None,
                              coupon=order.coupon or "founding-supporter", email=email,
                              metadata=order.object_metadata, checkout_session=session_id)

    def expire_checkout(self, session_id: str, *, at_expiry: bool = True) -> Emitted:
        """The session reaches its expiry unpaid (the clock moves on to it), or, without
        `at_expiry`, is expired now through the API: checkout.session.expired."""
        cs = self._open_session(session_id)
        out = Emitted()
        self.advance(1)
        if at_expiry and cs["expires_at"]:
            self.now = max(self.now, int(cs["expires_at"]))
        cs.update(status="expired", url=None)
        self._emit(out, "checkout.session.expired", cs)
        return out


@dataclass(frozen=True)
class CheckoutOrder:
    """What a session made through the API sells, and what it gives its payment or subscription."""

    amount: int
    currency: str
    interval: str | None  # None: a one-off payment
    object_metadata: dict[str, str]
    coupon: str | None = None


def _paid_by_card(ch: Obj) -> bool:
    """Whether a charge was paid by card: its balance transactions are then typed `charge` and
    `refund`; a bank debit's (Bacs, SEPA) `payment` and `payment_refund`
    (stripe/_balance_transaction.py `type`), of the same reporting categories."""
    method = (ch.get("payment_method_details") or {}).get("type")
    return method in (None, "card")
