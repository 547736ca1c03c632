"""Exact money: integer minor units beside an ISO 4217 currency, and their decimal spelling."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from decimal import Decimal

# Stripe's lists (docs.stripe.com/currencies). A zero-decimal currency has no minor unit: ¥1,000 is
# 1000. A three-decimal one counts in thousandths (1.000 BHD is 1000). Stripe's "special cases"
# are two-decimal in the API although the currency has no minor unit any more: ISK, HUF, TWD and
# UGX, which Stripe's zero-decimal list also names ("to charge 5 UGX, provide an amount value of
# 500"), so it is not here.
ZERO_DECIMAL = frozenset(
    ["bif", "clp", "djf", "gnf", "jpy", "kmf", "krw", "mga",
     "pyg", "rwf", "vnd", "vuv", "xaf", "xof", "xpf"]
)
THREE_DECIMAL = frozenset(["bhd", "jod", "kwd", "omr", "tnd"])


class CurrencyMismatch(ValueError):
    """Two amounts in different currencies were combined."""


def exponent(currency: str) -> int:
    """How many decimal places the currency's minor unit has, as Stripe counts them."""
    code = currency.lower()
    if code in ZERO_DECIMAL:
        return 0
    if code in THREE_DECIMAL:
        return 3
    return 2


def is_currency_code(value: str) -> bool:
    """A well-formed ISO 4217 code: three ASCII letters (Stripe writes them lower-case)."""
    return len(value) == 3 and value.isascii() and value.isalpha()


def to_major(amount: int, currency: str) -> str:
    """`1050, "gbp"` → `"10.50"`; `1000, "jpy"` → `"1000"`; `-5, "bhd"` → `"-0.005"`."""
    places = exponent(currency)
    if places == 0:
        return str(amount)
    sign = "-" if amount < 0 else ""
    whole, fraction = divmod(abs(amount), 10**places)
    return f"{sign}{whole}.{fraction:0{places}d}"


def from_major(text: str, currency: str) -> int:
    """The inverse of `to_major`; refuses more decimal places than the currency has."""
    value = Decimal(text)
    minor = value.scaleb(exponent(currency))
    if minor != minor.to_integral_value():
        raise ValueError(f"{text} has more decimal places than {currency.upper()} allows")
    return int(minor)


@dataclass(frozen=True, slots=True)
class Money:
    """An amount in minor units of one currency; adding two currencies is an error, not a guess."""

    amount: int
    currency: str

    def __post_init__(self) -> None:
        if isinstance(self.amount, bool) or not isinstance(self.amount, int):
            raise TypeError("Money.amount must be an int of minor units")
        if not is_currency_code(self.currency) or self.currency != self.currency.lower():
            raise ValueError(f"not a lower-case ISO 4217 code: {self.currency!r}")

    @classmethod
    def zero(cls, currency: str) -> Money:
        return cls(0, currency)

    def __add__(self, other: Money) -> Money:
        self._same_currency(other)
        return Money(self.amount + other.amount, self.currency)

    def __sub__(self, other: Money) -> Money:
        self._same_currency(other)
        return Money(self.amount - other.amount, self.currency)

    def __neg__(self) -> Money:
        return Money(-self.amount, self.currency)

    def _same_currency(self, other: Money) -> None:
        if other.currency != self.currency:
            raise CurrencyMismatch(f"cannot combine {self.currency} with {other.currency}")

    def major(self) -> str:
        return to_major(self.amount, self.currency)

    def as_json(self) -> dict[str, int | str]:
        """The contract's money object, exactly as Stripe writes money."""
        return {"amount": self.amount, "currency": self.currency}

    def __str__(self) -> str:
        return f"{self.major()} {self.currency.upper()}"


def apply_percent_off(amount: int, percent_off: Decimal) -> int:
    """The price after a percentage discount, as Stripe's invoices charge it: the discount is a
    whole number of minor units, rounded half up (9.99 at 50% off: 9.99 - 5.00 = 4.99)."""
    if not Decimal(0) <= percent_off <= Decimal(100):
        raise ValueError(f"percent_off out of range: {percent_off}")
    discount = (Decimal(amount) * percent_off / Decimal(100)).to_integral_value(
        rounding="ROUND_HALF_UP")
    return amount - int(discount)


# A discount's terms on a price in one currency: (percent off, None), (None, amount off in that
# currency's minor units), or (None, None) when it takes nothing off a price in that currency (an
# amount-off coupon in another currency without an option in this one).
Terms = tuple[Decimal | None, int | None]


def apply_discounts(amount: int, discounts: Iterable[Terms]) -> int:
    """The price after several discounts, as Stripe's invoices take them: one after another, in
    the order listed, each on what the ones before it left. A percentage's discount is a whole
    number of minor units, rounded half up (apply_percent_off); an amount off takes at most what
    is left: the price never goes below zero."""
    price = amount
    for percent_off, amount_off in discounts:
        if percent_off is not None:
            price = apply_percent_off(price, percent_off)
        elif amount_off is not None:
            price = max(0, price - amount_off)
    return price


def subscription_price(items: Iterable[tuple[int, Sequence[Terms]]], discounts: Sequence[Terms]
                       ) -> int:
    """A subscription's price for one interval after its discounts: each item's (price times
    quantity) after the item's own discounts (which Stripe applies before the subscription's,
    and to that item only), summed; then the subscription's discounts on that sum."""
    return apply_discounts(sum(apply_discounts(amount, own) for amount, own in items), discounts)


# what subscriptions.percent_off (numeric(7, 4)) holds exactly
_PERCENT_PLACES = Decimal("0.0001")


def discount_columns(items: Sequence[tuple[int, Sequence[Terms]]], discounts: Sequence[Terms]
                     ) -> tuple[Decimal | None, int | None]:
    """The (percent_off, amount_off) a subscription's row keeps for its discounts, such that
    `totals.price_after_discounts` of its amount (the items' sum) is `subscription_price`, what
    Stripe's invoice charges: the sql/016 trigger, `verify` and the finance summary (which reads
    one of the two, never both) all read them.

    One discount that takes something off the whole price (the subscription's, or its only
    item's) is kept as its terms, as before; several, or one on one item of several, as the
    amount they take off in all. Discounts that take nothing in the currency do not count."""
    amount = sum(a for a, _ in items)
    taking: list[tuple[int | None, Terms]] = [
        (i, t) for i, (_, own) in enumerate(items) for t in own if t != (None, None)]
    taking += [(None, t) for t in discounts if t != (None, None)]
    if not taking:
        return None, None
    if len(taking) == 1:
        index, (percent_off, amount_off) = taking[0]
        whole = index is None or items[index][0] == amount
        if whole and (percent_off is None
                      or percent_off == percent_off.quantize(_PERCENT_PLACES)):
            return percent_off, amount_off
    return None, amount - subscription_price(items, discounts)
