"""Staff tokens: made once and shown once, kept only as a hash, checked per request with scopes."""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import asyncpg
import structlog
from aiohttp import web

from donations import db, ratelimit
from donations.appkeys import POOL, SETTINGS
from donations.errors import (
    Conflict,
    Forbidden,
    NotFound,
    TooManyRequests,
    Unauthorized,
    Unprocessable,
)

log = structlog.get_logger(__name__)

SCOPES = ("admin", "reports:read", "portal")
ISSUED_PREFIX = "dnt_"  # recognisable in a leaked-secret scan
SESSION_PREFIX = "dns_"  # a staff page session (staff_sessions): never a token
_TOUCH_EVERY = timedelta(minutes=1)


@dataclass
class FailedAttempts:
    """Failed token checks per client address in a sliding window, kept in this process.

    Guessing a 256-bit token is hopeless anyway; this keeps a scanner from filling the logs and
    the database with lookups. Kept in memory: each replica limits on its own, which is enough
    for that. Only failures count, so staff using a good token are never slowed.
    """

    limit: int = 20
    window: float = 300.0
    # Memory is bounded under a scan from many addresses (an IPv6 /48 holds 65,536 /64s): at
    # most this many clients are kept, the one whose last failure is oldest dropped first, and
    # at most `limit` times each; nothing walks the whole table on the request path.
    max_clients: int = 10_000
    _seen: OrderedDict[str, list[float]] = field(default_factory=OrderedDict)

    def _recent(self, client: str, now: float) -> list[float]:
        times = [t for t in self._seen.get(client, []) if now - t < self.window]
        if times:
            self._seen[client] = times
        else:
            self._seen.pop(client, None)
        return times

    def blocked_for(self, client: str) -> int:
        """Seconds until `client` may try again; 0 when it may now."""
        now = time.monotonic()
        times = self._recent(client, now)
        if len(times) < self.limit:
            return 0
        return max(1, int(times[-self.limit] + self.window - now) + 1)

    def failed(self, client: str) -> float:
        """Count a failure (or an attempt not decided yet: see `forgive`); its time."""
        now = time.monotonic()
        times = self._seen.pop(client, [])
        times.append(now)
        self._seen[client] = times[-self.limit:]  # the most recent failure last in the order
        while len(self._seen) > self.max_clients:
            self._seen.popitem(last=False)
        return now

    def forgive(self, client: str, at: float) -> None:
        """Take back the attempt counted at `at`: it did not fail."""
        times = self._seen.get(client)
        if times is not None and at in times:
            times.remove(at)


FAILED_ATTEMPTS = web.AppKey("failed_auth_attempts", FailedAttempts)

# A 401 names the scheme it wants (RFC 9110 11.6.1; RFC 6750 3 for Bearer)
_CHALLENGE = 'Bearer realm="donations"'
_CHALLENGE_INVALID = 'Bearer realm="donations", error="invalid_token"'


@dataclass(frozen=True, slots=True)
class Token:
    id: int
    name: str
    scopes: tuple[str, ...]
    created_at: datetime
    last_used_at: datetime | None
    revoked_at: datetime | None

    def allows(self, scope: str) -> bool:
        return "admin" in self.scopes or scope in self.scopes


def token_hash(token: str) -> bytes:
    # The tokens are 256 random bits, so a plain SHA-256 cannot be brute-forced; a slow
    # password hash would only slow every request.
    return hashlib.sha256(token.encode("utf-8")).digest()


def _token(row: asyncpg.Record) -> Token:
    return Token(row["id"], row["name"], tuple(row["scopes"]), row["created_at"],
                 row["last_used_at"], row["revoked_at"])


async def create_token(conn: asyncpg.Connection, name: str, scopes: list[str]) -> str:
    """A new token for `name`; the only time its value exists outside the caller's hands."""
    unknown = sorted(set(scopes) - set(SCOPES))
    if unknown or not scopes:
        raise Unprocessable("invalid_scope", f"scopes must be among {', '.join(SCOPES)}",
                            field="scope")
    value = ISSUED_PREFIX + secrets.token_urlsafe(32)
    try:
        await conn.execute(
            "INSERT INTO api_tokens (name, token_hash, scopes) VALUES ($1, $2, $3)",
            name, token_hash(value), sorted(set(scopes)),
        )
    except asyncpg.UniqueViolationError:
        raise Conflict("token_exists", f"a live token is already named {name!r}",
                       field="name") from None
    except asyncpg.CheckViolationError:
        raise Unprocessable("invalid_name", "a token name is letters, digits and _.@- "
                            "(at most 64)", field="name") from None
    return value


async def list_tokens(conn: asyncpg.Connection) -> list[Token]:
    rows = await conn.fetch("SELECT * FROM api_tokens ORDER BY created_at, id")
    return [_token(r) for r in rows]


async def revoke_token(conn: asyncpg.Connection, name: str) -> None:
    revoked = await conn.fetchval(
        "UPDATE api_tokens SET revoked_at = now() WHERE name = $1 AND revoked_at IS NULL "
        "RETURNING id", name,
    )
    if revoked is None:
        raise NotFound("token_not_found", f"no live token is named {name!r}", field="name")


