"""Factories for Stripe objects shaped as API version 2026-10-28.endive writes them in webhooks."""

from __future__ import annotations

import random
import string
import uuid
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

API_VERSION = "2026-10-28.endive"

Obj = dict[str, Any]

# Fields the library's typed resources declare but the API leaves out of an object unless asked for
# (`include`/`expand` on retrieve) or unless they apply (a deleted object's `deleted`). They are
# absent from webhook payloads, so the factories leave them out too; tests/test_fakestripe.py
# checks every other declared field is present.
ABSENT_FIELDS: Mapping[str, frozenset[str]] = {
    # `refunds` stopped being included on charges in 2022-11-15; list them with GET /v1/refunds.
    "charge": frozenset(
        {
            "refunds",
            "level3",
            "presentment_details",
            "radar_options",
            "authorization_code",
            "transfer",
        }
    ),
    "payment_intent": frozenset(
        {"hooks", "payment_details", "presentment_details", "managed_payments"}
    ),
    "invoice": frozenset({"payments", "deleted"}),
    "checkout.session": frozenset({"line_items", "presentment_details", "managed_payments"}),
    "customer": frozenset(
        {"sources", "subscriptions", "tax_ids", "cash_balance", "invoice_credit_balance", "deleted"}
    ),
    "subscription": frozenset({"managed_payments", "presentment_details"}),
    "subscription_item": frozenset({"deleted"}),
    "price": frozenset({"deleted", "currency_options", "tiers"}),
    "product": frozenset({"deleted"}),
    "coupon": frozenset({"deleted", "applies_to", "currency_options"}),
    "discount": frozenset({"deleted"}),
    "refund": frozenset({"presentment_details", "next_action", "customer_account"}),
    "dispute": frozenset({"payment_method_details"}),
    # `account` and `context` appear only on events from connected accounts.
    "event": frozenset({"account", "context"}),
}

# Fields Stripe includes only when a request asks to expand them ("includable"): never in
# events, nor in a retrieve or list that does not name them in `expand`.
INCLUDABLE: dict[str, frozenset[str]] = {"coupon": frozenset({"currency_options"})}


def as_sent(obj: dict[str, Any], expand: Iterable[str] = ()) -> dict[str, Any]:
    """The object as Stripe writes it out: without the includable fields not asked for."""
    left_out = INCLUDABLE.get(str(obj.get("object")), frozenset()) - set(expand)
    return {k: v for k, v in obj.items() if k not in left_out} if left_out & obj.keys() else obj


ZERO_DECIMAL = frozenset(
    {
        "bif",
        "clp",
        "djf",
        "gnf",
        "jpy",
        "kmf",
        "krw",
        "mga",
        "pyg",
        "rwf",
        # not "ugx": two-decimal in the API, a special case (donations/money.py)
        "vnd",
        "vuv",
        "xaf",
        "xof",
        "xpf",
    }
)

_ALNUM = string.ascii_letters + string.digits


class IdGenerator:
    """Stripe-style ids (`ch_3Px…`) drawn from a seeded RNG, so a seed always gives the same ids."""

    def __init__(self, seed: int = 0) -> None:
        self._rng = random.Random(seed)
        self._seen: set[str] = set()

    def _chars(self, n: int) -> str:
        return "".join(self._rng.choice(_ALNUM) for _ in range(n))

    def new(self, prefix: str) -> str:
        """A fresh id such as `pi_3Q…` (24 characters after the prefix, as Stripe's are)."""
        while True:
            if prefix == "cs_test_":
                candidate = "cs_test_a1" + self._chars(58)
            else:
                candidate = f"{prefix}_1" + self._chars(23)
            if candidate not in self._seen:
                self._seen.add(candidate)
                return candidate

    def uuid(self) -> str:
        """A deterministic UUID4-looking string (idempotency keys)."""
        return str(uuid.UUID(int=self._rng.getrandbits(128), version=4))


# One generator per process for factories called without `ids=`; reseed it for repeatable ids.
_default_ids = [IdGenerator(0)]


def reset_default_ids(seed: int = 0) -> None:
    """Reseed the generator the factories use when no `ids=` is given."""
    _default_ids[0] = IdGenerator(seed)


def _ids(ids: IdGenerator | None) -> IdGenerator:
    return ids if ids is not None else _default_ids[0]


def list_object(data: Sequence[Obj], url: str, *, total_count: bool = True) -> Obj:
    """A list embedded in an object (`items`, `lines`); unlike API lists these carry a count."""
    out: Obj = {"object": "list", "data": list(data), "has_more": False}
    if total_count:
        out["total_count"] = len(data)
    out["url"] = url
    return out


