"""Stripe events, without I/O: which we handle, how their snapshots rank, and what they link to."""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from stripe._api_version import _ApiVersion

from donations.money import is_currency_code

# The API version this code reads: the stripe library's own pin. Webhook endpoints should be created
# with it (`stripe-setup` does), so every event arrives in exactly this shape.
PINNED_API_VERSION: str = _ApiVersion.CURRENT

# Since 2025-03-31 invoices reach their subscription through `parent.subscription_details` and their
# payments through invoice_payment objects, and a subscription's period lives on its items: older
# shapes of those objects would be mis-read, so they wait for attention instead.
_SHAPE_SINCE = {
    "invoice": "2025-03-31", "invoice_payment": "2025-03-31", "subscription": "2025-03-31",
}
_OLDEST_UNDERSTOOD = "2022-11-15"
_BASIL = "2025-03-31"

# Event type → the Stripe object its `data.object` holds. Anything else is stored and ignored.
HANDLED: dict[str, str] = {
    # one-off payments through Checkout, or Payment Intents from a form of our own
    "checkout.session.completed": "checkout.session",
    "checkout.session.async_payment_succeeded": "checkout.session",
    "checkout.session.async_payment_failed": "checkout.session",
    "checkout.session.expired": "checkout.session",
    "payment_intent.succeeded": "payment_intent",
    "payment_intent.payment_failed": "payment_intent",
    "payment_intent.canceled": "payment_intent",
    "charge.succeeded": "charge",
    "charge.failed": "charge",
    "charge.updated": "charge",
    "charge.captured": "charge",
    # refunds: charge.refunded carries the charge's running amount_refunded; refund.* each refund
    "charge.refunded": "charge",
    "refund.created": "refund",
    "refund.updated": "refund",
    "refund.failed": "refund",
    "charge.refund.updated": "refund",
    # disputes: the amount is held from funds_withdrawn until won (funds_reinstated) or lost
    "charge.dispute.created": "dispute",
    "charge.dispute.updated": "dispute",
    "charge.dispute.closed": "dispute",
    "charge.dispute.funds_withdrawn": "dispute",
    "charge.dispute.funds_reinstated": "dispute",
    # recurring support
    "customer.subscription.created": "subscription",
    "customer.subscription.updated": "subscription",
    "customer.subscription.deleted": "subscription",
    "customer.subscription.paused": "subscription",
    "customer.subscription.resumed": "subscription",
    # a coupon applied to a subscription: how the founding-supporter discount is recognised
    "customer.discount.created": "discount",
    "customer.discount.updated": "discount",
    "customer.discount.deleted": "discount",
    # a coupon's terms (the percentage or amount off), for a discount that names it by id only
    "coupon.created": "coupon",
    "coupon.updated": "coupon",
    "coupon.deleted": "coupon",
    "invoice.paid": "invoice",
    "invoice.payment_succeeded": "invoice",
    "invoice.payment_failed": "invoice",
    "invoice.finalized": "invoice",
    "invoice.voided": "invoice",
    "invoice.marked_uncollectible": "invoice",
    "invoice_payment.paid": "invoice_payment",
    # supporters, and the payouts finance ties to the bank
    "customer.created": "customer",
    "customer.updated": "customer",
    "customer.deleted": "customer",
    "payout.paid": "payout",
    "payout.failed": "payout",
    "payout.updated": "payout",
    "payout.canceled": "payout",
    "payout.reconciliation_completed": "payout",
}

