"""create_app(settings): the one place the service is assembled, and its operational endpoints."""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from http import HTTPStatus

import stripe
import structlog
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_request import BaseRequest

from donations import (
    auth,
    campaigns,
    checkout,
    coupons,
    db,
    fees,
    openapi,
    payouts,
    portal,
    reconcile,
    reports,
    staff_page,
    store,
    stripe_api,
    tasks,
    totals_api,
    webhooks,
)
from donations import embed as embed_widget
from donations.appkeys import (
    METRICS,
    MIGRATIONS,
    OFFER,
    POOL,
    SEATS,
    SETTINGS,
    STRIPE,
    STRIPE_BACKGROUND,
)
from donations.errors import ApiError, client_hung_up
from donations.ledger import FoundingOffer
from donations.logging import REQUEST_ID, parser_reason
from donations.metrics import Metrics, gauge
from donations.seats import FoundingSeats
from donations.settings import Settings
from donations.stripe_api import make_client

log = structlog.get_logger(__name__)
_log_requests = logging.getLogger(__name__)  # the standard logger `log` writes through

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
# Methods counted by name in the request metrics; any other a client makes up is "other", so
# that nobody can add series to /metrics at will.
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")

routes = web.RouteTableDef()


def create_app(settings: Settings) -> web.Application:
    metrics = Metrics()
    app = web.Application(client_max_size=webhooks.MAX_BODY)
    app[SETTINGS] = settings
    app[METRICS] = metrics
    app[OFFER] = FoundingOffer(settings.founding_coupon_id, settings.founding_percent_off)
    app[SEATS] = FoundingSeats(settings.founding_seats, settings.founding_coupon_id)
    app[MIGRATIONS] = db.load_migrations()
    app[auth.FAILED_ATTEMPTS] = auth.FailedAttempts()
    app.cleanup_ctx.extend([database, webhooks.event_groups, stripe_client,
                            balance_transaction_worker])
    app.cleanup_ctx.append(payout_worker)
    app.cleanup_ctx.append(coupon_worker)
    app.cleanup_ctx.append(reconciliation_schedule)
    app.cleanup_ctx.append(checkout.maintenance)
    app.cleanup_ctx.append(totals_api.totals_context)
    install_routes(app, metrics, [
        routes, webhooks.routes, campaigns.routes, checkout.routes, portal.routes,
        reports.routes, payouts.routes, reconcile.routes, staff_page.routes, totals_api.routes,
        embed_widget.routes,
    ])
    return app


# --- resources ------------------------------------------------------------------------------


async def database(app: web.Application) -> AsyncIterator[None]:
    """The pool, after migrations; an embedded PostgreSQL when no DATABASE_URL is given."""
    settings = app[SETTINGS]
    embedded: db.EmbeddedPostgres | None = None
    if settings.database_url is None:
        # (stopped or failed while starting, it stops what it started)
        dsn, embedded = await db.start_embedded(settings.data_dir)
        log.info("embedded_postgres_started", data_dir=str(embedded.data_dir))
    else:
        dsn = settings.database_url.reveal()
    try:
        applied = await db.migrate(dsn, app[MIGRATIONS])
        if applied:
            log.info("migrations_applied", migrations=applied)
        app[POOL] = await db.create_pool(dsn)
        try:
            yield
        finally:
            await app[POOL].close()
    finally:
        if embedded is not None:
            await asyncio.to_thread(embedded.stop)
            log.info("embedded_postgres_stopped")


async def stripe_client(app: web.Application) -> AsyncIterator[None]:
    reader = stripe.AIOHTTPClient(timeout=stripe_api.READER_TIMEOUT)
    background = stripe.AIOHTTPClient(timeout=stripe_api.BACKGROUND_TIMEOUT)
    app[STRIPE] = make_client(app[SETTINGS], reader,
                              max_network_retries=stripe_api.READER_RETRIES)
    app[STRIPE_BACKGROUND] = make_client(app[SETTINGS], background)
    yield
    for http_client in (reader, background):
        await http_client.close_async()  # type: ignore[no-untyped-call]  # unannotated upstream


