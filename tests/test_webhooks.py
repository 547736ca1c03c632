"""POST /webhooks/stripe: verified, stored, applied once; every bad input gets its answer."""

from __future__ import annotations

import asyncio
import copy
import datetime as dt
import io
import json
import re
import time
from typing import Any

import asyncpg
import pytest
from pytest_aiohttp import AiohttpClient

from donations.app import create_app
from donations.events import PINNED_API_VERSION, NotAnEvent, parse_event
from donations.ingest import Outcome, ingest_many, reapply, retry_unfinished
from donations.ledger import FoundingOffer
from donations.openapi import SPEC
from donations.reconcile import PAGE_MAX
from donations.settings import Secret
from tests.checkout_helpers import SITE, checkout_service, token
from tests.conftest import WEBHOOK_SECRET, Client, make_settings, payments_refused, staff_cookie
from tests.fakestripe import objects as shapes
from tests.fakestripe.signing import sign, signed_request
from tests.fakestripe.world import World
from tests.ledger_check import dump, reference
from tests.webhook_helpers import count, post_all, post_event


async def test_signed_one_off_lands_in_the_ledger(client: Client, pool: asyncpg.Pool) -> None:
    world = World(seed=1)
    paid = world.one_off(2500, "gbp", campaign="winter-appeal", email="jane.doe@example.org")
    await post_all(client, paid.events)

    async with pool.acquire() as conn:
        rows = await conn.fetch("SELECT * FROM payments")
    ledger = await dump(pool)
    assert len(rows) == 1
    row = rows[0]
    assert (row["payment_key"], row["status"], row["kind"]) == (
        paid.payment_intent, "succeeded", "one_off")
    assert (row["amount"], row["currency"], row["campaign"]) == (2500, "gbp", "winter-appeal")
    assert row["charge"] == paid.charge
    assert row["checkout_session"] == paid.checkout_session
    assert row["email"] == "jane.doe@example.org"
    assert ledger == reference(world.events)


async def test_a_subscription_payment_is_one_recurring_contribution(
    client: Client, pool: asyncpg.Pool
) -> None:
    world = World(seed=2)
    started = world.subscribe(1000, "gbp", campaign="founders", founding=True)
    renewal = world.renew(started.subscription)
    await post_all(client, world.events)

    async with pool.acquire() as conn:
        payments = await conn.fetch("SELECT * FROM payments ORDER BY created_at")
        subscription = await conn.fetchrow("SELECT * FROM subscriptions")
    ledger = await dump(pool)
    assert subscription is not None
    # two invoices paid: two contributions, each seen through invoice, invoice payment, payment
    # intent, charge and checkout session, and counted once
    assert [p["payment_key"] for p in payments] == [started.payment_intent, renewal.payment_intent]
    assert {p["kind"] for p in payments} == {"recurring"}
    assert [p["invoice"] for p in payments] == [started.invoice, renewal.invoice]
    assert {p["subscription"] for p in payments} == {started.subscription}
    assert {p["campaign"] for p in payments} == {"founders"}
    assert [p["amount"] for p in payments] == [500, 500]  # the founding 50% off
    assert subscription["founding"] is True
    assert subscription["percent_off"] == 50
    assert (subscription["amount"], subscription["interval"], subscription["status"]) == (
        1000, "month", "active")
    assert ledger == reference(world.events)


async def test_bad_signatures_are_refused_and_nothing_is_stored(
    client: Client, pool: asyncpg.Pool
) -> None:
    event = World(seed=3).one_off(1000, "gbp").events[0]
    body, headers = signed_request(event, WEBHOOK_SECRET)

    cases = {
        "missing": {k: v for k, v in headers.items() if k != "Stripe-Signature"},
        "wrong secret": {**headers, "Stripe-Signature": sign(body, "whsec_not_ours")},
        "garbage": {**headers, "Stripe-Signature": "t=abc,v1=zz"},
        "stale": {**headers,
                  "Stripe-Signature": sign(body, WEBHOOK_SECRET, int(time.time()) - 301)},
    }
    for name, case_headers in cases.items():
        response = await client.post("/webhooks/stripe", data=body, headers=case_headers)
        assert response.status == 400, name
        error = (await response.json())["error"]
        assert error["code"] in ("missing_signature", "bad_signature"), name
        assert error["field"] == "Stripe-Signature"

    tampered = body.replace(b'"gbp"', b'"usd"')
    response = await client.post("/webhooks/stripe", data=tampered, headers=headers)
    assert response.status == 400
    stale = await client.post("/webhooks/stripe", data=body, headers=cases["stale"])
    assert "5 minutes" in (await stale.json())["error"]["message"]
    assert await count(pool, "stripe_events") == 0


async def test_any_configured_secret_verifies_during_rotation(
    pool: asyncpg.Pool, dsn: str, aiohttp_client: AiohttpClient
) -> None:
    settings = make_settings(dsn, stripe_webhook_secrets=(
        Secret("whsec_old_one"), Secret(WEBHOOK_SECRET)))
    client = await aiohttp_client(create_app(settings))
    event = World(seed=4).one_off(1000, "gbp").events[0]
    for secret in ("whsec_old_one", WEBHOOK_SECRET):
        copy_of = {**event, "id": f"{event['id']}{secret[-3:]}"}
        status, _ = await post_event(client, copy_of, secret=secret)
        assert status == 200
    assert await count(pool, "stripe_events") == 2


async def test_oversized_malformed_and_non_event_bodies(
    client: Client, pool: asyncpg.Pool
) -> None:
    big = b"{" + b" " * (1024 * 1024) + b"}"
    response = await client.post(
        "/webhooks/stripe", data=io.BytesIO(big),
        headers={"Stripe-Signature": sign(big, WEBHOOK_SECRET)})
    assert response.status == 413
    assert (await response.json())["error"]["code"] == "body_too_large"

    for body, code in (
        (b'{"id": "evt_1", "object": "event",', "malformed_json"),
        (b'{"id": "ch_1", "object": "charge"}', "not_an_event"),
        (b'{"id": "evt_1", "object": "event", "type": "charge.succeeded", "created": 1}',
         "not_an_event"),
        (b"\xff\xfe not utf-8", "malformed_body"),
    ):
        response = await client.post(
            "/webhooks/stripe", data=body,
            headers={"Stripe-Signature": sign(body, WEBHOOK_SECRET),
                     "Content-Type": "application/json"})
        assert response.status == 400, body
        assert (await response.json())["error"]["code"] == code
    assert await count(pool, "stripe_events") == 0


