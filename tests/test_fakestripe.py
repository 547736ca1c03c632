"""Tests of the fake Stripe itself: object shapes, signing, the simulator's invariants, server."""

from __future__ import annotations

import inspect
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
import pytest
import stripe

from tests.fakestripe import FakeStripe, World, running_fake_stripe
from tests.fakestripe import objects as o
from tests.fakestripe.server import parse_form
from tests.fakestripe.signing import sign, signed_request

SECRET = "whsec_test_c2VjcmV0LXNpZ25pbmcta2V5"

# The typed resource declaring each object's top-level fields for the pinned API version.
RESOURCES: dict[str, type[Any]] = {
    "balance_transaction": stripe.BalanceTransaction,
    "charge": stripe.Charge,
    "checkout.session": stripe.checkout.Session,
    "coupon": stripe.Coupon,
    "customer": stripe.Customer,
    "discount": stripe.Discount,
    "dispute": stripe.Dispute,
    "event": stripe.Event,
    "invoice": stripe.Invoice,
    "invoice_payment": stripe.InvoicePayment,
    "line_item": stripe.InvoiceLineItem,
    "payment_intent": stripe.PaymentIntent,
    "payout": stripe.Payout,
    "price": stripe.Price,
    "product": stripe.Product,
    "refund": stripe.Refund,
    "subscription": stripe.Subscription,
    "subscription_item": stripe.SubscriptionItem,
}


def declared_fields(cls: type[Any]) -> set[str]:
    names = inspect.get_annotations(cls)
    return {k for k in names if not k.startswith("_")} - {"OBJECT_NAME"}


def busy_world() -> World:
    """A world that has been through every action once."""
    w = World(seed=7)
    gbp = w.one_off(1000, "gbp", email="ada@example.org", campaign="spring")
    usd = w.one_off(2500, "usd", via="payment_intent", email="bob@example.org")
    w.one_off(3000, "jpy", email="chie@example.org")
    w.failed_payment(500, "gbp", email="dan@example.org")
    w.async_checkout(1500, "eur", True, email="eve@example.org")
    w.async_checkout(1500, "gbp", False, email="fay@example.org")
    sub = w.subscribe(500, "gbp", campaign="spring", founding=True, email="gus@example.org")
    w.renew(sub.subscription)
    w.change_amount(sub.subscription, 800)
    w.fail_renewal(sub.subscription)
    w.retry_renewal(sub.subscription)
    other = w.subscribe(1200, "usd", "year", email="hal@example.org")
    w.pause(other.subscription)
    w.resume(other.subscription)
    w.cancel(other.subscription, at_period_end=True)
    w.renew(other.subscription)
    first = w.refund(gbp.charge, 300)
    w.refund(gbp.charge, 200)
    w.fail_refund(first.refund)
    w.dispute(usd.charge, "won")
    w.payout()
    return w


# -- signing ---------------------------------------------------------------------------------


def test_signature_is_accepted_by_the_stripe_library() -> None:
    body = json.dumps(o.event("charge.succeeded", {"id": "ch_1"}, created=1)).encode()
    header = sign(body, SECRET, timestamp=1_795_000_000)
    assert header.startswith("t=1795000000,v1=")
    stripe.WebhookSignature.verify_header(body.decode(), header, SECRET, tolerance=None)


def test_signature_of_a_tampered_body_is_rejected() -> None:
    body, headers = signed_request(o.event("charge.succeeded", {"id": "ch_1"}, created=1), SECRET)
    tampered = body.replace(b"ch_1", b"ch_2")
    with pytest.raises(stripe.SignatureVerificationError):
        stripe.WebhookSignature.verify_header(
            tampered.decode(), headers["Stripe-Signature"], SECRET, tolerance=300
        )


def test_signature_with_the_wrong_secret_is_rejected() -> None:
    body = b'{"id": "evt_1"}'
    with pytest.raises(stripe.SignatureVerificationError):
        stripe.WebhookSignature.verify_header(
            body.decode(), sign(body, "whsec_other"), SECRET, tolerance=300
        )


# -- shapes ----------------------------------------------------------------------------------


