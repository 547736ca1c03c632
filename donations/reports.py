"""Finance reports: contribution movements streamed as CSV or JSON, and the summary of a window."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time, timedelta
from fractions import Fraction
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import asyncpg
import structlog
from aiohttp import web

from donations import auth, db
from donations.appkeys import POOL, SETTINGS
from donations.errors import BadRequest, Unprocessable, client_hung_up
from donations.inputs import utc_seconds
from donations.logging import REQUEST_ID
from donations.money import THREE_DECIMAL, ZERO_DECIMAL, apply_percent_off, exponent, to_major

log = structlog.get_logger(__name__)

routes = web.RouteTableDef()

Write = Callable[[bytes], Awaitable[None]]

# The contract's columns first, then the ids that let finance find each movement at Stripe.
COLUMNS = (
    "created_at", "type", "kind", "status", "currency", "amount", "fee", "net",
    "settlement_currency", "settlement_amount", "campaign", "email", "name", "payment_intent",
    "charge", "invoice", "subscription", "customer", "payout", "refund", "dispute",
    "balance_transaction", "metadata",
)
# (column, the column holding its currency): written in major units, never neutralised
MONEY_COLUMNS = {
    "amount": "currency", "fee": "settlement_currency", "net": "settlement_currency",
    "settlement_amount": "settlement_currency",
}
# What a spreadsheet takes for the start of a formula (OWASP's list). Such a text cell gets a
# leading apostrophe: shown as text, never run. These cells come from the public (names,
# e-mails, campaign and form metadata).
FORMULA_START = ("=", "+", "-", "@", "\t", "\r")
# The text cells whose values come from the public. The others are ours (type, kind, status,
# currency codes), Stripe's ids (fixed letter prefixes) or JSON (starts with a brace), which can
# never start with those characters: checking them would only slow every row.
PUBLIC_TEXT = frozenset({"campaign", "email", "name"})
BATCH = 5000  # rows per cursor fetch and per write: bounded memory, few round trips

# Movements, one row each: a succeeded payment; a bank debit (Bacs, SEPA) that Stripe booked
# in the balance when it was submitted and reversed when the bank refused it, as a refund that
# failed is: its booking (positive, status failed, with the fee Stripe keeps) at its balance
# transaction's time, and the reversal (negative, status payment_failure) at the time it
# happened; a refund (negative) that is live or that took
# money before it failed or was cancelled, at its own time, and for those the money coming back
# (positive, status refund_failure) at the time it did, so that a closed month never changes and
# each payout ties; and each balance transaction a dispute embeds (Stripe's record of the funds
# withdrawn, and reinstated when the dispute is won). A dispute seen without its balance
# transactions (an older API version) shows one withdrawal while it holds funds, at the
# dispute's time, with the settlement unknown.
MOVEMENTS = """
SELECT coalesce(p.settled_at, p.created_at) AS created_at, 'payment' AS type, p.kind, p.status,
       p.currency, p.amount, p.fee, p.net,
       p.settlement_currency, p.settlement_amount, p.campaign, p.email, c.name,
       p.payment_intent, p.charge, p.invoice, p.subscription, p.customer, bt.payout,
       NULL::text AS refund, NULL::text AS dispute, p.balance_transaction, p.metadata,
       p.payment_key AS sort_key
  FROM payments p
  LEFT JOIN balance_transactions bt ON bt.id = p.balance_transaction
  LEFT JOIN customers c ON c.id = p.customer
 -- a payment counts when it entered the Stripe balance, as Stripe's own reports count it (a
 -- bank debit days after its charge was made); until that is known, when it was made
 WHERE p.status = 'succeeded' AND coalesce(p.settled_at, p.created_at) >= $1
   AND coalesce(p.settled_at, p.created_at) < $2
UNION ALL
SELECT coalesce(bt.created_at, p.created_at), 'payment', p.kind, 'failed', p.currency, p.amount,
       bt.fee, bt.net, bt.currency, bt.amount, p.campaign, p.email, c.name, p.payment_intent,
       f.charge, p.invoice, p.subscription, p.customer, bt.payout, NULL,
       NULL, f.booked_balance_transaction, p.metadata, p.payment_key || ':booked:' || f.charge
  FROM failed_debits f
  JOIN payments p ON p.payment_key = f.payment_key
  LEFT JOIN balance_transactions bt ON bt.id = f.booked_balance_transaction
  LEFT JOIN customers c ON c.id = p.customer
 -- (until the booking is fetched, dated as the payment: its time within seconds)
 WHERE coalesce(bt.created_at, p.created_at) >= $1 AND coalesce(bt.created_at, p.created_at) < $2
