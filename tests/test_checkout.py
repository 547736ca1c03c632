"""Checkout for the site's forms, through the real stripe library against the fake Stripe: what
reached Stripe, what the form is answered, and the ledger once Stripe's webhooks come back."""

from __future__ import annotations

import asyncio
import hashlib
import json
import socket
import time
from typing import Any

import asyncpg
import pytest
from aiohttp import web
from aiohttp.test_utils import make_mocked_request
from pytest_aiohttp import AiohttpClient

from donations import db, idempotency, ratelimit, stripe_api
from donations.app import create_app
from donations.events import PINNED_API_VERSION
from donations.settings import Secret
from tests.checkout_helpers import (
    SESSIONS,
    SITE,
    TEST_KEY,
    add_campaign,
    checkout_service,
    created_sessions,
    order,
    sessions_in,
    stripe_keys,
    subscription,
)
from tests.conftest import Client, make_settings
from tests.fakestripe.world import World
from tests.webhook_helpers import post_all

CONTRIBUTIONS = "/v1/checkout/contributions"
SUBSCRIPTIONS = "/v1/checkout/subscriptions"


async def test_a_contribution_is_a_payment_session_carrying_campaign_and_metadata(
    pool: asyncpg.Pool, dsn: str, aiohttp_client: AiohttpClient
) -> None:
    await add_campaign(pool, "winter-appeal")
    world = World(seed=41)
    async with checkout_service(aiohttp_client, dsn, world) as (client, fake):
        before = int(time.time())
        response = await client.post(CONTRIBUTIONS, json=order(
            email="jane.doe@example.org", campaign="winter-appeal",
            metadata={"referrer": "newsletter", "variant": "b"}))
        body = await response.json()
        assert response.status == 201, body
        [sent] = created_sessions(fake)
        [session] = sessions_in(world)

    assert body == {
        "id": session["id"], "url": session["url"],
        "expires_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(session["expires_at"])),
        "amount": {"amount": 2500, "currency": "gbp"}, "campaign": "winter-appeal",
    }
    assert body["url"].startswith("https://checkout.stripe.com/")
    form = sent.form
    metadata = {"referrer": "newsletter", "variant": "b", "campaign": "winter-appeal"}
    assert form["mode"] == "payment"
    assert form["submit_type"] == "donate"
    assert form["line_items"] == [{"quantity": "1", "price_data": {
        "currency": "gbp", "unit_amount": "2500", "product": "donations-one-off"}}]
    assert form["metadata"] == metadata
    assert form["payment_intent_data"] == {"metadata": metadata}
    assert "subscription_data" not in form and "discounts" not in form
    assert form["customer_email"] == "jane.doe@example.org"
    assert form["success_url"] == f"{SITE}/thanks?session_id={{CHECKOUT_SESSION_ID}}"
    assert form["cancel_url"] == f"{SITE}/support"
    # Stripe's own floor is 30 minutes after it creates the session
    assert before + 1800 < int(form["expires_at"]) <= int(time.time()) + 31 * 60
    assert sent.headers["Authorization"] == "Bearer sk_test_donations_checkout"
    # through the StripeClient: the pinned API version, and a key of its own for a request
    # without one so that the library's retries cannot make two sessions
    assert sent.headers["Stripe-Version"] == PINNED_API_VERSION
    assert sent.headers["Idempotency-Key"]


async def test_a_subscription_is_monthly_or_yearly_and_carries_metadata_on_the_subscription(
    pool: asyncpg.Pool, dsn: str, aiohttp_client: AiohttpClient
) -> None:
    async with checkout_service(aiohttp_client, dsn, founding_seats=0) as (client, fake):
        monthly = await client.post(SUBSCRIPTIONS, json=subscription(
            metadata={"referrer": "homepage"}))
        yearly = await client.post(SUBSCRIPTIONS, json=subscription(
            amount=10000, currency="gbp", interval="year"))
        assert (monthly.status, yearly.status) == (201, 201)
        month_form, year_form = (r.form for r in created_sessions(fake))

    assert (await monthly.json())["founding_discount"] is False
    assert (await yearly.json())["interval"] == "year"
    assert month_form["mode"] == "subscription"
    assert month_form["line_items"][0]["price_data"] == {
        "currency": "gbp", "unit_amount": "1000", "product": "donations-recurring",
        "recurring": {"interval": "month"}}
    assert year_form["line_items"][0]["price_data"]["recurring"] == {"interval": "year"}
    assert month_form["subscription_data"] == {"metadata": {"referrer": "homepage"}}
    assert "payment_intent_data" not in month_form and "submit_type" not in month_form
    assert "discounts" not in month_form


async def test_completed_checkouts_land_in_the_ledger_with_their_campaign(
    pool: asyncpg.Pool, dsn: str, aiohttp_client: AiohttpClient
) -> None:
    await add_campaign(pool, "spring")
    world = World(seed=42)
    async with checkout_service(aiohttp_client, dsn, world) as (client, _fake):
        one_off = await (await client.post(CONTRIBUTIONS, json=order(
            campaign="spring", email="ann@example.org", metadata={"referrer": "x"}))).json()
        monthly = await (await client.post(SUBSCRIPTIONS, json=subscription(
            campaign="spring", amount=1200))).json()
        assert monthly["founding_discount"] is True
        paid = world.complete_checkout(one_off["id"])
        started = world.complete_checkout(monthly["id"], email="bob@example.org")
        await post_all(client, [*paid, *started])

    payments = {r["checkout_session"] or r["invoice"]: dict(r)
                for r in await pool.fetch("SELECT * FROM payments")}
    assert len(payments) == 2
    single = next(p for p in payments.values() if p["kind"] == "one_off")
    assert (single["status"], single["amount"], single["currency"]) == ("succeeded", 2500, "gbp")
    assert single["checkout_session"] == one_off["id"]
    assert single["campaign"] == "spring"
    assert single["metadata"]["referrer"] == "x"
    recurring = next(p for p in payments.values() if p["kind"] == "recurring")
    assert (recurring["status"], recurring["amount"], recurring["campaign"]) == (
        "succeeded", 600, "spring")  # the founding 50% off £12
    sub = await pool.fetchrow("SELECT * FROM subscriptions")
    assert sub is not None
    assert (sub["campaign"], sub["founding"], sub["amount"], sub["interval"]) == (
        "spring", True, 1200, "month")
    session = await pool.fetchval(
        "SELECT data->>'status' FROM stripe_objects WHERE id = $1", monthly["id"])
    assert session == "complete"


