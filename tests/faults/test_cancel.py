"""The broker cancels the worker's consumer with stores in flight: nothing is acked after it.

A `basic.cancel` comes from a consumer timeout (RabbitMQ 4.3: per queue, on time, and the
channel stays open), a deleted queue, or the queue's node leaving. The worker stops settling
on that channel, closes it (the broker requeues what it held) and consumes on a new one. These
tests start a private node of their own (see `broker_node.py`); the consumer timeout, which
only 4.3 enforces per queue, is in `test_cancel_timeout.py`. Every test prints its ledger.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
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
from worker.testing import StandIn, StandInConfig
from worker.topology import Topology

pytestmark = [pytest.mark.integration, pytest.mark.faults]


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


def events(logs: list[dict[str, Any]], name: str) -> list[dict[str, Any]]:
    """The captured log events called `name`."""
    return [e for e in logs if e["event"] == name]


@dataclass
class AfterCancel:
    """What the broker and the worker show once the items published after a cancel are stored."""

    unacked: int
    prefetches: list[int]
    cancels: float | None
    ready: bool
    late: float


async def publish_after_cancel(
    node: BrokerNode, connection: Any, service: Service, sb: StandIn, numbers: range, stored: int
) -> AfterCancel:
    """Publish `numbers` for the new consumer, wait until `stored` distinct items are stored and
    the queues drained; with a late ack re-activating the cancelled consumer, these would go to
    a tag the client dropped and sit unacked."""
    settings = service.settings
    async with Publisher(connection, Topology.from_settings(settings)) as publisher:
        for n in numbers:
            await publisher.publish_item(item(n))
    await wait_until(lambda: sb.stats.distinct_keys == stored, 60)
    await drained(connection, settings, sb)
    return AfterCancel(
        unacked=await unacked_on_node(node),
        prefetches=await consumer_prefetches(node, settings.rabbitmq.queue),
        cancels=service.metrics.registry.get_sample_value("memory_worker_consumer_cancels_total"),
        ready=service.ready,
        late=late_settlements(service),
    )


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
                numbers = range(first, first + second)
                after = await publish_after_cancel(
                    node, connection, service, sb, numbers, stored_first + second
                )
        ledger = await tally(connection, settings, sb, stored_first + second)
    [cancelled] = events(logs, "consumer_cancelled_by_broker")
    late = after.late
    print(f"cancel: {cancelled}; late settlements: {late}; acks after it: {spy.settled_after}")
    assert len(spy.cancelled) == 1 and spy.settled_after == []
    assert cancelled["in_flight"] >= 1
    assert after.cancels == 1 and after.ready
    assert len(after.prefetches) == 1 and after.unacked == 0
    assert late >= 1 and len(events(logs, "settle_on_closed_channel")) == late
    assert ledger.stored == stored_first + second and ledger.duplicates == 0
    assert ledger.dead == 0 and ledger.still_queued == 0
