"""Reconciliation: replay the Stripe events the webhook missed, then check the ledger against
Stripe's balance transactions and record every difference.

One run, under a PostgreSQL advisory lock so that only one replica reconciles at a time:

1. Events. Stripe lists the last 30 days of events, newest first. A run reads the window from the
   checkpoint to now page by page through the stripe library; any event not stored (or stored but
   failed) goes through `ingest_many` exactly as webhook deliveries do. After each page is applied,
   the window and the page's last event (Stripe's `starting_after` cursor) are saved; the
   checkpoint itself moves to the window's end only when the whole window is read, and never
   past the time Stripe answered the window's first page (its Date header: this replica's clock
   may run ahead of Stripe's). A run stopped half-way is resumed by the next one from the saved
   cursor, so there is never a gap.
2. Balance transactions of the window against payments, refunds and disputes: missing on either
   side, amounts, currencies or statuses that differ, fees not yet filled (filled now, the same
   way the fee worker fills them). A ledger value that disagrees with Stripe is recorded, never
   overwritten. A bank debit Stripe booked while its outcome is not known yet is left to a
   later run (compared_through stays before it).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import ROUND_HALF_UP, Decimal
from email.utils import parsedate_to_datetime
from typing import Any, NamedTuple
from urllib.parse import urlencode

import asyncpg
import stripe
import structlog
from aiohttp import web

from donations import auth, db, fees
from donations.appkeys import POOL
from donations.errors import BadRequest, Conflict, NotFound
from donations.events import NotAnEvent, parse_event, ref
from donations.ingest import FINAL, Item, Outcome, ingest_many
from donations.inputs import read_json, rfc3339, text, whole_number
from donations.ledger import FoundingOffer
from donations.metrics import gauge
from donations.money import exponent
from donations.stripe_api import get_list

log = structlog.get_logger(__name__)

routes = web.RouteTableDef()

LOCK_KEY = 0x7265636F6E63696C  # "reconcil": one reconciliation at a time across replicas
RETENTION_SECONDS = 30 * 86400  # how far back Stripe lists events
# Re-read this much before the checkpoint: an event can show up in Stripe's list a little after
# the second it is stamped with. Re-reading is cheap (stored events are skipped in one query).
OVERLAP_SECONDS = 300
PAGE_SIZE = 100
# After the library's own retries: how often and how long a run waits out a rate limit (429)
# or a connection failure before it gives up (the checkpoint keeps what was done).
BUSY_ATTEMPTS = 6
BUSY_FIRST_DELAY = 1.0
BUSY_MAX_DELAY = 30.0
STORE_CHUNK = 500  # balance transactions a comparison stores per transaction
# The comparison takes its window a span at a time, oldest first, moving compared_through after
# each: a run over months (`--since`, the first one after an import) holds about COMPARE_BATCH
# balance transactions in memory, not the window's, and one stopped half-way resumes after its
# last span. The first span is a day; a span that listed a quarter of COMPARE_BATCH or fewer
# doubles the next one (quiet months cost a request or two, not thirty), one that listed more
# than COMPARE_BATCH halves it, down to an hour.
COMPARE_SPAN = 86400
COMPARE_BATCH = 5000
MIN_COMPARE_SPAN = 3600
REEXAMINE = 200  # open discrepancies outside the window a run looks at again, at most

# card payments, and payments by other methods (Bacs, SEPA…), with the reversal of one that
# failed after Stripe booked it (a bank debit: booked when submitted, reversed when the bank
# refuses it; stripe/_charge.py `failure_balance_transaction`)
_CHARGE_FAILURE_TYPES = ("payment_failure_refund",)
_CHARGE_TYPES = ("charge", "payment", *_CHARGE_FAILURE_TYPES)
# card refunds, and the refunds of other payment methods, with their failures
_REFUND_FAILURE_TYPES = ("refund_failure",)
_REFUND_TYPES = ("refund", "payment_refund", *_REFUND_FAILURE_TYPES)
# Stripe's advice: group balance transactions by reporting_category, which stays the same
# whatever the payment method (a type may be added for a new one; a failed refund can be typed
# `adjustment`, a partial capture's reversal `refund`). Whenever a transaction has a category,
# it decides: one not here (`fee`, such as a dispute's countered fee booked as an `adjustment`
# naming the dispute; `other_adjustment`, `payout`, …) is not the ledger's business, whatever
# its type and source. The types decide only for a transaction without one.
_CATEGORY_OBJECT = {"charge": "payment", "charge_failure": "payment", "refund": "refund",
                    "refund_failure": "refund", "dispute": "dispute",
                    "dispute_reversal": "dispute", "partial_capture_reversal": "payment"}
# A charge captured for less than it authorised has two balance transactions: its `charge` for
# the whole authorisation, and this one (type `refund`, its source a Refund of the charge)
# reversing the part never captured; the two together settle the captured amount, the
# payment's (Stripe's "Reporting categories and types").
_PARTIAL_CAPTURE_REVERSAL = "partial_capture_reversal"
# A bank debit Stripe booked when it was submitted (Bacs, SEPA: its charge `pending`) has a
# `payment` transaction days before the ledger has a payment (charge.pending and
# payment_intent.processing make none): it is compared once the outcome is known, the
# comparison held back before it meanwhile, for at most this long.
IN_FLIGHT_AT_MOST = 30 * 86400
_LIVE_REFUNDS = ("pending", "requires_action", "succeeded")
# The ledger's statuses saying that what Stripe moved in the balance for the object was (or
# should have been) put back: a bank debit that failed after Stripe booked it, a refund the
# bank returned or that was cancelled, a dispute won.
_UNDONE = {"payment": ("failed",), "refund": ("failed", "canceled"), "dispute": ("won",)}
# Disputes that never moved money, so Stripe has no balance transaction for them: an inquiry
# (warning_*), and a dispute Stripe's dispute prevention blocked or resolved before it became a
# chargeback (`prevented`, since 2025-08-27.basil): only a chargeback withdraws the amount.
_DISPUTES_WITHOUT_MONEY = ("warning_needs_response", "warning_under_review", "warning_closed",
                           "prevented")


class AlreadyRunning(Exception):
    """Another replica (or command) holds the reconciliation lock."""


@dataclass(frozen=True, slots=True)
class Discrepancy:
    """One difference between a balance transaction and the ledger."""

    kind: str
    object: str  # payment, refund, dispute
    stripe_id: str  # the charge, refund or dispute
    balance_transaction: str | None
    ledger: dict[str, Any] | None
    stripe: dict[str, Any] | None
    repaired: bool = False

    def describe(self) -> str:
        state = "repaired" if self.repaired else "open"
        return (f"{state}\t{self.kind}\t{self.object} {self.stripe_id}\t"
                f"ledger={json.dumps(self.ledger, sort_keys=True)}\t"
                f"stripe={json.dumps(self.stripe, sort_keys=True)}")


@dataclass
class RunResult:
    """What one run did, as its row in reconciliation_runs says."""

    run_id: int = 0
    window_start: int = 0
    window_end: int = 0
    pages: int = 0
    events_listed: int = 0
    events_applied: int = 0
    events_failed: int = 0  # failed to apply (stored as failed), or not an event at all
    events_unreadable: int = 0  # of those, not events (never stored)
    balance_transactions: int = 0
    fees_filled: int = 0
    # bank debits booked by Stripe whose outcome is not known yet: compared by a later run
    debits_in_flight: int = 0
    discrepancies: list[Discrepancy] = field(default_factory=list)  # found by this run
    discrepancies_new: int = 0
    open: list[Discrepancy] = field(default_factory=list)  # every unresolved one, any run
    # stored events not applied, any run: failed, or in an API version not understood
    events_unapplied: int = 0
    # events created in [from, to) that Stripe no longer listed when a run came to read them,
    # until an import covering them has finished (any run)
    gap: tuple[int, int] | None = None
    unlisted_before: int | None = None  # a --since before what Stripe still lists

    @property
    def matches(self) -> bool:
        return (not self.open and not self.events_failed and not self.events_unapplied
                and self.gap is None)

    @property
    def events_not_applied(self) -> int:
        """Each once: the stored ones not applied (this run's failures among them) and those
        Stripe listed that were not events at all (never stored)."""
        return self.events_unapplied + self.events_unreadable

    def summary(self) -> str:
        lines = [
            f"reconciliation run {self.run_id}: {_iso(self.window_start)} to "
            f"{_iso(self.window_end)}",
            f"  events: {self.events_listed} listed in {self.pages} page(s), "
            f"{self.events_applied} missing ones applied, {self.events_failed} failed",
            f"  balance transactions: {self.balance_transactions} compared, "
            f"{self.fees_filled} fee(s) filled"
            + (f", {self.debits_in_flight} bank debit(s) in flight left to a later run"
               if self.debits_in_flight else ""),
            f"  discrepancies: {len(self.discrepancies)} found ({self.discrepancies_new} new), "
            f"{len(self.open)} unresolved in all",
        ]
        if self.gap is not None:
            lines.append(f"  gap: Stripe no longer lists the events from {_iso(self.gap[0])} to "
                         f"{_iso(self.gap[1])}; run `donations import --since "
                         f"{_iso(self.gap[0])[:10]}` to bring in what they changed")
        if self.unlisted_before is not None:
            lines.append(f"  warning: Stripe no longer lists events before "
                         f"{_iso(self.unlisted_before)}; run `donations import --since` for "
                         "them")
        if self.events_unapplied:
            lines.append(f"  {self.events_unapplied} stored event(s) not applied (failed, or "
                         "in an API version not understood): see `donations events list`")
        lines += [f"  {d.describe()}" for d in self.discrepancies if d.repaired]
        lines += [f"  {d.describe()}" for d in self.open]
        lines.append("the ledger matches Stripe" if self.matches else
                     f"the ledger does not match yet: {len(self.open)} unresolved "
                     f"discrepancies, {self.events_not_applied} events not "
                     f"applied{', a gap in the events' if self.gap else ''}")
        return "\n".join(lines)


def _iso(ts: int) -> str:
    return rfc3339(datetime.fromtimestamp(ts, UTC)) or ""


# --- talking to Stripe -----------------------------------------------------------------------


async def call_stripe(make: Callable[[], Awaitable[Any]], what: str) -> Any:
    """One Stripe call. The library has already retried 5xx/409/connection errors (and 429 when
    Stripe says to); a rate limit or an outage still standing is waited out here, with
    exponential backoff, so that a run slows down instead of hammering the API."""
    for attempt in range(1, BUSY_ATTEMPTS + 1):
        try:
            return await make()
        except (stripe.RateLimitError, stripe.APIConnectionError) as exc:
            if attempt == BUSY_ATTEMPTS:
                raise
            delay = min(BUSY_MAX_DELAY, BUSY_FIRST_DELAY * 2 ** (attempt - 1))
            delay *= random.uniform(0.5, 1.0)  # noqa: S311 - jitter, not a secret
            log.warning("stripe_busy_backing_off", call=what, error=type(exc).__name__,
                        http_status=exc.http_status, retry_in_seconds=round(delay, 2))
            await asyncio.sleep(delay)
    raise AssertionError("unreachable")


class Page(NamedTuple):
    """One page of a Stripe list."""

    items: list[dict[str, Any]]  # the plain JSON Stripe sent
    more: bool  # whether more pages follow
    # when Stripe answered, by its own clock (the response's Date header): what the page shows
    # is Stripe's state at that second. None when the answer had no readable Date.
    listed_at: int | None
    texts: list[str]  # each item's JSON text as Stripe sent it


async def dated_pages(
    client: stripe.StripeClient, path: str, params: dict[str, Any], what: str
) -> AsyncGenerator[Page, None]:
    """The pages of a Stripe list, the next one fetched while the caller works on the current
    one.

    Read with `stripe_api.get_list`: the same authentication, API version, retries and errors
    as the client's `list_async`, without turning every object of every page into a
    StripeObject first (that took six times as long as fetching the page, and reconciliation
    wants the JSON as sent anyway, to store it). Pages follow Stripe's `starting_after` cursor.
    """

    async def fetch(cursor: str | None) -> Page:
        query = dict(params, starting_after=cursor) if cursor else dict(params)
        listed = await call_stripe(lambda: get_list(client, path, query), what)
        kept = [k for k, i in enumerate(listed.items) if isinstance(i, dict)]
        items = [listed.items[k] for k in kept]
        return Page(items, listed.has_more and bool(items), stripe_time(listed.headers),
                    [listed.texts[k] for k in kept])

    page = await fetch(None)
    while True:
        upcoming = asyncio.ensure_future(fetch(str(page.items[-1]["id"]))) \
            if page.more else None
        if upcoming is not None:
            # when the caller stops on an error of its own, this fetch's outcome is moot
            upcoming.add_done_callback(lambda t: t.cancelled() or t.exception())
        try:
            yield page
        except BaseException:
            if upcoming is not None:
                upcoming.cancel()
                with contextlib.suppress(BaseException):
                    await upcoming
            raise
        if upcoming is None:
            return
        page = await upcoming


async def pages(
    client: stripe.StripeClient, path: str, params: dict[str, Any], what: str
) -> AsyncIterator[tuple[list[dict[str, Any]], bool]]:
    """dated_pages without the dates: (items, whether more follow)."""
    async with contextlib.aclosing(dated_pages(client, path, params, what)) as listing:
        async for page in listing:
            yield page.items, page.more


def stripe_time(headers: Mapping[str, str] | None) -> int | None:
    """Stripe's clock as a response's Date header gives it (unix seconds), if it does."""
    value = next((v for k, v in (headers or {}).items() if k.lower() == "date"), None)
    if not value:
        return None
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    return int((when if when.tzinfo else when.replace(tzinfo=UTC)).timestamp())


def _capped(end: int, stripe_now: int | None, floor: int) -> int:
    """How far a listing up to `end` (by the local clock) is known complete: never past the
    time Stripe answered its first page (a clock ahead of Stripe's would otherwise pass events
    Stripe stamps later), never before `floor` (the window's start)."""
    return end if stripe_now is None else max(floor, min(end, stripe_now))


# --- one run ---------------------------------------------------------------------------------


@dataclass
class _Run:
    pool: asyncpg.Pool
    client: stripe.StripeClient
    offer: FoundingOffer
    result: RunResult
    page_size: int
    compare_span: int = COMPARE_SPAN
    now: int = 0  # the run's end (its `now`)


async def run(
    pool: asyncpg.Pool,
    client: stripe.StripeClient,
    offer: FoundingOffer,
    *,
    trigger: str = "command",
    since: int | None = None,
    now: int | None = None,
    page_size: int = PAGE_SIZE,
    compare_span: int = COMPARE_SPAN,
) -> RunResult:
    """One reconciliation run (raises AlreadyRunning when another holds the lock)."""
    async with db.connection(pool) as lock:
        if not await lock.fetchval("SELECT pg_try_advisory_lock($1)", LOCK_KEY):
            raise AlreadyRunning("another reconciliation is running")
        try:
            state = _Run(pool, client, offer, RunResult(), page_size, compare_span)
            return await _locked_run(state, trigger, since, now)
        finally:
            # (were the connection lost, its session and so the lock are gone with it)
            with contextlib.suppress(*db.UNAVAILABLE_ERRORS, asyncpg.InterfaceError):
                await lock.execute("SELECT pg_advisory_unlock($1)", LOCK_KEY)


# The error of a run found still `running` by the next one (see _locked_run).
ABANDONED = "abandoned: the process running it stopped before it could finish it"


async def _locked_run(state: _Run, trigger: str, since: int | None, now: int | None
                      ) -> RunResult:
    pool, result = state.pool, state.result
    end = int(time.time()) if now is None else now
    state.now = end
    oldest_listed = end - RETENTION_SECONDS
    async with db.connection(pool) as conn:
        checkpoint = await conn.fetchrow("SELECT * FROM reconciliation_checkpoint")
    through = checkpoint["events_through"] if checkpoint else None
    pending = (
        (checkpoint["pending_start"], checkpoint["pending_end"], checkpoint["pending_cursor"])
        if checkpoint and checkpoint["pending_start"] is not None else None
    )
    if since is not None:
        start = since
    elif through is not None:
        start = through - OVERLAP_SECONDS
    else:
        start = oldest_listed
    # Events the checkpoint says are still to read but Stripe no longer lists (the service was
    # away longer than Stripe keeps them): a gap, kept until an import covers it, whatever
    # --since says (no run can list them). A --since further back than what Stripe lists is
    # only warned about: nothing was promised there.
    gap = (through, oldest_listed) if through is not None and through < oldest_listed else None
    # A window read through moves the checkpoint to its end only if it starts where every
    # earlier event is accounted for: at or before the checkpoint, or, with no checkpoint or a
    # gap recorded, before what Stripe still lists. A --since after that leaves the checkpoint
    # where it is, so the next run reads the events in between. A pending window (a run that
    # stopped part-way) is judged by the same rule when it is resumed.
    reach = oldest_listed if through is None else max(through, oldest_listed)
    if since is not None and since < oldest_listed:
        result.unlisted_before = oldest_listed
    if since is None:
        start = max(start, oldest_listed)
    start = min(start, end)
    window_start = min(start, pending[0]) if pending else start
    # balance transactions from where the last complete comparison stopped (a run that failed
    # while comparing leaves its window to the next)
    compared = checkpoint["compared_through"] if checkpoint else None
    if compared is not None:
        compare_start = min(window_start, max(0, compared - OVERLAP_SECONDS))
    elif through is not None:  # events were read but nothing was ever compared
        compare_start = min(window_start, oldest_listed)
    else:
        compare_start = window_start
    result.window_start, result.window_end = min(window_start, compare_start), end
    try:
        async with db.connection(pool) as conn:
            # Under the lock no other run is under way: a run still `running` was left so by a
            # process that stopped before it could say how it ended (killed, or cancelled
            # between recording its start and its first step).
            await conn.execute(
                """
                UPDATE reconciliation_runs
                   SET status = 'failed', finished_at = clock_timestamp(), error = $1
                 WHERE status = 'running'
                """,
                ABANDONED,
            )
            result.run_id = await conn.fetchval(
                """
                INSERT INTO reconciliation_runs (trigger, window_start, window_end)
                VALUES ($1, to_timestamp($2), to_timestamp($3)) RETURNING id
                """,
                trigger, result.window_start, end,
            )
            if gap is not None:
                await conn.execute(
                    """
                    INSERT INTO reconciliation_checkpoint AS c (gap_from, gap_to) VALUES ($1, $2)
                    ON CONFLICT (id) DO UPDATE
                       SET gap_from = least(c.gap_from, excluded.gap_from),
                           gap_to = greatest(c.gap_to, excluded.gap_to), updated_at = now()
                    """,
                    *gap,
                )
        log.info("reconciliation_started", run_id=result.run_id, window_start=_iso(window_start),
                 window_end=_iso(end), compare_start=_iso(compare_start),
                 resuming=pending is not None)
        if pending is not None:
            await _read_events(state, pending[0], pending[1], pending[2],
                               advance=pending[0] <= reach)
        await _read_events(state, start, end, None, advance=since is None or since <= reach)
        await _compare_window(state, compare_start, end)
    except BaseException as exc:
        if result.run_id:  # recorded (else the next run finds it `running` and closes it)
            await _finish(pool, result, f"{type(exc).__name__}: {exc}"[:2000])
            log.warning("reconciliation_failed", run_id=result.run_id, error=type(exc).__name__)
        raise
    await _finish(pool, result, None)
    log.info("reconciliation_finished", run_id=result.run_id, events_applied=result.events_applied,
             events_failed=result.events_failed, discrepancies_new=result.discrepancies_new,
             discrepancies_open=len(result.open))
    return result


async def _finish(pool: asyncpg.Pool, result: RunResult, error: str | None) -> None:
    """Read the run's outcome (what is still open) and record it. After a run that failed, a
    database gone too is suppressed (the run's own error is what the caller raises); after one
    that did its work, it is raised: a run that cannot read what is open cannot say the ledger
    matches."""
    outage: tuple[type[BaseException], ...] = (
        (db.DatabaseUnavailable, *db.UNAVAILABLE_ERRORS) if error else ())
    with contextlib.suppress(*outage):
        async with db.connection(pool) as conn:
            result.open = [_discrepancy(r) for r in await conn.fetch(
                "SELECT * FROM reconciliation_discrepancies WHERE resolved_at IS NULL ORDER BY id"
            )]
            result.events_unapplied = await conn.fetchval(
                "SELECT count(*) FROM stripe_events"
                " WHERE status IN ('pending', 'failed', 'needs_attention')")
            gap = await conn.fetchrow("SELECT gap_from, gap_to FROM reconciliation_checkpoint"
                                      " WHERE gap_from IS NOT NULL")
            result.gap = (gap["gap_from"], gap["gap_to"]) if gap else None
            await conn.execute(
                """
                UPDATE reconciliation_runs
                   SET status = $2, finished_at = clock_timestamp(), error = $3, pages = $4,
                       events_listed = $5, events_applied = $6, events_failed = $7,
                       balance_transactions = $8, fees_filled = $9, discrepancies_new = $10,
                       discrepancies_open = $11, events_unapplied = $12
                 WHERE id = $1
                """,
                result.run_id, "failed" if error else "succeeded", error, result.pages,
                result.events_listed, result.events_applied, result.events_failed,
                result.balance_transactions, result.fees_filled, result.discrepancies_new,
                len(result.open), result.events_unapplied,
            )


# --- 1. events -------------------------------------------------------------------------------


async def _read_events(state: _Run, start: int, end: int, cursor: str | None,
                       advance: bool) -> None:
    """Read (and apply what is missing of) the events created in [start, end]; then move the
    checkpoint to `end`, or to when Stripe answered the listing's first page if that is
    earlier (by Stripe's clock: this replica's may run ahead), unless told not to (a --since
    after the checkpoint: the events in between are not read, so the checkpoint stays where it
    is)."""
    # Any: the library types its params as TypedDicts per endpoint
    params: Any = {"created": {"gte": start, "lte": end}, "limit": state.page_size}
    if cursor is not None:
        params["starting_after"] = cursor
    try:
        end = await _read_pages(state, start, end, params)
    except stripe.InvalidRequestError as exc:
        if cursor is None or exc.param != "starting_after":
            raise
        # the saved cursor's event has aged out of Stripe's list: read the window whole again
        log.warning("reconciliation_cursor_expired", cursor=cursor)
        del params["starting_after"]
        end = await _read_pages(state, start, end, params)
    async with db.connection(state.pool) as conn:
        # only forward: an explicit --since far back must not pull the checkpoint back
        await conn.execute(
            """
            INSERT INTO reconciliation_checkpoint AS c (events_through)
            VALUES (CASE WHEN $2 THEN $1::bigint END)
            ON CONFLICT (id) DO UPDATE
               SET events_through = CASE WHEN $2 THEN greatest(c.events_through,
                                                               excluded.events_through)
                                         ELSE c.events_through END,
                   pending_start = NULL, pending_end = NULL, pending_cursor = NULL,
                   updated_at = now()
            """,
            end, advance,
        )


async def _read_pages(state: _Run, start: int, end: int, params: Any) -> int:
    """Read the window's pages; returns how far it is known complete (see _capped). A window
    resumed from a cursor was capped when its first page was read, and saved so."""
    result = state.result
    capped: int | None = None
    async for page in dated_pages(state.client, "/v1/events", params, "events.list"):
        if capped is None:
            capped = _capped(end, page.listed_at, start)
            if capped < end:
                log.info("reconciliation_window_capped", local_end=_iso(end),
                         stripe_time=_iso(capped))
        items = page.items
        if not items:
            continue
        await _apply_page(state, page)
        result.pages += 1
        result.events_listed += len(items)
        async with db.connection(state.pool) as conn:
            # the cursor past the page and the run's progress: one statement, one transaction
            await conn.execute(
                """
                WITH progress AS (
                    UPDATE reconciliation_runs
                       SET pages = $5, events_listed = $6, events_applied = $7,
                           events_failed = $8
                     WHERE id = $4
                )
                INSERT INTO reconciliation_checkpoint AS c (pending_start, pending_end,
                                                            pending_cursor)
                VALUES ($1, $2, $3)
                ON CONFLICT (id) DO UPDATE
                   SET pending_start = excluded.pending_start, pending_end = excluded.pending_end,
                       pending_cursor = excluded.pending_cursor, updated_at = now()
                """,
                start, capped, items[-1]["id"], result.run_id, result.pages,
                result.events_listed, result.events_applied, result.events_failed,
            )
    return end if capped is None else capped


async def _apply_page(state: _Run, page: Page) -> None:
    stored = await store_missing(state.pool, state.offer, page.items, "reconcile", page.texts)
    state.result.events_applied += stored.applied
    state.result.events_failed += stored.failed
    state.result.events_unreadable += stored.unreadable


class Stored(NamedTuple):
    """What store_missing did with a page."""

    applied: int
    failed: int  # not applied: stored as failed, or not an event (below)
    unreadable: int  # not an event at all: never stored


async def store_missing(
    pool: asyncpg.Pool, offer: FoundingOffer, items: list[dict[str, Any]], source: str,
    texts: list[str] | None = None,
) -> Stored:
    """Store and apply, as webhook deliveries would be, the events of a page that are not
    stored or stored but not applied; each stored as its text in `texts` (as Stripe sent it)
    where given, else as its JSON."""
    async with db.connection(pool) as conn:
        done = {r["id"] for r in await conn.fetch(
            "SELECT id FROM stripe_events WHERE id = any($1::text[]) AND status = any($2::text[])",
            [str(e.get("id")) for e in items], [o.value for o in FINAL],
        )}
    todo = [k for k, e in enumerate(items) if e.get("id") not in done]
    group: list[Item] = []
    unreadable = 0
    for k in todo:
        body = items[k]
        try:
            group.append((parse_event(body), texts[k] if texts else json.dumps(body)))
        except NotAnEvent:
            log.warning("reconciliation_not_an_event", event_id=str(body.get("id"))[:80])
            unreadable += 1
    # the page's events in one transaction, as the webhooks' group commit applies a group
    outcomes = await ingest_many(pool, group, offer, source=source) if group else []
    failed = unreadable + sum(1 for o in outcomes if o is Outcome.FAILED)
    return Stored(len(todo) - failed, failed, unreadable)


# --- 2. balance transactions against the ledger ----------------------------------------------


def _stripe_side(bt: dict[str, Any], reversals: list[dict[str, Any]] | None = None
                 ) -> dict[str, Any]:
    side = {"id": bt["id"], "type": bt.get("type"), "amount": bt.get("amount"),
            "currency": bt.get("currency"), "fee": bt.get("fee"), "net": bt.get("net"),
            "reporting_category": bt.get("reporting_category")}
    if reversals:  # a partial capture: what the charge's transactions settle together
        side.update(partial_capture_reversals=[r["id"] for r in reversals],
                    amount_settled=_settled(bt, reversals))
    return side


def _settled(bt: dict[str, Any], reversals: list[dict[str, Any]]) -> int:
    """What a charge's transaction and its partial-capture reversals settle together."""
    return int(bt.get("amount") or 0) + sum(int(r.get("amount") or 0) for r in reversals)


def _is_reversal(bt: dict[str, Any]) -> bool:
    """Whether the balance transaction reverses the part of an authorisation never captured."""
    return bt.get("reporting_category") == _PARTIAL_CAPTURE_REVERSAL


def _record(row: asyncpg.Record | None, *names: str) -> dict[str, Any] | None:
    return None if row is None else {n: row[n] for n in names}


_PAYMENT_FIELDS = ("payment_key", "status", "amount", "currency", "balance_transaction", "fee",
                   "net", "settlement_currency", "settlement_amount")
_REFUND_FIELDS = ("id", "status", "amount", "currency", "balance_transaction")
_DISPUTE_FIELDS = ("id", "status", "amount", "currency", "amount_held")


# The payments holding any of $1 (charges) as a bank debit's failed try (sql/039), with the
# try's booking and reversal.
_EARLIER_TRIES = f"""
SELECT f.charge, f.booked_balance_transaction AS booked,
       f.failure_balance_transaction AS failure, {', '.join('p.' + c for c in _PAYMENT_FIELDS)}
  FROM failed_debits f
  JOIN payments p ON p.payment_key = f.payment_key
 WHERE f.charge = any($1::text[])
"""  # noqa: S608 - constants, not input


def compare_payment(charge: str, bt: dict[str, Any], row: asyncpg.Record | None,
                    reversals: list[dict[str, Any]] | None = None) -> list[Discrepancy]:
    """A charge's balance transaction against its payment row (pure: no repair here).

    A bank debit that failed after Stripe booked it has two: the booking and its reversal.
    The reversal agrees with a payment the ledger has as failed; the booking is compared for
    its amount only, whether it was reversed being compare_outcome's to say (with all of the
    charge's transactions).

    A charge captured for less than it authorised has its `charge` transaction (for the whole
    authorisation) and `reversals` (the part never captured): the payment's amount, the
    captured one, is compared with what they settle together; its fee and net, which the fee
    worker copies from the `charge` transaction alone, with that transaction's."""
    reversals = reversals or []
    stripe_side, ledger = _stripe_side(bt, reversals), _record(row, *_PAYMENT_FIELDS)

    def found(kind: str) -> Discrepancy:
        return Discrepancy(kind, "payment", charge, bt["id"], ledger, stripe_side)

    if row is None:
        return [found("missing_in_ledger")]
    if _puts_back("payment", bt):
        return [] if row["status"] == "failed" else [found("status_mismatch")]
    out: list[Discrepancy] = []
    if row["status"] not in ("succeeded", "failed"):
        out.append(found("status_mismatch"))
    # The ledger's claim is its own amount, in the payment's currency (from the charge or
    # invoice); settlement_amount/_currency are copied from this very balance transaction by
    # the fee worker, so comparing with them would compare Stripe with itself.
    if row["settlement_currency"] is not None \
            and row["settlement_currency"] != bt.get("currency"):
        out.append(found("currency_mismatch"))
    elif not _settles_as(row["amount"], row["currency"], _settled(bt, reversals), bt,
                         slack=1 + len(reversals)):
        out.append(found("amount_mismatch"))
    if row["fee"] is not None and (row["fee"], row["net"]) != (bt.get("fee"), bt.get("net")):
        out.append(found("fee_mismatch"))
    return out


def compare_refund(refund: str, bt: dict[str, Any], row: asyncpg.Record | None
                   ) -> list[Discrepancy]:
    stripe_side, ledger = _stripe_side(bt), _record(row, *_REFUND_FIELDS)

    def found(kind: str) -> Discrepancy:
        return Discrepancy(kind, "refund", refund, bt["id"], ledger, stripe_side)

    if row is None:
        return [found("missing_in_ledger")]
    if _puts_back("refund", bt):
        return [] if row["status"] in _UNDONE["refund"] else [found("status_mismatch")]
    if not _settles_as(row["amount"], row["currency"], -int(bt.get("amount") or 0), bt):
        return [found("amount_mismatch")]
    return []


def _settles_as(amount: int, currency: str, settled: int, bt: dict[str, Any], *,
                slack: int = 1) -> bool:
    """Whether `amount` of `currency` is what the balance transaction settled (`settled`, in its
    own currency): exactly in the same currency; in another, at the transaction's exchange rate
    to within a minor unit (Stripe rounds the converted amount), or within `slack` of them when
    `settled` sums several transactions, each rounded. A rate missing: not compared."""
    if currency == bt.get("currency"):
        return amount == settled
    rate = bt.get("exchange_rate")
    if rate is None or isinstance(rate, bool):
        return True
    # the rate as Stripe wrote it (a JSON number, major unit to major unit): as a decimal,
    # never a float in the arithmetic
    scale = Decimal(10) ** (exponent(str(bt.get("currency"))) - exponent(currency))
    expected = (Decimal(amount) * Decimal(str(rate)) * scale).to_integral_value(ROUND_HALF_UP)
    return abs(expected - settled) <= slack


def compare_dispute(dispute: str, bt: dict[str, Any], row: asyncpg.Record | None
                    ) -> list[Discrepancy]:
    stripe_side, ledger = _stripe_side(bt), _record(row, *_DISPUTE_FIELDS)

    def found(kind: str) -> Discrepancy:
        return Discrepancy(kind, "dispute", dispute, bt["id"], ledger, stripe_side)

    if row is None:
        return [found("missing_in_ledger")]
    if bt.get("reporting_category") == "dispute_reversal":
        return [] if row["status"] == "won" else [found("status_mismatch")]
    if row["status"] in _DISPUTES_WITHOUT_MONEY:
        # Stripe withdrew money for what the ledger holds as an inquiry (no money held): the
        # chargeback's events never reached the ledger
        return [found("status_mismatch")]
    if not _settles_as(row["amount"], row["currency"], -int(bt.get("amount") or 0), bt):
        return [found("amount_mismatch")]
    return []


def _puts_back(obj: str, bt: dict[str, Any]) -> bool:
    """Whether the balance transaction undoes what a payment, refund or dispute moved in the
    balance: a bank debit's reversal when it failed, a refund's failure, a dispute's
    reversal."""
    category = bt.get("reporting_category")
    if obj == "payment":
        return category == "charge_failure" if category \
            else bt.get("type") in _CHARGE_FAILURE_TYPES
    if obj == "refund":
        return category == "refund_failure" if category \
            else bt.get("type") in _REFUND_FAILURE_TYPES
    return obj == "dispute" and category == "dispute_reversal"


def compare_outcome(obj: str, stripe_id: str, bts: list[dict[str, Any]],
                    row: asyncpg.Record | None) -> list[Discrepancy]:
    """A payment the ledger has as failed (so its money does not count), a refund it has as
    failed or canceled, or a dispute it has as won (so the money counts again), while Stripe
    moved the money in the balance and never put it back (its balance transactions, all of
    them: pure, no look-up here)."""
    if row is None or row["status"] not in _UNDONE[obj]:
        return []
    # a payment's money came in; a refund's or dispute's went out
    sign = 1 if obj == "payment" else -1
    moved = [bt for bt in bts
             if not _puts_back(obj, bt) and sign * int(bt.get("amount") or 0) > 0]
    if not moved or any(_puts_back(obj, bt) for bt in bts):
        return []
    fields = {"payment": _PAYMENT_FIELDS, "refund": _REFUND_FIELDS,
              "dispute": _DISPUTE_FIELDS}[obj]
    return [Discrepancy("status_mismatch", obj, stripe_id, moved[0]["id"],
                        _record(row, *fields), _stripe_side(moved[0]))]


def _object_of(bt: dict[str, Any]) -> str | None:
    """The ledger object a balance transaction is about (payment, refund, dispute), or None:
    by its reporting_category whenever it has one, by its type only when it has none. (A
    partial capture's reversal is its charge's payment's, although its source is a refund.)"""
    category = bt.get("reporting_category")
    if category:
        return _CATEGORY_OBJECT.get(str(category))
    kind = bt.get("type")
    if kind in _CHARGE_TYPES:
        return "payment"
    if kind in _REFUND_TYPES:
        return "refund"
    if kind == "adjustment" and (ref(bt.get("source")) or "").startswith("dp_"):
        return "dispute"
    return None


async def _compare_window(state: _Run, start: int, end: int) -> None:
    """Compare [start, end] a span at a time, oldest first (see COMPARE_SPAN); after each,
    compared_through moves to where that span's comparison is known complete, and never past a
    bank debit still in flight (just before its booking: the next runs list it again until
    its outcome is known; the later spans are compared all the same, and again by those runs,
    since compared_through, held back, no longer reaches back to them)."""
    span_start, span = start, state.compare_span
    while True:
        span_end = min(end, span_start + span - 1)
        before = state.result.balance_transactions
        compared, held = await _compare(state, span_start, span_end,
                                        reexamine=span_start == start)
        listed = state.result.balance_transactions - before
        async with db.connection(state.pool) as conn:
            # only forward, and only from a span that reached back to where it stood
            await conn.execute(
                """
                UPDATE reconciliation_checkpoint AS c
                   SET compared_through = greatest(c.compared_through, $2), updated_at = now()
                 WHERE c.compared_through IS NULL OR $1 <= c.compared_through
                """,
                span_start if span_start == start else span_start - 1,
                compared if held is None else min(compared, held),
            )
        if span_end >= end or compared < span_end:
            # (Stripe's clock behind the span's end: the rest is for the next run)
            return
        span_start = span_end + 1
        if listed <= COMPARE_BATCH // 4:
            span *= 2
        elif listed > COMPARE_BATCH:
            span = max(MIN_COMPARE_SPAN, span // 2)


async def _compare(state: _Run, start: int, end: int, *, reexamine: bool
                   ) -> tuple[int, int | None]:
    """Compare the balance transactions created in [start, end] (and the ledger's side of that
    window; with `reexamine`, the open discrepancies found before too) and store what differs;
    returns how far the comparison is known complete (`end`, or when Stripe answered the
    listing's first page if earlier: see _capped) and, when a bank debit in flight was listed
    (left to a later run), the second before its booking, which compared_through must not
    pass."""
    client, result = state.client, state.result
    by_object: dict[str, dict[str, list[dict[str, Any]]]] = {
        "payment": {}, "refund": {}, "dispute": {}}
    reversals: dict[str, list[dict[str, Any]]] = {}  # refund -> partial-capture reversals
    params: Any = {"created": {"gte": start, "lte": end}, "limit": 100}
    compared: int | None = None
    async for page in dated_pages(client, "/v1/balance_transactions", params,
                                  "balance_transactions.list"):
        if compared is None:
            compared = _capped(end, page.listed_at, start)
        for bt in page.items:
            kind = _object_of(bt)
            source = ref(bt.get("source"))
            if kind is not None and source:
                into = reversals if _is_reversal(bt) else by_object[kind]
                into.setdefault(source, []).append(bt)
                result.balance_transactions += 1
    released = await _attach_reversals(state, by_object["payment"], reversals)

    async with db.connection(state.pool) as conn:
        # The ledger's side of the window with no balance transaction listed: confirm with
        # Stripe one by one (its transaction may be just outside the window).
        unlisted = await conn.fetch(
            """
            SELECT 'payment' AS object, charge AS id FROM payments
             WHERE status = 'succeeded' AND charge IS NOT NULL AND amount > 0
               AND created_at BETWEEN to_timestamp($1) AND to_timestamp($2)
               AND charge <> all($3::text[])
            UNION ALL
            SELECT 'refund', id FROM refunds
             WHERE status = any($6::text[]) AND amount > 0
               AND created_at BETWEEN to_timestamp($1) AND to_timestamp($2)
               AND id <> all($4::text[])
            UNION ALL
            SELECT 'dispute', id FROM disputes
             WHERE status NOT LIKE 'warning%' AND status <> all($7::text[]) AND amount > 0
               AND created_at BETWEEN to_timestamp($1) AND to_timestamp($2)
               AND id <> all($5::text[])
            """,
            start, end, list(by_object["payment"]), list(by_object["refund"]),
            list(by_object["dispute"]), list(_LIVE_REFUNDS), list(_DISPUTES_WITHOUT_MONEY),
        )
        # Every open discrepancy is looked at again, wherever its object falls: a difference
        # fixed since (by an import, a late webhook) is then closed, not reported for ever.
        # At most REEXAMINE a run, those looked at longest ago first (each costs a Stripe call;
        # a run never hammers the API): a long list is worked through over a few runs.
        still_open = await conn.fetch(
            """
            SELECT object, stripe_id AS id FROM reconciliation_discrepancies
             WHERE resolved_at IS NULL
             GROUP BY object, stripe_id
             ORDER BY max(last_run_id), stripe_id
             LIMIT $1
            """,
            REEXAMINE if reexamine else 0)
        # A payment the ledger has as failed, a refund it has as failed or canceled, or a
        # dispute it has as won, says the money was put back: the transaction that put it back
        # may lie outside the window, so when only the one that moved it is listed, all of the
        # object's are asked for.
        undone = await conn.fetch(
            """
            SELECT 'refund' AS object, id FROM refunds
             WHERE id = any($1::text[]) AND status = any($4::text[])
            UNION ALL
            SELECT 'dispute', id FROM disputes
             WHERE id = any($2::text[]) AND status = any($5::text[])
            UNION ALL
            SELECT 'payment', charge FROM payments
             WHERE charge = any($3::text[]) AND status = any($6::text[])
            """,
            list(by_object["refund"]), list(by_object["dispute"]), list(by_object["payment"]),
            list(_UNDONE["refund"]), list(_UNDONE["dispute"]), list(_UNDONE["payment"]))
        # A listed object with an open discrepancy about a transaction the window does not
        # hold (a dispute's withdrawal that disagreed, when only its reversal is listed now):
        # all of its transactions are asked for, so that the difference is compared again
        # before the object counts as examined (which closes what it no longer finds).
        partly = await conn.fetch(
            """
            SELECT DISTINCT object, stripe_id AS id FROM reconciliation_discrepancies
             WHERE resolved_at IS NULL
               AND ((object = 'payment' AND stripe_id = any($1::text[]))
                    OR (object = 'refund' AND stripe_id = any($2::text[]))
                    OR (object = 'dispute' AND stripe_id = any($3::text[])))
               AND (balance_transaction IS NULL OR balance_transaction <> all($4::text[]))
            """,
            list(by_object["payment"]), list(by_object["refund"]), list(by_object["dispute"]),
            [bt["id"] for listed in by_object.values() for bts in listed.values()
             for bt in bts])
    whole = {(r["object"], r["id"]) for r in undone
             if not any(_puts_back(r["object"], bt) for bt in by_object[r["object"]][r["id"]])}
    whole |= {(r["object"], r["id"]) for r in partly}
    for obj, stripe_id in sorted(whole):
        listed = by_object[obj][stripe_id]
        everything = [bt for bt in await _balance_transactions_of(client, stripe_id)
                      if _object_of(bt) == obj]
        result.balance_transactions += len(everything) - len(listed)
        by_object[obj][stripe_id] = everything or listed
    to_confirm = {(r["object"], r["id"]) for r in unlisted}
    to_confirm |= {(r["object"], r["id"]) for r in still_open
                   if r["id"] not in by_object.get(r["object"], {})}
    missing_at_stripe: list[tuple[str, str]] = []
    for obj, stripe_id in sorted(to_confirm):
        theirs = [bt for bt in await _balance_transactions_of(client, stripe_id)
                  if _object_of(bt) == obj]
        if theirs:
            by_object[obj].setdefault(stripe_id, []).extend(theirs)
            result.balance_transactions += len(theirs)
        else:  # a discrepancy if the ledger has it (the look-ups below say)
            missing_at_stripe.append((obj, stripe_id))

    async with db.connection(state.pool) as conn:
        payments = {r["charge"]: r for r in await conn.fetch(
            f"SELECT charge, {', '.join(_PAYMENT_FIELDS)} FROM payments "  # noqa: S608
            "WHERE charge = any($1::text[])", list(by_object["payment"]) + [
                i for o, i in missing_at_stripe if o == "payment"])}
        refunds = {r["id"]: r for r in await conn.fetch(
            f"SELECT {', '.join(_REFUND_FIELDS)} FROM refunds "  # noqa: S608
            "WHERE id = any($1::text[])", list(by_object["refund"]) + [
                i for o, i in missing_at_stripe if o == "refund"])}
        disputes = {r["id"]: r for r in await conn.fetch(
            f"SELECT {', '.join(_DISPUTE_FIELDS)} FROM disputes "  # noqa: S608
            "WHERE id = any($1::text[])", list(by_object["dispute"]) + [
                i for o, i in missing_at_stripe if o == "dispute"])}
        # A bank debit's earlier try, booked by Stripe and reversed when the bank refused it,
        # whose payment a later charge of the same payment intent collected: failed_debits
        # (sql/039) keeps that try's two transactions with its payment, by its charge.
        others = [charge for charge in by_object["payment"] if charge not in payments]
        tries = {r["charge"]: {r["booked"], r["failure"]} for r in await conn.fetch(
            _EARLIER_TRIES, others)} if others else {}
    # (each of its transactions one the ledger holds for it)
    earlier_tries = {charge for charge, kept in tries.items()
                     if all(bt["id"] in kept for bt in by_object["payment"][charge])}
    await _find_uncaptured_parts(state, by_object["payment"], payments)
    in_flight = await _debits_in_flight(
        state, {c: bts for c, bts in by_object["payment"].items() if c not in earlier_tries},
        payments)

    discrepancies: list[Discrepancy] = []
    async with db.connection(state.pool) as conn:
        # what agrees (or fills a missing fee) is stored once everything is compared
        filled: list[dict[str, Any]] = []
        agreeing: list[dict[str, Any]] = []
        for charge, bts in by_object["payment"].items():
            if charge in in_flight:  # its outcome is compared once the ledger has it
                continue
            if charge in earlier_tries:  # the ledger holds each of its transactions as Stripe
                agreeing += bts
                continue
            row = payments.get(charge)
            # a partial capture's reversals: compared with the charge's own transaction
            uncaptured = [bt for bt in bts if _is_reversal(bt)]
            found_for_charge: list[Discrepancy] = []
            for bt in bts:
                if _is_reversal(bt):
                    continue
                found = compare_payment(charge, bt, row,
                                        None if _puts_back("payment", bt) else uncaptured)
                found_for_charge += found
                found_for_charge += _fill_fee(charge, bt, row, found, filled, agreeing)
            if all(d.repaired for d in found_for_charge):
                agreeing += uncaptured  # (kept for the reports, as the charge's are)
            discrepancies += found_for_charge
            discrepancies += compare_outcome("payment", charge, bts, row)
        for refund, bts in by_object["refund"].items():
            for bt in bts:
                found = compare_refund(refund, bt, refunds.get(refund))
                discrepancies += found
                if not found:
                    agreeing.append(bt)
            discrepancies += compare_outcome("refund", refund, bts, refunds.get(refund))
        for dispute, bts in by_object["dispute"].items():
            for bt in bts:
                found = compare_dispute(dispute, bt, disputes.get(dispute))
                discrepancies += found
                if not found:
                    agreeing.append(bt)
            discrepancies += compare_outcome("dispute", dispute, bts, disputes.get(dispute))
        stored = {r["id"] for r in await conn.fetch(
            "SELECT id FROM balance_transactions WHERE id = any($1::text[])",
            [bt["id"] for bt in agreeing])}
        # the fees to fill, and the agreeing ones not stored yet (reports read them)
        to_store = filled + [bt for bt in agreeing if bt["id"] not in stored]
        for chunk in range(0, len(to_store), STORE_CHUNK):
            await fees.store_balance_transactions(conn, to_store[chunk:chunk + STORE_CHUNK])
        tables = {"payment": payments, "refund": refunds, "dispute": disputes}
        for obj, stripe_id in missing_at_stripe:
            fields = {"payment": _PAYMENT_FIELDS, "refund": _REFUND_FIELDS,
                      "dispute": _DISPUTE_FIELDS}[obj]
            ledger_row = tables[obj].get(stripe_id)
            if ledger_row is None:  # on neither side (any more): nothing to report
                continue
            if obj == "dispute" and ledger_row["status"] in _DISPUTES_WITHOUT_MONEY:
                # none at Stripe is what the ledger says too: agreement (an open discrepancy,
                # found before it was prevented or by an earlier release, is closed)
                continue
            discrepancies.append(Discrepancy(
                "missing_at_stripe", obj, stripe_id,
                ledger_row["balance_transaction"] if "balance_transaction" in fields else None,
                _record(ledger_row, *fields), None))

        # (a debit in flight is examined: what an earlier run or release reported for it
        # is closed; so is a partial capture's reversal an earlier release took for a refund
        # missing in the ledger)
        examined = (list(by_object["payment"]) + list(by_object["refund"])
                    + list(by_object["dispute"]) + [i for _, i in missing_at_stripe]
                    + released)
        result.discrepancies += discrepancies
        result.discrepancies_new += await _store_discrepancies(
            conn, result.run_id, discrepancies, examined)
    result.fees_filled += sum(1 for d in discrepancies if d.kind == "fee_missing" and d.repaired)
    result.debits_in_flight += len(in_flight)
    # held back before the earliest debit in flight this span listed (one found only by
    # looking again at an open discrepancy lies before the span: no span lists it again)
    booked = [at for at in in_flight.values() if at >= start]
    return (end if compared is None else compared), (min(booked) - 1 if booked else None)


async def _retrieve(client: stripe.StripeClient, path: str, what: str) -> dict[str, Any] | None:
    """One object as the JSON Stripe sent; None when Stripe has no such object."""
    try:
        response = await call_stripe(lambda: client.raw_request_async("get", path), what)
    except stripe.InvalidRequestError as exc:
        if exc.code != "resource_missing":
            raise
        return None
    return response.data if isinstance(response.data, dict) else None


async def _attach_reversals(state: _Run, by_charge: dict[str, list[dict[str, Any]]],
                            reversals: dict[str, list[dict[str, Any]]]) -> list[str]:
    """Put each partial-capture reversal (listed by the Refund that is its source) with the
    transactions of that refund's charge: the ledger's refunds table says which charge when it
    has the refund, else one Stripe call (the refund). A charge whose reversal is listed but
    whose own transaction is not (just before the span) has its transactions asked for.
    Returns the refunds whose reversals were put with their charge's."""
    if not reversals:
        return []
    attached: list[str] = []
    async with db.connection(state.pool) as conn:
        charge_of: dict[str, str] = {r["id"]: r["charge"] for r in await conn.fetch(
            "SELECT id, charge FROM refunds WHERE id = any($1::text[]) AND charge IS NOT NULL",
            list(reversals))}
    for refund, bts in reversals.items():
        charge = charge_of.get(refund)
        if charge is None:
            found = await _retrieve(state.client, f"/v1/refunds/{refund}", "refunds.retrieve")
            charge = ref((found or {}).get("charge"))
        if charge is None:
            # (Stripe listed a transaction whose refund it does not have: left out, said)
            log.warning("reconciliation_reversal_without_charge", refund=refund,
                        balance_transactions=[bt["id"] for bt in bts])
            continue
        by_charge.setdefault(charge, []).extend(bts)
        attached.append(refund)
    for charge, bts in by_charge.items():
        if all(_is_reversal(bt) for bt in bts):
            theirs = [bt for bt in await _balance_transactions_of(state.client, charge)
                      if _object_of(bt) == "payment"]
            state.result.balance_transactions += len(theirs)
            bts[:0] = theirs
    return attached


async def _find_uncaptured_parts(state: _Run, by_charge: dict[str, list[dict[str, Any]]],
                                 payments: dict[str, asyncpg.Record]) -> None:
    """A payment the ledger has for less than its charge's transaction settled, with no
    partial-capture reversal in hand: the reversal may lie in another span, or the payment
    is looked at again for an amount_mismatch found before reversals were understood. Its
    charge's refunds (one Stripe call, their balance transactions expanded) say whether part
    of the authorisation was released; their reversals join the comparison."""
    for charge, bts in by_charge.items():
        row = payments.get(charge)
        if row is None or row["status"] != "succeeded" or any(_is_reversal(bt) for bt in bts):
            continue
        if not any(d.kind == "amount_mismatch" for bt in bts if not _puts_back("payment", bt)
                   for d in compare_payment(charge, bt, row)):
            continue
        found: list[dict[str, Any]] = []
        async for items, _more in pages(
                state.client, "/v1/refunds",
                {"charge": charge, "limit": 100, "expand": ["data.balance_transaction"]},
                "refunds.list"):
            found += [r["balance_transaction"] for r in items
                      if isinstance(r.get("balance_transaction"), dict)
                      and _is_reversal(r["balance_transaction"])]
        state.result.balance_transactions += len(found)
        bts.extend(found)


async def _debits_in_flight(state: _Run, by_charge: dict[str, list[dict[str, Any]]],
                            payments: dict[str, asyncpg.Record]) -> dict[str, int]:
    """The charges whose transactions are listed while the ledger has no payment for them and
    Stripe has them `pending` (one call each): bank debits Stripe booked when they were
    submitted, whose outcome is not known yet. By charge, when its booking was made. One
    booked longer ago than IN_FLIGHT_AT_MOST is not: it is reported as any other."""
    in_flight: dict[str, int] = {}
    for charge, bts in by_charge.items():
        bookings = [int(bt.get("created") or 0) for bt in bts
                    if not _puts_back("payment", bt) and not _is_reversal(bt)]
        if charge in payments or not bookings or state.now - min(bookings) > IN_FLIGHT_AT_MOST:
            continue
        found = await _retrieve(state.client, f"/v1/charges/{charge}", "charges.retrieve")
        if found is not None and found.get("status") == "pending":
            in_flight[charge] = min(bookings)
            log.info("reconciliation_debit_in_flight", charge=charge,
                     booked_at=_iso(min(bookings)))
    return in_flight


async def _balance_transactions_of(client: stripe.StripeClient, source: str
                                   ) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = []
    async for items, _more in pages(client, "/v1/balance_transactions",
                                    {"source": source, "limit": 100},
                                    "balance_transactions.list"):
        found += items
    return found


def _fill_fee(charge: str, bt: dict[str, Any], row: asyncpg.Record | None,
              found: list[Discrepancy], filled: list[dict[str, Any]],
              agreeing: list[dict[str, Any]]) -> list[Discrepancy]:
    """Fill fee, net and settlement when the ledger has none yet and nothing disagrees: the
    balance transaction goes to `filled` (or, agreeing and nothing to fill, to `agreeing`).
    Only a payment that succeeded has them: a bank debit that failed after Stripe booked it
    kept no money (its booking and reversal are Stripe's to show, kept for the reports as they
    are, any fee Stripe charged for it with them)."""
    if row is None or row["fee"] is not None or found or row["status"] != "succeeded":
        if not found:
            agreeing.append(bt)
        return []
    repaired = row["balance_transaction"] == bt["id"]
    if repaired:
        filled.append(bt)
    after = dict(_record(row, *_PAYMENT_FIELDS) or {})
    if repaired:
        after.update(fee=bt.get("fee"), net=bt.get("net"), settlement_currency=bt.get("currency"),
                     settlement_amount=bt.get("amount"))
    return [Discrepancy("fee_missing", "payment", charge, bt["id"], after,
                        _stripe_side(bt), repaired=repaired)]


async def _store_discrepancies(
    conn: asyncpg.Connection, run_id: int, found: list[Discrepancy], examined: list[str]
) -> int:
    """Record what this run found (once per open difference); close the open ones it examined
    and found agreeing. Returns how many are new."""
    async with conn.transaction():
        count_new = ("SELECT count(*) FROM reconciliation_discrepancies"
                     " WHERE last_run_id = $1 AND run_id = $1")
        before: int = await conn.fetchval(count_new, run_id)
        # (nothing when finance acknowledged exactly this difference before)
        await conn.executemany(
            """
            INSERT INTO reconciliation_discrepancies AS d (run_id, last_run_id, kind, object,
                stripe_id, balance_transaction, ledger, stripe, repaired, resolved_at)
            SELECT $1, $1, $2, $3, $4, $5, $6, $7, $8, CASE WHEN $8 THEN now() END
             WHERE NOT EXISTS (
                   SELECT 1 FROM reconciliation_discrepancies a
                    WHERE a.kind = $2 AND a.stripe_id = $4 AND a.acknowledged_by IS NOT NULL
                      AND a.ledger IS NOT DISTINCT FROM $6::jsonb
                      AND a.stripe IS NOT DISTINCT FROM $7::jsonb)
            ON CONFLICT (kind, stripe_id) WHERE resolved_at IS NULL DO UPDATE
               SET last_run_id = excluded.last_run_id, ledger = excluded.ledger,
                   stripe = excluded.stripe
            """,
            [(run_id, d.kind, d.object, d.stripe_id, d.balance_transaction, _jsonable(d.ledger),
              _jsonable(d.stripe), d.repaired) for d in found],
        )
        # the rows this run inserted (an open one found again keeps its first run)
        new: int = await conn.fetchval(count_new, run_id) - before
        await conn.execute(
            """
            UPDATE reconciliation_discrepancies SET resolved_at = now()
             WHERE resolved_at IS NULL AND last_run_id <> $1 AND stripe_id = any($2::text[])
            """,
            run_id, examined,
        )
    return new


def _jsonable(values: dict[str, Any] | None) -> dict[str, Any] | None:
    if values is None:
        return None
    return {k: (rfc3339(v) if isinstance(v, datetime) else v) for k, v in values.items()}


def _discrepancy(row: asyncpg.Record) -> Discrepancy:
    return Discrepancy(row["kind"], row["object"], row["stripe_id"], row["balance_transaction"],
                       row["ledger"], row["stripe"], row["repaired"])


# --- in `serve`: now and then ----------------------------------------------------------------


async def periodic(
    pool: asyncpg.Pool, client: stripe.StripeClient, offer: FoundingOffer, interval: float
) -> None:
    """Run until cancelled: a run whenever the last one (by any replica) is `interval` old.

    Every replica checks; the advisory lock and the check of the last run's start mean that one
    of them runs at a time and runs are about `interval` apart whatever the number of replicas.
    """
    await asyncio.sleep(min(interval, 60.0) * random.uniform(0.5, 1.0))  # noqa: S311
    while True:
        try:
            async with db.connection(pool) as conn:
                age = await conn.fetchval(
                    "SELECT extract(epoch FROM now() - max(started_at))::float8 "
                    "FROM reconciliation_runs"
                )
            if age is None or age >= interval * 0.95:
                await run(pool, client, offer, trigger="schedule")
        except AlreadyRunning:
            log.info("reconciliation_skipped", reason="another replica is running it")
        except db.DatabaseUnavailable:
            log.warning("reconciliation_database_unavailable")
        except stripe.StripeError as exc:
            log.warning("reconciliation_stripe_failed", error=type(exc).__name__,
                        http_status=exc.http_status)
        except Exception:
            log.exception("reconciliation_crashed")
        await asyncio.sleep(interval * random.uniform(0.9, 1.1))  # noqa: S311


# --- what operations and finance see ----------------------------------------------------------


async def metrics_lines(conn: asyncpg.Connection) -> list[str]:
    """Gauges for /metrics: time since the last successful run, open discrepancies by kind."""
    age = await conn.fetchval(
        "SELECT extract(epoch FROM now() - max(finished_at))::float8 FROM reconciliation_runs "
        "WHERE status = 'succeeded'"
    )
    open_rows = await conn.fetch(
        "SELECT kind, count(*) AS n FROM reconciliation_discrepancies WHERE resolved_at IS NULL "
        "GROUP BY kind ORDER BY kind"
    )
    lines = gauge(
        "donations_reconciliation_last_success_age_seconds",
        "Seconds since the last reconciliation run that finished (absent: none yet).",
        [] if age is None else [((), round(age, 3))],
    )
    lines += gauge(
        "donations_reconciliation_open_discrepancies",
        "Differences between Stripe's balance transactions and the ledger not yet resolved.",
        [((), sum(r["n"] for r in open_rows))]
        + [((("kind", r["kind"]),), r["n"]) for r in open_rows],
    )
    gap = await conn.fetchval("SELECT gap_to - gap_from FROM reconciliation_checkpoint")
    lines += gauge(
        "donations_reconciliation_event_gap_seconds",
        "Length of the span of events Stripe no longer lists and no import has covered "
        "(0: none; run donations import --since).",
        [((), gap or 0)],
    )
    return lines


# The discrepancies of a run are those it found first (run_id) or found again (last_run_id),
# in the order of their ids. The runs listing carries the first RUN_EMBEDDED of each run (the
# first page of the run's own listing, so that its `discrepancies_next` carries on from there)
# and how many the run has: a run can have tens of thousands (the first run after an import or a
# fee-worker outage repairs a fee for every payment), which embedded whole made even `?limit=1`
# an answer of megabytes.
RUN_EMBEDDED = 100
PAGE_DEFAULT = 100  # discrepancies a page of the paged listings gives unless told
PAGE_MAX = 500
STATUSES = ("open", "resolved", "all")

# One page of a run's discrepancies: those after id $2, at most $3. The ids are the first $3
# entries after $2 of each of the two indexes (sql/027), merged (a row the run found first and
# found again is in both: UNION keeps it once): never more than 2 x $3 index entries are read,
# however many the run has.
RUN_PAGE = """
    SELECT d.* FROM reconciliation_discrepancies d
     WHERE d.id IN (
           SELECT id FROM (
               (SELECT id FROM reconciliation_discrepancies
                 WHERE run_id = $1 AND id > $2 ORDER BY id LIMIT $3)
               UNION
               (SELECT id FROM reconciliation_discrepancies
                 WHERE last_run_id = $1 AND id > $2 ORDER BY id LIMIT $3)
           ) ids ORDER BY id LIMIT $3)
     ORDER BY d.id
"""
# The same first page (after no id) of each of the runs $1, at most $2 each; `listed_run` says
# of which run (a row can be on the pages of two: the run that found it first and the last).
RUNS_FIRST_PAGES = """
    SELECT r.run AS listed_run, d.*
      FROM unnest($1::bigint[]) AS r(run)
     CROSS JOIN LATERAL (
           SELECT id FROM (
               (SELECT id FROM reconciliation_discrepancies
                 WHERE run_id = r.run ORDER BY id LIMIT $2)
               UNION
               (SELECT id FROM reconciliation_discrepancies
                 WHERE last_run_id = r.run ORDER BY id LIMIT $2)
           ) ids ORDER BY id LIMIT $2) p
      JOIN reconciliation_discrepancies d ON d.id = p.id
     ORDER BY r.run, d.id
"""
# how many discrepancies each of the runs $1 has, from the indexes alone (the last-run index
# carries run_id, so a row found first and again by the same run is counted once)
RUNS_COUNTS = """
    SELECT r.run,
           (SELECT count(*) FROM reconciliation_discrepancies WHERE run_id = r.run)
           + (SELECT count(*) FROM reconciliation_discrepancies
               WHERE last_run_id = r.run AND run_id <> r.run) AS total
      FROM unnest($1::bigint[]) AS r(run)
"""
# A page of every run's discrepancies by status, ids after $1, at most $2: open and resolved
# each by an index of its own (sql/028), all by the primary key.
DISCREPANCIES = {
    "open": "SELECT * FROM reconciliation_discrepancies WHERE resolved_at IS NULL AND id > $1"
            " ORDER BY id LIMIT $2",
    "resolved": "SELECT * FROM reconciliation_discrepancies WHERE resolved_at IS NOT NULL"
                " AND id > $1 ORDER BY id LIMIT $2",
    "all": "SELECT * FROM reconciliation_discrepancies WHERE id > $1 ORDER BY id LIMIT $2",
}


def _run_json(row: asyncpg.Record, found: list[asyncpg.Record], total: int) -> dict[str, Any]:
    duration = (row["finished_at"] - row["started_at"]).total_seconds() \
        if row["finished_at"] else None
    more = total > len(found)
    return {
        "id": row["id"],
        "trigger": row["trigger"],
        "status": row["status"],
        "window": {"start": rfc3339(row["window_start"]), "end": rfc3339(row["window_end"])},
        "started_at": rfc3339(row["started_at"]),
        "finished_at": rfc3339(row["finished_at"]),
        "duration_seconds": None if duration is None else round(duration, 3),
        "counts": {
            "pages": row["pages"], "events_listed": row["events_listed"],
            "events_applied": row["events_applied"], "events_failed": row["events_failed"],
            "balance_transactions": row["balance_transactions"],
            "fees_filled": row["fees_filled"], "discrepancies_new": row["discrepancies_new"],
            "discrepancies_open": row["discrepancies_open"],
            "events_unapplied": row["events_unapplied"],
        },
        "error": row["error"],
        "discrepancies": [_discrepancy_json(d) for d in found],
        "discrepancies_total": total,
        "discrepancies_has_more": more,
        "discrepancies_next": _next_page(f"/v1/reconciliation/runs/{row['id']}/discrepancies",
                                         found, more, {}),
    }


# The figures of a discrepancy's sides that are money, and the field naming each one's currency:
# the ledger's amount in the payment's (refund's, dispute's) currency, its fee, net and settled
# amount in the settlement currency; all of a balance transaction's in its own.
_LEDGER_MONEY = {"amount": "currency", "amount_held": "currency", "fee": "settlement_currency",
                 "net": "settlement_currency", "settlement_amount": "settlement_currency"}
_STRIPE_MONEY = {"amount": "currency", "fee": "currency", "net": "currency",
                 "amount_settled": "currency"}


def _money_side(side: Any, money: Mapping[str, str]) -> Any:
    """A discrepancy's side with its money as money objects, as everywhere in the API (the
    side's other fields, its `currency` among them, as they are)."""
    if not isinstance(side, dict):
        return side
    out = dict(side)
    for name, currency in money.items():
        value = side.get(name)
        if isinstance(value, int) and not isinstance(value, bool):
            out[name] = {"amount": value, "currency": side.get(currency)}
    return out


def _discrepancy_json(d: asyncpg.Record) -> dict[str, Any]:
    return {
        "id": d["id"], "kind": d["kind"], "object": d["object"], "stripe_id": d["stripe_id"],
        "balance_transaction": d["balance_transaction"],
        "ledger": _money_side(d["ledger"], _LEDGER_MONEY),
        "stripe": _money_side(d["stripe"], _STRIPE_MONEY), "repaired": d["repaired"],
        "found_at": rfc3339(d["found_at"]), "resolved_at": rfc3339(d["resolved_at"]),
        "acknowledged": None if d["acknowledged_by"] is None else {
            "by": d["acknowledged_by"], "note": d["acknowledged_note"]},
        "first_run": d["run_id"], "last_run": d["last_run_id"],
    }


def _next_page(path: str, page: list[asyncpg.Record], more: bool, query: dict[str, str]
               ) -> str | None:
    """Where the page after `page` is: `path` with `query` and `after` its last id."""
    if not more or not page:
        return None
    return f"{path}?{urlencode({**query, 'after': page[-1]['id']})}"


def _page_query(request: web.Request) -> tuple[int, int]:
    """`limit` (1 to PAGE_MAX, PAGE_DEFAULT when absent) and `after` (an id; 0 when absent)."""
    limit = whole_number(request.query.get("limit", str(PAGE_DEFAULT)))
    if limit is None or not 1 <= limit <= PAGE_MAX:
        raise BadRequest("invalid_limit", f"limit must be a whole number from 1 to {PAGE_MAX}",
                         field="limit")
    after = whole_number(request.query.get("after", "0"))
    if after is None:
        raise BadRequest("invalid_after", "after must be the id of a discrepancy (the last "
                         "one of the page before)", field="after")
    return limit, after


def _page_json(found: list[asyncpg.Record], limit: int, path: str, query: dict[str, str]
               ) -> dict[str, Any]:
    """A page read with `limit + 1` rows: the first `limit`, whether there are more, and the
    address of the next page."""
    page, more = found[:limit], len(found) > limit
    return {"data": [_discrepancy_json(d) for d in page], "has_more": more,
            "next": _next_page(path, page, more, {**query, "limit": str(limit)})}


@routes.get("/v1/reconciliation/runs")
async def list_runs(request: web.Request) -> web.Response:
    """Recent runs, newest first, each with the first RUN_EMBEDDED discrepancies it found or
    found again, how many it has, and where the rest are."""
    await auth.require(request, "reports:read")
    limit = whole_number(request.query.get("limit", "20"))
    if limit is None or not 1 <= limit <= 100:
        raise BadRequest("invalid_limit", "limit must be a whole number from 1 to 100",
                         field="limit")
    # one snapshot: each run's count agrees with the page of it given
    async with db.connection(request.app[POOL]) as conn, \
            conn.transaction(isolation="repeatable_read", readonly=True):
        runs = await conn.fetch(
            "SELECT * FROM reconciliation_runs ORDER BY started_at DESC, id DESC LIMIT $1",
            limit,
        )
        ids = [r["id"] for r in runs]
        found = await conn.fetch(RUNS_FIRST_PAGES, ids, RUN_EMBEDDED)
        totals = {r["run"]: r["total"] for r in await conn.fetch(RUNS_COUNTS, ids)}
        open_count = await conn.fetchval(
            "SELECT count(*) FROM reconciliation_discrepancies WHERE resolved_at IS NULL")
    by_run: dict[int, list[asyncpg.Record]] = {}
    for d in found:
        by_run.setdefault(d["listed_run"], []).append(d)
    return web.json_response({
        "runs": [_run_json(r, by_run.get(r["id"], []), totals[r["id"]]) for r in runs],
        "open_discrepancies": open_count,
    })


@routes.get("/v1/reconciliation/runs/{id}/discrepancies")
async def run_discrepancies(request: web.Request) -> web.Response:
    """Every discrepancy a run found or found again, a page at a time in the order of their
    ids (`after` the last id of the page before)."""
    await auth.require(request, "reports:read")
    run_id = whole_number(request.match_info["id"])
    if run_id is None:
        raise NotFound("run_not_found", "no reconciliation run has this id")
    limit, after = _page_query(request)
    async with db.connection(request.app[POOL]) as conn:
        found = await conn.fetch(RUN_PAGE, run_id, after, limit + 1)
        if not found and not await conn.fetchval(
                "SELECT true FROM reconciliation_runs WHERE id = $1", run_id):
            raise NotFound("run_not_found", "no reconciliation run has this id")
    return web.json_response(_page_json(
        found, limit, f"/v1/reconciliation/runs/{run_id}/discrepancies", {}))


@routes.get("/v1/reconciliation/discrepancies")
async def list_discrepancies(request: web.Request) -> web.Response:
    """Discrepancies whichever run found them, by status (open unless told), a page at a time
    in the order of their ids."""
    await auth.require(request, "reports:read")
    status = request.query.get("status", "open")
    if status not in STATUSES:
        raise BadRequest("invalid_status", "status must be open, resolved or all",
                         field="status")
    limit, after = _page_query(request)
    async with db.connection(request.app[POOL]) as conn:
        found = await conn.fetch(DISCREPANCIES[status], after, limit + 1)
    return web.json_response(_page_json(found, limit, "/v1/reconciliation/discrepancies",
                                        {"status": status}))


@routes.post("/v1/reconciliation/discrepancies/{id}/acknowledge")
async def acknowledge(request: web.Request) -> web.Response:
    """Finance's word on an open discrepancy it has explained: resolved, with who and why; the
    same difference found again later is not opened again (a changed one is)."""
    token = await auth.require(request, "admin")
    discrepancy = whole_number(request.match_info["id"])
    if discrepancy is None:
        raise NotFound("discrepancy_not_found", "no discrepancy has this id")
    note = text(await read_json(request), "note", max_length=1000)
    assert note is not None  # required
    async with db.connection(request.app[POOL]) as conn:
        row = await conn.fetchrow(
            """
            UPDATE reconciliation_discrepancies
               SET resolved_at = now(), acknowledged_by = $2, acknowledged_note = $3
             WHERE id = $1 AND resolved_at IS NULL
            RETURNING *
            """,
            discrepancy, token.name, note,
        )
        if row is None:
            exists = await conn.fetchval(
                "SELECT true FROM reconciliation_discrepancies WHERE id = $1", discrepancy)
            if exists:
                raise Conflict("discrepancy_resolved", "this discrepancy is already resolved")
            raise NotFound("discrepancy_not_found", "no discrepancy has this id")
    log.info("discrepancy_acknowledged", discrepancy=row["id"], kind=row["kind"],
             by=token.name)
    return web.json_response(_discrepancy_json(row))
