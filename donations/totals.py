"""Public totals: the contract's figures, from the aggregates that sql/004's triggers keep.

The database keeps, per bucket (scope, payment currency, settlement currency), sums that the
triggers move in the same transaction as the ledger. This module holds the arithmetic as pure
functions (the same rules as the SQL, written a second time so that `verify` is an independent
check), the read of a scope's buckets, their compaction, and `verify`, which recomputes every
bucket and every supporter's count from the ledger tables and lists the differences.

Rules where the contract leaves a choice (README, "Totals"):
- A contribution counts unless it is wholly refunded or wholly lost in a dispute (the contract's
  rule); while a dispute is open its amount is held out of `raised`, but the contribution and
  its supporter still count.
- A payment in another currency counts in `raised` at its settled amount once its balance
  transaction is known, less refunds and disputes pro rata of it (rounded half up per payment);
  `by_currency` has it at once, in its own currency.
- A person is the Stripe customer, else the e-mail (case-insensitive), else the payment itself.
- `monthly_recurring` sums the subscriptions in the reporting currency (a subscription has no
  settled amount until it is paid); `by_currency` gives every currency's. Each subscription's
  yearly value is kept (exact for monthly, yearly and every divisor of a year), and the sum
  divided by 12 once, rounded half up.
- A campaign's window holds a payment made at or after `starts_at` and before `ends_at`; a
  subscription counts among a campaign's active ones when it was started in the window.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, fields
from datetime import datetime
from decimal import ROUND_HALF_UP, Decimal
from typing import Any

import asyncpg

from donations.campaigns import Campaign
from donations.money import Money, apply_percent_off

GLOBAL = "*"  # the scope of everything; campaign slugs cannot be "*"
ACTIVE = frozenset({"active", "trialing", "past_due"})
_PER_YEAR = {"day": 365, "week": 52, "month": 12, "year": 1}
# A supporter known only by an e-mail: its ASCII letters folded, as sql/035 folds them whatever
# the database's locale (Unicode case rules differ between PostgreSQL's locales and Python).
_ASCII_LOWER = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")

# --- arithmetic -----------------------------------------------------------------------------


def muldiv(a: int, b: int, c: int) -> int:
    """a * b / c rounded half up, for a, b >= 0 and c > 0, with integers only."""
    return (2 * a * b + c) // (2 * c)


def counts(amount: int, refunded: int, disputed: int, dispute_lost: bool) -> bool:
    """Whether a successful payment is a contribution in the counts: not wholly refunded, not
    wholly lost in a dispute (an open dispute does not stop it counting)."""
    left = amount - refunded
    return left > 0 and not (dispute_lost and disputed >= left)


def net_of(amount: int, refunded: int, disputed: int) -> int:
    """What is left of a payment after refunds and what disputes hold or took."""
    return max(0, amount - refunded - disputed)


def settled_share(settlement_amount: int | None, net: int, amount: int) -> int:
    """The settled amount's share that `net` of `amount` is (0 while the settlement is unknown)."""
    if settlement_amount is None or amount == 0:
        return 0
    return muldiv(settlement_amount, net, amount)


def price_after_discounts(amount: int, percent_off: Decimal | None, amount_off: int | None) -> int:
    """One interval's price after the subscription's discounts, as Stripe's invoices charge it
    (money.apply_percent_off; the triggers' totals_price in sql/016 is its twin in SQL), from
    the columns a subscription's row keeps for its discounts (money.discount_columns)."""
    price = amount if percent_off is None else apply_percent_off(amount, percent_off)
    return max(0, price - (amount_off or 0))



def annualised(price: int, interval: str, interval_count: int) -> int:
    """The yearly value of `price` charged every `interval_count` intervals, rounded half up."""
    return muldiv(price, _PER_YEAR[interval], interval_count)


def monthly(annual: int) -> int:
    return muldiv(annual, 1, 12)


def percent_of_goal(raised: int, goal: int) -> Decimal:
    """raised / goal as a percentage with two decimals, rounded half up (never a float)."""
    return (Decimal(raised * 100) / Decimal(goal)).quantize(Decimal("0.01"), ROUND_HALF_UP)


# --- the ledger's rows as the totals read them ----------------------------------------------


@dataclass(frozen=True, slots=True)
class Window:
    """A campaign's window: a moment counts when at or after `starts`, before `ends`."""

    starts: datetime | None = None
    ends: datetime | None = None

    def holds(self, moment: datetime) -> bool:
        return (self.starts is None or moment >= self.starts) and (
            self.ends is None or moment < self.ends
        )


