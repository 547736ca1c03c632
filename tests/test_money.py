"""Money arithmetic and formatting: exact, per currency exponent, no floats."""

from __future__ import annotations

from decimal import Decimal

import pytest
from hypothesis import given
from hypothesis import strategies as st

from donations.money import (
    CurrencyMismatch,
    Money,
    apply_discounts,
    apply_percent_off,
    exponent,
    from_major,
    subscription_price,
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
        # Stripe's special cases: no minor unit any more, two-decimal in the API all the same
        (500_000, "ugx", "5000.00"),
        (50_000, "isk", "500.00"),
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


# --- several discounts: Stripe applies them one after another -------------------------------

P50, P15, P20 = (Decimal(50), None), (Decimal(15), None), (Decimal(20), None)


def test_stacked_discounts_each_take_their_share_of_what_the_ones_before_left() -> None:
    # £9.99: the founding 50% leaves 4.99 (the discount, 4.995, rounds up), then 15% of 4.99
    # (0.7485) takes 0.75: 4.24; not 15% of the listed price (3.49), nor 65% off (3.50)
    assert apply_discounts(999, [P50, P15]) == 424
    assert apply_discounts(1000, [P20, P20]) == 640  # 36% off, not 40%
    # the same in yen (no minor unit: a discount is whole yen)
    assert apply_discounts(999, [P50, P15]) == 424
    assert apply_discounts(1, [P50, P50]) == 0


def test_amounts_off_and_percentages_apply_in_the_order_listed_and_never_below_zero() -> None:
    assert apply_discounts(1000, [(None, 300), P50]) == 350
    assert apply_discounts(1000, [P50, (None, 300)]) == 200
    assert apply_discounts(500, [(None, 300), (None, 300)]) == 0
    assert apply_discounts(500, [(None, 600), P50]) == 0
    # a discount that takes nothing in this currency (an amount-off coupon in another) is skipped
    assert apply_discounts(1000, [(None, None), P50]) == 500
    assert apply_discounts(1000, []) == 1000


def test_an_items_discounts_come_off_that_item_before_the_subscriptions_discounts() -> None:
    # a 20% coupon on the £10 item of a £15 subscription takes £2, not £3
    assert subscription_price([(1000, [P20]), (500, [])], []) == 1300
    # then the subscription's own, on what the items left: 50%, then £2.50 off
    assert subscription_price([(1000, [P20]), (500, [])], [P50, (None, 250)]) == 400
    # an item's amount off never takes more than that item
    assert subscription_price([(300, [(None, 500)]), (1000, [])], []) == 1000
    assert subscription_price([(999, [P50])], [P15]) == apply_discounts(999, [P50, P15])


@given(st.lists(st.tuples(st.integers(0, 10**8),
                          st.lists(st.one_of(
                              st.tuples(st.decimals(0, 100, places=2), st.none()),
                              st.tuples(st.none(), st.integers(0, 10**8)),
                              st.just((None, None))), max_size=3)), min_size=1, max_size=3),
       st.lists(st.one_of(st.tuples(st.decimals(0, 100, places=2), st.none()),
                          st.tuples(st.none(), st.integers(0, 10**8))), max_size=3))
def test_a_price_after_discounts_is_whole_and_between_nothing_and_the_listed_price(
    items: list[tuple[int, list[tuple[Decimal | None, int | None]]]],
    discounts: list[tuple[Decimal | None, int | None]],
) -> None:
    price = subscription_price(items, discounts)
    assert isinstance(price, int)
    assert 0 <= price <= sum(amount for amount, _ in items)
