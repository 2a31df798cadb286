"""ACT-008's insertion metrics, and the Prometheus registry that backs the ops endpoint.

ACT-008 timed whole batches. A streaming worker has no batches, so a "batch" here is a busy
period: from the moment an insert starts while none was running until none is running again.
`total_insertion_time_seconds` is the sum of busy periods, which keeps ACT-008's throughput
and per-item latency formulas meaningful for both the worker and the in-process library.
"""

from __future__ import annotations

import time
from collections import Counter as Tally
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    PlatformCollector,
    ProcessCollector,
)

LATENCY_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


class Metrics:
    """Counters for one worker process or one library user."""

    def __init__(self, max_concurrent_insertions: int) -> None:
        self.max_concurrent_insertions = max_concurrent_insertions
        self.registry = CollectorRegistry(auto_describe=True)
        # process_* (RSS, CPU seconds, open fds; Linux only) to size a container from.
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        self.messages = Counter(
            "memory_worker_messages",
            "Deliveries settled, by outcome, action and dead-letter reason.",
            ["outcome", "action", "reason"],
            registry=self.registry,
        )
        self.sink_latency = Histogram(
            "memory_worker_sink_latency_seconds",
            "Time of one store call to the sink.",
            buckets=LATENCY_BUCKETS_S,
            registry=self.registry,
        )
        self.in_flight_gauge = Gauge(
            "memory_worker_in_flight", "Inserts running now.", registry=self.registry
        )
        # Read at scrape time rather than set twice per insert: the same value, less work.
        self.in_flight_gauge.set_function(lambda: self.in_flight)
        self.limit_gauge = Gauge(
            "memory_worker_concurrency_limit", "Current concurrency limit.", registry=self.registry
        )
        self.ready_gauge = Gauge(
            "memory_worker_ready",
            "1 while /readyz answers 200 (consuming, breaker not open), else 0.",
            registry=self.registry,
        )
        self.sink_pauses = Counter(
            "memory_worker_sink_pauses",
            "Times the sink's Retry-After paused every store to it.",
            registry=self.registry,
        )
        self.late_acks = Counter(
            "memory_worker_late_settlements",
            "Settlements on a channel that had closed; the broker redelivers those messages.",
            registry=self.registry,
        )
        self.breaker_state = Gauge(
            "memory_worker_breaker_state",
            "The sink's circuit breaker: 0 closed, 1 half-open, 2 open.",
            registry=self.registry,
        )
        self.breaker_transitions = Counter(
            "memory_worker_breaker_transitions",
            "Circuit breaker transitions, by the state entered.",
            ["state"],
            registry=self.registry,
        )
        self.resubscriptions = Counter(
            "memory_worker_consumer_resubscriptions",
            "Times the consumer subscribed again (breaker resume or probe, broker cancel).",
            registry=self.registry,
        )
        # No reason label: a broker's basic.cancel does not say why (a consumer timeout, the
        # queue deleted, its node leaving); the worker's log line has the context.
        self.consumer_cancels = Counter(
            "memory_worker_consumer_cancels",
            "Times the broker cancelled the consumer; each closes its channel and consumes anew.",
            registry=self.registry,
        )
        self.ledger_duplicates = Counter(
            "memory_worker_ledger_duplicates",
            "Deliveries acked without a store because the shared ledger says stored.",
            registry=self.registry,
        )
        self.ledger_deferred = Counter(
            "memory_worker_ledger_deferred",
            "Deliveries put off because another worker's store of the same item is in flight.",
            registry=self.registry,
        )
        self.ledger_errors = Counter(
            "memory_worker_ledger_errors",
            "Shared ledger calls that failed or timed out, by operation; stores went on anyway.",
            ["op"],
            registry=self.registry,
        )
        self.limit_gauge.set(max_concurrent_insertions)
        self.counts: Tally[str] = Tally()
        # labels() costs more than the increment; the label sets are few, so keep their children.
        self._settled: dict[tuple[str, str, str], tuple[Counter, str]] = {}
        self.in_flight = 0
        self.reset_metrics()

    def reset_metrics(self) -> None:
        """Zero ACT-008's counters (Prometheus counters stay monotonic by design)."""
        self.total_items_inserted = 0
        self.errors = 0
        self.batches_processed = 0
        self._busy_s = 0.0
        self._busy_since: float | None = time.perf_counter() if self.in_flight else None

    def insert_started(self) -> None:
        """An insert begins; opens a busy period if none was running."""
        if self.in_flight == 0:
            self._busy_since = time.perf_counter()
        self.in_flight += 1

    def insert_finished(self, stored: bool, latency_s: float, error: bool = True) -> None:
        """An insert ends; closes the busy period when it was the last one running.

        `error=False` for an insert a shutdown cut short: ACT-008's `errors` counts failures,
        and such an item is requeued, not failed.
        """
        self.in_flight -= 1
        if stored:
            self.total_items_inserted += 1
        elif error:
            self.errors += 1
        if error or stored:
            self.sink_latency.observe(latency_s)
        if self.in_flight == 0 and self._busy_since is not None:
            self._busy_s += time.perf_counter() - self._busy_since
            self._busy_since = None
            self.batches_processed += 1

    def settled(self, outcome: str, action: str, reason: str = "") -> None:
        """Count one settled delivery."""
        labels = (outcome, action, reason)
        cached = self._settled.get(labels)
        if cached is None:
            cached = self._settled[labels] = (self.messages.labels(*labels), f"outcome:{outcome}")
        child, outcome_key = cached
        child.inc()
        self.counts[action] += 1
        self.counts[outcome_key] += 1

    def get_insertion_metrics(self) -> dict[str, Any]:
        """ACT-008's metrics dict, with exactly its keys."""
        total_s = self._busy_s
        if self._busy_since is not None:
            total_s += time.perf_counter() - self._busy_since
        items = self.total_items_inserted
        return {
            "total_items_inserted": items,
            "total_insertion_time_seconds": total_s,
            "batches_processed": self.batches_processed,
            "errors": self.errors,
            "average_throughput_items_per_sec": items / total_s if total_s > 0 else 0.0,
            "average_latency_seconds_per_item": total_s / items if items else 0.0,
            "max_concurrent_insertions": self.max_concurrent_insertions,
        }
