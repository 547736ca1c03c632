"""Generated Stripe histories for property tests: payments, subscriptions, refunds, disputes."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Literal

from hypothesis import strategies as st

from tests.fakestripe.world import World

CURRENCIES = ("gbp", "usd", "jpy")
AMOUNTS = {
    "gbp": (100, 50_000), "usd": (100, 50_000), "eur": (100, 50_000), "jpy": (100, 100_000),
}


@dataclass
class History:
    world: World
    charges: list[str]
    subscriptions: list[str]

    @property
    def events(self) -> list[dict[str, Any]]:
        return self.world.events


def _amount(draw: st.DrawFn, currency: str) -> int:
    low, high = AMOUNTS[currency]
    return draw(st.integers(min_value=low, max_value=high))


@st.composite
def histories(draw: st.DrawFn, max_steps: int = 12) -> History:
    """A World driven through a random but valid sequence of what supporters and Stripe do."""
    world = World(seed=draw(st.integers(min_value=0, max_value=2**16)))
    charges: list[str] = []
    subscriptions: list[str] = []
    for _ in range(draw(st.integers(min_value=3, max_value=max_steps))):
        action = draw(st.sampled_from(
            # refunds and disputes first: hypothesis leans towards the start of the list
            ["one_off", "refund", "subscribe", "dispute", "refund", "renew", "fail_refund",
             "one_off", "change", "cancel", "failed", "async", "pause", "fail_renewal", "payout"]))
        currency = draw(st.sampled_from(CURRENCIES))
        if action == "one_off" or (not charges and action in ("refund", "dispute")):
            via: Literal["checkout", "payment_intent"] = draw(
                st.sampled_from(["checkout", "payment_intent"]))
            campaign = draw(st.sampled_from([None, "winter", "spring"]))
            paid = world.one_off(_amount(draw, currency), currency, via=via, campaign=campaign)
            charges.append(paid.charge)
        elif action == "failed":
            world.failed_payment(_amount(draw, currency), currency)
        elif action == "async":
            currency = draw(st.sampled_from(["gbp", "eur"]))  # Bacs and SEPA debits
            paid = world.async_checkout(_amount(draw, currency), currency,
                                        succeed=draw(st.booleans()))
            if paid.charge and world.objects[paid.charge]["status"] == "succeeded":
                charges.append(paid.charge)
        elif action == "fail_refund":
            live = [r for r in world.objects.values()
                    if r.get("object") == "refund" and r["status"] in ("pending", "succeeded")]
            if live:
                world.fail_refund(draw(st.sampled_from(live))["id"])
        elif action == "payout":
            if any(world.payout_of.get(b) is None for b in world.balance_transactions):
                with contextlib.suppress(ValueError):  # nothing positive to pay out
                    world.payout()
        elif action == "subscribe" or (not subscriptions and action in (
                "renew", "change", "cancel", "pause", "fail_renewal")):
            # no discount, the founding coupon, or one made in the Dashboard (a percentage, or
            # an amount in GBP with a USD option: it takes nothing off in other currencies)
            coupon = draw(st.sampled_from([None, "founding-supporter", "spring-20", "off-300"]))
            if coupon is not None and coupon not in world.objects:
                if coupon == "spring-20":
                    world.create_coupon(coupon, percent_off=20)
                elif coupon == "off-300":
                    world.create_coupon(coupon, amount_off=300, currency="gbp",
                                        currency_options={"usd": 350})
            started = world.subscribe(
                _amount(draw, currency), currency,
                interval=draw(st.sampled_from(["month", "year"])),
                founding=coupon is not None, coupon=coupon or "founding-supporter",
                campaign=draw(st.sampled_from([None, "founders"])),
            )
            subscriptions.append(started.subscription)
            if started.charge:
                charges.append(started.charge)
        elif action == "renew":
            sub = draw(st.sampled_from(subscriptions))
            if world.objects[sub]["status"] == "active":
                run = world.renew(sub)
                if run.charge:
                    charges.append(run.charge)
        elif action == "change":
            sub = draw(st.sampled_from(subscriptions))
            if world.objects[sub]["status"] == "active":
                currency = world.objects[sub]["currency"]
                world.change_amount(sub, _amount(draw, currency))
        elif action == "cancel":
            sub = draw(st.sampled_from(subscriptions))
            if world.objects[sub]["status"] == "active":
                world.cancel(sub, at_period_end=draw(st.booleans()))
        elif action == "pause":
            sub = draw(st.sampled_from(subscriptions))
            if world.objects[sub]["status"] == "active":
                world.pause(sub)
                if draw(st.booleans()):
                    run = world.resume(sub)
                    if run.charge:
                        charges.append(run.charge)
        elif action == "fail_renewal":
            sub = draw(st.sampled_from(subscriptions))
            if world.objects[sub]["status"] == "active" and not world.objects[sub][
                    "cancel_at_period_end"]:
                world.fail_renewal(sub)
                if draw(st.booleans()):
                    run = world.retry_renewal(sub)
                    if run.charge:
                        charges.append(run.charge)
        elif action == "refund":
            charge = world.objects[draw(st.sampled_from(charges))]
            left = int(charge["amount"]) - int(charge["amount_refunded"])
            if left > 0 and not charge["disputed"]:
                part = draw(st.one_of(st.none(), st.integers(min_value=1, max_value=left)))
                refunded = world.refund(charge["id"], part)
                if draw(st.integers(min_value=0, max_value=3)) == 0:
                    world.fail_refund(refunded.refund)  # the bank sends it back
        elif action == "dispute":
            charge = world.objects[draw(st.sampled_from(charges))]
            if not charge["disputed"] and int(charge["amount_refunded"]) == 0:
                # some start as an inquiry that the bank escalates to a chargeback; some lost
                # are appealed
                outcome: Literal["won", "lost"] | None = draw(
                    st.sampled_from(["won", "lost", None]))
                disputed = world.dispute(charge["id"], outcome, inquiry=draw(st.booleans()))
                if outcome == "lost" and draw(st.booleans()):
                    world.appeal_dispute(str(disputed.dispute),
                                         draw(st.sampled_from(["won", "lost", None])))
    return History(world, charges, subscriptions)


@st.composite
def deliveries(draw: st.DrawFn, events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The same events in any order, some delivered more than once."""
    shuffled = draw(st.permutations(events))
    repeats = draw(st.lists(st.sampled_from(events), max_size=len(events))) if events else []
    return draw(st.permutations([*shuffled, *repeats]))
