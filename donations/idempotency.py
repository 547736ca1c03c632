"""Idempotency-Key for checkout: the same key and body give the same answer, another body 409."""

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
KEEP = timedelta(hours=24)  # as long as Stripe keeps its own keys
# A request whose process died mid-way leaves its key pending; after this (longer than the
# stripe library's timeout and retries) another request with the same key and body may take over.
STALE = timedelta(minutes=2)
_KEY = re.compile(r"^[\x21-\x7e]{1,200}$")


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


async def claim(conn: asyncpg.Connection, key: str, digest: bytes) -> Claimed | Replay:
    """Take the key for this request, or say what to answer instead (409 as an error)."""
    attempt = await conn.fetchval(
        """
        INSERT INTO checkout_requests AS r (idempotency_key, request_hash)
        VALUES ($1, $2)
        ON CONFLICT (idempotency_key) DO UPDATE
           SET state = 'pending', attempts = r.attempts + 1, claimed_at = now()
         WHERE r.request_hash = excluded.request_hash
           AND (r.state = 'failed' OR (r.state = 'pending' AND r.claimed_at < now() - $3::interval))
        RETURNING attempts
        """,
        key, digest, STALE,
    )
    if attempt is not None:
        return Claimed(int(attempt))
    row = await conn.fetchrow(
        "SELECT request_hash, state, response FROM checkout_requests WHERE idempotency_key = $1",
        key,
    )
    assert row is not None  # the insert conflicted with it, and nothing deletes it so soon
    if bytes(row["request_hash"]) != digest:
        raise Conflict("idempotency_key_reused", f"this {HEADER} was used with another request "
                       "body; use a new key for a new request", field=HEADER)
    if row["state"] == "done":
        return Replay(row["response"])
    raise Conflict("request_in_progress", f"a request with this {HEADER} is being served; "
                   "retry in a moment", field=HEADER, headers={"Retry-After": "1"})


def stripe_key(key: str, attempt: int) -> str:
    """The idempotency key Stripe gets. A try after a failed one gets a key of its own: Stripe
    keeps a key's first result (errors too), and the new try's parameters (its expiry) differ."""
    return f"checkout:{key}" if attempt == 1 else f"checkout:{key}:{attempt}"


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
