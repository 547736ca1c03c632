"""The one way this service talks to Stripe: a StripeClient on aiohttp, pinned and retrying."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any, NamedTuple

import stripe
from stripe.params.checkout import SessionCreateParams

from donations.errors import ApiError, BadGateway, ServiceUnavailable, Unprocessable
from donations.events import PINNED_API_VERSION
from donations.settings import Settings

# A reader waits on checkout and the portal: each try at most READER_TIMEOUT seconds, tried again
# once, so that a Stripe that does not answer is a 503 within about 17 s, before the browser or
# a proxy gives up. The background work (fees, payouts, reconciliation, the commands) waits
# longer and tries more often.
READER_TIMEOUT, READER_RETRIES = 8.0, 1
BACKGROUND_TIMEOUT, BACKGROUND_RETRIES = 20.0, 3


def make_client(
    settings: Settings, http_client: stripe.HTTPClient | None = None,
    *, max_network_retries: int = BACKGROUND_RETRIES,
) -> stripe.StripeClient | None:
    """A client for the configured key, or None when no key is set (those features answer 503)."""
    if settings.stripe_secret_key is None:
        return None
    base = settings.stripe_api_base
    return stripe.StripeClient(
        settings.stripe_secret_key.reveal(),
        stripe_version=PINNED_API_VERSION,
        # The library retries connection errors, 409s, 429s and 5xx with backoff, and sends an
        # idempotency key on POSTs so a retried create never happens twice.
        max_network_retries=max_network_retries,
        http_client=http_client or stripe.AIOHTTPClient(timeout=BACKGROUND_TIMEOUT),
        base_addresses={"api": base, "files": base, "connect": base} if base else None,
    )


async def create_checkout_session(
    client: stripe.StripeClient, params: SessionCreateParams, options: stripe.RequestOptions
) -> dict[str, Any]:
    """POST /v1/checkout/sessions through `client` (its key, pinned API version and retries,
    the idempotency key in `options`; Stripe's errors raised as the library's StripeErrors),
    answered as the JSON Stripe sent. `sessions.create_async` would also build the library's
    Session object from it, a third of the library's CPU time per checkout, for the three
    fields checkout reads."""
    arguments: dict[str, Any] = {**params, **options}
    response = await client.raw_request_async("post", "/v1/checkout/sessions", **arguments)
    data: dict[str, Any] = response.data
    return data


class ListPage(NamedTuple):
    """One page of a Stripe list, read by `get_list`."""

    items: list[Any]  # the page's objects, decoded
    texts: list[str]  # each one's JSON text exactly as Stripe sent it
    has_more: bool
    headers: Mapping[str, str]


async def get_list(client: stripe.StripeClient, path: str, params: dict[str, Any]) -> ListPage:
    """GET a page of a Stripe list through `client`: its key, pinned API version, HTTP client
    and retries, and an error answer raised as the library's StripeError, as `raw_request_async`
    does. Unlike `raw_request_async`, the body is decoded once, into plain dicts (the library
    decodes into OrderedDicts, half as fast again) keeping each object's JSON text, which is
    what a stored event needs: re-encoding every event took as long as decoding the page."""
    requestor = client._requestor  # (private: the library's own request path, see above)
    body, code, headers = await requestor.request_raw_async(
        "get", path, params=params, base_address="api", api_mode="V1", usage=["raw_request"])
    if not 200 <= code < 300:
        requestor._interpret_response(body, code, headers, "V1")  # raises the error's StripeError
    text = body.decode("utf-8") if isinstance(body, bytes) else str(body)
    try:
        envelope, texts = split_list(text)
    except ValueError:
        raise stripe.APIError(f"Invalid list body from API (HTTP response code was {code})",
                              http_body=text[:200], http_status=code,
                              headers=dict(headers)) from None
    items = envelope.get("data")
    return ListPage(items if isinstance(items, list) else [], texts,
                    envelope.get("has_more") is True, headers)


_DECODER = json.JSONDecoder()
_SPACE = re.compile(r"[ \t\n\r]*")  # JSON's whitespace


def split_list(text: str) -> tuple[dict[str, Any], list[str]]:
    """A JSON object (a Stripe list) decoded, with the text of each element of its `data`
    array, as given. ValueError when the text is not one JSON object."""
    decode = _DECODER.raw_decode

    def space(i: int) -> int:  # past the whitespace at i
        found = _SPACE.match(text, i)
        return found.end() if found else i

    def expect(i: int, *marks: str) -> tuple[str, int]:  # the mark after i, and past it
        i = space(i)
        if text[i:i + 1] not in marks:
            raise ValueError(f"expected one of {marks} at {i}")
        return text[i], space(i + 1)

    envelope: dict[str, Any] = {}
    texts: list[str] = []
    _, i = expect(0, "{")
    if text[i:i + 1] == "}":
        i = space(i + 1)
    else:
        while True:
            key, i = decode(text, i)
            if not isinstance(key, str) or key in envelope:
                raise ValueError(f"not a key, or a key given twice, before {i}")
            _, i = expect(i, ":")
            if key == "data" and text[i:i + 1] == "[":
                items: list[Any] = []
                i = space(i + 1)
                if text[i:i + 1] == "]":
                    i += 1
                else:
                    while True:
                        item, end = decode(text, i)
                        items.append(item)
                        texts.append(text[i:end])
                        mark, i = expect(end, ",", "]")
                        if mark == "]":
                            break
                envelope[key] = items
            else:
                envelope[key], i = decode(text, i)
            mark, i = expect(i, ",", "}")
            if mark == "}":
                break
    if i != len(text):
        raise ValueError(f"more after the object, at {i}")
    return envelope, texts


def plain(obj: Any) -> dict[str, Any]:
    """A StripeObject as the plain JSON dict Stripe sent."""
    response = getattr(obj, "last_response", None)
    if response is not None and isinstance(response.data, dict):
        return dict(json.loads(json.dumps(response.data)))
    return dict(json.loads(str(obj)))


def coupon_used_up(exc: stripe.StripeError) -> bool:
    """Whether Stripe refused a session because its coupon is no longer valid: it reached its
    max_redemptions (Stripe's count, which can be ahead of ours) or was deleted."""
    return isinstance(exc, stripe.InvalidRequestError) and exc.code == "coupon_expired"


def failure(exc: stripe.StripeError) -> ApiError:
    """What to answer when a Stripe call on a request's path failed: 503 when trying again later
    may work (Stripe unreachable, slow, rate limiting, failing), 502 when Stripe refused what we
    sent (a bug or a misconfigured account; logged with Stripe's request id), never Stripe's
    message or a stack trace. The library has already retried what is safe to retry."""
    if isinstance(exc, stripe.APIConnectionError):
        return ServiceUnavailable("stripe_unavailable", "Stripe could not be reached; try again "
                                  "shortly", headers={"Retry-After": "5"})
    if isinstance(exc, stripe.RateLimitError):
        return ServiceUnavailable("stripe_rate_limited", "Stripe is limiting our requests; try "
                                  "again shortly", headers={"Retry-After": "5"})
    if isinstance(exc, stripe.APIError) or (exc.http_status or 0) >= 500:
        return ServiceUnavailable("stripe_unavailable", "Stripe is failing; try again shortly",
                                  headers={"Retry-After": "5"})
    if isinstance(exc, stripe.AuthenticationError | stripe.PermissionError):
        return BadGateway("stripe_authentication_failed",
                          "Stripe refused the service's API key; the operators have been told")
    if isinstance(exc, stripe.InvalidRequestError) and exc.code == "resource_missing" and (
        exc.param or ""
    ).startswith(("line_items", "discounts")):
        return ServiceUnavailable("stripe_not_set_up", "the Stripe account lacks the products or "
                                  "coupon checkout uses (run `donations stripe-setup`)")
    if isinstance(exc, stripe.InvalidRequestError) and exc.code == "email_invalid":
        return Unprocessable("invalid_email", "Stripe does not accept this e-mail address",
                             field="email")
    if isinstance(exc, stripe.IdempotencyError):
        return BadGateway("stripe_idempotency_conflict",
                          "Stripe saw this idempotency key with other parameters")
    return BadGateway("stripe_rejected_request", "Stripe refused the request")
