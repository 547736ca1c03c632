"""Coupons other than the founding one: a discounted subscription counts in the monthly recurring at
its price after the discount (the contract), although webhooks name a discount's coupon by id only.
The terms come from the coupon's own events, or are looked up at Stripe by the coupon worker."""

from __future__ import annotations

import asyncio
import copy
import json
import time
from dataclasses import asdict
from decimal import Decimal
from typing import Any

import asyncpg
import pytest

from donations import coupons, importer, reports
from donations.appkeys import TOTALS
from donations.events import parse_event
from donations.ledger import (
    FoundingOffer,
    coupon_terms,
    coupons_to_look_up,
    derive_subscription,
    snapshot_of,
)
from donations.totals import price_after_discounts
from tests.conftest import Client
from tests.fakestripe import objects as o
from tests.fakestripe.world import World
from tests.ledger_check import reference
from tests.test_fees import stripe_against
from tests.webhook_helpers import post_all

START = 1_795_000_000  # 2026-11-18T07:46:40Z
OFFER = FoundingOffer()


def _world_with_coupon(**terms: Any) -> tuple[World, dict[str, Any]]:
    """A world whose account has a coupon made in the Dashboard (not the founding one)."""
    world = World(seed=7, start=START)
    coupon = o.coupon(id="spring-20", created=world.now, name="Spring", **(terms or {
        "percent_off": 20}))
    world.objects[coupon["id"]] = coupon
    return world, coupon


def _subscribed(world: World, amount: int = 1000) -> tuple[str, list[dict[str, Any]]]:
    """A £10 monthly subscription through Checkout with the coupon applied: its events name the
    coupon by id only (`customer.discount.created`'s `source.coupon`)."""
    sub = world.subscribe(amount, "gbp", founding=True, coupon="spring-20",
                          email="reader@example.org")
    discounts = [e for e in sub.events if e["type"] == "customer.discount.created"]
    assert discounts and discounts[0]["data"]["object"]["source"]["coupon"] == "spring-20"
    return sub.subscription, sub.events


def _coupon_event(world: World, coupon: dict[str, Any]) -> dict[str, Any]:
    return o.event("coupon.created", copy.deepcopy(coupon), created=coupon["created"],
                   ids=world.ids)


async def _mrr(client: Client) -> dict[str, Any]:
    client.app[TOTALS].clear()
    response = await client.get("/v1/totals")
    assert response.status == 200, await response.text()
    body: dict[str, Any] = await response.json()
    return body["monthly_recurring"]  # type: ignore[no-any-return]


async def _row(pool: asyncpg.Pool, sub_id: str) -> asyncpg.Record:
    row = await pool.fetchrow("SELECT * FROM subscriptions WHERE id = $1", sub_id)
    assert row is not None
    return row


async def _lookups(pool: asyncpg.Pool) -> list[asyncpg.Record]:
    return await pool.fetch("SELECT * FROM coupon_lookups ORDER BY coupon_id")


# --- the terms, without I/O -----------------------------------------------------------------


def test_a_percentage_coupon_takes_its_percentage_off_in_any_currency() -> None:
    coupon = o.coupon(id="c", created=START, percent_off=12.5)
    assert coupon_terms(coupon, "gbp") == (Decimal("12.5"), None)
    assert coupon_terms(coupon, "jpy") == (Decimal("12.5"), None)


def test_an_amount_coupon_takes_its_amount_off_only_in_its_currencies() -> None:
    coupon = o.coupon(id="c", created=START, percent_off=None, amount_off=300, currency="gbp")
    coupon["currency_options"] = {"usd": {"amount_off": 400}}
    assert coupon_terms(coupon, "gbp") == (None, 300)
    assert coupon_terms(coupon, "usd") == (None, 400)
    assert coupon_terms(coupon, "eur") == (None, None)  # Stripe would not apply it


def test_the_reference_ledger_takes_the_terms_from_the_coupons_event() -> None:
    world, coupon = _world_with_coupon()
    sub_id, events = _subscribed(world)
    without = reference(events, OFFER)["subscriptions"][sub_id]
    assert (without["percent_off"], without["founding"]) == (None, False)
    with_terms = reference([_coupon_event(world, coupon), *events], OFFER)["subscriptions"][sub_id]
    assert (with_terms["percent_off"], with_terms["founding"]) == (Decimal(20), False)


