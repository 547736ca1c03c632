"""Checkout for the site's forms: Stripe Checkout Sessions for one-off and recurring support.

A request is refused as early and as cheaply as possible (no Stripe key, a foreign Origin, the
body's rules), then one statement counts it against the rate limits, checks its campaign and
claims its Idempotency-Key; for a subscription while the founding offer is open, a second one
holds a seat. Only then is Stripe asked, outside any transaction. Afterwards one statement stores
the answer with its key and ties the hold to its session, or, if Stripe failed, the hold is
released and the key freed. A request the rules refuse is counted against the rate limits too.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import re
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Literal, NoReturn
from urllib.parse import urlsplit

import asyncpg
import stripe
import structlog
from aiohttp import web
from stripe.params.checkout import SessionCreateParams

from donations import campaigns, db, idempotency, inputs, ratelimit, seats, stripe_api, tasks
from donations.appkeys import METRICS, POOL, SEATS, SETTINGS, STRIPE
from donations.errors import (
    ApiError,
    BadRequest,
    Forbidden,
    ServiceUnavailable,
    Unprocessable,
)
from donations.logging import scrubbed
from donations.metrics import Metrics
from donations.money import Money, to_major
from donations.offer import Interval
from donations.settings import Settings

log = structlog.get_logger(__name__)

routes = web.RouteTableDef()

Kind = Literal["contribution", "subscription"]

# Stripe refuses an expiry less than 30 minutes after it creates the session; the extra minute
# absorbs clock skew and the time the request takes to reach it.
SESSION_LIFETIME = timedelta(minutes=31)
MAINTENANCE_EVERY = 60.0  # seconds between clean-ups of old keys, holds and rate-limit windows

# Stripe's metadata limits (docs.stripe.com/metadata): 50 keys, keys up to 40 characters
# without square brackets, values up to 500 characters.
METADATA_MAX_KEYS = 50
METADATA_KEY_MAX = 40
METADATA_VALUE_MAX = 500
# Keys this service writes itself; a form may not set them (a form setting founding_supporter
# would make the ledger count a seat that was never granted).
RESERVED_METADATA = frozenset({"campaign", "founding_supporter"})

_FIELDS: dict[Kind, frozenset[str]] = {
    "contribution": frozenset({"amount", "currency", "email", "campaign", "success_url",
                               "cancel_url", "metadata"}),
    "subscription": frozenset({"amount", "currency", "interval", "email", "campaign",
                               "success_url", "cancel_url", "metadata"}),
}
# RFC 5322's dot-atom: atoms of atext joined by single dots (no dot first, last or twice), at
# most 64 characters before the @; then a host name of letters, digits and hyphens
_EMAIL = re.compile(
    r"^(?=[^@]{1,64}@)[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(?:\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*@"
    r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)+$"
)
_UNSAFE_URL = re.compile(r"[\x00-\x20\x7f\\]")
_CORS_PATHS = ("/v1/checkout/",)
_CORS_HEADERS = "Content-Type, Idempotency-Key, X-Request-ID"


# --- the rules (pure) ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Order:
    """A validated checkout request."""

    kind: Kind
    amount: int
    currency: str
    interval: Interval
    success_url: str
    cancel_url: str
    email: str | None = None
    campaign: str | None = None
    metadata: dict[str, str] = field(default_factory=dict)

    @property
    def money(self) -> Money:
        return Money(self.amount, self.currency)


def parse_order(body: dict[str, Any], kind: Kind, settings: Settings) -> Order:
    """The body as an Order, or the error naming the first field at fault."""
    inputs.refuse_unknown(body, _FIELDS[kind])
    # its range is the currency's and interval's, checked below with the limits in the message
    amount = inputs.integer(body, "amount")
    raw_currency = body.get("currency")
    if raw_currency is None:
        raise BadRequest("missing_field", "currency is required", field="currency")
    currency = inputs.currency(raw_currency)
    table = settings.checkout_amounts
    if currency not in table.currencies:
        raise Unprocessable("unsupported_currency", "currency must be one of "
                            f"{', '.join(table.currencies)}", field="currency")
    interval: Interval = "one_off"
    if kind == "subscription":
        raw_interval = body.get("interval")
        if raw_interval is None:
            raise BadRequest("missing_field", "interval is required", field="interval")
        if raw_interval not in ("month", "year"):
            raise Unprocessable("invalid_interval", "interval must be month or year",
                                field="interval")
        interval = "month" if raw_interval == "month" else "year"
    assert amount is not None
    limits = table.limits(currency, interval)
    assert limits is not None  # build_table gives every enabled currency every interval
    if not limits.minimum <= amount <= limits.maximum:
        low, high = to_major(limits.minimum, currency), to_major(limits.maximum, currency)
        raise Unprocessable("amount_out_of_range", f"amount must be from {low} to {high} "
                            f"{currency.upper()} (in minor units: {limits.minimum} to "
                            f"{limits.maximum})", field="amount")
    email = inputs.text(body, "email", required=False, max_length=254)
    if email is not None and not _EMAIL.match(email):
        raise Unprocessable("invalid_email", "email is not an e-mail address", field="email")
    campaign = inputs.text(body, "campaign", required=False, max_length=63)
    if campaign is not None and not campaigns.SLUG.match(campaign):
        raise Unprocessable("unknown_campaign", f"there is no campaign {campaign!r}",
                            field="campaign")
    return Order(
        kind=kind,
        amount=amount,
        currency=currency,
        interval=interval,
        success_url=site_url(body, "success_url", settings.site_origins),
        cancel_url=site_url(body, "cancel_url", settings.site_origins),
        email=email,
        campaign=campaign,
        metadata=form_metadata(body.get("metadata"), reserved=len(RESERVED_METADATA)),
    )


def origin_of(url: str) -> str | None:
    """`scheme://host[:port]` of an http(s) URL, lower-case, the default port left out."""
    try:
        # ValueError: an unclosed "[", a host that normalises to "/", "?", "#", "@" or ":",
        # a port that is not a number
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        return None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return None
    host = parts.hostname.lower()
    if ":" in host:
        host = f"[{host}]"
    default = 443 if parts.scheme == "https" else 80
    return f"{parts.scheme}://{host}" + (f":{port}" if port and port != default else "")


def site_url(body: dict[str, Any], name: str, origins: tuple[str, ...]) -> str:
    """A URL on one of the site's origins: Checkout sends the reader there, so any other host
    would make this service an open redirect."""
    url = inputs.text(body, name, max_length=2000)
    assert url is not None
    origin = origin_of(url)  # None when urlsplit cannot read it
    if _UNSAFE_URL.search(url) or origin is None or urlsplit(url).username is not None:
        raise Unprocessable("invalid_url", f"{name} must be an absolute http(s) URL",
                            field=name)
    if origin not in _site_origins(origins):
        raise Unprocessable("url_not_allowed", f"{name} must be on the site "
                            "(one of SITE_ORIGINS)", field=name)
    return url


def form_metadata(value: object, *, reserved: int) -> dict[str, str]:
    """The form's own metadata (referrer, test variant…), within what Stripe accepts once the
    service's own keys are added."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise BadRequest("invalid_field", "metadata must be an object of strings",
                         field="metadata")
    if len(value) > METADATA_MAX_KEYS - reserved:
        raise Unprocessable("too_many_metadata_keys", f"metadata has at most "
                            f"{METADATA_MAX_KEYS - reserved} keys", field="metadata")
    out: dict[str, str] = {}
    for key, item in value.items():
        name = f"metadata.{key}"
        if key in RESERVED_METADATA:
            raise Unprocessable("reserved_metadata_key", f"metadata may not set {key} (use the "
                                "request's own field)", field=name)
        if not key or len(key) > METADATA_KEY_MAX or "[" in key or "]" in key:
            raise Unprocessable("invalid_metadata_key", f"metadata keys are 1 to "
                                f"{METADATA_KEY_MAX} characters without [ or ]", field=name)
        if not isinstance(item, str) or not item:
            raise Unprocessable("invalid_metadata_value", "metadata values are non-empty "
                                "strings", field=name)
        if len(item) > METADATA_VALUE_MAX:
            raise Unprocessable("invalid_metadata_value", f"metadata values are at most "
                                f"{METADATA_VALUE_MAX} characters", field=name)
        out[key] = item
    return out


