"""The ledger as pure functions of Stripe snapshots: payments, refunds, disputes, subscriptions.

Every function here is deterministic in the *set* of snapshots it is given, never in the order they
arrived: that is what makes the ledger the same after any permutation of the same events.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from donations.events import (
    Event,
    Links,
    Version,
    invoice_subscription,
    links,
    obj_id,
    ref,
    shape_understood,
    snapshot_version,
    written_as_stripe_writes,
)
from donations.money import Terms, discount_columns

# A dispute lost, or lost and under appeal: the money is gone unless an appeal wins it back.
DISPUTE_LOST = frozenset({"lost", "appeal_needs_response", "appeal_under_review"})
# While a dispute holds these statuses the money is out of our balance; `won` gives it back.
DISPUTE_HOLDS = frozenset({"needs_response", "under_review", *DISPUTE_LOST})
LIVE_REFUND = frozenset({"pending", "requires_action", "succeeded"})


@dataclass(frozen=True, slots=True)
class Snapshot:
    kind: str
    data: dict[str, Any]
    version: Version
    # read from `data` once: a group's planning, storing and deriving ask for them again and again
    id: str = field(init=False, compare=False)
    links: Links = field(init=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "id", obj_id(self.data))
        object.__setattr__(self, "links", links(self.kind, self.data))

    def get(self, key: str) -> Any:
        return self.data.get(key)


def snapshot_of(event: Event) -> Snapshot | None:
    """The event's snapshot, when it is of an object the ledger reads, in a shape we understand."""
    kind = event.object_kind
    if (kind is None or not shape_understood(event)
            or not written_as_stripe_writes(kind, event.obj)):
        return None
    return Snapshot(kind, event.obj, snapshot_version(event))


@dataclass(frozen=True, slots=True)
class BalanceTransaction:
    id: str
    amount: int
    currency: str
    fee: int
    net: int
    created_at: datetime | None = None  # when it entered the balance: when Stripe counts it

    @classmethod
    def from_stripe(cls, bt: dict[str, Any]) -> BalanceTransaction:
        return cls(str(bt["id"]), int(bt["amount"]), str(bt["currency"]), int(bt.get("fee") or 0),
                   int(bt["net"]), _ts(bt["created"]) if bt.get("created") else None)


@dataclass(frozen=True, slots=True)
class PaymentRow:
    payment_key: str
    kind: str
    status: str
    currency: str
    amount: int
    amount_refunded: int
    amount_disputed: int
    dispute_lost: bool
    payment_intent: str | None
    charge: str | None
    invoice: str | None
    subscription: str | None
    checkout_session: str | None
    customer: str | None
    email: str | None
    campaign: str | None
    metadata: dict[str, str]
    balance_transaction: str | None
    fee: int | None
    net: int | None
    settlement_currency: str | None
    settlement_amount: int | None
    # when the money entered the Stripe balance (its balance transaction's time): when finance's
    # reports count it; a bank debit settles days after its charge was created
    settled_at: datetime | None
    created_at: datetime
    # A bank debit (Bacs, SEPA) that Stripe booked in the balance when it was submitted and
    # reversed when the bank refused it: that charge's `balance_transaction` (the booking, with
    # Stripe's fee, which it keeps) and `failure_balance_transaction` (the reversal;
    # stripe/_charge.py). Both are paid out like any other movement, so the contributions report
    # shows them (sql/032); the payment's own balance_transaction, fee and net stay those of a
    # charge that took the money (none, for a payment that failed: it kept no money).
    booked_balance_transaction: str | None = None
    failure_balance_transaction: str | None = None
    # Every such charge of the payment, (charge, booking, reversal) by charge: a payment intent
    # tried again (an invoice's retries) can have several. Kept in a table of their own
    # (failed_debits, sql/039), not in the payment's row; the two columns above name one of them.
    failed_debits: tuple[tuple[str, str, str | None], ...] = field(
        default=(), metadata={"table": "failed_debits"})


@dataclass(frozen=True, slots=True)
class RefundRow:
    id: str
    payment_key: str | None
    charge: str | None
    payment_intent: str | None
    status: str
    amount: int
    currency: str
    reason: str | None
    balance_transaction: str | None
    created_at: datetime
    # a refund the bank sent back (failed) or that was cancelled: Stripe's balance transaction
    # putting the money back
    failure_balance_transaction: str | None = None


