"""What the forms may ask for: currencies, suggested amounts and limits per interval (pure)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from decimal import Decimal
from typing import Any, Literal

from donations.money import Money, apply_percent_off, is_currency_code, to_major

Interval = Literal["one_off", "month", "year"]
INTERVALS: tuple[Interval, ...] = ("one_off", "month", "year")

# Stripe's minimum charge per currency in minor units (docs.stripe.com/currencies, "Minimum and
# maximum charge amounts"): below it Stripe refuses the payment, so no limit may go under it.
STRIPE_MINIMUM: Mapping[str, int] = {
    "aed": 200, "aud": 50, "bgn": 100, "brl": 50, "cad": 50, "chf": 50, "czk": 1500,
    "dkk": 250, "eur": 50, "gbp": 30, "hkd": 400, "huf": 17500, "inr": 50, "jpy": 50,
    "mxn": 1000, "myr": 200, "nok": 300, "nzd": 50, "pln": 200, "ron": 200, "sek": 300,
    "sgd": 50, "thb": 1000, "usd": 50,
}
# Stripe takes at most eight digits of minor units in an amount.
STRIPE_MAXIMUM = 99_999_999


class OfferError(ValueError):
    """The configured amounts are not usable; the message says which and why."""


@dataclass(frozen=True, slots=True)
class Limits:
    """For one currency and interval: the accepted range, the amounts a form suggests and the one
    it preselects (the standard tier), all in minor units."""

    minimum: int
    maximum: int
    suggested: tuple[int, ...]
    default: int

    def as_json(self, currency: str) -> dict[str, Any]:
        return {
            "minimum": Money(self.minimum, currency).as_json(),
            "maximum": Money(self.maximum, currency).as_json(),
            "suggested": [Money(a, currency).as_json() for a in self.suggested],
            "default": Money(self.default, currency).as_json(),
        }


@dataclass(frozen=True, slots=True)
class AmountTable:
    """The limits of every enabled currency, in the order the form should list them."""

    entries: tuple[tuple[str, tuple[tuple[Interval, Limits], ...]], ...]

    @property
    def currencies(self) -> tuple[str, ...]:
        return tuple(currency for currency, _ in self.entries)

    def limits(self, currency: str, interval: Interval) -> Limits | None:
        for code, by_interval in self.entries:
            if code == currency:
                return dict(by_interval).get(interval)
        return None


def _limits(minimum: int, maximum: int, suggested: tuple[int, ...], default: int) -> Limits:
    return Limits(minimum, maximum, suggested, default)


# The defaults: one-off from £1 to £10,000; subscriptions from £3 a month (£30 a year), the
# standard tier £10 a month (£100 a year); round equivalents in USD and EUR, and in JPY, which has
# no minor unit (¥1,000 is 1000).
DEFAULT_AMOUNTS: Mapping[str, Mapping[Interval, Limits]] = {
    "gbp": {
        "one_off": _limits(100, 1_000_000, (500, 1000, 2500, 5000), 1000),
        "month": _limits(300, 100_000, (300, 500, 1000, 2000), 1000),
        "year": _limits(3000, 1_000_000, (3000, 5000, 10000, 20000), 10000),
    },
    "usd": {
        "one_off": _limits(100, 1_200_000, (500, 1000, 3000, 6000), 1000),
        "month": _limits(400, 120_000, (400, 600, 1200, 2500), 1200),
        "year": _limits(4000, 1_200_000, (4000, 6000, 12000, 25000), 12000),
    },
    "eur": {
        "one_off": _limits(100, 1_200_000, (500, 1000, 3000, 6000), 1000),
        "month": _limits(350, 120_000, (350, 600, 1200, 2500), 1200),
        "year": _limits(3500, 1_200_000, (3500, 6000, 12000, 25000), 12000),
    },
    "jpy": {
        "one_off": _limits(200, 2_000_000, (1000, 2000, 5000, 10000), 2000),
        "month": _limits(500, 200_000, (500, 1000, 2000, 4000), 2000),
        "year": _limits(5000, 2_000_000, (5000, 10000, 20000, 40000), 20000),
    },
}
DEFAULT_CURRENCIES: tuple[str, ...] = ("gbp", "usd", "eur", "jpy")


def build_table(
    currencies: tuple[str, ...] = DEFAULT_CURRENCIES,
    overrides: Mapping[str, Any] | None = None,
    *,
    founding_percent_off: int = 50,
) -> AmountTable:
    """The table for `currencies`: the defaults, with `overrides` (as CHECKOUT_AMOUNTS gives
    them: `{"gbp": {"month": {"minimum": 500}}}`) laid over them field by field. Raises
    OfferError on anything Stripe would refuse or a form could not offer."""
    overrides = overrides or {}
    if not isinstance(overrides, Mapping):
        raise OfferError("must be a JSON object of currencies")
    if not currencies:
        raise OfferError("at least one currency must be enabled")
    unknown = sorted(set(overrides) - set(currencies))
    if unknown:
        raise OfferError(f"sets amounts for {', '.join(unknown)}, which is not enabled")
    entries = []
    for currency in currencies:
        if not is_currency_code(currency) or currency != currency.lower():
            raise OfferError(f"{currency!r} is not a lower-case ISO 4217 code")
        if currency not in STRIPE_MINIMUM:
            raise OfferError(f"{currency} has no known Stripe minimum charge; use one of "
                             f"{', '.join(sorted(STRIPE_MINIMUM))}")
        given = overrides.get(currency) or {}
        if not isinstance(given, Mapping):
            raise OfferError(f"{currency} must map intervals to limits")
        bad = sorted(set(given) - set(INTERVALS))
        if bad:
            raise OfferError(f"{currency}: unknown interval {bad[0]!r} (one_off, month, year)")
        defaults = DEFAULT_AMOUNTS.get(currency, {})
        by_interval = []
        for interval in INTERVALS:
            base = defaults.get(interval)
            limits = _merge(currency, interval, base, given.get(interval))
            _check(currency, interval, limits, founding_percent_off)
            by_interval.append((interval, limits))
        entries.append((currency, tuple(by_interval)))
    return AmountTable(tuple(entries))


def parse_overrides(text: str | None) -> Mapping[str, Any]:
    """CHECKOUT_AMOUNTS as JSON; OfferError when it is not JSON."""
    if not text:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise OfferError(f"is not valid JSON ({exc.msg})") from None
    except (ValueError, RecursionError):  # an integer of thousands of digits, nesting too deep
        raise OfferError("is not valid JSON (a number too long or nesting too deep)") from None
    if not isinstance(value, dict):
        raise OfferError("must be a JSON object of currencies")
    return value


def _merge(currency: str, interval: str, base: Limits | None, given: object) -> Limits:
    where = f"{currency}.{interval}"
    if given is None:
        if base is None:
            raise OfferError(f"{where}: no default amounts for {currency}; give minimum, "
                             "maximum, suggested and default")
        return base
    if not isinstance(given, Mapping):
        raise OfferError(f"{where} must be an object")
    bad = sorted(set(given) - {"minimum", "maximum", "suggested", "default"})
    if bad:
        raise OfferError(f"{where}: unknown field {bad[0]!r}")
    values: dict[str, Any] = {
        "minimum": base.minimum if base else None,
        "maximum": base.maximum if base else None,
        "suggested": base.suggested if base else None,
        "default": base.default if base else None,
    }
    values.update(given)
    for name in ("minimum", "maximum", "default"):
        if not _is_int(values[name]):
            raise OfferError(f"{where}.{name} must be a whole number of minor units")
    suggested = values["suggested"]
    if not isinstance(suggested, list | tuple) or not all(_is_int(a) for a in suggested):
        raise OfferError(f"{where}.suggested must be a list of whole numbers of minor units")
    return Limits(values["minimum"], values["maximum"], tuple(suggested), values["default"])


def _check(currency: str, interval: str, limits: Limits, founding_percent_off: int) -> None:
    where = f"{currency}.{interval}"
    floor = STRIPE_MINIMUM[currency]
    if limits.minimum < floor:
        raise OfferError(f"{where}.minimum {to_major(limits.minimum, currency)} is under "
                         f"Stripe's minimum charge of {to_major(floor, currency)}")
    if limits.maximum > STRIPE_MAXIMUM:
        raise OfferError(f"{where}.maximum is over Stripe's {STRIPE_MAXIMUM} minor units")
    if limits.minimum > limits.maximum:
        raise OfferError(f"{where}: minimum is above maximum")
    for amount in (*limits.suggested, limits.default):
        if not limits.minimum <= amount <= limits.maximum:
            raise OfferError(f"{where}: {amount} is outside minimum..maximum")
    if not limits.suggested or list(limits.suggested) != sorted(set(limits.suggested)):
        raise OfferError(f"{where}.suggested must be distinct amounts in increasing order")
    if interval != "one_off":
        # the founding discount must not bring a subscription under what Stripe can charge
        # (a 100% discount is fine: Stripe then collects nothing)
        discounted = apply_percent_off(limits.minimum, Decimal(founding_percent_off))
        if 0 < discounted < floor:
            raise OfferError(
                f"{where}.minimum less the founding {founding_percent_off}% off is "
                f"{to_major(discounted, currency)}, under Stripe's minimum charge of "
                f"{to_major(floor, currency)}")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
