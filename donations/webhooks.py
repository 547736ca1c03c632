"""POST /webhooks/stripe: verify the signature on the raw body, store the event, apply it once."""

from __future__ import annotations

from collections.abc import AsyncIterator

import stripe
import structlog
from aiohttp import web

from donations import inputs
from donations.appkeys import BATCHER, METRICS, OFFER, POOL, SETTINGS
from donations.batcher import Batcher
from donations.errors import ApiError, BadRequest, PayloadTooLarge, ServiceUnavailable
from donations.events import NotAnEvent, parse_event
from donations.ingest import Outcome

log = structlog.get_logger(__name__)

MAX_BODY = 1024 * 1024  # Stripe's events are a few KiB; anything over 1 MiB is not one of them
TOLERANCE_SECONDS = 300

routes = web.RouteTableDef()


async def event_groups(app: web.Application) -> AsyncIterator[None]:
    """Cleanup context: the workers that apply deliveries in groups (after the pool is made)."""
    app[BATCHER] = Batcher(app[POOL], app[OFFER])
    async with app[BATCHER].running():
        yield


class EventFailed(ApiError):
    """The event is stored but applying it failed: 500 so that Stripe delivers it again."""

    status = 500


async def _read_body(request: web.Request) -> bytes:
    if request.content_length is not None and request.content_length > MAX_BODY:
        raise PayloadTooLarge("body_too_large", f"the body is over {MAX_BODY} bytes")
    body = bytearray()
    async for chunk in request.content.iter_chunked(64 * 1024):
        body += chunk
        if len(body) > MAX_BODY:
            raise PayloadTooLarge("body_too_large", f"the body is over {MAX_BODY} bytes")
    return bytes(body)


def verify(body: bytes, header: str | None, secrets: list[str]) -> str:
    """The body as text if any configured secret signed it within the tolerance, else 400."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise BadRequest("malformed_body", "the body is not UTF-8") from None
    if not header:
        raise BadRequest("missing_signature", "the Stripe-Signature header is missing",
                         field="Stripe-Signature")
    problem = "no signature matches"
    for secret in secrets:  # several during a rotation: any of them may have signed it
        try:
            stripe.WebhookSignature.verify_header(text, header, secret, TOLERANCE_SECONDS)
            return text
        except stripe.SignatureVerificationError as exc:
            if "tolerance" in str(exc):
                problem = "the signature's timestamp is more than 5 minutes old"
        except (TypeError, ValueError):  # the library's compare of a non-ASCII signature
            problem = "the header is not one Stripe writes"
    raise BadRequest("bad_signature", f"the Stripe-Signature is not valid: {problem}",
                     field="Stripe-Signature")


@routes.post("/webhooks/stripe")
async def stripe_webhook(request: web.Request) -> web.Response:
    settings = request.app[SETTINGS]
    if not settings.stripe_webhook_secrets:
        raise ServiceUnavailable("webhook_not_configured", "STRIPE_WEBHOOK_SECRET is not set")
    body = await _read_body(request)
    text = verify(
        body,
        request.headers.get("Stripe-Signature"),
        [s.reveal() for s in settings.stripe_webhook_secrets],
    )
    try:
        event = parse_event(inputs.parse_json(text))  # 400 malformed_json when it is not JSON
    except NotAnEvent as exc:
        raise BadRequest("not_an_event", str(exc)) from None

    structlog.contextvars.bind_contextvars(event_id=event.id, event_type=event.type)
    mode = settings.stripe_mode
    # (a connected account's event is stored and ignored whatever its mode: Stripe sends an
    # account connected in live mode's test events to the live Connect endpoint too)
    if mode is not None and event.livemode != (mode == "live") and event.account is None:
        log.warning("webhook_livemode_mismatch", event_livemode=event.livemode, key_mode=mode)
        request.app[METRICS].webhook_events.inc(type=event.type, outcome="livemode_mismatch")
        raise BadRequest(
            "livemode_mismatch",
            f"a {'live' if event.livemode else 'test'} event sent to a service with a {mode} key",
        )

    if event.account is not None:  # stored and ignored (ingest.classify)
        log.warning("webhook_connected_account_event", account=event.account)
    outcome = await request.app[BATCHER].ingest(event, text)
    request.app[METRICS].webhook_events.inc(type=event.type, outcome=outcome.value)
    log.info("webhook_event", outcome=outcome.value)
    if outcome is Outcome.FAILED:
        raise EventFailed("event_failed", "the event is stored but could not be applied yet")
    return web.json_response({"received": True, "outcome": outcome.value})