def test_a_subscription_imported_with_its_discounts_expanded_looks_its_coupon_up() -> None:
    """`donations import` lists subscriptions with `discounts` expanded: the discount is there
    whole, its coupon still by id; the founding coupon needs no look-up."""
    world, coupon = _world_with_coupon()
    sub_id, _ = _subscribed(world)
    sub = copy.deepcopy(world.objects[sub_id])
    sub["discounts"] = [copy.deepcopy(world.objects[d]) for d in sub["discounts"]]
    (snapshot,) = [s for s in [snapshot_of(parse_event(o.event(
        "customer.subscription.updated", sub, created=world.now, ids=world.ids)))] if s]
    assert coupons_to_look_up(snapshot, [], OFFER) == {"spring-20"}
    assert derive_subscription(snapshot, [], OFFER).percent_off is None
    assert derive_subscription(snapshot, [], OFFER, {"spring-20": coupon}).percent_off == 20
    founding = FoundingOffer(coupon_id="spring-20")
    assert coupons_to_look_up(snapshot, [], founding) == set()
    assert derive_subscription(snapshot, [], founding).founding


async def _full_price_until_the_coupon_comes(
    client: Client, pool: asyncpg.Pool, world: World, coupon: dict[str, Any], sub_id: str,
    events: list[dict[str, Any]],
) -> None:
    """Post a 20%-off subscription's events, then its coupon's: full price and a look-up queued
    until the coupon comes, then the discounted price; the worker then ends the look-up without
    asking Stripe (no key here)."""
    # the subscription first: its coupon is not known, it counts at its full price and the
    # coupon is queued for a look-up
    await post_all(client, events)
    assert (await _row(pool, sub_id))["percent_off"] is None
    assert await _mrr(client) == {"amount": 1000, "currency": "gbp"}
    assert [r["coupon_id"] for r in await _lookups(pool)] == ["spring-20"]
    # then the coupon's event: the subscription is derived again with its terms
    await post_all(client, [_coupon_event(world, coupon)])
    assert (await _row(pool, sub_id))["percent_off"] == Decimal(20)
    assert await _mrr(client) == {"amount": 800, "currency": "gbp"}
    assert await coupons.run_once(pool, None, OFFER) == 1
    assert await _lookups(pool) == []


# --- through the webhook --------------------------------------------------------------------


async def test_a_coupon_known_from_its_event_discounts_the_monthly_recurring_in_either_order(
    client: Client, pool: asyncpg.Pool
) -> None:
    world, coupon = _world_with_coupon()
    sub_id, events = _subscribed(world)
    await _full_price_until_the_coupon_comes(client, pool, world, coupon, sub_id, events)
    assert await _mrr(client) == {"amount": 800, "currency": "gbp"}


async def test_a_coupon_event_before_the_subscription_needs_no_look_up(
    client: Client, pool: asyncpg.Pool
) -> None:
    world, coupon = _world_with_coupon()
    sub_id, events = _subscribed(world)
    await post_all(client, [_coupon_event(world, coupon), *events])
    assert (await _row(pool, sub_id))["percent_off"] == Decimal(20)
    assert await _mrr(client) == {"amount": 800, "currency": "gbp"}
    assert await _lookups(pool) == []


async def test_an_amount_off_coupon_counts_in_the_subscriptions_currency(
    client: Client, pool: asyncpg.Pool
) -> None:
    world, coupon = _world_with_coupon(percent_off=None, amount_off=250, currency="gbp")
    sub_id, events = _subscribed(world)
    await post_all(client, [*events, _coupon_event(world, coupon)])
    row = await _row(pool, sub_id)
    assert (row["percent_off"], row["amount_off"]) == (None, 250)
    assert await _mrr(client) == {"amount": 750, "currency": "gbp"}


async def test_an_amount_off_coupon_in_its_users_currency_needs_no_options(
    client: Client, pool: asyncpg.Pool
) -> None:
    """A £2.50-off coupon whose event came after the look-up was queued, used only by pound
    subscriptions: its options (left out of the event) are not needed, so the look-up ends
    without asking Stripe, with or without a key."""
    world, coupon = _world_with_coupon(percent_off=None, amount_off=250, currency="gbp")
    sub_id, events = _subscribed(world)
    await post_all(client, events)
    assert [r["coupon_id"] for r in await _lookups(pool)] == ["spring-20"]
    await post_all(client, [_coupon_event(world, coupon)])
    assert await coupons.run_once(pool, None, OFFER) == 1
    assert await _lookups(pool) == []
    assert (await _row(pool, sub_id))["amount_off"] == 250