async def test_the_same_idempotency_key_gives_the_same_answer_and_one_session(
    pool: asyncpg.Pool, dsn: str, aiohttp_client: AiohttpClient
) -> None:
    world = World(seed=43)
    headers = {"Idempotency-Key": "4a1c7e7e-2b6d-4c1e-9a63-2f1b2f6b9d10"}
    async with checkout_service(aiohttp_client, dsn, world) as (client, fake):
        first = await client.post(SUBSCRIPTIONS, json=subscription(), headers=headers)
        # the same body, spelled differently: same request
        again = await client.post(
            SUBSCRIPTIONS, headers={**headers, "Content-Type": "application/json"},
            data=b'{"interval": "month", "currency": "gbp", "amount": 1000, '
                 b'"cancel_url": "https://news.example.org/support", '
                 b'"success_url": "https://news.example.org/thanks?session_id='
                 b'{CHECKOUT_SESSION_ID}"}')
        other = await client.post(SUBSCRIPTIONS, json=subscription(amount=1500), headers=headers)
        elsewhere = await client.post(CONTRIBUTIONS, json=order(), headers=headers)
        bad_key = await client.post(SUBSCRIPTIONS, json=subscription(),
                                    headers={"Idempotency-Key": "has spaces"})
        sent = created_sessions(fake)

    assert (first.status, again.status) == (201, 201)
    assert await first.json() == await again.json()
    assert again.headers["Idempotent-Replayed"] == "true"
    assert len(sessions_in(world)) == 1 and len(sent) == 1
    assert stripe_keys(sent) == [f"checkout:{headers['Idempotency-Key']}"]
    for refused in (other, elsewhere):
        assert refused.status == 409
        error = (await refused.json())["error"]
        assert (error["code"], error["field"]) == ("idempotency_key_reused", "Idempotency-Key")
    assert bad_key.status == 400
    # the replay holds no second seat
    assert await pool.fetchval("SELECT count(*) FROM founding_holds") == 1


async def test_a_key_being_served_is_409_until_stale_and_refused_requests_claim_no_key(
    pool: asyncpg.Pool, dsn: str, aiohttp_client: AiohttpClient
) -> None:
    await add_campaign(pool, "spring")
    async with checkout_service(aiohttp_client, dsn, checkout_rate_per_ip=5) as (client, fake):
        # a request with an unknown campaign, or one over the rate limit, claims no key: the
        # same key then serves the corrected request
        unknown = await client.post(CONTRIBUTIONS, json=order(campaign="nowhere"),
                                    headers={"Idempotency-Key": "k-campaign"})
        corrected = await client.post(CONTRIBUTIONS, json=order(campaign="spring"),
                                      headers={"Idempotency-Key": "k-campaign"})
        first = await client.post(CONTRIBUTIONS, json=order(), headers={"Idempotency-Key": "k1"})
        # as if the process serving k1 were still at it, then as if it had died 3 minutes ago
        await pool.execute("UPDATE checkout_requests SET state = 'pending', response = NULL,"
                           " checkout_session = NULL WHERE idempotency_key = 'k1'")
        busy = await client.post(CONTRIBUTIONS, json=order(), headers={"Idempotency-Key": "k1"})
        await pool.execute("UPDATE checkout_requests SET claimed_at = now() - interval '3 min'"
                           " WHERE idempotency_key = 'k1'")
        taken_over = await client.post(CONTRIBUTIONS, json=order(),
                                       headers={"Idempotency-Key": "k1"})
        limited = await client.post(CONTRIBUTIONS, json=order(),
                                    headers={"Idempotency-Key": "k-limited"})
        keys = stripe_keys(created_sessions(fake))

    assert unknown.status == 422
    assert (await unknown.json())["error"]["code"] == "unknown_campaign"
    assert (corrected.status, (await corrected.json())["campaign"]) == (201, "spring")
    assert first.status == 201
    assert busy.status == 409
    assert (await busy.json())["error"]["code"] == "request_in_progress"
    assert busy.headers["Retry-After"] == "1"
    assert taken_over.status == 201
    assert (await taken_over.json())["id"] != (await first.json())["id"]
    assert limited.status == 429
    assert keys == ["checkout:k-campaign", "checkout:k1", "checkout:k1:2"]
    rows = await pool.fetch("SELECT idempotency_key, state, attempts FROM checkout_requests"
                            " ORDER BY idempotency_key")
    assert [tuple(r) for r in rows] == [("k-campaign", "done", 1), ("k1", "done", 2)]


async def test_a_failed_stripe_call_frees_the_seat_and_the_key_for_a_retry(
    pool: asyncpg.Pool, dsn: str, aiohttp_client: AiohttpClient
) -> None:
    headers = {"Idempotency-Key": "retry-me"}
    async with checkout_service(aiohttp_client, dsn, founding_seats=1) as (client, fake):
        fake.fail_next(1, 500, SESSIONS, should_retry=False)
        failed = await client.post(SUBSCRIPTIONS, json=subscription(), headers=headers)
        assert failed.status == 503
        assert (await failed.json())["error"]["code"] == "stripe_unavailable"
        assert failed.headers["Retry-After"] == "5"
        assert await pool.fetchval("SELECT count(*) FROM founding_holds") == 0
        state = await pool.fetchval("SELECT state FROM checkout_requests")
        assert state == "failed"

        retried = await client.post(SUBSCRIPTIONS, json=subscription(), headers=headers)
        assert retried.status == 201
        assert (await retried.json())["founding_discount"] is True
        keys = stripe_keys(created_sessions(fake))
    # a new Stripe key for the new try: Stripe keeps a key's first result, errors included
    assert keys == ["checkout:retry-me", "checkout:retry-me:2"]
    assert await pool.fetchval("SELECT count(*) FROM founding_holds") == 1