def _card_details(*, country: str = "GB", brand: str = "visa", last4: str = "4242") -> Obj:
    return {
        "amount_authorized": None,
        "brand": brand,
        "capture_before": None,
        "checks": {
            "address_line1_check": None,
            "address_postal_code_check": None,
            "cvc_check": "pass",
        },
        "country": country,
        "exp_month": 12,
        "exp_year": 2030,
        "extended_authorization": {"status": "disabled"},
        "fingerprint": "Xt5EWLLDS7FJjR1c",
        "funding": "credit",
        "incremental_authorization": {"status": "unavailable"},
        "installments": None,
        "last4": last4,
        "mandate": None,
        "multicapture": {"status": "unavailable"},
        "network": brand,
        "network_token": {"used": False},
        "network_transaction_id": "104102978678771",
        "overcapture": {"maximum_amount_capturable": 0, "status": "unavailable"},
        "regulated_status": "unregulated",
        "three_d_secure": None,
        "wallet": None,
    }


def payment_method_details(method: str = "card") -> Obj:
    """`payment_method_details` of a charge paid with `method` (card, bacs_debit, sepa_debit…)."""
    if method == "card":
        return {"card": _card_details(), "type": "card"}
    if method == "bacs_debit":
        detail: Obj = {
            "expected_debit_date": None,
            "fingerprint": "mbnHDOrqMk4Z3C6E",
            "last4": "2345",
            "mandate": "mandate_1PGkmzA8Q4oRJYNc0o8C8Osz",
            "sort_code": "108800",
        }
    elif method == "sepa_debit":
        detail = {
            "bank_code": "37040044",
            "branch_code": None,
            "country": "DE",
            "expected_debit_date": None,
            "fingerprint": "b4ZWl2ILyFvDOK5s",
            "last4": "3000",
            "mandate": "mandate_1PGkmzA8Q4oRJYNcXhGDlEtc",
        }
    else:
        detail = {}
    return {method: detail, "type": method}


def outcome(*, failed: bool) -> Obj:
    if failed:
        return {
            "advice_code": "try_again_later",
            "network_advice_code": None,
            "network_decline_code": None,
            "network_status": "declined_by_network",
            "reason": "generic_decline",
            "risk_level": "normal",
            "risk_score": 23,
            "seller_message": "The bank did not return any further details with this decline.",
            "type": "issuer_declined",
        }
    return {
        "advice_code": None,
        "network_advice_code": None,
        "network_decline_code": None,
        "network_status": "approved_by_network",
        "reason": None,
        "risk_level": "normal",
        "risk_score": 32,
        "seller_message": "Payment complete.",
        "type": "authorized",
    }


def _address() -> Obj:
    return {
        "city": None,
        "country": None,
        "line1": None,
        "line2": None,
        "postal_code": None,
        "state": None,
    }


def customer(
    *,
    id: str | None = None,
    ids: IdGenerator | None = None,
    created: int,
    email: str | None = None,
    name: str | None = None,
    metadata: Mapping[str, str] | None = None,
    livemode: bool = False,
) -> Obj:
    cid = id or _ids(ids).new("cus")
    return {
        "id": cid,
        "object": "customer",
        "address": None,
        "balance": 0,
        "business_name": None,
        "created": created,
        "currency": None,
        "customer_account": None,
        "default_source": None,
        "delinquent": False,
        "description": None,
        "discount": None,
        "email": email,
        "individual_name": None,
        "invoice_prefix": cid[4:12].upper(),
        "invoice_settings": {
            "custom_fields": None,
            "default_payment_method": None,
            "footer": None,
            "rendering_options": None,
        },
        "livemode": livemode,
        "metadata": dict(metadata or {}),
        "name": name,
        "next_invoice_sequence": 1,
        "phone": None,
        "preferred_locales": [],
        "shipping": None,
        "tax": None,
        "tax_exempt": "none",
        "test_clock": None,
    }


def payment_intent(
    *,
    amount: int,
    currency: str,
    created: int,
    id: str | None = None,
    ids: IdGenerator | None = None,
    status: str = "succeeded",
    customer: str | None = None,
    latest_charge: str | None = None,
    payment_method: str | None = None,
    payment_method_types: Sequence[str] = ("card",),
    metadata: Mapping[str, str] | None = None,
    description: str | None = None,
    receipt_email: str | None = None,
    last_payment_error: Obj | None = None,
    livemode: bool = False,
) -> Obj:
    pid = id or _ids(ids).new("pi")
    received = amount if status == "succeeded" else 0
    return {
        "id": pid,
        "object": "payment_intent",
        "allowed_payment_method_types": None,
        "amount": amount,
        "amount_capturable": 0,
        "amount_details": {"tip": {}},
        "amount_received": received,
        "application": None,
        "application_fee_amount": None,
        "automatic_payment_methods": None,
        "canceled_at": None,
        "cancellation_reason": None,
        "capture_method": "automatic_async",
        "client_secret": f"{pid}_secret_{pid[-20:]}",
        "confirmation_method": "automatic",
        "created": created,
        "currency": currency,
        "customer": customer,
        "customer_account": None,
        "description": description,
        "excluded_payment_method_types": None,
        "last_payment_error": last_payment_error,
        "latest_charge": latest_charge,
        "livemode": livemode,
        "metadata": dict(metadata or {}),
        "next_action": None,
        "on_behalf_of": None,
        "payment_method": payment_method,
        "payment_method_configuration_details": None,
        "payment_method_options": {
            t: ({"request_three_d_secure": "automatic"} if t == "card" else {})
            for t in payment_method_types
        },
        "payment_method_types": list(payment_method_types),
        "payment_record": None,
        "processing": None,
        "receipt_email": receipt_email,
        "review": None,
        "setup_future_usage": None,
        "shipping": None,
        "source": None,
        "statement_descriptor": None,
        "statement_descriptor_suffix": None,
        "status": status,
        "transfer_data": None,
        "transfer_group": None,
    }


