"""Payouts tied to the bank: each payout's balance transactions fetched from Stripe, and reported.

A background worker, like the fee worker: never on the webhook's path, leased rows so replicas
share the work, retried with backoff while Stripe is slow or down.
"""

from __future__ import annotations

import asyncio
import contextlib
import csv
import io
import json
import re
from collections.abc import AsyncGenerator, Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, cast
from zoneinfo import ZoneInfo

import asyncpg
import stripe
import structlog
from aiohttp import web

from donations import auth, db, fees, inputs, reports
from donations.appkeys import POOL
from donations.errors import NotFound
from donations.money import to_major
from donations.reports import Window, neutralise, query_window
from donations.stripe_api import plain

log = structlog.get_logger(__name__)

routes = web.RouteTableDef()

LEASE_SECONDS = 300
PAYOUT_ID = re.compile(r"^po_[A-Za-z0-9]{1,250}$")  # Stripe's: the prefix, then letters, digits
PAGE = 100  # Stripe's largest page


# A payout requested by hand (`automatic` false; reconciliation_status not_applicable): Stripe
# lists balance transactions by payout for automatic payouts only, and answers the listing of a
# manual one with a 400, however often it is asked. Such a payout is never queued, and is
# reported without a tie (see `tied_by_stripe`).
MANUAL = "(p.automatic IS FALSE OR coalesce(p.reconciliation_status, '') = 'not_applicable')"


async def enqueue(conn: asyncpg.Connection) -> int:
    """Queue every paid or failed automatic payout not yet fetched for the state it has now.

    Stripe lists a payout's transactions in full only once it has finished reconciling it
    (reconciliation_status completed; absent in older API versions): until then it waits, and
    `payout.reconciliation_completed` queues it. A manual payout is never queued, and one an
    earlier release queued and that was never fetched is taken out of the queue here (so that
    a replica of that release still running during a deploy cannot leave one behind)."""
    await conn.execute(
        f"""
        DELETE FROM payout_fetches f USING payouts p
         WHERE p.id = f.payout AND f.fetched_at IS NULL AND {MANUAL}
        """  # noqa: S608 - a constant condition
    )
    result: str = await conn.execute(
        f"""
        INSERT INTO payout_fetches (payout, payout_status)
        SELECT id, status || ':' || coalesce(reconciliation_status, '') FROM payouts p
         WHERE status IN ('paid', 'failed')
           AND coalesce(reconciliation_status, 'completed') = 'completed'
           AND NOT {MANUAL}
        ON CONFLICT (payout) DO UPDATE
           SET payout_status = excluded.payout_status, attempts = 0, next_attempt_at = now(),
               last_error = NULL, fetched_at = NULL, queued_at = now(), gave_up_at = NULL,
               not_found_in_a_row = 0
         WHERE payout_fetches.payout_status IS DISTINCT FROM excluded.payout_status
        """  # noqa: S608 - a constant condition
    )
    return int(result.rsplit(maxsplit=1)[-1])


async def claim(conn: asyncpg.Connection, batch: int) -> list[tuple[str, int, datetime]]:
    """Lease due payouts so that several replicas never fetch the same one at once: each with
    its attempt count and when it was queued for the state it has (a payout queued again
    meanwhile, for a new status, is fetched again: see store_members)."""
    rows = await conn.fetch(
        """
        UPDATE payout_fetches AS f
           SET attempts = f.attempts + 1,
               next_attempt_at = now() + make_interval(secs => $2)
         WHERE f.payout IN (SELECT payout FROM payout_fetches
                             WHERE fetched_at IS NULL AND gave_up_at IS NULL
                               AND next_attempt_at <= now()
                             ORDER BY next_attempt_at
                             LIMIT $1
                             FOR UPDATE SKIP LOCKED)
        RETURNING f.payout, f.attempts, f.queued_at
        """,
        batch, LEASE_SECONDS,
    )
    return [(r["payout"], r["attempts"], r["queued_at"]) for r in rows]