def session_params(
    order: Order, settings: Settings, *, founding: bool, expires_at: int
) -> SessionCreateParams:
    """What Stripe is asked for. The campaign and the form's metadata go on the session and on
    the payment intent or subscription it makes, which is where the ledger reads them."""
    metadata = dict(order.metadata)
    if order.campaign is not None:
        metadata["campaign"] = order.campaign
    if founding:
        metadata["founding_supporter"] = "true"
    params: SessionCreateParams = {
        "success_url": order.success_url,
        "cancel_url": order.cancel_url,
        "expires_at": expires_at,
        "metadata": metadata,
    }
    if order.email is not None:
        params["customer_email"] = order.email
    if order.interval == "one_off":
        params["mode"] = "payment"
        params["submit_type"] = "donate"
        params["line_items"] = [{"quantity": 1, "price_data": {
            "currency": order.currency, "unit_amount": order.amount,
            "product": settings.stripe_one_off_product,
        }}]
        params["payment_intent_data"] = {"metadata": metadata}
    else:
        params["mode"] = "subscription"
        params["line_items"] = [{"quantity": 1, "price_data": {
            "currency": order.currency, "unit_amount": order.amount,
            "product": settings.stripe_recurring_product,
            "recurring": {"interval": order.interval},
        }}]
        params["subscription_data"] = {"metadata": metadata}
        if founding:
            params["discounts"] = [{"coupon": settings.founding_coupon_id}]
    return params