UNION ALL
SELECT back.at, 'payment', p.kind, 'payment_failure', p.currency, -p.amount,
       bt.fee, bt.net, bt.currency, bt.amount, p.campaign, p.email, c.name, p.payment_intent,
       f.charge, p.invoice, p.subscription, p.customer,
       bt.payout, NULL, NULL, f.failure_balance_transaction, p.metadata,
       p.payment_key || ':failure:' || f.charge
  FROM failed_debits f
  JOIN payments p ON p.payment_key = f.payment_key
  LEFT JOIN balance_transactions bt ON bt.id = f.failure_balance_transaction
  LEFT JOIN balance_transactions booking ON booking.id = f.booked_balance_transaction
  LEFT JOIN stripe_objects o ON o.id = f.charge
  LEFT JOIN customers c ON c.id = p.customer
  -- when the money went out again: the reversal's time, else that of the event that said the
  -- charge failed (an imported object's synthetic event says nothing of it), else the booking's
 CROSS JOIN LATERAL (
      SELECT coalesce(bt.created_at,
                      CASE WHEN left(o.event_id, 11) <> 'evt_import_'
                           THEN to_timestamp(o.event_created) END,
                      booking.created_at, p.created_at) AS at) back
 WHERE back.at >= $1 AND back.at < $2
UNION ALL
SELECT r.created_at, 'refund', p.kind, r.status, r.currency, -r.amount, bt.fee, bt.net,
       bt.currency, bt.amount, p.campaign, p.email, c.name,
       coalesce(r.payment_intent, p.payment_intent), coalesce(r.charge, p.charge), p.invoice,
       p.subscription, p.customer, bt.payout, r.id, NULL, r.balance_transaction, p.metadata, r.id
  FROM refunds r
  LEFT JOIN payments p ON p.payment_key = r.payment_key
  LEFT JOIN balance_transactions bt ON bt.id = r.balance_transaction
  LEFT JOIN customers c ON c.id = p.customer
 -- (a "refund" of a payment never taken, as Stripe made one for an authorisation released
 -- before 2025-03-31, moved no money: not listed)
 WHERE (r.balance_transaction IS NOT NULL
        OR (r.status IN ('pending', 'requires_action', 'succeeded')
            AND (p.status IS NULL OR p.status = 'succeeded')))
   AND r.created_at >= $1 AND r.created_at < $2
UNION ALL
SELECT back.at, 'refund', p.kind, 'refund_failure', r.currency,
       r.amount, bt.fee, bt.net, bt.currency, bt.amount, p.campaign, p.email, c.name,
       coalesce(r.payment_intent, p.payment_intent), coalesce(r.charge, p.charge), p.invoice,
       p.subscription, p.customer, bt.payout, r.id, NULL, r.failure_balance_transaction,
       p.metadata, r.id || ':failure'
  FROM refunds r
  LEFT JOIN payments p ON p.payment_key = r.payment_key
  LEFT JOIN balance_transactions bt ON bt.id = r.failure_balance_transaction
  LEFT JOIN stripe_objects o ON o.id = r.id
  LEFT JOIN customers c ON c.id = p.customer
  -- when the money came back: its balance transaction's time, else that of the event that
  -- said the refund failed (an imported object's synthetic event says nothing of it), else the
  -- refund's own
 CROSS JOIN LATERAL (
      SELECT coalesce(bt.created_at,
                      CASE WHEN left(o.event_id, 11) <> 'evt_import_'
                           THEN to_timestamp(o.event_created) END,
                      r.created_at) AS at) back
 WHERE r.status IN ('failed', 'canceled') AND r.balance_transaction IS NOT NULL
   AND back.at >= $1 AND back.at < $2
UNION ALL
SELECT to_timestamp((m.b ->> 'created')::bigint),
       'dispute', p.kind,
       CASE WHEN (m.b ->> 'amount')::bigint < 0 THEN 'funds_withdrawn' ELSE 'funds_reinstated' END,
       d.currency,
       CASE WHEN (m.b ->> 'amount')::bigint < 0 THEN -d.amount ELSE d.amount END,
       (m.b ->> 'fee')::bigint, (m.b ->> 'net')::bigint, m.b ->> 'currency',
       (m.b ->> 'amount')::bigint, p.campaign, p.email, c.name,
       coalesce(d.payment_intent, p.payment_intent), coalesce(d.charge, p.charge), p.invoice,
       p.subscription, p.customer, bt.payout, NULL, d.id, m.b ->> 'id', p.metadata,
       d.id || ':' || (m.b ->> 'id')
  FROM disputes d
  JOIN stripe_objects o ON o.id = d.id
  CROSS JOIN LATERAL jsonb_array_elements(
      CASE WHEN jsonb_typeof(o.data -> 'balance_transactions') = 'array'
           THEN o.data -> 'balance_transactions' ELSE '[]'::jsonb END) AS m(b)
  LEFT JOIN payments p ON p.payment_key = d.payment_key
  LEFT JOIN balance_transactions bt ON bt.id = m.b ->> 'id'
  LEFT JOIN customers c ON c.id = p.customer
 WHERE to_timestamp((m.b ->> 'created')::bigint) >= $1
   AND to_timestamp((m.b ->> 'created')::bigint) < $2
UNION ALL
SELECT d.created_at, 'dispute', p.kind, 'funds_withdrawn', d.currency, -d.amount, NULL, NULL,
       NULL, NULL, p.campaign, p.email, c.name, coalesce(d.payment_intent, p.payment_intent),
       coalesce(d.charge, p.charge), p.invoice, p.subscription, p.customer, NULL, NULL, d.id,
       NULL, p.metadata, d.id
  FROM disputes d
  LEFT JOIN stripe_objects o ON o.id = d.id
  LEFT JOIN payments p ON p.payment_key = d.payment_key
  LEFT JOIN customers c ON c.id = p.customer
 WHERE d.amount_held > 0
   AND coalesce(jsonb_array_length(CASE WHEN jsonb_typeof(o.data -> 'balance_transactions')
                = 'array' THEN o.data -> 'balance_transactions' END), 0) = 0
   AND d.created_at >= $1 AND d.created_at < $2
"""

CONTRIBUTIONS = f"""
SELECT created_at, type, kind, status, currency, amount, fee, net, settlement_currency,
       settlement_amount, campaign, email, name, payment_intent, charge, invoice, subscription,
       customer, payout, refund, dispute, balance_transaction, metadata::text AS metadata
  FROM ({MOVEMENTS}) AS movements
 ORDER BY created_at, type, sort_key
"""  # noqa: S608 - composed of constants only; the window is passed as $1, $2


# The same rows as CSV cells, formatted by PostgreSQL while Python streams the previous batch:
# major units to each currency's exponent ($3: zero-decimal, $4: three-decimal currencies, from
# donations/money.py), text neutralised ($5: FORMULA_START). `csv_cells` does the same in Python
# and the tests hold the two equal.
_MAJOR = """CASE WHEN {c} = any($3::text[]) THEN {a}::text
          WHEN {c} = any($4::text[]) THEN round({a}::numeric / 1000, 3)::text
          ELSE round({a}::numeric / 100, 2)::text END"""
_TEXT = "CASE WHEN left({x}, 1) = any($5::text[]) THEN '''' || {x} ELSE {x} END"
CONTRIBUTIONS_CSV = f"""
SELECT to_char(created_at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS"Z"'),
       type, kind, status, currency, {_MAJOR.format(c="currency", a="amount")},
       {_MAJOR.format(c="settlement_currency", a="fee")},
       {_MAJOR.format(c="settlement_currency", a="net")},
       settlement_currency,
       {_MAJOR.format(c="settlement_currency", a="settlement_amount")},
       {", ".join(_TEXT.format(x=name) if name in PUBLIC_TEXT else name
                  for name in COLUMNS[10:-1])},
       metadata::text
  FROM ({MOVEMENTS}) AS movements
 ORDER BY created_at, type, sort_key
"""  # noqa: S608 - constants only


def csv_arguments(win: Window) -> tuple[Any, ...]:
    """The parameters of CONTRIBUTIONS_CSV."""
    return (win.start, win.end, sorted(ZERO_DECIMAL), sorted(THREE_DECIMAL),
            list(FORMULA_START))


# --- the window -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Window:
    """[start, end): `from` inclusive, `to` exclusive, as instants; labels name the file."""

    start: datetime
    end: datetime
    zone: ZoneInfo  # what `from` and `to` were read in, and payouts are placed in (payouts.py)
    start_label: str
    end_label: str

    @property
    def tz(self) -> str:
        return self.zone.key

    def as_json(self) -> dict[str, str]:
        return {"from": _rfc3339(self.start), "to": _rfc3339(self.end), "tz": self.tz}

    def filename(self, report: str, extension: str) -> str:
        return f"{report}_{self.start_label}_{self.end_label}.{extension}"


def zone(name: str | None) -> ZoneInfo:
    """An IANA time zone (`Europe/London`); UTC when none is given."""
    if not name:
        return ZoneInfo("UTC")
    try:
        return ZoneInfo(name)
    # OSError: a folder of the database (`America`), a name too long for a file name
    except (ZoneInfoNotFoundError, ValueError, OSError):
        raise BadRequest("invalid_tz", f"{name!r} is not an IANA time zone such as "
                         "Europe/London", field="tz") from None


def instant(value: str | None, name: str, tz: ZoneInfo) -> tuple[datetime, str]:
    """An ISO date (midnight in `tz`) or timestamp (naive ones in `tz`), and a label for it."""
    if not value:
        raise BadRequest("missing_field", f"{name} is required (an ISO date or timestamp)",
                         field=name)
    try:
        if len(value) == 10:
            day = date.fromisoformat(value)
            return datetime.combine(day, time(), tzinfo=tz).astimezone(UTC), value
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00").replace(" ", "T"))
        if parsed.tzinfo is None:
            parsed = parsed.replace(tzinfo=tz)
        # to the whole second its label says (Stripe's times are whole seconds): a fraction
        # would leave out a movement at the second the report names as its start
        utc = parsed.astimezone(UTC).replace(microsecond=0)
    # OverflowError: a moment that is before year 1 or after 9999 once in UTC
    except (ValueError, OverflowError):
        raise BadRequest("invalid_timestamp", f"{name} must be an ISO date (2026-11-01) or "
                         "timestamp (2026-11-01T09:00:00Z) between the years 1 and 9999",
                         field=name) from None
    return utc, utc_seconds(utc).replace(":", "") + "Z"


def window(start: str | None, end: str | None, tz_name: str | None = None) -> Window:
    """The report window from the query's `from`, `to` and optional `tz`."""
    tz = zone(tz_name)
    start_at, start_label = instant(start, "from", tz)
    end_at, end_label = instant(end, "to", tz)
    if end_at <= start_at:
        raise Unprocessable("invalid_window", "to must be after from (from is inclusive, to "
                            "exclusive)", field="to")
    return Window(start_at, end_at, tz, start_label, end_label)


def month_window(month: date, tz: ZoneInfo | None = None) -> Window:
    """The calendar month that `month` falls in."""
    tz = tz or ZoneInfo("UTC")
    first = month.replace(day=1)
    after = (first + timedelta(days=32)).replace(day=1)
    return Window(datetime.combine(first, time(), tzinfo=tz).astimezone(UTC),
                  datetime.combine(after, time(), tzinfo=tz).astimezone(UTC), tz,
                  first.isoformat(), after.isoformat())


def _rfc3339(value: datetime) -> str:
    return utc_seconds(value) + "Z"


# --- rows -----------------------------------------------------------------------------------


def neutralise(text: str) -> str:
    """A text cell a spreadsheet will show and never run as a formula."""
    return "'" + text if text.startswith(FORMULA_START) else text


def csv_cells(row: asyncpg.Record | dict[str, Any]) -> list[str]:
    """One movement as CSV cells: money in major units to its currency's exponent."""
    currency = row["currency"]
    settlement = row["settlement_currency"]
    cells = [_rfc3339(row["created_at"])]
    for name in COLUMNS[1:]:
        value = row[name]
        if value is None:
            cells.append("")
        elif name in MONEY_COLUMNS:
            cells.append(to_major(value, currency if name == "amount" else settlement))
        elif name in PUBLIC_TEXT:
            cells.append(neutralise(str(value)))
        else:
            cells.append(str(value))
    return cells


def json_row(row: asyncpg.Record | dict[str, Any]) -> dict[str, Any]:
    """One movement as JSON: the same columns, money as the contract's money objects."""
    out: dict[str, Any] = {"created_at": _rfc3339(row["created_at"])}
    for name in COLUMNS[1:]:
        value = row[name]
        if name in MONEY_COLUMNS:
            currency = row["currency"] if name == "amount" else row["settlement_currency"]
            out[name] = None if value is None or currency is None else {
                "amount": value, "currency": currency}
        elif name == "metadata":
            out[name] = json.loads(value) if value else {}
        else:
            out[name] = value
    return out


def csv_header() -> bytes:
    buffer = io.StringIO()
    csv.writer(buffer).writerow(COLUMNS)  # RFC 4180: CRLF, quotes doubled
    return buffer.getvalue().encode("utf-8")


async def stream_contributions(
    conn: asyncpg.Connection, win: Window, fmt: str, write: Write, batch: int = BATCH
) -> int:
    """Write the window's movements to `write` from a cursor; returns the number of rows.

    A repeatable-read, read-only transaction gives one consistent snapshot of the ledger for the
    whole export, however long it takes; only one batch of rows is in memory at a time.
    """
    rows = 0
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    if fmt == "csv":
        await write(csv_header())
    else:
        head = json.dumps({"window": win.as_json()})[:-1]
        await write(f'{head}, "data": ['.encode())
    async with conn.transaction(isolation="repeatable_read", readonly=True):
        if fmt == "csv":
            cursor = await conn.cursor(CONTRIBUTIONS_CSV, *csv_arguments(win))
        else:
            cursor = await conn.cursor(CONTRIBUTIONS, win.start, win.end)
        while records := await cursor.fetch(batch):
            if fmt == "csv":
                writer.writerows(records)  # cells formatted by PostgreSQL; NULL is empty
                chunk = buffer.getvalue()
            else:
                chunk = ",".join(json.dumps(json_row(r)) for r in records)
                if rows:
                    chunk = "," + chunk
            buffer.seek(0)
            buffer.truncate()
            rows += len(records)
            await write(chunk.encode("utf-8"))
    if fmt == "json":
        await write(f'], "rows": {rows}}}\n'.encode())
    return rows


# --- the summary ----------------------------------------------------------------------------

SUMMARY_ROWS = f"""
SELECT currency, type, status, kind, settlement_currency,
       count(*) AS n, sum(amount) AS amount, sum(fee) AS fee, sum(net) AS net,
       sum(settlement_amount) AS settled,
       count(*) FILTER (WHERE settlement_amount IS NULL) AS unsettled,
       sum(amount) FILTER (WHERE settlement_amount IS NULL) AS unsettled_amount
  FROM ({MOVEMENTS}) AS movements
 GROUP BY currency, type, status, kind, settlement_currency
"""  # noqa: S608 - constants only

# New and ended in the window. A subscription whose first payment was never made
# (`incomplete_expired`: Stripe gives it an `ended_at`) never started, so it neither began nor
# ended: counted as ended, every abandoned checkout would read as churn.
SUBSCRIPTIONS = """
SELECT currency,
       count(*) FILTER (WHERE created_at >= $1 AND created_at < $2
                        AND status NOT IN ('incomplete', 'incomplete_expired')) AS new,
       count(*) FILTER (WHERE ended_at >= $1 AND ended_at < $2
                        AND status <> 'incomplete_expired') AS ended
  FROM subscriptions
 GROUP BY currency
"""

# Active at the window's end: started before it, not ended by then, and live then. Whether it
# was live is the status its latest snapshot before the end told (sql/030's history: facts of
# the events, the same whatever order they came in), so a closed month never changes when a
# subscriber lapses (`unpaid`, `paused`) later. One with no snapshot before the end (its events
# came before the history was kept, and no snapshot of it since was stamped before the end)
# counts as before: by its end if it ended, else by its status now. The price is the one kept
# now: the ledger keeps only each subscription's latest price (a change of price applies to past
# windows too); only the status is historical. Counted per price (a few dozen), not a row per
# subscription: tens of thousands of them each worked out in Python took most of a summary's
# time, twelve summaries per staff page. The history is read one index look-up per subscription
# (the primary key, backwards).
ACTIVE_AT_END = """
SELECT s.currency, s.amount, s.interval, s.interval_count, s.percent_off, s.amount_off,
       count(*) AS n
  FROM subscriptions s
  LEFT JOIN LATERAL (
      SELECT h.status FROM subscription_statuses h
       WHERE h.subscription_id = s.id AND h.at < $1
       ORDER BY h.at DESC, h.rank DESC, h.type_rank DESC, h.event_id DESC
       LIMIT 1) AS at_end ON true
 WHERE s.created_at < $1
   AND s.status NOT IN ('incomplete', 'incomplete_expired')
   AND (s.ended_at IS NULL OR s.ended_at >= $1)
   AND coalesce(at_end.status, CASE WHEN s.ended_at IS NOT NULL THEN 'active' ELSE s.status END)
       IN ('active', 'trialing', 'past_due')
 GROUP BY s.currency, s.amount, s.interval, s.interval_count, s.percent_off, s.amount_off
"""

# The rate of each payment currency named ($1) to the reporting currency ($2): the latest
# Stripe applied, that of the payment it converted into that currency last (settled_at is its
# balance transaction's time; a conversion into another currency the account settles in is no
# rate to this one). Read from sql/024's index of the converted payments, a look-up per
# currency: a join of every payment with its balance transaction took most of a second per
# summary, twelve per staff page, at a million payments.
RATES = """
SELECT c.currency,
       (SELECT bt.exchange_rate::text
          FROM payments p JOIN balance_transactions bt ON bt.id = p.balance_transaction
         WHERE p.currency = c.currency AND p.settlement_currency <> p.currency
           AND p.settlement_currency = $2 AND bt.exchange_rate IS NOT NULL
         ORDER BY p.settled_at DESC, p.payment_key DESC
         LIMIT 1) AS rate
  FROM unnest($1::text[]) AS c(currency)
"""


def monthly(amount: int, interval: str, count: int, percent_off: Any, amount_off: int | None
            ) -> Fraction:
    """A subscription's price after discounts per month, exactly (yearly ones divided by 12)."""
    if percent_off is not None:
        amount = apply_percent_off(amount, percent_off)
    elif amount_off is not None:
        amount = max(0, amount - amount_off)
    per_year = {"day": Fraction(365), "week": Fraction(52), "month": Fraction(12),
                "year": Fraction(1)}[interval]
    return Fraction(amount) * per_year / 12 / count


def _round(value: Fraction) -> int:
    """Half away from zero, as Stripe rounds."""
    sign = -1 if value < 0 else 1
    return sign * int(abs(value) + Fraction(1, 2))


def convert(amount: int, currency: str, to: str, rate: Fraction) -> int:
    """Minor units of `currency` in minor units of `to` at `rate` (major to major)."""
    major = Fraction(amount, 10 ** exponent(currency))
    return _round(major * rate * 10 ** exponent(to))


def _money(amount: int, currency: str) -> dict[str, Any]:
    return {"amount": amount, "currency": currency}


@dataclass
class _Figures:
    gross: int = 0
    refunds: int = 0
    withdrawn: int = 0
    reinstated: int = 0
    fees: int = 0
    net: int = 0
    payments: int = 0
    refund_count: int = 0
    dispute_movements: int = 0
    one_off: list[int] = field(default_factory=lambda: [0, 0])  # count, gross
    recurring: list[int] = field(default_factory=lambda: [0, 0])
    unsettled: int = 0

    def add(self, row: asyncpg.Record, amount: int) -> None:
        n = int(row["n"])
        if row["type"] == "payment":
            # a bank debit booked and then reversed is money in and out again (its fee stays
            # out): in the gross, so that the figures are the rows' sums and each payout ties,
            # but no payment in the counts (a payment that failed is no contribution)
            counted = n if row["status"] not in ("failed", "payment_failure") else 0
            self.gross += amount
            self.payments += counted
            split = self.recurring if row["kind"] == "recurring" else self.one_off
            split[0] += counted
            split[1] += amount
        elif row["type"] == "refund":
            self.refunds += -amount  # net of the money of failed refunds coming back
            if row["status"] != "refund_failure":  # (a refund, not a second one)
                self.refund_count += n
        elif row["status"] == "funds_withdrawn":
            self.withdrawn += -amount
            self.dispute_movements += n
        else:
            self.reinstated += amount
            self.dispute_movements += n

    def as_json(self, currency: str) -> dict[str, Any]:
        return {
            "gross": _money(self.gross, currency),
            "refunds": _money(self.refunds, currency),
            "disputes_withdrawn": _money(self.withdrawn, currency),
            "disputes_reinstated": _money(self.reinstated, currency),
            "payments": self.payments,
            "refunds_count": self.refund_count,
            "dispute_movements": self.dispute_movements,
            "one_off": {"payments": self.one_off[0], "gross": _money(self.one_off[1], currency)},
            "recurring": {"payments": self.recurring[0],
                          "gross": _money(self.recurring[1], currency)},
        }


async def summary(conn: asyncpg.Connection, win: Window, reporting: str) -> dict[str, Any]:
    """Gross, refunds, disputes, fees, net and counts per payment currency and as settled in the
    reporting currency, with subscriptions started and ended and monthly recurring at the end.

    The figures are sums of exactly the rows of the contributions report for the same window.
    Per currency, `net` is in that currency (gross less refunds and disputes); `fees` and
    `settled_net` are in the reporting currency, of the movements Stripe settled in it. In the
    reporting block every figure is what Stripe settled; a movement whose balance transaction is
    not fetched yet counts there only when it is in the reporting currency (at its own amount;
    its fee and net not at all) and is counted in `pending_settlement`. A movement Stripe
    settled in another currency (an account that also pays out in it) is in neither: its fees
    and net are under `settled_elsewhere`, per settlement currency, in that currency.
    """
    async with conn.transaction(isolation="repeatable_read", readonly=True):
        rows = await conn.fetch(SUMMARY_ROWS, win.start, win.end)
        subs = {r["currency"]: r for r in await conn.fetch(SUBSCRIPTIONS, win.start, win.end)}
        active = await conn.fetch(ACTIVE_AT_END, win.end)
        rates = {r["currency"]: Fraction(r["rate"]) for r in await conn.fetch(
            RATES, sorted({r["currency"] for r in active} - {reporting}), reporting)
            if r["rate"]}

    per: dict[str, _Figures] = {}
    fees: dict[str, int] = {}
    settled_net: dict[str, int] = {}
    # (payment currency or None for the whole, settlement currency) -> [movements, fees, net]
    elsewhere: dict[tuple[str | None, str], list[int]] = {}
    settled = _Figures()
    for row in rows:
        currency, settlement = row["currency"], row["settlement_currency"]
        per.setdefault(currency, _Figures()).add(row, int(row["amount"]))
        # every movement is counted; its money only once known in the reporting currency
        amount = 0
        if settlement == reporting:
            amount = int(row["settled"] or 0)
            settled.fees += int(row["fee"] or 0)
            settled.net += int(row["net"] or 0)
            fees[currency] = fees.get(currency, 0) + int(row["fee"] or 0)
            settled_net[currency] = settled_net.get(currency, 0) + int(row["net"] or 0)
        elif settlement is None:
            if currency == reporting:
                amount = int(row["unsettled_amount"] or 0)
        else:
            for key in ((currency, settlement), (None, settlement)):
                cell = elsewhere.setdefault(key, [0, 0, 0])
                cell[0] += int(row["n"])
                cell[1] += int(row["fee"] or 0)
                cell[2] += int(row["net"] or 0)
        settled.add(row, amount)
        settled.unsettled += int(row["unsettled"])

    def settled_elsewhere(of: str | None) -> list[dict[str, Any]]:
        return [{"currency": sc, "movements": n, "fees": _money(fee, sc), "net": _money(net, sc)}
                for (c, sc), (n, fee, net) in sorted(elsewhere.items(), key=lambda i: i[0][1])
                if c == of]

    mrr: dict[str, Fraction] = {}
    for live in active:
        value = monthly(live["amount"], live["interval"], live["interval_count"],
                        live["percent_off"], live["amount_off"]) * live["n"]
        mrr[live["currency"]] = mrr.get(live["currency"], Fraction(0)) + value
    mrr_reporting = 0
    unconverted: list[dict[str, Any]] = []
    for currency, value in sorted(mrr.items()):
        if currency == reporting:
            mrr_reporting += _round(value)
        elif currency in rates:
            mrr_reporting += convert(_round(value), currency, reporting, rates[currency])
        else:
            unconverted.append(_money(_round(value), currency))

    currencies = sorted(set(per) | set(subs) | set(mrr))
    by_currency = []
    for currency in currencies:
        figures = per.get(currency, _Figures())
        sub = subs.get(currency)
        by_currency.append({
            "currency": currency,
            **figures.as_json(currency),
            "net": _money(figures.gross - figures.refunds - figures.withdrawn
                          + figures.reinstated, currency),
            "fees": _money(fees.get(currency, 0), reporting),
            "settled_net": _money(settled_net.get(currency, 0), reporting),
            "settled_elsewhere": settled_elsewhere(currency),
            "new_subscriptions": int(sub["new"]) if sub else 0,
            "ended_subscriptions": int(sub["ended"]) if sub else 0,
            "monthly_recurring": _money(_round(mrr.get(currency, Fraction(0))), currency),
        })
    return {
        "window": win.as_json(),
        "reporting_currency": reporting,
        "reporting": {
            "currency": reporting,
            **settled.as_json(reporting),
            "fees": _money(settled.fees, reporting),
            "net": _money(settled.net, reporting),
            "pending_settlement": settled.unsettled,
            "settled_elsewhere": settled_elsewhere(None),
            "new_subscriptions": sum(int(s["new"]) for s in subs.values()),
            "ended_subscriptions": sum(int(s["ended"]) for s in subs.values()),
            "monthly_recurring": _money(mrr_reporting, reporting),
            "monthly_recurring_unconverted": unconverted,
        },
        "by_currency": by_currency,
    }


# --- HTTP -----------------------------------------------------------------------------------


def _format(request: web.Request) -> str:
    fmt = request.query.get("format", "csv").lower()
    if fmt not in ("csv", "json"):
        raise BadRequest("invalid_format", "format must be csv or json", field="format")
    return fmt


def query_window(request: web.Request) -> Window:
    q = request.query
    return window(q.get("from"), q.get("to"), q.get("tz"))


async def stream_response(
    request: web.Request, win: Window, fmt: str
) -> web.StreamResponse:
    """Stream the contributions of `win` to the caller; shared by the API and the staff page."""

    async def produce(conn: asyncpg.Connection, write: Write) -> int:
        return await stream_contributions(conn, win, fmt, write)

    return await stream_body(request, "contributions", fmt, produce,
                             filename=win.filename("contributions", fmt))


Produce = Callable[[asyncpg.Connection, Write], Awaitable[int]]


async def stream_body(
    request: web.Request, report: str, fmt: str, produce: Produce, filename: str | None = None
) -> web.StreamResponse:
    """A report written to the caller as `produce` makes it (chunked, a batch of rows at a time,
    never the whole answer in memory); shared by the contributions and payouts reports."""
    headers = {
        "Content-Type": "text/csv; charset=utf-8; header=present" if fmt == "csv"
        else "application/json; charset=utf-8",
        "Cache-Control": "no-store",
        "X-Content-Type-Options": "nosniff",
        # its headers leave from here, before the request context could add it
        "X-Request-ID": REQUEST_ID.get() or "",
    }
    if filename is not None:
        headers["Content-Disposition"] = f'attachment; filename="{filename}"'
    response = web.StreamResponse(headers=headers)
    response.enable_chunked_encoding()
    sent = False  # whether the headers have left
    hung_up: Exception | None = None
    async with db.connection(request.app[POOL]) as conn:
        # Only once the database answers are the headers sent: an outage before that is a 503.
        await conn.execute("SELECT 1")
        try:
            await response.prepare(request)
            sent = True
            rows = await produce(conn, response.write)
        except Exception as exc:
            if client_hung_up(request, exc):
                # (kept out of db.connection, which takes a ConnectionResetError for the
                # database's)
                hung_up = exc
            elif not sent:
                raise
            else:
                # The status is already sent: cut the connection so that a partial file can
                # never look complete (no final chunk), rather than end it cleanly.
                log.exception("report_stream_failed", report=report)
                if request.transport is not None:
                    request.transport.close()
                return response
    if hung_up is None:
        try:
            await response.write_eof()
        except Exception as exc:
            if not client_hung_up(request, exc):
                raise
            hung_up = exc
    if hung_up is not None:
        if not sent:  # the request context's 499
            raise hung_up
        # The client went away before it had the whole report (a download cancelled, a proxy's
        # timeout): nothing of ours failed, and nothing can reach it any more.
        log.info("client_disconnected", method=request.method, path=request.path,
                 report=report)
        return response
    log.info("report_streamed", report=report, rows=rows, format=fmt)
    return response


@routes.get("/v1/reports/contributions")
async def contributions_report(request: web.Request) -> web.StreamResponse:
    await auth.require(request, "reports:read")
    return await stream_response(request, query_window(request), _format(request))


@routes.get("/v1/reports/summary")
async def summary_report(request: web.Request) -> web.Response:
    await auth.require(request, "reports:read")
    win = query_window(request)
    async with db.connection(request.app[POOL]) as conn:
        body = await summary(conn, win, request.app[SETTINGS].reporting_currency)
    return web.json_response(body, headers={"Cache-Control": "no-store"})
