"""Card-testing defence: checkout attempts counted per client network and overall, in PostgreSQL.

The counters live in PostgreSQL (table rate_limit_hits), so every replica sees the same counts: N
replicas enforce the configured limits, not N times them. Fixed windows of CHECKOUT_RATE_WINDOW
seconds; one upsert statement per attempt (for a valid checkout, the same statement claims its
Idempotency-Key: donations/checkout.py).
"""

from __future__ import annotations

import ipaddress

import asyncpg
from aiohttp import web

from donations.errors import TooManyRequests
from donations.metrics import Metrics
from donations.settings import Settings

OVERALL_BUCKET = "all"

# The overall counter only counts attempts the caller's own limit let through: one abusive
# network must not use up everyone's allowance. Both counts and the window's end come from the
# database clock, the one clock all replicas share. Parameters: $1 the caller's bucket, $2 the
# overall bucket, $3 the window in seconds, $4 the per-client limit (`arguments`). Checkout puts
# these CTEs and columns in the statement that also claims its Idempotency-Key.
COUNT_CTES = """
w AS (
    SELECT to_timestamp(floor(extract(epoch FROM clock_timestamp()) / $3) * $3) AS start
), ip AS (
    INSERT INTO rate_limit_hits AS h (bucket, window_start, hits)
    SELECT $1, w.start, 1 FROM w
    ON CONFLICT (bucket, window_start) DO UPDATE SET hits = h.hits + 1
    RETURNING h.hits
), overall AS (
    INSERT INTO rate_limit_hits AS h (bucket, window_start, hits)
    SELECT $2, w.start, 1 FROM w, ip WHERE ip.hits <= $4
    ON CONFLICT (bucket, window_start) DO UPDATE SET hits = h.hits + 1
    RETURNING h.hits
)"""
COUNT_COLUMNS = """
(SELECT hits FROM ip) AS ip_hits,
(SELECT hits FROM overall) AS overall_hits,
ceil(extract(epoch FROM (SELECT start FROM w) + make_interval(secs => $3)
                        - clock_timestamp()))::integer AS retry_after"""

# The statement is its own transaction, and does not wait for its WAL flush (synchronous_commit
# off until it ends): a count lost in a crash costs nothing, a flush waited for costs every
# checkout.
_HIT = f"""
WITH {COUNT_CTES}
SELECT set_config('synchronous_commit', 'off', true) AS async_commit, {COUNT_COLUMNS}
"""


def client_site(network: str) -> str | None:
    """The IPv6 /48 a client network (as `client_network` names it) lies in, named the same
    way; None for an IPv4 client or one not known."""
    if not network.startswith("ip:") or ":" not in network[3:]:
        return None
    try:
        within = ipaddress.IPv6Network(network[3:], strict=False)
    except ValueError:
        return None
    return f"ip:{within.supernet(new_prefix=48)}" if within.prefixlen >= 48 else None


def client_network(request: web.Request, proxy_hops: int) -> str:
    """Who is asking, as a rate-limit bucket: the client's IPv4 address or IPv6 /64.

    Behind `proxy_hops` trusted reverse proxies, the client is the address the outermost of them
    appended to X-Forwarded-For (entries further left are whatever the client claims). An IPv6
    client is counted by its /64, which one subscriber usually holds whole.
    """
    address = request.remote or ""
    if proxy_hops > 0:
        forwarded = [
            part.strip()
            for header in request.headers.getall("X-Forwarded-For", [])
            for part in header.split(",")
            if part.strip()
        ]
        if forwarded:
            address = forwarded[-min(proxy_hops, len(forwarded))]
    ip = _ip_of(address)
    if ip is None:
        return "ip:unknown"
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return f"ip:{ip.ipv4_mapped}"
        return f"ip:{ipaddress.IPv6Network((ip, 64), strict=False)}"
    return f"ip:{ip}"


def _ip_of(address: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """The address, also as some proxies write it with the client's port: `192.0.2.1:51234`,
    `[2001:db8::1]:443`."""
    candidates = [address.strip("[]")]
    if address.startswith("[") and "]:" in address:
        candidates.append(address[1:address.index("]:")])
    elif address.count(":") == 1:
        candidates.append(address.split(":", 1)[0])
    for candidate in candidates:
        try:
            return ipaddress.ip_address(candidate)
        except ValueError:
            continue
    return None


def arguments(settings: Settings, bucket: str) -> tuple[str, str, int, int]:
    """$1 to $4 of COUNT_CTES for an attempt from `bucket`."""
    return bucket, OVERALL_BUCKET, settings.checkout_rate_window, settings.checkout_rate_per_ip


async def hit(
    conn: asyncpg.Connection, settings: Settings, metrics: Metrics, bucket: str
) -> None:
    """Count one checkout attempt from `bucket` (a statement of its own: call it outside a
    transaction); 429 with Retry-After when over a limit."""
    row = await conn.fetchrow(_HIT, *arguments(settings, bucket))
    assert row is not None
    enforce(row, settings, metrics)


def enforce(row: asyncpg.Record, settings: Settings, metrics: Metrics) -> None:
    """429 with Retry-After when the counts of COUNT_COLUMNS in `row` are over a limit."""
    retry_after = str(max(1, int(row["retry_after"])))
    if row["ip_hits"] > settings.checkout_rate_per_ip:
        metrics.checkout_rate_limited.inc(limit="ip")
        raise TooManyRequests(
            "rate_limited", "too many checkout attempts from your network; try again later",
            headers={"Retry-After": retry_after},
        )
    if row["overall_hits"] > settings.checkout_rate_overall:
        metrics.checkout_rate_limited.inc(limit="overall")
        raise TooManyRequests(
            "rate_limited_overall", "too many checkouts are being started; try again shortly",
            headers={"Retry-After": retry_after},
        )


async def forget_old_windows(conn: asyncpg.Connection, window_seconds: int) -> int:
    """Delete the counters of windows that have ended; returns how many."""
    deleted = await conn.fetchval(
        """
        WITH gone AS (
            DELETE FROM rate_limit_hits
             WHERE window_start < now() - make_interval(secs => $1)
            RETURNING 1)
        SELECT count(*) FROM gone
        """,
        window_seconds,
    )
    return int(deleted or 0)