async def test_the_worker_derives_the_users_of_a_coupon_kept_since_it_was_queued(
    client: Client, pool: asyncpg.Pool
) -> None:
    """A look-up queued for a coupon whose terms have been kept since, without the subscriptions
    that use it derived again (written here directly: the coupon's event would have derived
    them): the worker derives them and ends the look-up, with or without a Stripe key."""
    world, coupon = _world_with_coupon()
    sub_id, events = _subscribed(world)
    await post_all(client, events)
    await pool.execute(
        "INSERT INTO stripe_objects (id, object, rank, progress, event_created, type_rank,"
        " event_id, data) VALUES ($1, 'coupon', 0, 0, $2, 0, 'evt_coupon', $3::jsonb)",
        coupon["id"], coupon["created"], json.dumps(coupon))
    assert await _mrr(client) == {"amount": 1000, "currency": "gbp"}
    assert await coupons.run_once(pool, None, OFFER) == 1
    assert (await _row(pool, sub_id))["percent_off"] == Decimal(20)
    assert await _mrr(client) == {"amount": 800, "currency": "gbp"}
    assert await _lookups(pool) == []


async def test_without_a_key_a_coupon_not_known_waits_for_its_event(
    client: Client, pool: asyncpg.Pool
) -> None:
    world, _ = _world_with_coupon()
    await post_all(client, _subscribed(world)[1])
    assert await coupons.run_once(pool, None, OFFER) == 0
    (lookup,) = await _lookups(pool)
    assert lookup["gave_up_at"] is None and lookup["attempts"] == 0
    assert await pool.fetchval(
        "SELECT next_attempt_at > now() + interval '50 minutes' FROM coupon_lookups")


# --- looked up at Stripe --------------------------------------------------------------------


async def test_the_worker_fetches_a_coupon_no_event_brought(
    client: Client, pool: asyncpg.Pool
) -> None:
    world, _ = _world_with_coupon()
    sub_id, events = _subscribed(world)
    await post_all(client, events)
    async with stripe_against(world) as (fake, stripe_client):
        assert await coupons.run_once(pool, stripe_client, OFFER) == 1
        asked = [r.path for r in fake.requests if r.method == "GET"]
    assert asked == ["/v1/coupons/spring-20"]
    assert (await _row(pool, sub_id))["percent_off"] == Decimal(20)
    assert await _mrr(client) == {"amount": 800, "currency": "gbp"}
    assert await _lookups(pool) == []
    (stored,) = await pool.fetch("SELECT id, source, type FROM stripe_events"
                                 " WHERE id LIKE 'evt\\_import\\_coupon\\_%'")
    assert stored["id"].startswith(coupons.event_id("spring-20", 0).rsplit("_", 1)[0] + "_")
    assert (stored["source"], stored["type"]) == ("import", "coupon.updated")


async def test_an_amount_off_coupon_is_asked_for_with_the_options_stripe_leaves_out(
    client: Client, pool: asyncpg.Pool
) -> None:
    """A £3-off coupon with a ¥100 option on a yen subscription. Stripe's coupon events (and a
    retrieve that does not expand them) leave `currency_options` out: the event tells nothing
    of the yen amount, so the coupon is asked for again with its options expanded, and then
    the subscription is discounted."""
    world = World(seed=8, start=START)
    created = world.create_coupon("promo", amount_off=300, currency="gbp",
                                  currency_options={"jpy": 100})
    assert "currency_options" not in created.events[0]["data"]["object"]  # as Stripe sends it
    sub = world.subscribe(999, "jpy", email="reader@example.org")
    world.discount_subscription(sub.subscription, "promo")
    await post_all(client, world.events)
    row = await _row(pool, sub.subscription)
    assert (row["currency"], row["amount_off"]) == ("jpy", None)  # not known from the event
    assert [r["coupon_id"] for r in await _lookups(pool)] == ["promo"]
    async with stripe_against(world) as (fake, stripe_client):
        assert await coupons.run_once(pool, stripe_client, OFFER) == 1
        (asked,) = [r for r in fake.requests if r.method == "GET"]
    assert (asked.path, asked.query.get("expand")) == ("/v1/coupons/promo",
                                                       ["currency_options"])
    assert (await _row(pool, sub.subscription))["amount_off"] == 100
    assert await _lookups(pool) == []

    # renamed in the Dashboard later (after the look-up, by the clock the worker stamped it
    # with): its event, without the options, outranks the coupon fetched, so it is looked up
    # again, and stored again (a look-up's event of its own)
    await asyncio.sleep(1.1)  # (a second after the look-up's stamp, and one before the next)
    renamed = dict(o.as_sent(world.objects["promo"]), name="Spring promotion")
    world.objects["promo"]["name"] = "Spring promotion"
    await post_all(client, [o.event("coupon.updated", renamed, created=int(time.time()),
                                    ids=world.ids)])
    await asyncio.sleep(1.1)
    assert (await _row(pool, sub.subscription))["amount_off"] is None
    assert [r["coupon_id"] for r in await _lookups(pool)] == ["promo"]
    async with stripe_against(world) as (_, stripe_client):
        assert await coupons.run_once(pool, stripe_client, OFFER) == 1
    assert (await _row(pool, sub.subscription))["amount_off"] == 100
    assert await _lookups(pool) == []