async def balance_transaction_worker(app: web.Application) -> AsyncIterator[None]:
    client = app[STRIPE_BACKGROUND]
    if client is None:  # without a key, fees stay unknown; the rest of the service works
        yield
        return
    async with tasks.running(
        fees.worker(app[POOL], client, app[METRICS], app[SETTINGS].fee_worker_interval),
        "balance-transaction-worker",
    ):
        yield


async def coupon_worker(app: web.Application) -> AsyncIterator[None]:
    """Looks up the terms of coupons that discounts name (see donations/coupons.py); without a
    key it still ends the look-ups of coupons whose events have come."""
    async with tasks.running(
        coupons.worker(app[POOL], app[STRIPE_BACKGROUND], app[OFFER],
                       app[SETTINGS].fee_worker_interval),
        "coupon-worker",
    ):
        yield


async def payout_worker(app: web.Application) -> AsyncIterator[None]:
    """Fetches each paid or failed payout's balance transactions (see donations/payouts.py)."""
    client = app[STRIPE_BACKGROUND]
    if client is None:  # without a key, payouts are listed but not yet tied to their parts
        yield
        return
    async with tasks.running(
        payouts.worker(app[POOL], client, app[SETTINGS].payout_worker_interval), "payout-worker"
    ):
        yield


async def reconciliation_schedule(app: web.Application) -> AsyncIterator[None]:
    """Reconciles with Stripe every RECONCILE_INTERVAL, one replica at a time."""
    client, interval = app[STRIPE_BACKGROUND], app[SETTINGS].reconcile_interval
    if client is None or interval <= 0:
        yield
        return
    async with tasks.running(
        reconcile.periodic(app[POOL], client, app[OFFER], interval), "reconciliation"
    ):
        yield


# --- every request -------------------------------------------------------------------------


def install_routes(
    app: web.Application, metrics: Metrics, tables: Iterable[web.RouteTableDef]
) -> None:
    """Add the routes, each handler wrapped in the request context (request id, error shapes,
    CORS, metrics, the request line), and last a catch-all that answers, in the same way, what
    no route matches (404) or matches with another method (405).

    A wrapper per route rather than a middleware: aiohttp runs a middleware through two more
    coroutines per request (its own, which it adds as soon as there is one, and ours), which cost
    the public totals about a tenth of their speed (benchmarks/README.md)."""
    context = request_context(metrics)
    for table in tables:
        for route in table:
            assert isinstance(route, web.RouteDef), route  # no static files are served
            web.RouteDef(route.method, route.path, context(route.handler, route.path),
                         route.kwargs).register(app.router)
    app.router.add_route("*", "/{path:.*}", context(_no_route, UNMATCHED), name="unmatched")


UNMATCHED = "unmatched"  # the route label of what no route answers


async def _no_route(request: web.Request) -> web.StreamResponse:
    """What no route matches: 404, or 405 naming the methods of the route whose path matched."""
    allowed: set[str] = set()
    for resource in request.app.router.resources():
        if resource.name != UNMATCHED:
            _, methods = await resource.resolve(request)
            allowed |= methods
    if allowed:
        raise web.HTTPMethodNotAllowed(request.method, allowed)
    raise web.HTTPNotFound()