def charge(
    *,
    amount: int,
    currency: str,
    created: int,
    id: str | None = None,
    ids: IdGenerator | None = None,
    status: str = "succeeded",
    payment_intent: str | None = None,
    customer: str | None = None,
    email: str | None = None,
    balance_transaction: str | None = None,
    amount_refunded: int = 0,
    disputed: bool = False,
    metadata: Mapping[str, str] | None = None,
    description: str | None = None,
    payment_method: str | None = None,
    method: str = "card",
    livemode: bool = False,
) -> Obj:
    """A charge. `status` is succeeded, pending or failed; `refunded` follows `amount_refunded`."""
    chid = id or _ids(ids).new("ch")
    succeeded = status == "succeeded"
    failed = status == "failed"
    return {
        "id": chid,
        "object": "charge",
        "amount": amount,
        "amount_captured": amount if succeeded else 0,
        "amount_refunded": amount_refunded,
        "application": None,
        "application_fee": None,
        "application_fee_amount": None,
        "balance_transaction": balance_transaction,
        "billing_details": {
            "address": _address(),
            "email": email,
            "name": None,
            "phone": None,
            "tax_id": None,
        },
        "calculated_statement_descriptor": "DONATIONS",
        "captured": succeeded,
        "created": created,
        "currency": currency,
        "customer": customer,
        "description": description,
        "disputed": disputed,
        "failure_balance_transaction": None,
        "failure_code": "card_declined" if failed else None,
        "failure_message": "Your card was declined." if failed else None,
        "fraud_details": {},
        "livemode": livemode,
        "metadata": dict(metadata or {}),
        "on_behalf_of": None,
        "outcome": None if status == "pending" else outcome(failed=failed),
        "paid": succeeded,
        "payment_intent": payment_intent,
        "payment_method": payment_method,
        "payment_method_details": payment_method_details(method),
        "receipt_email": email,
        "receipt_number": None,
        "receipt_url": (
            f"https://pay.stripe.com/receipts/payment/{chid[3:]}" if succeeded else None
        ),
        "refunded": amount_refunded > 0 and amount_refunded >= amount,
        "review": None,
        "shipping": None,
        "source": None,
        "source_transfer": None,
        "statement_descriptor": None,
        "statement_descriptor_suffix": None,
        "status": status,
        "transfer_data": None,
        "transfer_group": None,
    }


def refund(
    *,
    amount: int,
    currency: str,
    created: int,
    charge: str,
    id: str | None = None,
    ids: IdGenerator | None = None,
    status: str = "succeeded",
    payment_intent: str | None = None,
    balance_transaction: str | None = None,
    failure_balance_transaction: str | None = None,
    failure_reason: str | None = None,
    reason: str | None = "requested_by_customer",
    metadata: Mapping[str, str] | None = None,
) -> Obj:
    """A refund: status pending, requires_action, succeeded, failed or canceled."""
    return {
        "id": id or _ids(ids).new("re"),
        "object": "refund",
        "amount": amount,
        "balance_transaction": balance_transaction,
        "charge": charge,
        "created": created,
        "currency": currency,
        "customer": None,
        "description": None,
        "destination_details": {
            "card": {
                "reference": None,
                "reference_status": "pending",
                "reference_type": "acquirer_reference_number",
                "type": "refund",
            },
            "type": "card",
        },
        "failure_balance_transaction": failure_balance_transaction,
        "failure_reason": failure_reason,
        "instructions_email": None,
        "metadata": dict(metadata or {}),
        "payment_intent": payment_intent,
        "payment_method": None,
        "pending_reason": None,
        "reason": reason,
        "receipt_number": None,
        "source_transfer_reversal": None,
        "status": status,
        "transfer_reversal": None,
    }


def _evidence() -> Obj:
    names = [
        "access_activity_log",
        "billing_address",
        "cancellation_policy",
        "cancellation_policy_disclosure",
        "cancellation_rebuttal",
        "customer_communication",
        "customer_email_address",
        "customer_name",
        "customer_purchase_ip",
        "customer_signature",
        "duplicate_charge_documentation",
        "duplicate_charge_explanation",
        "duplicate_charge_id",
        "product_description",
        "receipt",
        "refund_policy",
        "refund_policy_disclosure",
        "refund_refusal_explanation",
        "service_date",
        "service_documentation",
        "shipping_address",
        "shipping_carrier",
        "shipping_date",
        "shipping_documentation",
        "shipping_tracking_number",
        "uncategorized_file",
        "uncategorized_text",
    ]
    ev: Obj = dict.fromkeys(names)
    ev["appeal"] = None
    ev["enhanced_evidence"] = {}
    return dict(sorted(ev.items()))