async def fetch_members(client: stripe.StripeClient, payout_id: str) -> list[dict[str, Any]]:
    """Every balance transaction Stripe lists for the payout, all pages."""
    first = await client.v1.balance_transactions.list_async(
        params={"payout": payout_id, "limit": PAGE}
    )
    return [plain(bt) async for bt in first.auto_paging_iter()]


async def store_members(
    conn: asyncpg.Connection, payout_id: str, members: list[dict[str, Any]],
    queued_at: datetime | None = None,
) -> None:
    """Keep the payout's transactions (filling fees of payments on the way) in one transaction;
    the payout is done only if it is still queued as it was when claimed (`queued_at`): one
    queued again meanwhile for a new status (paid, then failed while its listing was read)
    stays due, to be listed again for it."""
    async with conn.transaction():
        await conn.execute("DELETE FROM payout_balance_transactions WHERE payout = $1", payout_id)
        # all of them in a few statements (a payout holds a day's movements: hundreds or
        # thousands), not four round trips each
        await fees.store_balance_transactions(conn, members)
        await conn.executemany(
            "INSERT INTO payout_balance_transactions (payout, balance_transaction) "
            "VALUES ($1, $2) ON CONFLICT DO NOTHING",
            [(payout_id, bt["id"]) for bt in members],
        )
        await conn.execute(
            "UPDATE balance_transactions SET payout = $1 WHERE id = any($2::text[])",
            payout_id, [bt["id"] for bt in members],
        )
        await conn.execute(
            "UPDATE payout_fetches SET fetched_at = now(), last_error = NULL"
            " WHERE payout = $1 AND ($2::timestamptz IS NULL OR queued_at = $2)",
            payout_id, queued_at,
        )


async def run_once(pool: asyncpg.Pool, client: stripe.StripeClient, batch: int = 5) -> int:
    """Fetch the transactions of the payouts due; returns how many payouts were stored."""
    async with db.connection(pool) as conn:
        await enqueue(conn)
        claimed = await claim(conn, batch)
    stored = 0
    # claimed (with its attempt count) and not yet stored or postponed
    left = {payout_id: attempts for payout_id, attempts, _ in claimed}
    try:
        for payout_id, attempts, queued_at in claimed:
            if not await fees.still_leased(pool, "payout_fetches", "payout", payout_id,
                                           attempts):
                del left[payout_id]
                continue
            try:
                members = await fetch_members(client, payout_id)
            except stripe.StripeError as exc:
                delay = await fees.postpone(pool, "payout_fetches", "payout", payout_id,
                                            attempts, exc)
                fees.log_failure("payout_transactions_fetch_failed", attempts, exc, delay,
                                 payout=payout_id)
                del left[payout_id]
                continue
            async with db.connection(pool) as conn:
                await store_members(conn, payout_id, members, queued_at)
            del left[payout_id]
            log.info("payout_transactions_stored", payout=payout_id, transactions=len(members))
            stored += 1
    except asyncio.CancelledError:
        await fees.give_back(pool, "payout_fetches", "payout", left)
        raise
    return stored


async def worker(pool: asyncpg.Pool, client: stripe.StripeClient, interval: float) -> None:
    """The payout worker, until cancelled."""
    await fees.keep_running("payout_worker", lambda: run_once(pool, client), interval)


# --- reports --------------------------------------------------------------------------------

# A payout ties when its transactions other than its own (type payout) add up, net of fees, to
# its amount, and its own transaction takes exactly that amount out of the balance.
PAYOUTS = """
SELECT p.id, p.status, p.amount, p.currency, p.arrival_date, p.created_at, p.automatic,
       p.reconciliation_status, p.failure_code, p.balance_transaction,
       f.fetched_at, f.last_error, f.attempts,
       count(bt.id) FILTER (WHERE bt.type <> 'payout') AS transactions,
       coalesce(sum(bt.net) FILTER (WHERE bt.type <> 'payout'), 0) AS members_net,
       sum(bt.amount) FILTER (WHERE bt.type = 'payout') AS own_amount
  FROM payouts p
  LEFT JOIN payout_fetches f ON f.payout = p.id
  LEFT JOIN payout_balance_transactions l ON l.payout = p.id
  LEFT JOIN balance_transactions bt ON bt.id = l.balance_transaction
 WHERE {where}
 GROUP BY p.id, f.payout
 ORDER BY coalesce(p.arrival_date, p.created_at), p.id
"""

