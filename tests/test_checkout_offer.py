"""The amounts a form may ask for: defaults, overrides, and Stripe's floors (pure)."""

from __future__ import annotations

import json

import pytest

from donations.offer import DEFAULT_AMOUNTS, STRIPE_MINIMUM, OfferError, build_table
from donations.settings import ConfigError, Settings


def test_the_defaults_follow_the_issue_and_stay_above_stripes_minimums() -> None:
    table = build_table()
    assert table.currencies == ("gbp", "usd", "eur", "jpy")
    gbp_once, gbp_month = table.limits("gbp", "one_off"), table.limits("gbp", "month")
    assert gbp_once is not None and (gbp_once.minimum, gbp_once.maximum) == (100, 1_000_000)
    assert gbp_month is not None and (gbp_month.minimum, gbp_month.default) == (300, 1000)
    for currency, by_interval in DEFAULT_AMOUNTS.items():
        for limits in by_interval.values():
            assert limits.minimum >= STRIPE_MINIMUM[currency]
            assert limits.minimum <= min(limits.suggested) <= limits.default <= limits.maximum


def test_overrides_lay_over_the_defaults_field_by_field() -> None:
    table = build_table(("gbp", "chf"), {
        "gbp": {"month": {"minimum": 500, "suggested": [500, 1000]}},
        "chf": {interval: {"minimum": 100, "maximum": 100_000, "suggested": [500],
                           "default": 500} for interval in ("one_off", "month", "year")},
    })
    month = table.limits("gbp", "month")
    assert month is not None
    assert (month.minimum, month.maximum, month.suggested, month.default) == (
        500, 100_000, (500, 1000), 1000)
    assert table.limits("chf", "year") is not None
    assert table.limits("usd", "one_off") is None


@pytest.mark.parametrize(("currencies", "overrides", "problem"), [
    (("gbp",), {"gbp": {"one_off": {"minimum": 29}}}, "under Stripe's minimum charge of 0.30"),
    (("jpy",), {"jpy": {"month": {"minimum": 60}}}, "less the founding 50% off is 30"),
    (("gbp",), {"gbp": {"one_off": {"maximum": 100_000_000}}}, "over Stripe's"),
    (("gbp",), {"gbp": {"one_off": {"minimum": 1.5}}}, "whole number"),
    (("gbp",), {"gbp": {"one_off": {"suggested": [2000, 1000]}}}, "increasing order"),
    (("gbp",), {"gbp": {"one_off": {"default": 50_000_000}}}, "outside minimum..maximum"),
    (("gbp",), {"gbp": {"weekly": {}}}, "unknown interval"),
    (("gbp",), {"usd": {}}, "not enabled"),
    (("chf",), {}, "no default amounts"),
    (("xyz",), {}, "no known Stripe minimum"),
])
def test_unusable_amounts_are_refused_saying_why(
    currencies: tuple[str, ...], overrides: dict[str, object], problem: str
) -> None:
    with pytest.raises(OfferError, match=problem.replace(".", r"\.").replace("(", r"\(")):
        build_table(currencies, overrides)


def test_settings_read_checkout_configuration_and_name_the_variable() -> None:
    settings = Settings.from_env({
        "CHECKOUT_CURRENCIES": "gbp,eur",
        "CHECKOUT_AMOUNTS": json.dumps({"eur": {"one_off": {"minimum": 200}}}),
        "CHECKOUT_RATE_PER_IP": "5", "PROXY_HOPS": "1",
    })
    assert settings.checkout_amounts.currencies == ("gbp", "eur")
    eur = settings.checkout_amounts.limits("eur", "one_off")
    assert eur is not None and eur.minimum == 200
    assert (settings.checkout_rate_per_ip, settings.proxy_hops) == (5, 1)
    with pytest.raises(ConfigError, match=r"^CHECKOUT_AMOUNTS is not valid JSON"):
        Settings.from_env({"CHECKOUT_AMOUNTS": "{nope"})
    with pytest.raises(ConfigError, match=r"^CHECKOUT_CURRENCIES: .*no known Stripe minimum"):
        Settings.from_env({"CHECKOUT_CURRENCIES": "gbp,xyz"})
    with pytest.raises(ConfigError, match=r"^CHECKOUT_AMOUNTS: gbp.month"):
        Settings.from_env({"CHECKOUT_AMOUNTS": '{"gbp": {"month": {"minimum": 10}}}'})