def dispute(
    *,
    amount: int,
    currency: str,
    created: int,
    charge: str,
    id: str | None = None,
    ids: IdGenerator | None = None,
    status: str = "needs_response",
    payment_intent: str | None = None,
    balance_transactions: Sequence[Obj] = (),
    reason: str = "fraudulent",
    has_evidence: bool = False,
    submission_count: int = 0,
    is_charge_refundable: bool = False,
    livemode: bool = False,
) -> Obj:
    """A dispute; `balance_transactions` are full objects, as Stripe embeds them."""
    return {
        "id": id or _ids(ids).new("dp"),
        "object": "dispute",
        "amount": amount,
        "balance_transactions": [dict(bt) for bt in balance_transactions],
        "charge": charge,
        "created": created,
        "currency": currency,
        "enhanced_eligibility_types": [],
        "evidence": _evidence(),
        "evidence_details": {
            "due_by": created + 7 * 86400 + 86399,
            "enhanced_eligibility": {},
            "has_evidence": has_evidence,
            "past_due": False,
            "submission_count": submission_count,
            "submission_method": "manual" if submission_count else "not_submitted",
        },
        "intended_submission_method": None,
        "is_charge_refundable": is_charge_refundable,
        "livemode": livemode,
        "metadata": {},
        "network_reason_code": "10.4",
        "payment_intent": payment_intent,
        "reason": reason,
        "status": status,
    }


def balance_transaction(
    *,
    amount: int,
    currency: str,
    created: int,
    source: str | None,
    type: str,
    id: str | None = None,
    ids: IdGenerator | None = None,
    fee: int = 0,
    fee_description: str = "Stripe processing fees",
    exchange_rate: float | None = None,
    reporting_category: str | None = None,
    available_on: int | None = None,
    status: str = "pending",
    description: str | None = None,
) -> Obj:
    """A balance transaction; `net` is `amount - fee`, all in the settlement `currency`."""
    fee_details: list[Obj] = []
    if fee:
        fee_details.append(
            {
                "amount": fee,
                "application": None,
                "currency": currency,
                "description": fee_description,
                "type": "stripe_fee",
            }
        )
    return {
        "id": id or _ids(ids).new("txn"),
        "object": "balance_transaction",
        "amount": amount,
        "available_on": available_on if available_on is not None else created + 2 * 86400,
        "balance_type": "payments",
        "created": created,
        "currency": currency,
        "description": description,
        "exchange_rate": exchange_rate,
        "fee": fee,
        "fee_details": fee_details,
        "net": amount - fee,
        "reporting_category": reporting_category or type,
        "source": source,
        "status": status,
        "type": type,
    }