# How far along its life a snapshot is. A later stage always wins over an earlier one, whatever the
# timestamps say: a canceled subscription never comes back to active from a stale event.
_STAGE: dict[str, dict[str, int]] = {
    "payment_intent": {
        "requires_payment_method": 0, "requires_confirmation": 0, "requires_action": 1,
        "processing": 2, "requires_capture": 2, "canceled": 3, "succeeded": 3,
    },
    "charge": {"pending": 0, "failed": 1, "succeeded": 1},
    "refund": {"pending": 0, "requires_action": 0, "succeeded": 1, "failed": 2, "canceled": 2},
    # an inquiry (warning_*) that the bank escalates becomes a chargeback on the same object:
    # every chargeback status outranks every inquiry status (sql/013 re-ranked stored ones).
    # A lost dispute can be appealed (appeal_*) and then be won or lost again: the outcomes and
    # the appeal share a stage, so the later event tells where it stands.
    "dispute": {
        "warning_needs_response": 0, "warning_under_review": 1, "warning_closed": 2,
        "needs_response": 3, "under_review": 4, "won": 5, "lost": 5, "prevented": 5,
        "appeal_needs_response": 5, "appeal_under_review": 5,
    },
    "checkout.session": {"open": 0, "expired": 1, "complete": 1},
    "subscription": {
        "incomplete": 0, "trialing": 1, "active": 1, "past_due": 1, "unpaid": 1, "paused": 1,
        "incomplete_expired": 2, "canceled": 2,
    },
    "invoice": {"draft": 0, "open": 1, "uncollectible": 2, "paid": 3, "void": 3},
    "invoice_payment": {"open": 0, "paid": 1, "canceled": 1},
    "payout": {"pending": 0, "in_transit": 1, "paid": 2, "failed": 2, "canceled": 2},
}


class NotAnEvent(ValueError):
    """A verified body that is not a Stripe event we can read."""


@dataclass(frozen=True, slots=True)
class Event:
    """The envelope of a verified Stripe event; `obj` is its snapshot (`data.object`)."""

    id: str
    type: str
    api_version: str | None
    created: int
    livemode: bool
    obj: dict[str, Any]
    # set on an event of a Connect account reaching the endpoint: another account's money
    account: str | None = None
    thin: bool = False  # a thin event (`v2.core.event`): no object to read, whatever its type

    @property
    def object_kind(self) -> str | None:
        return None if self.thin else HANDLED.get(self.type)


@dataclass(frozen=True, slots=True, order=True)
class Version:
    """Total order of snapshots of one object; the greatest is the object's state."""

    stage: int
    progress: int
    created: int
    type_rank: int
    event_id: str


@dataclass(frozen=True, slots=True)
class Links:
    """Which ledger rows a snapshot feeds."""

    payment_key: str | None = None
    invoice_id: str | None = None
    subscription_id: str | None = None


_EVENT_ID = re.compile(r"^evt_[A-Za-z0-9_]{1,250}$")
_LAST_SECOND = 253_402_300_799  # 9999-12-31T23:59:59Z: the last moment a timestamp can hold


def parse_event(body: dict[str, Any]) -> Event:
    """Read the envelope of an already verified event, refusing anything not shaped like one."""
    if isinstance(body, dict) and body.get("object") == "v2.core.event":
        return _thin_event(body)
    if not isinstance(body, dict) or body.get("object") != "event":
        raise NotAnEvent("the body is not a Stripe event (object must be 'event')")
    event_id, event_type = _id_and_type(body)
    created = body.get("created")
    if (isinstance(created, bool) or not isinstance(created, int)
            or not 0 <= created <= _LAST_SECOND):
        raise NotAnEvent("the event has no valid created timestamp")
    data = body.get("data")
    obj = data.get("object") if isinstance(data, dict) else None
    if not isinstance(obj, dict):
        raise NotAnEvent("the event has no data.object")
    if event_type in HANDLED and not (isinstance(obj.get("id"), str) and obj["id"]):
        # checked here, not when the ledger reads it: a 400 now, not a failure stored for ever
        raise NotAnEvent("the event's object has no id")
    api_version, account = body.get("api_version"), body.get("account")
    return Event(
        id=event_id,
        type=event_type,
        api_version=api_version if isinstance(api_version, str) else None,
        created=created,
        livemode=bool(body.get("livemode")),
        obj=obj,
        account=account if isinstance(account, str) and account else None,
    )


def _id_and_type(body: dict[str, Any]) -> tuple[str, str]:
    """An event's id and type, of either shape; NotAnEvent when one is missing or malformed."""
    event_id, event_type = body.get("id"), body.get("type")
    if not isinstance(event_id, str) or not _EVENT_ID.match(event_id):
        raise NotAnEvent("the event has no valid id")
    if not isinstance(event_type, str) or not event_type:
        raise NotAnEvent("the event has no type")
    return event_id, event_type


