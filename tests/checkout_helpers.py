"""Checkout tests' common ground: the service with a Stripe key, talking to a fake Stripe that
has what `donations stripe-setup` makes, and ways to read what reached "Stripe"."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import asyncpg
from pytest_aiohttp import AiohttpClient

from donations import auth, campaigns, db
from donations.app import create_app
from donations.settings import Secret
from tests.conftest import Client, make_settings
from tests.fakestripe import objects as o
from tests.fakestripe.server import FakeStripe, RecordedRequest, running_fake_stripe
from tests.fakestripe.world import World

TEST_KEY = "sk_test_donations_checkout"
SITE = "https://news.example.org"
SESSIONS = "/v1/checkout/sessions"


def stock(world: World, *, percent_off: int = 50, seats: int = 1000) -> None:
    """What `donations stripe-setup` would have made in the account."""
    world.objects["founding-supporter"] = o.coupon(created=world.now, percent_off=percent_off)
    world.objects["founding-supporter"]["max_redemptions"] = seats
    for product_id, name in (("donations-one-off", "One-off support"),
                             ("donations-recurring", "Recurring support")):
        world.objects[product_id] = o.product(id=product_id, created=world.now, name=name)


@asynccontextmanager
async def checkout_service(
    aiohttp_client: AiohttpClient, dsn: str, world: World | None = None, *,
    stocked: bool = True, **overrides: Any,
) -> AsyncIterator[tuple[Client, FakeStripe]]:
    """The app with a Stripe key against a fake Stripe serving `world`; SITE is the site."""
    world = world or World(seed=31)
    if stocked:
        stock(world, seats=overrides.get("founding_seats", 1000))
    async with running_fake_stripe(world) as fake:
        values: dict[str, Any] = {
            "stripe_secret_key": Secret(TEST_KEY),
            "stripe_api_base": fake.base_url,
            "site_origins": (SITE,),
            "checkout_rate_per_ip": 1000,
            "checkout_rate_overall": 10_000,
        }
        values.update(overrides)
        client = await aiohttp_client(create_app(make_settings(dsn, **values)))
        yield client, fake


def order(**changes: Any) -> dict[str, Any]:
    """A valid one-off contribution body, with `changes`."""
    body: dict[str, Any] = {
        "amount": 2500, "currency": "gbp",
        "success_url": f"{SITE}/thanks?session_id={{CHECKOUT_SESSION_ID}}",
        "cancel_url": f"{SITE}/support",
    }
    body.update(changes)
    return {k: v for k, v in body.items() if v is not None}


def subscription(**changes: Any) -> dict[str, Any]:
    return order(**{"amount": 1000, "interval": "month", **changes})


def created_sessions(fake: FakeStripe) -> list[RecordedRequest]:
    """The session creations that reached the fake Stripe (replays by Stripe included)."""
    return [r for r in fake.requests if r.method == "POST" and r.path == SESSIONS]


def stripe_keys(requests: list[RecordedRequest]) -> list[str]:
    """The Idempotency-Keys the requests gave Stripe, each without the time its reader's key was
    claimed (their one 10-digit part: idempotency.stripe_key)."""
    keys = [r.headers["Idempotency-Key"] for r in requests]
    assert all(re.search(r":\d{10}(:|$)", key) for key in keys), keys
    return [re.sub(r":\d{10}(?=:|$)", "", key) for key in keys]


def sessions_in(world: World) -> list[dict[str, Any]]:
    return [obj for obj in world.objects.values() if obj.get("object") == "checkout.session"]


async def add_campaign(pool: asyncpg.Pool, slug: str) -> None:
    async with db.connection(pool) as conn:
        await campaigns.create(conn, slug, slug.title(), None, None, None, None, "gbp")


async def token(pool: asyncpg.Pool, name: str, *scopes: str) -> str:
    async with db.connection(pool) as conn:
        return await auth.create_token(conn, name, list(scopes))
