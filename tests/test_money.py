"""Money arithmetic and formatting: exact, per currency exponent, no floats."""

from __future__ import annotations

from decimal import Decimal

import pytest
from hypothesis import given
from hypothesis import strategies as st

from donations.money import (
    CurrencyMismatch,
    Money,
    apply_percent_off,
    exponent,
    from_major,
    to_major,
)


@pytest.mark.parametrize(
    ("amount", "currency", "text"),
    [
        (1000, "gbp", "10.00"),
        (5, "gbp", "0.05"),
        (-1050, "usd", "-10.50"),
        (1000, "jpy", "1000"),
        (-300, "krw", "-300"),
        (1000, "bhd", "1.000"),
        (5, "kwd", "0.005"),
        (0, "eur", "0.00"),
    ],
)
def test_to_major_writes_the_currency_exponent(amount: int, currency: str, text: str) -> None:
    assert to_major(amount, currency) == text
    assert from_major(text, currency) == amount


@given(st.integers(min_value=-(10**15), max_value=10**15),
       st.sampled_from(["gbp", "usd", "jpy", "bhd", "eur", "krw", "kwd"]))
def test_major_round_trips(amount: int, currency: str) -> None:
    assert from_major(to_major(amount, currency), currency) == amount


def test_from_major_refuses_too_many_places() -> None:
    with pytest.raises(ValueError, match="decimal places"):
        from_major("10.001", "gbp")
    with pytest.raises(ValueError, match="decimal places"):
        from_major("1.5", "jpy")


def test_exponents() -> None:
    assert (exponent("GBP"), exponent("jpy"), exponent("bhd")) == (2, 0, 3)


def test_money_refuses_mixed_currencies_and_floats() -> None:
    assert Money(1000, "gbp") + Money(50, "gbp") == Money(1050, "gbp")
    with pytest.raises(CurrencyMismatch):
        _ = Money(1000, "gbp") + Money(50, "usd")
    with pytest.raises(TypeError):
        Money(10.5, "gbp")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="ISO 4217"):
        Money(1, "GBP")
    assert Money(1050, "gbp").as_json() == {"amount": 1050, "currency": "gbp"}
    assert str(Money(1000, "jpy")) == "1000 JPY"


def test_percent_off_rounds_half_up() -> None:
    assert apply_percent_off(1000, Decimal(50)) == 500
    assert apply_percent_off(999, Decimal(50)) == 499  # the discount, 499.5, rounds up
    assert apply_percent_off(1000, Decimal("33.33")) == 667
    with pytest.raises(ValueError, match="out of range"):
        apply_percent_off(1000, Decimal(101))
