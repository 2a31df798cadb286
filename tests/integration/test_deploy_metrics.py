"""A running worker exports every metric, with every label, the dashboard and the alerts use."""

from __future__ import annotations

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.deploy_refs import used_worker_metrics
from tests.integration.helpers import publish_items, wait_until
from worker.publisher import Publisher
from worker.service import Service
from worker.testing import StandIn
from worker.topology import Topology

pytestmark = pytest.mark.integration


def _samples(text: str) -> dict[str, list[dict[str, str]]]:
    """Sample name -> the label sets it was exported with."""
    found: dict[str, list[dict[str, str]]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found.setdefault(sample.name, []).append(dict(sample.labels))
    return found


async def test_live_worker_exports_what_the_dashboard_and_rules_use(make_settings, connection):
    """Scrape a worker that stored, dead-lettered and met a failing ledger: every worker series
    the PromQL in deploy/ names is there, with the labels it selects and groups by."""
    async with StandIn() as sb:
        settings = make_settings(
            pools={"session_buddy_url": sb.url},
            worker={"ops_port": 0},
            # Nothing listens on port 1: each ledger call fails fast, the stores go on, and
            # memory_worker_ledger_errors_total gets its `op` label.
            ledger={"url": "redis://127.0.0.1:1/0"},
        )
        await publish_items(connection, settings, 3)
        async with Publisher(connection, Topology.from_settings(settings)) as publisher:
            await publisher.publish_raw(b"{not json", message_id="bad-1")
        async with Service(settings) as service, httpx.AsyncClient() as http:
            await wait_until(lambda: service.metrics.counts["ack"] == 3)
            await wait_until(lambda: service.metrics.counts["dead_letter"] == 1)
            text = (await http.get(f"http://127.0.0.1:{service.ops_port}/metrics")).text
    samples = _samples(text)
    used = used_worker_metrics()
    assert len(used) >= 12
    missing = sorted(name for name in used if name not in samples)
    assert not missing, f"used in deploy/ but not exported: {missing}"
    for name, labels in used.items():
        assert any(labels <= set(s) for s in samples[name]), (name, labels, samples[name])
    assert samples["memory_worker_ready"] == [{}]
    assert any(s.get("reason") == "invalid_json" for s in samples["memory_worker_messages_total"])