def checkout_session(
    *,
    amount_total: int | None,
    currency: str | None,
    created: int,
    id: str | None = None,
    ids: IdGenerator | None = None,
    mode: str = "payment",
    status: str = "complete",
    payment_status: str = "paid",
    payment_intent: str | None = None,
    subscription: str | None = None,
    invoice: str | None = None,
    customer: str | None = None,
    customer_email: str | None = None,
    email: str | None = None,
    metadata: Mapping[str, str] | None = None,
    amount_subtotal: int | None = None,
    amount_discount: int = 0,
    discounts: Sequence[Obj] = (),
    payment_method_types: Sequence[str] = ("card",),
    success_url: str = "https://example.org/thanks?session_id={CHECKOUT_SESSION_ID}",
    cancel_url: str | None = "https://example.org/support",
    livemode: bool = False,
) -> Obj:
    """A Checkout Session; `email` is what the payer typed (`customer_details.email`)."""
    sid = id or _ids(ids).new("cs_test_")
    complete = status == "complete"
    return {
        "id": sid,
        "object": "checkout.session",
        "adaptive_pricing": {"enabled": False},
        "after_expiration": None,
        "allow_promotion_codes": None,
        "allowed_payment_method_types": None,
        "amount_subtotal": amount_subtotal if amount_subtotal is not None else amount_total,
        "amount_total": amount_total,
        "automatic_tax": {"enabled": False, "liability": None, "provider": None, "status": None},
        "billing_address_collection": None,
        "branding_settings": None,
        "cancel_url": cancel_url,
        "client_reference_id": None,
        "client_secret": None,
        "collected_information": {
            "business_name": None,
            "individual_name": None,
            "shipping_details": None,
        }
        if complete
        else None,
        "consent": None,
        "consent_collection": None,
        "created": created,
        "currency": currency,
        "currency_conversion": None,
        "custom_fields": [],
        "custom_text": {
            "after_submit": None,
            "shipping_address": None,
            "submit": None,
            "terms_of_service_acceptance": None,
        },
        "customer": customer,
        "customer_account": None,
        "customer_creation": "if_required" if mode == "payment" else "always",
        "customer_details": (
            {
                "address": {**_address(), "country": "GB"},
                "business_name": None,
                "email": email,
                "individual_name": None,
                "name": "Jenny Rosen",
                "phone": None,
                "tax_exempt": "none",
                "tax_ids": [],
            }
            if complete
            else None
        ),
        "customer_email": customer_email,
        "discounts": [dict(d) for d in discounts],
        "excluded_payment_method_types": None,
        "expires_at": created + 86400,
        "integration_identifier": None,
        "invoice": invoice,
        "invoice_creation": (
            {
                "enabled": False,
                "invoice_data": {
                    "account_tax_ids": None,
                    "custom_fields": None,
                    "description": None,
                    "footer": None,
                    "issuer": None,
                    "metadata": {},
                    "rendering_options": None,
                },
            }
            if mode == "payment"
            else None
        ),
        "livemode": livemode,
        "locale": None,
        "metadata": dict(metadata or {}),
        "mode": mode,
        "name_collection": None,
        "optional_items": None,
        "origin_context": None,
        "payment_intent": payment_intent,
        "payment_link": None,
        "payment_method_collection": "if_required" if mode == "payment" else "always",
        "payment_method_configuration_details": None,
        "payment_method_options": {
            t: ({"request_three_d_secure": "automatic"} if t == "card" else {})
            for t in payment_method_types
        },
        "payment_method_types": list(payment_method_types),
        "payment_status": payment_status,
        "permissions": None,
        "phone_number_collection": {"enabled": False},
        "recovered_from": None,
        "redirect_on_completion": None,
        "return_url": None,
        "saved_payment_method_options": None,
        "setup_intent": None,
        "shipping_address_collection": None,
        "shipping_cost": None,
        "shipping_options": [],
        "status": status,
        "submit_type": "donate" if mode == "payment" else None,
        "subscription": subscription,
        "success_url": success_url,
        "tax_id_collection": None,
        "total_details": {
            "amount_discount": amount_discount,
            "amount_shipping": 0,
            "amount_tax": 0,
        },
        "ui_mode": "hosted_page",
        "url": None if status != "open" else f"https://checkout.stripe.com/c/pay/{sid}",
        "wallet_options": None,
    }


def product(
    *,
    created: int,
    name: str,
    id: str | None = None,
    ids: IdGenerator | None = None,
    metadata: Mapping[str, str] | None = None,
    livemode: bool = False,
) -> Obj:
    return {
        "id": id or _ids(ids).new("prod"),
        "object": "product",
        "active": True,
        "created": created,
        "default_price": None,
        "description": None,
        "images": [],
        "livemode": livemode,
        "marketing_features": [],
        "metadata": dict(metadata or {}),
        "name": name,
        "package_dimensions": None,
        "shippable": None,
        "statement_descriptor": None,
        "tax_code": None,
        "tax_details": None,
        "type": "service",
        "unit_label": None,
        "updated": created,
        "url": None,
    }


def price(
    *,
    unit_amount: int,
    currency: str,
    created: int,
    product: str,
    id: str | None = None,
    ids: IdGenerator | None = None,
    interval: str | None = "month",
    interval_count: int = 1,
    livemode: bool = False,
) -> Obj:
    """A price; `interval=None` makes a one-time price."""
    return {
        "id": id or _ids(ids).new("price"),
        "object": "price",
        "active": True,
        "billing_scheme": "per_unit",
        "created": created,
        "currency": currency,
        "custom_unit_amount": None,
        "livemode": livemode,
        "lookup_key": None,
        "metadata": {},
        "nickname": None,
        "product": product,
        "recurring": (
            {
                "interval": interval,
                "interval_count": interval_count,
                "meter": None,
                "trial_period_days": None,
                "usage_type": "licensed",
            }
            if interval
            else None
        ),
        "tax_behavior": "unspecified",
        "tiers_mode": None,
        "transform_quantity": None,
        "type": "recurring" if interval else "one_time",
        "unit_amount": unit_amount,
        "unit_amount_decimal": str(unit_amount),
    }


def plan_from_price(p: Obj) -> Obj:
    """The legacy `plan` mirror of a recurring price, which subscription items still carry."""
    rec = p["recurring"] or {}
    return {
        "id": p["id"],
        "object": "plan",
        "active": p["active"],
        "amount": p["unit_amount"],
        "amount_decimal": p["unit_amount_decimal"],
        "billing_scheme": p["billing_scheme"],
        "created": p["created"],
        "currency": p["currency"],
        "interval": rec.get("interval"),
        "interval_count": rec.get("interval_count", 1),
        "livemode": p["livemode"],
        "metadata": {},
        "meter": None,
        "nickname": None,
        "product": p["product"],
        "tiers_mode": None,
        "transform_usage": None,
        "trial_period_days": None,
        "usage_type": rec.get("usage_type", "licensed"),
    }