@dataclass(frozen=True, slots=True)
class DisputeRow:
    id: str
    payment_key: str | None
    charge: str | None
    payment_intent: str | None
    status: str
    reason: str | None
    amount: int
    currency: str
    amount_held: int
    created_at: datetime


@dataclass(frozen=True, slots=True)
class SubscriptionRow:
    id: str
    customer: str | None
    status: str
    currency: str
    amount: int
    interval: str
    interval_count: int
    discounts: list[str]
    # the coupons whose terms the row was derived with, or waits for (not the founding one):
    # how a coupon's arrival finds the subscriptions to derive again (store.discover)
    coupons: list[str]
    percent_off: Decimal | None
    amount_off: int | None
    founding: bool
    cancel_at_period_end: bool
    current_period_start: datetime | None
    current_period_end: datetime | None
    canceled_at: datetime | None
    ended_at: datetime | None
    campaign: str | None
    metadata: dict[str, str]
    created_at: datetime


@dataclass(frozen=True, slots=True)
class CustomerRow:
    id: str
    email: str | None
    name: str | None
    deleted: bool
    created_at: datetime


@dataclass(frozen=True, slots=True)
class PayoutRow:
    id: str
    status: str
    amount: int
    currency: str
    arrival_date: datetime | None
    automatic: bool | None
    balance_transaction: str | None
    failure_code: str | None
    created_at: datetime
    # Stripe's: in_progress until it has finished attaching the payout's transactions
    # (completed), not_applicable for a manual payout; None from older API versions
    reconciliation_status: str | None = None


@dataclass(frozen=True, slots=True)
class FoundingOffer:
    """How to recognise the founding-supporter discount on a subscription."""

    coupon_id: str = "founding-supporter"
    percent_off: int = 50


@dataclass(slots=True)
class Cluster:
    """Every snapshot that can bear on one payment: its own, its invoice's, its subscription's."""

    snapshots: list[Snapshot] = field(default_factory=list)
    balance_transactions: dict[str, BalanceTransaction] = field(default_factory=dict)

    def of(self, kind: str) -> list[Snapshot]:
        # sorted by id so that "the first" of several is the same whatever the arrival order
        return sorted((s for s in self.snapshots if s.kind == kind), key=lambda s: s.id)


def _paid_through_stripe(invoice: dict[str, Any]) -> int:
    """What an invoice says was paid through Stripe: `amount_paid` less what was paid outside
    Stripe (`amount_paid_off_stripe`: a bank transfer or cash recorded against it), which no
    charge, balance transaction or payout will ever carry."""
    return max(0, _int(invoice.get("amount_paid")) - _int(invoice.get("amount_paid_off_stripe")))


