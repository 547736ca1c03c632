"""Security and privacy: the staff page's sessions, failed token attempts, addresses in logs,
and what an anonymous client can take."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator

import asyncpg
import pytest
from aiohttp import web
from pytest_aiohttp import AiohttpClient

from donations import auth, db, ratelimit, seats
from donations.app import create_app
from donations.logging import _scrub
from donations.settings import Secret
from tests.checkout_helpers import SITE, TEST_KEY, checkout_service, order, subscription
from tests.conftest import Client, make_settings
from tests.test_logging import Output, _pipeline


@pytest.fixture
def json_logs() -> Iterator[Output]:
    yield from _pipeline("json")


async def _token(pool: asyncpg.Pool, name: str, *scopes: str) -> str:
    async with db.connection(pool) as conn:
        return await auth.create_token(conn, name, list(scopes))


# --- the staff cookie -----------------------------------------------------------------------


async def test_signing_out_ends_the_session_a_copied_cookie_no_longer_works(
    client: Client, pool: asyncpg.Pool
) -> None:
    """The staff cookie carries a session of its own (its value never the token, which also
    opens the API): signing out ends it on the server, so a copy of the cookie (a shared
    computer, a proxy log) opens nothing afterwards, and a revoked token's sessions end too."""
    token = await _token(pool, "finance", "reports:read")
    login = await client.post("/staff/login", data={"token": token}, allow_redirects=False)
    assert login.status == 303
    cookie_value = login.cookies["donations_staff"].value
    cookie = {"Cookie": f"donations_staff={cookie_value}"}
    assert "Finance reports:" in await (await client.get("/staff/", headers=cookie)).text()

    out = await client.post("/staff/logout", headers=cookie, allow_redirects=False)
    assert out.status == 303

    replay = await client.get("/staff/", headers=cookie)
    html = await replay.text()
    assert 'action="/staff/login"' in html
    # and what the browser held is not the long-lived API credential either
    api = await client.get("/v1/reports/summary?from=2026-11-01&to=2026-12-01",
                           headers={"Authorization": f"Bearer {cookie_value}"})
    assert api.status == 401

    # a session ends with its token, and at its own expiry whatever the browser keeps
    again = await client.post("/staff/login", data={"token": token}, allow_redirects=False)
    cookie = {"Cookie": f"donations_staff={again.cookies['donations_staff'].value}"}
    assert "Finance reports:" in await (await client.get("/staff/", headers=cookie)).text()
    await pool.execute("UPDATE staff_sessions SET created_at = now() - interval '9 hours',"
                       " expires_at = now() - interval '1 hour'")
    assert 'action="/staff/login"' in await (await client.get("/staff/", headers=cookie)).text()
    third = await client.post("/staff/login", data={"token": token}, allow_redirects=False)
    cookie = {"Cookie": f"donations_staff={third.cookies['donations_staff'].value}"}
    async with db.connection(pool) as conn:
        await auth.revoke_token(conn, "finance")
    assert 'action="/staff/login"' in await (await client.get("/staff/", headers=cookie)).text()


# --- failed token attempts ------------------------------------------------------------------


def test_failed_attempts_memory_is_bounded_under_a_scan_from_many_addresses() -> None:
    """Failed token attempts are kept for a bounded number of clients (a scan from many
    addresses, an IPv6 /48's 65,536 /64s, evicts the oldest), and nothing walks the whole
    table on the request path."""
    attempts = auth.FailedAttempts()
    for i in range(10_500):
        attempts.failed(f"ip:2001:db8:{i // 65536:x}:{i % 65536:x}::/64")
    assert len(attempts._seen) <= 10_001, f"{len(attempts._seen)} clients kept"


# --- e-mail addresses in logs ---------------------------------------------------------------


@pytest.mark.parametrize("email", ["jane.doe@example.c", "jane.doe@192.168.10.20"])
def test_an_address_checkout_accepts_is_masked_in_free_text(email: str) -> None:
    """Every address checkout accepts is masked when it turns up in a log line's text: a one-letter
    or all-digit last label too (`jane.doe@example.c`, a reader's typo, which Stripe refuses with a
    message echoing it)."""
    scrubbed = _scrub("stripe_message", f"Invalid email address: {email}")
    assert "jane.doe" not in scrubbed, scrubbed


async def test_stripe_echoing_a_refused_address_does_not_log_it_in_full(
    aiohttp_client: AiohttpClient, dsn: str, pool: asyncpg.Pool, json_logs: Output
) -> None:
    """End to end: a reader types `jane.doe@example.c`; Stripe refuses it echoing it ("Invalid
    email address: …"), the reader gets 422 invalid_email, and no log line holds the address in
    full."""
    email = "jane.doe@example.c"

    async def refuse(request: web.Request) -> web.Response:
        return web.json_response({"error": {
            "type": "invalid_request_error", "code": "email_invalid", "param": "customer_email",
            "message": f"Invalid email address: {email}"}}, status=400)

    stripe_app = web.Application()
    stripe_app.router.add_post("/v1/checkout/sessions", refuse)
    fake = await aiohttp_client(stripe_app)
    settings = make_settings(dsn, stripe_secret_key=Secret(TEST_KEY),
                             stripe_api_base=str(fake.make_url("")).rstrip("/"),
                             site_origins=(SITE,), checkout_rate_per_ip=1000)
    client = await aiohttp_client(create_app(settings))
    response = await client.post("/v1/checkout/contributions", json=order(email=email))
    assert response.status == 422, await response.text()
    assert "jane.doe" not in json_logs.text, [
        line for line in json_logs.lines() if "jane.doe" in json.dumps(line)]