async def test_a_signed_body_json_cannot_read_is_400_and_nothing_is_stored(
    client: Client, pool: asyncpg.Pool
) -> None:
    """A correctly signed body that json.loads cannot read (an integer of thousands of digits,
    arrays nested thousands deep) is 400 `malformed_json`, as for any body that is not JSON:
    a 500 would have Stripe retry it for three days."""
    bodies = {
        "huge integer": b'{"object": "event", "id": "evt_huge", "n": 1' + b"0" * 5000 + b"}",
        "deep nesting": (b'{"object": "event", "id": "evt_deep", "n": ' + b"[" * 100_000
                         + b"]" * 100_000 + b"}"),
    }
    answers = {}
    for name, body in bodies.items():
        response = await client.post("/webhooks/stripe", data=body, headers={
            "Content-Type": "application/json", "Stripe-Signature": sign(body, WEBHOOK_SECRET)})
        answers[name] = (response.status, (await response.json())["error"]["code"])
    assert answers == {"huge integer": (400, "malformed_json"),
                       "deep nesting": (400, "malformed_json")}
    assert await count(pool, "stripe_events") == 0


async def test_an_event_from_the_other_mode_is_refused(
    pool: asyncpg.Pool, dsn: str, aiohttp_client: AiohttpClient
) -> None:
    settings = make_settings(dsn, stripe_secret_key=Secret("sk_live_abc123"),
                             stripe_api_base="http://127.0.0.1:9")
    client = await aiohttp_client(create_app(settings))
    event = World(seed=5).one_off(1000, "gbp").events[0]
    assert event["livemode"] is False
    status, body = await post_event(client, event)
    assert status == 400
    assert body["error"]["code"] == "livemode_mismatch"
    assert await count(pool, "stripe_events") == 0


async def test_a_duplicate_changes_nothing(client: Client, pool: asyncpg.Pool) -> None:
    events = World(seed=6).one_off(1000, "gbp").events
    await post_all(client, events)
    before = await dump(pool)
    status, body = await post_event(client, events[1])
    assert (status, body["outcome"]) == (200, "duplicate")
    assert await dump(pool) == before
    attempts = await pool.fetchval(
        "SELECT attempts FROM stripe_events WHERE id = $1", events[1]["id"])
    assert attempts == 1


async def test_concurrent_deliveries_apply_once(client: Client, pool: asyncpg.Pool) -> None:
    world = World(seed=7)
    world.one_off(1000, "gbp")
    world.one_off(700, "usd")
    answers = await asyncio.gather(
        *(post_event(client, event) for event in world.events for _ in range(4))
    )
    assert {status for status, _ in answers} == {200}
    outcomes = [body["outcome"] for _, body in answers]
    assert outcomes.count("processed") + outcomes.count("ignored") == len(world.events)
    assert outcomes.count("duplicate") == 3 * len(world.events)
    assert await dump(pool) == reference(world.events)
    assert await count(pool, "stripe_events") == len(world.events)


async def test_unknown_types_are_stored_and_ignored(client: Client, pool: asyncpg.Pool) -> None:
    event = copy.deepcopy(World(seed=8).one_off(1000, "gbp").events[0])
    event["type"] = "radar.early_fraud_warning.created"
    status, body = await post_event(client, event)
    assert (status, body["outcome"]) == (200, "ignored")
    async with pool.acquire() as conn:
        stored = await conn.fetchrow("SELECT status, type FROM stripe_events")
    assert stored is not None
    assert dict(stored) == {"status": "ignored", "type": "radar.early_fraud_warning.created"}
    assert await count(pool, "payments") == 0


async def test_other_api_versions_apply_only_where_understood(
    client: Client, pool: asyncpg.Pool
) -> None:
    world = World(seed=9)
    started = world.subscribe(1000, "gbp")
    invoice_paid = copy.deepcopy(started.of_type("invoice.paid")[0])
    invoice_paid["api_version"] = "2024-06-20"  # invoices had another shape then
    charge = copy.deepcopy(started.of_type("charge.succeeded")[0])
    charge["api_version"] = "2025-01-27.acacia"  # charges read the same
    future = copy.deepcopy(started.of_type("payment_intent.succeeded")[0])
    future["api_version"] = "2099-01-01.zebra"

    answers = [await post_event(client, e) for e in (invoice_paid, charge, future)]
    assert [body["outcome"] for _, body in answers] == [
        "needs_attention", "processed", "needs_attention"]
    async with pool.acquire() as conn:
        statuses = await conn.fetch("SELECT status FROM stripe_events ORDER BY status")
        objects = await conn.fetch("SELECT id FROM stripe_objects")
    assert [r["status"] for r in statuses] == ["needs_attention", "needs_attention", "processed"]
    assert [r["id"] for r in objects] == [started.charge]
    metrics = await (await client.get("/metrics")).text()
    assert 'donations_stored_events{status="needs_attention",type="invoice.paid"} 1' in metrics


async def test_a_failing_event_is_kept_and_applied_on_redelivery(
    client: Client, pool: asyncpg.Pool
) -> None:
    events = World(seed=10).one_off(1200, "gbp").events
    # A real failure inside PostgreSQL while the ledger is written, as a bug or an outage of a
    # dependency would cause; removed at the end of the block as an operator's fix would.
    async with payments_refused(pool):
        status, body = await post_event(client, events[1])
        assert status == 500
        assert body["error"]["code"] == "event_failed"
        async with pool.acquire() as conn:
            stored = await conn.fetchrow("SELECT * FROM stripe_events")
            assert stored is not None
            assert (stored["status"], stored["attempts"]) == ("failed", 1)
            assert "refused for this test" in stored["last_error"]
            assert await conn.fetchval("SELECT count(*) FROM stripe_objects") == 0

    status, body = await post_event(client, events[1])  # Stripe's retry
    assert (status, body["outcome"]) == (200, "processed")
    await post_all(client, events)
    assert await dump(pool) == reference(events)
    stored = await pool.fetchrow(
        "SELECT status, attempts, last_error FROM stripe_events WHERE id = $1", events[1]["id"])
    assert stored is not None
    assert dict(stored) == {"status": "processed", "attempts": 2, "last_error": None}


