"""Reading and validating request input: JSON bodies, dates, amounts; each fault names its field."""

from __future__ import annotations

import json
import re
from datetime import UTC, date, datetime
from typing import Any

from aiohttp import web

from donations.errors import ApiError, BadRequest, PayloadTooLarge, Unprocessable
from donations.money import is_currency_code

MAX_JSON_BODY = 64 * 1024


async def read_json(request: web.Request, max_bytes: int = MAX_JSON_BODY) -> dict[str, Any]:
    """The body as a JSON object; 413 over `max_bytes`, 400 when not a JSON object."""
    if request.content_length is not None and request.content_length > max_bytes:
        raise PayloadTooLarge("body_too_large", f"the body is over {max_bytes} bytes")
    body = bytearray()
    async for chunk in request.content.iter_chunked(16 * 1024):
        body += chunk
        if len(body) > max_bytes:
            raise PayloadTooLarge("body_too_large", f"the body is over {max_bytes} bytes")
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise BadRequest("malformed_json", "the body is not valid JSON") from None
    value = parse_json(text)
    if not isinstance(value, dict):
        raise BadRequest("malformed_json", "the body must be a JSON object")
    if _SUSPECT_ESCAPE.search(text):
        _refuse_unstorable(value)
    return value


def parse_json(text: str) -> Any:
    """JSON text as Python values; 400 `malformed_json` for anything json.loads cannot read."""
    try:
        return json.loads(text)
    # ValueError beyond JSONDecodeError: an integer of more than 4,300 digits;
    # RecursionError: arrays or objects nested thousands deep
    except (ValueError, RecursionError):
        raise BadRequest("malformed_json", "the body is not valid JSON") from None


# The escapes that make a JSON string text nothing downstream can keep: half a surrogate pair,
# and U+0000. Raw control characters are not JSON, so these escapes are the only way in.
_SUSPECT_ESCAPE = re.compile(r"\\u(?:[dD][89a-fA-F]|0000)")


def _refuse_unstorable(value: object) -> None:
    """400 naming the first string (or key) of a parsed JSON value that cannot be stored: one
    holding a lone surrogate ("\\ud800" is valid JSON but no character: nothing can encode
    it) or U+0000 (which PostgreSQL's text and jsonb cannot hold)."""
    found = _unstorable(value)
    if found is None:
        return
    path, problem = found
    if problem == "surrogate":
        raise BadRequest("invalid_unicode", "the value has a \\u escape that is half of "
                         "a surrogate pair, which is not a character", field=path or None)
    raise BadRequest("invalid_character", "the value holds U+0000 (NUL), which no text here "
                     "may hold", field=path or None)


def _text_problem(value: str) -> str | None:
    """Why `value` cannot be stored as text ("surrogate" or "nul"); None when it can."""
    if "\x00" in value:
        return "nul"
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return "surrogate"
    return None


def _unstorable(value: object, path: str = "") -> tuple[str, str] | None:
    """The dotted path of the first string (or key) in a parsed JSON value that cannot be
    stored, and why (see _text_problem); None when every one can."""
    if isinstance(value, str):
        problem = _text_problem(value)
        return None if problem is None else (path, problem)
    items: list[tuple[object, object]] = []
    if isinstance(value, dict):
        items = list(value.items())
    elif isinstance(value, list):
        items = list(enumerate(value))
    for key, item in items:
        if isinstance(key, str) and (problem := _text_problem(key)) is not None:
            return path or "(a key)", problem
        inner = f"{path}.{key}" if path else str(key)
        found = _unstorable(item, inner)
        if found is not None:
            return found
    return None


def refuse_unknown(body: dict[str, Any], fields: frozenset[str]) -> None:
    """400 `unknown_field` naming the first field of `body` not among `fields`: a misspelt
    field would otherwise be ignored and the request done without what it meant."""
    unknown = sorted(set(body) - fields)
    if unknown:
        raise BadRequest("unknown_field", f"{unknown[0]} is not a field of this request",
                         field=unknown[0])


def text(body: dict[str, Any], name: str, *, required: bool = True, max_length: int = 500
         ) -> str | None:
    value = body.get(name)
    if value is None:
        if required:
            raise BadRequest("missing_field", f"{name} is required", field=name)
        return None
    if not isinstance(value, str) or not value.strip():
        raise BadRequest("invalid_field", f"{name} must be a non-empty string", field=name)
    if len(value) > max_length:
        raise Unprocessable("too_long", f"{name} is longer than {max_length} characters",
                            field=name)
    return value.strip()


