"""The workers a console watches: found in the management API or listed, read from /metrics.

Each worker advertises its ops URL and queue in its AMQP connection's client properties
(`worker.broker.advertise`), which `GET /api/connections` lists; `console.workers` adds URLs
by hand where there is no management API. A worker's rates and latency percentiles are the
differences between two reads of its counters and histogram, so they describe the last poll.
"""

from __future__ import annotations

import bisect
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

from worker.broker import OPS_URL_PROPERTY, QUEUE_PROPERTY

BREAKER_STATES = {0: "closed", 1: "half-open", 2: "open"}
LATENCY = "memory_worker_sink_latency_seconds"


def advertised(connections: Any, queue: str, vhost: str | None = None) -> list[str]:
    """Ops URLs in the management API's connections that consume `queue` (in `vhost` where
    given: one broker may serve several environments under the same queue name), sorted,
    once each."""
    urls: set[str] = set()
    for connection in connections if isinstance(connections, list) else []:
        if not isinstance(connection, dict):
            continue
        props = connection.get("client_properties")
        if not isinstance(props, Mapping) or props.get(QUEUE_PROPERTY) != queue:
            continue
        if vhost is not None and connection.get("vhost", vhost) != vhost:
            continue
        url = props.get(OPS_URL_PROPERTY)
        if isinstance(url, str) and url.startswith(("http://", "https://")):
            urls.add(url.rstrip("/"))
    return sorted(urls)


@dataclass(frozen=True, slots=True)
class Reading:
    """One read of a worker's /metrics: the counters a rate or percentile needs."""

    at_s: float
    stored: float
    buckets: tuple[tuple[float, float], ...]  # (upper bound, cumulative count), ascending
    in_flight: float
    limit: float
    breaker: int
    ready: bool


def parse_metrics(text: str, at_s: float) -> Reading:
    """The worker metrics the console shows, from Prometheus text exposition."""
    stored = in_flight = limit = 0.0
    breaker, ready = 0, False
    buckets: list[tuple[float, float]] = []
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            name, value = sample.name, sample.value
            if name == "memory_worker_messages_total" and sample.labels.get("outcome") == "stored":
                stored += value
            elif name == f"{LATENCY}_bucket":
                buckets.append((float(sample.labels["le"]), value))
            elif name == "memory_worker_in_flight":
                in_flight = value
            elif name == "memory_worker_concurrency_limit":
                limit = value
            elif name == "memory_worker_breaker_state":
                breaker = int(value)
            elif name == "memory_worker_ready":
                ready = value == 1.0
    return Reading(at_s, stored, tuple(sorted(buckets)), in_flight, limit, breaker, ready)


def quantile(buckets: tuple[tuple[float, float], ...], q: float) -> float | None:
    """The `q` quantile of a cumulative histogram, interpolated within its bucket (Prometheus)."""
    if not buckets or buckets[-1][1] <= 0:
        return None
    rank = q * buckets[-1][1]
    counts = [count for _, count in buckets]
    i = bisect.bisect_left(counts, rank)
    upper, count = buckets[min(i, len(buckets) - 1)]
    if upper == float("inf"):
        return buckets[i - 1][0] if i > 0 else None
    lower, below = (0.0, 0.0) if i == 0 else buckets[i - 1]
    inside = count - below
    return upper if inside <= 0 else lower + (upper - lower) * (rank - below) / inside


def _delta(now: Reading, then: Reading | None) -> tuple[tuple[float, float], ...]:
    if then is None or len(then.buckets) != len(now.buckets):
        return now.buckets
    diff = tuple((b, c - p) for (b, c), (_, p) in zip(now.buckets, then.buckets, strict=True))
    # Nothing stored since the last read: the whole history says more than an empty window.
    return diff if diff and diff[-1][1] > 0 else now.buckets


@dataclass(frozen=True, slots=True)
class WorkerView:
    """A worker as the overview shows it."""

    url: str
    error: str | None = None
    stores_per_s: float | None = None
    p50_ms: float | None = None
    p95_ms: float | None = None
    in_flight: int = 0
    limit: int = 0
    breaker: str = "-"
    ready: bool = False


def view(url: str, now: Reading, then: Reading | None) -> WorkerView:
    """What the overview shows of one worker, from its last two readings."""
    rate = None
    if then is not None and now.at_s > then.at_s:
        rate = max(0.0, now.stored - then.stored) / (now.at_s - then.at_s)
    window = _delta(now, then)
    p50, p95 = quantile(window, 0.5), quantile(window, 0.95)
    return WorkerView(
        url=url,
        stores_per_s=rate,
        p50_ms=None if p50 is None else p50 * 1000,
        p95_ms=None if p95 is None else p95 * 1000,
        in_flight=int(now.in_flight),
        limit=int(now.limit),
        breaker=BREAKER_STATES.get(now.breaker, str(now.breaker)),
        ready=now.ready,
    )


@dataclass
class Workers:
    """The last reading of each worker, so the next one yields rates."""

    readings: dict[str, Reading] = field(default_factory=dict)
    views: list[WorkerView] = field(default_factory=list)

    async def poll(self, client: httpx.AsyncClient, urls: list[str], at_s: float) -> None:
        """Read every worker's /metrics once; a worker that does not answer says why."""
        views: list[WorkerView] = []
        for url in urls:
            try:
                response = await client.get(f"{url}/metrics")
                response.raise_for_status()
                reading = parse_metrics(response.text, at_s)
            except (httpx.HTTPError, ValueError) as exc:
                views.append(WorkerView(url=url, error=type(exc).__name__))
                continue
            views.append(view(url, reading, self.readings.get(url)))
            self.readings[url] = reading
        self.views = views

    @property
    def breaker_open(self) -> bool:
        """Whether any watched worker's breaker is open (a replay waits then)."""
        return any(v.breaker == "open" for v in self.views)
