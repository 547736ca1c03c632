"""The fake Stripe's write endpoints: Checkout Sessions, coupons, products, prices, portal sessions.

Each validates what the real API validates for the parameters this service sends (and answers
in Stripe's error shape), keeps what it made in the World, and honours `Idempotency-Key`: the
same key with the same parameters replays the first answer, with other parameters it is a 400
`idempotency_error`, as Stripe does.
"""

from __future__ import annotations

import copy
import json
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, Any

from aiohttp import web

from . import objects as o
from .objects import Obj
from .world import CheckoutOrder, World

if TYPE_CHECKING:
    from .server import FakeStripe

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

# Stripe's minimum charge in the currencies the tests use (docs.stripe.com/currencies).
MINIMUM_CHARGE = {"gbp": 30, "usd": 50, "eur": 50, "jpy": 50}


def install(fake: FakeStripe) -> None:
    """Add the write endpoints to `fake`'s app."""
    writes = _Writes(fake)
    router = fake.app.router
    router.add_post("/v1/checkout/sessions", writes.idempotent(writes.create_session))
    router.add_post("/v1/checkout/sessions/{id}/expire", writes.idempotent(writes.expire_session))
    router.add_post("/v1/coupons", writes.idempotent(writes.create_coupon))
    router.add_post("/v1/products", writes.idempotent(writes.create_product))
    router.add_post("/v1/prices", writes.idempotent(writes.create_price))
    router.add_post("/v1/billing_portal/sessions", writes.idempotent(writes.create_portal))


def _error(message: str, *, param: str | None = None, code: str | None = None,
           status: int = 400, type: str = "invalid_request_error") -> Exception:
    from .server import StripeError  # here: server imports this module

    return StripeError(status, message, param=param, code=code, type=type)


def _int(form: Mapping[str, Any], name: str, param: str | None = None) -> int | None:
    raw = form.get(name)
    if raw is None:
        return None
    try:
        return int(raw)
    except (TypeError, ValueError):
        raise _error(f"Invalid integer: {raw}", param=param or name) from None


def _metadata(value: Any, param: str) -> dict[str, str]:
    if value in (None, ""):
        return {}
    if not isinstance(value, dict):
        raise _error("Invalid object", param=param)
    if len(value) > 50:
        raise _error("Metadata can have up to 50 keys", param=param)
    for key, item in value.items():
        if len(key) > 40:
            raise _error("Metadata keys can have up to 40 characters", param=f"{param}[{key}]")
        if len(str(item)) > 500:
            raise _error("Metadata values can have up to 500 characters",
                         param=f"{param}[{key}]")
    return {str(k): str(v) for k, v in value.items()}