async def test_a_failing_event_in_a_group_fails_alone(pool: asyncpg.Pool) -> None:
    world = World(seed=12)
    fine = world.one_off(1200, "gbp").events
    refused = world.one_off(150_000, "jpy").events
    async with pool.acquire() as conn:
        await conn.execute("""
            CREATE FUNCTION refuse_yen() RETURNS trigger LANGUAGE plpgsql AS
            $$ BEGIN RAISE EXCEPTION 'yen payments are refused for this test'; END $$;
            CREATE TRIGGER refuse BEFORE INSERT OR UPDATE ON payments
                FOR EACH ROW WHEN (NEW.currency = 'jpy') EXECUTE FUNCTION refuse_yen();
        """)
    group = [(parse_event(e), json.dumps(e)) for e in fine + refused]
    try:
        outcomes = await ingest_many(pool, group, FoundingOffer())
    finally:
        async with pool.acquire() as conn:
            await conn.execute("DROP TRIGGER refuse ON payments; DROP FUNCTION refuse_yen()")

    by_id = {event.id: outcome for (event, _), outcome in zip(group, outcomes, strict=True)}
    failed = {i for i, o in by_id.items() if o is Outcome.FAILED}
    assert failed, "the yen payment's events must fail"
    assert failed <= {e["id"] for e in refused}
    assert all(by_id[e["id"]] in (Outcome.PROCESSED, Outcome.IGNORED) for e in fine)
    assert await dump(pool) == reference(fine)  # the rest of the group is in the ledger
    stored = await pool.fetch("SELECT id, last_error FROM stripe_events WHERE status = 'failed'")
    assert {r["id"] for r in stored} == failed
    assert all("yen payments are refused" in r["last_error"] for r in stored)

    assert await retry_unfinished(pool, FoundingOffer()) == {"processed": len(failed)}
    assert await dump(pool) == reference(fine + refused)


async def test_webhook_without_a_secret_is_503(
    pool: asyncpg.Pool, dsn: str, aiohttp_client: AiohttpClient
) -> None:
    client = await aiohttp_client(create_app(make_settings(dsn, stripe_webhook_secrets=())))
    event = World(seed=11).one_off(1000, "gbp").events[0]
    status, body = await post_event(client, event)
    assert (status, body["error"]["code"]) == (503, "webhook_not_configured")


async def test_request_ids_are_honoured_or_made(client: Client) -> None:
    given = await client.get("/healthz", headers={"X-Request-ID": "abc-123"})
    assert given.headers["X-Request-ID"] == "abc-123"
    made = await client.get("/healthz", headers={"X-Request-ID": "bad id with spaces"})
    assert len(made.headers["X-Request-ID"]) == 32


async def test_redirects_carry_the_request_id_and_are_counted(client: Client) -> None:
    """A redirect (GET /staff → /staff/, raised as aiohttp wants) carries X-Request-ID like
    every other answer and is counted in /metrics."""
    response = await client.get("/staff", allow_redirects=False,
                                headers={"X-Request-ID": "redirect-1"})
    assert response.status == 301
    assert response.headers["X-Request-ID"] == "redirect-1"
    metrics = await (await client.get("/metrics")).text()
    assert ('donations_http_requests_total{method="GET",route="/staff",status="301"} 1'
            in metrics.splitlines())


async def test_errors_have_the_contract_shape(client: Client) -> None:
    missing = await client.get("/nowhere")
    assert missing.status == 404
    assert (await missing.json())["error"]["code"] == "not_found"
    assert len(missing.headers["X-Request-ID"]) == 32
    wrong_method = await client.get("/webhooks/stripe")
    assert wrong_method.status == 405
    assert (await wrong_method.json())["error"]["code"] == "method_not_allowed"
    assert wrong_method.headers["Allow"] == "POST"
    dynamic = await client.delete("/v1/campaigns/winter/totals")
    assert dynamic.status == 405
    assert set(dynamic.headers["Allow"].split(",")) >= {"GET", "HEAD", "OPTIONS"}
    text = await (await client.get("/metrics")).text()
    assert 'route="unmatched",status="404"' in text


async def test_metrics_count_requests_and_webhook_outcomes(client: Client) -> None:
    events = World(seed=12).one_off(1000, "gbp").events
    await post_all(client, events)
    text = await (await client.get("/metrics")).text()
    assert 'donations_webhook_events_total{outcome="processed",type="charge.succeeded"} 1' in text
    assert 'route="/webhooks/stripe"' in text
    assert 'donations_ledger_net_minor_units{currency="gbp",kind="one_off"} 1000' in text
    spec = await (await client.get("/openapi.json")).json()
    assert "/webhooks/stripe" in spec["paths"]
    assert json.dumps(spec)  # serialisable as served


def test_openapi_describes_every_route_the_app_serves_but_the_staff_pages() -> None:
    app = create_app(make_settings("postgresql://unused@localhost/unused"))
    described = {(method.upper(), path) for path, operations in SPEC["paths"].items()
                 for method in operations if not path.startswith("/staff")}
    served = set()
    for route in app.router.routes():
        info = route.resource.get_info() if route.resource is not None else {}
        path = info.get("path") or info.get("formatter")
        if route.method not in ("HEAD", "OPTIONS", "*") and not str(path).startswith("/staff"):
            served.add((route.method, path))
    assert served == described


