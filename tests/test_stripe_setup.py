"""`donations stripe-setup`: the coupon and products checkout needs, made once, found after."""

from __future__ import annotations

import stripe

from donations import stripe_setup
from donations.settings import Secret
from donations.stripe_api import make_client
from tests.checkout_helpers import TEST_KEY
from tests.conftest import make_settings
from tests.fakestripe.server import FakeStripe, running_fake_stripe
from tests.fakestripe.world import World
from tests.test_cli import _env, _run


def _posts(fake: FakeStripe) -> list[tuple[str, dict[str, object]]]:
    return [(r.path, r.form) for r in fake.requests if r.method == "POST"]


async def _setup(fake: FakeStripe, **overrides: object) -> stripe_setup.Outcome:
    settings = make_settings("postgresql://unused", stripe_secret_key=Secret(TEST_KEY),
                             stripe_api_base=fake.base_url, **overrides)
    http_client = stripe.AIOHTTPClient(timeout=5)
    client = make_client(settings, http_client)
    assert client is not None
    try:
        return await stripe_setup.run(client, settings)
    finally:
        await http_client.close_async()  # type: ignore[no-untyped-call]


async def test_setup_creates_the_coupon_and_products_once() -> None:
    world = World(seed=61)
    async with running_fake_stripe(world) as fake:
        first = await _setup(fake, founding_seats=250, founding_percent_off=40)
        created = _posts(fake)
        second = await _setup(fake, founding_seats=250, founding_percent_off=40)
        after = _posts(fake)

    assert first.problems == [] and second.problems == []
    assert created == [
        ("/v1/coupons", {"id": "founding-supporter", "name": "Founding supporter",
                         "percent_off": "40", "duration": "forever",
                         "max_redemptions": "250",
                         "metadata": {"donations": "founding_supporter"}}),
        ("/v1/products", {"id": "donations-one-off", "name": "One-off support",
                          "metadata": {"donations": "one_off"}}),
        ("/v1/products", {"id": "donations-recurring", "name": "Recurring support",
                          "metadata": {"donations": "recurring"}}),
    ]
    assert after == created  # the second run only looked
    assert second.lines == ["coupon founding-supporter: exists",
                            "product donations-one-off: exists",
                            "product donations-recurring: exists"]
    coupon = world.objects["founding-supporter"]
    assert (coupon["duration"], coupon["max_redemptions"], coupon["percent_off"]) == (
        "forever", 250, 40)


async def test_a_coupon_with_other_terms_is_reported_not_sold() -> None:
    world = World(seed=62)
    async with running_fake_stripe(world) as fake:
        await _setup(fake, founding_seats=100)
        outcome = await _setup(fake, founding_seats=200)
    assert len(outcome.problems) == 1
    assert "max_redemptions=100" in outcome.problems[0]
    assert "FOUNDING_COUPON_ID" in outcome.problems[0]


async def test_the_command_line_runs_it_and_says_what_it_did() -> None:
    world = World(seed=63)
    async with running_fake_stripe(world) as fake:
        env = _env(STRIPE_SECRET_KEY=TEST_KEY, STRIPE_API_BASE=fake.base_url)
        code, out, err = await _run("stripe-setup", env=env)
        assert code == 0, err
        assert "coupon founding-supporter: created (50% off forever, 1000 redemptions)" in out
        code, out, _ = await _run("stripe-setup", env=env)
        assert code == 0 and "product donations-recurring: exists" in out
        code, _, err = await _run("stripe-setup", env=_env())
        assert code == 2 and "STRIPE_SECRET_KEY" in err