# The balance transactions of the payouts named ($1), payout by payout in the order named, each
# payout's by time: read through a cursor, one payout's at a time is all a report holds.
# What a transaction is comes from its reporting_category first, as Stripe advises (a failed
# refund can be typed `adjustment`): a payment's own (category charge) and the reversal of a
# bank debit that failed after Stripe booked it (category charge_failure, type
# payment_failure_refund: the payment's money going out again) are joined to the payment; a
# refund's own and its failure's (category refund_failure: the money coming back) to the
# refund.
MEMBERS = """
SELECT l.payout, bt.id, bt.type, bt.reporting_category, bt.source, bt.amount, bt.fee, bt.net,
       bt.currency, bt.created_at, bt.available_on,
       coalesce(pc.payment_key, pr.payment_key, pd.payment_key) AS payment_key,
       coalesce(pc.kind, pr.kind, pd.kind) AS kind,
       coalesce(pc.currency, pr.currency, pd.currency) AS payment_currency,
       coalesce(CASE WHEN failed.charge THEN -pc.amount ELSE pc.amount END,
                CASE WHEN bt.reporting_category = 'refund_failure'
                          OR bt.type IN ('refund_failure', 'payment_failure_refund')
                     THEN r.amount ELSE -r.amount END,
                CASE WHEN bt.amount < 0 THEN -d.amount ELSE d.amount END) AS payment_amount,
       coalesce(pc.campaign, pr.campaign, pd.campaign) AS campaign,
       coalesce(pc.payment_intent, pr.payment_intent, pd.payment_intent) AS payment_intent,
       coalesce(pc.charge, r.charge, d.charge) AS charge,
       coalesce(pc.invoice, pr.invoice, pd.invoice) AS invoice,
       coalesce(pc.subscription, pr.subscription, pd.subscription) AS subscription,
       r.id AS refund, d.id AS dispute
  FROM unnest($1::text[]) WITH ORDINALITY AS named(payout, position)
  JOIN payout_balance_transactions l ON l.payout = named.payout
  JOIN balance_transactions bt ON bt.id = l.balance_transaction
  CROSS JOIN LATERAL (SELECT coalesce(bt.reporting_category, '') = 'charge_failure'
                             OR bt.type = 'payment_failure_refund' AS charge) failed
  -- (a bank debit's failed try, whose payment a later charge may have collected: by its charge,
  -- sql/039)
  LEFT JOIN LATERAL (SELECT * FROM payments WHERE balance_transaction = bt.id
                      OR (charge = bt.source
                          AND (bt.type IN ('charge', 'payment') OR failed.charge))
                      OR payment_key = (SELECT f.payment_key FROM failed_debits f
                                         WHERE f.charge = bt.source)
                      LIMIT 1) pc ON true
  LEFT JOIN refunds r ON r.id = bt.source
  LEFT JOIN payments pr ON pr.payment_key = r.payment_key
  LEFT JOIN disputes d ON d.id = bt.source
  LEFT JOIN payments pd ON pd.payment_key = d.payment_key
 ORDER BY named.position, bt.created_at, bt.id
"""
BATCH = 2000  # members per cursor fetch


def _money(amount: int | None, currency: str | None) -> dict[str, Any] | None:
    return None if amount is None or currency is None else {"amount": amount,
                                                            "currency": currency}


def tied_by_stripe(payout: Mapping[str, Any]) -> bool:
    """Whether Stripe lists the payout's transactions (a row of PAYOUTS or its JSON): not for a
    manual payout (MANUAL), which is reported without a tie, as a cancelled one is."""
    return payout["automatic"] is not False and payout["reconciliation_status"] != "not_applicable"