def request_context(metrics: Metrics) -> Callable[[Handler, str], Handler]:
    """What every request passes through, so kept cheap: request id, one log line per request,
    metrics, every error in the contract's shape, and the CORS headers of the public paths and
    of checkout (errors included). `route` is the route's path, the metrics' label; what it
    needs is worked out from it once, not per request."""

    def wrap(handler: Handler, route: str) -> Handler:
        # which CORS headers the route's answers get; what no route matches: by its own path
        by_route = route != UNMATCHED
        cors = _cors_of(route) if by_route else None
        cells = metrics.route_cells(route)

        async def in_context(request: web.Request) -> web.StreamResponse:
            given = request.headers.get("X-Request-ID")
            request_id = given if given and _REQUEST_ID.fullmatch(given) else _request_ids.next()
            started = time.perf_counter()
            # in every line logged while the request runs (donations/logging.py), and in a
            # streamed answer's headers (reports.stream_response sets it before they leave);
            # nothing to clear at the end: the request's task, and its copy of the context,
            # end with it
            REQUEST_ID.set(request_id)
            try:
                response = await handler(request)
            except web.HTTPException as exc:
                if exc.status < 400:
                    # a redirect goes out as it is, raised (aiohttp's way), once counted
                    exc.headers["X-Request-ID"] = request_id
                    finish(request, exc, started)
                    raise
                response = error_answer(request, exc)
            except Exception as exc:
                response = error_answer(request, exc)
            if not response.prepared:  # (a streamed answer's headers are sent already)
                response.headers["X-Request-ID"] = request_id
            finish(request, response, started)
            return response

        def finish(request: web.Request, response: web.StreamResponse, started: float) -> None:
            """CORS headers, the metrics and the request's log line."""
            add_cors = cors if by_route else _cors_of(request.path)
            if add_cors is not None:
                add_cors(request, response)
            elapsed = time.perf_counter() - started
            method = request.method
            cells.add(method if method in _METHODS else "other", response.status, elapsed)
            # the line's arguments are not even made when it would not be written
            if _log_requests.isEnabledFor(logging.INFO):
                log.info("request", method=method, path=request.path, status=response.status,
                         duration_ms=round(elapsed * 1000, 2))

        return in_context

    return wrap


def _cors_of(path: str) -> Callable[[web.Request, web.StreamResponse], None] | None:
    """What adds the CORS headers to answers on `path`: public (any page), the site's, or none."""
    if totals_api.is_public(path):
        return totals_api.add_cors
    if checkout.has_site_cors(path):
        return checkout.add_cors
    return None


class _RequestIds:
    """Request ids: 16 random hex digits per process (drawn again in a forked child) and a
    16-digit counter. Unique and cheap; an id is not a secret."""

    def __init__(self) -> None:
        self.draw()

    def draw(self) -> None:
        self.prefix = os.urandom(8).hex()
        self.counter = itertools.count()

    def next(self) -> str:
        return f"{self.prefix}{next(self.counter):016x}"


_request_ids = _RequestIds()
os.register_at_fork(after_in_child=_request_ids.draw)


# nginx's "client closed request": what the metrics and the request's log line say of a request
# whose client went away before it was read whole (no answer can reach it)
CLIENT_CLOSED_REQUEST = 499


def error_answer(request: web.Request, exc: Exception) -> web.Response:
    """An error in the contract's shape (called while it is being handled, for log.exception)."""
    if client_hung_up(request, exc):
        # aiohttp's "Connection lost" from reading the body of a client that hung up (a
        # timeout of Stripe's, a reader who closed the tab): nothing of ours failed
        log.info("client_disconnected", method=request.method, path=request.path)
        return web.Response(status=CLIENT_CLOSED_REQUEST)
    if isinstance(exc, ApiError):
        if exc.status >= 500:
            log.warning("request_failed", code=exc.code)
        return web.json_response(exc.body(), status=exc.status, headers=exc.headers)
    if isinstance(exc, web.RequestPayloadError):
        # aiohttp could not read the body as sent (a Content-Encoding that does not decode: gzip
        # on bytes that are not gzip): the client's fault, whichever handler was reading. The
        # rest of the body cannot be read either, so the connection is closed after the answer
        # (what follows is no next request), and the body is marked read: otherwise aiohttp,
        # once the answer is sent, reads it again to drain it and logs the same failure as an
        # "Unhandled exception" with its traceback
        response = web.json_response(
            {"error": {"code": "malformed_body",
                       "message": "the body could not be read (its Content-Encoding)"}},
            status=400,
        )
        response.force_close()
        request.content.feed_eof()
        return response
    if isinstance(exc, web.HTTPException):
        return _http_error_answer(exc)
    if isinstance(exc, db.DatabaseUnavailable):
        log.warning("database_unavailable", error=str(exc))
        return web.json_response(
            {"error": {"code": "database_unavailable",
                       "message": "the database is unavailable; try again shortly"}},
            status=503, headers={"Retry-After": "5"},
        )
    if isinstance(exc, db.DatabaseBusy):
        log.warning("database_busy", error=str(exc))
        return web.json_response(
            {"error": {"code": "database_busy",
                       "message": "the database is too busy right now; try again shortly"}},
            status=503, headers={"Retry-After": "2"},
        )
    log.exception("request_crashed", method=request.method, path=request.path)
    return web.json_response(
        {"error": {"code": "internal_error", "message": "something went wrong on our side"}},
        status=500,
    )


