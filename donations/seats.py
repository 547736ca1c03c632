"""Founding-supporter seats: held per subscription checkout before Stripe is asked, never oversold.

A seat is *taken* by a founding subscription (the ledger's `subscriptions.founding`, however it
came: through a hold or not; a seat is not given back when the subscription ends, only when it
never started: `incomplete_expired`, sql/029) or by the subscription of a held session that
completed before the subscription's own events arrived. A
seat is *held* by a hold whose session is open, or not yet known to us, until the session's
expiry plus a grace for a late `checkout.session.expired`. Seats left = seats - taken - held.

Holds are taken one at a time under a transaction-scoped advisory lock, counting after the lock
is granted, so concurrent checkouts cannot each see the same last seat. The counts are the view
`founding_seat_counts` and the hold is the function `founding_seat_hold` (sql/007): one round trip,
the lock held only inside PostgreSQL.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from time import monotonic

import asyncpg

# A session that expired without our hearing of it (a lost or late webhook) keeps its seat this
# much longer; a seat held a little too long costs nothing, one sold twice costs a promise.
HOLD_GRACE = timedelta(hours=1)
LOCK_KEY = "donations:founding_seats"  # the advisory lock founding_seat_hold takes
# Seats one client network (checkout's rate-limit bucket) may hold at once: a reader may start
# again after leaving a checkout; a script starting checkouts it never pays takes two seats, not
# the offer (sql/022). Beyond it, full price, as when no seat is free.
HOLDS_PER_CLIENT = 2
# Seats one IPv6 /48 (a site: see ratelimit.client_site) may hold at once, whatever its /64s: a
# household or an office gets a /48 or less, a tunnel broker hands one to anyone (sql/034).
HOLDS_PER_SITE = 20
# How long a process believes "every seat is taken" without asking again: a taken seat can come
# back (its subscription never started, sql/029), so this is only a shortcut that spares a sold-out
# offer's checkouts the queue on the lock, and it lapses. Seconds, on the monotonic clock.
FULL_FOR = 30.0


class FoundingSeats:
    """The offer's seats for one process: `seats` from FOUNDING_SEATS, redeemed at Stripe through
    the coupon `coupon_id`."""

    def __init__(self, seats: int, coupon_id: str = "founding-supporter") -> None:
        self.seats = seats
        self.coupon_id = coupon_id
        # Closed for good: no seats at all, or Stripe said the coupon is used up (that never
        # changes back, so later checkouts need not queue on the lock to learn it).
        self._closed = seats <= 0
        # Every seat taken when last counted: believed until this moment (monotonic) and then
        # counted again, since a seat whose subscription never started is given back (sql/029).
        self._full_until: float | None = None

    def _sold_out(self) -> bool:
        if self._closed:
            return True
        if self._full_until is not None and monotonic() < self._full_until:
            return True
        self._full_until = None
        return False

    def _counted(self, taken: int) -> None:
        """What a count (under the lock or not) says of the seats taken: full, for FULL_FOR."""
        self._full_until = monotonic() + FULL_FOR if taken >= self.seats else None

    async def hold(
        self, conn: asyncpg.Connection, until: datetime, client: str | None = None,
        site: str | None = None,
    ) -> int | None:
        """Hold a seat until `until` for `client` (a network, as checkout's rate limits name it)
        of `site` (its IPv6 /48, if any); None when none is left, the client already holds
        HOLDS_PER_CLIENT or its site HOLDS_PER_SITE. In the caller's
        transaction, or outside one as a statement of its own: then the hold is committed
        (waiting for its WAL flush: a hold lost in a crash could sell its seat twice) when this
        returns."""
        if self._sold_out():
            return None
        row = await conn.fetchrow(
            "SELECT hold_id, taken, closed FROM founding_seat_hold($1, $2, $3, $4, $5, $6, $7)",
            self.seats, until, client, HOLDS_PER_CLIENT, self.coupon_id, site, HOLDS_PER_SITE)
        assert row is not None
        if row["closed"]:
            self._closed = True
        self._counted(int(row["taken"]))
        hold_id: int | None = row["hold_id"]
        return hold_id

    async def left(self, conn: asyncpg.Connection) -> int:
        """Seats neither taken nor held now (for display: a checkout decides under the lock).
        Counted each time (no lock is waited for) until the offer is closed for good; what the
        count says of the seats taken serves the next checkouts' shortcut too."""
        if self._closed:
            return 0
        row = await conn.fetchrow(
            """
            SELECT taken, held,
                   EXISTS (SELECT 1 FROM founding_coupons_used_up WHERE coupon_id = $1) AS used_up
              FROM founding_seat_counts
            """,
            self.coupon_id,
        )
        assert row is not None
        if row["used_up"]:
            self._closed = True
            return 0
        self._counted(int(row["taken"]))
        return max(0, self.seats - int(row["taken"]) - int(row["held"]))

    async def used_up_at_stripe(self, conn: asyncpg.Connection) -> None:
        """Stripe refused the coupon as used up: the offer is over, for every replica (they read
        it in `left`) and the public totals."""
        self._closed = True
        await conn.execute(
            "INSERT INTO founding_coupons_used_up (coupon_id) VALUES ($1) ON CONFLICT DO NOTHING",
            self.coupon_id,
        )


async def release(conn: asyncpg.Connection, hold_id: int) -> None:
    """Give the seat back at once: no session was made for it."""
    await conn.execute("DELETE FROM founding_holds WHERE id = $1", hold_id)


async def forget_lapsed(conn: asyncpg.Connection, older_than: timedelta) -> int:
    """Delete holds that lapsed long ago without their session completing (those that completed
    are kept: they count their subscription as taken until its own events arrive)."""
    deleted = await conn.fetchval(
        """
        WITH gone AS (
            DELETE FROM founding_holds h
             WHERE h.expires_at < now() - $1::interval
               AND NOT EXISTS (SELECT 1 FROM stripe_objects o
                                WHERE o.id = h.checkout_session
                                  AND o.data->>'status' = 'complete')
            RETURNING 1)
        SELECT count(*) FROM gone
        """,
        older_than,
    )
    return int(deleted or 0)
