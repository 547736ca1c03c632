"""The one way this service talks to Stripe: a StripeClient on aiohttp, pinned and retrying."""

from __future__ import annotations

import json
from typing import Any

import stripe

from donations.events import PINNED_API_VERSION
from donations.settings import Settings


def make_client(
    settings: Settings, http_client: stripe.HTTPClient | None = None
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
        max_network_retries=3,
        http_client=http_client or stripe.AIOHTTPClient(timeout=20),
        base_addresses={"api": base, "files": base, "connect": base} if base else None,
    )


def plain(obj: Any) -> dict[str, Any]:
    """A StripeObject as the plain JSON dict Stripe sent."""
    response = getattr(obj, "last_response", None)
    if response is not None and isinstance(response.data, dict):
        return dict(json.loads(json.dumps(response.data)))
    return dict(json.loads(str(obj)))
