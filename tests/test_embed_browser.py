"""A real browser (headless Chromium) shows the widget and the SVG from a running service."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import shutil
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest
from aiohttp import web
from pytest_aiohttp import AiohttpServer

from tests.conftest import Client
from tests.fakestripe.world import World
from tests.test_staff import _bearer, _token
from tests.webhook_helpers import post_all

CHROMIUM = next(
    (p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None
)
pytestmark = pytest.mark.skipif(
    CHROMIUM is None,
    reason="no Chromium installed (Debian: apt-get install chromium; .ci/run installs it)",
)


class DevTools:
    """Just enough of the Chrome DevTools Protocol: send a command, await its answer."""

    def __init__(self, socket: aiohttp.ClientWebSocketResponse) -> None:
        self._socket = socket
        self._ids = itertools.count(1)

    async def send(self, method: str, **params: Any) -> dict[str, Any]:
        message_id = next(self._ids)
        await self._socket.send_json({"id": message_id, "method": method, "params": params})
        while True:
            message = await self._socket.receive_json(timeout=20)
            if message.get("id") == message_id:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                result: dict[str, Any] = message.get("result", {})
                return result

    async def evaluate(self, expression: str) -> Any:
        answer = await self.send("Runtime.evaluate", expression=expression, returnByValue=True)
        return answer["result"].get("value")


@contextlib.asynccontextmanager
async def chromium(profile: Path) -> AsyncIterator[DevTools]:
    """Headless Chromium with a fresh profile, driven over its DevTools websocket."""
    assert CHROMIUM is not None
    process = await asyncio.create_subprocess_exec(
        CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        "--no-first-run", "--no-default-browser-check", f"--user-data-dir={profile}",
        "--remote-debugging-port=0", "--remote-debugging-address=127.0.0.1",
        "--window-size=800,600", "about:blank",
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
    )
    try:
        port_file = profile / "DevToolsActivePort"
        deadline = time.monotonic() + 30
        while not port_file.exists() or not port_file.read_text().strip():
            if process.returncode is not None or time.monotonic() > deadline:
                raise RuntimeError("Chromium did not start its DevTools endpoint")
            await asyncio.sleep(0.1)
        port = int(port_file.read_text().splitlines()[0])
        async with aiohttp.ClientSession() as session:
            async with session.get(f"http://127.0.0.1:{port}/json/list") as response:
                pages = [t for t in await response.json() if t["type"] == "page"]
            async with session.ws_connect(pages[0]["webSocketDebuggerUrl"],
                                          max_msg_size=0) as socket:
                yield DevTools(socket)
    finally:
        if process.returncode is None:
            process.terminate()
            try:
                await asyncio.wait_for(process.wait(), 10)
            except TimeoutError:
                process.kill()
                await process.wait()


HOST_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Support us</title></head>
<body>
<h2>A news site</h2>
<div data-donations-campaign="winter" id="widget"></div>
<img id="bar" alt="" src="{service}/v1/campaigns/winter/progress.svg?width=500">
<iframe id="frame" src="{service}/embed/winter" width="500" height="110"></iframe>
<script src="{service}/embed.js" async></script>
</body></html>
"""


async def test_chromium_renders_the_widget_the_svg_and_the_iframe(
    client: Client, pool: asyncpg.Pool, aiohttp_server: AiohttpServer, tmp_path: Path
) -> None:
    token = await _token(pool, "admin", "admin")
    created = await client.post("/v1/campaigns", headers=_bearer(token), json={
        "slug": "winter", "title": "Winter appeal",
        "goal": {"amount": 5_000_000, "currency": "gbp"}})
    assert created.status == 201
    world = World(seed=430)
    world.one_off(1_234_500, "gbp", campaign="winter", email="ann@example.org")
    world.one_off(500, "gbp", campaign="winter", email="bob@example.org")
    await post_all(client, world.events)

    service = str(client.make_url("")).rstrip("/")

    async def host(request: web.Request) -> web.Response:
        return web.Response(text=HOST_PAGE.format(service=service), content_type="text/html")

    site = web.Application()
    site.router.add_get("/", host)
    host_server = await aiohttp_server(site)  # another origin: the widget reads through CORS
    try:
        async with chromium(tmp_path / "profile") as browser:
            await browser.send("Page.enable")
            await browser.send("Page.navigate", url=str(host_server.make_url("/")))
            state = None
            for _ in range(150):
                state = await browser.evaluate(
                    "document.getElementById('widget')"
                    " && document.getElementById('widget').dataset.donationsState")
                if state in ("ready", "error"):
                    break
                await asyncio.sleep(0.1)
            assert state == "ready"
            text = await browser.evaluate("document.getElementById('widget').innerText")
            assert "Winter appeal" in text
            assert "£12,350 raised of £50,000 · 2 supporters" in text
            bar = await browser.evaluate(
                "document.querySelector('#widget .donations-fill').style.width")
            assert bar == "24%"
            image = await browser.evaluate(
                "(() => { const i = document.getElementById('bar');"
                " return [i.complete, i.naturalWidth, i.naturalHeight]; })()")
            assert image[0] is True and image[1] == 500 and image[2] > 0
            screenshot = await browser.send("Page.captureScreenshot", format="png")
            png = base64.b64decode(screenshot["data"])
            assert png.startswith(b"\x89PNG")
            (tmp_path / "embed.png").write_bytes(png)
    finally:
        shutil.rmtree(tmp_path / "profile", ignore_errors=True)