def payout_json(row: asyncpg.Record) -> dict[str, Any]:
    """A payout with whether its transactions sum exactly to it (null until they are fetched,
    and for a manual payout, whose transactions Stripe does not list)."""
    fetched = row["fetched_at"] is not None
    members_net = int(row["members_net"])
    own = row["own_amount"]
    balanced: bool | None = None
    if fetched:
        balanced = members_net == row["amount"] and (own is None or -int(own) == row["amount"])
    return {
        "id": row["id"],
        "status": row["status"],
        "amount": _money(row["amount"], row["currency"]),
        "arrival_date": inputs.rfc3339(row["arrival_date"]),
        "created_at": inputs.rfc3339(row["created_at"]),
        "automatic": row["automatic"],
        "reconciliation_status": row["reconciliation_status"],
        "failure_code": row["failure_code"],
        "transactions_fetched": fetched,
        "transactions": int(row["transactions"]),
        "transactions_net": _money(members_net, row["currency"]) if fetched else None,
        "balanced": balanced,
        "difference": _money(row["amount"] - members_net, row["currency"]) if fetched else None,
        "fetch_error": row["last_error"] if not fetched else None,
    }


def member_json(row: asyncpg.Record) -> dict[str, Any]:
    return {
        "balance_transaction": row["id"],
        "type": row["type"],
        "reporting_category": row["reporting_category"],
        "source": row["source"],
        "amount": _money(row["amount"], row["currency"]),
        "fee": _money(row["fee"], row["currency"]),
        "net": _money(row["net"], row["currency"]),
        "created_at": inputs.rfc3339(row["created_at"]),
        "available_on": inputs.rfc3339(row["available_on"]),
        "payment_key": row["payment_key"],
        "kind": row["kind"],
        "payment_amount": _money(row["payment_amount"], row["payment_currency"]),
        "campaign": row["campaign"],
        "payment_intent": row["payment_intent"],
        "charge": row["charge"],
        "invoice": row["invoice"],
        "subscription": row["subscription"],
        "refund": row["refund"],
        "dispute": row["dispute"],
    }


# Stripe's arrival_date is a calendar day (given as its midnight UTC): the day the bank credits
# the payout, the same day on the bank statement whatever the report's time zone. It is placed at
# the start of that day in the window's zone (a payout with no arrival date at its creation), in
# Python, with the zone the window was read in: never by name in PostgreSQL, whose time zone
# database may not know a zone Python's knows (the embedded server's has no posix/ zones, no
# posixrules; one tzdata may be newer than the other) or know another version of its rules.
# PostgreSQL only narrows the search to the payouts within two days of the window: no zone is
# as much as a day and a half from UTC.
_NEAR = """((p.arrival_date >= $1::timestamptz - interval '2 days'
          AND p.arrival_date < $2::timestamptz + interval '2 days')
         OR (p.arrival_date IS NULL AND p.created_at >= $1 AND p.created_at < $2))"""


def arrives(row: asyncpg.Record, zone: ZoneInfo) -> datetime | None:
    """Where a payout falls: the start of its arrival day in `zone`, else its creation; None
    when that is before the year 1 or after 9999 (outside every window)."""
    if row["arrival_date"] is None:
        return cast(datetime, row["created_at"])
    day = row["arrival_date"].astimezone(UTC).replace(tzinfo=None)  # the day's midnight
    try:
        return cast(datetime, day.replace(tzinfo=zone).astimezone(UTC))
    except OverflowError:
        return None


async def list_payouts(conn: asyncpg.Connection, win: Window) -> list[dict[str, Any]]:
    """Payouts arriving in the window (created, when Stripe gave no arrival date)."""
    rows = await conn.fetch(PAYOUTS.format(where=_NEAR), win.start, win.end)
    placed = [(at, r) for r in rows
              if (at := arrives(r, win.zone)) is not None and win.start <= at < win.end]
    # in the order they fall in the window's zone (PostgreSQL's is by the arrival day's
    # midnight UTC, which far from UTC is not the same)
    placed.sort(key=lambda pair: (pair[0], pair[1]["id"]))
    return [payout_json(r) for _, r in placed]