async def require(request: web.Request, scope: str) -> Token:
    """The caller's token if it carries `scope` (admin implies every scope); else 401 or 403."""
    header = request.headers.get("Authorization", "")
    scheme, _, value = header.partition(" ")
    if scheme.lower() != "bearer" or not value.strip():
        raise Unauthorized("unauthorized", "send Authorization: Bearer <token>",
                           headers={"WWW-Authenticate": _CHALLENGE})
    return await check(request, value.strip(), scope)


async def check(request: web.Request, value: str, scope: str) -> Token:
    """The token `value` if it is live and carries `scope`; else 401, 403, or 429 after too
    many failures from the same client. The token itself is never logged."""
    return await _authenticate(
        request, value, scope,
        "SELECT *, token_hash AS presented_hash FROM api_tokens"
        " WHERE token_hash = $1 AND revoked_at IS NULL",
        "unknown_or_revoked_token", "the token is unknown or revoked")


async def check_session(request: web.Request, value: str, scope: str) -> Token:
    """The token behind the staff page session `value`, if the session has not ended (signed
    out, expired, its token revoked) and the token carries `scope`; else as `check`."""
    return await _authenticate(
        request, value, scope,
        """
        SELECT t.*, s.session_hash AS presented_hash
          FROM staff_sessions s JOIN api_tokens t ON t.id = s.token_id
         WHERE s.session_hash = $1 AND s.expires_at > now() AND t.revoked_at IS NULL
        """,
        "unknown_or_ended_session", "the session has ended")


async def open_session(conn: asyncpg.Connection, token: Token, lifetime: timedelta) -> str:
    """A new staff page session for `token`, ending after `lifetime`; its value, to be kept only
    in the browser's cookie. Sessions long ended are cleared out on the way."""
    value = SESSION_PREFIX + secrets.token_urlsafe(32)
    await conn.execute("DELETE FROM staff_sessions WHERE expires_at < now() - interval '1 day'")
    await conn.execute(
        "INSERT INTO staff_sessions (session_hash, token_id, expires_at)"
        " VALUES ($1, $2, now() + $3::interval)",
        token_hash(value), token.id, lifetime,
    )
    return value


async def close_session(conn: asyncpg.Connection, value: str) -> None:
    """End the staff page session `value` (signing out); nothing when there is none."""
    if value.isascii():
        await conn.execute("DELETE FROM staff_sessions WHERE session_hash = $1",
                           token_hash(value))


async def _authenticate(
    request: web.Request, value: str, scope: str, query: str, reason: str, message: str
) -> Token:
    attempts = request.app.get(FAILED_ATTEMPTS)
    # the client as checkout's limits see it: behind PROXY_HOPS proxies, the forwarded address
    # (else everyone behind the balancer would share one count and lock each other out)
    settings = request.app.get(SETTINGS)
    client = ratelimit.client_network(request, settings.proxy_hops if settings else 0)
    if attempts is not None and (wait := attempts.blocked_for(client)):
        log.warning("auth_rate_limited", client=client, path=request.path)
        raise TooManyRequests("too_many_attempts", "too many failed attempts; try again later",
                              headers={"Retry-After": str(wait)})
    # Counted before the look-up, and taken back unless the token is wrong: guesses sent all at
    # once would otherwise all pass the check above before the first of them had failed.
    counted = attempts.failed(client) if attempts is not None else None
    wrong = False
    try:
        # ours are ASCII: anything else (a header byte that is not UTF-8 arrives as a lone
        # surrogate, which cannot even be hashed) is no token, and is not looked for
        presented = token_hash(value) if value.isascii() else None
        async with db.connection(request.app[POOL]) as conn:
            row = None if presented is None else await conn.fetchrow(query, presented)
            # (query names the hash looked up `presented_hash`: the token's, or the session's)
            found = None if row is None else bytes(row["presented_hash"])
            # compare the digests in constant time as well: the index lookup is not the check
            if found is None or presented is None or not hmac.compare_digest(found, presented):
                log.warning("auth_failed", reason=reason, path=request.path, client=client)
                wrong = True
                raise Unauthorized("unauthorized", message,
                                   headers={"WWW-Authenticate": _CHALLENGE_INVALID})
            assert row is not None
            token = _token(row)
            # at most one write a minute per token, not one per request
            if token.last_used_at is None or \
                    datetime.now(UTC) - token.last_used_at > _TOUCH_EVERY:
                await conn.execute("UPDATE api_tokens SET last_used_at = now() WHERE id = $1",
                                   token.id)
    finally:
        if attempts is not None and counted is not None and not wrong:
            attempts.forgive(client, counted)
    if not token.allows(scope):
        log.warning("auth_forbidden", token_name=token.name, scope=scope, path=request.path)
        raise Forbidden("forbidden", f"this token does not have the {scope} scope")
    return token