def derive_payment(key: str, cluster: Cluster) -> PaymentRow | None:
    """The payment `key` (a payment intent, charge or invoice id) as the snapshots tell it.

    None when they do not (yet) describe a payment with a known amount, or when an invoice-keyed
    payment has since been linked to the payment intent or charge that paid it.
    """
    mine = [s for s in cluster.snapshots if s.links.payment_key == key]
    intent = next((s for s in mine if s.kind == "payment_intent"), None)
    charges = [s for s in cluster.of("charge") if s.links.payment_key == key]
    refunds = [s for s in cluster.of("refund") if s.links.payment_key == key]
    disputes = [s for s in cluster.of("dispute") if s.links.payment_key == key]
    invoice_payments = [s for s in cluster.of("invoice_payment") if s.links.payment_key == key]
    invoice_ids = {s.links.invoice_id for s in invoice_payments} - {None}
    if key.startswith("in_"):
        if _invoice_paid_through_payment(key, cluster):
            return None
        invoice_ids.add(key)
    invoices = [s for s in cluster.of("invoice") if s.id in invoice_ids]
    sessions = [
        s for s in cluster.of("checkout.session")
        if s.links.payment_key == key or (s.links.invoice_id in invoice_ids)
    ]
    subscription_ids = {invoice_subscription(s.data) for s in invoices}
    subscription_ids |= {s.links.subscription_id for s in sessions}
    subscriptions = [s for s in cluster.of("subscription") if s.id in subscription_ids]

    # a charge authorised but not captured (manual capture) has taken no money yet
    good_charge = next((c for c in charges if c.get("status") == "succeeded"
                        and c.get("captured") is not False), None)
    paid_inpay = next((s for s in invoice_payments if s.get("status") == "paid"), None)
    paid_session = next(
        (s for s in sessions if s.links.payment_key == key and s.get("payment_status") == "paid"),
        None,
    )
    paid_invoice = next(
        (s for s in invoices if s.get("status") == "paid" and _paid_through_stripe(s.data) > 0),
        None,
    )
    if key.startswith("in_") and paid_invoice is None:
        return None

    # The amount and currency actually received, from the most direct witness available.
    witness: tuple[int, str] | None = None
    if good_charge is not None:
        witness = (_int(good_charge.get("amount_captured")) or _int(good_charge.get("amount")),
                   good_charge.get("currency"))
    elif intent is not None and intent.get("status") == "succeeded":
        witness = (_int(intent.get("amount_received")) or _int(intent.get("amount")),
                   intent.get("currency"))
    elif paid_inpay is not None:
        witness = (_int(paid_inpay.get("amount_paid")), paid_inpay.get("currency"))
    elif paid_session is not None:
        witness = (_int(paid_session.get("amount_total")), paid_session.get("currency"))
    elif key.startswith("in_") and paid_invoice is not None:
        witness = (_paid_through_stripe(paid_invoice.data), paid_invoice.get("currency"))
    elif intent is not None:
        witness = (_int(intent.get("amount")), intent.get("currency"))
    elif charges:
        witness = (_int(charges[0].get("amount")), charges[0].get("currency"))
    if witness is None or not isinstance(witness[1], str):
        return None
    amount, currency = witness

    # A refund or dispute tells that money was taken, unless every charge known was only ever
    # authorised: a released authorisation is refunded too, and took nothing.
    authorised_only = bool(charges) and all(c.get("captured") is False for c in charges)
    succeeded = any((good_charge, paid_inpay, paid_session)) or (
        not authorised_only and any((refunds, disputes))
    ) or (intent is not None and intent.get("status") == "succeeded") or key.startswith("in_")
    if succeeded:
        status = "succeeded"
    elif intent is not None and intent.get("status") == "canceled":
        status = "canceled"
    elif any(c.get("status") == "failed" for c in charges) or (
        intent is not None and intent.get("last_payment_error")
    ):
        status = "failed"
    else:
        status = "pending"

    refunded = min(amount, _refunded(good_charge, refunds)) if succeeded else 0
    held = sum(_dispute_held(d) for d in disputes) if succeeded else 0
    held = min(held, amount - refunded) if held else 0

    metadata: dict[str, str] = {}
    for source in (
        *(s.get("metadata") for s in subscriptions),
        *(((s.get("parent") or {}).get("subscription_details") or {}).get("metadata")
          for s in invoices),
        *(c.get("metadata") for c in charges),
        intent.get("metadata") if intent else None,
        *(s.get("metadata") for s in sessions),
    ):
        if isinstance(source, dict):
            metadata.update({str(k): str(v) for k, v in source.items()})
    campaign = metadata.get("campaign") or None

    invoice = invoices[0] if invoices else None
    session = sessions[0] if sessions else None
    subscription = (
        (invoice_subscription(invoice.data) if invoice else None)
        or (session.links.subscription_id if session else None)
    )
    customer = _first_ref(
        intent and intent.get("customer"), good_charge and good_charge.get("customer"),
        session and session.get("customer"), invoice and invoice.get("customer"),
    )
    email = _first_str(
        session and (session.get("customer_details") or {}).get("email"),
        session and session.get("customer_email"),
        invoice and invoice.get("customer_email"),
        good_charge and (good_charge.get("billing_details") or {}).get("email"),
        good_charge and good_charge.get("receipt_email"),
        intent and intent.get("receipt_email"),
    )
    charge_id = (good_charge.id if good_charge else None) or ref(
        intent.get("latest_charge") if intent else None
    ) or (charges[0].id if charges else None)
    payment_intent = (intent.id if intent else None) or _first_ref(
        *(c.get("payment_intent") for c in charges),
        *((s.get("payment") or {}).get("payment_intent") for s in invoice_payments),
    ) or (key if key.startswith("pi_") else None)
    bt_id = ref(good_charge.get("balance_transaction")) if good_charge else None
    bt = cluster.balance_transactions.get(bt_id) if bt_id else None
    # a charge that failed after Stripe had booked it (a bank debit): the payment's own charge
    # when it is one, else the first by id (a payment whose later try succeeded)
    booked = [c for c in charges
              if c.get("status") == "failed" and ref(c.get("balance_transaction"))]
    failed_charge = next((c for c in booked if c.id == charge_id),
                         booked[0] if booked else None)

    created = _first_int(
        good_charge and good_charge.get("created"),
        paid_inpay and (paid_inpay.get("status_transitions") or {}).get("paid_at"),
        intent and intent.get("created"),
        charges[0].get("created") if charges else None,
        paid_inpay and paid_inpay.get("created"),
        paid_session and paid_session.get("created"),
        paid_invoice and (paid_invoice.get("status_transitions") or {}).get("paid_at"),
        paid_invoice and paid_invoice.get("created"),
    )
    return PaymentRow(
        payment_key=key,
        # (an invoice of no subscription, one sent from the Dashboard, is a one-off gift)
        kind="recurring" if subscription else "one_off",
        status=status,
        currency=currency,
        amount=amount,
        amount_refunded=refunded,
        amount_disputed=held,
        dispute_lost=succeeded and any(d.get("status") in DISPUTE_LOST for d in disputes),
        payment_intent=payment_intent,
        charge=charge_id,
        invoice=invoice.id if invoice else (ref(session.get("invoice")) if session else None),
        subscription=subscription,
        checkout_session=session.id if session else None,
        customer=customer,
        email=email,
        campaign=campaign,
        metadata=metadata,
        balance_transaction=bt_id,
        fee=bt.fee if bt else None,
        net=bt.net if bt else None,
        settlement_currency=bt.currency if bt else None,
        settlement_amount=bt.amount if bt else None,
        settled_at=bt.created_at if bt else None,
        created_at=_ts(created),
        booked_balance_transaction=(ref(failed_charge.get("balance_transaction"))
                                    if failed_charge else None),
        failure_balance_transaction=(ref(failed_charge.get("failure_balance_transaction"))
                                     if failed_charge else None),
        failed_debits=tuple(sorted(
            (c.id, str(ref(c.get("balance_transaction"))),
             ref(c.get("failure_balance_transaction"))) for c in booked)),
    )