class Runner(web.AppRunner):
    """aiohttp's AppRunner, whose connections answer what never reaches a route as the service
    answers everything else (`_ConnectionHandler`)."""

    async def _make_server(self) -> web.Server:
        server = await super()._make_server()
        server.__class__ = _Server  # the one that makes the connections' handlers: ours
        return server


class _Server(web.Server):
    def __call__(self) -> RequestHandler:
        # (aiohttp's own __call__, with our handler: no subclass hook is offered)
        return _ConnectionHandler(self, loop=self._loop, **self._kwargs)


class _ConnectionHandler(RequestHandler):
    """What answers a request aiohttp's HTTP parser refuses before any route sees it (a
    Content-Length that is no number or comes with chunked encoding, a header line too long, a
    NUL in a header, `OPTIONS *`), or a failure outside the routes' own handling: a JSON error in
    the contract's shape with an X-Request-ID, not aiohttp's plain text. aiohttp still logs it
    (lowered to one info line for the parser's refusals: donations/logging.py), with the id."""

    def handle_error(self, request: BaseRequest, status: int = 500,
                     exc: BaseException | None = None, message: str | None = None
                     ) -> web.StreamResponse:
        # a parser's refusal came with no headers to read an id from; a failure after a route
        # began has the route's
        request_id = (REQUEST_ID.get() if status != 400 else None) or _request_ids.next()
        REQUEST_ID.set(request_id)
        super().handle_error(request, status, exc, message)  # logs it; refuses if sent already
        if isinstance(exc, HttpProcessingError):
            code, text = "malformed_request", f"not a valid HTTP request: {parser_reason(exc)}"
        elif status >= 500:
            code, text = "internal_error", "something went wrong on our side"
        else:  # (another refusal of aiohttp's own: none is made today)
            phrase = HTTPStatus(status).phrase
            code, text = re.sub(r"[^a-z]+", "_", phrase.lower()).strip("_"), phrase
        response = web.json_response({"error": {"code": code, "message": text}}, status=status,
                                     headers={"X-Request-ID": request_id})
        response.force_close()  # what follows on the connection cannot be read either
        return response

    def data_received(self, data: bytes) -> None:
        # aiohttp's shutdown marks every connection to close and from then on drops what
        # arrives, the rest of a body being read included: the request in flight (a webhook
        # on a slow link when SIGTERM comes) would wait for it until the shutdown's timeout
        # and go unanswered. Its bytes are still taken; no request after it is served (the
        # marks are back before the handler can look for another).
        marked = (self._force_close, self._close)
        if any(marked) and self._request_in_progress and self.transport is not None:
            self._force_close = self._close = False
            try:
                super().data_received(data)
            finally:
                self._force_close = self._force_close or marked[0]
                self._close = self._close or marked[1]
            return
        super().data_received(data)

    async def finish_response(self, request: BaseRequest, resp: web.StreamResponse,
                              start_time: float | None) -> tuple[web.StreamResponse, bool]:
        if isinstance(resp, web.HTTPException) and resp.status >= 400:
            # raised before any route: a request-target no route's path can match (`OPTIONS *`)
            # (the routes answer their own errors, and let only redirects through raised)
            error = _http_error_answer(resp)
            error.headers["X-Request-ID"] = _request_ids.next()
            resp = error
        return await super().finish_response(request, resp, start_time)