async def test_readers_keys_never_share_a_stripe_key_whatever_they_hold(
    dsn: str, aiohttp_client: AiohttpClient
) -> None:
    """The key Stripe gets is the reader's key and the try: a reader's key `k:2` and the second
    try of another's `k` (or `k:full-price` and `k`'s try at full price) must not be one key at
    Stripe, which would answer the second with the first's session."""
    async with checkout_service(aiohttp_client, dsn) as (client, fake):
        first = await client.post(CONTRIBUTIONS, json=order(),
                                  headers={"Idempotency-Key": "k:2"})
        assert first.status == 201
        fake.fail_next(1, 500, SESSIONS, should_retry=False)
        failed = await client.post(CONTRIBUTIONS, json=order(),
                                   headers={"Idempotency-Key": "k"})
        assert failed.status == 503
        second = await client.post(CONTRIBUTIONS, json=order(),
                                   headers={"Idempotency-Key": "k"})
        assert second.status == 201
        keys = stripe_keys(created_sessions(fake))
    assert (await first.json())["id"] != (await second.json())["id"]
    assert keys == ["checkout:k%3A2", "checkout:k", "checkout:k:2"]
    assert len(set(keys)) == 3


def test_stripe_keys_keep_the_reader_s_key_apart_from_what_follows_it() -> None:
    keys = {  # (claimed at 1795000000)
        ("k", 1, False): "checkout:k:1795000000",
        ("k", 2, False): "checkout:k:1795000000:2",
        ("k:2", 1, False): "checkout:k%3A2:1795000000",
        ("k", 1, True): "checkout:k:1795000000:full-price",
        ("k:full-price", 1, False): "checkout:k%3Afull-price:1795000000",
        ("k%3A2", 1, False): "checkout:k%253A2:1795000000",
        ("k", 3, True): "checkout:k:1795000000:3:full-price",
    }
    for (key, attempt, full_price), expected in keys.items():
        assert idempotency.stripe_key(key, 1_795_000_000, attempt,
                                      full_price=full_price) == expected
    assert len(set(keys.values())) == len(keys)


async def test_a_key_too_long_for_stripe_once_escaped_is_sent_as_its_hash(
    dsn: str, aiohttp_client: AiohttpClient
) -> None:
    """A valid Idempotency-Key (up to 200 characters) with many `:` or `%` grows past Stripe's
    255 characters once escaped (which Stripe refuses, every try): it goes as its SHA-256 under
    a prefix no escaped key has, and its second try gets a key of its own as ever."""
    key = ("order:" * 34)[:200]  # 33 of them ':'
    digest = hashlib.sha256(key.encode()).hexdigest()
    assert idempotency.stripe_key(key, 1_795_000_000, 2, full_price=True) == \
        f"checkout-sha256:{digest}:1795000000:2:full-price"
    async with checkout_service(aiohttp_client, dsn) as (client, fake):
        response = await client.post(CONTRIBUTIONS, json=order(),
                                     headers={"Idempotency-Key": key})
        assert response.status == 201, await response.text()
        [sent] = created_sessions(fake)
    assert stripe_keys([sent]) == [f"checkout-sha256:{digest}"]


async def test_a_failed_seat_hold_frees_the_key_for_a_retry(
    pool: asyncpg.Pool, dsn: str, aiohttp_client: AiohttpClient
) -> None:
    headers = {"Idempotency-Key": "hold-failed"}
    async with checkout_service(aiohttp_client, dsn, founding_seats=1) as (client, fake):
        await pool.execute("ALTER FUNCTION founding_seat_hold(bigint, timestamptz, text, bigint,"
                           " text, text, bigint)"
                           " RENAME TO founding_seat_hold_away")
        try:
            failed = await client.post(SUBSCRIPTIONS, json=subscription(), headers=headers)
        finally:
            await pool.execute("ALTER FUNCTION founding_seat_hold_away RENAME TO"
                               " founding_seat_hold")  # (its argument types are its own)
        state = await pool.fetchval("SELECT state FROM checkout_requests")
        retried = await client.post(SUBSCRIPTIONS, json=subscription(), headers=headers)
        keys = stripe_keys(created_sessions(fake))
    assert failed.status == 500
    assert state == "failed"
    assert retried.status == 201
    assert (await retried.json())["founding_discount"] is True
    assert keys == ["checkout:hold-failed:2"]


async def test_stripe_failures_are_clear_502_and_503_answers(
    pool: asyncpg.Pool, dsn: str, aiohttp_client: AiohttpClient
) -> None:
    async with checkout_service(aiohttp_client, dsn) as (client, fake):
        fake.fail_next(1, 429, SESSIONS, should_retry=False)
        limited = await client.post(CONTRIBUTIONS, json=order())
        # A 500 is saved by Stripe's idempotency layer and answered again to the library's
        # retry under the same key: 503, and the reader's next try (a new session, a new key)
        # gets its session.
        fake.fail_next(1, 500, SESSIONS)
        failing = await client.post(CONTRIBUTIONS, json=order())
        recovered = await client.post(CONTRIBUTIONS, json=order())
        metrics = await (await client.get("/metrics")).text()
        tries = [r.headers["Idempotency-Key"] for r in created_sessions(fake)][1:]
    async with checkout_service(aiohttp_client, dsn, stocked=False) as (client, _):
        not_set_up = await client.post(CONTRIBUTIONS, json=order())
    async with checkout_service(aiohttp_client, dsn,
                                stripe_secret_key=_secret("sk_test_not-a-key")) as (client, _):
        bad_key = await client.post(CONTRIBUTIONS, json=order())

    expected = [(limited, 503, "stripe_rate_limited"), (failing, 503, "stripe_unavailable"),
                (not_set_up, 503, "stripe_not_set_up"),
                (bad_key, 502, "stripe_authentication_failed")]
    for response, status, code in expected:
        body = await response.json()
        assert (response.status, body["error"]["code"]) == (status, code), body
        assert "Traceback" not in body["error"]["message"]
        assert "sk_test" not in str(body)
    assert limited.headers["Retry-After"] == "5"
    assert recovered.status == 201
    # the library's retry of the 500 went under the 500's key; the reader's try under its own
    assert len(tries) == 3 and tries[0] == tries[1] != tries[2], tries
    assert ('donations_stripe_errors_total{code="stripe_rate_limited",'
            'operation="checkout_session_create"} 1') in metrics


