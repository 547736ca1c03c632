"""`donations stripe-setup`: create or find, idempotently, what checkout needs at Stripe.

The coupon and products have ids of our choosing (FOUNDING_COUPON_ID, STRIPE_ONE_OFF_PRODUCT,
STRIPE_RECURRING_PRODUCT), so "find" is a retrieve by id and running it again, or on several
machines at once, makes nothing twice: a create that loses a race is answered
`resource_already_exists` and the winner's object is read instead.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import stripe
from stripe.params import CouponCreateParams, ProductCreateParams

from donations.settings import Settings

COUPON_NAME = "Founding supporter"


@dataclass
class Outcome:
    """What the run did: one line per object, and the problems a person must resolve."""

    lines: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


async def run(client: stripe.StripeClient, settings: Settings) -> Outcome:
    outcome = Outcome()
    await _coupon(client, settings, outcome)
    for product_id, name, kind in (
        (settings.stripe_one_off_product, "One-off support", "one_off"),
        (settings.stripe_recurring_product, "Recurring support", "recurring"),
    ):
        await _product(client, product_id, name, kind, outcome)
    return outcome


async def _coupon(client: stripe.StripeClient, settings: Settings, outcome: Outcome) -> None:
    coupon_id = settings.founding_coupon_id
    if settings.founding_seats <= 0:
        outcome.lines.append(f"coupon {coupon_id}: skipped (FOUNDING_SEATS is 0: no offer)")
        return
    coupon = await _find(client.v1.coupons.retrieve_async, coupon_id)
    if coupon is None:
        params: CouponCreateParams = {
            "id": coupon_id,
            "name": COUPON_NAME,
            "percent_off": settings.founding_percent_off,
            "duration": "forever",
            "max_redemptions": settings.founding_seats,
            "metadata": {"donations": "founding_supporter"},
        }
        try:
            coupon = await client.v1.coupons.create_async(params)
            outcome.lines.append(
                f"coupon {coupon_id}: created ({settings.founding_percent_off}% off forever, "
                f"{settings.founding_seats} redemptions)")
        except stripe.InvalidRequestError as exc:
            if exc.code != "resource_already_exists":
                raise
            coupon = await client.v1.coupons.retrieve_async(coupon_id)
    else:
        outcome.lines.append(f"coupon {coupon_id}: exists")
    # A coupon's terms cannot be changed once made; say so rather than sell other terms.
    wanted: dict[str, Any] = {"percent_off": settings.founding_percent_off,
                              "duration": "forever", "max_redemptions": settings.founding_seats}
    for name, value in wanted.items():
        actual = getattr(coupon, name, None)
        if actual != value:
            outcome.problems.append(
                f"coupon {coupon_id} has {name}={actual!r}, the settings want {value!r}; a "
                "coupon's terms cannot change: delete it in the Dashboard and run this again, "
                "or set FOUNDING_COUPON_ID to a new id")
    if getattr(coupon, "valid", True) is False:
        outcome.problems.append(f"coupon {coupon_id} is no longer valid at Stripe")


async def _product(
    client: stripe.StripeClient, product_id: str, name: str, kind: str, outcome: Outcome
) -> None:
    product = await _find(client.v1.products.retrieve_async, product_id)
    if product is None:
        params: ProductCreateParams = {
            "id": product_id, "name": name, "metadata": {"donations": kind},
        }
        try:
            product = await client.v1.products.create_async(params)
            outcome.lines.append(f"product {product_id}: created ({name})")
        except stripe.InvalidRequestError as exc:
            if exc.code != "resource_already_exists":
                raise
            product = await client.v1.products.retrieve_async(product_id)
    else:
        outcome.lines.append(f"product {product_id}: exists")
    if not product.active:
        outcome.problems.append(f"product {product_id} is archived at Stripe; checkout cannot "
                                "sell it: unarchive it in the Dashboard")


async def _find(retrieve: Any, object_id: str) -> Any:
    """The object, or None when Stripe has none of that id."""
    try:
        return await retrieve(object_id)
    except stripe.InvalidRequestError as exc:
        if exc.code == "resource_missing" or exc.http_status == 404:
            return None
        raise