def subscription_item(
    *,
    price: Obj,
    subscription: str,
    created: int,
    current_period_start: int,
    current_period_end: int,
    id: str | None = None,
    ids: IdGenerator | None = None,
    quantity: int = 1,
) -> Obj:
    """A subscription item: since 2025-03-31 the billing period lives here, not on the
    subscription."""
    return {
        "id": id or _ids(ids).new("si"),
        "object": "subscription_item",
        "billed_until": None,
        "billing_thresholds": None,
        "created": created,
        "current_period_end": current_period_end,
        "current_period_start": current_period_start,
        "current_trial": None,
        "discounts": [],
        "metadata": {},
        "plan": plan_from_price(price),
        "price": dict(price),
        "quantity": quantity,
        "subscription": subscription,
        "tax_rates": [],
    }


def subscription(
    *,
    customer: str,
    currency: str,
    created: int,
    items: Sequence[Obj],
    id: str,
    status: str = "active",
    discounts: Sequence[str] = (),
    metadata: Mapping[str, str] | None = None,
    latest_invoice: str | None = None,
    default_payment_method: str | None = None,
    cancel_at_period_end: bool = False,
    cancel_at: int | None = None,
    canceled_at: int | None = None,
    ended_at: int | None = None,
    cancellation_reason: str | None = None,
    livemode: bool = False,
) -> Obj:
    """A subscription; `id` is required because its items name it (`items[].subscription`)."""
    return {
        "id": id,
        "object": "subscription",
        "application": None,
        "application_fee_percent": None,
        "automatic_tax": {"disabled_reason": None, "enabled": False, "liability": None},
        "billing_cycle_anchor": created,
        "billing_cycle_anchor_config": None,
        "billing_mode": {"flexible": None, "type": "classic", "updated_at": None},
        "billing_schedules": [],
        "billing_thresholds": None,
        "cancel_at": cancel_at,
        "cancel_at_period_end": cancel_at_period_end,
        "canceled_at": canceled_at,
        "cancellation_details": {
            "comment": None,
            "feedback": None,
            "reason": cancellation_reason,
        },
        "collection_method": "charge_automatically",
        "created": created,
        "currency": currency,
        "customer": customer,
        "customer_account": None,
        "days_until_due": None,
        "default_payment_method": default_payment_method,
        "default_source": None,
        "default_tax_rates": [],
        "description": None,
        "discounts": list(discounts),
        "ended_at": ended_at,
        "invoice_settings": {"account_tax_ids": None, "issuer": {"type": "self"}},
        "items": list_object(items, f"/v1/subscription_items?subscription={id}"),
        "latest_invoice": latest_invoice,
        "livemode": livemode,
        "metadata": dict(metadata or {}),
        "next_pending_invoice_item_invoice": None,
        "on_behalf_of": None,
        "pause_collection": None,
        "payment_settings": {
            "payment_method_options": None,
            "payment_method_types": None,
            "save_default_payment_method": "off",
        },
        "pending_invoice_item_interval": None,
        "pending_setup_intent": None,
        "pending_update": None,
        "schedule": None,
        "start_date": created,
        "status": status,
        "status_details": None,
        "test_clock": None,
        "transfer_data": None,
        "trial_end": None,
        "trial_settings": {"end_behavior": {"missing_payment_method": "create_invoice"}},
        "trial_start": None,
    }


def coupon(
    *,
    created: int,
    id: str = "founding-supporter",
    percent_off: float | None = 50,
    amount_off: int | None = None,
    currency: str | None = None,
    duration: str = "forever",
    name: str | None = "Founding supporter",
    times_redeemed: int = 0,
    livemode: bool = False,
) -> Obj:
    return {
        "id": id,
        "object": "coupon",
        "amount_off": amount_off,
        "created": created,
        "currency": currency,
        "duration": duration,
        "duration_in_months": None,
        "livemode": livemode,
        "max_redemptions": None,
        "metadata": {},
        "name": name,
        "percent_off": percent_off,
        "redeem_by": None,
        "times_redeemed": times_redeemed,
        "valid": True,
    }


def discount(
    *,
    coupon: str,
    start: int,
    id: str | None = None,
    ids: IdGenerator | None = None,
    customer: str | None = None,
    subscription: str | None = None,
    checkout_session: str | None = None,
    invoice: str | None = None,
    subscription_item: str | None = None,
) -> Obj:
    """A discount applying a coupon; `source.coupon` names the coupon by id. One applied to a
    subscription's item names the item (`subscription_item`) and its subscription."""
    return {
        "id": id or _ids(ids).new("di"),
        "object": "discount",
        "checkout_session": checkout_session,
        "customer": customer,
        "customer_account": None,
        "end": None,
        "invoice": invoice,
        "invoice_item": None,
        "promotion_code": None,
        "source": {"coupon": coupon, "type": "coupon"},
        "start": start,
        "subscription": subscription,
        "subscription_item": subscription_item,
    }


