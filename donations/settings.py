"""Settings: read once from the environment at start, validated, secrets masked."""

from __future__ import annotations

import ipaddress
import os
import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal
from urllib.parse import parse_qs, urlsplit

from donations.money import is_currency_code
from donations.offer import (
    DEFAULT_CURRENCIES,
    STRIPE_MINIMUM,
    AmountTable,
    OfferError,
    build_table,
    parse_overrides,
)

DEFAULT_TABLE = build_table()


class ConfigError(Exception):
    """A setting is missing or wrong; the message names the variable and the problem."""


class Secret:
    """A string that never shows itself in a repr, a log line or a traceback."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret('**********')"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)


@dataclass(frozen=True)
class Settings:
    database_url: Secret | None = None
    data_dir: Path = Path(".donations")
    host: str = "127.0.0.1"
    port: int = 8080
    stripe_secret_key: Secret | None = None
    stripe_webhook_secrets: tuple[Secret, ...] = ()
    stripe_api_base: str | None = None
    site_origins: tuple[str, ...] = ()
    reporting_currency: str = "gbp"
    founding_seats: int = 1000
    founding_percent_off: int = 50
    founding_coupon_id: str = "founding-supporter"
    log_format: Literal["json", "console"] = "json"
    log_level: str = "info"
    fee_worker_interval: float = 5.0
    # public totals (donations/totals_api.py): seconds they are served from memory and may be
    # cached by browsers and CDNs; seconds between compactions of the totals' deltas
    totals_ttl: int = 5
    totals_compact_interval: float = 1.0
    # seconds between reconciliation runs inside `serve` (donations/reconcile.py); 0: none
    reconcile_interval: float = 3600.0
    payout_worker_interval: float = 60.0
    # checkout (donations/checkout.py): what the forms may ask for, the Stripe products the
    # sessions sell (made by `donations stripe-setup`), and the card-testing rate limits
    checkout_amounts: AmountTable = DEFAULT_TABLE
    stripe_one_off_product: str = "donations-one-off"
    stripe_recurring_product: str = "donations-recurring"
    checkout_rate_per_ip: int = 10
    checkout_rate_overall: int = 600
    checkout_rate_window: int = 600
    proxy_hops: int = 0

    @property
    def stripe_mode(self) -> Literal["live", "test"] | None:
        """The key's mode, so an event from the other mode can be refused."""
        if self.stripe_secret_key is None:
            return None
        key = self.stripe_secret_key.reveal()
        return "live" if "_live_" in key else "test"

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if env is None else env
        if env.get("STRIPE_LOG") in ("debug", "info"):
            # the library would print every request and answer to stderr itself (readers'
            # e-mails among them), past this service's log and its masking
            raise ConfigError("STRIPE_LOG must not be debug or info: the stripe library would "
                              "print each request and answer, readers' e-mails with them, "
                              "past the service's log; use LOG_LEVEL=debug instead")
        get = _Reader(env)
        return cls(
            database_url=get.secret("DATABASE_URL", check=_check_database_url),
            data_dir=get.folder("DONATIONS_DATA_DIR", ".donations"),
            host=get.host("HOST", "127.0.0.1"),
            # (not 0, "any free port": nobody would know where the service listens)
            port=get.integer("PORT", 8080, low=1, high=65535),
            stripe_secret_key=get.secret("STRIPE_SECRET_KEY", check=_check_stripe_key),
            stripe_webhook_secrets=get.secrets("STRIPE_WEBHOOK_SECRET", prefix="whsec_"),
            stripe_api_base=get.url("STRIPE_API_BASE"),
            site_origins=get.origins("SITE_ORIGINS"),
            reporting_currency=get.settlement_currency("REPORTING_CURRENCY", "gbp"),
            founding_seats=get.integer("FOUNDING_SEATS", 1000, low=0, high=10_000_000),
            founding_percent_off=get.integer("FOUNDING_PERCENT_OFF", 50, low=1, high=100),
            founding_coupon_id=get.text("FOUNDING_COUPON_ID") or "founding-supporter",
            log_format=get.choice(
                "LOG_FORMAT", ("json", "console"), "console" if sys.stderr.isatty() else "json"
            ),  # type: ignore[arg-type]
            log_level=get.choice(
                "LOG_LEVEL", ("debug", "info", "warning", "error"), "info"
            ),
            fee_worker_interval=float(
                get.integer("FEE_WORKER_INTERVAL", 5, low=1, high=3600)
            ),
            totals_ttl=get.integer("TOTALS_TTL", 5, low=1, high=300),
            reconcile_interval=float(_reconcile_interval(
                get.integer("RECONCILE_INTERVAL", 3600, low=0, high=7 * 86400)
            )),
            payout_worker_interval=float(
                get.integer("PAYOUT_WORKER_INTERVAL", 60, low=1, high=86400)
            ),
            checkout_amounts=get.amounts(
                "CHECKOUT_CURRENCIES", "CHECKOUT_AMOUNTS",
                get.integer("FOUNDING_PERCENT_OFF", 50, low=1, high=100),
            ),
            stripe_one_off_product=get.text("STRIPE_ONE_OFF_PRODUCT") or "donations-one-off",
            stripe_recurring_product=(
                get.text("STRIPE_RECURRING_PRODUCT") or "donations-recurring"
            ),
            checkout_rate_per_ip=get.integer("CHECKOUT_RATE_PER_IP", 10, low=1, high=10**6),
            checkout_rate_overall=get.integer("CHECKOUT_RATE_OVERALL", 600, low=1, high=10**8),
            checkout_rate_window=get.integer("CHECKOUT_RATE_WINDOW", 600, low=1, high=86400),
            proxy_hops=get.integer("PROXY_HOPS", 0, low=0, high=10),
        )