class _Writes:
    def __init__(self, fake: FakeStripe) -> None:
        self.fake = fake
        self._answers = fake.idempotent_answers  # key -> (path, form, status, answer)

    @property
    def world(self) -> World:
        if self.fake.world is None:
            raise _error("this fake Stripe has no World to create objects in", status=500,
                         type="api_error")
        return self.fake.world

    def _form(self, request: web.Request) -> dict[str, Any]:
        form: dict[str, Any] = self.fake._params(request)
        return form

    def idempotent(self, handler: Callable[[web.Request], Obj]) -> Handler:
        async def wrapped(request: web.Request) -> web.Response:
            key = request.headers.get("Idempotency-Key")
            if key is not None and len(key) > 255:  # as Stripe refuses it
                raise _error("Keys for idempotent requests can only be 255 characters long "
                             f"and cannot be empty. You passed in a key of length {len(key)}.")
            form = json.dumps(self._form(request), sort_keys=True)
            if key is not None and key in self._answers:
                path, seen_form, status, body = self._answers[key]
                if (path, seen_form) != (request.path, form):
                    raise _error(
                        "Keys for idempotent requests can only be used with the same parameters "
                        f"they were first used with. Try using a key other than '{key}' if you "
                        "meant to execute a different request.", type="idempotency_error")
                return web.json_response(body, status=status,
                                         headers={"Idempotent-Replayed": "true"})
            body = handler(request)
            if key is not None:
                self._answers[key] = (request.path, form, 200, copy.deepcopy(body))
            return web.json_response(body)

        return wrapped

    # -- checkout sessions -----------------------------------------------------------------

    def create_session(self, request: web.Request) -> Obj:
        world = self.world
        real = int(time.time())  # the service computes expiries from the real clock
        now = world.sync_clock(real)
        form = self._form(request)
        mode = form.get("mode")
        if mode not in ("payment", "subscription"):
            raise _error("Invalid mode: must be one of payment, setup or subscription",
                         param="mode")
        if not form.get("success_url"):
            raise _error("Missing required param: success_url.", param="success_url")
        items = form.get("line_items")
        if not isinstance(items, list) or len(items) != 1:
            raise _error("line_items must have exactly one item here", param="line_items")
        item = items[0]
        price_data = item.get("price_data") if isinstance(item, dict) else None
        if not isinstance(price_data, dict):
            raise _error("Missing required param: line_items[0][price_data].",
                         param="line_items[0][price_data]")
        quantity = _int(item, "quantity", "line_items[0][quantity]") or 1
        amount = _int(price_data, "unit_amount", "line_items[0][price_data][unit_amount]")
        currency = str(price_data.get("currency", ""))
        product = str(price_data.get("product", ""))
        if amount is None or amount < 0:
            raise _error("Missing required param: line_items[0][price_data][unit_amount].",
                         param="line_items[0][price_data][unit_amount]")
        if currency not in MINIMUM_CHARGE:
            raise _error(f"Invalid currency: {currency}",
                         param="line_items[0][price_data][currency]")
        found = world.objects.get(product)
        if found is None or found.get("object") != "product":
            raise _error(f"No such product: '{product}'", code="resource_missing",
                         param="line_items[0][price_data][product]")
        recurring = price_data.get("recurring")
        interval = recurring.get("interval") if isinstance(recurring, dict) else None
        if mode == "subscription" and interval not in ("day", "week", "month", "year"):
            raise _error("You must provide at least one recurring price in `subscription` mode "
                         "when using prices.", param="line_items[0][price_data][recurring]")
        if mode == "payment" and recurring is not None:
            raise _error("You specified `payment` mode but passed a recurring price.",
                         param="line_items[0][price_data][recurring]")
        expires_at = _int(form, "expires_at") or real + 86400
        if not real + 1800 <= expires_at <= real + 86400:
            raise _error("The `expires_at` timestamp must be between 30 minutes and 24 hours "
                         "from Checkout Session creation.", param="expires_at")
        wrong = "subscription_data" if mode == "payment" else "payment_intent_data"
        if wrong in form:
            raise _error(f"You can not pass `{wrong}` in `{mode}` mode.", param=wrong)
        coupon: str | None = None
        discounts = form.get("discounts")
        if discounts:
            coupon = str(discounts[0].get("coupon", ""))
            cp = world.objects.get(coupon)
            if cp is None or cp.get("object") != "coupon":
                raise _error(f"No such coupon: '{coupon}'", code="resource_missing",
                             param="discounts[0][coupon]")
            limit = cp.get("max_redemptions")
            if not cp["valid"] or (limit is not None and cp["times_redeemed"] >= limit):
                raise _error(f"Coupon {coupon} is no longer valid.", code="coupon_expired",
                             param="discounts[0][coupon]")
        email = form.get("customer_email")
        if email is not None and "@" not in str(email):
            raise _error("Invalid email address: " + str(email), param="customer_email",
                         code="email_invalid")
        subtotal = amount * quantity
        discount = 0
        if coupon is not None:
            percent = world.objects[coupon]["percent_off"] or 0
            discount = (subtotal * int(percent) * 2 + 100) // 200  # half up, whole percents
        total = subtotal - discount
        if 0 < total < MINIMUM_CHARGE[currency]:
            raise _error("The Checkout Session's total amount due must add up to at least "
                         f"{MINIMUM_CHARGE[currency]} {currency}", param="line_items")
        metadata = _metadata(form.get("metadata"), "metadata")
        data_name = "payment_intent_data" if mode == "payment" else "subscription_data"
        data = form.get(data_name) or {}
        object_metadata = _metadata(data.get("metadata"), f"{data_name}[metadata]")
        cs = o.checkout_session(
            ids=world.ids,
            amount_total=total,
            amount_subtotal=subtotal,
            amount_discount=discount,
            discounts=[{"coupon": coupon, "promotion_code": None}] if coupon else [],
            currency=currency,
            created=now,
            mode=str(mode),
            status="open",
            payment_status="unpaid",
            customer_email=str(email) if email is not None else None,
            metadata=metadata,
            success_url=str(form["success_url"]),
            cancel_url=form.get("cancel_url"),
            livemode=world.livemode,
        )
        cs["expires_at"] = expires_at
        if form.get("submit_type"):
            cs["submit_type"] = form["submit_type"]
        world.objects[cs["id"]] = cs
        world.checkout_orders[cs["id"]] = CheckoutOrder(
            amount, currency, interval if mode == "subscription" else None, object_metadata,
            coupon)
        return copy.deepcopy(cs)

    def expire_session(self, request: web.Request) -> Obj:
        world = self.world
        session_id = request.match_info["id"]
        cs = world.objects.get(session_id)
        if cs is None or cs.get("object") != "checkout.session":
            raise _error(f"No such checkout.session: '{session_id}'", code="resource_missing",
                         status=404, param="session")
        if cs["status"] != "open":
            raise _error(f"Only Checkout Sessions with a status in [\"open\"] can be expired. "
                         f"This Checkout Session has a status of \"{cs['status']}\".")
        world.expire_checkout(session_id, at_expiry=False)
        return copy.deepcopy(cs)

    # -- what `donations stripe-setup` makes -----------------------------------------------------

    def create_coupon(self, request: web.Request) -> Obj:
        world = self.world
        form = self._form(request)
        coupon_id = form.get("id") or world.ids.new("cp")
        if coupon_id in world.objects:
            raise _error("Coupon already exists.", code="resource_already_exists", param="id")
        percent = form.get("percent_off")
        duration = form.get("duration", "once")
        if percent is None and form.get("amount_off") is None:
            raise _error("Missing required param: percent_off or amount_off.",
                         param="percent_off")
        if duration not in ("once", "repeating", "forever"):
            raise _error("Invalid duration", param="duration")
        cp = o.coupon(
            id=str(coupon_id), created=world.sync_clock(int(time.time())),
            percent_off=float(percent) if percent is not None else None,
            amount_off=_int(form, "amount_off"), currency=form.get("currency"),
            duration=str(duration), name=form.get("name"), livemode=world.livemode,
        )
        cp["max_redemptions"] = _int(form, "max_redemptions")
        cp["metadata"] = _metadata(form.get("metadata"), "metadata")
        world.objects[cp["id"]] = cp
        return copy.deepcopy(cp)

    def create_product(self, request: web.Request) -> Obj:
        world = self.world
        form = self._form(request)
        product_id = form.get("id")
        if product_id is not None and product_id in world.objects:
            raise _error(f"Product already exists with ID {product_id}.",
                         code="resource_already_exists", param="id")
        if not form.get("name"):
            raise _error("Missing required param: name.", param="name")
        product = o.product(
            id=str(product_id) if product_id else None, ids=world.ids,
            created=world.sync_clock(int(time.time())), name=str(form["name"]),
            metadata=_metadata(form.get("metadata"), "metadata"), livemode=world.livemode,
        )
        world.objects[product["id"]] = product
        return copy.deepcopy(product)

    def create_price(self, request: web.Request) -> Obj:
        world = self.world
        form = self._form(request)
        product = str(form.get("product", ""))
        if world.objects.get(product, {}).get("object") != "product":
            raise _error(f"No such product: '{product}'", code="resource_missing",
                         param="product")
        recurring = form.get("recurring")
        price = o.price(
            ids=world.ids, unit_amount=_int(form, "unit_amount") or 0,
            currency=str(form.get("currency", "")), created=world.sync_clock(int(time.time())),
            product=product,
            interval=recurring.get("interval") if isinstance(recurring, dict) else None,
            livemode=world.livemode,
        )
        world.objects[price["id"]] = price
        return copy.deepcopy(price)

    # -- the customer portal -----------------------------------------------------------------------

    def create_portal(self, request: web.Request) -> Obj:
        world = self.world
        form = self._form(request)
        customer = str(form.get("customer", ""))
        if world.objects.get(customer, {}).get("object") != "customer":
            raise _error(f"No such customer: '{customer}'", code="resource_missing",
                         param="customer")
        session_id = world.ids.new("bps")
        return {
            "id": session_id,
            "object": "billing_portal.session",
            "after_expiration": None,
            "configuration": "bpc_1FakeStripeDefaultConfig",
            "created": world.sync_clock(int(time.time())),
            "customer": customer,
            "customer_account": None,
            "flow": None,
            "livemode": world.livemode,
            "locale": None,
            "on_behalf_of": None,
            "return_url": form.get("return_url"),
            "url": f"https://billing.stripe.com/p/session/test_{session_id[4:]}",
        }