async def test_openapi_lists_every_status_the_routes_answer(
    pool: asyncpg.Pool, dsn: str, aiohttp_client: AiohttpClient
) -> None:
    """/openapi.json lists every status the staff routes really answer: among others 400 and
    413 from the portal, 422 from the summary, 400/422 from the payouts report, 413 from
    POST /v1/campaigns, and 429 (too many failed token attempts) on every route that takes a
    token."""
    wide = {"from": "2026-11-01", "to": "2027-03-01"}
    async with checkout_service(aiohttp_client, dsn) as (client, _fake):
        spec = await (await client.get("/openapi.json")).json()
        portal = {"Authorization": "Bearer " + await token(pool, "site", "portal")}
        reader = {"Authorization": "Bearer " + await token(pool, "finance", "reports:read")}
        admin = {"Authorization": "Bearer " + await token(pool, "ops", "admin")}
        seen: list[tuple[str, str, int]] = []

        async def call(method: str, path: str, template: str, **kwargs: Any) -> None:
            response = await client.request(method, path, **kwargs)
            seen.append((template, method.lower(), response.status))

        await call("POST", "/v1/portal-sessions", "/v1/portal-sessions", json={}, headers=portal)
        await call("POST", "/v1/portal-sessions", "/v1/portal-sessions",
                   data=b"x" * (70 * 1024), headers=portal)
        await call("GET", "/v1/reports/summary", "/v1/reports/summary", headers=reader,
                   params={"from": "2026-12-01", "to": "2026-11-01"})
        await call("GET", "/v1/reports/payouts", "/v1/reports/payouts", headers=reader,
                   params={"from": "yesterday", "to": "2026-11-01"})
        await call("GET", "/v1/reports/payouts", "/v1/reports/payouts", headers=reader,
                   params={"from": "2026-12-01", "to": "2026-11-01"})
        await call("POST", "/v1/campaigns", "/v1/campaigns", data=b"x" * (70 * 1024),
                   headers=admin)
        await call("GET", "/v1/reconciliation/runs/1/discrepancies",
                   "/v1/reconciliation/runs/{id}/discrepancies", headers=reader)
        await call("GET", "/v1/reconciliation/runs/1/discrepancies",
                   "/v1/reconciliation/runs/{id}/discrepancies", headers=reader,
                   params={"limit": "0"})
        await call("GET", "/v1/reconciliation/discrepancies",
                   "/v1/reconciliation/discrepancies", headers=reader, params={"status": "x"})
        for _ in range(20):  # then this client is answered 429 on every route with a token
            await client.get("/v1/campaigns", headers={"Authorization": "Bearer dnt_wrong"})
        for method, path, template in [
            ("GET", "/v1/reports/contributions", "/v1/reports/contributions"),
            ("GET", "/v1/reports/summary", "/v1/reports/summary"),
            ("GET", "/v1/reports/payouts", "/v1/reports/payouts"),
            ("GET", "/v1/reports/payouts/po_1", "/v1/reports/payouts/{id}"),
            ("GET", "/v1/reconciliation/runs", "/v1/reconciliation/runs"),
            ("GET", "/v1/reconciliation/runs/1/discrepancies",
             "/v1/reconciliation/runs/{id}/discrepancies"),
            ("GET", "/v1/reconciliation/discrepancies", "/v1/reconciliation/discrepancies"),
            ("POST", "/v1/reconciliation/discrepancies/1/acknowledge",
             "/v1/reconciliation/discrepancies/{id}/acknowledge"),
            ("GET", "/v1/campaigns", "/v1/campaigns"),
            ("POST", "/v1/campaigns", "/v1/campaigns"),
            ("POST", "/v1/portal-sessions", "/v1/portal-sessions"),
        ]:
            await call(method, path, template, headers=reader, params=wide)
    assert {s for _, _, s in seen} >= {400, 404, 413, 422, 429}, seen
    undocumented = sorted({
        (path, method, status) for path, method, status in seen
        if str(status) not in spec["paths"][path][method]["responses"]})
    assert undocumented == [], "\n".join(map(str, undocumented))


def _listed(path: str, method: str) -> set[str]:
    """The statuses the OpenAPI document lists for an operation."""
    return set(SPEC["paths"][path][method]["responses"])


async def test_the_staff_pages_bad_month_and_rate_limited_answers_are_in_the_openapi_document(
    client: Client, pool: asyncpg.Pool
) -> None:
    """GET /staff/ signed in with `month=2026-13` is 400 invalid_month (staff_page.py
    `_month`); after 20 unknown session cookies from one client it is the sign-in page with
    429 (staff_page.py `staff`). The document lists both."""
    cookie = await staff_cookie(client, await token(pool, "finance", "reports:read"))
    bad_month = await client.get("/staff/", params={"month": "2026-13"}, headers=cookie)
    body = await bad_month.json()
    assert (bad_month.status, body["error"]["code"]) == (400, "invalid_month"), body
    statuses = []
    for attempt in range(21):
        response = await client.get(
            "/staff/", headers={"Cookie": f"donations_staff=dns_bogus{attempt}"})
        statuses.append(response.status)
    assert statuses[-1] == 429, statuses
    assert response.headers["Content-Type"].startswith("text/html")
    assert {"200", "400", "429", "503"} <= _listed("/staff/", "get"), _listed("/staff/", "get")
    assert "text/html" in SPEC["paths"]["/staff/"]["get"]["responses"]["429"]["content"]


async def test_the_portal_sessions_request_schema_refuses_what_the_service_refuses(
    pool: asyncpg.Pool, dsn: str, aiohttp_client: AiohttpClient
) -> None:
    """POST /v1/portal-sessions refuses an unknown field (400 unknown_field), a body with
    neither or both of customer and email (400 missing_field) and a customer that is no
    `cus_…` id (400 invalid_field): its request schema says so (additionalProperties false, one
    of customer or email required, the id's pattern), so that a client generated from the
    document, or schemathesis, sends no body the document calls valid and gets 400."""
    async with checkout_service(aiohttp_client, dsn, World(seed=5)) as (client, _):
        headers = {"Authorization": f"Bearer {await token(pool, 'site', 'portal')}"}
        return_url = f"{SITE}/account"
        for body, code in [
            ({"customer": "cus_123", "return_url": return_url, "referrer": "x"},
             "unknown_field"),
            ({"return_url": return_url}, "missing_field"),
            ({"customer": "cus_123", "email": "a@example.org", "return_url": return_url},
             "missing_field"),
            ({"customer": "123", "return_url": return_url}, "invalid_field"),
            ({"email": "", "return_url": return_url}, "invalid_field"),
        ]:
            response = await client.post("/v1/portal-sessions", headers=headers, json=body)
            error = (await response.json())["error"]
            assert (response.status, error["code"]) == (400, code), body
    schema = SPEC["paths"]["/v1/portal-sessions"]["post"]["requestBody"]["content"][
        "application/json"]["schema"]
    assert schema.get("additionalProperties") is False, schema
    alternatives = [set(choice.get("required", ())) for choice in schema.get("oneOf", [])]
    assert sorted(map(sorted, alternatives)) == [["customer"], ["email"]], schema
    customer = re.compile(schema["properties"]["customer"]["pattern"])
    assert customer.search("cus_123") and not customer.search("123"), schema
    assert schema["properties"]["email"]["minLength"] == 1, schema