def test_every_object_has_exactly_the_fields_the_library_declares() -> None:
    w = busy_world()
    seen: set[str] = set()
    candidates = list(w.objects.values()) + list(w.events)
    for ev in w.events:
        candidates.append(ev["data"]["object"])
    for obj in list(candidates):
        if obj.get("object") == "invoice":
            candidates.extend(obj["lines"]["data"])
        if obj.get("object") == "subscription":
            candidates.extend(obj["items"]["data"])
    for obj in candidates:
        kind = obj["object"]
        expected = declared_fields(RESOURCES[kind]) - o.ABSENT_FIELDS.get(kind, frozenset())
        assert set(obj) == expected, (kind, set(obj) ^ expected)
        seen.add(kind)
    assert seen == set(RESOURCES)


def test_invoices_name_their_subscription_only_through_parent() -> None:
    w = World()
    sub = w.subscribe(500, "gbp", campaign="spring")
    inv = w.get(sub.invoice)
    for gone in ("subscription", "charge", "payment_intent"):
        assert gone not in inv
    assert inv["parent"]["type"] == "subscription_details"
    assert inv["parent"]["subscription_details"]["subscription"] == sub.subscription
    assert inv["parent"]["subscription_details"]["metadata"] == {"campaign": "spring"}
    payment = w.get(sub.invoice_payment or "")
    assert payment["payment"] == {"payment_intent": sub.payment_intent, "type": "payment_intent"}
    assert payment["status"] == "paid"


def test_library_parses_events_into_typed_objects() -> None:
    w = World()
    sub = w.subscribe(500, "gbp", founding=True, campaign="spring")
    paid = next(e for e in sub if e["type"] == "invoice.paid")
    ev = stripe.Event.construct_from(paid, "sk_test_x")
    inv = ev.data.object
    assert inv.parent.subscription_details.subscription == sub.subscription
    item = w.get(sub.subscription)["items"]["data"][0]
    assert item["current_period_end"] > item["current_period_start"]
    assert item["price"]["recurring"]["interval"] == "month"


def test_event_has_previous_attributes_only_when_given() -> None:
    plain = o.event("charge.succeeded", {"id": "ch_1"}, created=5)
    assert "previous_attributes" not in plain["data"]
    assert plain["api_version"] == o.API_VERSION
    updated = o.event("charge.updated", {"id": "ch_1"}, created=5, previous_attributes={"a": 1})
    assert updated["data"]["previous_attributes"] == {"a": 1}


def test_same_seed_gives_the_same_events() -> None:
    def run(seed: int) -> str:
        w = World(seed=seed)
        w.one_off(1000, "gbp")
        w.subscribe(500, "eur")
        return json.dumps(w.events)

    assert run(3) == run(3)
    assert run(3) != run(4)


# -- simulator invariants --------------------------------------------------------------------


def test_event_times_never_go_backwards_and_ids_are_unique() -> None:
    w = busy_world()
    created = [e["created"] for e in w.events]
    assert created == sorted(created)
    assert len(set(created)) < len(created)  # some events share a second, as Stripe's do
    assert len({e["id"] for e in w.events}) == len(w.events)


def test_every_succeeded_charge_has_a_balance_transaction_in_settlement_currency() -> None:
    w = busy_world()
    charges = [c for c in w.objects.values() if c["object"] == "charge"]
    assert any(c["status"] == "failed" for c in charges)
    for ch in charges:
        if ch["status"] != "succeeded":
            assert ch["balance_transaction"] is None
            continue
        bt = w.balance_transactions[ch["balance_transaction"]]
        settled, rate = w.settle(ch["amount"], ch["currency"])
        assert (bt["amount"], bt["currency"], bt["exchange_rate"]) == (settled, "gbp", rate)
        assert bt["fee"] == w.processing_fee(settled)
        assert bt["net"] == bt["amount"] - bt["fee"]
        assert bt["source"] == ch["id"]


def test_charge_balance_transaction_arrives_in_charge_updated() -> None:
    w = World()
    p = w.one_off(1000, "usd")
    succeeded = p.of_type("charge.succeeded")[0]["data"]["object"]
    updated = p.of_type("charge.updated")[0]["data"]
    assert succeeded["balance_transaction"] is None
    assert updated["object"]["balance_transaction"] == p.balance_transaction
    assert updated["previous_attributes"] == {"balance_transaction": None}
    bt = w.balance_transactions[p.balance_transaction or ""]
    assert (bt["amount"], bt["fee"], bt["exchange_rate"]) == (800, 32, 0.8)


