"""The broker cancels the worker's consumer: the worker says so and consumes again."""

from __future__ import annotations

import pytest
from structlog.testing import capture_logs

from tests.integration.helpers import publish_items, wait_until
from worker.service import Service
from worker.testing import StandIn, StandInConfig
from worker.topology import Topology

pytestmark = pytest.mark.integration


async def test_deleted_queue_without_declare_is_awaited_then_consumed(make_settings, connection):
    """declare off and the queue deleted: not ready, failures logged with backoff, then resumes."""
    async with StandIn(StandInConfig(latency_s=0.01)) as sb:
        settings = make_settings(rabbitmq={"declare": False}, pools={"session_buddy_url": sb.url})
        topology = Topology.from_settings(settings)
        await publish_items(connection, settings, 10)  # declares, as an operator would
        with capture_logs() as logs:

            def events(name: str) -> list[dict[str, object]]:
                return [e for e in logs if e["event"] == name]

            async with Service(settings) as service:
                await wait_until(lambda: sb.stats.distinct_keys == 10)
                async with connection.channel() as channel:
                    await channel.queue_delete(topology.queue)
                await wait_until(lambda: len(events("consumer_recovery_failed")) >= 2)
                ready_while_lost = service.ready
                await topology.declare(connection)  # the operator brings it back
                # aio-pika may re-consume by itself once the queue is back, or the worker does.
                back = ("consumer_restored", "consumer_reopened")
                await wait_until(lambda: any(events(name) for name in back))
                await publish_items(connection, settings, 10, start=10)
                await wait_until(lambda: sb.stats.distinct_keys == 20)
                ready_after = service.ready
    [cancelled] = events("consumer_cancelled_by_broker")
    failures = events("consumer_recovery_failed")
    assert cancelled["queue"] == topology.queue
    assert failures[0]["error"] == f"queue {topology.queue!r} does not exist"
    assert failures[0]["redeclare"] is False
    assert failures[0]["retry_in_s"] < failures[1]["retry_in_s"]  # backs off
    assert not ready_while_lost and ready_after
    assert sb.stats.duplicates == 0