async def test_the_largest_id_the_document_allows_is_read_and_one_more_digit_refused(
    client: Client, pool: asyncpg.Pool
) -> None:
    """`after` and the {id} of the reconciliation paths are read by inputs.whole_number, at
    most 18 digits: the document gives that maximum, the service answers it (200, or 404 for
    a path id nothing has), and beyond it `after` is 400 invalid_after."""
    headers = {"Authorization": f"Bearer {await token(pool, 'finance', 'reports:read')}"}
    too_big = await client.get("/v1/reconciliation/discrepancies",
                               params={"after": str(10**19)}, headers=headers)
    assert too_big.status == 400
    assert (await too_big.json())["error"]["code"] == "invalid_after"
    for path in ("/v1/reconciliation/discrepancies",
                 "/v1/reconciliation/runs/{id}/discrepancies"):
        (after,) = [p for p in SPEC["paths"][path]["get"]["parameters"] if p["name"] == "after"]
        assert after["schema"].get("maximum") == 999_999_999_999_999_999, after
    at_most = await client.get("/v1/reconciliation/discrepancies",
                               params={"after": "999999999999999999", "limit": str(PAGE_MAX)},
                               headers=headers)
    assert at_most.status == 200, await at_most.text()
    for path, method in (("/v1/reconciliation/runs/{id}/discrepancies", "get"),
                         ("/v1/reconciliation/discrepancies/{id}/acknowledge", "post")):
        (id_,) = [p for p in SPEC["paths"][path][method]["parameters"] if p["name"] == "id"]
        assert id_["schema"].get("maximum") == 999_999_999_999_999_999, id_
    largest = await client.get(
        "/v1/reconciliation/runs/999999999999999999/discrepancies", headers=headers)
    assert (largest.status, (await largest.json())["error"]["code"]) == (404, "run_not_found")


async def test_the_checkout_idempotency_key_schema_refuses_what_the_service_refuses(
    pool: asyncpg.Pool, dsn: str, aiohttp_client: AiohttpClient
) -> None:
    """The checkout's Idempotency-Key is 1 to 200 visible ASCII characters (idempotency.py
    `_KEY`; anything else 400 invalid_idempotency_key): the document's schema says so (not
    only maxLength 200, which lets "" and "a b" through)."""
    async with checkout_service(aiohttp_client, dsn, World(seed=6)) as (client, _):
        body = {"amount": 2500, "currency": "gbp", "success_url": f"{SITE}/thanks",
                "cancel_url": f"{SITE}/support"}
        for key in ("", "a b", "é", "x" * 201):
            response = await client.post("/v1/checkout/contributions", json=body,
                                         headers={"Idempotency-Key": key})
            error = (await response.json())["error"]
            assert (response.status, error["code"]) == (400, "invalid_idempotency_key"), key
    for path in ("/v1/checkout/contributions", "/v1/checkout/subscriptions"):
        (header,) = [p for p in SPEC["paths"][path]["post"]["parameters"]
                     if p["name"] == "Idempotency-Key"]
        schema = header["schema"]
        assert (schema.get("minLength"), schema.get("maxLength")) == (1, 200), schema
        pattern = re.compile(schema["pattern"])
        assert pattern.search("a" * 200) and pattern.search("~!0-_")
        for refused in ("", "a b", "é", "x" * 201):
            assert not pattern.search(refused), (refused, schema)


# --- failures in a group, and what is not an event --------------------------------------------


async def test_a_copy_of_a_failed_event_in_the_same_group_is_not_acknowledged(
    pool: asyncpg.Pool,
) -> None:
    """Two deliveries of one event that land in one group (racing deliveries, a resend from the
    dashboard while a retry is in flight): if applying it fails, every copy must be answered
    500, not the first 500 and the others 'duplicate' (a 2xx that makes Stripe stop retrying
    an event that is not in the ledger)."""
    event = World(seed=21).one_off(1200, "gbp").events[1]
    item = (parse_event(event), json.dumps(event))
    async with payments_refused(pool):
        outcomes = await ingest_many(pool, [item, item], FoundingOffer())
    status = await pool.fetchval("SELECT status FROM stripe_events WHERE id = $1", event["id"])
    assert status == "failed"
    assert outcomes == [Outcome.FAILED, Outcome.FAILED]


async def test_racing_deliveries_of_a_failing_event_all_get_500(
    client: Client, pool: asyncpg.Pool
) -> None:
    """The same through HTTP: deliveries of one event posted at once while it cannot be
    applied. None may be answered 2xx while the event is stored as failed."""
    event = World(seed=22).one_off(1200, "gbp").events[1]
    async with payments_refused(pool):
        answers = await asyncio.gather(*(post_event(client, event) for _ in range(6)))
    status = await pool.fetchval("SELECT status FROM stripe_events WHERE id = $1", event["id"])
    assert status == "failed"
    assert [s for s, _ in answers] == [500] * 6, answers


async def test_a_handled_event_whose_object_has_no_id_is_a_400_not_a_stored_failure(
    client: Client, pool: asyncpg.Pool
) -> None:
    """Signed but not an event we can read: 400 and nothing stored (issue 2). Instead it is
    stored as failed and answered 500, so it would be retried for three days and again by
    every `events retry`, each time failing the same way."""
    event = copy.deepcopy(World(seed=23).one_off(1000, "gbp").of_type("charge.succeeded")[0])
    del event["data"]["object"]["id"]
    status, body = await post_event(client, event)
    stored = await pool.fetchrow("SELECT status, last_error FROM stripe_events")
    assert (status, body.get("error", {}).get("code")) == (400, "not_an_event"), (
        status, body, dict(stored) if stored else None)
    assert await count(pool, "stripe_events") == 0


async def test_an_event_whose_failure_cannot_be_recorded_fails_alone(
    pool: asyncpg.Pool,
) -> None:
    """A group in which one event fails and then cannot even be recorded as failed: the others
    are applied and answered, that one is answered failed (Stripe delivers it again)."""
    good = World(seed=24).one_off(1000, "gbp").events
    bad = World(seed=25).one_off(700, "usd").events[0]
    async with pool.acquire() as conn:
        await conn.execute(f"""
            CREATE FUNCTION review_refuse_event() RETURNS trigger LANGUAGE plpgsql AS
            $$ BEGIN
                 IF NEW.id = '{bad["id"]}' THEN RAISE EXCEPTION 'this one cannot be kept'; END IF;
                 RETURN NEW;
               END $$;
            CREATE TRIGGER review_refuse_event BEFORE INSERT ON stripe_events
                FOR EACH ROW EXECUTE FUNCTION review_refuse_event();
        """)
    group = [(parse_event(e), json.dumps(e)) for e in [*good, bad]]
    outcomes = await ingest_many(pool, group, FoundingOffer())
    assert outcomes[-1] is Outcome.FAILED
    assert all(o in (Outcome.PROCESSED, Outcome.IGNORED) for o in outcomes[:-1]), outcomes
    assert await count(pool, "stripe_events") == len(good)