def test_one_off_checkout_puts_campaign_on_session_intent_and_charge() -> None:
    w = World()
    p = w.one_off(1000, "gbp", email="ada@example.org", campaign="spring")
    assert p.types == [
        "payment_intent.created",
        "charge.succeeded",
        "payment_intent.succeeded",
        "checkout.session.completed",
        "charge.updated",
    ]
    session = p.of_type("checkout.session.completed")[0]["data"]["object"]
    assert session["metadata"] == {"campaign": "spring"}
    assert session["payment_intent"] == p.payment_intent
    assert session["customer_details"]["email"] == "ada@example.org"
    assert w.get(p.payment_intent)["metadata"] == {"campaign": "spring"}
    assert w.get(p.charge)["metadata"] == {"campaign": "spring"}


def test_refunded_amount_is_the_sum_of_live_refunds() -> None:
    w = busy_world()
    for ch_id, refund_ids in w.refunds_by_charge.items():
        live = [w.get(r) for r in refund_ids if w.get(r)["status"] not in ("failed", "canceled")]
        ch = w.get(ch_id)
        assert ch["amount_refunded"] == sum(r["amount"] for r in live)
        assert ch["refunded"] == (ch["amount_refunded"] == ch["amount"])


def test_refund_events_and_failed_refund_restore_the_charge() -> None:
    w = World()
    p = w.one_off(1000, "gbp")
    r = w.refund(p.charge, 400)
    assert r.types == ["refund.created", "charge.refunded", "refund.updated"]
    assert r[1]["data"]["object"]["amount_refunded"] == 400
    assert r[1]["data"]["previous_attributes"] == {"amount_refunded": 0}
    assert w.balance_transactions[r.balance_transaction or ""]["amount"] == -400
    full = w.refund(p.charge)
    assert w.get(full.refund)["amount"] == 600
    assert w.get(p.charge)["refunded"] is True
    with pytest.raises(ValueError, match="cannot refund"):
        w.refund(p.charge, 1)
    failed = w.fail_refund(r.refund)
    assert failed.types == [
        "refund.updated",
        "charge.refund.updated",
        "refund.failed",
        "charge.updated",
    ]
    assert w.get(p.charge)["amount_refunded"] == 600
    assert w.get(p.charge)["refunded"] is False
    assert w.balance_transactions[failed.balance_transaction or ""]["amount"] == 400


def test_dispute_embeds_its_balance_transactions() -> None:
    w = World()
    p = w.one_off(2000, "gbp")
    won = w.dispute(p.charge, "won")
    assert won.types == [
        "charge.dispute.created",
        "charge.dispute.funds_withdrawn",
        "charge.dispute.updated",
        "charge.dispute.closed",
        "charge.dispute.funds_reinstated",
    ]
    final = won[-1]["data"]["object"]
    assert final["status"] == "won"
    embedded = final["balance_transactions"]
    assert [bt["id"] for bt in embedded] == won.balance_transactions
    assert embedded == [w.balance_transactions[i] for i in won.balance_transactions]
    assert [bt["reporting_category"] for bt in embedded] == ["dispute", "dispute_reversal"]
    assert sum(bt["net"] for bt in embedded) == -w.dispute_fee
    lost = w.dispute(w.one_off(900, "gbp").charge, "lost")
    assert lost.types[-1] == "charge.dispute.closed"
    assert lost[-1]["data"]["object"]["status"] == "lost"


def test_founding_subscription_is_discounted() -> None:
    w = World(founding_percent_off=50)
    sub = w.subscribe(1000, "gbp", founding=True, email="gus@example.org")
    s = w.get(sub.subscription)
    assert s["discounts"] == [sub.discount]
    assert w.get(sub.discount or "")["source"] == {"coupon": "founding-supporter", "type": "coupon"}
    inv = w.get(sub.invoice)
    assert (inv["subtotal"], inv["total"], inv["amount_paid"]) == (1000, 500, 500)
    assert w.get(sub.charge or "")["amount"] == 500
    renewal = w.renew(sub.subscription)
    assert w.get(renewal.invoice)["amount_paid"] == 500
    assert w.get(renewal.invoice)["billing_reason"] == "subscription_cycle"