async def test_a_coupon_stripe_does_not_have_is_retried_then_set_aside(
    client: Client, pool: asyncpg.Pool
) -> None:
    world, _ = _world_with_coupon()
    sub_id, events = _subscribed(world)
    await post_all(client, events)
    del world.objects["spring-20"]  # deleted in the Dashboard before we asked
    async with stripe_against(world) as (_, stripe_client):
        for attempt in range(1, 4):
            assert await coupons.run_once(pool, stripe_client, OFFER) == 0
            (lookup,) = await _lookups(pool)
            assert lookup["attempts"] == attempt and "InvalidRequestError" in lookup["last_error"]
            await pool.execute("UPDATE coupon_lookups SET next_attempt_at = now()")
    assert lookup["gave_up_at"] is not None  # set aside: `donations lookups retry` puts it back
    assert (await _row(pool, sub_id))["percent_off"] is None
    response = await client.get("/metrics")
    assert 'donations_stripe_lookups_set_aside{queue="coupons"} 1' in await response.text()


# --- a coupon on the subscription's item ----------------------------------------------------


def _item_discounted(world: World, amount: int = 1000) -> tuple[str, list[dict[str, Any]]]:
    """A £10 monthly subscription without a coupon, to whose item staff then put the coupon in
    the Dashboard: the discount is listed in `items.data[].discounts`, not the subscription's
    `discounts`, and its customer.discount.created names the item and the subscription."""
    sub = world.subscribe(amount, "gbp", email="reader@example.org")
    applied = world.discount_item(sub.subscription, "spring-20")
    (created,) = [e["data"]["object"] for e in applied.events
                  if e["type"] == "customer.discount.created"]
    assert (created["subscription"], created["subscription_item"]) == (
        sub.subscription, world.objects[sub.subscription]["items"]["data"][0]["id"])
    assert world.objects[sub.subscription]["discounts"] == []
    return sub.subscription, [*sub.events, *applied.events]


def test_the_reference_ledger_counts_an_items_discount_as_the_subscriptions() -> None:
    world, coupon = _world_with_coupon()
    sub_id, events = _item_discounted(world)
    row = reference([_coupon_event(world, coupon), *events], OFFER)["subscriptions"][sub_id]
    assert (row["percent_off"], row["founding"]) == (Decimal(20), False)
    assert len(row["discounts"]) == 1


async def test_a_coupon_on_the_subscriptions_item_discounts_the_monthly_recurring(
    client: Client, pool: asyncpg.Pool
) -> None:
    """Staff put a coupon on a subscription's item: the subscription counts at its price after
    that discount, as for a coupon on the subscription itself; the coupon named by id only is
    queued for a look-up until its terms come."""
    world, coupon = _world_with_coupon()
    sub_id, events = _item_discounted(world)
    await _full_price_until_the_coupon_comes(client, pool, world, coupon, sub_id, events)
    assert len((await _row(pool, sub_id))["discounts"]) == 1


async def test_a_coupon_on_the_item_fetched_by_the_worker_discounts_the_monthly_recurring(
    client: Client, pool: asyncpg.Pool
) -> None:
    world, _ = _world_with_coupon(percent_off=None, amount_off=250, currency="gbp")
    sub_id, events = _item_discounted(world)
    await post_all(client, events)
    async with stripe_against(world) as (_, stripe_client):
        assert await coupons.run_once(pool, stripe_client, OFFER) == 1
    row = await _row(pool, sub_id)
    assert (row["percent_off"], row["amount_off"]) == (None, 250)
    assert await _mrr(client) == {"amount": 750, "currency": "gbp"}


