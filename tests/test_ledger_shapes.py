"""The ledger reads what Stripe sends for the pinned API version (2026-10-28.endive).

Events built as that version writes them (tests/fakestripe/objects.py, whose builders follow the
stripe library's typed resources; a field a test sets by hand names its source), checked against
the reference ledger (`derive_ledger`, which the database must equal). Pure: no database.
"""

from __future__ import annotations

from typing import Any

from tests.fakestripe import objects as o
from tests.ledger_check import reference

T0 = 1_793_000_000  # 2026-10-29, after the pinned version's date


def _ev(type_: str, obj: dict[str, Any], created: int, n: int) -> dict[str, Any]:
    return o.event(type_, obj, created=created, id=f"evt_shape_{type_.replace('.', '_')}_{n}")


# --- invoices paid outside Stripe -----------------------------------------------------------------


def test_invoice_paid_off_stripe_is_not_recorded_as_money_taken_through_stripe() -> None:
    """An invoice paid outside Stripe (`amount_paid_off_stripe`, stripe/_invoice.py: "Amount …
    that was paid on the invoice outside of Stripe"; `amount_paid` includes it, as
    `amount_remaining` is `amount_due - amount_paid`) is not money taken through Stripe: no
    payment stands for it, so it counts in no total and reconciliation looks for no charge. Its
    invoice payment (stripe/_invoice_payment.py, `payment.type` "payment_record") names no
    payment intent or charge."""
    sub, cus, inv = "sub_shape_oob", "cus_shape_oob", "in_shape_oob"
    p = o.price(unit_amount=1000, currency="gbp", created=T0, product="prod_shape",
                id="price_shape_oob")
    item = o.subscription_item(price=p, subscription=sub, created=T0, id="si_shape_oob",
                               current_period_start=T0, current_period_end=T0 + 30 * 86400)
    line = o.invoice_line_item(invoice=inv, subscription=sub, subscription_item="si_shape_oob",
                               price=p, period_start=T0, period_end=T0 + 30 * 86400)
    invoice = o.invoice(id=inv, customer=cus, currency="gbp", created=T0, lines=[line],
                        subscription=sub, billing_reason="subscription_cycle",
                        finalized_at=T0, paid_at=T0 + 60)
    invoice["amount_paid_off_stripe"] = 1000
    assert invoice["amount_paid"] == invoice["amount_due"] == 1000
    assert invoice["amount_remaining"] == 0
    inpay = o.invoice_payment(invoice=inv, amount_requested=1000, currency="gbp", created=T0,
                              id="inpay_shape_oob", paid_at=T0 + 60)
    inpay["payment"] = {"payment_record": "pr_shape_oob", "type": "payment_record"}
    subscription = o.subscription(customer=cus, currency="gbp", created=T0 - 30 * 86400,
                                  items=[item], id=sub)
    events = [
        _ev("customer.subscription.created", subscription, T0 - 30 * 86400, 1),
        _ev("invoice.paid", invoice, T0 + 60, 2),
        _ev("invoice_payment.paid", inpay, T0 + 60, 3),
    ]
    payments = reference(events)["payments"]
    taken = {k: (p["amount"], p["status"]) for k, p in payments.items()
             if p["status"] == "succeeded" and p["amount"] > 0}
    assert taken == {}


# --- disputes in appeal ---------------------------------------------------------------------------


def _one_off(amount: int = 2500) -> tuple[list[dict[str, Any]], str, str]:
    pi, ch, txn = "pi_shape_dp", "ch_shape_dp", "txn_shape_dp"
    intent = o.payment_intent(amount=amount, currency="gbp", created=T0, id=pi, latest_charge=ch,
                              customer="cus_shape_dp")
    charge = o.charge(amount=amount, currency="gbp", created=T0, id=ch, payment_intent=pi,
                      customer="cus_shape_dp", balance_transaction=txn)
    return [
        _ev("payment_intent.succeeded", intent, T0, 1),
        _ev("charge.succeeded", charge, T0, 2),
    ], pi, ch


def _withdrawal(amount: int, created: int) -> dict[str, Any]:
    return o.balance_transaction(amount=-amount, currency="gbp", created=created,
                                 source="dp_shape", type="adjustment", fee=1500,
                                 id="txn_shape_dp_withdrawal",
                                 reporting_category="dispute", description="Chargeback withdrawal")


def test_dispute_in_appeal_still_holds_the_withdrawn_funds() -> None:
    """A dispute under appeal (stripe/_dispute.py: `appeal_needs_response`,
    `appeal_under_review`, after the first decision went against us) still holds the money
    Stripe withdrew, even when it is first seen in appeal (an import stores objects as they are
    now)."""
    events, pi, ch = _one_off()
    dispute = o.dispute(amount=2500, currency="gbp", created=T0 + 86400, charge=ch,
                        payment_intent=pi, id="dp_shape", status="appeal_needs_response",
                        balance_transactions=[_withdrawal(2500, T0 + 86400)],
                        submission_count=1, has_evidence=True)
    events.append(_ev("charge.dispute.updated", dispute, T0 + 40 * 86400, 3))
    ledger = reference(events)
    assert ledger["disputes"]["dp_shape"]["amount_held"] == 2500
    assert ledger["payments"][pi]["amount_disputed"] == 2500