@dataclass(frozen=True, slots=True)
class PaymentFacts:
    payment_key: str
    status: str
    currency: str
    amount: int
    amount_refunded: int
    amount_disputed: int
    settlement_currency: str | None
    settlement_amount: int | None
    customer: str | None
    email: str | None
    campaign: str | None
    created_at: datetime
    dispute_lost: bool = False

    @property
    def supporter(self) -> str:
        if self.customer:
            return self.customer
        if self.email:
            return f"email:{self.email.translate(_ASCII_LOWER)}"
        return f"payment:{self.payment_key}"


@dataclass(frozen=True, slots=True)
class SubscriptionFacts:
    status: str
    currency: str
    amount: int
    interval: str
    interval_count: int
    percent_off: Decimal | None
    amount_off: int | None
    founding: bool
    campaign: str | None
    created_at: datetime


PAYMENT_COLUMNS = ", ".join(f.name for f in fields(PaymentFacts))
SUBSCRIPTION_COLUMNS = ", ".join(f.name for f in fields(SubscriptionFacts))


def scopes(campaign: str | None, moment: datetime, windows: Mapping[str, Window]) -> list[str]:
    """Where a row counts: everywhere, and in its campaign when that exists and holds `moment`."""
    window = windows.get(campaign) if campaign else None
    if campaign and window is not None and window.holds(moment):
        return [GLOBAL, campaign]
    return [GLOBAL]


# --- buckets --------------------------------------------------------------------------------


@dataclass(slots=True)
class Bucket:
    """The sums kept for one (scope, currency, settlement currency)."""

    raised: int = 0
    settled: int = 0
    contributions: int = 0
    supporters: int = 0
    active_subscriptions: int = 0
    recurring_annual: int = 0
    founding: int = 0

    def add(self, other: Bucket) -> None:
        for name in FIGURES:
            setattr(self, name, getattr(self, name) + getattr(other, name))

    def is_zero(self) -> bool:
        return not any(getattr(self, name) for name in FIGURES)


FIGURES = tuple(f.name for f in fields(Bucket))
BucketKey = tuple[str, str, str]  # scope, currency ('' for counts of people and seats), settled in


@dataclass(slots=True)
class Tally:
    """The buckets and supporters' counts that a ledger implies, fed one row at a time."""

    windows: Mapping[str, Window]
    buckets: dict[BucketKey, Bucket] = field(default_factory=dict)
    supporters: dict[tuple[str, str], int] = field(default_factory=dict)

    def _bucket(self, key: BucketKey) -> Bucket:
        return self.buckets.setdefault(key, Bucket())

    def add_payment(self, p: PaymentFacts) -> None:
        if p.status != "succeeded":
            return
        net = net_of(p.amount, p.amount_refunded, p.amount_disputed)
        counted = counts(p.amount, p.amount_refunded, p.amount_disputed, p.dispute_lost)
        figures = Bucket(
            raised=net,
            settled=settled_share(p.settlement_amount, net, p.amount),
            contributions=1 if counted else 0,
        )
        for scope in scopes(p.campaign, p.created_at, self.windows):
            self._bucket((scope, p.currency, p.settlement_currency or "")).add(figures)
            if counted:
                person = (scope, p.supporter)
                self.supporters[person] = self.supporters.get(person, 0) + 1

    def add_subscription(self, s: SubscriptionFacts) -> None:
        if s.founding:
            self._bucket((GLOBAL, "", "")).founding += 1
        if s.status not in ACTIVE:
            return
        price = price_after_discounts(s.amount, s.percent_off, s.amount_off)
        figures = Bucket(
            active_subscriptions=1,
            recurring_annual=annualised(price, s.interval, s.interval_count),
        )
        for scope in scopes(s.campaign, s.created_at, self.windows):
            self._bucket((scope, s.currency, "")).add(figures)

    def finish(self) -> dict[BucketKey, Bucket]:
        """The buckets, with each scope's distinct supporters counted; zero buckets left out."""
        people: dict[str, int] = {}
        for scope, _ in self.supporters:
            people[scope] = people.get(scope, 0) + 1
        for scope, count in people.items():
            self._bucket((scope, "", "")).supporters += count
        return {k: b for k, b in self.buckets.items() if not b.is_zero()}


# --- the figures the contract publishes -----------------------------------------------------


@dataclass(frozen=True, slots=True)
class CurrencyTotals:
    currency: str
    raised: int
    contributions: int
    active_subscriptions: int
    monthly_recurring: int

    def as_json(self) -> dict[str, Any]:
        return {
            "currency": self.currency,
            "raised": Money(self.raised, self.currency).as_json(),
            "contributions": self.contributions,
            "active_subscriptions": self.active_subscriptions,
            "monthly_recurring": Money(self.monthly_recurring, self.currency).as_json(),
        }