async def test_stripe_refusing_the_readers_e_mail_is_a_422_naming_it(
    pool: asyncpg.Pool, dsn: str, aiohttp_client: AiohttpClient
) -> None:
    async with checkout_service(aiohttp_client, dsn) as (client, fake):
        fake.fail_next(1, 400, SESSIONS, code="email_invalid", param="customer_email")
        response = await client.post(CONTRIBUTIONS, json=order(email="jane@example.org"))
        error = (await response.json())["error"]
    assert (response.status, error["code"], error["field"]) == (422, "invalid_email", "email")
    assert "jane" not in error["message"]  # neither Stripe's words nor the address echoed


async def test_an_unreachable_stripe_is_503(
    pool: asyncpg.Pool, dsn: str, aiohttp_client: AiohttpClient
) -> None:
    async with checkout_service(aiohttp_client, dsn) as (client, fake):
        await fake.close()  # nothing listens there any more: every try is refused
        response = await client.post(CONTRIBUTIONS, json=order())
    assert response.status == 503
    assert (await response.json())["error"]["code"] == "stripe_unavailable"


async def test_without_a_stripe_key_checkout_is_503_and_options_still_answer(
    client: Client,
) -> None:
    response = await client.post(CONTRIBUTIONS, json=order())
    assert response.status == 503
    assert (await response.json())["error"]["code"] == "stripe_not_configured"
    options = await client.get("/v1/checkout/options")
    assert options.status == 200
    assert (await options.json())["checkout_available"] is False


async def test_a_foreign_origin_is_refused_before_anything_else(client: Client) -> None:
    """A browser request from an origin not in SITE_ORIGINS is 403 `origin_not_allowed`
    before anything else is looked at, the missing Stripe key included."""
    response = await client.post(CONTRIBUTIONS, json=order(),
                                 headers={"Origin": "https://evil.example"})
    body = await response.json()
    assert (response.status, body["error"]["code"]) == (403, "origin_not_allowed")
    options = await client.get("/v1/checkout/options", headers={"Origin": "https://evil.example"})
    body = await options.json()
    assert (options.status, body["error"]["code"]) == (403, "origin_not_allowed")


