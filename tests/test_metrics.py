"""The service's own instruments: Prometheus text, cumulative buckets, the per-request metrics."""

from __future__ import annotations

import json
import re

import asyncpg

from donations import db, store
from donations.events import parse_event
from donations.ingest import Outcome, ingest, retry_unfinished
from donations.ledger import FoundingOffer
from donations.metrics import _BUCKETS, Counter, Histogram, Metrics
from tests.conftest import Client, payments_refused
from tests.fakestripe.world import World
from tests.webhook_helpers import post_all


def _samples(lines: list[str], name: str) -> dict[str, float]:
    return {line.split(" ")[0]: float(line.split(" ")[1]) for line in lines
            if line.startswith(name)}


def test_histogram_buckets_are_cumulative_and_an_observation_on_a_bound_is_in_it() -> None:
    histogram = Histogram("h", "help")
    for value in (0.001, 0.005, 0.007, 0.3, 20.0):
        histogram.observe(value, route="/a")
    histogram.observe(0.02, route="/b")
    samples = _samples(histogram.render(), "h_")
    assert samples['h_bucket{route="/a",le="0.005"}'] == 2  # 0.005 itself is <= 0.005
    assert samples['h_bucket{route="/a",le="0.01"}'] == 3
    assert samples['h_bucket{route="/a",le="0.25"}'] == 3
    assert samples['h_bucket{route="/a",le="0.5"}'] == 4
    assert samples['h_bucket{route="/a",le="10.0"}'] == 4
    assert samples['h_bucket{route="/a",le="+Inf"}'] == 5
    assert samples['h_count{route="/a"}'] == 5
    assert samples['h_sum{route="/a"}'] == round(0.001 + 0.005 + 0.007 + 0.3 + 20.0, 6)
    assert samples['h_bucket{route="/b",le="0.01"}'] == 0
    assert samples['h_bucket{route="/b",le="0.025"}'] == 1
    counts = [samples[f'h_bucket{{route="/a",le="{b}"}}'] for b in _BUCKETS]
    assert counts == sorted(counts)


def test_a_request_is_counted_by_route_method_and_status_and_timed_by_route() -> None:
    metrics = Metrics()
    counter = Counter("donations_http_requests_total",
                      "HTTP requests by route, method and status.")
    histogram = Histogram("donations_http_request_duration_seconds",
                          "HTTP request latency by route.")
    answered = [("/v1/totals", "GET", 200, 0.001953125), ("/v1/totals", "GET", 304, 0.25),
                ("/v1/totals", "HEAD", 200, 0.005), ("/healthz", "GET", 200, 0.5),
                ("unmatched", "GET", 404, 12.0), ("/v1/totals", "GET", 200, 0.0078125)]
    for route, method, status, seconds in answered * 3:
        metrics.route_cells(route).add(method, status, seconds)
        counter.inc(route=route, method=method, status=str(status))
        histogram.observe(seconds, route=route)
    requests, latency = metrics.http_instruments()
    assert requests.render() == counter.render()
    assert latency.render() == histogram.render()
    lines = metrics.render()
    assert lines[:len(requests.render())] == requests.render()
    samples = _samples(lines, "donations_http_requests_total")
    assert samples['donations_http_requests_total{method="GET",route="/v1/totals",status="200"}'] \
        == 6


async def test_requests_show_in_the_metrics_by_route_method_and_status(client: Client) -> None:
    assert (await client.get("/healthz")).status == 200
    assert (await client.get("/healthz")).status == 200
    assert (await client.get("/no/such/path")).status == 404
    text = await (await client.get("/metrics")).text()
    assert 'donations_http_requests_total{method="GET",route="/healthz",status="200"} 2' in text
    assert 'donations_http_requests_total{method="GET",route="unmatched",status="404"} 1' in text
    count = re.search(r'donations_http_request_duration_seconds_count\{route="/healthz"\} (\d+)',
                      text)
    assert count is not None and int(count.group(1)) == 2


async def test_unusual_methods_are_counted_as_other(client: Client) -> None:
    # (the HTTP parser refuses made-up ones with 400 before the app; WebDAV's get through)
    for method in ("PROPFIND", "MKCOL", "LOCK"):
        response = await client.request(method, "/nowhere")
        assert response.status in (404, 405)
    text = await (await client.get("/metrics")).text()
    assert 'method="other"' in text
    assert "PROPFIND" not in text and "MKCOL" not in text


