"""GET /v1/totals, a campaign's totals and progress bars: from memory, cacheable, CORS *."""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime

import asyncpg
import structlog
from aiohttp import web
from multidict import CIMultiDict

from donations import campaigns, db, display, inputs, store, svg, tasks, totals
from donations.appkeys import POOL, SETTINGS, TOTALS
from donations.errors import NotFound
from donations.settings import Settings

log = structlog.get_logger(__name__)

routes = web.RouteTableDef()

# How long a refresh that failed (the database away) may keep serving the figures it has.
MAX_STALE_SECONDS = 600
MAX_ENTRIES = 1000  # scopes held in memory (the global one and campaigns'), bounded
PUBLIC_PREFIXES = ("/v1/totals", "/embed")
JSON = "application/json; charset=utf-8"


@dataclass(frozen=True, slots=True)
class Entry:
    """One scope's figures as last read, ready to send: the JSON body and its headers."""

    totals: totals.Totals | None  # None: no such campaign
    body: bytes
    etag: str
    as_of: datetime
    fetched: float  # monotonic seconds
    # made once per refresh, not per request (a CIMultiDict is the quickest for aiohttp to copy)
    headers: CIMultiDict[str] = field(default_factory=CIMultiDict)  # a 304's: caching, ETag
    json_headers: CIMultiDict[str] = field(default_factory=CIMultiDict)  # the 200's: and type
    # the same with an `Age` (whole seconds since the figures were read), made once for each
    aged: dict[int, tuple[CIMultiDict[str], CIMultiDict[str]]] = field(default_factory=dict)

    def headers_at(self, age: int) -> tuple[CIMultiDict[str], CIMultiDict[str]]:
        """A 304's and a 200's headers `age` seconds after the figures were read: a cache
        downstream counts its max-age from then, not from when it got them (else figures
        already near the TTL old would be kept for another whole TTL)."""
        if age <= 0:
            return self.headers, self.json_headers
        if (found := self.aged.get(age)) is None:
            found = (_aged(self.headers, age), _aged(self.json_headers, age))
            if len(self.aged) < _AGES_KEPT:  # (figures served stale through an outage age on)
                self.aged[age] = found
        return found


_AGES_KEPT = 64  # an entry's headers kept made for this many ages (a TTL's worth, usually)


def _aged(headers: CIMultiDict[str], age: int) -> CIMultiDict[str]:
    aged = CIMultiDict(headers)
    aged["Age"] = str(age)
    return aged


def etag_of(*parts: str) -> str:
    # Weak: the body's `as_of` moves with every refresh while the figures stay the same.
    return 'W/"' + hashlib.sha256("\x00".join(parts).encode()).hexdigest()[:24] + '"'


def render(figures: totals.Totals, as_of: datetime) -> tuple[bytes, str]:
    """The JSON body and its ETag (of the figures only)."""
    document = figures.figures_json()
    tag = etag_of(json.dumps(document, sort_keys=True))
    document["display"] = _display(figures)
    document["as_of"] = inputs.rfc3339(as_of.replace(microsecond=0))
    return json.dumps(document, separators=(",", ":"), ensure_ascii=False).encode(), tag


def _display(figures: totals.Totals) -> dict[str, object]:
    """The same figures written for people, so that the widget formats nothing itself."""
    return {
        "heading": display.heading(figures),
        "summary": display.summary(figures),
        "raised": display.money(figures.raised.amount, figures.raised.currency),
        "goal": display.money(figures.goal.amount, figures.goal.currency)
        if figures.goal else None,
        "percent_filled": display.percent_filled(figures),
    }


