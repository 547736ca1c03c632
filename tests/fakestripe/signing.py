"""Stripe-Signature headers for webhook payloads, computed as Stripe computes them."""

from __future__ import annotations

import hashlib
import hmac
import json
import time
from collections.abc import Mapping, Sequence
from typing import Any


def signature(payload: bytes, secret: str, timestamp: int) -> str:
    """The hex `v1` signature: HMAC-SHA256 of `{timestamp}.{payload}` keyed by the whole
    `whsec_…` string (Stripe does not decode the part after the prefix)."""
    signed = str(timestamp).encode() + b"." + payload
    return hmac.new(secret.encode("utf-8"), signed, hashlib.sha256).hexdigest()


def sign(
    payload: bytes,
    secret: str,
    timestamp: int | None = None,
    *,
    extra_secrets: Sequence[str] = (),
) -> str:
    """The `Stripe-Signature` header value `t=<ts>,v1=<hex>` for `payload`.

    `extra_secrets` adds one `v1=` entry per secret, as Stripe does while an endpoint's old
    secret is still valid after a roll.
    """
    ts = int(time.time()) if timestamp is None else timestamp
    parts = [f"t={ts}"]
    parts += [f"v1={signature(payload, s, ts)}" for s in (secret, *extra_secrets)]
    return ",".join(parts)


def encode_event(event: Mapping[str, Any]) -> bytes:
    """An event's body as Stripe posts it: pretty-printed JSON, UTF-8 (with escapes where a
    string holds what UTF-8 cannot: half a surrogate pair)."""
    text = json.dumps(event, indent=2, ensure_ascii=False)
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:
        return json.dumps(event, indent=2).encode("utf-8")


def signed_request(
    event: Mapping[str, Any], secret: str, timestamp: int | None = None
) -> tuple[bytes, dict[str, str]]:
    """Body and headers of the webhook POST Stripe would send for `event`."""
    body = encode_event(event)
    headers = {
        "Content-Type": "application/json; charset=utf-8",
        "Stripe-Signature": sign(body, secret, timestamp),
        "User-Agent": "Stripe/1.0 (+https://stripe.com/docs/webhooks)",
    }
    return body, headers
