"""The public totals over HTTP: caching headers, 304s, CORS, the SVG, the widget."""

from __future__ import annotations

import asyncio
import re
from typing import Any

import asyncpg
import pytest
from pytest_aiohttp import AiohttpClient

from donations.app import create_app
from donations.appkeys import SETTINGS
from donations.embed import SCRIPT
from tests.conftest import Client, make_settings
from tests.fakestripe.world import World
from tests.test_staff import _bearer, _token
from tests.webhook_helpers import post_all


async def _campaign(client: Client, pool: asyncpg.Pool) -> None:
    token = await _token(pool, "admin", "admin")
    response = await client.post("/v1/campaigns", headers=_bearer(token), json={
        "slug": "winter", "title": "Winter <b>appeal</b>",
        "goal": {"amount": 10_000, "currency": "gbp"}})
    assert response.status == 201
    world = World(seed=410)
    world.one_off(2_500, "gbp", campaign="winter", email="ann@example.org")
    world.one_off(1_234_500, "jpy", campaign="winter", email="bob@example.org")
    await post_all(client, world.events)


async def test_totals_are_cacheable_with_etags_and_304s(client: Client, pool: asyncpg.Pool) -> None:
    await _campaign(client, pool)
    for path in ("/v1/totals", "/v1/campaigns/winter/totals"):
        first = await client.get(path, headers={"Origin": "https://news.example"})
        assert first.status == 200
        assert first.headers["Content-Type"] == "application/json; charset=utf-8"
        cache_control = first.headers["Cache-Control"]
        assert "public" in cache_control and "max-age=5" in cache_control
        assert "stale-while-revalidate=" in cache_control
        assert first.headers["Access-Control-Allow-Origin"] == "*"
        etag = first.headers["ETag"]
        assert etag.startswith('W/"')

        again = await client.get(path, headers={"If-None-Match": etag})
        assert again.status == 304
        assert again.headers["ETag"] == etag
        assert again.headers["Access-Control-Allow-Origin"] == "*"
        assert await again.read() == b""
        other = await client.get(path, headers={"If-None-Match": '"something-else", ' + etag})
        assert other.status == 304
        stale = await client.get(path, headers={"If-None-Match": 'W/"older"'})
        assert stale.status == 200

        preflight = await client.options(path, headers={
            "Origin": "https://news.example", "Access-Control-Request-Method": "GET"})
        assert preflight.status == 204
        assert preflight.headers["Access-Control-Allow-Origin"] == "*"
        assert "GET" in preflight.headers["Access-Control-Allow-Methods"]

    body = await (await client.get("/v1/campaigns/winter/totals")).json()
    assert body["by_currency"][1]["raised"] == {"amount": 1_234_500, "currency": "jpy"}


async def test_an_unknown_campaign_is_a_404_in_json(client: Client, pool: asyncpg.Pool) -> None:
    for path in ("/v1/campaigns/nope/totals", "/v1/campaigns/nope/progress.svg",
                 "/v1/campaigns/NOT%20A%20SLUG/totals"):
        response = await client.get(path)
        assert response.status == 404, path
        assert (await response.json())["error"]["code"] == "campaign_not_found"
        assert response.headers["Access-Control-Allow-Origin"] == "*"
    # the embed page is shown inside the site's iframe: a page saying so, not JSON
    for path in ("/embed/nope", "/embed/NOT%20A%20SLUG", "/embed/*"):
        page = await client.get(path)
        assert page.status == 404, path
        assert page.headers["Content-Type"].startswith("text/html")
        assert "does not exist" in await page.text()
        assert page.headers["Content-Security-Policy"].startswith("default-src 'none'")


async def test_the_progress_bar_is_an_accessible_svg(client: Client, pool: asyncpg.Pool) -> None:
    await _campaign(client, pool)
    response = await client.get("/v1/campaigns/winter/progress.svg?width=600&bar=%23ff0000"
                                "&track=eee&text=000000&background=FFFFFF")
    assert response.status == 200
    assert response.headers["Content-Type"] == "image/svg+xml; charset=utf-8"
    assert response.headers["Access-Control-Allow-Origin"] == "*"
    assert "default-src 'none'" in response.headers["Content-Security-Policy"]
    image = await response.text()
    assert image.startswith("<svg") and 'role="img"' in image
    summary = "£25 raised of £100 · 2 supporters"
    assert f"<title id=\"title\">Winter &lt;b&gt;appeal&lt;/b&gt;: {summary}</title>" in image
    assert 'aria-label="Winter &lt;b&gt;appeal&lt;/b&gt;: ' in image
    assert 'width="600"' in image and 'fill="#ff0000"' in image and 'fill="#eeeeee"' in image
    assert 'width="146"' in image  # a quarter of the 584 pixels inside the padding
    etag = response.headers["ETag"]
    assert (await client.get("/v1/campaigns/winter/progress.svg?width=600&bar=%23ff0000"
                             "&track=eee&text=000000&background=FFFFFF",
                             headers={"If-None-Match": etag})).status == 304
    plain = await client.get("/v1/campaigns/winter/progress.svg")
    assert plain.headers["ETag"] != etag

    everything = await (await client.get("/v1/totals/progress.svg")).text()
    assert "Reader contributions: £25 raised · 2 supporters" in everything


