"""POST /v1/portal-sessions: a Stripe customer portal link for a supporter to manage support."""

from __future__ import annotations

import re

import stripe
import structlog
from aiohttp import web

from donations import auth, db, inputs, stripe_api
from donations.appkeys import METRICS, POOL, SETTINGS, STRIPE
from donations.checkout import site_url
from donations.errors import BadRequest, NotFound, ServiceUnavailable

log = structlog.get_logger(__name__)

routes = web.RouteTableDef()

_CUSTOMER = re.compile(r"^cus_[A-Za-z0-9]{1,250}$")
_FIELDS = frozenset({"customer", "email", "return_url"})
# A subscription that has not ended (of the statuses the ledger keeps, sql/001): one the reader
# may be charged for, or may resume, so the one to manage. Not `incomplete` (its first payment
# not made: it ends by itself), `incomplete_expired` or `canceled`.
LIVE = ("active", "trialing", "past_due", "unpaid", "paused")


@routes.post("/v1/portal-sessions")
async def create_portal_session(request: web.Request) -> web.Response:
    """For the site's server (scope `portal`) or staff (`admin`): `{customer | email,
    return_url}` → 201 `{url}`. By e-mail, the supporter is the ledger's customer with that
    e-mail whose subscription is live (LIVE), else one with any subscription, else any; the most
    recent of those. Checkout makes a customer per checkout, so one e-mail may have several."""
    await auth.require(request, "portal")
    client = request.app[STRIPE]
    if client is None:
        raise ServiceUnavailable("stripe_not_configured",
                                 "the portal needs STRIPE_SECRET_KEY, which is not set")
    body = await inputs.read_json(request)
    inputs.refuse_unknown(body, _FIELDS)
    customer = inputs.text(body, "customer", required=False, max_length=255)
    email = inputs.text(body, "email", required=False, max_length=254)
    if (customer is None) == (email is None):
        raise BadRequest("missing_field", "give either customer or email", field="customer")
    if customer is not None and not _CUSTOMER.match(customer):
        raise BadRequest("invalid_field", "customer must be a Stripe customer id (cus_…)",
                         field="customer")
    return_url = site_url(body, "return_url", request.app[SETTINGS].site_origins)
    if email is not None:
        async with db.connection(request.app[POOL]) as conn:
            customer = await conn.fetchval(
                """
                SELECT c.id FROM customers c
                 WHERE lower(c.email) = lower($1) AND NOT c.deleted
                 ORDER BY EXISTS (SELECT 1 FROM subscriptions s
                                   WHERE s.customer = c.id AND s.status = ANY($2::text[])) DESC,
                          EXISTS (SELECT 1 FROM subscriptions s WHERE s.customer = c.id) DESC,
                          c.created_at DESC, c.id
                 LIMIT 1
                """,
                email, list(LIVE),
            )
        if customer is None:
            raise NotFound("customer_not_found", "no supporter has that e-mail", field="email")
    assert customer is not None
    try:
        session = await client.v1.billing_portal.sessions.create_async(
            {"customer": customer, "return_url": return_url}
        )
    except stripe.InvalidRequestError as exc:
        if exc.code == "resource_missing" and exc.param == "customer":
            raise NotFound("customer_not_found", "Stripe has no such customer",
                           field="customer") from None
        raise _failed(request, exc) from None
    except stripe.StripeError as exc:
        raise _failed(request, exc) from None
    log.info("portal_session_created", customer=customer)
    return web.json_response({"url": session.url}, status=201)


def _failed(request: web.Request, exc: stripe.StripeError) -> Exception:
    error = stripe_api.failure(exc)
    request.app[METRICS].stripe_errors.inc(operation="portal_session_create", code=error.code)
    log.warning("stripe_call_failed", operation="portal_session_create",
                error_type=type(exc).__name__, http_status=exc.http_status,
                stripe_code=exc.code, stripe_request_id=exc.request_id, answer=error.code)
    return error
