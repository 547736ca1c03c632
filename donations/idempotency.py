"""Idempotency-Key for checkout: the same key and body give the same answer, another body 409.

A request claims its key in table checkout_requests in the statement that also counts it against
the rate limits (donations/checkout.py: `_ADMIT`): a new key, or one whose request failed, or was
left pending by a process that died (for longer than STALE), with the same body. A key it could
not claim belongs to another request: `refusal` says what to answer.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import asyncpg
from aiohttp import web

from donations.errors import BadRequest, Conflict

HEADER = "Idempotency-Key"
KEEP = timedelta(hours=24)  # as long as Stripe keeps its own keys, at least (see stripe_key)
# A request whose process died mid-way leaves its key pending; after this (longer than the
# stripe library's timeout and retries) another request with the same key and body may take over.
STALE = timedelta(minutes=2)
_KEY = re.compile(r"^[\x21-\x7e]{1,200}$")
STRIPE_KEY_MAX = 255  # the longest idempotency key Stripe accepts


def key_of(request: web.Request) -> str | None:
    """The request's Idempotency-Key: 1 to 200 visible ASCII characters, or None."""
    value = request.headers.get(HEADER)
    if value is None:
        return None
    if not _KEY.match(value):
        raise BadRequest("invalid_idempotency_key", f"{HEADER} must be 1 to 200 visible ASCII "
                         "characters (a UUID is best)", field=HEADER)
    return value


def request_hash(path: str, body: dict[str, Any]) -> bytes:
    """What "the same body" means: the same endpoint and the same JSON, whatever its spacing or
    key order."""
    canonical = json.dumps([path, body], sort_keys=True, separators=(",", ":"),
                           ensure_ascii=False)
    return hashlib.sha256(canonical.encode("utf-8")).digest()


@dataclass(frozen=True, slots=True)
class Claimed:
    """This request serves the key; `attempt` counts tries after Stripe failed (from 1)."""

    attempt: int


@dataclass(frozen=True, slots=True)
class Replay:
    """The key was served before: answer exactly this."""

    response: dict[str, Any]


async def earlier(conn: asyncpg.Connection, key: str) -> asyncpg.Record | None:
    """The request that holds `key`: its request_hash, state and response."""
    return await conn.fetchrow(
        "SELECT request_hash, state, response FROM checkout_requests WHERE idempotency_key = $1",
        key,
    )


def refusal(earlier: asyncpg.Record, digest: bytes) -> Replay:
    """What to answer a request whose key another request holds (`earlier`: its request_hash,
    state and response): the stored answer again when it was served, else 409 (another body,
    or still being served)."""
    if bytes(earlier["request_hash"]) != digest:
        raise Conflict("idempotency_key_reused", f"this {HEADER} was used with another request "
                       "body; use a new key for a new request", field=HEADER)
    if earlier["state"] == "done":
        return Replay(earlier["response"])
    raise Conflict("request_in_progress", f"a request with this {HEADER} is being served; "
                   "retry in a moment", field=HEADER, headers={"Retry-After": "1"})


def stripe_key(key: str, since: int, attempt: int, *, full_price: bool = False) -> str:
    """The idempotency key Stripe gets. It names when the reader's key was first claimed
    (`since`, Unix time): Stripe drops its keys *at least* 24 hours after it saw them, while
    ours are forgotten after KEEP, so the same key sent again later (a tab left open overnight)
    is a new request to us and must be one to Stripe too, not a key it may still hold with
    other parameters (refused). A try after a failed one gets a key of its own: Stripe
    keeps a key's first result (errors too), and the new try's parameters (its expiry) differ;
    so does the same try again at full price (the founding coupon used up at Stripe).

    The reader's key is written with `%` and `:` escaped, so that what follows it cannot be
    read as part of it: keys `k:2` and `k` (its second try) get keys of their own at Stripe.
    (A key with neither, as the site's UUIDs, is unchanged.) One that would then be longer than
    Stripe takes (255 characters) is sent as its SHA-256 under a prefix of its own instead."""
    suffix = [str(since), *([str(attempt)] if attempt > 1 else []),
              *(["full-price"] if full_price else [])]
    own = key.replace("%", "%25").replace(":", "%3A")
    written = ":".join(["checkout", own, *suffix])
    if len(written) <= STRIPE_KEY_MAX:
        return written
    return ":".join(["checkout-sha256", hashlib.sha256(key.encode()).hexdigest(), *suffix])


async def fail(conn: asyncpg.Connection, key: str) -> None:
    await conn.execute(
        "UPDATE checkout_requests SET state = 'failed' WHERE idempotency_key = $1", key
    )


async def forget_old(conn: asyncpg.Connection) -> int:
    deleted = await conn.fetchval(
        """
        WITH gone AS (
            DELETE FROM checkout_requests WHERE created_at < now() - $1::interval RETURNING 1)
        SELECT count(*) FROM gone
        """,
        KEEP,
    )
    return int(deleted or 0)