async def test_bad_svg_parameters_are_400_naming_the_field_and_never_echoed(
    client: Client, pool: asyncpg.Pool
) -> None:
    await _campaign(client, pool)
    cases = {
        "width=99999": "width", "width=abc": "width", "width=-5": "width",
        "width=%C2%B2": "width", "width=" + "9" * 5000: "width",
        "bar=red": "bar", "track=%22%3E%3Cscript%3E": "track", "text=12345": "text",
        "background=url(x)": "background",
    }
    for query, field in cases.items():
        response = await client.get(f"/v1/campaigns/winter/progress.svg?{query}")
        assert response.status == 400, query
        body = await response.json()
        assert body["error"]["field"] == field
        assert "script" not in await response.text()


async def test_the_widget_page_and_script(client: Client, pool: asyncpg.Pool) -> None:
    await _campaign(client, pool)
    page = await client.get("/embed/winter")
    assert page.status == 200
    assert page.headers["Content-Type"] == "text/html; charset=utf-8"
    assert "default-src 'none'" in page.headers["Content-Security-Policy"]
    html = await page.text()
    assert "<h1>Winter &lt;b&gt;appeal&lt;/b&gt;</h1>" in html
    assert "£25 raised of £100 · 2 supporters" in html
    assert 'aria-valuenow="25"' in html
    assert "<script" not in html

    script = await client.get("/embed.js")
    assert script.status == 200
    assert script.headers["Content-Type"] == "text/javascript; charset=utf-8"
    assert script.headers["Access-Control-Allow-Origin"] == "*"
    body = await script.read()
    assert len(body) < 5 * 1024
    assert "innerHTML" not in SCRIPT and "textContent" in SCRIPT
    assert (await client.get("/embed.js", headers={"If-None-Match": script.headers["ETag"]})
            ).status == 304


async def test_every_answer_of_a_public_path_has_cors_and_a_request_id(client: Client) -> None:
    cases = (("GET", "/v1/totals", 200), ("HEAD", "/v1/totals", 200),
             ("GET", "/v1/totals/no-such-thing", 404), ("POST", "/v1/totals", 405),
             ("GET", "/embed.js", 200))
    for method, path, status in cases:
        response = await client.request(method, path)
        assert response.status == status, (method, path)
        assert response.headers["Access-Control-Allow-Origin"] == "*"
        assert response.headers["Access-Control-Expose-Headers"] == "ETag"
        assert response.headers["X-Content-Type-Options"] == "nosniff"
        assert re.fullmatch(r"[0-9a-f]{32}", response.headers["X-Request-ID"])
        if status >= 400:
            assert (await response.json())["error"]["code"]
    assert (await client.post("/v1/totals")).headers["Allow"]

    totals = await client.get("/v1/totals")
    again = await client.get("/v1/totals", headers={"If-None-Match": totals.headers["ETag"]})
    assert again.status == 304
    assert again.headers["Cache-Control"] == totals.headers["Cache-Control"]

    private = await client.get("/healthz")
    assert "Access-Control-Allow-Origin" not in private.headers
    made = {(await client.get("/healthz")).headers["X-Request-ID"] for _ in range(20)}
    assert len(made) == 20


@pytest.mark.parametrize("path", ["/v1/campaigns/*/totals", "/v1/campaigns/*/progress.svg"])
async def test_the_global_scope_is_not_a_campaign(client: Client, path: str) -> None:
    await client.get("/v1/totals")  # everything's figures in memory, as on any busy site
    response = await client.get(path)
    assert response.status == 404
    assert (await response.json())["error"]["code"] == "campaign_not_found"


async def test_the_openapi_colour_pattern_is_the_one_the_server_applies(client: Client) -> None:
    spec = await (await client.get("/openapi.json")).json()
    params = spec["paths"]["/v1/totals/progress.svg"]["get"]["parameters"]
    pattern = re.compile(next(p for p in params if p["name"] == "bar")["schema"]["pattern"])
    for colour in ("abc", "#abc", "a1b2c3", "abcd", "abcde", "ggg", "#abcdef0"):
        response = await client.get("/v1/totals/progress.svg", params={"bar": colour})
        assert (response.status == 200) == bool(pattern.match(colour)), colour