async def test_invalid_requests_name_the_field_and_never_reach_stripe(
    pool: asyncpg.Pool, dsn: str, aiohttp_client: AiohttpClient
) -> None:
    await add_campaign(pool, "known")
    cases = [
        (CONTRIBUTIONS, order(currency="chf"), 422, "unsupported_currency", "currency"),
        (CONTRIBUTIONS, order(currency="pounds"), 400, "invalid_currency", "currency"),
        (CONTRIBUTIONS, order(amount=10.5), 400, "invalid_field", "amount"),
        (CONTRIBUTIONS, order(amount="2500"), 400, "invalid_field", "amount"),
        (CONTRIBUTIONS, order(amount=True), 400, "invalid_field", "amount"),
        (CONTRIBUTIONS, order(amount=99), 422, "amount_out_of_range", "amount"),
        (CONTRIBUTIONS, order(amount=1_000_001), 422, "amount_out_of_range", "amount"),
        (CONTRIBUTIONS, order(amount=199, currency="jpy"), 422, "amount_out_of_range", "amount"),
        (SUBSCRIPTIONS, subscription(amount=299), 422, "amount_out_of_range", "amount"),
        (SUBSCRIPTIONS, subscription(amount=2999, interval="year"), 422,
         "amount_out_of_range", "amount"),
        (SUBSCRIPTIONS, subscription(interval="week"), 422, "invalid_interval", "interval"),
        (SUBSCRIPTIONS, subscription(interval=None), 400, "missing_field", "interval"),
        (CONTRIBUTIONS, order(interval="month"), 400, "unknown_field", "interval"),
        (CONTRIBUTIONS, order(email="not an email"), 422, "invalid_email", "email"),
        (CONTRIBUTIONS, order(email="a@b"), 422, "invalid_email", "email"),
        # RFC 5322: no dot first, last or twice before the @ (Stripe refuses them too)
        (CONTRIBUTIONS, order(email=".jane@example.org"), 422, "invalid_email", "email"),
        (CONTRIBUTIONS, order(email="jane.@example.org"), 422, "invalid_email", "email"),
        (CONTRIBUTIONS, order(email="jane..doe@example.org"), 422, "invalid_email", "email"),
        # URLs urlsplit cannot read: an unclosed IPv6 bracket, a host that normalises to "#"
        (CONTRIBUTIONS, order(success_url="https://[news.example.org/thanks"), 422,
         "invalid_url", "success_url"),
        (CONTRIBUTIONS, order(cancel_url="https://news.example.org\uff03.evil.com/"), 422,
         "invalid_url", "cancel_url"),
        (CONTRIBUTIONS, order(success_url="https://evil.example.com/x"), 422,
         "url_not_allowed", "success_url"),
        (CONTRIBUTIONS, order(success_url="https://news.example.org.evil.com/"), 422,
         "url_not_allowed", "success_url"),
        (CONTRIBUTIONS, order(cancel_url="http://news.example.org/support"), 422,
         "url_not_allowed", "cancel_url"),
        (CONTRIBUTIONS, order(cancel_url="javascript:alert(1)"), 422, "invalid_url",
         "cancel_url"),
        (CONTRIBUTIONS, order(success_url="https://user@news.example.org/"), 422,
         "invalid_url", "success_url"),
        (CONTRIBUTIONS, order(success_url="https://news.example.org\\@evil.com/"), 422,
         "invalid_url", "success_url"),
        (CONTRIBUTIONS, order(cancel_url=None), 400, "missing_field", "cancel_url"),
        (CONTRIBUTIONS, order(campaign="unknown"), 422, "unknown_campaign", "campaign"),
        (CONTRIBUTIONS, order(campaign="Not A Slug"), 422, "unknown_campaign", "campaign"),
        (CONTRIBUTIONS, order(metadata={f"k{i}": "v" for i in range(49)}), 422,
         "too_many_metadata_keys", "metadata"),
        (CONTRIBUTIONS, order(metadata={"x" * 41: "v"}), 422, "invalid_metadata_key",
         "metadata." + "x" * 41),
        (CONTRIBUTIONS, order(metadata={"a[b]": "v"}), 422, "invalid_metadata_key",
         "metadata.a[b]"),
        (CONTRIBUTIONS, order(metadata={"ref": "v" * 501}), 422, "invalid_metadata_value",
         "metadata.ref"),
        (CONTRIBUTIONS, order(metadata={"ref": 5}), 422, "invalid_metadata_value",
         "metadata.ref"),
        (CONTRIBUTIONS, order(metadata={"campaign": "known"}), 422, "reserved_metadata_key",
         "metadata.campaign"),
        (SUBSCRIPTIONS, subscription(metadata={"founding_supporter": "true"}), 422,
         "reserved_metadata_key", "metadata.founding_supporter"),
        (CONTRIBUTIONS, order(metadata=["a"]), 400, "invalid_field", "metadata"),
    ]
    async with checkout_service(aiohttp_client, dsn) as (client, fake):
        for path, body, status, code, field in cases:
            response = await client.post(path, json=body)
            error = (await response.json())["error"]
            assert (response.status, error["code"], error.get("field")) == (
                status, code, field), body
        malformed = await client.post(CONTRIBUTIONS, data=b"{nope",
                                      headers={"Content-Type": "application/json"})
        assert malformed.status == 400
        # the limits at their edges are accepted, JPY with no minor unit
        for path, body in [(CONTRIBUTIONS, order(amount=100)),
                           (CONTRIBUTIONS, order(amount=1_000_000)),
                           (CONTRIBUTIONS, order(amount=200, currency="jpy")),
                           (SUBSCRIPTIONS, subscription(amount=300)),
                           (SUBSCRIPTIONS, subscription(amount=500, currency="usd",
                                                        interval="month"))]:
            assert (await client.post(path, json=body)).status == 201, body
        sent = created_sessions(fake)
    assert len(sent) == 5
    assert sent[2].form["line_items"][0]["price_data"]["unit_amount"] == "200"


async def test_an_amount_of_zero_below_or_beyond_all_limits_is_amount_out_of_range(
    pool: asyncpg.Pool, dsn: str, aiohttp_client: AiohttpClient
) -> None:
    """Every whole amount outside the currency's limits, 0, negative and beyond 10^12
    included, is 422 `amount_out_of_range` naming `amount`, with the limits in the message."""
    async with checkout_service(aiohttp_client, dsn) as (client, fake):
        for amount in (0, -100, 10**13, 10**30):
            response = await client.post(CONTRIBUTIONS, json=order(amount=amount))
            error = (await response.json())["error"]
            assert (response.status, error["code"], error.get("field")) == (
                422, "amount_out_of_range", "amount"), amount
            assert "100 to 1000000" in error["message"], amount
        assert created_sessions(fake) == []


async def test_bodies_json_allows_but_nothing_can_use_are_400_and_hold_no_seat(
    pool: asyncpg.Pool, dsn: str, aiohttp_client: AiohttpClient
) -> None:
    def raw(body: dict[str, Any], name: str, text: str) -> bytes:
        """`body` as JSON with the field `name` set to the raw JSON `text`."""
        return (json.dumps({k: v for k, v in body.items() if k != name})[:-1]
                + f', "{name}": {text}}}').encode()

    json_header = {"Content-Type": "application/json"}
    cases = [
        # half a surrogate pair is valid JSON and no character: nothing can encode it
        (raw(subscription(), "metadata", '{"ref": "\\ud800"}'), "invalid_unicode",
         "metadata.ref"),
        (raw(subscription(), "success_url", f'"{SITE}/thanks/\\udc00"'), "invalid_unicode",
         "success_url"),
        # an integer longer than Python will read, and nesting deeper than it will recurse
        (raw(subscription(), "amount", "1" + "0" * 5000), "malformed_json", None),
        (raw(subscription(), "metadata", "[" * 20_000 + "]" * 20_000), "malformed_json", None),
    ]
    async with checkout_service(aiohttp_client, dsn, founding_seats=1) as (client, fake):
        for body, code, field in cases:
            for headers in (json_header, {**json_header, "Idempotency-Key": f"k-{code}"}):
                response = await client.post(SUBSCRIPTIONS, data=body, headers=headers)
                error = (await response.json())["error"]
                assert (response.status, error["code"], error.get("field")) == (
                    400, code, field), body[:80]
        assert created_sessions(fake) == []
        assert await pool.fetchval("SELECT count(*) FROM founding_holds") == 0
        # the one seat is still there for a reader
        good = await client.post(SUBSCRIPTIONS, json=subscription())
        assert (await good.json())["founding_discount"] is True
        # a surrogate pair is a real character (U+1F600) and goes through
        paired = await client.post(CONTRIBUTIONS, headers=json_header, data=raw(
            order(), "metadata", '{"ref": "\\ud83d\\ude00"}'))
        assert paired.status == 201
        assert created_sessions(fake)[-1].form["metadata"]["ref"] == "\U0001f600"