def answer(order: Order, session: dict[str, Any], *, founding: bool) -> dict[str, Any]:
    """The 201 body: the contract's fields and, for the form's convenience, what was asked."""
    expires = datetime.fromtimestamp(int(session["expires_at"]), UTC)
    body: dict[str, Any] = {
        "id": session["id"],
        "url": session["url"],
        "expires_at": inputs.rfc3339(expires),
        "amount": order.money.as_json(),
        "campaign": order.campaign,
    }
    if order.kind == "subscription":
        body["interval"] = order.interval
        body["founding_discount"] = founding
    return body


# --- HTTP ---------------------------------------------------------------------------------------


def _stripe_client(request: web.Request) -> stripe.StripeClient:
    client = request.app[STRIPE]
    if client is None:
        raise ServiceUnavailable("stripe_not_configured",
                                 "checkout needs STRIPE_SECRET_KEY, which is not set")
    return client


def _check_origin(request: web.Request, settings: Settings) -> None:
    """A browser names the page's origin; one not on the site may not start a checkout (servers,
    which send no Origin, may)."""
    origin = request.headers.get("Origin")
    if origin is not None and origin not in _allowed_origins(settings):
        raise Forbidden("origin_not_allowed", "this origin may not start a checkout")


def _allowed_origins(settings: Settings) -> frozenset[str]:
    return _browser_origins(settings.site_origins)


@functools.cache
def _site_origins(origins: tuple[str, ...]) -> frozenset[str]:
    """SITE_ORIGINS as `origin_of` writes them (worked out once: they are settings)."""
    return frozenset(o for o in (origin_of(s) for s in origins) if o)


@functools.cache
def _browser_origins(origins: tuple[str, ...]) -> frozenset[str]:
    """The Origin headers allowed: SITE_ORIGINS normalised, and as written."""
    return _site_origins(origins) | frozenset(origins)


@routes.post("/v1/checkout/contributions")
async def create_contribution(request: web.Request) -> web.Response:
    return await _create(request, "contribution")


@routes.post("/v1/checkout/subscriptions")
async def create_subscription(request: web.Request) -> web.Response:
    return await _create(request, "subscription")


