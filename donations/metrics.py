"""Prometheus text exposition: counters and a latency histogram, kept in memory per process."""

from __future__ import annotations

from bisect import bisect_left
from collections import defaultdict
from dataclasses import dataclass, field

Labels = tuple[tuple[str, str], ...]

_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _number(value: float) -> str:
    """A sample value with every digit: a whole count as an integer (`{:g}` would write
    1234567 as 1.23457e+06, and the counter would seem to stand still)."""
    return str(int(value)) if value.is_integer() else repr(value)


def _labels(labels: Labels, extra: str = "") -> str:
    parts = [f'{k}="{_escape(v)}"' for k, v in labels]
    if extra:
        parts.append(extra)
    return "{" + ",".join(parts) + "}" if parts else ""


@dataclass
class Counter:
    name: str
    help: str
    values: dict[Labels, float] = field(default_factory=lambda: defaultdict(float))

    def inc(self, amount: float = 1.0, **labels: str) -> None:
        self.add(tuple(sorted(labels.items())), amount)

    def add(self, key: Labels, amount: float = 1.0) -> None:
        """`inc` with the labels already in their key's form (sorted by name)."""
        self.values[key] += amount

    def render(self) -> list[str]:
        lines = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} counter"]
        lines += [f"{self.name}{_labels(k)} {_number(v)}" for k, v in sorted(self.values.items())]
        return lines


@dataclass
class Histogram:
    name: str
    help: str
    # per label set, how many observations fell in each bucket alone (the last: above every
    # bound); rendered cumulative, as Prometheus has them
    counts: dict[Labels, list[int]] = field(default_factory=dict)
    sums: dict[Labels, float] = field(default_factory=lambda: defaultdict(float))

    def observe(self, value: float, **labels: str) -> None:
        key = tuple(sorted(labels.items()))
        buckets = self.counts.get(key)
        if buckets is None:
            buckets = self.counts[key] = [0] * (len(_BUCKETS) + 1)
        buckets[bisect_left(_BUCKETS, value)] += 1  # the first bound >= value
        self.sums[key] += value

    def render(self) -> list[str]:
        lines = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} histogram"]
        for key, buckets in sorted(self.counts.items()):
            cumulative = 0
            for bound, count in zip(_BUCKETS, buckets, strict=False):
                cumulative += count
                le = f'le="{bound}"'
                lines.append(f"{self.name}_bucket{_labels(key, le)} {cumulative}")
            total = cumulative + buckets[-1]
            inf = 'le="+Inf"'
            lines.append(f"{self.name}_bucket{_labels(key, inf)} {total}")
            lines.append(f"{self.name}_sum{_labels(key)} {self.sums[key]:.6f}")
            lines.append(f"{self.name}_count{_labels(key)} {total}")
        return lines


@dataclass(slots=True)
class RequestCell:
    """The requests of one (route, method, status): how many, their seconds, and how many fell in
    each latency bucket alone (the last: above every bound)."""

    count: int = 0
    seconds: float = 0.0
    buckets: list[int] = field(default_factory=lambda: [0] * (len(_BUCKETS) + 1))


@dataclass
class RouteCells:
    """One route's requests, by method and status."""

    by_method_status: dict[tuple[str, int], RequestCell] = field(default_factory=dict)

    def add(self, method: str, status: int, seconds: float) -> None:
        cell = self.by_method_status.get((method, status))
        if cell is None:
            cell = self.by_method_status[(method, status)] = RequestCell()
        cell.count += 1
        cell.seconds += seconds
        cell.buckets[bisect_left(_BUCKETS, seconds)] += 1  # the first bound >= seconds


@dataclass
class Metrics:
    """The service's own instruments; the ledger's figures are read from PostgreSQL per scrape."""

    webhook_events: Counter = field(default_factory=lambda: Counter(
        "donations_webhook_events_total", "Stripe webhook deliveries by event type and outcome."))
    balance_fetches: Counter = field(default_factory=lambda: Counter(
        "donations_balance_transaction_fetches_total",
        "Balance transaction look-ups at Stripe by outcome."))
    checkout_sessions: Counter = field(default_factory=lambda: Counter(
        "donations_checkout_sessions_total",
        "Checkout sessions created at Stripe by mode and founding discount."))
    checkout_rate_limited: Counter = field(default_factory=lambda: Counter(
        "donations_checkout_rate_limited_total",
        "Checkout attempts refused with 429, by the limit hit (ip or overall)."))
    stripe_errors: Counter = field(default_factory=lambda: Counter(
        "donations_stripe_errors_total",
        "Failed Stripe calls on a request's path, by operation and the code answered."))
    # Every HTTP request lands here, so it costs one look-up; rendered as the counter
    # donations_http_requests_total and the histogram donations_http_request_duration_seconds.
    routes: dict[str, RouteCells] = field(default_factory=dict)

    def route_cells(self, route: str) -> RouteCells:
        """The cells of one route's requests (a route's request context keeps them at hand)."""
        return self.routes.setdefault(route, RouteCells())

    def http_instruments(self) -> tuple[Counter, Histogram]:
        """The HTTP requests as Prometheus instruments."""
        requests = Counter("donations_http_requests_total",
                           "HTTP requests by route, method and status.")
        latency = Histogram("donations_http_request_duration_seconds",
                            "HTTP request latency by route.")
        for route, cells in self.routes.items():
            key = (("route", route),)
            for (method, status), cell in cells.by_method_status.items():
                requests.add((("method", method), ("route", route), ("status", str(status))),
                             cell.count)
                buckets = latency.counts.setdefault(key, [0] * (len(_BUCKETS) + 1))
                for i, count in enumerate(cell.buckets):
                    buckets[i] += count
                latency.sums[key] += cell.seconds
        return requests, latency

    def render(self) -> list[str]:
        lines: list[str] = []
        for instrument in (*self.http_instruments(), self.webhook_events, self.balance_fetches,
                           self.checkout_sessions, self.checkout_rate_limited,
                           self.stripe_errors):
            lines += instrument.render()
        return lines


def gauge(name: str, help_text: str, samples: list[tuple[Labels, int | float]]) -> list[str]:
    lines = [f"# HELP {name} {help_text}", f"# TYPE {name} gauge"]
    lines += [f"{name}{_labels(labels)} {value}" for labels, value in samples]
    return lines
