"""The staff page: token login into a secure cookie, the month's summary with its SVG chart, the
CSV downloads, no scripts; rendered in headless Chromium with a screenshot."""

from __future__ import annotations

import asyncio
import re
import shutil
import tempfile
from pathlib import Path

import asyncpg
import pytest

from donations import auth, db
from tests.conftest import Client, raw_request
from tests.fakestripe.world import World
from tests.webhook_helpers import post_all

CHROMIUM = Path("/usr/bin/chromium")
START = 1_795_000_000  # 2026-11-18


async def _token(pool: asyncpg.Pool, *scopes: str) -> str:
    async with db.connection(pool) as conn:
        return await auth.create_token(conn, f"t{len(scopes)}{scopes[0][:2]}", list(scopes))


async def _ledger(client: Client) -> None:
    world = World(seed=701, start=START)
    world.one_off(2500, "gbp", campaign="<script>alert(1)</script>")
    world.one_off(1000, "jpy")
    world.subscribe(500, "gbp")
    await post_all(client, world.events)


async def _signed_in(client: Client, pool: asyncpg.Pool) -> dict[str, str]:
    token = await _token(pool, "reports:read")
    response = await client.post("/staff/login", data={"token": token}, allow_redirects=False)
    assert response.status == 303
    assert response.headers["Location"] == "/staff/"
    cookie = response.headers["Set-Cookie"]
    assert token not in cookie  # a session of its own, never the token
    for attribute in ("Secure", "HttpOnly", "SameSite=Strict", "Path=/staff"):
        assert attribute in cookie, attribute
    return {"Cookie": f"donations_staff={response.cookies['donations_staff'].value}"}


async def test_without_a_cookie_the_page_is_a_login_form_without_scripts(
    client: Client, pool: asyncpg.Pool
) -> None:
    response = await client.get("/staff/")
    assert response.status == 200
    html = await response.text()
    assert '<form method="post" action="/staff/login">' in html
    assert "<script" not in html
    csp = response.headers["Content-Security-Policy"]
    assert "default-src 'none'" in csp and "script-src" not in csp
    assert response.headers["Cache-Control"] == "no-store"
    moved = await client.get("/staff", allow_redirects=False)
    assert moved.status == 301


async def test_login_refuses_wrong_revoked_and_unscoped_tokens(
    client: Client, pool: asyncpg.Pool
) -> None:
    portal = await _token(pool, "portal")
    revoked = await _token(pool, "admin")
    async with db.connection(pool) as conn:
        await auth.revoke_token(conn, "t1ad")
    for value, status in (("", 400), ("dnt_wrong", 401), (revoked, 401), (portal, 403)):
        response = await client.post("/staff/login", data={"token": value},
                                     allow_redirects=False)
        assert response.status == status, value
        assert "Set-Cookie" not in response.headers
        assert value == "" or value not in await response.text()
    # a cookie holding a bad token shows the login form again, never the figures
    page = await client.get("/staff/", headers={"Cookie": "donations_staff=dnt_wrong"})
    assert "/staff/login" in await page.text()
    download = await client.get("/staff/contributions.csv?from=2026-11-01&to=2026-12-01",
                                headers={"Cookie": f"donations_staff={portal}"},
                                allow_redirects=False)
    assert download.status == 303
    cross = await client.post("/staff/login", data={"token": portal},
                              headers={"Origin": "https://evil.example"})
    assert cross.status == 403


async def test_a_cookie_that_is_not_utf8_shows_the_login_page(client: Client) -> None:
    """A `donations_staff` cookie whose bytes are not UTF-8 is an unknown token like any other
    bad cookie: the login page, not an error."""
    status, body = await raw_request(client, (
        b"GET /staff/ HTTP/1.1\r\nHost: localhost\r\n"
        b"Cookie: donations_staff=dnt_\xff\r\nConnection: close\r\n\r\n"))
    assert status == 200, (status, body)
    assert b"/staff/login" in body


async def test_a_login_form_that_cannot_be_read_is_400_with_the_login_page(
    client: Client
) -> None:
    """A login form whose body cannot be decoded (a charset Python does not know, bytes that
    are not UTF-8, a multipart part without a name) is 400 with the login page again."""
    forms = {
        "unknown charset": (b"token=dnt_x",
                            "application/x-www-form-urlencoded; charset=nope"),
        "not utf-8": (b"token=\xff", "application/x-www-form-urlencoded"),
        "nameless part": (b"--b\r\nContent-Disposition: form-data\r\n\r\nx\r\n--b--\r\n",
                          "multipart/form-data; boundary=b"),
    }
    for name, (body, content_type) in forms.items():
        response = await client.post("/staff/login", data=body, allow_redirects=False,
                                     headers={"Content-Type": content_type})
        assert response.status == 400, (name, response.status)
        assert "/staff/login" in await response.text(), name
        assert "Set-Cookie" not in response.headers, name