# Admission, in one statement (its own transaction, not waiting for its WAL flush: a count or a
# claimed key lost in a crash costs at most a second session): count the attempt against the rate
# limits ($1 to $4: ratelimit.COUNT_CTES) and, when they let it through ($5 the overall limit)
# and its campaign ($8) exists, claim its Idempotency-Key ($6, with the body's digest $7): a new
# key, or one whose request failed, or was left pending longer than $9 by a process that died,
# with the same body. When the key could not be claimed, the request holding it comes back (as
# it was when the statement began) to say what to answer.
_ADMIT = f"""
WITH {ratelimit.COUNT_CTES},
campaign AS (
    SELECT $8::text IS NULL OR EXISTS (SELECT FROM campaigns WHERE slug = $8::text) AS known
), claim AS (
    INSERT INTO checkout_requests AS r (idempotency_key, request_hash)
    SELECT $6::text, $7::bytea FROM ip, overall, campaign
     WHERE $6::text IS NOT NULL AND ip.hits <= $4 AND overall.hits <= $5 AND campaign.known
    ON CONFLICT (idempotency_key) DO UPDATE
       SET state = 'pending', attempts = r.attempts + 1, claimed_at = now()
     WHERE r.request_hash = excluded.request_hash
       AND (r.state = 'failed' OR (r.state = 'pending' AND r.claimed_at < now() - $9::interval))
    RETURNING attempts, extract(epoch FROM created_at)::bigint AS since
)
SELECT set_config('synchronous_commit', 'off', true) AS async_commit, {ratelimit.COUNT_COLUMNS},
       (SELECT known FROM campaign) AS campaign_known,
       (SELECT attempts FROM claim) AS attempt, (SELECT since FROM claim) AS since,
       e.request_hash, e.state, e.response
  FROM (SELECT) AS one LEFT JOIN checkout_requests e ON e.idempotency_key = $6::text
"""  # noqa: S608 - constants, not input

# The answer stored with its key, and the hold tied to its session, in one statement. Not waiting
# for the WAL flush is safe here: lost in a crash, the hold still lasts until the session's
# expiry plus the grace, and the key is taken over once stale.
_DONE = """
WITH async_commit AS (SELECT set_config('synchronous_commit', 'off', true)),
held AS (
    UPDATE founding_holds SET checkout_session = $2, expires_at = $3
     WHERE id = $1 AND EXISTS (SELECT FROM async_commit) RETURNING 1)
UPDATE checkout_requests
   SET state = 'done', response = $5, checkout_session = $2
 WHERE idempotency_key = $4 AND EXISTS (SELECT FROM async_commit)
"""


