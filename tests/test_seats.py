"""Founding seats: held per checkout, consumed on completion, released on expiry, never oversold."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import pytest
from pytest_aiohttp import AiohttpClient

from donations import db, seats
from donations.appkeys import TOTALS
from donations.seats import FoundingSeats
from tests.checkout_helpers import (
    checkout_service,
    created_sessions,
    stripe_keys,
    subscription,
)
from tests.conftest import Client
from tests.fakestripe.world import World
from tests.test_subscription_lifecycle import _founding_checkout_never_paid
from tests.webhook_helpers import post_all

SUBSCRIPTIONS = "/v1/checkout/subscriptions"


async def _start(
    client: Client, headers: dict[str, str] | None = None, **changes: Any
) -> dict[str, Any]:
    response = await client.post(SUBSCRIPTIONS, json=subscription(**changes), headers=headers)
    body: dict[str, Any] = await response.json()
    assert response.status == 201, body
    return body


async def _seats_left(client: Client) -> int:
    options = await (await client.get("/v1/checkout/options")).json()
    left: int = options["founding_offer"]["seats_left"]
    return left


async def test_concurrent_checkouts_never_oversell_the_last_seats(
    pool: asyncpg.Pool, dsn: str, aiohttp_client: AiohttpClient
) -> None:
    world = World(seed=51)
    # two seats already taken by founding subscriptions that came in before (no hold of ours)
    earlier = [world.subscribe(1000, "gbp", founding=True) for _ in range(2)]
    async with checkout_service(aiohttp_client, dsn, world, founding_seats=5,
                                proxy_hops=1) as (client, fake):
        await post_all(client, [e for run in earlier for e in run])
        assert await _seats_left(client) == 3
        # readers from 40 networks at once (one network holds at most seats.HOLDS_PER_CLIENT)
        answers = await asyncio.gather(*(
            _start(client, headers={"X-Forwarded-For": f"198.51.100.{n}"}) for n in range(40)))
        sent = created_sessions(fake)
        assert await _seats_left(client) == 0

    founding = [a for a in answers if a["founding_discount"]]
    assert len(founding) == 3
    discounted = [r for r in sent if "discounts" in r.form]
    assert len(discounted) == 3
    for request in discounted:
        assert request.form["discounts"] == [{"coupon": "founding-supporter"}]
        assert request.form["subscription_data"]["metadata"] == {"founding_supporter": "true"}
        assert request.form["metadata"] == {"founding_supporter": "true"}
    holds = await pool.fetch("SELECT checkout_session FROM founding_holds")
    assert sorted(h["checkout_session"] for h in holds) == sorted(a["id"] for a in founding)


async def test_when_stripe_counts_the_coupon_used_up_the_checkout_goes_ahead_at_full_price(
    pool: asyncpg.Pool, dsn: str, aiohttp_client: AiohttpClient
) -> None:
    world = World(seed=55)
    async with checkout_service(aiohttp_client, dsn, world, founding_seats=3) as (client, fake):
        # Stripe has seen three redemptions we have not (webhooks not in yet, the Dashboard)
        world.objects["founding-supporter"]["times_redeemed"] = 3
        headers = {"Idempotency-Key": "late-seat"}
        response = await client.post(SUBSCRIPTIONS, json=subscription(), headers=headers)
        body = await response.json()
        replay = await client.post(SUBSCRIPTIONS, json=subscription(), headers=headers)
        sent = created_sessions(fake)
        metrics = await (await client.get("/metrics")).text()

    assert response.status == 201, body
    assert body["founding_discount"] is False
    assert (await replay.json()) == body and replay.headers["Idempotent-Replayed"] == "true"
    # asked with the coupon, refused; asked again without it, under a key of its own
    assert ["discounts" in r.form for r in sent] == [True, False]
    assert stripe_keys(sent) == [
        "checkout:late-seat", "checkout:late-seat:full-price"]
    assert "founding_supporter" not in str(sent[1].form)
    assert await pool.fetchval("SELECT count(*) FROM founding_holds") == 0  # seat given back
    assert ('donations_stripe_errors_total{code="founding_coupon_used_up",'
            'operation="checkout_session_create"} 1') in metrics


async def test_a_coupon_stripe_says_is_used_up_closes_the_offer_everywhere(
    pool: asyncpg.Pool, dsn: str, aiohttp_client: AiohttpClient
) -> None:
    """Once Stripe refuses the founding coupon as used up (its max_redemptions reached, counting
    redemptions the ledger never saw), the offer is over whatever our own count says: later
    checkouts no longer ask for the coupon, and neither the form's options (`open` false,
    `seats_left` 0) nor the public totals (`founding_seats_left` 0) go on promising it, on
    this replica or any other (a new one reads it from the database)."""
    world = World(seed=901)
    async with checkout_service(aiohttp_client, dsn, world, founding_seats=3) as (client, fake):
        world.objects["founding-supporter"]["times_redeemed"] = 3
        first = await _start(client)
        second = await _start(client)
        offer = (await (await client.get("/v1/checkout/options")).json())["founding_offer"]
        client.app[TOTALS].clear()
        totals = await (await client.get("/v1/totals")).json()
        sent = created_sessions(fake)
    async with checkout_service(aiohttp_client, dsn, world, founding_seats=3) as (other, _):
        other_left = await _seats_left(other)

    assert (first["founding_discount"], second["founding_discount"]) == (False, False)
    # the first asked with the coupon and was refused; the second knew
    assert ["discounts" in r.form for r in sent] == [True, False, False]
    assert (offer["open"], offer["seats_left"]) == (False, 0)
    assert totals["founding_seats_left"] == 0
    assert other_left == 0


async def test_an_expired_session_gives_its_seat_back(
    pool: asyncpg.Pool, dsn: str, aiohttp_client: AiohttpClient
) -> None:
    world = World(seed=52)
    async with checkout_service(aiohttp_client, dsn, world, founding_seats=1) as (client, _):
        first = await _start(client)
        full_price = await _start(client)
        assert (first["founding_discount"], full_price["founding_discount"]) == (True, False)
        await post_all(client, list(world.expire_checkout(first["id"])))
        assert await _seats_left(client) == 1
        again = await _start(client)
    assert again["founding_discount"] is True


async def test_a_completed_session_takes_its_seat_for_good(
    pool: asyncpg.Pool, dsn: str, aiohttp_client: AiohttpClient
) -> None:
    world = World(seed=53)
    async with checkout_service(aiohttp_client, dsn, world, founding_seats=2) as (client, _):
        taken = await _start(client)
        assert taken["founding_discount"] is True
        events = list(world.complete_checkout(taken["id"]))
        # the session's completion may arrive before the subscription's own events
        completed = [e for e in events if e["type"] == "checkout.session.completed"]
        await post_all(client, completed)
        # even long after its hold would have lapsed
        await pool.execute("UPDATE founding_holds SET created_at = now() - interval '2 days',"
                           " expires_at = now() - interval '1 day'")
        assert await _seats_left(client) == 1
        await post_all(client, [e for e in events if e not in completed])
        assert await _seats_left(client) == 1
        subscription_id = world.objects[taken["id"]]["subscription"]
        world.cancel(subscription_id, at_period_end=False)
        await post_all(client, world.events[-1:])
        assert await _seats_left(client) == 1  # a seat is not given back when it ends
        last = await _start(client)
        after = await _start(client)
    assert (last["founding_discount"], after["founding_discount"]) == (True, False)


async def test_a_hold_that_lapsed_without_news_frees_its_seat(
    pool: asyncpg.Pool, dsn: str, aiohttp_client: AiohttpClient
) -> None:
    async with checkout_service(aiohttp_client, dsn, founding_seats=1) as (client, _):
        assert (await _start(client))["founding_discount"] is True
        assert (await _start(client))["founding_discount"] is False
        # the session's expiry and the grace for a late webhook have passed, no event came
        await pool.execute("UPDATE founding_holds SET expires_at = now() - interval '1 second',"
                           " created_at = now() - interval '2 hours'")
        assert (await _start(client))["founding_discount"] is True


async def test_with_every_seat_taken_no_checkout_waits_on_the_lock(
    pool: asyncpg.Pool, dsn: str, aiohttp_client: AiohttpClient
) -> None:
    world = World(seed=54)
    run = world.subscribe(1000, "gbp", founding=True)
    async with checkout_service(aiohttp_client, dsn, world, founding_seats=1) as (client, _):
        await post_all(client, list(run))
        assert (await _start(client))["founding_discount"] is False
        # held in another transaction: a checkout that needed the lock would wait here
        async with pool.acquire() as conn, conn.transaction():
            await conn.execute(
                "SELECT pg_advisory_xact_lock(hashtextextended('donations:founding_seats', 0))")
            answer = await asyncio.wait_for(_start(client), timeout=5)
    assert answer["founding_discount"] is False


async def test_holds_taken_in_overlapping_transactions_never_exceed_the_seats(
    pool: asyncpg.Pool,
) -> None:
    book = FoundingSeats(3)
    until = datetime.now(UTC) + timedelta(hours=1)

    async def checkout() -> int | None:
        async with db.connection(pool) as conn, conn.transaction():
            hold = await book.hold(conn, until)
            # the Stripe call is outside the transaction, but keep this one open a while so
            # that, without the lock, every transaction would count before any commits
            await asyncio.sleep(0.05)
            return hold

    holds = await asyncio.gather(*(checkout() for _ in range(9)))
    assert sum(h is not None for h in holds) == 3
    assert await pool.fetchval("SELECT count(*) FROM founding_holds") == 3


async def test_a_replica_that_did_not_see_the_refusal_does_not_ask_for_a_used_up_coupon(
    pool: asyncpg.Pool, dsn: str, aiohttp_client: AiohttpClient
) -> None:
    """Stripe's refusal of the founding coupon as used up is read by every replica when it holds
    a seat: one that never heard the refusal itself (a fresh process) does not ask Stripe for the
    coupon again."""
    world = World(seed=9101)
    async with checkout_service(aiohttp_client, dsn, world, founding_seats=3) as (client, _):
        world.objects["founding-supporter"]["times_redeemed"] = 3
        first = await client.post(SUBSCRIPTIONS, json=subscription())
        assert first.status == 201, await first.text()
    assert await pool.fetchval("SELECT count(*) FROM founding_coupons_used_up") == 1
    # another replica (a fresh process): its first request is a subscription checkout
    async with checkout_service(aiohttp_client, dsn, world, founding_seats=3) as (other, fake):
        world.objects["founding-supporter"]["times_redeemed"] = 3  # (stocked afresh)
        response = await other.post(SUBSCRIPTIONS, json=subscription())
        body = await response.json()
        sent = created_sessions(fake)
    assert response.status == 201, body
    assert body["founding_discount"] is False
    assert ["discounts" in r.form for r in sent] == [False]


def _founding_subscription_never_paid(world: World) -> tuple[list[dict[str, Any]],
                                                               dict[str, Any]]:
    """The events of a founding subscription before its first payment, and the one, 23 hours
    on, that says it never started (`incomplete_expired`)."""
    _, events = _founding_checkout_never_paid(world)
    return events[:-1], events[-1]


async def test_a_seat_given_back_by_a_subscription_that_never_started_is_offered_again(
    pool: asyncpg.Pool, dsn: str, aiohttp_client: AiohttpClient
) -> None:
    """sql/029 gives a founding seat back when its subscription ends `incomplete_expired` (it
    never started), so "taken" can go down. FoundingSeats used to latch "sold out" the first
    time taken reached the seats and answer from memory for the life of the process: the seat
    given back was never offered again by that replica (full price, `open: false`,
    `seats_left: 0`) while the database, and a freshly started replica, said it was free. The
    options count on every call, and what they count serves the checkouts too."""
    world = World(seed=7301)
    before_payment, never_started = _founding_subscription_never_paid(world)
    async with checkout_service(aiohttp_client, dsn, world, founding_seats=1) as (client, _):
        await post_all(client, before_payment)  # incomplete, founding: the one seat is taken
        assert (await _start(client))["founding_discount"] is False  # full price meanwhile
        await post_all(client, [never_started])
        assert await pool.fetchval("SELECT taken + held FROM founding_seat_counts") == 0
        offer = (await (await client.get("/v1/checkout/options")).json())["founding_offer"]
        again = await _start(client)

    assert (offer["open"], offer["seats_left"]) == (True, 1)
    assert again["founding_discount"] is True


async def test_a_seat_given_back_reaches_checkout_once_the_sold_out_shortcut_lapses(
    pool: asyncpg.Pool, dsn: str, aiohttp_client: AiohttpClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With every seat taken a replica believes it, without queuing on the lock, for
    seats.FULL_FOR (30 s) only: a seat given back (its subscription never started) is held
    again by the next checkout after that, even when no one asked for the options meanwhile."""
    world = World(seed=7304)
    before_payment, never_started = _founding_subscription_never_paid(world)
    clock = [1000.0]
    monkeypatch.setattr(seats, "monotonic", lambda: clock[0])
    async with checkout_service(aiohttp_client, dsn, world, founding_seats=1) as (client, _):
        await post_all(client, before_payment)
        assert (await _start(client))["founding_discount"] is False  # counted: all taken
        await post_all(client, [never_started])
        clock[0] += seats.FULL_FOR - 1
        # still believed: no wait on the lock (held elsewhere), full price
        async with pool.acquire() as conn, conn.transaction():
            await conn.execute(
                "SELECT pg_advisory_xact_lock(hashtextextended('donations:founding_seats', 0))")
            meanwhile = await asyncio.wait_for(_start(client), timeout=5)
        clock[0] += 2
        later = await _start(client)

    assert meanwhile["founding_discount"] is False
    assert later["founding_discount"] is True


async def test_a_replica_not_yet_updated_holds_by_the_sql_022_form_with_its_client_cap(
    pool: asyncpg.Pool,
) -> None:
    """During a deploy, replicas of the release before call founding_seat_hold with five
    arguments (sql/022): it still holds a seat, keeps each client to its cap and counts for no
    site; the seats it holds count against everyone's."""
    until = datetime.now(UTC) + timedelta(minutes=30)

    async def old_hold(client: str) -> int | None:
        hold: int | None = await pool.fetchval(
            "SELECT hold_id FROM founding_seat_hold($1, $2, $3, $4, $5)",
            3, until, client, 2, "founding-supporter")
        return hold

    assert await old_hold("ip:2001:db8:1:1::/64") is not None
    assert await old_hold("ip:2001:db8:1:1::/64") is not None
    assert await old_hold("ip:2001:db8:1:1::/64") is None  # its client's two
    assert await pool.fetchval("SELECT count(*) FROM founding_holds WHERE site IS NULL") == 2
    async with db.connection(pool) as conn:
        assert await FoundingSeats(3).hold(conn, until, "ip:198.51.100.1") is not None
    assert await old_hold("ip:198.51.100.2") is None  # three seats, all held