def _thin_event(body: dict[str, Any]) -> Event:
    """A thin event, as an event destination sends them (`v2.core.event`: its `created` in
    RFC 3339, the object it is about named in `related_object`, not included): nothing the
    ledger reads, so it stands with no object (stored and ignored, acknowledged so that Stripe
    does not retry it for days and disable the destination)."""
    event_id, event_type = _id_and_type(body)
    created = body.get("created")
    try:
        when = datetime.fromisoformat(str(created)) if isinstance(created, str) else None
    except ValueError:
        when = None
    if when is None or when.tzinfo is None:
        raise NotAnEvent("the event has no valid created timestamp")
    return Event(id=event_id, type=event_type, api_version=None, created=int(when.timestamp()),
                 livemode=bool(body.get("livemode")), obj={}, account=None, thin=True)


def shape_understood(event: Event) -> bool:
    """Whether this code reads the event's object as the event's API version wrote it."""
    kind = event.object_kind
    if kind is None or event.api_version is None:
        return event.api_version is None or event.api_version == PINNED_API_VERSION
    if event.api_version == PINNED_API_VERSION:
        return True
    date = event.api_version[:10]
    if date > PINNED_API_VERSION[:10]:
        return False  # a newer version than we know: its shapes may have moved
    if kind in ("payment_intent", "charge") and date < _BASIL and event.obj.get("invoice"):
        # before 2025-03-31 a subscription's payment named its invoice itself (`invoice`, gone
        # since), which this code does not read: taken alone it would pass for a one-off
        return False
    return date >= _SHAPE_SINCE.get(kind, _OLDEST_UNDERSTOOD)


# Objects whose ledger row needs a currency: without one Stripe never writes them.
_NEEDS_CURRENCY = frozenset({"payment_intent", "charge", "refund", "dispute", "subscription",
                             "invoice", "payout"})


def written_as_stripe_writes(kind: str, obj: dict[str, Any]) -> bool:
    """Whether the fields the ledger reads have the types Stripe writes them with (a signed
    event shaped otherwise, forged or broken, is set aside for attention rather than failing on
    every retry): a text status, a currency where the object needs one, objects for metadata
    and a subscription's items."""
    status = obj.get("status")
    if status is not None and not isinstance(status, str):
        return False
    currency = obj.get("currency")
    if kind in _NEEDS_CURRENCY and not (isinstance(currency, str) and currency.islower()
                                        and is_currency_code(currency)):
        return False
    if not isinstance(obj.get("metadata") or {}, dict):
        return False
    items = obj.get("items") if kind == "subscription" else None
    return items is None or (isinstance(items, dict)
                             and isinstance(items.get("data") or [], list))


def snapshot_version(event: Event) -> Version:
    """Where this event's snapshot stands among all snapshots of the same object."""
    kind = event.object_kind or ""
    obj = event.obj
    stage = _STAGE.get(kind, {}).get(str(obj.get("status")), 0)
    if kind == "checkout.session" and obj.get("payment_status") in ("paid", "no_payment_required"):
        progress = 1  # an async payment that succeeded never goes back to unpaid
    elif kind == "charge":
        # refunds only add up (a failed refund is told by the refund itself), an authorised
        # charge once captured stays captured, and a balance transaction once attached stays
        # (sql/023 gave the stored charges this figure)
        captured = 0 if obj.get("captured") is False else 1
        attached = 1 if obj.get("balance_transaction") else 0
        progress = 4 * _int(obj.get("amount_refunded")) + 2 * captured + attached
    elif kind == "payout":
        # a paid payout whose transactions Stripe has finished attaching is further along
        progress = 1 if obj.get("reconciliation_status") == "completed" else 0
    elif kind in ("customer", "discount"):
        progress = 1 if event.type.endswith(".deleted") or obj.get("deleted") else 0
    elif kind == "coupon":
        # A coupon's terms never change (Stripe lets only its name and metadata be updated), and
        # deleting it leaves the discounts already given as they were: its deletion (an event
        # without the `currency_options` a look-up brings) ranks below anything else known of
        # it, never taking the options away. A coupon made again under the same id (a later
        # `created`) is the one the id names now (sql/038 gave the stored coupons this figure).
        deleted = event.type.endswith(".deleted") or bool(obj.get("deleted"))
        progress = 2 * _int(obj.get("created")) + (0 if deleted else 1)
    elif kind == "subscription":
        # a subscription's period only moves forward (a renewal, a trial's end, a new billing
        # anchor), so two snapshots in one second rank by it, not by their ids (sql/033 gave the
        # stored subscriptions this figure)
        progress = subscription_period_start(obj)
    else:
        progress = 0
    if event.type.endswith(".created"):
        type_rank = 0
    elif event.type.endswith((".deleted", ".closed")):
        type_rank = 2
    else:
        type_rank = 1
    return Version(stage, progress, event.created, type_rank, event.id)