# --- bodies that cannot be read --------------------------------------------------------------


_NOT_GZIP = b"this is not gzip at all"


async def _post_not_gzip(client: Client, path: str, headers: dict[str, str]) -> None:
    """POST `path` a body labelled `Content-Encoding: gzip` that is not gzip: 400
    malformed_body in the error shape, and the connection closed after it."""
    content_type = ("application/x-www-form-urlencoded" if path == "/staff/login"
                    else "application/json")
    response = await client.post(path, data=_NOT_GZIP, headers={
        **headers, "Content-Encoding": "gzip", "Content-Type": content_type})
    text = await response.text()
    assert response.status == 400, (path, response.status, text)
    assert json.loads(text) == {"error": {
        "code": "malformed_body",
        "message": "the body could not be read (its Content-Encoding)"}}, (path, text)
    assert response.headers.get("Connection", "").lower() == "close", (path, response.headers)


async def test_a_body_that_does_not_decompress_is_400_not_500(
    client: Client, pool: asyncpg.Pool, json_logs: Output
) -> None:
    """`Content-Encoding: gzip` on a body that is not gzip: aiohttp raises
    web.RequestPayloadError from the body read (inputs.read_json, the webhook's, the staff
    login's form), whichever handler reads it. It is the client's malformed request: 400 in
    the error shape, the connection closed (what follows is no next request), nothing logged
    as an error (neither `request_crashed` nor aiohttp's "Unhandled exception" as it drains
    the broken body), and the webhook stores nothing."""
    admin = {"Authorization": f"Bearer {await _token(pool, 'ops', 'admin')}"}
    for path, headers in [
        ("/webhooks/stripe", {"Stripe-Signature": "t=1,v1=00"}),
        ("/v1/campaigns", admin),
        ("/v1/reconciliation/discrepancies/1/acknowledge", admin),
        ("/staff/login", {}),
    ]:
        await _post_not_gzip(client, path, headers)
    assert await pool.fetchval("SELECT count(*) FROM stripe_events") == 0
    assert await pool.fetchval("SELECT count(*) FROM campaigns") == 0
    assert (await client.get("/healthz")).status == 200  # the service carries on
    errors = [line for line in json_logs.lines() if line["level"] in ("error", "critical")]
    assert errors == [], errors
    assert "Traceback" not in json_logs.text


async def test_a_checkout_or_portal_body_that_does_not_decompress_is_400(
    pool: asyncpg.Pool, dsn: str, aiohttp_client: AiohttpClient
) -> None:
    """The same at checkout and the portal (the site's and its server's POSTs)."""
    async with checkout_service(aiohttp_client, dsn) as (client, _fake):
        await _post_not_gzip(client, "/v1/checkout/contributions", {})
        await _post_not_gzip(client, "/v1/checkout/subscriptions", {})
        await _post_not_gzip(client, "/v1/portal-sessions", {
            "Authorization": f"Bearer {await _token(pool, 'site', 'portal')}"})
    assert await pool.fetchval("SELECT count(*) FROM checkout_requests") == 0


# --- unauthenticated writes ------------------------------------------------------------------


async def test_one_anonymous_client_cannot_hold_every_founding_seat(
    pool: asyncpg.Pool, dsn: str, aiohttp_client: AiohttpClient
) -> None:
    """Checkouts started and never paid cannot take the founding offer away from everyone else:
    one client network holds at most seats.HOLDS_PER_CLIENT seats at a time (beyond that, the
    full price), so the next reader, from elsewhere, still gets the discount."""
    async with checkout_service(aiohttp_client, dsn, founding_seats=3, checkout_rate_per_ip=10,
                                proxy_hops=1) as (client, _fake):
        hoarder = {"X-Forwarded-For": "203.0.113.66"}
        for i in range(3):
            r = await client.post("/v1/checkout/subscriptions", json=subscription(),
                                  headers={**hoarder, "Idempotency-Key": f"hoard-{i}"})
            assert r.status == 201, await r.text()
        reader = await client.post("/v1/checkout/subscriptions", json=subscription(),
                                   headers={"X-Forwarded-For": "198.51.100.5"})
        assert reader.status == 201
        assert (await reader.json())["founding_discount"] is True