async def payouts_with_members(
    conn: asyncpg.Connection, win: Window | None = None, payout_id: str | None = None
) -> list[dict[str, Any]]:
    """Payouts (of the window, or the one named), each with its transactions joined to the
    ledger, read in one consistent snapshot. A whole window's are many (a year of daily payouts
    holds every movement of the year): reports stream them with `each_payout` instead."""
    async with contextlib.aclosing(each_payout(conn, win, payout_id)) as found:
        return [payout async for payout in found]


async def each_payout(
    conn: asyncpg.Connection, win: Window | None = None, payout_id: str | None = None,
    batch: int = BATCH,
) -> AsyncGenerator[dict[str, Any], None]:
    """The payouts of the window (or the one named) one at a time, each with its transactions
    joined to the ledger, all read in one consistent snapshot (a repeatable-read, read-only
    transaction) through a cursor: one payout's transactions and one batch are in memory at a
    time, however long the window."""
    async with conn.transaction(isolation="repeatable_read", readonly=True):
        if payout_id is not None:
            rows = await conn.fetch(PAYOUTS.format(where="p.id = $1"), payout_id)
            payouts = [payout_json(r) for r in rows]
        else:
            assert win is not None
            payouts = await list_payouts(conn, win)
        cursor = await conn.cursor(MEMBERS, [p["id"] for p in payouts])
        # each payout given away with its transactions, then forgotten (never kept in `payouts`)
        payouts.reverse()
        members: list[dict[str, Any]] = []
        while records := await cursor.fetch(batch):
            for record in records:
                while payouts and payouts[-1]["id"] != record["payout"]:
                    yield {**payouts.pop(), "balance_transactions": members}
                    members = []
                members.append(member_json(record))
        while payouts:
            yield {**payouts.pop(), "balance_transactions": members}
            members = []


MEMBER_FIELDS = (
    "balance_transaction", "type", "reporting_category", "source", "amount", "fee", "net",
    "created_at", "available_on", "payment_key", "kind", "payment_amount", "campaign",
    "payment_intent", "charge", "invoice", "subscription", "refund", "dispute",
)
# The CSV's columns: each amount is followed by the currency it is in (`payout_currency`; the
# balance transaction's `currency`, of its amount, fee and net; `payment_currency`), and the
# payout's figures by why it does or does not tie yet: a manual payout (`payout_automatic`
# false, `payout_reconciliation_status` not_applicable) is never tied by Stripe (finance ties it
# by hand), an automatic one with `payout_transactions_fetched` false will be.
PAYOUT_COLUMNS = ("payout", "payout_status", "payout_arrival_date", "payout_amount",
                  "payout_currency", "payout_balanced", "payout_automatic",
                  "payout_reconciliation_status", "payout_transactions_fetched",
                  "payout_failure_code")
MEMBER_COLUMNS = (
    "balance_transaction", "type", "reporting_category", "source", "amount", "fee", "net",
    "currency", "created_at", "available_on", "payment_key", "kind", "payment_amount",
    "payment_currency", "campaign", "payment_intent", "charge", "invoice", "subscription",
    "refund", "dispute",
)
CSV_COLUMNS = (*PAYOUT_COLUMNS, *MEMBER_COLUMNS)


def _currency(money: dict[str, Any] | None) -> str | None:
    return None if money is None else cast(str, money["currency"])


def csv_rows(payouts: list[dict[str, Any]]) -> list[list[str]]:
    """One line per transaction beside its payout's figures: money in major units, each amount
    with its currency, text neutralised against formulas, as in the contributions report. A
    payout whose transactions are not known yet still has a line, with its own figures only
    (balanced empty), so that no money that reached the bank is missing from the file."""
    lines = []
    for payout in payouts:
        head = {"payout": payout["id"], "payout_status": payout["status"],
                "payout_arrival_date": payout["arrival_date"],
                "payout_amount": payout["amount"],
                "payout_currency": _currency(payout["amount"]),
                "payout_balanced": payout["balanced"],
                "payout_automatic": payout["automatic"],
                "payout_reconciliation_status": payout["reconciliation_status"],
                "payout_transactions_fetched": payout["transactions_fetched"],
                "payout_failure_code": payout["failure_code"]}
        for member in payout["balance_transactions"] or [dict.fromkeys(MEMBER_FIELDS)]:
            line = {**head, **member, "currency": _currency(member["amount"]),
                    "payment_currency": _currency(member["payment_amount"])}
            cells = []
            for name in CSV_COLUMNS:
                value = line[name]
                if isinstance(value, dict):
                    cells.append(to_major(value["amount"], value["currency"]))
                elif value is None:
                    cells.append("")
                elif isinstance(value, bool):
                    cells.append("true" if value else "false")
                else:
                    cells.append(neutralise(str(value)))
            lines.append(cells)
    return lines


