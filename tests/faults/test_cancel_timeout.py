"""A RabbitMQ 4.3 consumer timeout with a store in flight: the broker cancels the consumer and
keeps the channel open; nothing is acked on it after the cancel, and a new channel consumes.

4.3 enforces the timeout per queue and on time, so this module runs on a private 4.3 node
whatever the session's broker (skipped locally without 4.3 prepared, failed in CI). It prints
its ledger.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Iterator

import pytest
from structlog.testing import capture_logs

from tests.faults.broker_node import BrokerNode
from tests.faults.ledger import tally
from tests.faults.test_broker import (
    private_node,
    worker_settings,
)
from tests.faults.test_cancel import CancelSpy, events, publish_after_cancel
from tests.integration.helpers import item, publish_items, wait_until
from worker.publisher import Publisher
from worker.service import Service
from worker.testing import StandIn, StandInConfig, StoreCall
from worker.topology import Topology

pytestmark = [pytest.mark.integration, pytest.mark.faults]

CONSUMER_TIMEOUT_MS = 1_000
SLOW_STORE_S = 4.0  # the slow item's first store: well past the consumer timeout


@pytest.fixture(scope="module")
def node() -> Iterator[BrokerNode]:
    """A private RabbitMQ 4.3 node for this module."""
    yield from private_node("4.3")


@pytest.fixture(scope="module")
def amqp_url(node: BrokerNode) -> str:
    """In this module every fixture (settings, teardown, `connection`) uses the private node."""
    return node.amqp_url


async def consumer_timeout_policy(node: BrokerNode, queue: str, timeout_ms: int) -> str:
    """Set a `consumer-timeout` policy on `queue`; return its name once the queue shows it."""
    name = f"mw-test-timeout-{uuid.uuid4().hex[:6]}"
    pattern = "^" + queue.replace(".", "\\.") + "$"
    definition = json.dumps({"consumer-timeout": timeout_ms})
    await node.ctl("set_policy", name, pattern, definition, "--apply-to", "queues")
    for _ in range(100):
        raw = await node.ctl("list_queues", "--no-table-headers", "name", "policy")
        if f"{queue}\t{name}" in raw.splitlines():
            return name
        await asyncio.sleep(0.1)
    raise AssertionError(f"policy {name} never applied to {queue}")


async def test_consumer_timeout_closes_the_channel_consumes_anew_and_stores_once(
    node, make_settings, connection, monkeypatch
):
    """4.3 consumer timeout on a slow store: nothing acked after the cancel, the channel closed,
    a new one consumes; every item stored once, none lost, none left unacked."""
    spy = CancelSpy(monkeypatch)
    # The worker's own x-consumer-timeout would win over the policy on 4.3; without it the
    # broker's timeout fires, as it does on 4.0-4.2 (which ignore the consumer's argument).
    monkeypatch.setattr(Topology, "consumer_arguments", lambda self: {})
    first, second = 300, 50
    slow_calls: list[StoreCall] = []

    async def on_store(call: StoreCall) -> None:
        if "the slow one" in call.content and not slow_calls:
            slow_calls.append(call)
            await asyncio.sleep(SLOW_STORE_S)

    async with StandIn(StandInConfig(latency_s=0.02)) as sb:
        sb.on_store = on_store
        settings = worker_settings(make_settings, node, sb)
        topology = Topology.from_settings(settings)
        await topology.declare(connection)
        async with Publisher(connection, topology) as publisher:
            # First in line, so the cancel comes while the others flow and acks are pending.
            await publisher.publish_item(item(0, content="the slow one"))
        await publish_items(connection, settings, first - 1, start=1)
        policy = await consumer_timeout_policy(node, topology.queue, CONSUMER_TIMEOUT_MS)
        try:
            with capture_logs() as logs:
                async with Service(settings) as service:
                    await wait_until(lambda: bool(events(logs, "consumer_reopened")), 30)
                    numbers = range(first, first + second)
                    after = await publish_after_cancel(
                        node, connection, service, sb, numbers, first + second
                    )
        finally:
            await node.ctl("clear_policy", policy)
        ledger = await tally(connection, settings, sb, first + second)
    [cancelled] = events(logs, "consumer_cancelled_by_broker")
    late_lines, late = events(logs, "settle_on_closed_channel"), after.late
    print(f"cancel: {cancelled}; late settlements: {late}; acks after it: {spy.settled_after}")
    assert len(spy.cancelled) == 1 and spy.settled_after == []
    assert after.cancels == 1 and after.ready
    assert len(after.prefetches) == 1  # one consumer, on the new channel
    assert after.unacked == 0
    assert late >= 1 and len(late_lines) == late  # the slow item's ack, at least, was dropped
    assert all(e["error"] == "consumer cancelled by the broker" for e in late_lines)
    assert ledger.lost == 0 and ledger.stored == first + second
    assert ledger.dead == 0 and ledger.still_queued == 0
    assert ledger.duplicates == 0  # redeliveries of stores in flight here were parked, not stored