def _invoice_paid_through_payment(invoice_id: str, cluster: Cluster) -> bool:
    """An invoice whose payment we know is ledgered under that payment, not under the invoice."""
    return any(
        s.links.invoice_id == invoice_id and s.links.payment_key and s.get("status") == "paid"
        for s in cluster.of("invoice_payment")
    )


def _refunded(charge: Snapshot | None, refunds: list[Snapshot]) -> int:
    """What has been refunded: the refunds we know of, or the charge's running total if larger.

    The charge's `amount_refunded` also counts refunds whose own events we have not seen, but a
    refund that failed or was canceled after that charge snapshot gives its money back, so then
    only the live refunds count. On a charge captured for less than it authorised, it also
    counts the part never captured (Stripe releases it "automatically refunded", so `amount` is
    what was authorised, `amount_captured` what was taken): that was never the publisher's
    money, and the payment's amount is the captured one, so it is no refund of it.
    """
    live = sum(_int(r.get("amount")) for r in refunds if r.get("status") in LIVE_REFUND)
    if charge is None:
        return live
    voided = [r.version.created for r in refunds if r.get("status") not in LIVE_REFUND]
    if voided and max(voided) >= charge.version.created:
        return live
    captured = _int(charge.get("amount_captured"))
    released = (max(0, _int(charge.get("amount")) - captured)
                if charge.get("captured") is not False and captured > 0 else 0)
    # Since 2025-03-31 (the pinned version's behaviour) a partial capture no longer counts the
    # released part in `amount_refunded`: a figure below it cannot have counted it. (Above it,
    # the two readings differ; the refunds' own events settle it.)
    counted = _int(charge.get("amount_refunded"))
    return max(live, counted - released if counted >= released else counted)


def _dispute_held(dispute: Snapshot) -> int:
    return _int(dispute.get("amount")) if dispute.get("status") in DISPUTE_HOLDS else 0


def derive_refund(snapshot: Snapshot) -> RefundRow:
    data = snapshot.data
    return RefundRow(
        id=snapshot.id,
        payment_key=snapshot.links.payment_key,
        charge=ref(data.get("charge")),
        payment_intent=ref(data.get("payment_intent")),
        status=str(data.get("status") or "pending"),
        amount=_int(data.get("amount")),
        currency=str(data.get("currency")),
        reason=_str(data.get("reason")),
        balance_transaction=ref(data.get("balance_transaction")),
        created_at=_ts(data.get("created")),
        failure_balance_transaction=ref(data.get("failure_balance_transaction")),
    )