def test_subscription_lifecycle_statuses() -> None:
    w = World()
    sub = w.subscribe(500, "gbp")
    assert w.get(sub.subscription)["status"] == "active"
    failed = w.fail_renewal(sub.subscription)
    assert failed.types[-2:] == ["invoice.payment_failed", "customer.subscription.updated"]
    assert w.get(sub.subscription)["status"] == "past_due"
    assert w.get(failed.invoice)["status"] == "open"
    w.retry_renewal(sub.subscription)
    assert w.get(sub.subscription)["status"] == "active"
    assert w.get(failed.invoice)["status"] == "paid"
    ending = w.cancel(sub.subscription, at_period_end=True)
    assert ending[0]["data"]["object"]["cancel_at_period_end"] is True
    assert w.renew(sub.subscription).types == ["customer.subscription.deleted"]
    assert w.get(sub.subscription)["status"] == "canceled"


def test_payout_pays_out_its_balance_transactions() -> None:
    w = World()
    w.one_off(1000, "gbp")
    w.one_off(2000, "eur")
    po = w.payout()
    payout = w.get(po.payout)
    assert po.types == ["payout.created", "payout.paid", "payout.reconciliation_completed"]
    events = {e["type"]: e["data"]["object"] for e in w.events if e["type"].startswith("payout.")}
    assert [events[t]["reconciliation_status"] for t in po.types] == [
        "in_progress", "in_progress", "completed"]
    members = [w.balance_transactions[i] for i in po.balance_transactions]
    assert payout["amount"] == sum(bt["net"] for bt in members if bt["type"] != "payout")
    assert w.balance_transactions[payout["balance_transaction"]]["amount"] == -payout["amount"]
    assert all(bt["status"] == "available" for bt in members)


# -- form parsing ----------------------------------------------------------------------------


def test_parse_form_understands_stripe_bracket_notation() -> None:
    pairs = [
        ("mode", "payment"),
        ("metadata[campaign]", "spring"),
        ("expand[]", "discounts"),
        ("expand[]", "latest_invoice"),
        ("line_items[0][price_data][unit_amount]", "500"),
        ("line_items[0][quantity]", "1"),
        ("line_items[1][price]", "price_1"),
        ("payment_method_types[0]", "card"),
    ]
    assert parse_form(pairs) == {
        "mode": "payment",
        "metadata": {"campaign": "spring"},
        "expand": ["discounts", "latest_invoice"],
        "line_items": [
            {"price_data": {"unit_amount": "500"}, "quantity": "1"},
            {"price": "price_1"},
        ],
        "payment_method_types": ["card"],
    }


# -- server, through the real stripe library -------------------------------------------------


@asynccontextmanager
async def stripe_client(
    fake: FakeStripe, key: str = "sk_test_x", retries: int = 0
) -> AsyncIterator[stripe.StripeClient]:
    # Our own session, closed here: the library leaves a session it was given open.
    async with aiohttp.ClientSession() as session:
        yield stripe.StripeClient(
            key,
            base_addresses={"api": fake.base_url},
            http_client=stripe.AIOHTTPClient(session=session),
            max_network_retries=retries,
        )


@pytest.mark.asyncio
async def test_library_retrieves_a_balance_transaction() -> None:
    w = World()
    p = w.one_off(1000, "jpy")
    async with running_fake_stripe(w) as fake, stripe_client(fake) as client:
        bt = await client.v1.balance_transactions.retrieve_async(p.balance_transaction or "")
        assert (bt.amount, bt.fee, bt.net, bt.currency) == (500, 28, 472, "gbp")
        assert bt.exchange_rate == 0.005
        ch = await client.v1.charges.retrieve_async(
            p.charge, params={"expand": ["balance_transaction"]}
        )
        assert isinstance(ch.balance_transaction, stripe.BalanceTransaction)
        assert ch.balance_transaction.fee == 28
    [_, charge_request] = fake.requests
    assert charge_request.query == {"expand": ["balance_transaction"]}
    assert charge_request.headers["Authorization"] == "Bearer sk_test_x"