def _http_error_answer(exc: web.HTTPException) -> web.Response:
    """aiohttp's 404, 405… in the contract's shape."""
    code = re.sub(r"[^a-z]+", "_", (exc.reason or "error").lower()).strip("_")
    return web.json_response(
        {"error": {"code": code, "message": exc.reason}}, status=exc.status,
        headers={k: v for k, v in exc.headers.items() if k.lower() == "allow"},
    )


# --- operational endpoints ------------------------------------------------------------------


@routes.get("/healthz")
async def healthz(request: web.Request) -> web.Response:
    """Liveness: the process answers. It does not look at the database (that is readiness)."""
    return web.json_response({"status": "ok"})


@routes.get("/readyz")
async def readyz(request: web.Request) -> web.Response:
    """Ready when the database answers and every migration on disk is applied."""
    try:
        async with db.connection(request.app[POOL], wait=2) as conn:
            pending = await db.pending_migrations(conn, request.app[MIGRATIONS])
    except db.DatabaseUnavailable:
        return web.json_response({"status": "unavailable", "database": "unreachable"}, status=503)
    except db.MigrationError as exc:
        return web.json_response({"status": "unavailable", "migrations": str(exc)}, status=503)
    if pending:
        return web.json_response(
            {"status": "unavailable", "pending_migrations": [m.name for m in pending]}, status=503
        )
    if stopped := tasks.stopped():  # logged when each stopped
        return web.json_response({"status": "unavailable", "stopped_tasks": stopped}, status=503)
    return web.json_response({"status": "ok"})


@routes.get("/metrics")
async def metrics(request: web.Request) -> web.Response:
    lines = request.app[METRICS].render()
    try:
        async with db.connection(request.app[POOL], wait=2) as conn:
            # kept by triggers (sql/025): a few rows, whatever the size of the ledger
            events = await conn.fetch(store.STORED_EVENTS)
            ledger = await conn.fetch(store.LEDGER_CONTRIBUTIONS)
            queued = await conn.fetchval(
                "SELECT count(*) FROM balance_transaction_fetches WHERE gave_up_at IS NULL")
            set_aside = await conn.fetch(
                """
                SELECT 'balance_transactions' AS queue, count(*) AS n
                  FROM balance_transaction_fetches WHERE gave_up_at IS NOT NULL
                UNION ALL
                SELECT 'payouts', count(*) FROM payout_fetches WHERE gave_up_at IS NOT NULL
                UNION ALL
                SELECT 'coupons', count(*) FROM coupon_lookups WHERE gave_up_at IS NOT NULL
                """
            )
            reconciliation = await reconcile.metrics_lines(conn)
        up = 1
    except db.DatabaseUnavailable:
        events, ledger, queued, set_aside, up, reconciliation = [], [], 0, [], 0, []
    lines += gauge("donations_database_up", "1 when PostgreSQL answered this scrape.", [((), up)])
    lines += gauge(
        "donations_stored_events", "Stored Stripe events by type and status "
        "(needs_attention: an API version whose shape is not understood).",
        [((("status", r["status"]), ("type", r["type"])), r["n"]) for r in events],
    )
    lines += gauge(
        "donations_ledger_contributions", "Successful payments in the ledger.",
        [((("currency", r["currency"]), ("kind", r["kind"])), r["n"]) for r in ledger],
    )
    lines += gauge(
        "donations_ledger_net_minor_units",
        "Contributions less refunds and disputes, in minor units of the payment currency.",
        [((("currency", r["currency"]), ("kind", r["kind"])), r["net"]) for r in ledger],
    )
    lines += gauge("donations_balance_transactions_queued",
                   "Balance transactions waiting to be fetched from Stripe.", [((), queued)])
    lines += gauge(
        "donations_stripe_lookups_set_aside",
        "Look-ups at Stripe set aside after repeated 'no such object' answers, by queue "
        "(donations lookups retry puts them back).",
        [((("queue", r["queue"]),), r["n"]) for r in set_aside],
    )
    lines += reconciliation
    return web.Response(
        body=("\n".join(lines) + "\n").encode(),
        headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8",
                 "Cache-Control": "no-store"},
    )


@routes.get("/openapi.json")
async def openapi_json(request: web.Request) -> web.Response:
    return web.json_response(openapi.SPEC)