def derive_dispute(snapshot: Snapshot) -> DisputeRow:
    data = snapshot.data
    return DisputeRow(
        id=snapshot.id,
        payment_key=snapshot.links.payment_key,
        charge=ref(data.get("charge")),
        payment_intent=ref(data.get("payment_intent")),
        status=str(data.get("status")),
        reason=_str(data.get("reason")),
        amount=_int(data.get("amount")),
        currency=str(data.get("currency")),
        amount_held=_dispute_held(snapshot),
        created_at=_ts(data.get("created")),
    )


def derive_subscription(
    snapshot: Snapshot, discounts: list[Snapshot], offer: FoundingOffer,
    coupons: Mapping[str, dict[str, Any]] | None = None,
) -> SubscriptionRow:
    """The subscription as its latest snapshot, the discounts applied to it and the terms of
    their coupons (`coupons`, by id: webhooks name a discount's coupon by id only) tell it.

    A seat taken by the founding-supporter coupon stays taken when the discount or the
    subscription ends (not when it never started: `incomplete_expired`); the discount's price
    effect only counts while the subscription lists it. The price after discounts is what
    Stripe's invoice charges (money.subscription_price): each item's discounts on that item,
    then the subscription's on what the items left, each list in its order, one discount after
    another (kept as money.discount_columns says). A coupon whose terms are not known yet takes
    nothing off (see `coupons_to_look_up`: they are looked up, and the row derived again); the
    others still do.
    """
    data = snapshot.data
    items = [i for i in (data.get("items") or {}).get("data") or [] if isinstance(i, dict)]
    interval, interval_count = "month", 1
    for item in items:
        recurring = (item.get("price") or {}).get("recurring") or {}
        if recurring.get("interval"):
            interval = str(recurring["interval"])
            interval_count = _int(recurring.get("interval_count")) or 1
    starts = [_int(i.get("current_period_start")) for i in items if i.get("current_period_start")]
    ends = [_int(i.get("current_period_end")) for i in items if i.get("current_period_end")]

    currency = str(data.get("currency"))
    metadata = {str(k): str(v) for k, v in (data.get("metadata") or {}).items()}
    known = _discounts_known(snapshot, discounts)
    founding = metadata.get("founding_supporter") == "true"
    for discount in known.values():
        founding = founding or ref(discount_coupon(discount)) == offer.coupon_id
    seen: set[str] = set()

    def terms(listed: object) -> list[Terms]:
        """The terms of the discounts listed, in their order (one listed twice counts once)."""
        found: list[Terms] = []
        for discount_id in (ref(x) for x in (listed if isinstance(listed, list) else [])):
            if discount_id and discount_id not in seen:
                seen.add(discount_id)
                found.append(_terms(known.get(discount_id), currency, offer, coupons))
        return found

    priced = [(_int((item.get("price") or {}).get("unit_amount"))
               * (_int(item.get("quantity")) or 1), terms(item.get("discounts")))
              for item in items]
    percent_off, amount_off = discount_columns(priced, terms(data.get("discounts")))
    status = str(data.get("status"))
    # A seat is taken by a founding supporter for good, even once they leave; a subscription
    # whose first payment was never made (`incomplete_expired`, terminal) was never a supporter
    # and takes none.
    founding = founding and status != "incomplete_expired"
    return SubscriptionRow(
        id=snapshot.id,
        customer=ref(data.get("customer")),
        status=status,
        currency=currency,
        amount=sum(amount for amount, _ in priced),
        interval=interval,
        interval_count=interval_count,
        discounts=sorted(_applied(snapshot)),
        coupons=sorted(coupons_to_look_up(snapshot, discounts, offer)),
        percent_off=percent_off,
        amount_off=amount_off,
        founding=founding,
        cancel_at_period_end=bool(data.get("cancel_at_period_end")),
        current_period_start=_ts(min(starts)) if starts else None,
        current_period_end=_ts(max(ends)) if ends else None,
        canceled_at=_ts(data["canceled_at"]) if data.get("canceled_at") else None,
        ended_at=_ts(data["ended_at"]) if data.get("ended_at") else None,
        campaign=metadata.get("campaign") or None,
        metadata=metadata,
        created_at=_ts(data.get("created")),
    )