def integer(body: dict[str, Any], name: str, *, required: bool = True,
            low: int | None = None, high: int | None = None) -> int | None:
    """A whole number; floats, strings and booleans are refused, never rounded. Below `low` or
    above `high` (when given) it is 422 `out_of_range`."""
    value = body.get(name)
    if value is None:
        if required:
            raise BadRequest("missing_field", f"{name} is required", field=name)
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise BadRequest("invalid_field", f"{name} must be a whole number of minor units",
                         field=name)
    if low is not None and value < low:
        raise Unprocessable("out_of_range", f"{name} must be at least {low}", field=name)
    if high is not None and value > high:
        raise Unprocessable("out_of_range", f"{name} must be at most {high}", field=name)
    return value


def money(body: dict[str, Any], name: str, *, required: bool = True) -> tuple[int, str] | None:
    """A money object `{"amount": <minor units>, "currency": "gbp"}`, as the contract writes it."""
    value = body.get(name)
    if value is None:
        if required:
            raise BadRequest("missing_field", f"{name} is required", field=name)
        return None
    if not isinstance(value, dict):
        raise BadRequest("invalid_field", f'{name} must be {{"amount": …, "currency": …}}',
                         field=name)
    try:
        amount = integer(value, "amount", low=1, high=10**12)
    except ApiError as exc:
        exc.field = f"{name}.amount"
        raise
    assert amount is not None
    return amount, currency(value.get("currency"), f"{name}.currency")


def currency(value: object, name: str = "currency") -> str:
    if not isinstance(value, str) or not is_currency_code(value):
        raise BadRequest("invalid_currency", f"{name} must be an ISO 4217 code such as gbp",
                         field=name)
    return value.lower()


def timestamp(value: object, name: str) -> datetime:
    """An RFC 3339 timestamp or an ISO date (midnight UTC); naive times are taken as UTC.

    To the whole second, a fraction dropped (`…T10:00:00.5Z` is 10:00:00): the moment is
    reported to the second (`rfc3339`) and Stripe's times are whole seconds, so a window kept
    with the fraction would not be the one reported (a payment at 10:00:00 outside a campaign
    said to start then)."""
    if not isinstance(value, str):
        raise BadRequest("invalid_timestamp", f"{name} must be an RFC 3339 timestamp or a date",
                         field=name)
    try:
        if len(value) == 10:
            day = date.fromisoformat(value)
            moment = datetime(day.year, day.month, day.day, tzinfo=UTC)
        else:
            parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
            moment = parsed.astimezone(UTC) if parsed.tzinfo else parsed.replace(tzinfo=UTC)
    # OverflowError: a moment before the year 1 or after 9999 once in UTC
    except (ValueError, OverflowError):
        moment = _FIRST
    second = moment.replace(microsecond=0)
    # asyncpg writes the very first and last instants (datetime.min and max) as PostgreSQL's
    # -infinity and infinity, which come back as no moment at all: neither the moment given
    # may be the last, nor its whole second the first
    if not (second > _FIRST and moment < _LAST):
        raise BadRequest("invalid_timestamp", f"{name} must be an RFC 3339 timestamp or a date "
                         "after the first second of the year 1 and before the last instant of "
                         "9999", field=name)
    return second


_FIRST = datetime.min.replace(tzinfo=UTC)
_LAST = datetime.max.replace(tzinfo=UTC)


def rfc3339(value: datetime | None) -> str | None:
    """`2026-11-24T19:00:00Z`: UTC, seconds, Z."""
    return None if value is None else utc_seconds(value) + "Z"


def utc_seconds(value: datetime) -> str:
    """`2026-11-24T19:00:00`: the instant in UTC to the second, without a zone."""
    # isoformat, not strftime("%Y"), which writes the year 1 as "1" on glibc
    return value.astimezone(UTC).replace(microsecond=0, tzinfo=None).isoformat()


# what whole_number reads by default: ids, pages (999,999,999,999,999,999 at most, in a bigint)
WHOLE_NUMBER_DIGITS = 18


def whole_number(raw: str, *, max_digits: int = WHOLE_NUMBER_DIGITS) -> int | None:
    """`raw` as a whole number when it is 1 to `max_digits` ASCII digits; None otherwise.
    (`str.isdigit` is true for "²" and "٣", and `int` takes "٣", " 3" and "1_000".)"""
    if 0 < len(raw) <= max_digits and raw.isascii() and raw.isdigit():
        return int(raw)
    return None