class TotalsCache:
    """Each scope's figures, read at most once per TTL however many requests ask (single-flight).

    A request that finds its scope older than the TTL waits for the one refresh in progress, so
    a change committed to the ledger shows within the TTL. When the refresh fails the figures
    held are served for up to MAX_STALE_SECONDS (then the error is raised: 503).
    """

    def __init__(
        self, pool: asyncpg.Pool, settings: Settings,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._pool = pool
        self._settings = settings
        self._ttl = settings.totals_ttl
        self._clock = clock
        self._entries: OrderedDict[str, Entry] = OrderedDict()
        self._refreshing: dict[str, asyncio.Task[Entry]] = {}
        # the campaigns' slugs, read at most once per TTL: a slug that is none of them is a 404
        # without a look-up and takes no place among the scopes held (random slugs can neither
        # load the database nor push the real campaigns' figures out)
        self._slugs: tuple[frozenset[str], float] | None = None
        self._reading_slugs: asyncio.Task[frozenset[str]] | None = None
        self._generation = 0  # moved on by clear(): a read begun before it is not kept

    def clear(self) -> None:
        """Forget every scope's figures: the next request reads them again."""
        self._entries.clear()
        self._slugs = None
        self._reading_slugs = None
        self._generation += 1

    async def _campaign_slugs(self) -> frozenset[str]:
        if self._slugs is not None and self._clock() - self._slugs[1] < self._ttl:
            return self._slugs[0]
        reading = self._reading_slugs
        if reading is None:
            reading = self._reading_slugs = asyncio.create_task(self._read_slugs())

            def done(task: asyncio.Task[frozenset[str]]) -> None:
                if self._reading_slugs is task:
                    self._reading_slugs = None

            reading.add_done_callback(done)
        return await asyncio.shield(reading)

    async def _read_slugs(self) -> frozenset[str]:
        generation = self._generation
        async with db.connection(self._pool) as conn:
            slugs = frozenset(r["slug"] for r in await conn.fetch("SELECT slug FROM campaigns"))
        if generation == self._generation:  # no campaign was created meanwhile (here)
            self._slugs = (slugs, self._clock())
        return slugs

    def age(self, entry: Entry) -> int:
        """Whole seconds since the entry's figures were read (its `Age` header)."""
        return max(0, int(self._clock() - entry.fetched))

    def fresh(self, scope: str) -> Entry | None:
        """The scope's entry if it was read within the TTL (nearly always): nothing to await."""
        entry = self._entries.get(scope)
        if entry is not None and self._clock() - entry.fetched < self._ttl:
            return entry
        return None

    async def get(self, scope: str) -> Entry:
        if (entry := self.fresh(scope)) is not None:
            return entry
        if scope != totals.GLOBAL and scope not in self._entries:
            try:
                known = await self._campaign_slugs()
            except db.DatabaseUnavailable:
                known = None  # the look-up below answers (or fails) as before
            if known is not None and scope not in known:
                return Entry(None, b"", "", datetime.now(UTC), self._clock())
        entry = self._entries.get(scope)  # too old, but served if the refresh fails
        task = self._refreshing.get(scope)
        if task is None:
            task = asyncio.create_task(self._refresh(scope))
            self._refreshing[scope] = task
            task.add_done_callback(lambda _: self._refreshing.pop(scope, None))
        try:
            # shielded: one request going away must not cancel the refresh others wait for
            return await asyncio.shield(task)
        except db.DatabaseUnavailable:
            if entry is not None and self._clock() - entry.fetched < MAX_STALE_SECONDS:
                log.warning("totals_served_stale", scope=scope)
                return entry
            raise

    async def _refresh(self, scope: str) -> Entry:
        settings = self._settings
        buckets: dict[tuple[str, str], totals.Bucket] = {}
        founding, used_up = 0, False
        async with db.connection(self._pool) as conn:
            campaign = None
            if scope != totals.GLOBAL:
                campaign = await campaigns.get(conn, scope)
            if scope == totals.GLOBAL or campaign is not None:
                buckets, founding = await totals.read_scope(conn, scope)
                used_up = await totals.offer_used_up(conn, settings.founding_coupon_id)
        as_of = datetime.now(UTC)
        if scope != totals.GLOBAL and campaign is None:
            entry = Entry(None, b"", "", as_of, self._clock())
        else:
            figures = totals.summarise(
                buckets, founding_taken=founding, offer_used_up=used_up,
                reporting_currency=settings.reporting_currency,
                founding_seats=settings.founding_seats, campaign=campaign,
            )
            body, tag = render(figures, as_of)
            headers = CIMultiDict(cache_headers(settings, tag), **PUBLIC_HEADERS, Age="0")
            entry = Entry(figures, body, tag, as_of, self._clock(), headers,
                          CIMultiDict(headers, **{"Content-Type": JSON}))
        self._entries[scope] = entry
        self._entries.move_to_end(scope)
        while len(self._entries) > MAX_ENTRIES:
            self._entries.popitem(last=False)
        return entry


# --- HTTP -----------------------------------------------------------------------------------


def cache_headers(settings: Settings, etag: str) -> dict[str, str]:
    ttl = settings.totals_ttl
    return {
        "Cache-Control": f"public, max-age={ttl}, stale-while-revalidate={max(60, 6 * ttl)}, "
                         f"stale-if-error={MAX_STALE_SECONDS}",
        "ETag": etag,
    }


def not_modified(request: web.Request, etag: str) -> bool:
    """If-None-Match names this ETag (weak comparison, as RFC 9110 asks for GET) or is *."""
    given = request.headers.get("If-None-Match")
    if not given:
        return False
    if given.strip() == "*":
        return True
    mine = etag.removeprefix("W/")
    return any(tag.strip().removeprefix("W/") == mine for tag in given.split(","))


def respond(
    request: web.Request, body: bytes, etag: str, content_type: str,
    extra: dict[str, str] | None = None, age: int | None = None,
) -> web.Response:
    """An answer made from figures read `age` seconds ago (its `Age`: see Entry.headers_at)."""
    headers = cache_headers(request.app[SETTINGS], etag)
    if extra:
        headers.update(extra)
    if age is not None:
        headers["Age"] = str(age)
    if not_modified(request, etag):
        return web.Response(status=304, headers=headers)
    headers["Content-Type"] = content_type
    return web.Response(body=body, headers=headers)


def campaign_scope(slug: str) -> str:
    """A campaign's scope: its slug; 404 for what cannot be one (the global scope's "*" among
    them, so that a campaign URL never answers with everything's totals)."""
    if not campaigns.SLUG.match(slug):
        raise NotFound("campaign_not_found", "no campaign has that slug")
    return slug


async def scope_totals(request: web.Request, scope: str) -> Entry:
    """The scope's entry (GLOBAL, or a slug `campaign_scope` let through); 404 for a campaign
    that does not exist."""
    entry = await request.app[TOTALS].get(scope)
    if entry.totals is None:
        raise NotFound("campaign_not_found", "no campaign has that slug")
    return entry


def respond_json(request: web.Request, entry: Entry) -> web.Response:
    """A scope's JSON: `respond` with the headers made once per refresh (and age), not per
    request."""
    headers, json_headers = entry.headers_at(request.app[TOTALS].age(entry))
    if "If-None-Match" in request.headers and not_modified(request, entry.etag):
        return web.Response(status=304, headers=headers)
    return web.Response(body=entry.body, headers=json_headers)


# The two JSON answers take fresh figures (nearly always) without awaiting anything; else, or for
# a campaign that does not exist, scope_totals reads them or answers 404.


@routes.get("/v1/totals")
async def all_totals(request: web.Request) -> web.Response:
    entry = request.app[TOTALS].fresh(totals.GLOBAL)
    if entry is None:
        entry = await scope_totals(request, totals.GLOBAL)
    return respond_json(request, entry)


@routes.get("/v1/campaigns/{slug}/totals")
async def campaign_totals(request: web.Request) -> web.Response:
    slug = campaign_scope(request.match_info["slug"])
    entry = request.app[TOTALS].fresh(slug)
    if entry is None or entry.totals is None:
        entry = await scope_totals(request, slug)
    return respond_json(request, entry)


async def _progress(request: web.Request, scope: str) -> web.Response:
    style = svg.parse_style(request.query)
    entry = await scope_totals(request, scope)
    assert entry.totals is not None
    return respond(
        request, svg.progress_svg(entry.totals, style).encode(),
        etag_of(entry.etag, style.key()), "image/svg+xml; charset=utf-8",
        # an SVG opened on its own is a document: nothing in it may run or load
        {"Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'"},
        request.app[TOTALS].age(entry),
    )


@routes.get("/v1/totals/progress.svg")
async def all_progress(request: web.Request) -> web.Response:
    return await _progress(request, totals.GLOBAL)


@routes.get("/v1/campaigns/{slug}/progress.svg")
async def campaign_progress(request: web.Request) -> web.Response:
    return await _progress(request, campaign_scope(request.match_info["slug"]))


def is_public(path: str) -> bool:
    """The paths any web page may read (the totals, their images, the widget)."""
    return path.startswith(PUBLIC_PREFIXES) or (
        path.startswith("/v1/campaigns/") and path.endswith(("/totals", "/progress.svg"))
    )


# What every answer of a public path carries, errors and 304s included.
PUBLIC_HEADERS = {
    "Access-Control-Allow-Origin": "*",
    "Access-Control-Expose-Headers": "ETag",
    "X-Content-Type-Options": "nosniff",
}


def add_cors(request: web.Request, response: web.StreamResponse) -> None:
    """PUBLIC_HEADERS on an answer of a public path that lacks them (added by the request
    context, donations/app.py, once the answer, or the error's, is made). The totals' JSON
    answers have them already, among the headers made once per refresh."""
    headers = response.headers
    if "Access-Control-Allow-Origin" not in headers:
        headers["Access-Control-Allow-Origin"] = "*"
        headers["Access-Control-Expose-Headers"] = "ETag"
        headers.setdefault("X-Content-Type-Options", "nosniff")


async def preflight(request: web.Request) -> web.Response:
    """The answer to a browser's CORS preflight for a public path."""
    return web.Response(status=204, headers={
        "Access-Control-Allow-Methods": "GET, HEAD, OPTIONS",
        "Access-Control-Allow-Headers": "If-None-Match, Cache-Control",
        "Access-Control-Max-Age": "86400",
    })


for _path in ("/v1/totals", "/v1/totals/progress.svg", "/v1/campaigns/{slug}/totals",
              "/v1/campaigns/{slug}/progress.svg", "/embed/{slug}", "/embed.js"):
    routes.options(_path)(preflight)


# --- background -----------------------------------------------------------------------------


async def compactor(pool: asyncpg.Pool, interval: float) -> None:
    """Fold deltas into the totals until cancelled, so that reads sum only a few of them; and
    the differences of the counts /metrics shows (sql/025)."""
    while True:
        try:
            async with db.connection(pool) as conn:
                while await totals.compact(conn) > 0:
                    pass
                while await store.compact_counts(conn) > 0:
                    pass
        except db.DatabaseUnavailable:
            log.warning("totals_compaction_database_unavailable")
        except Exception:
            log.exception("totals_compaction_failed")
        await asyncio.sleep(interval)


async def totals_context(app: web.Application) -> AsyncIterator[None]:
    """The in-memory cache and the compaction task (cleanup_ctx, after the pool)."""
    app[TOTALS] = TotalsCache(app[POOL], app[SETTINGS])
    async with tasks.running(
        compactor(app[POOL], app[SETTINGS].totals_compact_interval), "totals-compactor"
    ):
        yield