def _terms(discount: dict[str, Any] | None, currency: str, offer: FoundingOffer,
           coupons: Mapping[str, dict[str, Any]] | None) -> Terms:
    """What a discount takes off a price in `currency`: its coupon's terms when Stripe expanded
    the coupon, the settings' for the founding coupon (ours; webhooks name it by id only), the
    kept or fetched coupon's otherwise; nothing while they are not known (or the discount
    itself is not: listed by id, without its event)."""
    if discount is None:
        return None, None
    coupon = discount_coupon(discount)
    coupon_id = ref(coupon)
    if isinstance(coupon, dict) and has_terms(coupon) and not lacks_options(coupon, currency):
        return coupon_terms(coupon, currency)
    if coupon_id == offer.coupon_id:
        return Decimal(offer.percent_off), None
    if coupon_id is not None and coupon_id in (coupons or {}):
        return coupon_terms((coupons or {})[coupon_id], currency)
    return None, None


def _listed(snapshot: Snapshot) -> list[object]:
    """The discounts the subscription lists (applied now), by id or expanded: its own and its
    items' (`items.data[].discounts`: a coupon put on the subscription's item, in the Dashboard
    or through the API, which Stripe applies before the subscription's own)."""
    listed = list(snapshot.data.get("discounts") or [])
    for item in (snapshot.data.get("items") or {}).get("data") or []:
        if isinstance(item, dict) and isinstance(item.get("discounts"), list):
            listed += item["discounts"]
    return listed


def _applied(snapshot: Snapshot) -> set[str]:
    """The ids of the discounts the subscription and its items list (applied now)."""
    return {d for d in (ref(x) for x in _listed(snapshot)) if d}


def _discounts_known(snapshot: Snapshot, discounts: list[Snapshot]) -> dict[str, dict[str, Any]]:
    """Discounts as the subscription sent them (expanded) or as customer.discount.* events did
    (an item's discount names the subscription too, beside its `subscription_item`)."""
    known: dict[str, dict[str, Any]] = {}
    for d in _listed(snapshot):
        if isinstance(d, dict) and (key := ref(d)):
            known[key] = d
    known.update({d.id: d.data for d in discounts if d.links.subscription_id == snapshot.id})
    return known


def discount_coupon(discount: dict[str, Any]) -> object:
    """The coupon a discount was made from (`source.coupon`; `coupon` in older versions): its
    id, or the coupon itself where Stripe expanded it."""
    source = discount.get("source")
    coupon = source.get("coupon") if isinstance(source, dict) else None
    return coupon if coupon is not None else discount.get("coupon")


def has_terms(coupon: dict[str, Any]) -> bool:
    return coupon.get("percent_off") is not None or coupon.get("amount_off") is not None


def lacks_options(coupon: dict[str, Any], currency: str | None = None) -> bool:
    """Whether an amount-off coupon is known without its `currency_options` (Stripe includes
    them only when asked to expand them: never in its events), so that what it takes off a
    price in `currency` (any other than its own, when None) is not known from it."""
    return (coupon.get("percent_off") is None and coupon.get("amount_off") is not None
            and "currency_options" not in coupon
            and (currency is None or coupon.get("currency") != currency))


def coupon_terms(coupon: dict[str, Any], currency: str) -> tuple[Decimal | None, int | None]:
    """What a coupon takes off a price in `currency`: (percent off, None) or (None, amount off
    in that currency: the coupon's own when it is in that currency, else its `currency_options`
    one); (None, None) when it takes nothing off a price in that currency."""
    if coupon.get("percent_off") is not None:
        return Decimal(str(coupon["percent_off"])), None
    if coupon.get("amount_off") is not None:
        if coupon.get("currency") == currency:
            return None, _int(coupon["amount_off"])
        options = coupon.get("currency_options")
        option = options.get(currency) if isinstance(options, dict) else None
        if isinstance(option, dict) and option.get("amount_off") is not None:
            return None, _int(option["amount_off"])
    return None, None


def coupons_named(snapshot: Snapshot) -> set[str]:
    """The coupons a snapshot names: a discount's, or those of the discounts a subscription
    carries expanded (its own and its items', as `donations import` lists them)."""
    if snapshot.kind == "discount":
        found = [discount_coupon(snapshot.data)]
    elif snapshot.kind == "subscription":
        found = [discount_coupon(d) for d in _listed(snapshot) if isinstance(d, dict)]
    else:
        return set()
    return {c for c in (ref(x) for x in found) if c}