def _reconcile_interval(seconds: int) -> int:
    # a run lists Stripe's events and balance transactions: more often than a minute would
    # only spend the API's rate limit
    if 0 < seconds < 60:
        raise ConfigError(f"RECONCILE_INTERVAL must be 0 (off) or at least 60, got {seconds}")
    return seconds


# The values asyncpg takes for the query parameters most often got wrong: libpq's (asyncpg also
# reads `verify_ca` for `verify-ca`); anything else it refuses at the first connection, and
# cli.main says so in one line too.
_SSLMODES = ("disable", "allow", "prefer", "require", "verify-ca", "verify-full")
_TARGET_SESSION_ATTRS = ("any", "primary", "standby", "prefer-standby", "read-write",
                         "read-only")


def _check_database_url(value: str) -> str | None:
    # the problem is said without the value: it may hold a password
    try:
        parts = urlsplit(value)
        parts.port  # noqa: B018 - reading it checks it: a port that is not a number raises
    except ValueError:
        return "is not a URL that can be read (a bracket or the port?)"
    if parts.scheme not in ("postgres", "postgresql"):
        return "must be a postgresql:// URL"
    if "@" in parts.netloc.rpartition("@")[0]:
        # asyncpg splits at the first "@": the rest of the password would be taken for the host
        return "has an @ in its user name or password: write it %40"
    try:
        query = parse_qs(parts.query, strict_parsing=True) if parts.query else {}
    except ValueError:  # what asyncpg reads it with: `?sslmode`, `?a=1&&b=2`
        return "has a query that cannot be read (name=value pairs joined by &)"
    # asyncpg takes the last of a repeated parameter
    sslmode = query.get("sslmode", [None])[-1]
    if sslmode is not None and sslmode.replace("_", "-") not in _SSLMODES:
        return f"sslmode must be one of {', '.join(_SSLMODES)}, got {sslmode!r}"
    port = query.get("port", [None])[-1]
    if port is not None and not all(p.strip().isdigit() for p in port.split(",")):
        return f"port must be a number (or numbers, comma-separated), got {port!r}"
    attrs = query.get("target_session_attrs", [None])[-1]
    if attrs is not None and attrs not in _TARGET_SESSION_ATTRS:
        return (f"target_session_attrs must be one of {', '.join(_TARGET_SESSION_ATTRS)}, "
                f"got {attrs!r}")
    return None


def _check_stripe_key(value: str) -> str | None:
    if not _STRIPE_KEY.fullmatch(value):
        return "must be a Stripe secret or restricted key (sk_test_…, sk_live_…, rk_…)"
    return None


# A prefix and the key itself (letters, digits; the test suite's own use underscores too)
_STRIPE_KEY = re.compile(r"(sk|rk)_(test|live)_[A-Za-z0-9_]+")


