"""What staff and readers see, at its edges: throttling, cross-site forms, the ends of the
calendar, an empty year's chart, what the figures leave out, and the widget's states."""

from __future__ import annotations

import asyncio
import re
import shutil
from datetime import date
from pathlib import Path

import asyncpg
import pytest
from aiohttp import web
from pytest_aiohttp import AiohttpServer

from donations import auth, db, staff_page
from tests.conftest import Client, staff_cookie
from tests.fakestripe.world import World
from tests.webhook_helpers import post_all

START = 1_795_000_000  # 2026-11-18


async def _token(pool: asyncpg.Pool, name: str, *scopes: str) -> str:
    async with db.connection(pool) as conn:
        return await auth.create_token(conn, name, list(scopes))


def _summary(gross: int, net: int, mrr: int, currency: str = "gbp") -> dict[str, object]:
    def m(amount: int) -> dict[str, object]:
        return {"amount": amount, "currency": currency}
    return {"reporting": {"gross": m(gross), "net": m(net), "monthly_recurring": m(mrr)}}


# --- staff page: month parameter ----------------------------------------------------------


async def test_staff_month_at_the_ends_of_the_calendar_is_a_400_not_a_crash(
    client: Client, pool: asyncpg.Pool
) -> None:
    """The page reads the 11 months before and the one after: a month at the ends of the
    calendar is a 400, not a crash."""
    cookie = await staff_cookie(client, await _token(pool, "alice", "reports:read"))
    for month in ("0001-01", "9999-12"):
        response = await client.get(f"/staff/?month={month}", headers=cookie)
        assert response.status == 400, (month, response.status, await response.text())


# --- staff page: sign-in throttling -------------------------------------------------------


async def _exhaust_failures(client: Client) -> None:
    for _ in range(20):
        response = await client.post("/staff/login", data={"token": "dnt_wrong"},
                                     allow_redirects=False)
        assert response.status == 401


async def test_staff_login_429_carries_retry_after(client: Client, pool: asyncpg.Pool) -> None:
    """README: after 20 failures a client 'gets 429 with Retry-After', the sign-in page too."""
    good = await _token(pool, "alice", "reports:read")
    await _exhaust_failures(client)
    response = await client.post("/staff/login", data={"token": good}, allow_redirects=False)
    assert response.status == 429
    assert "Retry-After" in response.headers


async def test_staff_page_while_throttled_is_an_html_page_not_raw_json(
    client: Client, pool: asyncpg.Pool
) -> None:
    """A signed-in browser from an address over the limit gets the page (with its CSP,
    X-Frame-Options and no-store) saying so, not the API's JSON."""
    cookie = await staff_cookie(client, await _token(pool, "alice", "reports:read"))
    await _exhaust_failures(client)
    response = await client.get("/staff/", headers=cookie)
    assert response.headers["Content-Type"].startswith("text/html"), await response.text()
    assert response.headers.get("Cache-Control") == "no-store"
    assert "frame-ancestors 'none'" in response.headers.get("Content-Security-Policy", "")


# --- staff page: CSRF on the cookie's forms -----------------------------------------------


async def test_staff_logout_refuses_a_cross_site_post_with_origin_null(
    client: Client, pool: asyncpg.Pool
) -> None:
    """A form posted from another site is refused even with `Origin: null` (a sandboxed
    frame): the browser's Sec-Fetch-Site says where it came from."""
    token = await _token(pool, "alice", "reports:read")
    forged = {"Origin": "null", "Sec-Fetch-Site": "cross-site"}
    login = await client.post("/staff/login", data={"token": token}, headers=forged,
                              allow_redirects=False)
    assert login.status == 403, login.status  # login CSRF: victim signed in as someone else
    logout = await client.post("/staff/logout", headers=forged, allow_redirects=False)
    assert logout.status == 403, logout.status


# --- staff page: what the chart and the figures say ---------------------------------------


def test_staff_chart_figures_are_available_as_text() -> None:
    """The chart is an image; its figures are also a table it points to, for screen readers."""
    months = [date(2026, m, 1) for m in range(1, 13)]
    history = [(m, _summary(100_000 + i * 1_234, 90_000 + i, 5_000)) for i, m in
               enumerate(months)]
    html = staff_page.chart(history, "gbp")
    label = re.search(r'aria-label="([^"]*)"', html)
    assert label is not None
    visible = re.sub(r"<svg.*</svg>", "", html, flags=re.S)
    # the figures of March, for instance (gross 1024.68 GBP): neither in the accessible name
    # nor anywhere outside the presentational subtree
    assert "1024.68" in label.group(1) or "1024.68" in visible


def test_staff_chart_axis_of_an_empty_year_is_not_four_zero_labels() -> None:
    """An empty year's axis counts in whole major units, not four labels of 0.00."""
    months = [date(2026, m, 1) for m in range(1, 13)]
    html = staff_page.chart([(m, _summary(0, 0, 0)) for m in months], "gbp")
    ticks = re.findall(r'text-anchor="end" font-size="11">([^<]*)</text>', html)
    assert len(set(ticks)) == len(ticks), ticks


async def test_staff_page_says_when_monthly_recurring_leaves_a_currency_out(
    client: Client, pool: asyncpg.Pool
) -> None:
    """The page says what its reporting-currency figures leave out: a currency with no rate yet
    in monthly recurring, and unsettled movements' amounts."""
    world = World(seed=702, start=START)
    world.subscribe(500, "gbp")
    world.subscribe(900, "usd")
    await post_all(client, world.events)
    cookie = await staff_cookie(client, await _token(pool, "alice", "reports:read"))
    html = await (await client.get("/staff/?month=2026-11", headers=cookie)).text()
    reporting = html.split("<h2>In GBP", 1)[1].split("<h2>By payment currency", 1)[0]
    assert re.search(r"Monthly recurring at month end</th><td>5\.00 GBP", reporting)
    assert "USD" in reporting, reporting


# --- the widget script --------------------------------------------------------------------

WIDGET_HOST = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Host</title></head><body>
<div data-donations-campaign="Winter-Appeal" id="bad"></div>
<div data-donations-campaign="nope" id="missing"></div>
<script src="{service}/embed.js" async></script>
</body></html>
"""


async def test_widget_marks_a_div_with_an_impossible_slug_as_error(
    client: Client, pool: asyncpg.Pool, aiohttp_server: AiohttpServer, tmp_path: Path
) -> None:
    """README: the script 'sets data-donations-state to ready or error', a slug it cannot use
    included."""
    from tests.test_embed_browser import CHROMIUM, chromium
    if CHROMIUM is None:
        pytest.skip("no Chromium installed")
    service = str(client.make_url("")).rstrip("/")

    async def host(request: web.Request) -> web.Response:
        return web.Response(text=WIDGET_HOST.format(service=service), content_type="text/html")

    site = web.Application()
    site.router.add_get("/", host)
    host_server = await aiohttp_server(site)
    try:
        async with chromium(tmp_path / "profile") as browser:
            await browser.send("Page.enable")
            await browser.send("Page.navigate", url=str(host_server.make_url("/")))
            states: list[object] = []
            for _ in range(100):
                states = await browser.evaluate(
                    "['missing','bad'].map(i => document.getElementById(i)"
                    " && document.getElementById(i).dataset.donationsState || null)")
                if states and states[0] == "error":
                    break  # both divs were loaded by the same call
                await asyncio.sleep(0.1)
            assert states[0] == "error"  # the unknown slug: 404, error
            assert states[1] == "error", states  # the impossible slug: nothing at all
    finally:
        shutil.rmtree(tmp_path / "profile", ignore_errors=True)
