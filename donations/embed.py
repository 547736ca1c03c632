"""The embeddable widget: a tiny page for an iframe, and a script that fills divs on any page."""

from __future__ import annotations

import hashlib
from html import escape

from aiohttp import web

from donations import display
from donations.appkeys import SETTINGS, TOTALS
from donations.errors import NotFound
from donations.totals import Totals
from donations.totals_api import campaign_scope, etag_of, respond, scope_totals

routes = web.RouteTableDef()

# Nothing in the page runs or loads anything; it reloads itself every minute.
PAGE_POLICY = "default-src 'none'; style-src 'unsafe-inline'"

_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width,initial-scale=1">
<meta http-equiv="refresh" content="60">
<title>{heading}</title>
<style>
body{{margin:0;padding:8px;font:15px/1.4 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;
color:#1f2937;background:transparent}}
h1{{font-size:16px;margin:0 0 4px}}p{{margin:0 0 6px}}
.bar{{height:10px;border-radius:5px;background:#e5e7eb;overflow:hidden}}
.fill{{height:100%;background:#0a7c53}}
</style></head>
<body><div class="donations-widget">
<h1>{heading}</h1>
<p class="summary">{summary}</p>
{bar}
</div></body></html>
"""

_BAR = (
    '<div class="bar" role="progressbar" aria-label="{heading}" aria-valuemin="0" '
    'aria-valuemax="100" aria-valuenow="{percent}"><div class="fill" style="width:{percent}%">'
    "</div></div>"
)


def page(totals: Totals) -> str:
    """The widget as a whole HTML page; every text escaped."""
    heading = escape(display.heading(totals))
    bar = _BAR.format(heading=heading, percent=display.percent_filled(totals)) \
        if totals.goal else ""
    return _PAGE.format(heading=heading, summary=escape(display.summary(totals)), bar=bar)


# Fills every <div data-donations-campaign="slug"> ("" for all contributions) with the heading,
# the summary line and a progress bar, from this service's JSON (CORS *), and again every minute.
# Text goes in through textContent only; no framework; kept well under 5 KB.
SCRIPT = """(function () {
  "use strict";
  var me = document.currentScript;
  var base = me && me.src ? new URL(me.src).origin : "";
  var SLUG = /^[a-z0-9][a-z0-9-]{0,62}$/;
  function part(el, tag, cls) {
    var node = el.querySelector("." + cls);
    if (!node) {
      node = document.createElement(tag);
      node.className = cls;
      el.appendChild(node);
    }
    return node;
  }
  function render(el, t) {
    var d = t.display;
    part(el, "strong", "donations-heading").textContent = d.heading;
    part(el, "div", "donations-summary").textContent = d.summary;
    if (t.goal) {
      var bar = part(el, "div", "donations-bar");
      bar.setAttribute("role", "progressbar");
      bar.setAttribute("aria-valuemin", "0");
      bar.setAttribute("aria-valuemax", "100");
      bar.setAttribute("aria-valuenow", String(d.percent_filled));
      bar.setAttribute("aria-label", d.heading);
      bar.style.cssText = "height:10px;border-radius:5px;background:#e5e7eb;overflow:hidden";
      var fill = part(bar, "div", "donations-fill");
      fill.style.cssText = "height:100%;background:#0a7c53;width:" + d.percent_filled + "%";
    }
    el.setAttribute("data-donations-state", "ready");
  }
  function load(el) {
    var slug = el.getAttribute("data-donations-campaign") || "";
    if (slug && !SLUG.test(slug)) { el.setAttribute("data-donations-state", "error"); return; }
    var url = base + (slug ? "/v1/campaigns/" + slug + "/totals" : "/v1/totals");
    fetch(url, {mode: "cors", credentials: "omit"})
      .then(function (r) { if (!r.ok) throw new Error(r.status); return r.json(); })
      .then(function (t) { render(el, t); })
      .catch(function () { el.setAttribute("data-donations-state", "error"); });
  }
  function all() {
    var els = document.querySelectorAll("div[data-donations-campaign]");
    for (var i = 0; i < els.length; i++) load(els[i]);
  }
  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", all);
  else all();
  setInterval(all, 60000);
})();
"""
_SCRIPT_BODY = SCRIPT.encode()
_SCRIPT_ETAG = '"' + hashlib.sha256(_SCRIPT_BODY).hexdigest()[:24] + '"'


_NOT_FOUND_PAGE = (b'<!doctype html><html lang="en"><head><meta charset="utf-8">'
                   b"<title>Campaign not found</title></head><body><p>This campaign does not "
                   b"exist (any more).</p></body></html>")


@routes.get("/embed/{slug}")
async def embed_page(request: web.Request) -> web.Response:
    try:
        entry = await scope_totals(request, campaign_scope(request.match_info["slug"]))
    except NotFound:  # shown inside the site's iframe: a page, not the API's JSON
        # (kept no longer than the figures: a campaign made just after shows within the TTL)
        return web.Response(body=_NOT_FOUND_PAGE, status=404, headers={
            "Content-Type": "text/html; charset=utf-8", "Content-Security-Policy": PAGE_POLICY,
            "Cache-Control": f"public, max-age={request.app[SETTINGS].totals_ttl}"})
    assert entry.totals is not None
    return respond(request, page(entry.totals).encode(), etag_of(entry.etag, "embed"),
                   "text/html; charset=utf-8", {"Content-Security-Policy": PAGE_POLICY},
                   request.app[TOTALS].age(entry))


@routes.get("/embed.js")
async def embed_script(request: web.Request) -> web.Response:
    # the script changes only with a release: caches may keep it longer than the figures
    return respond(request, _SCRIPT_BODY, _SCRIPT_ETAG, "text/javascript; charset=utf-8",
                   {"Cache-Control": "public, max-age=300, stale-while-revalidate=86400"})