async def _create(request: web.Request, kind: Kind) -> web.Response:
    app = request.app
    settings, pool, metrics = app[SETTINGS], app[POOL], app[METRICS]
    _check_origin(request, settings)  # before anything else, the key's absence included
    client = _stripe_client(request)
    bucket = ratelimit.client_network(request, settings.proxy_hops)
    try:
        # read (at most 64 KiB) before taking a pooled connection: a slow sender must not hold one
        raw = await inputs.read_json(request)
        key = idempotency.key_of(request)
        order = parse_order(raw, kind, settings)
    except ApiError:
        # every attempt counts, valid or not (a body that is not even JSON too): card
        # testers probe with anything
        async with db.connection(pool) as conn:
            await ratelimit.hit(conn, settings, metrics, bucket)
        raise

    expires_at = int(time.time() + SESSION_LIFETIME.total_seconds())
    session_end = datetime.fromtimestamp(expires_at, UTC)
    digest = idempotency.request_hash(request.path, raw) if key is not None else None
    async with db.connection(pool) as conn:
        row = await conn.fetchrow(
            _ADMIT, *ratelimit.arguments(settings, bucket), settings.checkout_rate_overall,
            key, digest, order.campaign, idempotency.STALE)
        assert row is not None
        ratelimit.enforce(row, settings, metrics)
        if not row["campaign_known"]:
            raise Unprocessable("unknown_campaign", f"there is no campaign {order.campaign!r}",
                                field="campaign")
        attempt, since = 1, 0
        if key is not None:
            if row["attempt"] is None:
                assert digest is not None
                # held by another request; one that came after this statement began is read now
                earlier = row if row["request_hash"] is not None else (
                    await idempotency.earlier(conn, key))
                assert earlier is not None  # the claim conflicted with it; kept 24 hours
                replay = idempotency.refusal(earlier, digest)  # or 409
                return web.json_response(replay.response, status=201,
                                         headers={"Idempotent-Replayed": "true"})
            attempt, since = row["attempt"], row["since"]
        hold_id: int | None = None
        if kind == "subscription":
            try:
                # its own statement and transaction, committed (flushed) before Stripe is asked
                hold_id = await app[SEATS].hold(conn, session_end + seats.HOLD_GRACE, bucket,
                                                ratelimit.client_site(bucket))
            except Exception:
                if key is not None:  # free the key for a retry at once, if the database lets us
                    with contextlib.suppress(Exception):
                        await idempotency.fail(conn, key)
                raise
    founding = hold_id is not None

    # Anything but a StripeError (a bug, a cancelled request) leaves the seat held and the key
    # claimed: the session may exist at Stripe, and a seat given back could then be sold twice.
    # The hold lapses with the session (30 minutes and the grace), the claim after STALE.
    full_price_retry = False
    while True:
        params = session_params(order, settings, founding=founding, expires_at=expires_at)
        options: stripe.RequestOptions = {}
        if key is not None:
            options["idempotency_key"] = idempotency.stripe_key(key, since, attempt,
                                                                full_price=full_price_retry)
        try:
            session = await stripe_api.create_checkout_session(client, params, options)
            break
        except stripe.StripeError as exc:
            if founding and stripe_api.coupon_used_up(exc):
                # Stripe counts more redemptions of the coupon than we do (a webhook not in
                # yet, a redemption made in the Dashboard): the offer is over, at full price
                metrics.stripe_errors.inc(operation="checkout_session_create",
                                          code="founding_coupon_used_up")
                log.warning("founding_coupon_used_up_at_stripe", stripe_code=exc.code,
                            stripe_request_id=exc.request_id)
                await _undo(pool, hold_id, None)
                async with db.connection(pool) as conn:
                    await app[SEATS].used_up_at_stripe(conn)
                hold_id, founding, full_price_retry = None, False, True
                continue
            await _fail_checkout(exc, metrics, pool, hold_id, key)

    response = answer(order, session, founding=founding)
    if hold_id is not None or key is not None:
        async with db.connection(pool) as conn:
            await conn.execute(
                _DONE, hold_id, session["id"],
                datetime.fromtimestamp(int(session["expires_at"]), UTC) + seats.HOLD_GRACE,
                key, response,
            )
    metrics.checkout_sessions.inc(mode=str(params["mode"]), founding=str(founding).lower())
    log.info("checkout_session_created", session=session["id"], mode=params["mode"],
             amount=order.amount, currency=order.currency, interval=order.interval,
             campaign=order.campaign, founding=founding)
    return web.json_response(response, status=201)


async def _fail_checkout(exc: stripe.StripeError, metrics: Metrics, pool: asyncpg.Pool,
                         hold_id: int | None, key: str | None) -> NoReturn:
    """Stripe refused or failed the session: count and log it, give the seat and the key back,
    and answer with what it means for the site (never Stripe's own message)."""
    error = stripe_api.failure(exc)
    metrics.stripe_errors.inc(operation="checkout_session_create", code=error.code)
    log.warning("stripe_call_failed", operation="checkout_session_create",
                error_type=type(exc).__name__, http_status=exc.http_status,
                stripe_code=exc.code, stripe_request_id=exc.request_id,
                stripe_message=scrubbed(str(exc.user_message or ""))[:300], answer=error.code)
    await _undo(pool, hold_id, key)
    raise error from None