def test_an_event_created_after_the_year_9999_is_not_an_event() -> None:
    event = copy.deepcopy(World(seed=26).one_off(700, "usd").events[0])
    event["created"] = 10**13
    with pytest.raises(NotAnEvent):
        parse_event(event)


async def test_a_signature_header_with_a_non_ascii_character_is_a_400(
    client: Client, pool: asyncpg.Pool
) -> None:
    """Anyone, without a secret: a Stripe-Signature whose v1 value holds a non-ASCII
    character makes stripe's secure_compare (hmac.compare_digest on two str) raise TypeError,
    which verify() does not catch: 500 internal_error and an error-level traceback in the
    logs for every such request, instead of 400 bad_signature (issue 2, CONTRACT.md)."""
    event = World(seed=28).one_off(1000, "gbp").events[0]
    body, headers = signed_request(event, "whsec_whatever")
    timestamp = headers["Stripe-Signature"].split(",")[0]
    headers["Stripe-Signature"] = f"{timestamp},v1=\u00e9"
    response = await client.post("/webhooks/stripe", data=body, headers=headers)
    answer = await response.json()
    assert (response.status, answer["error"]["code"]) == (400, "bad_signature"), answer
    assert await count(pool, "stripe_events") == 0


async def test_events_retry_survives_a_stored_failed_event_whose_object_has_no_id(
    pool: asyncpg.Pool,
) -> None:
    """A stored failed event that can never be read (a handled type whose object has no
    id) is set aside as ignored; `events retry` goes on with the others."""
    import json

    from donations import ingest
    from donations.events import PINNED_API_VERSION
    from donations.ledger import FoundingOffer

    def event(evt: str, type_: str, obj: dict[str, object]) -> str:
        return json.dumps({"id": evt, "object": "event", "type": type_, "created": 1_795_000_000,
                           "api_version": PINNED_API_VERSION, "livemode": False,
                           "data": {"object": obj}})

    bad = event("evt_review_noid", "charge.refunded", {"object": "charge", "amount": 100})
    good = event("evt_review_good", "customer.created",
                 {"id": "cus_review", "object": "customer", "email": "a@example.org",
                  "name": "A", "created": 1_795_000_000})
    for i, (evt, type_, payload) in enumerate(
            [("evt_review_noid", "charge.refunded", bad),
             ("evt_review_good", "customer.created", good)]):
        await pool.execute(
            "INSERT INTO stripe_events (id, type, api_version, livemode, created, payload,"
            " status, attempts, last_error, received_at)"
            " VALUES ($1, $2, $3, false, to_timestamp(1795000000), $4::json, 'failed', 1,"
            " 'KeyError', now() - make_interval(secs => $5))",
            evt, type_, PINNED_API_VERSION, payload, 10 - i)
    counts = await ingest.retry_unfinished(pool, FoundingOffer())
    assert counts == {"processed": 1, "unreadable": 1}, counts
    assert await pool.fetchval(
        "SELECT status FROM stripe_events WHERE id = 'evt_review_good'") == "processed"
    assert await pool.fetchval(
        "SELECT status FROM stripe_events WHERE id = 'evt_review_noid'") == "ignored"


async def test_an_event_holding_nul_characters_is_stored_and_applied(
    client: Client, pool: asyncpg.Pool
) -> None:
    """PostgreSQL cannot keep U+0000, or half a surrogate pair, in text or jsonb. An event with
    one in a string (a name, a metadata value) is still stored and applied once, the character
    replaced by U+FFFD, rather than failing on every one of Stripe's retries."""
    world = World(seed=91)
    paid = world.one_off(1500, "gbp", metadata={"note": "a\x00b", "half": "c\ud800d",
                                                "whole": "e\U0001f600"})
    await post_all(client, world.events)
    statuses = {r["status"] for r in await pool.fetch("SELECT status FROM stripe_events")}
    assert statuses <= {"processed", "ignored"}
    row = await pool.fetchrow("SELECT metadata FROM payments WHERE payment_intent = $1",
                              paid.payment_intent)
    assert row is not None and row["metadata"]["note"] == "a\ufffdb"
    # half a surrogate pair cannot be kept either; a whole one (an emoji) is kept as it is
    assert (row["metadata"]["half"], row["metadata"]["whole"]) == ("c\ufffdd", "e\U0001f600")
    stored = await pool.fetchval("SELECT count(*) FROM stripe_events WHERE payload::text LIKE $1",
                                 "%\\u0000%")
    assert stored == 0


async def test_a_customer_updated_before_it_was_created_ends_with_the_newer_name_and_email(
    client: Client, pool: asyncpg.Pool
) -> None:
    """customer.updated delivered before customer.created, and each delivered again, leaves the
    customers row with the updated name and e-mail: whether the update came in the same second
    as the creation or an hour later, the creation never takes the row back."""
    world = World(seed=92)

    def customer_events(email: str, later: int) -> tuple[dict[str, Any], dict[str, Any]]:
        """customer.created (no name yet), then `later` seconds on, customer.updated with a
        name and another e-mail (previous_attributes as Stripe gives them)."""
        customer = shapes.customer(ids=world.ids, created=world.now, email=email)
        created = shapes.event("customer.created", customer, created=world.now, ids=world.ids,
                          request_id=world.ids.new("req"), idempotency_key=world.ids.uuid())
        world.advance(later)
        updated = shapes.event(
            "customer.updated",
            {**customer, "email": f"new.{email}", "name": "Jane Doe"},
            created=world.now, ids=world.ids,
            previous_attributes={"email": email, "name": None},
            request_id=world.ids.new("req"), idempotency_key=world.ids.uuid())
        return created, updated

    same_second = customer_events("ann@example.org", 0)
    an_hour_on = customer_events("bob@example.org", 3600)
    assert same_second[0]["created"] == same_second[1]["created"]
    answers = []
    for created, updated in (same_second, an_hour_on):
        for event in (updated, created, updated, created):
            status, body = await post_event(client, event)
            answers.append((status, body["outcome"]))
    assert answers == [(200, "processed"), (200, "processed"),
                       (200, "duplicate"), (200, "duplicate")] * 2

    rows = {r["id"]: dict(r) for r in await pool.fetch(
        "SELECT id, email, name, deleted, created_at FROM customers")}
    expected = {}
    for created, _updated in (same_second, an_hour_on):
        obj = created["data"]["object"]
        expected[obj["id"]] = {
            "id": obj["id"], "email": f"new.{obj['email']}", "name": "Jane Doe",
            "deleted": False,
            "created_at": dt.datetime.fromtimestamp(obj["created"], dt.UTC)}
    assert rows == expected
    assert await dump(pool) == reference([e for pair in (same_second, an_hour_on) for e in pair])