async def test_one_ipv6_site_cannot_hold_every_founding_seat_from_its_many_networks(
    pool: asyncpg.Pool, dsn: str, aiohttp_client: AiohttpClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An IPv6 /48 is 65,536 /64s, each a client network of its own: its holds are capped too
    (seats.HOLDS_PER_SITE, whatever /64 they come from), so one site's checkouts never paid
    still leave seats to readers elsewhere, over IPv6 or IPv4."""
    monkeypatch.setattr(seats, "HOLDS_PER_SITE", 3)
    async with checkout_service(aiohttp_client, dsn, founding_seats=6, checkout_rate_per_ip=10,
                                proxy_hops=1) as (client, _fake):
        async def start(address: str, key: str) -> bool:
            r = await client.post("/v1/checkout/subscriptions", json=subscription(),
                                  headers={"X-Forwarded-For": address, "Idempotency-Key": key})
            assert r.status == 201, await r.text()
            return bool((await r.json())["founding_discount"])

        # five /64s of one /48, one checkout each: three seats, then full price
        site = [await start(f"2001:db8:77:{n}::1", f"site-{n}") for n in range(5)]
        assert site == [True, True, True, False, False]
        # another /48, and an IPv4 reader: the seats left are theirs
        assert await start("2001:db8:78::1", "elsewhere-6")
        assert await start("198.51.100.9", "elsewhere-4")
    holds = await pool.fetch("SELECT site FROM founding_holds ORDER BY id")
    assert [r["site"] for r in holds] == ["ip:2001:db8:77::/48"] * 3 + [
        "ip:2001:db8:78::/48", None]


def test_a_client_s_site_is_its_ipv6_48_and_an_ipv4_client_has_none() -> None:
    assert ratelimit.client_site("ip:2001:db8:77:5::/64") == "ip:2001:db8:77::/48"
    assert ratelimit.client_site("ip:2001:db8::/64") == "ip:2001:db8::/48"
    assert ratelimit.client_site("ip:198.51.100.9") is None
    assert ratelimit.client_site("ip:unknown") is None
    assert ratelimit.client_site("ip:2001:db8::/32") is None  # (never a network checkout names)


async def test_concurrent_wrong_tokens_are_not_held_to_the_20_failures_limit(
    client: Client,
) -> None:
    """After 20 failed attempts within 5 minutes a client gets 429 (README), also when it sends
    its guesses all at once: each attempt is counted before its look-up (and taken back when the
    token is good), so no more than 20 are looked up and answered 401."""

    async def guess(i: int) -> int:
        response = await client.get(
            "/v1/reports/summary?from=2026-11-01&to=2026-12-01",
            headers={"Authorization": f"Bearer dnt_guess_{i}"})
        await response.read()
        return response.status

    statuses = await asyncio.gather(*(guess(i) for i in range(80)))
    assert set(statuses) <= {401, 429}, statuses
    assert statuses.count(401) <= 20, (
        f"{statuses.count(401)} wrong tokens from one address were looked up and answered 401 "
        f"within the window; README allows 20, then 429")


async def test_signing_in_again_then_out_leaves_no_earlier_session_of_the_browser_alive(
    client: Client, pool: asyncpg.Pool,
) -> None:
    """A browser that signs in while it holds a session (a second tab left on the form, the
    back button) has that session ended, not only its cookie overwritten: after Sign out, a
    copy of the earlier cookie opens nothing either."""
    token = await _token(pool, "finance", "reports:read")
    first = await client.post("/staff/login", data={"token": token}, allow_redirects=False)
    assert first.status == 303
    old = {"Cookie": f"donations_staff={first.cookies['donations_staff'].value}"}
    assert "Finance reports:" in await (await client.get("/staff/", headers=old)).text()

    # the same browser signs in again, sending the cookie it holds
    second = await client.post("/staff/login", data={"token": token}, headers=old,
                               allow_redirects=False)
    assert second.status == 303
    new = {"Cookie": f"donations_staff={second.cookies['donations_staff'].value}"}
    assert new != old
    out = await client.post("/staff/logout", headers=new, allow_redirects=False)
    assert out.status == 303

    replay = await (await client.get("/staff/", headers=old)).text()
    assert 'action="/staff/login"' in replay, (
        "the session the browser held before signing in again still opens the finance page "
        "after Sign out")


async def test_a_401_names_the_bearer_scheme_in_www_authenticate(
    client: Client, pool: asyncpg.Pool,
) -> None:
    """A 401 names the scheme it wants (RFC 9110 11.6.1; RFC 6750 3): `Bearer`, and
    `error="invalid_token"` when a token was sent."""
    for path in ("/v1/reports/summary?from=2026-11-01&to=2026-12-01", "/v1/campaigns",
                 "/v1/reconciliation/runs"):
        for headers in ({}, {"Authorization": "Bearer dnt_unknown"}):
            response = await client.get(path, headers=headers)
            assert response.status == 401, (path, response.status)
            challenge = response.headers.get("WWW-Authenticate", "")
            assert challenge.lower().startswith("bearer"), (path, headers, dict(response.headers))
            assert ("invalid_token" in challenge) == bool(headers), challenge