def coupons_to_look_up(snapshot: Snapshot, discounts: list[Snapshot], offer: FoundingOffer
                       ) -> set[str]:
    """The coupons, by id, whose terms the subscription's derivation needs from elsewhere: those
    of the discounts it lists, unless Stripe expanded the coupon or it is the founding one."""
    applied = _applied(snapshot)
    wanted = set()
    for discount_id, discount in _discounts_known(snapshot, discounts).items():
        coupon = discount_coupon(discount)
        coupon_id = ref(coupon)
        if (discount_id in applied and coupon_id is not None and coupon_id != offer.coupon_id
                and not (isinstance(coupon, dict) and has_terms(coupon)
                         and not lacks_options(coupon, snapshot.get("currency")))):
            wanted.add(coupon_id)
    return wanted


def derive_customer(snapshot: Snapshot) -> CustomerRow:
    data = snapshot.data
    return CustomerRow(
        id=snapshot.id,
        email=_str(data.get("email")),
        name=_str(data.get("name")),
        deleted=snapshot.version.progress > 0,
        created_at=_ts(data.get("created")),
    )


def derive_payout(snapshot: Snapshot) -> PayoutRow:
    data = snapshot.data
    return PayoutRow(
        id=snapshot.id,
        status=str(data.get("status")),
        amount=_int(data.get("amount")),
        currency=str(data.get("currency")),
        arrival_date=_ts(data["arrival_date"]) if data.get("arrival_date") else None,
        automatic=data.get("automatic") if isinstance(data.get("automatic"), bool) else None,
        balance_transaction=ref(data.get("balance_transaction")),
        failure_code=_str(data.get("failure_code")),
        created_at=_ts(data.get("created")),
        reconciliation_status=_str(data.get("reconciliation_status")),
    )


def _ts(value: object) -> datetime:
    return datetime.fromtimestamp(_int(value), tz=UTC)


def _int(value: object) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def _str(value: object) -> str | None:
    return value if isinstance(value, str) and value else None


def _first_ref(*values: object) -> str | None:
    return next((r for r in (ref(v) for v in values) if r), None)


def _first_str(*values: object) -> str | None:
    return next((v for v in values if isinstance(v, str) and v), None)


def _first_int(*values: object) -> int:
    return next((v for v in values if isinstance(v, int) and not isinstance(v, bool) and v), 0)


@dataclass(frozen=True, slots=True)
class Ledger:
    """The whole ledger, derived at once from every snapshot: the reference the incremental
    updates in the database must always equal."""

    payments: dict[str, PaymentRow]
    refunds: dict[str, RefundRow]
    disputes: dict[str, DisputeRow]
    subscriptions: dict[str, SubscriptionRow]
    customers: dict[str, CustomerRow]
    payouts: dict[str, PayoutRow]


def latest(snapshots: list[Snapshot]) -> list[Snapshot]:
    """Of several snapshots of each object, the one with the greatest version."""
    best: dict[str, Snapshot] = {}
    for snapshot in snapshots:
        held = best.get(snapshot.id)
        if held is None or snapshot.version > held.version:
            best[snapshot.id] = snapshot
    return list(best.values())


def derive_ledger(
    snapshots: list[Snapshot],
    offer: FoundingOffer,
    balance_transactions: dict[str, BalanceTransaction] | None = None,
) -> Ledger:
    states = latest(snapshots)
    coupons = {s.id: s.data for s in states if s.kind == "coupon"}
    cluster = Cluster(states, dict(balance_transactions or {}))
    keys = {s.links.payment_key for s in states} | {
        s.id for s in states if s.kind == "invoice"
    }
    payments = {}
    for key in sorted(k for k in keys if k):
        row = derive_payment(key, cluster)
        if row is not None:
            payments[key] = row
    return Ledger(
        payments=payments,
        refunds={s.id: derive_refund(s) for s in states if s.kind == "refund"},
        disputes={s.id: derive_dispute(s) for s in states if s.kind == "dispute"},
        subscriptions={
            s.id: derive_subscription(s, cluster.of("discount"), offer, coupons)
            for s in states if s.kind == "subscription"
        },
        customers={s.id: derive_customer(s) for s in states if s.kind == "customer"},
        payouts={s.id: derive_payout(s) for s in states if s.kind == "payout"},
    )