def invoice_line_item(
    *,
    invoice: str,
    subscription: str,
    subscription_item: str,
    price: Obj,
    period_start: int,
    period_end: int,
    id: str | None = None,
    ids: IdGenerator | None = None,
    quantity: int = 1,
    discount_amounts: Sequence[Obj] = (),
    metadata: Mapping[str, str] | None = None,
    description: str | None = None,
    livemode: bool = False,
) -> Obj:
    """A subscription line; `amount` is before discounts, which sit in `discount_amounts`."""
    amount = int(price["unit_amount"]) * quantity
    return {
        "id": id or _ids(ids).new("il"),
        "object": "line_item",
        "amount": amount,
        "currency": price["currency"],
        "description": description,
        "discount_amounts": [dict(d) for d in discount_amounts],
        "discountable": True,
        "discounts": [],
        "invoice": invoice,
        "livemode": livemode,
        "metadata": dict(metadata or {}),
        "parent": {
            "invoice_item_details": None,
            "subscription_item_details": {
                "invoice_item": None,
                "proration": False,
                "proration_details": {"credited_items": None},
                "subscription": subscription,
                "subscription_item": subscription_item,
            },
            "type": "subscription_item_details",
        },
        "period": {"end": period_end, "start": period_start},
        "pretax_credit_amounts": [],
        "pricing": {
            "price_details": {"price": price["id"], "product": price["product"]},
            "type": "price_details",
            "unit_amount_decimal": price["unit_amount_decimal"],
        },
        "quantity": quantity,
        "quantity_decimal": str(quantity),
        "subscription": subscription,
        "subtotal": amount,
        "taxes": [],
    }


def invoice(
    *,
    id: str,
    customer: str,
    currency: str,
    created: int,
    lines: Sequence[Obj],
    status: str = "paid",
    subscription: str | None = None,
    subscription_metadata: Mapping[str, str] | None = None,
    billing_reason: str = "subscription_create",
    customer_email: str | None = None,
    customer_name: str | None = None,
    discounts: Sequence[str] = (),
    total_discount_amounts: Sequence[Obj] = (),
    period_start: int | None = None,
    period_end: int | None = None,
    number: str | None = None,
    finalized_at: int | None = None,
    paid_at: int | None = None,
    voided_at: int | None = None,
    marked_uncollectible_at: int | None = None,
    attempt_count: int | None = None,
    next_payment_attempt: int | None = None,
    amount_paid: int | None = None,
    livemode: bool = False,
) -> Obj:
    """An invoice. Since 2025-03-31 there is no `subscription`, `charge` or `payment_intent`
    field: the subscription is `parent.subscription_details.subscription` and payments are
    `invoice_payment` objects. `total` is the sum of lines less `total_discount_amounts`."""
    subtotal = sum(int(line["amount"]) for line in lines)
    discount_total = sum(int(d["amount"]) for d in total_discount_amounts)
    total = subtotal - discount_total
    paid = status == "paid"
    if amount_paid is None:
        amount_paid = total if paid else 0
    draft = status == "draft"
    hosted = None if draft else f"https://invoice.stripe.com/i/acct_1FakeStripe/test_{id[3:]}"
    return {
        "id": id,
        "object": "invoice",
        "account_country": "GB",
        "account_name": "Donations Test",
        "account_tax_ids": None,
        "amount_due": total,
        "amount_overpaid": 0,
        "amount_paid": amount_paid,
        "amount_paid_off_stripe": 0,
        "amount_remaining": total - amount_paid,
        "amount_shipping": 0,
        "application": None,
        "attempt_count": attempt_count if attempt_count is not None else (1 if paid else 0),
        "attempted": paid or bool(attempt_count),
        "auto_advance": not paid and status not in ("void", "uncollectible"),
        "automatic_tax": {
            "disabled_reason": None,
            "enabled": False,
            "liability": None,
            "provider": None,
            "status": None,
        },
        "automatically_finalizes_at": created + 3600 if draft else None,
        "billing_reason": billing_reason,
        "collection_method": "charge_automatically",
        "confirmation_secret": None,
        "created": created,
        "currency": currency,
        "custom_fields": None,
        "customer": customer,
        "customer_account": None,
        "customer_address": None,
        "customer_email": customer_email,
        "customer_name": customer_name,
        "customer_phone": None,
        "customer_shipping": None,
        "customer_tax_exempt": "none",
        "customer_tax_ids": [],
        "default_payment_method": None,
        "default_source": None,
        "default_tax_rates": [],
        "description": None,
        "discounts": list(discounts),
        "due_date": None,
        "effective_at": finalized_at,
        "ending_balance": None if draft else 0,
        "footer": None,
        "from_invoice": None,
        "hosted_invoice_url": hosted,
        "invoice_pdf": None if draft else f"{hosted}/pdf?s=ap",
        "issuer": {"type": "self"},
        "last_finalization_error": None,
        "latest_revision": None,
        "lines": list_object(lines, f"/v1/invoices/{id}/lines"),
        "livemode": livemode,
        "metadata": {},
        "next_payment_attempt": next_payment_attempt,
        "number": number,
        "on_behalf_of": None,
        "parent": (
            {
                "quote_details": None,
                "subscription_details": {
                    "metadata": dict(subscription_metadata or {}),
                    "subscription": subscription,
                },
                "type": "subscription_details",
            }
            if subscription
            else None
        ),
        "payment_settings": {
            "default_mandate": None,
            "payment_method_options": None,
            "payment_method_types": None,
        },
        "period_end": period_end if period_end is not None else created,
        "period_start": period_start if period_start is not None else created,
        "post_payment_credit_notes_amount": 0,
        "pre_payment_credit_notes_amount": 0,
        "receipt_number": None,
        "rendering": None,
        "shipping_cost": None,
        "shipping_details": None,
        "starting_balance": 0,
        "statement_descriptor": None,
        "status": status,
        "status_details": None,
        "status_transitions": {
            "finalized_at": finalized_at,
            "marked_uncollectible_at": marked_uncollectible_at,
            "paid_at": paid_at,
            "voided_at": voided_at,
        },
        "subtotal": subtotal,
        "subtotal_excluding_tax": subtotal,
        "test_clock": None,
        "threshold_reason": None,
        "total": total,
        "total_discount_amounts": [dict(d) for d in total_discount_amounts],
        "total_excluding_tax": total,
        "total_pretax_credit_amounts": [],
        "total_taxes": [],
        "webhooks_delivered_at": created,
    }


