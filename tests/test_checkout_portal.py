"""POST /v1/portal-sessions: a customer portal link for a supporter, for the site's server."""

from __future__ import annotations

import asyncpg
from pytest_aiohttp import AiohttpClient

from tests.checkout_helpers import SITE, checkout_service, token
from tests.fakestripe.world import DAY, World
from tests.webhook_helpers import post_all

PORTAL = "/v1/portal-sessions"


async def test_the_site_opens_a_portal_session_by_email_or_customer(
    pool: asyncpg.Pool, dsn: str, aiohttp_client: AiohttpClient
) -> None:
    world = World(seed=71)
    started = world.subscribe(1000, "gbp", email="Jane.Doe@example.org")
    site = {"Authorization": f"Bearer {await token(pool, 'site', 'portal')}"}
    reader = {"Authorization": f"Bearer {await token(pool, 'finance', 'reports:read')}"}
    admin = {"Authorization": f"Bearer {await token(pool, 'ops', 'admin')}"}
    back = f"{SITE}/account"
    async with checkout_service(aiohttp_client, dsn, world) as (client, fake):
        await post_all(client, list(started))
        by_email = await client.post(PORTAL, headers=site,
                                     json={"email": "jane.doe@example.org", "return_url": back})
        by_id = await client.post(PORTAL, headers=admin,
                                  json={"customer": started.customer, "return_url": back})
        sent = [r.form for r in fake.requests if r.path == "/v1/billing_portal/sessions"]
        unknown_email = await client.post(PORTAL, headers=site,
                                          json={"email": "nobody@example.org",
                                                "return_url": back})
        unknown_id = await client.post(PORTAL, headers=site,
                                       json={"customer": "cus_NotAtStripe", "return_url": back})
        off_site = await client.post(PORTAL, headers=site, json={
            "customer": started.customer, "return_url": "https://evil.example.com/"})
        both = await client.post(PORTAL, headers=site, json={
            "customer": started.customer, "email": "x@example.org", "return_url": back})
        forbidden = await client.post(PORTAL, headers=reader,
                                      json={"customer": started.customer, "return_url": back})
        anonymous = await client.post(PORTAL, json={"customer": started.customer,
                                                     "return_url": back})

    for response in (by_email, by_id):
        assert response.status == 201
        body = await response.json()
        assert list(body) == ["url"]
        assert body["url"].startswith("https://billing.stripe.com/p/session/")
    assert sent == [{"customer": started.customer, "return_url": back}] * 2
    expected = [(unknown_email, 404, "customer_not_found"), (unknown_id, 404,
                "customer_not_found"), (off_site, 422, "url_not_allowed"),
                (both, 400, "missing_field"), (forbidden, 403, "forbidden"),
                (anonymous, 401, "unauthorized")]
    for response, status, code in expected:
        assert (response.status, (await response.json())["error"]["code"]) == (status, code)


async def test_an_email_holding_nul_is_refused_naming_it(
    aiohttp_client: AiohttpClient, dsn: str, pool: asyncpg.Pool
) -> None:
    """`{"email": "a\\u0000@example.org"}` is no e-mail address (and no PostgreSQL text can
    hold it): 400 `invalid_character` naming `email`, and Stripe is not asked."""
    async with checkout_service(aiohttp_client, dsn) as (client, fake):
        site = await token(pool, "site", "portal")
        response = await client.post(
            PORTAL,
            data=('{"email": "a\\u0000@example.org", "return_url": "' + SITE + '/account"}'
                  ).encode(),
            headers={"Authorization": f"Bearer {site}", "Content-Type": "application/json"})
        body = await response.json()
        asked = [r for r in fake.requests if r.path == "/v1/billing_portal/sessions"]
    assert response.status == 400, body
    assert (body["error"]["code"], body["error"]["field"]) == ("invalid_character", "email")
    assert asked == []


async def test_the_portal_by_email_opens_the_customer_whose_subscription_is_live(
    pool: asyncpg.Pool, dsn: str, aiohttp_client: AiohttpClient
) -> None:
    """Checkout is given `customer_email`, not a customer, so every checkout makes a new Stripe
    customer: a reader who subscribes and later starts another subscription that ends (a
    second one cancelled, an abandoned upgrade) has two customers with the e-mail. The portal
    by e-mail used to pick the newest customer with *any* subscription, ended ones included, so
    the reader landed in a portal with nothing to manage and could not cancel the subscription
    still charging them: the customer with a live subscription comes first."""
    world = World(seed=7302)
    live = world.subscribe(1000, "gbp", email="reader@example.org")
    world.advance(DAY)
    ended = world.subscribe(500, "gbp", email="reader@example.org")
    world.cancel(ended.subscription, at_period_end=False)
    site = {"Authorization": f"Bearer {await token(pool, 'site', 'portal')}"}
    async with checkout_service(aiohttp_client, dsn, world) as (client, fake):
        await post_all(client, world.events)
        statuses = {r["customer"]: r["status"]
                    for r in await pool.fetch("SELECT customer, status FROM subscriptions")}
        response = await client.post(PORTAL, headers=site, json={
            "email": "reader@example.org", "return_url": f"{SITE}/account"})
        sent = [r.form for r in fake.requests if r.path == "/v1/billing_portal/sessions"]

    assert live.customer != ended.customer
    assert statuses == {live.customer: "active", ended.customer: "canceled"}
    assert response.status == 201, await response.text()
    assert [f["customer"] for f in sent] == [live.customer]