def test_counters_keep_every_digit_past_a_million() -> None:
    """Counters keep every digit: 1,234,567 is written as such (`{:g}` wrote 1.23457e+06, and the
    counter seemed to stand still)."""
    metrics = Metrics()
    cells = metrics.route_cells("/healthz")
    for _ in range(1_234_567):
        cells.add("GET", 200, 0.001)
    metrics.webhook_events.inc(1_234_567.0, type="charge.succeeded", outcome="processed")
    samples = dict(line.rsplit(" ", 1) for line in metrics.render() if not line.startswith("#"))
    assert samples['donations_http_requests_total{method="GET",route="/healthz",status="200"}'] \
        == "1234567"
    assert samples['donations_http_request_duration_seconds_count{route="/healthz"}'] == "1234567"
    assert samples[
        'donations_webhook_events_total{outcome="processed",type="charge.succeeded"}'] == "1234567"


async def test_the_stored_event_and_ledger_counts_are_kept_as_the_tables_change(
    client: Client, pool: asyncpg.Pool
) -> None:
    """/metrics reads the events by type and status and the contributions by currency and kind
    from counts that triggers keep (sql/025), not from the tables: through webhooks, refunds,
    an event that fails and is applied again, rows deleted, and their compaction, they stay
    what counting the tables says, and /metrics shows exactly that."""

    async def counted() -> tuple[set[tuple[str, str, int]], set[tuple[str, str, int, int]]]:
        events = {(r["type"], r["status"], r["n"]) for r in await pool.fetch(
            "SELECT type, status, count(*) AS n FROM stripe_events GROUP BY 1, 2")}
        ledger = {(r["currency"], r["kind"], r["n"], r["net"]) for r in await pool.fetch(
            "SELECT currency, kind, count(*) AS n,"
            "       sum(amount - amount_refunded - amount_disputed) AS net"
            "  FROM payments WHERE status = 'succeeded' GROUP BY 1, 2")}
        return events, ledger

    async def kept() -> tuple[set[tuple[str, str, int]], set[tuple[str, str, int, int]]]:
        return ({(r["type"], r["status"], r["n"]) for r in await pool.fetch(store.STORED_EVENTS)},
                {(r["currency"], r["kind"], r["n"], r["net"])
                 for r in await pool.fetch(store.LEDGER_CONTRIBUTIONS)})

    world = World(seed=31)
    paid = world.one_off(2500, "gbp")
    world.one_off(4000, "usd")
    world.subscribe(700, "eur")
    world.refund(paid.charge, 1000)
    await post_all(client, world.events)
    later = World(seed=32).one_off(900, "gbp").events
    async with payments_refused(pool):
        outcomes = [await ingest(pool, parse_event(e), json.dumps(e), FoundingOffer())
                    for e in later]
    assert Outcome.FAILED in outcomes
    assert await kept() == await counted()
    assert await retry_unfinished(pool, FoundingOffer())  # failed -> processed
    await pool.execute("DELETE FROM payments WHERE currency = 'usd'")
    await pool.execute("DELETE FROM stripe_events WHERE type = 'customer.created'")
    events, ledger = await counted()
    assert ("gbp", "one_off", 2, 2500 - 1000 + 900) in ledger
    assert await kept() == (events, ledger)

    async with db.connection(pool) as conn:
        while await store.compact_counts(conn, batch=3) > 0:
            pass
    assert await kept() == (events, ledger)
    assert await pool.fetchval("SELECT count(*) FROM stored_event_count_deltas") == 0
    assert await pool.fetchval("SELECT count(*) FROM ledger_count_deltas") == 0

    text = await (await client.get("/metrics")).text()
    shown = {line for line in text.splitlines() if line.startswith(
        ("donations_stored_events{", "donations_ledger_contributions{",
         "donations_ledger_net_minor_units{"))}
    assert shown == (
        {f'donations_stored_events{{status="{s}",type="{t}"}} {n}' for t, s, n in events}
        | {f'donations_ledger_contributions{{currency="{c}",kind="{k}"}} {n}'
           for c, k, n, _ in ledger}
        | {f'donations_ledger_net_minor_units{{currency="{c}",kind="{k}"}} {net}'
           for c, k, _, net in ledger})