async def test_openapi_describes_the_statuses_the_public_endpoints_answer(
    aiohttp_client: AiohttpClient, pool: asyncpg.Pool, dsn: str
) -> None:
    """CONTRACT: /openapi.json is "the OpenAPI 3 description of all of the above". GET
    /v1/checkout/options answers 403 origin_not_allowed to a browser Origin not on SITE_ORIGINS
    (checkout._check_origin), yet its description lists only 200 and 503; GET /embed.js answers
    304 to If-None-Match (totals_api.respond), yet lists only 200. A client generated from the
    document has no error shape for the first and no cached answer for the second."""
    client = await aiohttp_client(
        create_app(make_settings(dsn, site_origins=("https://news.example.org",))))

    foreign = await client.get("/v1/checkout/options",
                               headers={"Origin": "https://evil.example"})
    assert foreign.status == 403
    assert (await foreign.json())["error"]["code"] == "origin_not_allowed"

    script = await client.get("/embed.js")
    cached = await client.get("/embed.js", headers={"If-None-Match": script.headers["ETag"]})
    assert cached.status == 304

    spec = (await (await client.get("/openapi.json")).json())["paths"]
    assert "403" in spec["/v1/checkout/options"]["get"]["responses"]
    assert "304" in spec["/embed.js"]["get"]["responses"]


async def _create_campaign_by_api(client: Client, pool: asyncpg.Pool, **body: Any) -> None:
    token = await _token(pool, f"admin-{body['slug']}", "admin")
    response = await client.post("/v1/campaigns", headers=_bearer(token), json=body)
    assert response.status == 201, await response.text()


def _max_age(cache_control: str) -> int:
    match = re.search(r"max-age=(\d+)", cache_control)
    assert match is not None, cache_control
    return int(match.group(1))


async def test_a_cached_answer_does_not_tell_caches_it_is_fresh_for_a_whole_ttl_again(
    pool: asyncpg.Pool, dsn: str, aiohttp_client: AiohttpClient
) -> None:
    """README, Serving: figures are read at most once per TOTALS_TTL so that "a change committed
    to the ledger shows within the TTL", and the answer carries `max-age=TOTALS_TTL` for the
    browsers and CDNs in front. But an answer served from memory late in its TTL still says
    `max-age=TTL` with no `Age` header, so any HTTP cache keeps figures that were already
    TTL-old for another full TTL: a contribution committed just after a read shows up to 2 x TTL
    later (with the default 5 s, 10 s; with TOTALS_TTL=300, ten minutes instead of five).
    Expected: an answer from memory says how old it is (`Age`) or shortens its `max-age`, so the
    freshness it grants never reaches past the TTL of the read it comes from."""
    ttl = 2
    client = await aiohttp_client(create_app(make_settings(dsn, totals_ttl=ttl)))
    first = await client.get("/v1/totals")
    assert first.status == 200
    await asyncio.sleep(1.1)
    later = await client.get("/v1/totals")
    assert later.status == 200
    assert (await later.json())["as_of"] == (await first.json())["as_of"]  # from memory
    age = int(later.headers.get("Age", "0"))
    remaining = _max_age(later.headers["Cache-Control"]) - age
    # 1.1 s of the TTL were used up by the time of this answer: at most ~0.9 s remain
    assert remaining <= ttl - 1, (later.headers["Cache-Control"], later.headers.get("Age"))


async def test_the_widget_page_of_a_campaign_not_yet_created_is_not_cached_past_the_ttl(
    client: Client, pool: asyncpg.Pool
) -> None:
    """README, Serving: "A campaign created on one replica shows there at once, on the others
    within the TTL", and the JSON 404 for an unknown slug is not cacheable. The widget's iframe
    page for the same unknown slug, though, answers 404 with `Cache-Control: public,
    max-age=60`: a site that puts the iframe up shortly before staff create the campaign (or a
    CDN in front) keeps showing "This campaign does not exist" for a minute after it does,
    twelve times the 5 s TTL every other public answer promises. Expected: the not-found page is
    cacheable no longer than TOTALS_TTL (or not at all, like the JSON 404)."""
    missing = await client.get("/embed/spring")
    assert missing.status == 404
    json_missing = await client.get("/v1/campaigns/spring/totals")
    assert json_missing.status == 404
    await _create_campaign_by_api(client, pool, slug="spring", title="Spring")
    assert (await client.get("/embed/spring")).status == 200
    ttl = client.app[SETTINGS].totals_ttl
    cache_control = missing.headers.get("Cache-Control", "")
    assert "max-age" not in cache_control or _max_age(cache_control) <= ttl, cache_control


async def test_every_public_totals_answer_has_an_age(client: Client) -> None:
    """README lines 544-546: "Every public answer has `Cache-Control: public,
    max-age=TOTALS_TTL, stale-while-revalidate=…, stale-if-error=600`, an `Age` (whole seconds
    since the figures it shows were read …)". An answer whose figures were read less than a
    second ago (the first request, any request just after a refresh) has no `Age` header."""
    for path in ("/v1/totals", "/v1/totals/progress.svg"):
        response = await client.get(path)
        assert response.status == 200
        assert response.headers["Cache-Control"].startswith("public, max-age=5, ")
        assert "Age" in response.headers, (path, dict(response.headers))