@pytest.mark.asyncio
async def test_library_auto_paginates_a_payout_s_transactions() -> None:
    w = World()
    for amount in (1000, 1100, 1200, 1300, 1400):
        w.one_off(amount, "gbp")
    po = w.payout()
    w.one_off(999, "gbp")  # after the payout: not in it
    async with running_fake_stripe(w) as fake, stripe_client(fake) as client:
        page = await client.v1.balance_transactions.list_async(
            params={"payout": po.payout, "limit": 2}
        )
        seen = [bt.id async for bt in page.auto_paging_iter()]
    assert sorted(seen) == sorted(po.balance_transactions)
    assert len(fake.requests_to("/v1/balance_transactions")) == 3
    assert fake.requests[1].query["starting_after"] == seen[1]


@pytest.mark.asyncio
async def test_a_listing_s_pages_follow_its_first_and_a_new_listing_sees_changes() -> None:
    """The fake keeps a listing between its pages (a page costs a page, as Stripe's do, not a
    scan of every object): its later pages are the list its first page saw; a new listing (a
    first page) sees what changed since."""
    w = World()
    for amount in (1000, 1100, 1200):
        w.one_off(amount, "gbp")
    async with running_fake_stripe(w) as fake, stripe_client(fake) as client:
        first = await client.v1.balance_transactions.list_async(
            params={"type": "charge", "limit": 1})
        newest = first.data[0].id
        w.balance_transactions[newest]["type"] = "payment"
        w.balance_transactions[next(iter(w.balance_transactions))]["type"] = "payment"
        rest = await client.v1.balance_transactions.list_async(
            params={"type": "charge", "limit": 10, "starting_after": newest})
        again = await client.v1.balance_transactions.list_async(
            params={"type": "charge", "limit": 10})
    charges = [i for i, bt in w.balance_transactions.items() if bt["source"].startswith("ch_")]
    assert [bt.id for bt in rest.data] == charges[::-1][1:]  # as the listing began
    assert [bt.id for bt in again.data] == charges[1:2]  # the one still a `charge`


@pytest.mark.asyncio
async def test_library_lists_events_newest_first_since_a_time() -> None:
    w = World()
    w.one_off(1000, "gbp")
    since = w.now + 1
    later = w.one_off(2000, "gbp")
    async with running_fake_stripe(w) as fake, stripe_client(fake) as client:
        page = await client.v1.events.list_async(params={"created": {"gte": since}, "limit": 100})
    assert [e.id for e in page.data] == [e["id"] for e in reversed(later.events)]
    assert page.has_more is False


@pytest.mark.asyncio
async def test_library_expands_subscription_discounts() -> None:
    w = World()
    sub = w.subscribe(1000, "gbp", founding=True)
    async with running_fake_stripe(w) as fake, stripe_client(fake) as client:
        plain = await client.v1.subscriptions.retrieve_async(sub.subscription)
        expanded = await client.v1.subscriptions.retrieve_async(
            sub.subscription, params={"expand": ["discounts"]}
        )
    assert plain.discounts == [sub.discount]
    [discount] = expanded.discounts
    assert isinstance(discount, stripe.Discount)
    assert discount.source.coupon == "founding-supporter"


@pytest.mark.asyncio
async def test_a_coupon_s_currency_options_come_only_when_expanded() -> None:
    """Stripe includes an amount-off coupon's `currency_options` only when a request expands
    them: never in its events, nor in a plain retrieve."""
    w = World()
    created = w.create_coupon("promo", amount_off=300, currency="gbp",
                              currency_options={"jpy": 100})
    assert "currency_options" not in created.events[0]["data"]["object"]
    async with running_fake_stripe(w) as fake, stripe_client(fake) as client:
        plain = await client.v1.coupons.retrieve_async("promo")
        expanded = await client.v1.coupons.retrieve_async(
            "promo", params={"expand": ["currency_options"]})
    assert "currency_options" not in plain
    assert expanded["currency_options"]["jpy"]["amount_off"] == 100