@pytest.mark.parametrize("obj", [
    {"id": "dp_bad", "object": "dispute", "amount": 500, "currency": "gbp", "status": {"x": 1}},
    {"id": "sub_bad", "object": "subscription", "currency": "gbp", "status": "active",
     "items": [{}]},
    {"id": "sub_bad", "object": "subscription", "currency": "gbp", "status": "active",
     "metadata": [1]},
    {"id": "re_bad", "object": "refund"},
    {"id": "po_bad", "object": "payout", "amount": 100, "status": "paid"},
])
async def test_a_signed_event_not_shaped_as_stripe_writes_it_is_set_aside_not_failed(
    client: Client, pool: asyncpg.Pool, obj: dict[str, Any]
) -> None:
    """A signed event whose object's fields do not have the types Stripe writes (a status that is
    not text, no currency where the object needs one, metadata or items that are not objects:
    forged by someone holding the secret, or broken) is stored and set aside for attention
    (200, counted), never a 500 that Stripe would retry for days and no retry could apply."""
    kind = {"dispute": "charge.dispute.created", "subscription": "customer.subscription.updated",
            "refund": "refund.created", "payout": "payout.paid"}[obj["object"]]
    event = {"id": "evt_badshape", "object": "event", "type": kind, "created": int(time.time()),
             "livemode": False, "api_version": PINNED_API_VERSION, "data": {"object": obj}}
    status, body = await post_event(client, event)
    assert (status, body.get("outcome")) == (200, "needs_attention"), body
    row = await pool.fetchrow("SELECT status FROM stripe_events WHERE id = 'evt_badshape'")
    assert row is not None and row["status"] == "needs_attention"


OLD_VERSION = "2025-01-27.acacia"  # the last version before 2025-03-31.basil


async def test_a_test_mode_event_of_a_connected_account_on_a_live_endpoint_is_acknowledged(
    pool: asyncpg.Pool, dsn: str, aiohttp_client: AiohttpClient
) -> None:
    """Stripe sends a live Connect endpoint the events of its connected accounts in both modes
    ("both live and test webhooks will be sent to your production webhook URLs", Stripe's
    Connect webhooks guide). The README says an event of a connected account (`account` set) is
    stored and acknowledged as `ignored`. Such an event is legitimate: answering it 400
    `livemode_mismatch` has Stripe retry it for three days and count the endpoint as failing
    (and disable it) for events that touch none of this publisher's money. Expected: 200
    `ignored`, stored."""
    settings = make_settings(dsn, stripe_secret_key=Secret("sk_live_review123"),
                             stripe_api_base="http://127.0.0.1:9")
    client = await aiohttp_client(create_app(settings))
    event = copy.deepcopy(World(seed=301).one_off(1000, "gbp").events[0])
    event["account"] = "acct_1ConnectedReview"
    assert event["livemode"] is False
    status, body = await post_event(client, event)
    assert (status, body.get("outcome")) == (200, "ignored"), (status, body)
    assert await count(pool, "stripe_events") == 1
    assert await count(pool, "payments") == 0


def _as_acacia(events: list[dict[str, Any]], invoice: str, payment_intent: str, charge: str,
               subscription: str) -> list[dict[str, Any]]:
    """The events of a subscription's first payment as an endpoint (or `GET /v1/events`) on
    2025-01-27.acacia gets them: a payment intent and charge name their `invoice`, an invoice
    names its `subscription`, `payment_intent` and `charge` at the top level (no `parent`), and
    there is no invoice_payment object yet."""
    old = []
    for event in copy.deepcopy(events):
        if event["type"].startswith("invoice_payment."):
            continue
        event["api_version"] = OLD_VERSION
        obj = event["data"]["object"]
        if obj["object"] in ("payment_intent", "charge"):
            obj["invoice"] = invoice
        if obj["object"] == "invoice":
            details = (obj.pop("parent", None) or {}).get("subscription_details") or {}
            obj["subscription"] = subscription
            obj["subscription_details"] = {"metadata": details.get("metadata") or {}}
            obj["payment_intent"] = payment_intent if obj["status"] == "paid" else None
            obj["charge"] = charge if obj["status"] == "paid" else None
            obj["paid"] = obj["status"] == "paid"
            obj["paid_out_of_band"] = False
        old.append(event)
    return old


async def test_an_older_versions_subscription_payment_is_not_taken_for_a_one_off(
    client: Client, pool: asyncpg.Pool
) -> None:
    """Before 2025-03-31.basil a payment intent and a charge named the invoice they paid
    (`invoice`, removed by basil: "Removed the invoice field from the PaymentIntent and Charge
    objects"). The README says older versions are applied only "for the objects whose shape has
    not changed since" and sets invoices, invoice payments and subscriptions aside; but payment
    intents and charges are applied although their shape did change, and the ledger, which
    links a payment to its invoice only through invoice_payment objects, then books a
    subscription's payment as a one-off contribution with no subscription and without the
    campaign the subscription was started for (campaign totals and the reports' `kind` are
    wrong). Expected: such a payment is either read as recurring (its `invoice` read) or set
    aside with the invoice for attention, never counted as a one-off."""
    world = World(seed=302)
    started = world.subscribe(1000, "gbp", campaign="founders")
    assert started.payment_intent is not None and started.charge is not None
    events = _as_acacia(world.events, started.invoice, started.payment_intent, started.charge,
                        started.subscription)
    for event in events:
        status, body = await post_event(client, event)
        assert status == 200, (event["type"], body)
    rows = [dict(r) for r in await pool.fetch(
        "SELECT payment_key, kind, status, campaign, subscription FROM payments")]
    one_offs = [r for r in rows if r["kind"] == "one_off"]
    assert one_offs == [], rows