@dataclass(frozen=True, slots=True)
class Totals:
    campaign: str | None
    title: str | None
    currency: str
    raised: Money
    goal: Money | None
    percent_of_goal: Decimal | None
    supporters: int
    contributions: int
    active_subscriptions: int
    monthly_recurring: Money
    founding_seats_left: int
    by_currency: tuple[CurrencyTotals, ...]

    def figures_json(self) -> dict[str, Any]:
        """Everything but the time: what the ETag is computed from."""
        return {
            "campaign": self.campaign,
            "title": self.title,
            "currency": self.currency,
            "raised": self.raised.as_json(),
            "goal": self.goal.as_json() if self.goal else None,
            # a JSON number with two decimals, as the contract shows it: the exact decimal,
            # converted only to be written (its shortest float repr is the same two decimals)
            "percent_of_goal": None if self.percent_of_goal is None
            else float(self.percent_of_goal),
            "supporters": self.supporters,
            "contributions": self.contributions,
            "active_subscriptions": self.active_subscriptions,
            "monthly_recurring": self.monthly_recurring.as_json(),
            "founding_seats_left": self.founding_seats_left,
            "by_currency": [c.as_json() for c in self.by_currency],
        }


def summarise(
    buckets: Mapping[tuple[str, str], Bucket],
    *,
    founding_taken: int,
    offer_used_up: bool = False,
    reporting_currency: str,
    founding_seats: int,
    campaign: Campaign | None = None,
) -> Totals:
    """A scope's figures from its buckets, keyed (currency, settlement currency)."""
    raised = contributions = supporters = active = 0
    per_currency: dict[str, Bucket] = {}
    for (currency, settlement), bucket in buckets.items():
        supporters += bucket.supporters
        contributions += bucket.contributions
        active += bucket.active_subscriptions  # every currency's, as contributions are
        if currency == reporting_currency:
            raised += bucket.raised
        elif settlement == reporting_currency:
            raised += bucket.settled
        if currency:
            per_currency.setdefault(currency, Bucket()).add(bucket)
    by_currency = tuple(
        CurrencyTotals(c, b.raised, b.contributions, b.active_subscriptions,
                       monthly(b.recurring_annual))
        for c, b in sorted(per_currency.items())
        if not (b.raised == b.contributions == b.active_subscriptions == 0)
    )
    home = per_currency.get(reporting_currency, Bucket())
    goal = campaign.goal if campaign else None
    return Totals(
        campaign=campaign.slug if campaign else None,
        title=campaign.title if campaign else None,
        currency=reporting_currency,
        raised=Money(raised, reporting_currency),
        goal=goal,
        percent_of_goal=percent_of_goal(raised, goal.amount) if goal else None,
        supporters=supporters,
        contributions=contributions,
        active_subscriptions=active,
        monthly_recurring=Money(monthly(home.recurring_annual), reporting_currency),
        founding_seats_left=0 if offer_used_up else max(0, founding_seats - founding_taken),
        by_currency=by_currency,
    )


# --- the database ---------------------------------------------------------------------------

_SUMS = ", ".join(f"sum({name})::bigint AS {name}" for name in FIGURES)
_COLUMNS = ", ".join(FIGURES)



def _read_sql(where: str) -> str:
    """The kept totals and the deltas not yet compacted, summed in one statement (one snapshot)."""
    return f"""
        SELECT scope, currency, settlement_currency, {_SUMS}
          FROM (SELECT scope, currency, settlement_currency, {_COLUMNS} FROM totals WHERE {where}
                UNION ALL
                SELECT scope, currency, settlement_currency, {_COLUMNS} FROM totals_deltas
                 WHERE {where}) AS kept
         GROUP BY scope, currency, settlement_currency
    """  # noqa: S608 - constant column names and conditions


_READ = _read_sql("scope = any($1::text[])")
_READ_ALL = _read_sql("true")


def _bucket(row: asyncpg.Record) -> Bucket:
    return Bucket(**{name: int(row[name]) for name in FIGURES})


async def read_scope(
    conn: asyncpg.Connection, scope: str
) -> tuple[dict[tuple[str, str], Bucket], int]:
    """A scope's buckets and the founding seats taken, as of one snapshot (one statement)."""
    rows = await conn.fetch(_READ, [scope, GLOBAL])
    buckets: dict[tuple[str, str], Bucket] = {}
    founding = 0
    for row in rows:
        bucket = _bucket(row)
        if row["scope"] == GLOBAL:
            founding += bucket.founding
        if row["scope"] == scope:
            buckets[(row["currency"], row["settlement_currency"])] = bucket
    return buckets, founding


async def offer_used_up(conn: asyncpg.Connection, coupon_id: str) -> bool:
    """Whether Stripe has said the founding coupon is used up (see seats.FoundingSeats)."""
    return bool(await conn.fetchval(
        "SELECT EXISTS (SELECT 1 FROM founding_coupons_used_up WHERE coupon_id = $1)", coupon_id))