async def test_cors_is_for_the_site_only_preflight_included(
    pool: asyncpg.Pool, dsn: str, aiohttp_client: AiohttpClient
) -> None:
    async with checkout_service(aiohttp_client, dsn) as (client, fake):
        preflight = await client.options(CONTRIBUTIONS, headers={
            "Origin": SITE, "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "content-type, idempotency-key"})
        foreign_preflight = await client.options(CONTRIBUTIONS, headers={
            "Origin": "https://evil.example.com", "Access-Control-Request-Method": "POST"})
        created = await client.post(CONTRIBUTIONS, json=order(), headers={"Origin": SITE})
        invalid = await client.post(CONTRIBUTIONS, json=order(amount=1),
                                    headers={"Origin": SITE})
        foreign = await client.post(CONTRIBUTIONS, json=order(),
                                    headers={"Origin": "https://evil.example.com"})
        options = await client.get("/v1/checkout/options", headers={"Origin": SITE})
        sent = created_sessions(fake)

    assert preflight.status == 204
    assert preflight.headers["Access-Control-Allow-Origin"] == SITE
    assert "POST" in preflight.headers["Access-Control-Allow-Methods"]
    assert "Idempotency-Key" in preflight.headers["Access-Control-Allow-Headers"]
    assert "Origin" in preflight.headers["Vary"]
    assert foreign_preflight.status == 403
    assert "Access-Control-Allow-Origin" not in foreign_preflight.headers
    for response in (created, invalid, options):
        assert response.headers["Access-Control-Allow-Origin"] == SITE
    assert "Retry-After" in created.headers["Access-Control-Expose-Headers"]
    assert invalid.status == 422  # the form can read why
    assert foreign.status == 403
    assert (await foreign.json())["error"]["code"] == "origin_not_allowed"
    assert "Access-Control-Allow-Origin" not in foreign.headers
    assert len(sent) == 1


async def test_the_preflight_allows_get_and_post_with_the_sites_headers(
    pool: asyncpg.Pool, dsn: str, aiohttp_client: AiohttpClient
) -> None:
    """A preflight from the site is answered with methods `GET, POST`, headers
    `Content-Type, Idempotency-Key, X-Request-ID`, cached 10 minutes (as the README says)."""
    async with checkout_service(aiohttp_client, dsn) as (client, _fake):
        response = await client.options(CONTRIBUTIONS, headers={
            "Origin": SITE, "Access-Control-Request-Method": "POST"})
    assert response.status == 204
    assert response.headers["Access-Control-Allow-Methods"] == "GET, POST"
    assert response.headers["Access-Control-Allow-Headers"] == (
        "Content-Type, Idempotency-Key, X-Request-ID")
    assert response.headers["Access-Control-Max-Age"] == "600"


async def test_rate_limits_per_client_and_overall_answer_429_and_are_counted(
    pool: asyncpg.Pool, dsn: str, aiohttp_client: AiohttpClient
) -> None:
    async with checkout_service(aiohttp_client, dsn, checkout_rate_per_ip=3,
                                checkout_rate_overall=5, proxy_hops=1) as (client, fake):
        def from_ip(ip: str) -> dict[str, str]:
            # the client may claim anything on the left; the proxy appends what it saw
            return {"X-Forwarded-For": f"10.9.9.9, {ip}"}

        statuses = [(await client.post(CONTRIBUTIONS, json=order(),
                                       headers=from_ip("203.0.113.7"))).status
                    for _ in range(4)]
        blocked = await client.post(CONTRIBUTIONS, json=order(amount=1),
                                    headers=from_ip("203.0.113.7"))
        # another address of the same IPv6 /64 is the same client
        v6 = [(await client.post(CONTRIBUTIONS, json=order(),
                                 headers=from_ip(f"2001:db8::{i}"))).status for i in (1, 2)]
        overall = await client.post(CONTRIBUTIONS, json=order(), headers=from_ip("198.51.100.1"))
        metrics = await (await client.get("/metrics")).text()
        sent = created_sessions(fake)

    assert statuses == [201, 201, 201, 429]
    assert blocked.status == 429  # invalid or not, an attempt counts
    assert v6 == [201, 201]
    assert overall.status == 429
    assert (await overall.json())["error"]["code"] == "rate_limited_overall"
    for response in (blocked, overall):
        assert 1 <= int(response.headers["Retry-After"]) <= 600
    assert len(sent) == 5
    assert 'donations_checkout_rate_limited_total{limit="ip"} 2' in metrics
    assert 'donations_checkout_rate_limited_total{limit="overall"} 1' in metrics
    buckets = {r["bucket"] for r in await pool.fetch("SELECT bucket FROM rate_limit_hits")}
    assert buckets == {"all", "ip:203.0.113.7", "ip:2001:db8::/64", "ip:198.51.100.1"}


async def test_refused_attempts_count_against_the_rate_limit_too(
    pool: asyncpg.Pool, dsn: str, aiohttp_client: AiohttpClient
) -> None:
    async with checkout_service(aiohttp_client, dsn, checkout_rate_per_ip=3) as (client, fake):
        statuses = [(await client.post(CONTRIBUTIONS, json=body, headers=headers)).status
                    for body, headers in [
                        (order(amount=1), {}),  # out of range
                        (order(), {"Idempotency-Key": "has spaces"}),  # a bad key
                        (order(campaign="nowhere"), {}),  # a campaign the database lacks
                        (order(), {}),
                    ]]
        sent = created_sessions(fake)
    assert statuses == [422, 400, 422, 429]
    assert sent == []
    assert await pool.fetchval("SELECT hits FROM rate_limit_hits WHERE bucket <> 'all'") == 4


async def test_bodies_that_cannot_be_read_count_against_the_rate_limit(
    pool: asyncpg.Pool, dsn: str, aiohttp_client: AiohttpClient
) -> None:
    """A body that is not JSON, or is over 64 KiB, is an attempt like any other: counted
    against the limit, so a card tester sending garbage is limited too."""
    async with checkout_service(aiohttp_client, dsn, checkout_rate_per_ip=3) as (client, fake):
        statuses = [(await client.post(CONTRIBUTIONS, data=body, headers={
            "Content-Type": "application/json"})).status
            for body in (b"{not json", b"[" + b" " * (65 * 1024) + b"]", b"\xff")]
        last = await client.post(CONTRIBUTIONS, json=order())
        sent = created_sessions(fake)
    assert statuses == [400, 413, 400]
    assert last.status == 429, await last.text()
    assert sent == []
    assert await pool.fetchval("SELECT hits FROM rate_limit_hits WHERE bucket <> 'all'") == 4


async def test_options_give_the_form_currencies_amounts_and_the_offer(
    pool: asyncpg.Pool, dsn: str, aiohttp_client: AiohttpClient
) -> None:
    async with checkout_service(aiohttp_client, dsn, founding_seats=1) as (client, _):
        before = await (await client.get("/v1/checkout/options")).json()
        await client.post(SUBSCRIPTIONS, json=subscription())
        after = await (await client.get("/v1/checkout/options")).json()

    assert [c["currency"] for c in before["currencies"]] == ["gbp", "usd", "eur", "jpy"]
    gbp = before["currencies"][0]
    assert gbp["one_off"]["minimum"] == {"amount": 100, "currency": "gbp"}
    assert gbp["one_off"]["maximum"] == {"amount": 1_000_000, "currency": "gbp"}
    assert gbp["month"]["minimum"] == {"amount": 300, "currency": "gbp"}
    assert gbp["month"]["default"] == {"amount": 1000, "currency": "gbp"}
    jpy = before["currencies"][3]
    assert jpy["one_off"]["suggested"][0] == {"amount": 1000, "currency": "jpy"}
    assert before["founding_offer"] == {"open": True, "percent_off": 50, "seats": 1,
                                        "seats_left": 1}
    assert after["founding_offer"]["open"] is False
    assert after["founding_offer"]["seats_left"] == 0
    assert before["checkout_available"] is True


def _secret(value: str) -> object:
    return Secret(value)


@pytest.mark.parametrize(("forwarded", "bucket"), [
    ("203.0.113.7", "ip:203.0.113.7"),
    ("203.0.113.7:51234", "ip:203.0.113.7"),  # some proxies write the client's port too
    ("[2001:db8::1]:443", "ip:2001:db8::/64"),
    ("2001:db8::1", "ip:2001:db8::/64"),
    ("::ffff:203.0.113.7", "ip:203.0.113.7"),
    ("unknown", "ip:unknown"),
])
def test_the_client_behind_a_proxy_is_its_address_whatever_the_port(
    forwarded: str, bucket: str
) -> None:
    request = make_mocked_request("POST", CONTRIBUTIONS,
                                  headers={"X-Forwarded-For": f"10.0.0.1, {forwarded}"})
    assert ratelimit.client_network(request, proxy_hops=1) == bucket


async def test_a_stripe_that_never_answers_is_a_503_before_the_reader_gives_up(
    pool: asyncpg.Pool, dsn: str, aiohttp_client: AiohttpClient,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A reader waits on checkout: a Stripe that takes the connection and never answers is a 503
    `stripe_unavailable` once each try's timeout has passed twice (READER_TIMEOUT, tried again
    READER_RETRIES times: about 17 s as shipped, shortened here), not after the background
    workers' longer patience."""
    monkeypatch.setattr(stripe_api, "READER_TIMEOUT", 0.4)
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    try:
        settings = make_settings(
            dsn, stripe_secret_key=Secret(TEST_KEY), site_origins=(SITE,),
            stripe_api_base=f"http://127.0.0.1:{listener.getsockname()[1]}")
        client = await aiohttp_client(create_app(settings))
        started = time.monotonic()
        response = await client.post(CONTRIBUTIONS, json=order())
        waited = time.monotonic() - started
    finally:
        listener.close()
    assert response.status == 503
    assert (await response.json())["error"]["code"] == "stripe_unavailable"
    assert waited < 5, waited


async def test_a_subscription_carries_campaign_and_metadata_on_session_and_subscription(
    pool: asyncpg.Pool, dsn: str, aiohttp_client: AiohttpClient
) -> None:
    """A subscription checkout asks Stripe for a session whose metadata, and whose
    `subscription_data.metadata`, both hold the form's metadata and the campaign, and which
    pre-fills `customer_email` with the reader's address."""
    await add_campaign(pool, "spring")
    world = World(seed=43)
    async with checkout_service(aiohttp_client, dsn, world) as (client, fake):
        response = await client.post(SUBSCRIPTIONS, json=subscription(
            email="jane.doe@example.org", campaign="spring",
            metadata={"referrer": "newsletter", "variant": "b"}))
        body = await response.json()
        assert response.status == 201, body
        [sent] = created_sessions(fake)
        [session] = sessions_in(world)

    metadata = {"referrer": "newsletter", "variant": "b", "campaign": "spring",
                "founding_supporter": "true"}  # the first seats are founding ones
    form = sent.form
    assert form["mode"] == "subscription"
    assert form["metadata"] == metadata
    assert form["subscription_data"] == {"metadata": metadata}
    assert form["customer_email"] == "jane.doe@example.org"
    assert "payment_intent_data" not in form
    assert (body["id"], body["campaign"], body["founding_discount"]) == (
        session["id"], "spring", True)
    # what the fake Stripe made of it: the session carries both, as Stripe's would
    assert session["metadata"] == metadata
    assert session["customer_email"] == "jane.doe@example.org"


@pytest.mark.parametrize("path", [SUBSCRIPTIONS, "/v1/checkout/options"])
async def test_the_preflight_of_subscriptions_and_options_is_for_the_site_only(
    path: str, pool: asyncpg.Pool, dsn: str, aiohttp_client: AiohttpClient
) -> None:
    """A CORS preflight on /v1/checkout/subscriptions and /v1/checkout/options is answered 204
    with Access-Control-Allow-Origin for an origin in SITE_ORIGINS, and 403 without that header
    for a foreign origin."""
    method = "GET" if path.endswith("options") else "POST"
    async with checkout_service(aiohttp_client, dsn) as (client, fake):
        site = await client.options(path, headers={
            "Origin": SITE, "Access-Control-Request-Method": method,
            "Access-Control-Request-Headers": "content-type"})
        foreign = await client.options(path, headers={
            "Origin": "https://evil.example.com", "Access-Control-Request-Method": method})
        foreign_body = await foreign.json()
        reached_stripe = list(fake.requests)

    assert site.status == 204
    assert site.headers["Access-Control-Allow-Origin"] == SITE
    assert method in site.headers["Access-Control-Allow-Methods"]
    assert "Content-Type" in site.headers["Access-Control-Allow-Headers"]
    assert foreign.status == 403
    assert foreign_body["error"]["code"] == "origin_not_allowed"
    assert "Access-Control-Allow-Origin" not in foreign.headers
    assert reached_stripe == []


@pytest.mark.parametrize("path", [CONTRIBUTIONS, SUBSCRIPTIONS])
async def test_a_stripe_refusal_is_a_502_stripe_rejected_request_in_the_contracts_shape(
    path: str, pool: asyncpg.Pool, dsn: str, aiohttp_client: AiohttpClient
) -> None:
    """A 4xx refusal from Stripe that is not the reader's doing (here 400
    `parameter_invalid_integer`) is answered 502 `stripe_rejected_request` in the contract's
    error shape ({"error": {"code", "message"}}), with neither a traceback nor Stripe's own
    words in the body."""
    stripe_words = "Invalid integer: 25.00 (parameter_invalid_integer)"
    asked: list[str] = []

    async def refuse(request: web.Request) -> web.Response:
        asked.append(request.path)
        return web.json_response({"error": {
            "type": "invalid_request_error", "code": "parameter_invalid_integer",
            "param": "line_items[0][price_data][unit_amount]", "message": stripe_words,
            "doc_url": "https://stripe.com/docs/error-codes/parameter-invalid-integer"}},
            status=400, headers={"Request-Id": "req_refused"})

    stripe_app = web.Application()
    stripe_app.router.add_post(SESSIONS, refuse)
    fake = await aiohttp_client(stripe_app)
    settings = make_settings(dsn, stripe_secret_key=Secret(TEST_KEY),
                             stripe_api_base=str(fake.make_url("")).rstrip("/"),
                             site_origins=(SITE,), checkout_rate_per_ip=1000,
                             founding_seats=0)
    client = await aiohttp_client(create_app(settings))
    body = order() if path == CONTRIBUTIONS else subscription()
    response = await client.post(path, json=body, headers={"Origin": SITE})
    text = await response.text()

    assert response.status == 502, text
    assert response.content_type == "application/json"
    answer = json.loads(text)
    assert list(answer) == ["error"]
    assert set(answer["error"]) == {"code", "message"}
    assert answer["error"]["code"] == "stripe_rejected_request"
    assert answer["error"]["message"]
    for leak in ("Traceback", "parameter_invalid_integer", "Invalid integer", "req_refused",
                 'File "', TEST_KEY):
        assert leak not in text, leak
    assert len(response.headers["X-Request-ID"]) == 32
    assert response.headers["Access-Control-Allow-Origin"] == SITE  # the form can read it
    assert asked == [SESSIONS]  # a 400 is not retried


async def test_a_key_forgotten_after_a_day_is_served_again_not_refused_by_stripe(
    pool: asyncpg.Pool, dsn: str, aiohttp_client: AiohttpClient
) -> None:
    """Our Idempotency-Keys are forgotten 24 hours after they were first seen
    (idempotency.KEEP, deleted by the housekeeping), but Stripe only promises to drop its own
    keys *at least* 24 hours after it saw them: right after ours is gone, Stripe may still hold
    `checkout:<key>`. A reader whose page kept its key (a tab left open overnight, a page
    restored by the back button) then sends it again: we treat it as new, claim it with
    attempt 1 and send Stripe the very same `checkout:<key>` with other parameters (a new
    `expires_at`), which Stripe refuses as an idempotency error: the reader gets a 502
    `stripe_idempotency_conflict` for a valid request. A key we no longer remember must never
    reach Stripe as a key it may still remember: the new request should get its session (201)."""
    headers = {"Idempotency-Key": "kept-overnight"}
    async with checkout_service(aiohttp_client, dsn) as (client, fake):
        first = await client.post(CONTRIBUTIONS, json=order(), headers=headers)
        assert first.status == 201, await first.text()
        # a day and an hour later: the housekeeping has forgotten the key; Stripe (which keeps
        # its keys at least 24 hours) has not yet
        await pool.execute("UPDATE checkout_requests SET created_at = now() - interval '25 h',"
                           " claimed_at = now() - interval '25 h'")
        async with db.connection(pool) as conn:
            assert await idempotency.forget_old(conn) == 1
        await asyncio.sleep(1.1)  # a later expiry than the first session's, as a day later
        again = await client.post(CONTRIBUTIONS, json=order(), headers=headers)
        body = await again.json()
        keys = [r.headers["Idempotency-Key"] for r in created_sessions(fake)]

    assert again.status == 201, (body, keys)
    assert body["id"] != (await first.json())["id"]
