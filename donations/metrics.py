"""Prometheus text exposition: counters and a latency histogram, kept in memory per process."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

Labels = tuple[tuple[str, str], ...]

_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


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
        self.values[tuple(sorted(labels.items()))] += amount

    def render(self) -> list[str]:
        lines = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} counter"]
        lines += [f"{self.name}{_labels(k)} {v:g}" for k, v in sorted(self.values.items())]
        return lines


@dataclass
class Histogram:
    name: str
    help: str
    counts: dict[Labels, list[int]] = field(default_factory=dict)
    sums: dict[Labels, float] = field(default_factory=lambda: defaultdict(float))

    def observe(self, value: float, **labels: str) -> None:
        key = tuple(sorted(labels.items()))
        buckets = self.counts.setdefault(key, [0] * (len(_BUCKETS) + 1))
        for i, bound in enumerate(_BUCKETS):
            if value <= bound:
                buckets[i] += 1
        buckets[-1] += 1
        self.sums[key] += value

    def render(self) -> list[str]:
        lines = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} histogram"]
        for key, buckets in sorted(self.counts.items()):
            for bound, count in zip(_BUCKETS, buckets, strict=False):
                le = f'le="{bound}"'
                lines.append(f"{self.name}_bucket{_labels(key, le)} {count}")
            inf = 'le="+Inf"'
            lines.append(f"{self.name}_bucket{_labels(key, inf)} {buckets[-1]}")
            lines.append(f"{self.name}_sum{_labels(key)} {self.sums[key]:.6f}")
            lines.append(f"{self.name}_count{_labels(key)} {buckets[-1]}")
        return lines


@dataclass
class Metrics:
    """The service's own instruments; the ledger's figures are read from PostgreSQL per scrape."""

    requests: Counter = field(default_factory=lambda: Counter(
        "donations_http_requests_total", "HTTP requests by route, method and status."))
    request_seconds: Histogram = field(default_factory=lambda: Histogram(
        "donations_http_request_duration_seconds", "HTTP request latency by route."))
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

    def render(self) -> list[str]:
        lines: list[str] = []
        for instrument in (self.requests, self.request_seconds, self.webhook_events,
                           self.balance_fetches, self.checkout_sessions,
                           self.checkout_rate_limited, self.stripe_errors):
            lines += instrument.render()
        return lines


def gauge(name: str, help_text: str, samples: list[tuple[Labels, int | float]]) -> list[str]:
    lines = [f"# HELP {name} {help_text}", f"# TYPE {name} gauge"]
    lines += [f"{name}{_labels(labels)} {value}" for labels, value in samples]
    return lines