# labels of letters, digits and inner hyphens, at most 63 each and 253 in all
_HOST_NAME = re.compile(
    r"(?=.{1,253}$)[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
    r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*\.?")


class _Reader:
    """Reads one variable at a time and raises ConfigError naming it."""

    def __init__(self, env: Mapping[str, str]) -> None:
        self._env = env

    def text(self, name: str) -> str | None:
        value = self._env.get(name, "").strip()
        return value or None

    def secret(self, name: str, *, check: object = None) -> Secret | None:
        value = self.text(name)
        if value is None:
            return None
        if callable(check) and (problem := check(value)):
            raise ConfigError(f"{name} {problem}")
        return Secret(value)

    def secrets(self, name: str, *, prefix: str) -> tuple[Secret, ...]:
        parts = [p.strip() for p in (self.text(name) or "").split(",") if p.strip()]
        for part in parts:
            if not part.startswith(prefix) or len(part) == len(prefix) or any(
                    c.isspace() for c in part):
                raise ConfigError(f"{name} must be one or more {prefix}… values, comma-separated")
        return tuple(Secret(p) for p in parts)

    def integer(self, name: str, default: int, *, low: int, high: int) -> int:
        raw = self.text(name)
        if raw is None:
            return default
        try:
            value = int(raw)
        except ValueError:
            raise ConfigError(f"{name} must be a whole number, got {raw!r}") from None
        if not low <= value <= high:
            raise ConfigError(f"{name} must be between {low} and {high}, got {value}")
        return value

    def host(self, name: str, default: str) -> str:
        """An IP address or a host name (RFC 1123), to listen on."""
        raw = self.text(name) or default
        try:
            ipaddress.ip_address(raw)
        except ValueError:
            # a name's last label is never all digits (RFC 1123 2.1): 999.1.1.1 is neither
            if not _HOST_NAME.fullmatch(raw) or raw.rstrip(".").rsplit(".", 1)[-1].isdigit():
                raise ConfigError(f"{name} must be an IP address or a host name such as "
                                  f"0.0.0.0, ::1 or localhost, got {raw!r}") from None
        return raw

    def choice(self, name: str, options: tuple[str, ...], default: str) -> str:
        raw = (self.text(name) or default).lower()
        if raw not in options:
            raise ConfigError(f"{name} must be one of {', '.join(options)}, got {raw!r}")
        return raw

    def settlement_currency(self, name: str, default: str) -> str:
        """A currency a Stripe account settles in (those of Stripe's minimum-charge table)."""
        raw = (self.text(name) or default).lower()
        if not is_currency_code(raw):
            raise ConfigError(f"{name} must be an ISO 4217 currency code, got {raw!r}")
        if raw not in STRIPE_MINIMUM:
            raise ConfigError(f"{name}: {raw!r} is not a currency Stripe settles in; use one of "
                              f"{', '.join(sorted(STRIPE_MINIMUM))}")
        return raw

    def folder(self, name: str, default: str) -> Path:
        """A folder; a leading `~` or `~user` read as a shell would (set by Docker or systemd,
        it reaches us unexpanded)."""
        raw = self.text(name) or default
        try:
            return Path(raw).expanduser()
        except RuntimeError:  # `~someone` who is no user here
            raise ConfigError(f"{name}: {raw!r} starts with the home folder of a user this "
                              "machine does not have") from None

    def url(self, name: str) -> str | None:
        raw = self.text(name)
        if raw is None:
            return None
        try:
            parts = urlsplit(raw)
            # reading the port checks it: one that is no number, or above 65535, raises
            usable = parts.scheme in ("http", "https") and bool(parts.hostname) \
                and parts.port != 0
        except ValueError:  # an unclosed `[`, a port that is no number
            usable = False
        # (the stripe library puts `/v1/…` after it: a base ending in /v1, as Stripe's own URLs
        # are written, would ask for /v1/v1/…; a query, fragment or user would be dropped or
        # sent where they do not belong)
        if not usable or any(c.isspace() for c in raw) or parts.query or parts.fragment \
                or "@" in parts.netloc or parts.path.rstrip("/").endswith("/v1"):
            raise ConfigError(f"{name} must be an http(s) URL of a host (a port from 1 to "
                              "65535 and a path of a proxy's may follow; no /v1, query or "
                              f"user), got {raw!r}")
        return raw.rstrip("/")

    def amounts(self, currencies_name: str, amounts_name: str, percent_off: int) -> AmountTable:
        codes = tuple(
            c.strip().lower() for c in (self.text(currencies_name) or "").split(",") if c.strip()
        ) or DEFAULT_CURRENCIES
        if len(set(codes)) != len(codes):
            raise ConfigError(f"{currencies_name} names a currency twice")
        try:
            overrides = parse_overrides(self.text(amounts_name))
        except OfferError as exc:
            raise ConfigError(f"{amounts_name} {exc}") from None
        try:
            return build_table(codes, overrides, founding_percent_off=percent_off)
        except OfferError as exc:
            name = currencies_name if "no known Stripe minimum" in str(exc) else amounts_name
            raise ConfigError(f"{name}: {exc}") from None

    def origins(self, name: str) -> tuple[str, ...]:
        result = []
        for raw in (self.text(name) or "").split(","):
            origin = raw.strip().rstrip("/")
            if not origin:
                continue
            problem = f"{name} must be origins like https://example.org, got {origin!r}"
            try:
                parts = urlsplit(origin)
                port = parts.port
            except ValueError:  # an unclosed bracket, a port that is not a number or too big
                raise ConfigError(problem) from None
            if (parts.scheme not in ("http", "https") or not parts.hostname or parts.path
                    or parts.query or parts.fragment or parts.username is not None
                    or parts.password is not None or port == 0):
                raise ConfigError(problem)
            result.append(f"{parts.scheme}://{parts.netloc.lower()}")
        return tuple(result)
