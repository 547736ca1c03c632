"""One structlog pipeline for our events and the standard library's records: JSON or console."""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import MutableMapping
from typing import Any

import structlog

# Keys whose values are personal or secret wherever they appear in an event.
_EMAIL_KEYS = frozenset({"email", "customer_email", "receipt_email"})
_SECRET_KEYS = frozenset({"authorization", "token", "secret", "api_key", "password", "signature"})
_SECRET_TEXT = re.compile(r"\b(whsec|sk_live|sk_test|rk_live|rk_test)_[A-Za-z0-9]+")
_EMAIL_TEXT = re.compile(r"([A-Za-z0-9._%+-])[A-Za-z0-9._%+-]*@([A-Za-z0-9.-]+\.[A-Za-z]{2,})")


def mask_email(value: str) -> str:
    """`jane.doe@example.org` → `j***@example.org`: enough to tell supporters apart in a log."""
    local, _, domain = value.partition("@")
    if not domain:
        return "***"
    return f"{local[:1]}***@{domain}"


def redact(_: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """A processor that masks e-mails and drops secrets, by key and by shape, before rendering."""
    for key, value in list(event.items()):
        lowered = key.lower()
        if lowered in _SECRET_KEYS:
            event[key] = "[redacted]"
        elif lowered in _EMAIL_KEYS and isinstance(value, str):
            event[key] = mask_email(value)
        elif isinstance(value, str):
            scrubbed = _SECRET_TEXT.sub(r"\1_[redacted]", value)
            event[key] = _EMAIL_TEXT.sub(r"\1***@\2", scrubbed)
    return event


def configure(log_format: str = "json", level: str = "info") -> None:
    """Configure once at start. JSON lines in production; a readable console on a terminal."""
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,  # first: the request and event ids
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
        processors=[*shared, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=shared,
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            structlog.processors.format_exc_info if log_format == "json" else _identity,
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


def _identity(_: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    return event