async def test_an_imported_subscription_with_a_coupon_on_its_item_is_discounted(
    pool: asyncpg.Pool
) -> None:
    """`donations import` lists subscriptions with their items' discounts expanded too: the
    coupon they name is looked up, and the subscription counts at its price after it."""
    world, _ = _world_with_coupon()
    sub = world.subscribe(1000, "gbp", email="reader@example.org")
    world.discount_item(sub.subscription, "spring-20")
    async with stripe_against(world) as (_, stripe_client):
        await importer.run(pool, stripe_client, OFFER, START - 86400, now=world.now + 60)
        assert [r["coupon_id"] for r in await _lookups(pool)] == ["spring-20"]
        assert await coupons.run_once(pool, stripe_client, OFFER) == 1
    assert (await _row(pool, sub.subscription))["percent_off"] == Decimal(20)



# --- several discounts ------------------------------------------------------------------------


def _price(row: Any) -> int:
    """The price after discounts that a subscription row's columns give: what the totals (and
    their triggers) count, and the finance summary's monthly recurring the same."""
    fields = row if isinstance(row, dict) else asdict(row)
    amount, percent_off, amount_off = fields["amount"], fields["percent_off"], fields["amount_off"]
    price = price_after_discounts(amount, percent_off, amount_off)
    assert reports.monthly(amount, "month", 1, percent_off, amount_off) == price
    return price


def _stacked(world: World, amount: int, in_currency: str = "gbp", **terms: Any
             ) -> tuple[str, str]:
    """A founding supporter's subscription (50% off) to which staff then add a promotion made in
    the Dashboard (`terms`): two discounts in the subscription's `discounts`, the founding one
    first; returns the subscription and the renewal invoice that charges both."""
    world.create_coupon("promo", **terms)
    sub = world.subscribe(amount, in_currency, founding=True, email="reader@example.org")
    world.discount_subscription(sub.subscription, "promo")
    assert len(world.objects[sub.subscription]["discounts"]) == 2
    return sub.subscription, world.renew(sub.subscription).invoice


def test_stacked_discounts_count_as_stripes_invoice_charges_them() -> None:
    """£9.99 with the founding 50% then a 15% promotion: 4.99, then 4.24 (not 3.49, 15% of the
    listed price taken as well, nor 5.00 or 8.49, one of the two alone)."""
    world = World(seed=3, start=START)
    sub_id, invoice = _stacked(world, 999, percent_off=15)
    assert world.objects[invoice]["total"] == 424
    row = reference(world.events, OFFER)["subscriptions"][sub_id]
    assert _price(row) == 424
    assert row["founding"] and len(row["discounts"]) == 2


def test_stacked_amount_off_in_yen_comes_off_after_the_founding_percentage() -> None:
    """¥999 with the founding 50% (¥499 left: the ¥499.5 discount rounds up), then ¥100 off
    (the coupon is in pounds; its yen option applies): ¥399."""
    world = World(seed=4, start=START)
    sub_id, invoice = _stacked(world, 999, "jpy", amount_off=300, currency="gbp",
                               currency_options={"jpy": 100})
    assert world.objects[invoice]["total"] == 399
    # the coupon's event leaves its options out: the yen amount comes with the look-up
    assert _price(reference(world.events, OFFER)["subscriptions"][sub_id]) == 499
    looked_up = importer.synthetic_event(world.objects["promo"], "coupon.updated", world.now)
    assert looked_up["data"]["object"]["currency_options"] == {"jpy": {"amount_off": 100}}
    assert _price(reference([*world.events, looked_up], OFFER)["subscriptions"][sub_id]) == 399


def test_a_stacked_amount_off_in_another_currency_takes_nothing() -> None:
    world = World(seed=5, start=START)
    sub_id, invoice = _stacked(world, 1000, "eur", amount_off=300, currency="gbp")
    assert world.objects[invoice]["total"] == 500
    row = reference(world.events, OFFER)["subscriptions"][sub_id]
    assert (row["percent_off"], row["amount_off"]) == (Decimal(50), None)