_COMPACT = f"""
    WITH moved AS (
        DELETE FROM totals_deltas
         WHERE id IN (SELECT id FROM totals_deltas ORDER BY id LIMIT $1)
        RETURNING *
    ), kept AS (
        INSERT INTO totals AS t (scope, currency, settlement_currency, {_COLUMNS})
        SELECT scope, currency, settlement_currency, {_SUMS} FROM moved
         GROUP BY scope, currency, settlement_currency
        ON CONFLICT (scope, currency, settlement_currency) DO UPDATE
           SET {", ".join(f"{n} = t.{n} + excluded.{n}" for n in FIGURES)}
        RETURNING 1
    )
    SELECT count(*) FROM moved
"""  # noqa: S608 - constant column names


async def compact(conn: asyncpg.Connection, batch: int = 50_000) -> int:
    """Fold up to `batch` deltas into the totals; 0 when another replica is compacting.

    Deltas are only ever inserted by the ledger's transactions, so deleting committed ones here
    conflicts with none of them; the advisory lock keeps compactions (and rebuilds) one at a time.
    """
    async with conn.transaction():
        if not await conn.fetchval("SELECT pg_try_advisory_xact_lock(totals_compaction_key())"):
            return 0
        moved: int = await conn.fetchval(_COMPACT, batch)
    return moved


# --- verify ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Difference:
    what: str  # "bucket scope/currency/settlement figure" or "supporter scope person"
    stored: int
    expected: int

    def __str__(self) -> str:
        return f"{self.what}: stored {self.stored}, expected {self.expected}"


@dataclass(frozen=True, slots=True)
class Verification:
    scopes: int
    buckets: int
    supporters: int
    payments: int
    subscriptions: int
    differences: tuple[Difference, ...]


def compare(
    stored: Mapping[BucketKey, Bucket], expected: Mapping[BucketKey, Bucket],
    stored_people: Mapping[tuple[str, str], int], expected_people: Mapping[tuple[str, str], int],
) -> list[Difference]:
    found: list[Difference] = []
    for key in sorted(set(stored) | set(expected)):
        have, want = stored.get(key, Bucket()), expected.get(key, Bucket())
        for name in FIGURES:
            if getattr(have, name) != getattr(want, name):
                found.append(Difference(f"bucket {'/'.join(key) or '-'} {name}",
                                        getattr(have, name), getattr(want, name)))
    for person in sorted(set(stored_people) | set(expected_people)):
        have_n, want_n = stored_people.get(person, 0), expected_people.get(person, 0)
        if have_n != want_n:
            found.append(Difference(f"supporter {person[0]} {person[1]}", have_n, want_n))
    return found


async def verify(conn: asyncpg.Connection) -> Verification:
    """Recompute every bucket and supporter count from the ledger; the same snapshot throughout."""
    async with conn.transaction(isolation="repeatable_read", readonly=True):
        windows = {
            r["slug"]: Window(r["starts_at"], r["ends_at"])
            for r in await conn.fetch("SELECT slug, starts_at, ends_at FROM campaigns")
        }
        tally = Tally(windows)
        payments = subscriptions = 0
        query = f"SELECT {PAYMENT_COLUMNS} FROM payments WHERE status = 'succeeded'"  # noqa: S608
        async for row in conn.cursor(query, prefetch=10_000):
            tally.add_payment(PaymentFacts(**dict(row)))
            payments += 1
        query = f"SELECT {SUBSCRIPTION_COLUMNS} FROM subscriptions"  # noqa: S608
        async for row in conn.cursor(query, prefetch=10_000):
            tally.add_subscription(SubscriptionFacts(**dict(row)))
            subscriptions += 1
        stored: dict[BucketKey, Bucket] = {}
        for row in await conn.fetch(_READ_ALL):
            bucket = _bucket(row)
            if not bucket.is_zero():
                stored[(row["scope"], row["currency"], row["settlement_currency"])] = bucket
        people = {
            (r["scope"], r["supporter"]): int(r["contributions"])
            for r in await conn.fetch(
                "SELECT scope, supporter, contributions FROM totals_supporters")
        }
    expected = tally.finish()
    differences = compare(stored, expected, people, tally.supporters)
    return Verification(
        scopes=len({k[0] for k in expected} | {k[0] for k in stored}),
        buckets=len(expected), supporters=len(tally.supporters), payments=payments,
        subscriptions=subscriptions, differences=tuple(differences),
    )


def describe(result: Verification, limit: int = 50) -> Iterable[str]:
    """What `donations totals verify` prints."""
    yield (f"checked {result.buckets} buckets in {result.scopes} scopes and "
           f"{result.supporters} supporters' counts against {result.payments} contributions "
           f"and {result.subscriptions} subscriptions")
    for difference in result.differences[:limit]:
        yield f"difference: {difference}"
    if len(result.differences) > limit:
        yield f"… and {len(result.differences) - limit} more"
    yield f"{len(result.differences)} difference(s)" if result.differences else "no differences"