async def test_a_thin_event_is_acknowledged_not_refused(
    client: Client, pool: asyncpg.Pool
) -> None:
    """Stripe's event destinations send thin events (`object: "v2.core.event"`, `created` as
    RFC 3339 text, `related_object` instead of `data.object`), signed exactly as snapshot
    events are: the destination's own `v2.core.event_destination.ping` (what a "send test
    event" or ping of the destination posts), v2 resources' events, and, in preview, thin
    events of v1 resources. Pointed at this URL, such an event verifies; answering it 400
    `not_an_event` has Stripe retry it for three days and count the destination as failing,
    until it is disabled. It touches nothing of the ledger: expected, like any other type the
    service does not handle, a 2xx (stored and ignored, or at least acknowledged)."""
    event = {
        "id": "evt_test_65R9Ijk8Yfqj1k6Xv2R16S2JPg8uSQfLDpmJj7cjCnH4",
        "object": "v2.core.event",
        "type": "v2.core.event_destination.ping",
        "livemode": False,
        "created": "2026-11-28T02:00:00.000Z",
        "context": None,
        "reason": None,
        "related_object": {"id": "ed_test_61RM8ltWcTW4mbsxf16RJyfa2xSQLHJJh1sxm7H0KVT6",
                           "type": "v2.core.event_destination",
                           "url": "/v2/core/event_destinations/"
                                  "ed_test_61RM8ltWcTW4mbsxf16RJyfa2xSQLHJJh1sxm7H0KVT6"},
    }
    status, body = await post_event(client, event)
    assert 200 <= status < 300, (status, body)


async def _set_aside_in_an_older_version(
    client: Client, pool: asyncpg.Pool
) -> tuple[World, Any, dict[str, Any]]:
    """A subscription's events delivered but the one that makes it active, whose copy in the
    account's older default version (as `GET /v1/events` lists it) reconciliation stored
    `needs_attention`: the World, the subscription, and that event in the pinned version."""
    world = World(seed=303)
    started = world.subscribe(1000, "gbp")
    activated = [e for e in world.events if e["type"] == "customer.subscription.updated"
                 and e["data"]["object"]["status"] == "active"]
    assert len(activated) == 1
    pinned = activated[0]
    for event in world.events:
        if event is not pinned:
            status, body = await post_event(client, event)
            assert status == 200, (event["type"], body)
    older = copy.deepcopy(pinned)
    older["api_version"] = OLD_VERSION
    sub = older["data"]["object"]
    item = sub["items"]["data"][0]
    sub["current_period_start"] = item.pop("current_period_start")
    sub["current_period_end"] = item.pop("current_period_end")
    (outcome,) = await ingest_many(pool, [(parse_event(older), json.dumps(older))],
                                   FoundingOffer(), source="reconcile")
    assert outcome is Outcome.NEEDS_ATTENTION
    return world, started, pinned


async def test_the_pinned_copy_of_an_event_set_aside_in_an_older_version_is_applied(
    client: Client, pool: asyncpg.Pool
) -> None:
    """`GET /v1/events` gives each event in the API version of its creation (the account's
    default, which the README says may be older than the pinned one), while the webhook
    endpoint, created with the pinned version, gets the same event id in the pinned shape.
    When reconciliation lists an event first (the webhook delivery failed during an outage and
    Stripe's retry comes later), its older copy of a subscription is stored `needs_attention`;
    then Stripe's retry brings the same event in the shape the service reads, and it is
    answered `duplicate` and thrown away: the event stays unapplied for ever (`events retry
    --include-attention` only reads the stored older copy again), and the subscription stays
    `incomplete` instead of `active` (active subscriptions, monthly recurring). Expected: the
    copy the service understands is applied (processed), whichever copy came first."""
    _, started, pinned = await _set_aside_in_an_older_version(client, pool)
    status, body = await post_event(client, pinned)  # Stripe's retry, in the pinned version
    row = await pool.fetchrow("SELECT status FROM subscriptions WHERE id = $1",
                              started.subscription)
    stored = await pool.fetchval("SELECT status FROM stripe_events WHERE id = $1", pinned["id"])
    assert (status, body.get("outcome"), stored, row and row["status"]) == (
        200, "processed", "processed", "active"), (status, body, stored, dict(row or {}))


async def test_a_thin_event_of_a_handled_type_is_stored_and_ignored(
    client: Client, pool: asyncpg.Pool
) -> None:
    """A thin event whose type is one the ledger handles for snapshot events (thin events of v1
    resources, in preview) names its object without including it: nothing to read, so it is
    stored and ignored, never failed on a missing object."""
    event = {
        "id": "evt_test_65R9Ijk8Yfqj1k6Xv2R16S2JPg8uSQfLDpmJj7cjCnH5",
        "object": "v2.core.event", "type": "charge.succeeded", "livemode": False,
        "created": "2026-11-28T02:00:00.000Z", "context": None, "reason": None,
        "related_object": {"id": "ch_thin", "type": "charge", "url": "/v1/charges/ch_thin"},
    }
    status, body = await post_event(client, event)
    assert (status, body["outcome"]) == (200, "ignored"), body
    row = await pool.fetchrow("SELECT status, created FROM stripe_events WHERE id = $1",
                              event["id"])
    assert row is not None and row["status"] == "ignored"
    assert row["created"].isoformat() == "2026-11-28T02:00:00+00:00"


async def test_the_pinned_copy_replacing_one_set_aside_is_the_snapshot_kept(
    client: Client, pool: asyncpg.Pool
) -> None:
    """An event stored `needs_attention` in an older API version (listed by reconciliation)
    and then delivered in the pinned version is applied from the pinned copy, which replaces
    the stored one (ingest._apply, store.finish_event). Expected: the snapshot kept for the
    object (stripe_objects.data, what every later derivation reads) is the pinned copy's
    object, so the ledger is the one the pinned events describe, and stays so when the
    subscription is derived again (`events reapply`, or any later event about it). What
    happens: put_snapshot copies `data.object` from the stored event's body *before*
    finish_event replaces that body, so the older copy's object is kept under the pinned
    copy's version; the row is right only until the next derivation, which loses the
    subscription's current period (read from its items in the pinned shape)."""
    world, started, pinned = await _set_aside_in_an_older_version(client, pool)
    status, body = await post_event(client, pinned)
    assert (status, body.get("outcome")) == (200, "processed"), body

    kept = await pool.fetchval("SELECT data FROM stripe_objects WHERE id = $1",
                               started.subscription)
    kept = json.loads(kept) if isinstance(kept, str) else kept
    expected = reference(world.events)["subscriptions"][started.subscription]
    assert (await dump(pool))["subscriptions"][started.subscription] == expected
    # derived again from what is kept (as `events reapply` or the next event does)
    await reapply(pool, FoundingOffer(), "customer.subscription.%")
    after = (await dump(pool))["subscriptions"][started.subscription]
    assert (after["current_period_start"], after["current_period_end"]) == (
        expected["current_period_start"], expected["current_period_end"]), after
    assert kept == pinned["data"]["object"]
