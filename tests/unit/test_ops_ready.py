"""memory_worker_ready mirrors the readiness /readyz answers with."""

from __future__ import annotations

from prometheus_client import generate_latest

from worker.metrics import Metrics
from worker.ops import OpsServer


def test_ready_gauge_follows_the_readiness_check() -> None:
    """The gauge reads the same check as /readyz at scrape time: 1 when ready, 0 when not."""
    metrics = Metrics(5)
    state = {"ready": True}
    OpsServer(metrics, lambda: state["ready"], "127.0.0.1", 0)
    assert "memory_worker_ready 1.0" in generate_latest(metrics.registry).decode()
    state["ready"] = False
    assert "memory_worker_ready 0.0" in generate_latest(metrics.registry).decode()