async def _undo(pool: asyncpg.Pool, hold_id: int | None, key: str | None) -> None:
    """Give back the seat a checkout held and free its idempotency key for a retry."""
    if hold_id is None and key is None:
        return
    async with db.connection(pool) as conn, conn.transaction():
        if hold_id is not None:
            await seats.release(conn, hold_id)
        if key is not None:
            await idempotency.fail(conn, key)


@routes.get("/v1/checkout/options")
async def checkout_options(request: web.Request) -> web.Response:
    """What the forms offer, so they keep no copy: currencies, amounts, the founding offer."""
    settings = request.app[SETTINGS]
    _check_origin(request, settings)
    async with db.connection(request.app[POOL]) as conn:
        left = await request.app[SEATS].left(conn)
    table = settings.checkout_amounts
    body = {
        "currencies": [
            {"currency": c, **{i: limits.as_json(c) for i, limits in by_interval}}
            for c, by_interval in table.entries
        ],
        "intervals": ["month", "year"],
        "founding_offer": {
            "open": left > 0,
            "percent_off": settings.founding_percent_off,
            "seats": settings.founding_seats,
            "seats_left": left,
        },
        "checkout_available": request.app[STRIPE] is not None,
    }
    # a form may cache this briefly; the checkout itself decides about the last seats
    return web.json_response(body, headers={"Cache-Control": "public, max-age=15"})


async def _preflight(request: web.Request) -> web.Response:
    """CORS preflight: only the site's origins may call checkout from a browser."""
    origin = request.headers.get("Origin")
    if origin is None or origin not in _allowed_origins(request.app[SETTINGS]):
        raise Forbidden("origin_not_allowed", "this origin may not call checkout")
    return web.Response(status=204, headers={
        "Access-Control-Allow-Methods": "GET, POST",
        "Access-Control-Allow-Headers": _CORS_HEADERS,
        "Access-Control-Max-Age": "600",
    })


for _path in ("/v1/checkout/contributions", "/v1/checkout/subscriptions",
              "/v1/checkout/options"):
    routes.options(_path)(_preflight)


def has_site_cors(path: str) -> bool:
    """Whether answers on this path (a route's, or a request's) carry the site's CORS headers."""
    return path.startswith(_CORS_PATHS)


def add_cors(request: web.Request, response: web.StreamResponse) -> None:
    """CORS headers for the site's origins on a checkout answer, errors included (added by the
    request context, donations/app.py, once the answer, or the error's, is made)."""
    response.headers.add("Vary", "Origin")
    origin = request.headers.get("Origin")
    if origin is not None and origin in _allowed_origins(request.app[SETTINGS]):
        response.headers["Access-Control-Allow-Origin"] = origin
        response.headers["Access-Control-Expose-Headers"] = (
            "Retry-After, X-Request-ID, Idempotent-Replayed")


# --- housekeeping -------------------------------------------------------------------------------


async def maintenance(app: web.Application) -> AsyncIterator[None]:
    """Cleanup context: every minute, forget old idempotency keys, lapsed holds and ended
    rate-limit windows (each replica does it; the deletes are idempotent)."""
    async with tasks.running(_housekeep(app), "checkout-housekeeping"):
        yield


async def _housekeep(app: web.Application) -> None:
    while True:
        await asyncio.sleep(MAINTENANCE_EVERY)
        try:
            async with db.connection(app[POOL]) as conn:
                keys = await idempotency.forget_old(conn)
                holds = await seats.forget_lapsed(conn, timedelta(days=1))
                windows = await ratelimit.forget_old_windows(
                    conn, app[SETTINGS].checkout_rate_window)
            if keys or holds or windows:
                log.debug("checkout_housekeeping", keys=keys, holds=holds, windows=windows)
        except db.DatabaseUnavailable as exc:
            log.warning("checkout_housekeeping_failed", error=str(exc))
        except Exception:  # a cancelled statement, a failover: the next minute tries again
            log.exception("checkout_housekeeping_failed")
