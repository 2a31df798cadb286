"""The broker cancels the worker's consumer with stores in flight: nothing is acked after it.

A `basic.cancel` comes from a consumer timeout (RabbitMQ 4.3: per queue, on time, and the
channel stays open), a deleted queue, or the queue's node leaving. The worker stops settling
on that channel, closes it (the broker requeues what it held) and consumes on a new one. These
tests start a private node of their own (see `broker_node.py`); the consumer-timeout one needs
`MEMORY_WORKER_TEST_RABBITMQ=4.3`. Every test prints its ledger.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Iterator
from typing import Any

import aiormq
import pytest
from aiormq import spec
from structlog.testing import capture_logs

from tests.faults.broker_node import BrokerNode
from tests.faults.ledger import drained, tally
from tests.faults.test_broker import (
    consumer_prefetches,
    late_settlements,
    private_node,
    worker_settings,
)
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
    """A private RabbitMQ node for this module (see `test_broker.private_node`)."""
    yield from private_node()


@pytest.fixture(scope="module")
def amqp_url(node: BrokerNode) -> str:
    """In this module every fixture (settings, teardown, `connection`) uses the private node."""
    return node.amqp_url


class CancelSpy:
    """Records each aiormq channel the broker cancelled a consumer on, and acks sent after it."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.cancelled: list[aiormq.Channel] = []
        self.settled_after: list[tuple[str, int]] = []
        on_cancel_frame = aiormq.Channel._on_cancel_frame
        basic_ack, basic_reject = aiormq.Channel.basic_ack, aiormq.Channel.basic_reject
        spy = self

        async def cancel_frame(channel: aiormq.Channel, frame: Any) -> None:
            if isinstance(frame, spec.Basic.Cancel):  # the broker's, not our own cancel-ok
                spy.cancelled.append(channel)
            await on_cancel_frame(channel, frame)

        async def ack(channel: aiormq.Channel, tag: int, *args: Any, **kwargs: Any) -> None:
            spy._saw(channel, "ack", tag)
            await basic_ack(channel, tag, *args, **kwargs)

        async def reject(channel: aiormq.Channel, tag: int, *args: Any, **kwargs: Any) -> None:
            spy._saw(channel, "reject", tag)
            await basic_reject(channel, tag, *args, **kwargs)

        monkeypatch.setattr(aiormq.Channel, "_on_cancel_frame", cancel_frame)
        monkeypatch.setattr(aiormq.Channel, "basic_ack", ack)
        monkeypatch.setattr(aiormq.Channel, "basic_reject", reject)

    def _saw(self, channel: aiormq.Channel, frame: str, tag: int) -> None:
        if any(cancelled is channel for cancelled in self.cancelled):
            self.settled_after.append((frame, tag))


async def unacked_on_node(node: BrokerNode) -> int:
    """Deliveries unacked on every channel of the node (live, unlike a quorum queue's count)."""
    raw = await node.ctl("list_channels", "--no-table-headers", "messages_unacknowledged")
    return sum(int(count) for count in raw.split())


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


def events(logs: list[dict[str, Any]], name: str) -> list[dict[str, Any]]:
    """The captured log events called `name`."""
    return [e for e in logs if e["event"] == name]


async def test_consumer_timeout_closes_the_channel_consumes_anew_and_stores_once(
    node, make_settings, connection, monkeypatch
):
    """4.3 consumer timeout on a slow store: nothing acked after the cancel, the channel closed,
    a new one consumes; every item stored once, none lost, none left unacked."""
    if node.install.version != "4.3":
        pytest.skip("a per-queue consumer timeout that cancels the consumer is RabbitMQ 4.3's")
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
                    # Published after the cancel: with a late ack re-activating the cancelled
                    # consumer, these would go to a tag the client dropped and sit unacked.
                    async with Publisher(connection, topology) as publisher:
                        for n in range(first, first + second):
                            await publisher.publish_item(item(n))
                    await wait_until(lambda: sb.stats.distinct_keys == first + second, 60)
                    await drained(connection, settings, sb)
                    unacked = await unacked_on_node(node)
                    prefetches = await consumer_prefetches(node, topology.queue)
                    cancels = service.metrics.registry.get_sample_value(
                        "memory_worker_consumer_cancels_total"
                    )
                    ready, late = service.ready, late_settlements(service)
        finally:
            await node.ctl("clear_policy", policy)
        ledger = await tally(connection, settings, sb, first + second)
    [cancelled] = events(logs, "consumer_cancelled_by_broker")
    late_lines = events(logs, "settle_on_closed_channel")
    print(f"cancel: {cancelled}; late settlements: {late}; acks after it: {spy.settled_after}")
    assert len(spy.cancelled) == 1 and spy.settled_after == []
    assert cancels == 1 and ready
    assert len(prefetches) == 1  # one consumer, on the new channel
    assert unacked == 0
    assert late >= 1 and len(late_lines) == late  # the slow item's ack, at least, was dropped
    assert all(e["error"] == "consumer cancelled by the broker" for e in late_lines)
    assert ledger.lost == 0 and ledger.stored == first + second
    assert ledger.dead == 0 and ledger.still_queued == 0
    assert ledger.duplicates == 0  # redeliveries of stores in flight here were parked, not stored


async def test_queue_deleted_with_stores_in_flight_acks_nothing_after_the_cancel(
    node, make_settings, connection, monkeypatch
):
    """Work queue deleted mid-store: no ack on that channel after the cancel, late settlements
    counted, a new channel consumes; the next items are all stored once."""
    spy = CancelSpy(monkeypatch)
    first, second = 100, 100
    async with StandIn(StandInConfig(latency_s=0.3)) as sb:
        settings = worker_settings(make_settings, node, sb)
        topology = Topology.from_settings(settings)
        await publish_items(connection, settings, first)
        with capture_logs() as logs:
            async with Service(settings) as service:
                await wait_until(lambda: sb.stats.distinct_keys >= 10 and sb.stats.in_flight == 5)
                async with connection.channel() as channel:
                    await channel.queue_delete(topology.queue)  # its ready messages go with it
                await wait_until(lambda: bool(events(logs, "consumer_reopened")), 30)
                await wait_until(lambda: sb.stats.in_flight == 0)
                stored_first = sb.stats.distinct_keys
                sb.config.latency_s = 0.01
                async with Publisher(connection, topology) as publisher:
                    for n in range(first, first + second):
                        await publisher.publish_item(item(n))
                await wait_until(lambda: sb.stats.distinct_keys == stored_first + second, 60)
                await drained(connection, settings, sb)
                unacked = await unacked_on_node(node)
                prefetches = await consumer_prefetches(node, topology.queue)
                cancels = service.metrics.registry.get_sample_value(
                    "memory_worker_consumer_cancels_total"
                )
                ready, late = service.ready, late_settlements(service)
        ledger = await tally(connection, settings, sb, stored_first + second)
    [cancelled] = events(logs, "consumer_cancelled_by_broker")
    print(f"cancel: {cancelled}; late settlements: {late}; acks after it: {spy.settled_after}")
    assert len(spy.cancelled) == 1 and spy.settled_after == []
    assert cancelled["in_flight"] >= 1
    assert cancels == 1 and ready
    assert len(prefetches) == 1 and unacked == 0
    assert late >= 1 and len(events(logs, "settle_on_closed_channel")) == late
    assert ledger.stored == stored_first + second and ledger.duplicates == 0
    assert ledger.dead == 0 and ledger.still_queued == 0