def test_dispute_appeal_after_a_loss_is_followed() -> None:
    """A lost dispute that is appealed follows the appeal (its status in the reports), still
    holding the money; an appeal won gives the money back, and the payment counts again."""
    events, pi, ch = _one_off()
    bts = [_withdrawal(2500, T0 + 86400)]

    def dp(status: str) -> dict[str, Any]:
        return o.dispute(amount=2500, currency="gbp", created=T0 + 86400, charge=ch,
                         payment_intent=pi, id="dp_shape", status=status,
                         balance_transactions=bts)

    events += [
        _ev("charge.dispute.created", dp("needs_response"), T0 + 86400, 3),
        _ev("charge.dispute.funds_withdrawn", dp("needs_response"), T0 + 86400, 4),
        _ev("charge.dispute.closed", dp("lost"), T0 + 20 * 86400, 5),
        _ev("charge.dispute.updated", dp("appeal_needs_response"), T0 + 21 * 86400, 6),
        _ev("charge.dispute.updated", dp("appeal_under_review"), T0 + 22 * 86400, 7),
    ]
    ledger = reference(events)
    assert ledger["payments"][pi]["amount_disputed"] == 2500
    assert ledger["disputes"]["dp_shape"]["status"] == "appeal_under_review"

    events.append(_ev("charge.dispute.closed", dp("won"), T0 + 60 * 86400, 8))
    ledger = reference(events)
    assert ledger["disputes"]["dp_shape"]["status"] == "won"
    assert ledger["payments"][pi]["amount_disputed"] == 0
    assert ledger["payments"][pi]["dispute_lost"] is False


def _authorised(name: str, amount: int = 2000) -> tuple[dict[str, Any], dict[str, Any]]:
    """A payment intent waiting for capture and its charge, authorised and not captured."""
    pi, ch = f"pi_shape_{name}", f"ch_shape_{name}"
    intent = o.payment_intent(amount=amount, currency="gbp", created=T0, id=pi, latest_charge=ch,
                              customer=f"cus_shape_{name}")
    intent["status"] = "requires_capture"
    held = o.charge(amount=amount, currency="gbp", created=T0, id=ch, payment_intent=pi,
                    customer=f"cus_shape_{name}", balance_transaction=None)
    held.update(captured=False, amount_captured=0)
    return intent, held


def test_a_charge_authorised_but_not_captured_is_no_money_until_captured() -> None:
    """A charge with `captured: false` (manual capture: stripe/_charge.py `captured`, "If the
    charge was created without capturing, this Boolean represents whether it is still
    uncaptured or has since been captured") is an authorisation: no payment has succeeded until
    charge.captured says it was."""
    intent, held = _authorised("auth")
    pi, ch = intent["id"], held["id"]
    events = [_ev("payment_intent.amount_capturable_updated", intent, T0, 1),
              _ev("charge.succeeded", held, T0, 2)]
    payments = reference(events)["payments"]
    assert all(p["status"] != "succeeded" for p in payments.values())

    captured = o.charge(amount=2000, currency="gbp", created=T0, id=ch, payment_intent=pi,
                        customer="cus_shape_auth", balance_transaction="txn_shape_auth")
    events.append(_ev("charge.captured", captured, T0 + 3600, 3))
    payments = reference(events)["payments"]
    assert payments[pi]["status"] == "succeeded" and payments[pi]["amount"] == 2000


def test_an_authorisation_released_without_capture_is_no_payment() -> None:
    """A charge authorised but never captured whose authorisation is released (the intent
    canceled; Stripe marks the charge refunded and makes a Refund for the released amount) took no
    money: the payment is canceled, not a succeeded payment refunded."""
    intent, held = _authorised("released")
    pi, ch = intent["id"], held["id"]
    canceled = dict(intent, status="canceled", cancellation_reason="requested_by_customer")
    released = dict(held, amount_refunded=2000, refunded=True)
    refund = o.refund(amount=2000, currency="gbp", created=T0 + 3600, charge=ch,
                      payment_intent=pi, id="re_shape_released", reason=None)
    events = [
        _ev("payment_intent.amount_capturable_updated", intent, T0, 1),
        _ev("charge.succeeded", held, T0, 2),
        _ev("payment_intent.canceled", canceled, T0 + 3600, 3),
        _ev("charge.refunded", released, T0 + 3600, 4),
        _ev("refund.created", refund, T0 + 3600, 5),
    ]
    payments = reference(events)["payments"]
    assert {k: p["status"] for k, p in payments.items()} == {pi: "canceled"}