def subscription_period_start(obj: dict[str, Any]) -> int:
    """Where a subscription snapshot's current period starts, as its rank's progress: the
    earliest start of its items' periods (where the pinned API version keeps them), else the
    subscription's own `current_period_start` (older shapes), else 0. Only whole seconds a
    timestamp can hold count (sql/033 reads them the same way). The earliest, not the latest:
    items may keep periods of their own (flexible billing), and removing the item that renewed
    last must not make the later snapshot rank below the ones before; an item added starts now,
    one removed takes its start away, a renewal moves it on: the earliest never goes back."""
    items = _dict(obj.get("items")).get("data")
    starts = [_second(i.get("current_period_start"))
              for i in (items if isinstance(items, list) else []) if isinstance(i, dict)]
    known = [s for s in starts if s is not None]
    if known:
        return min(known)
    own = _second(obj.get("current_period_start"))
    return own if own is not None else 0


def _second(value: object) -> int | None:
    """A Unix timestamp Stripe could have written (a whole second from 1970 to 9999), else None."""
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= _LAST_SECOND:
        return value
    return None


def links(kind: str, obj: dict[str, Any]) -> Links:
    """The payment, invoice and subscription a snapshot belongs to (all from the snapshot alone)."""
    own = obj_id(obj)
    if kind == "payment_intent":
        return Links(payment_key=own)
    if kind in ("charge", "refund", "dispute"):
        return Links(payment_key=ref(obj.get("payment_intent")) or ref(obj.get("charge")) or (
            own if kind == "charge" else None))
    if kind == "checkout.session":
        return Links(
            payment_key=ref(obj.get("payment_intent")),
            invoice_id=ref(obj.get("invoice")),
            subscription_id=ref(obj.get("subscription")),
        )
    if kind == "invoice":
        return Links(invoice_id=own, subscription_id=invoice_subscription(obj))
    if kind == "invoice_payment":
        payment = _dict(obj.get("payment"))
        return Links(
            payment_key=ref(payment.get("payment_intent")) or ref(payment.get("charge")),
            invoice_id=ref(obj.get("invoice")),
        )
    if kind == "subscription":
        return Links(subscription_id=own)
    if kind == "discount":
        return Links(subscription_id=ref(obj.get("subscription")))
    return Links()


def invoice_subscription(invoice: dict[str, Any]) -> str | None:
    details = _dict(_dict(invoice.get("parent")).get("subscription_details"))
    return ref(details.get("subscription"))


def _dict(value: object) -> dict[str, Any]:
    """A nested object, or an empty one for anything else (absent, null, another type)."""
    return value if isinstance(value, dict) else {}


def ref(value: object) -> str | None:
    """An expandable field's id, whether Stripe sent the id or the expanded object."""
    if isinstance(value, str):
        return value or None
    if isinstance(value, dict):
        inner = value.get("id")
        return inner if isinstance(inner, str) else None
    return None


def obj_id(obj: dict[str, Any]) -> str:
    value = obj.get("id")
    if not isinstance(value, str) or not value:
        raise NotAnEvent("the event's object has no id")
    return value


def _int(value: object) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0
