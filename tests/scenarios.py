"""Generated Stripe histories for property tests: payments, subscriptions, refunds, disputes."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from hypothesis import strategies as st

from tests.fakestripe.world import World

CURRENCIES = ("gbp", "usd", "jpy")
AMOUNTS = {"gbp": (100, 50_000), "usd": (100, 50_000), "jpy": (100, 100_000)}


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
def histories(draw: st.DrawFn, max_steps: int = 8) -> History:
    """A World driven through a random but valid sequence of what supporters and Stripe do."""
    world = World(seed=draw(st.integers(min_value=0, max_value=2**16)))
    charges: list[str] = []
    subscriptions: list[str] = []
    for _ in range(draw(st.integers(min_value=1, max_value=max_steps))):
        action = draw(st.sampled_from(
            ["one_off", "one_off", "subscribe", "renew", "change", "cancel",
             "refund", "refund", "dispute", "failed"]))
        currency = draw(st.sampled_from(CURRENCIES))
        if action == "one_off" or (not charges and action in ("refund", "dispute")):
            via: Literal["checkout", "payment_intent"] = draw(
                st.sampled_from(["checkout", "payment_intent"]))
            campaign = draw(st.sampled_from([None, "winter", "spring"]))
            paid = world.one_off(_amount(draw, currency), currency, via=via, campaign=campaign)
            charges.append(paid.charge)
        elif action == "failed":
            world.failed_payment(_amount(draw, currency), currency)
        elif action == "subscribe" or (not subscriptions and action in ("renew", "change",
                                                                        "cancel")):
            started = world.subscribe(
                _amount(draw, currency), currency,
                interval=draw(st.sampled_from(["month", "year"])),
                founding=draw(st.booleans()),
                campaign=draw(st.sampled_from([None, "founders"])),
            )
            subscriptions.append(started.subscription)
            if started.charge:
                charges.append(started.charge)
        elif action == "renew":
            sub = draw(st.sampled_from(subscriptions))
            if world.objects[sub]["status"] in ("active", "past_due"):
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
        elif action == "refund":
            charge = world.objects[draw(st.sampled_from(charges))]
            left = int(charge["amount"]) - int(charge["amount_refunded"])
            if left > 0 and not charge["disputed"]:
                part = draw(st.one_of(st.none(), st.integers(min_value=1, max_value=left)))
                world.refund(charge["id"], part)
        elif action == "dispute":
            charge = world.objects[draw(st.sampled_from(charges))]
            if not charge["disputed"] and int(charge["amount_refunded"]) == 0:
                world.dispute(charge["id"], draw(st.sampled_from(["won", "lost", None])))
    return History(world, charges, subscriptions)


@st.composite
def deliveries(draw: st.DrawFn, events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The same events in any order, some delivered more than once."""
    shuffled = draw(st.permutations(events))
    repeats = draw(st.lists(st.sampled_from(events), max_size=len(events))) if events else []
    return draw(st.permutations([*shuffled, *repeats]))