async def test_the_dashboard_shows_the_month_a_chart_and_download_links(
    client: Client, pool: asyncpg.Pool
) -> None:
    await _ledger(client)
    cookie = await _signed_in(client, pool)
    response = await client.get("/staff/?month=2026-11", headers=cookie)
    assert response.status == 200
    html = await response.text()
    assert "November 2026" in html
    assert "<svg" in html and html.count("<rect") >= 24  # two bars a month, and the legend
    assert "<polyline" in html
    assert "<script" not in html
    assert "30.00 GBP" in html  # £25 + £5 gross in the reporting currency
    assert '/staff/contributions.csv?from=2026-11-01&amp;to=2026-12-01' in html
    assert re.search(r"Monthly recurring at month end</th><td>5\.00 GBP", html)

    download = await client.get("/staff/contributions.csv?from=2026-11-01&to=2026-12-01",
                                headers=cookie)
    assert download.status == 200
    body = await download.text()
    assert body.startswith("created_at,type,") and body.count("\r\n") == 4
    assert "'<script>" not in body and "<script>alert(1)</script>" in body  # text, not markup
    payouts = await client.get("/staff/payouts.csv?from=2026-11-01&to=2026-12-01",
                               headers=cookie)
    assert payouts.status == 200 and (await payouts.text()).startswith("payout,")

    bad = await client.get("/staff/?month=November", headers=cookie)
    assert bad.status == 400

    out = await client.post("/staff/logout", headers=cookie, allow_redirects=False)
    assert out.status == 303 and "donations_staff=" in out.headers["Set-Cookie"]


async def _chromium(*args: str) -> tuple[int, bytes]:
    profile = tempfile.mkdtemp(prefix="donations-chromium-")
    try:
        process = await asyncio.create_subprocess_exec(
            str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            "--no-first-run", f"--user-data-dir={profile}", *args,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL)
        out, _ = await asyncio.wait_for(process.communicate(), timeout=60)
        assert process.returncode is not None
        return process.returncode, out
    finally:
        shutil.rmtree(profile, ignore_errors=True)


@pytest.mark.skipif(not CHROMIUM.exists(), reason="/usr/bin/chromium is not installed "
                    "(apt-get install chromium); the page's HTML is still tested above")
async def test_the_page_renders_in_headless_chromium(
    client: Client, pool: asyncpg.Pool, tmp_path: Path
) -> None:
    await _ledger(client)
    # The login page, live from the service.
    login_png = tmp_path / "login.png"
    code, _ = await _chromium(f"--screenshot={login_png}", "--window-size=1000,700",
                              str(client.make_url("/staff/")))
    assert code == 0 and login_png.stat().st_size > 5_000

    # The dashboard as the service served it to a signed-in browser (a command-line Chromium
    # cannot be handed the cookie), rendered from a file: it needs nothing else to load.
    cookie = await _signed_in(client, pool)
    html = await (await client.get("/staff/?month=2026-11", headers=cookie)).text()
    page = tmp_path / "staff.html"
    page.write_text(html, "utf-8")
    code, dom = await _chromium("--dump-dom", page.as_uri())
    assert code == 0
    rendered = dom.decode()
    assert "<svg" in rendered and "November 2026" in rendered and "<script" not in rendered
    shot = tmp_path / "staff.png"
    code, _ = await _chromium(f"--screenshot={shot}", "--window-size=1100,1400", page.as_uri())
    assert code == 0
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 20_000


async def test_a_refused_sign_in_is_the_sign_in_page_again_with_its_status(
    client: Client, pool: asyncpg.Pool
) -> None:
    """A refused staff sign-in (a wrong token: 401; no token: 400; the 21st failure: 429) is
    answered, as a browser form should be, with the sign-in page again and the right status
    (the README names it beside the JSON error shape every other answer has)."""
    refused = []
    for data in ({"token": "dnt_not_a_token"}, {}):
        response = await client.post("/staff/login", data=data, allow_redirects=False)
        refused.append((response.status, response.content_type, await response.text()))
    for _ in range(20):
        await client.post("/staff/login", data={"token": "dnt_not_a_token"},
                          allow_redirects=False)
    response = await client.post("/staff/login", data={"token": "dnt_not_a_token"},
                                 allow_redirects=False)
    refused.append((response.status, response.content_type, await response.text()))
    assert [status for status, _, _ in refused] == [401, 400, 429]
    for status, content_type, body in refused:
        assert content_type == "text/html", (status, content_type, body[:80])
        assert "<form" in body, (status, body[:200])