def test_a_stacked_coupon_not_known_yet_takes_nothing_until_its_terms_come() -> None:
    """The promotion's coupon named by id only, its terms not known (no event, not fetched):
    the founding 50% alone counts, as before, and the coupon is to be looked up."""
    world = World(seed=6, start=START)
    sub_id, _ = _stacked(world, 999, percent_off=15)
    events = [e for e in world.events if e["type"] != "coupon.created"]
    row = reference(events, OFFER)["subscriptions"][sub_id]
    assert (row["percent_off"], row["amount_off"], row["coupons"]) == (Decimal(50), None,
                                                                      ["promo"])
    assert _price(row) == 499


def _two_items(world: World, sub_id: str, second: int) -> Any:
    """The subscription's latest snapshot with a second item (no discount of its own) priced
    `second`, as a subscription of several items made in the Dashboard lists them."""
    sub = copy.deepcopy(world.objects[sub_id])
    item = copy.deepcopy(sub["items"]["data"][0])
    item["id"], item["discounts"] = "si_second", []
    item["price"] = {**item["price"], "id": "price_second", "unit_amount": second}
    sub["items"]["data"].append(item)
    (snapshot,) = [s for s in [snapshot_of(parse_event(o.event(
        "customer.subscription.updated", sub, created=world.now, ids=world.ids)))] if s]
    return snapshot


def _discount_snapshots(world: World, events: list[dict[str, Any]]) -> list[Any]:
    return [s for s in (snapshot_of(parse_event(e)) for e in events
                        if e["type"] == "customer.discount.created") if s]


def test_an_items_percentage_comes_off_that_item_only() -> None:
    """A 20% coupon on the £10 item of a subscription of £10 + £5: £13.00, not £12.00."""
    world, coupon = _world_with_coupon()
    sub_id, events = _item_discounted(world)
    snapshot = _two_items(world, sub_id, 500)
    row = derive_subscription(snapshot, _discount_snapshots(world, events), OFFER,
                              {"spring-20": coupon})
    assert (row.amount, _price(row)) == (1500, 1300)
    assert row.coupons == ["spring-20"] and len(row.discounts) == 1


def test_an_items_discount_then_the_subscriptions_own() -> None:
    """20% off the £10 item, + the £5 item: £13; then the subscription's founding 50% (£6.50)
    and £2.50 off: £4.00."""
    world, coupon = _world_with_coupon()
    world.create_coupon("minus-250", amount_off=250, currency="gbp")
    sub = world.subscribe(1000, "gbp", founding=True, email="reader@example.org")
    world.discount_item(sub.subscription, "spring-20")
    world.discount_subscription(sub.subscription, "minus-250")
    snapshot = _two_items(world, sub.subscription, 500)
    terms = {"spring-20": coupon, "minus-250": world.objects["minus-250"]}
    row = derive_subscription(snapshot, _discount_snapshots(world, world.events), OFFER, terms)
    assert (row.amount, _price(row), row.founding) == (1500, 400, True)
    assert len(row.discounts) == 3
    # with one item only, the simulator's invoice charges what the row counts
    one = reference([*world.events, _coupon_event(world, coupon)], OFFER)["subscriptions"][
        sub.subscription]
    invoice = world.renew(sub.subscription).invoice
    assert _price(one) == world.objects[invoice]["total"] == 150  # 800 -> 400 -> 150


async def test_stacked_discounts_count_in_the_monthly_recurring_through_the_webhook(
    client: Client, pool: asyncpg.Pool
) -> None:
    world = World(seed=3, start=START)
    sub_id, invoice = _stacked(world, 999, percent_off=15)
    await post_all(client, world.events)
    assert _price(dict(await _row(pool, sub_id))) == world.objects[invoice]["total"] == 424
    assert await _mrr(client) == {"amount": 424, "currency": "gbp"}