@pytest.mark.asyncio
async def test_a_list_parameter_stripe_does_not_take_is_refused() -> None:
    """As Stripe answers one (`status` is no filter of charges): a typo in a listing's
    parameters fails in the tests as it would in production, instead of filtering nothing."""
    params: Any = {"status": "succeeded"}  # (not a parameter the library's types know either)
    async with running_fake_stripe(World()) as fake, stripe_client(fake) as client:
        with pytest.raises(stripe.InvalidRequestError) as info:
            await client.v1.charges.list_async(params=params)
    assert info.value.http_status == 400
    assert info.value.param == "status"


@pytest.mark.asyncio
async def test_unknown_id_raises_invalid_request_error() -> None:
    async with running_fake_stripe(World()) as fake, stripe_client(fake) as client:
        with pytest.raises(stripe.InvalidRequestError) as info:
            await client.v1.payouts.retrieve_async("po_missing")
    assert info.value.http_status == 404
    assert info.value.code == "resource_missing"
    assert "po_missing" in str(info.value.user_message)


@pytest.mark.asyncio
async def test_bad_key_raises_authentication_error() -> None:
    async with running_fake_stripe(World()) as fake, stripe_client(fake, "sk_live_x") as client:
        with pytest.raises(stripe.AuthenticationError):
            await client.v1.balance_transactions.list_async()


@pytest.mark.asyncio
async def test_server_error_is_retried_by_the_library() -> None:
    w = World()
    p = w.one_off(1000, "gbp")
    async with running_fake_stripe(w) as fake, stripe_client(fake, retries=2) as client:
        fake.fail_next(1, 500, path_prefix="/v1/charges")
        ch = await client.v1.charges.retrieve_async(p.charge)
    assert ch.id == p.charge
    assert [r.path for r in fake.requests] == [f"/v1/charges/{p.charge}"] * 2


@pytest.mark.asyncio
async def test_a_500_of_a_post_is_answered_again_to_a_retry_with_its_key() -> None:
    """Stripe saves the result of a POST that began executing under its Idempotency-Key and
    answers it again to every retry with the key, "including 500 errors" (docs.stripe.com,
    Idempotent requests): the library's retry gets the same 500; a new key is a new request."""
    w = World()
    async with running_fake_stripe(w) as fake, stripe_client(fake, retries=2) as client:
        fake.fail_next(1, 500, path_prefix="/v1/products")
        with pytest.raises(stripe.APIError):
            await client.v1.products.create_async({"name": "Support"},
                                                  {"idempotency_key": "product-1"})
        made = await client.v1.products.create_async({"name": "Support"},
                                                     {"idempotency_key": "product-2"})
    assert made.name == "Support"
    assert [r.headers["Idempotency-Key"] for r in fake.requests] == [
        "product-1", "product-1", "product-1", "product-2"]


@pytest.mark.asyncio
async def test_rate_limit_is_raised_unless_stripe_says_retry() -> None:
    w = World()
    p = w.one_off(1000, "gbp")
    async with running_fake_stripe(w) as fake, stripe_client(fake, retries=2) as client:
        fake.fail_next(1, 429)
        with pytest.raises(stripe.RateLimitError):
            await client.v1.charges.retrieve_async(p.charge)
        fake.fail_next(1, 429, should_retry=True)
        assert (await client.v1.charges.retrieve_async(p.charge)).id == p.charge
    assert len(fake.requests) == 3


def test_a_bank_debit_books_payment_and_payment_refund_transactions() -> None:
    """stripe/_balance_transaction.py `type`: a card's charge and refund are `charge` and
    `refund`; a bank debit's (Bacs, SEPA) `payment` and `payment_refund`, of the same
    reporting categories."""
    w = World()
    card = w.one_off(1000, "gbp")
    w.refund(str(card.charge), 400)
    debit = w.async_checkout(2000, "gbp", succeed=True)
    debit_charge = next(o for o in w.objects.values() if o.get("object") == "charge"
                        and o["payment_method_details"]["type"] != "card")
    w.refund(debit_charge["id"], 500)
    kinds = sorted({(bt["type"], bt["reporting_category"], w.objects[bt["source"]]["object"],
                     bt["source"] in (card.charge, debit_charge["id"]))
                    for bt in w.balance_transactions.values()})
    assert kinds == [("charge", "charge", "charge", True), ("payment", "charge", "charge", True),
                     ("payment_refund", "refund", "refund", False),
                     ("refund", "refund", "refund", False)], (kinds, debit)
