"""The errors a caller can be answered with, each mapped to a status and the contract's JSON shape.

    ApiError                       4xx/5xx {"error": {"code", "message", "field"?}}
     ├── BadRequest                400  malformed, unsigned or invalid input
     ├── Unauthorized              401  no or unknown token
     ├── Forbidden                 403  a token without the needed scope
     ├── NotFound                  404
     ├── Conflict                  409
     ├── PayloadTooLarge           413
     ├── Unprocessable             422  well-formed but out of range
     ├── TooManyRequests           429  over a rate limit: retry after `Retry-After` seconds
     ├── BadGateway                502  a dependency (Stripe) refused or garbled our request
     └── ServiceUnavailable        503  a dependency (database, Stripe) is not there: retry later

and what is none of ours: `client_hung_up`, a client that went away.
"""

from __future__ import annotations

from typing import Any, ClassVar

from aiohttp import web


class ApiError(Exception):
    """An answer for the caller; `code` is stable snake_case, `message` is for a person."""

    status: ClassVar[int] = 500

    def __init__(
        self, code: str, message: str, *, field: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.field = field
        self.headers = dict(headers or {})  # e.g. Retry-After, sent with the error

    def body(self) -> dict[str, Any]:
        error: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.field is not None:
            error["field"] = self.field
        return {"error": error}


class BadRequest(ApiError):
    """The request cannot be read or is not acceptable as sent."""

    status = 400


class Unauthorized(ApiError):
    """No credentials, or unknown ones."""

    status = 401


class Forbidden(ApiError):
    """Known credentials without the needed scope."""

    status = 403


class NotFound(ApiError):
    """Nothing at that address."""

    status = 404


class Conflict(ApiError):
    """The request contradicts an earlier one (e.g. an idempotency key reused with another body)."""

    status = 409


class PayloadTooLarge(ApiError):
    """The body is over the endpoint's limit."""

    status = 413


class Unprocessable(ApiError):
    """Well-formed input whose values are out of range."""

    status = 422


class TooManyRequests(ApiError):
    """Over a rate limit; `Retry-After` says when to try again."""

    status = 429


class BadGateway(ApiError):
    """A dependency answered, but not with something we can use (e.g. Stripe refused a call)."""

    status = 502


class ServiceUnavailable(ApiError):
    """A dependency is down or not configured; the caller should retry later."""

    status = 503


def client_hung_up(request: web.Request, exc: BaseException) -> bool:
    """Whether `exc` is only the client having gone away: aiohttp's "Connection lost" or
    "Cannot write to closing transport" (a ConnectionResetError) while the client's connection
    is closed or closing (Stripe's own timeout, a reader who closed the tab or cancelled a
    download, a proxy's timeout). Nothing of ours failed, and no answer can reach it."""
    if not isinstance(exc, ConnectionResetError):
        return False
    transport = request.transport
    return transport is None or transport.is_closing()