async def test_deleting_a_coupon_does_not_take_its_discount_off_a_subscription_in_another_currency(
    client: Client, pool: asyncpg.Pool
) -> None:
    """A £3-off coupon with a ¥100 option discounts a yen subscription: once the coupon worker
    has fetched it with its options, the subscription counts at ¥999 - ¥100. Then the promotion
    ends and staff delete the coupon in the Dashboard (the usual way to stop new redemptions).
    Stripe (stripe/_coupon.py `delete`): "deleting a coupon does not affect any customers who
    have already applied the coupon; it means that new customers can't redeem the coupon", so the
    subscription still lists its discount and every invoice still takes ¥100 off: the
    monthly recurring must stay discounted.

    The `coupon.deleted` snapshot (like every coupon event, without `currency_options`) ranks
    above any look-up (events.snapshot_version: progress 1 for `.deleted`), so the subscription
    is derived again from a coupon that says nothing of yen and counts at full price; the
    look-up queued again can never fix it: Stripe answers 404 for a deleted coupon, and even a
    coupon fetched would rank below the deletion."""
    world = World(seed=8, start=START)
    world.create_coupon("promo", amount_off=300, currency="gbp", currency_options={"jpy": 100})
    sub = world.subscribe(999, "jpy", email="reader@example.org")
    world.discount_subscription(sub.subscription, "promo")
    await post_all(client, world.events)
    async with stripe_against(world) as (_, stripe_client):
        assert await coupons.run_once(pool, stripe_client, OFFER) == 1
    row = await pool.fetchrow("SELECT * FROM subscriptions WHERE id = $1", sub.subscription)
    assert row is not None and (row["currency"], row["amount_off"]) == ("jpy", 100)

    await asyncio.sleep(1.1)  # a second after the look-up's stamp
    deleted = o.as_sent(world.objects.pop("promo"))  # gone from the account: Stripe 404s now
    await post_all(client, [o.event("coupon.deleted", deleted, created=int(time.time()),
                                    ids=world.ids)])
    async with stripe_against(world) as (_, stripe_client):
        for _ in range(3):  # the worker tries, and tries again
            await coupons.run_once(pool, stripe_client, OFFER)
            await pool.execute("UPDATE coupon_lookups SET next_attempt_at = now()")
    row = await pool.fetchrow("SELECT * FROM subscriptions WHERE id = $1", sub.subscription)
    assert row is not None
    assert row["discounts"] != []  # Stripe's subscription still has its discount
    assert row["amount_off"] == 100


def test_a_coupon_id_made_again_after_a_deletion_discounts_as_the_new_coupon() -> None:
    """Staff delete the "spring" coupon (20% off) and make a new coupon with the same id (30%
    off: coupon ids are the account's own, `stripe-setup` itself says "delete it in the
    Dashboard" to change a coupon's terms). A supporter who subscribes with the new coupon is
    charged 30% off (their invoice pays £7.00), so the ledger's subscription must say 30% off and
    count £7.00 a month in the monthly recurring. The deleted coupon's snapshot ranks above the
    new coupon's `coupon.created` for ever (events.snapshot_version: progress 1 for `.deleted`),
    so the new subscriber is counted at 20% off (£8.00)."""
    world = World(seed=9, start=START)
    world.create_coupon("spring", percent_off=20)
    world.subscribe(1000, "gbp", founding=True, coupon="spring", email="first@example.org")
    world.advance(10)
    deleted = o.as_sent(world.objects.pop("spring"))
    world.events.append(o.event("coupon.deleted", deleted, created=world.now, ids=world.ids))
    world.advance(10)
    world.create_coupon("spring", percent_off=30)
    later = world.subscribe(1000, "gbp", founding=True, coupon="spring",
                            email="second@example.org")
    ledger = reference(world.events)
    paid = ledger["payments"][str(later.payment_intent)]
    assert paid["amount"] == 700  # what Stripe charged: 30% off
    row = ledger["subscriptions"][later.subscription]
    assert (row["percent_off"], row["amount_off"]) == (30, None)


@pytest.mark.xfail(strict=True, reason=(
    "a known limitation: the ledger keeps one coupon per id, the one the id names now; a "
    "subscription that redeemed an earlier coupon of the same id (deleted, then made again "
    "with other terms) is counted at the new coupon's terms, not at those Stripe still gives it"))
def test_a_coupon_id_made_again_leaves_the_earlier_subscriber_on_the_earlier_terms() -> None:
    world = World(seed=9, start=START)
    world.create_coupon("spring", percent_off=20)
    first = world.subscribe(1000, "gbp", founding=True, coupon="spring",
                            email="first@example.org")
    world.advance(10)
    deleted = o.as_sent(world.objects.pop("spring"))
    world.events.append(o.event("coupon.deleted", deleted, created=world.now, ids=world.ids))
    world.advance(10)
    world.create_coupon("spring", percent_off=30)
    world.subscribe(1000, "gbp", founding=True, coupon="spring", email="second@example.org")
    row = reference(world.events)["subscriptions"][first.subscription]
    assert (row["percent_off"], row["amount_off"]) == (20, None)