def invoice_payment(
    *,
    invoice: str,
    amount_requested: int,
    currency: str,
    created: int,
    id: str | None = None,
    ids: IdGenerator | None = None,
    status: str = "paid",
    payment_intent: str | None = None,
    charge: str | None = None,
    paid_at: int | None = None,
    canceled_at: int | None = None,
    is_default: bool = True,
    livemode: bool = False,
) -> Obj:
    """How an invoice is paid: `payment.payment_intent` (or `payment.charge`); `amount_paid`
    stays null until the payment is `paid`."""
    ptype = "payment_intent" if payment_intent else "charge"
    return {
        "id": id or _ids(ids).new("inpay"),
        "object": "invoice_payment",
        "amount_paid": amount_requested if status == "paid" else None,
        "amount_requested": amount_requested,
        "created": created,
        "currency": currency,
        "invoice": invoice,
        "is_default": is_default,
        "livemode": livemode,
        "payment": (
            {"payment_intent": payment_intent, "type": "payment_intent"}
            if ptype == "payment_intent"
            else {"charge": charge, "type": "charge"}
        ),
        "status": status,
        "status_transitions": {"canceled_at": canceled_at, "paid_at": paid_at},
    }


def payout(
    *,
    amount: int,
    currency: str,
    created: int,
    arrival_date: int,
    id: str | None = None,
    ids: IdGenerator | None = None,
    status: str = "paid",
    balance_transaction: str | None = None,
    automatic: bool = True,
    livemode: bool = False,
) -> Obj:
    """A payout of `amount` (positive) to the account's bank: status pending, in_transit, paid…"""
    return {
        "id": id or _ids(ids).new("po"),
        "object": "payout",
        "amount": amount,
        "application_fee": None,
        "application_fee_amount": None,
        "arrival_date": arrival_date,
        "automatic": automatic,
        "balance_transaction": balance_transaction,
        "created": created,
        "currency": currency,
        "description": "STRIPE PAYOUT",
        "destination": "ba_1FakeStripeBankAcct0001",
        "failure_balance_transaction": None,
        "failure_code": None,
        "failure_message": None,
        "livemode": livemode,
        "metadata": {},
        "method": "standard",
        "original_payout": None,
        "payout_method": None,
        "reconciliation_status": "completed"
        if status == "paid" and automatic
        else ("in_progress" if automatic else "not_applicable"),
        "reversed_by": None,
        "source_type": "card",
        "statement_descriptor": None,
        "status": status,
        "trace_id": {"status": "supported", "value": None} if status == "paid" else None,
        "type": "bank_account",
    }


def event(
    type: str,
    obj: Mapping[str, Any],
    *,
    created: int,
    id: str | None = None,
    ids: IdGenerator | None = None,
    api_version: str = API_VERSION,
    livemode: bool = False,
    previous_attributes: Mapping[str, Any] | None = None,
    request_id: str | None = None,
    idempotency_key: str | None = None,
    pending_webhooks: int = 1,
) -> Obj:
    """A v1 snapshot event. `data.previous_attributes` is there only on `*.updated`-style events
    that give it; `request.id` is null for changes Stripe made on its own (renewals, disputes)."""
    data: Obj = {"object": dict(obj)}
    if previous_attributes is not None:
        data["previous_attributes"] = dict(previous_attributes)
    return {
        "id": id or _ids(ids).new("evt"),
        "object": "event",
        "api_version": api_version,
        "created": created,
        "data": data,
        "livemode": livemode,
        "pending_webhooks": pending_webhooks,
        "request": {"id": request_id, "idempotency_key": idempotency_key},
        "type": type,
    }