Write = Callable[[bytes], Awaitable[None]]


def _csv_text(lines: Iterable[Sequence[str]]) -> bytes:
    buffer = io.StringIO()
    csv.writer(buffer).writerows(lines)  # RFC 4180: CRLF, quotes doubled
    return buffer.getvalue().encode("utf-8")


@dataclass
class Written:
    """What write_report wrote: how many payouts, and which of them do not tie yet."""

    payouts: int = 0
    unbalanced: list[str] = field(default_factory=list)  # their transactions do not sum to them
    # paid or failed (and automatic), transactions not known
    unfetched: list[str] = field(default_factory=list)


async def write_report(conn: asyncpg.Connection, win: Window, fmt: str, write: Write) -> Written:
    """The window's payouts with their transactions to `write`, one payout at a time: as CSV
    (csv_rows), or as the API's JSON (`window`, `data`, then `unbalanced`)."""
    written = Written()
    if fmt == "csv":
        await write(_csv_text([CSV_COLUMNS]))
    else:
        head = json.dumps({"window": win.as_json()})[:-1]
        await write(f'{head}, "data": ['.encode())
    async with contextlib.aclosing(each_payout(conn, win)) as found:
        async for payout in found:
            if fmt == "csv":
                chunk = _csv_text(csv_rows([payout]))
            else:
                chunk = ("," if written.payouts else "").encode() + json.dumps(payout).encode()
            await write(chunk)
            written.payouts += 1
            if payout["balanced"] is False:
                written.unbalanced.append(payout["id"])
            # (a payout still on its way, or cancelled, has no transactions to tie yet; a manual
            # one has none Stripe will list)
            if not payout["transactions_fetched"] and payout["status"] in ("paid", "failed") \
                    and tied_by_stripe(payout):
                written.unfetched.append(payout["id"])
    if fmt == "json":
        await write(f'], "unbalanced": {json.dumps(written.unbalanced)}}}\n'.encode())
    return written


async def stream_report(request: web.Request, win: Window, fmt: str) -> web.StreamResponse:
    """The window's payouts streamed to the caller; shared by the API and the staff page."""

    async def produce(conn: asyncpg.Connection, write: Write) -> int:
        return (await write_report(conn, win, fmt, write)).payouts

    return await reports.stream_body(
        request, "payouts", fmt, produce,
        filename=win.filename("payouts", "csv") if fmt == "csv" else None)


@routes.get("/v1/reports/payouts")
async def payouts_report(request: web.Request) -> web.StreamResponse:
    await auth.require(request, "reports:read")
    # each with the balance transactions that make it up, as the contract says
    return await stream_report(request, query_window(request), "json")


@routes.get("/v1/reports/payouts/{id}")
async def payout_report(request: web.Request) -> web.Response:
    await auth.require(request, "reports:read")
    payout_id = request.match_info["id"]
    # what is no Stripe payout id (say, one holding U+0000, which no text column can be
    # compared with) is not looked for
    if not PAYOUT_ID.match(payout_id):
        raise NotFound("payout_not_found", "no payout with that id", field="id")
    async with db.connection(request.app[POOL]) as conn:
        found = await payouts_with_members(conn, payout_id=payout_id)
    if not found:
        raise NotFound("payout_not_found", "no payout with that id", field="id")
    return web.json_response(found[0], headers={"Cache-Control": "no-store"})
