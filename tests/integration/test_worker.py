"""The worker end to end: a real RabbitMQ, the stand-in Session-Buddy on loopback."""

from __future__ import annotations

import asyncio
import signal

import httpx
import pytest

from tests.integration.helpers import (
    depth,
    publish_items,
    start_worker_process,
    take_all,
    wait_until,
    worker_env,
)
from worker.exitcodes import EXIT_CONFIG
from worker.headers import H_ATTEMPTS, H_DETAIL, H_REASON
from worker.outcome import Reason
from worker.publisher import Publisher
from worker.service import Service
from worker.testing import StandIn, StandInConfig
from worker.topology import Topology

pytestmark = pytest.mark.integration


async def test_items_are_stored_then_acked(make_settings, connection):
    """Every published item is stored once and leaves the queue; nothing is dead-lettered."""
    async with StandIn(StandInConfig(latency_s=0.01)) as sb:
        settings = make_settings(pools={"session_buddy_url": sb.url})
        keys = await publish_items(connection, settings, 60)
        async with Service(settings) as service:
            await wait_until(lambda: sb.stats.distinct_keys == 60)
            await wait_until(lambda: service.metrics.counts["ack"] == 60)
        assert {row["source_session_id"] for row in sb.items} == set(keys)
        assert sb.stats.duplicates == 0
        assert sb.stats.peak_in_flight <= settings.concurrency
    assert await depth(connection, settings.rabbitmq.queue) == 0
    assert await depth(connection, settings.rabbitmq.dead_letter_queue) == 0


async def test_stored_item_carries_mapped_tags_and_project(make_settings, connection):
    """Metadata becomes tags, the pool becomes the project, the key the source session id."""
    async with StandIn() as sb:
        settings = make_settings(pools={"session_buddy_url": sb.url})
        [key] = await publish_items(connection, settings, 1)
        async with Service(settings):
            await wait_until(lambda: sb.stats.stored == 1)
        row = sb.items[0]
        assert row["project"] == "pool-1"
        assert row["source_session_id"] == key
        assert "pool_id:pool-1" in row["tags"] and "status:completed" in row["tags"]


async def test_permanent_rejection_is_dead_lettered_with_sink_text(make_settings, connection):
    """A sink rejection goes to the DLQ at once, with the sink's own words."""
    async with StandIn(StandInConfig(reject=1.0)) as sb:
        settings = make_settings(pools={"session_buddy_url": sb.url})
        await publish_items(connection, settings, 3)
        async with Service(settings) as service:
            await wait_until(lambda: service.metrics.counts["dead_letter"] == 3)
    dead = await take_all(connection, settings.rabbitmq.dead_letter_queue)
    assert len(dead) == 3
    for message in dead:
        assert message.headers[H_REASON] == Reason.REJECTED_BY_SINK
        assert "Memory guard blocked write" in str(message.headers[H_DETAIL])
        assert message.headers[H_ATTEMPTS] == 1


async def test_transient_failures_are_retried_then_stored(make_settings, connection):
    """503s are retried through the delay queues and every item is stored after recovery."""
    async with StandIn(StandInConfig(error_503=1.0)) as sb:
        # The breaker off: a 100% 503 storm is systemic and would pause (test_breaker.py).
        settings = make_settings(pools={"session_buddy_url": sb.url}, sink={"breaker_failures": 0})
        await publish_items(connection, settings, 20)
        async with Service(settings) as service:
            await wait_until(lambda: sb.stats.faults.get("error_503", 0) >= 30)
            sb.config.error_503 = 0.0
            await wait_until(lambda: sb.stats.distinct_keys == 20)
            assert service.metrics.counts["retry"] >= 30
    assert await depth(connection, settings.rabbitmq.dead_letter_queue) == 0
    assert await depth(connection, settings.rabbitmq.queue) == 0


async def test_retries_exhausted_are_dead_lettered(make_settings, connection):
    """An item that keeps failing transiently is dead-lettered after max_attempts."""
    async with StandIn(StandInConfig(error_503=1.0)) as sb:
        # The breaker off: with it, a sink that always answers 503 pauses instead.
        settings = make_settings(
            pools={"session_buddy_url": sb.url},
            retry={"max_attempts": 3},
            sink={"breaker_failures": 0},
        )
        await publish_items(connection, settings, 2)
        async with Service(settings) as service:
            await wait_until(lambda: service.metrics.counts["dead_letter"] == 2)
        assert sb.stats.calls == 6
    dead = await take_all(connection, settings.rabbitmq.dead_letter_queue)
    assert [m.headers[H_REASON] for m in dead] == [Reason.RETRIES_EXHAUSTED] * 2
    assert all(m.headers[H_ATTEMPTS] == 3 for m in dead)
    assert all("HTTP 503" in str(m.headers[H_DETAIL]) for m in dead)


BAD_INPUT = [
    (b'{"content": "cut', "application/json", Reason.INVALID_JSON),
    (b'{"content": "\xff"}', "application/json", Reason.INVALID_ENCODING),
    ('{"content": "x"}'.encode("utf-16"), "application/json", Reason.INVALID_ENCODING),
    (b'{"content": NaN}', "application/json", Reason.INVALID_JSON),
    (b"[" * 5000 + b"]" * 5000, "application/json", Reason.INVALID_JSON),
    (b'{"content": ' + b"9" * 5000 + b"}", "application/json", Reason.INVALID_JSON),
    (b'{"content": "\\ud800"}', "application/json", Reason.INVALID_ENCODING),
    (b'{"content": 5, "metadata": {}}', "application/json", Reason.SCHEMA),
    (b'{"metadata": {}}', "application/json", Reason.SCHEMA),
    (b"content", "text/plain", Reason.WRONG_CONTENT_TYPE),
    (b'{"content": "' + b"x" * 2_000_000 + b'"}', "application/json", Reason.TOO_LARGE),
]


async def test_bad_input_is_dead_lettered_without_calling_the_sink(make_settings, connection):
    """Each kind of broken message lands in the DLQ with its reason; the sink is never called."""
    async with StandIn() as sb:
        settings = make_settings(pools={"session_buddy_url": sb.url})
        topology = Topology.from_settings(settings)
        await topology.declare(connection)
        async with Publisher(connection, topology) as publisher:
            for n, (body, content_type, _) in enumerate(BAD_INPUT):
                await publisher.publish_raw(body, content_type=content_type, message_id=str(n))
        async with Service(settings) as service:
            await wait_until(lambda: service.metrics.counts["dead_letter"] == len(BAD_INPUT))
        assert sb.stats.calls == 0
    dead = await take_all(connection, settings.rabbitmq.dead_letter_queue)
    by_id = {m.message_id: m for m in dead}
    for n, (body, _, reason) in enumerate(BAD_INPUT):
        assert by_id[str(n)].headers[H_REASON] == reason, n
        assert by_id[str(n)].body == body


async def test_session_lost_mid_run_is_reopened(make_settings, connection):
    """When Session-Buddy forgets the session, the worker opens a new one and loses nothing."""
    async with StandIn(StandInConfig(latency_s=0.01)) as sb:
        settings = make_settings(pools={"session_buddy_url": sb.url})
        await publish_items(connection, settings, 150)
        async with Service(settings):
            await wait_until(lambda: sb.stats.stored >= 40)
            sb.forget_sessions()
            await wait_until(lambda: sb.stats.distinct_keys == 150)
        assert sb.stats.sessions_opened >= 2
    assert await depth(connection, settings.rabbitmq.dead_letter_queue) == 0


async def test_two_workers_share_one_queue(make_settings, connection):
    """Two workers on one queue both take work and store each item once."""
    async with StandIn(StandInConfig(latency_s=0.02)) as sb:
        settings = make_settings(
            pools={"session_buddy_url": sb.url, "max_concurrent_memory_insertions": 4}
        )
        await publish_items(connection, settings, 200)
        async with Service(settings) as one, Service(settings) as two:
            await wait_until(lambda: one.metrics.counts["ack"] + two.metrics.counts["ack"] == 200)
            done = (one.metrics.total_items_inserted, two.metrics.total_items_inserted)
        assert min(done) > 0 and sum(done) == 200
        assert sb.stats.duplicates == 0


async def test_no_ack_before_the_store_is_confirmed(make_settings, connection):
    """While the sink holds requests open, only the prefetch is out of the queue: the held
    stores and the one delivery waiting for a slot."""
    async with StandIn() as sb:
        settings = make_settings(
            pools={"session_buddy_url": sb.url, "max_concurrent_memory_insertions": 4}
        )
        await publish_items(connection, settings, 10)
        sb.hold()
        async with Service(settings):
            await wait_until(lambda: sb.held == 4)
            await asyncio.sleep(0.3)
            assert sb.held == 4 and sb.stats.stored == 0
            assert await depth(connection, settings.rabbitmq.queue) == 10 - settings.prefetch == 5
            sb.release()
            await wait_until(lambda: sb.stats.distinct_keys == 10)


async def test_ops_port_serves_metrics_and_readiness(make_settings, connection):
    """The ops port serves ACT-008's metrics as JSON, Prometheus text, health and readiness."""
    async with StandIn() as sb:
        settings = make_settings(pools={"session_buddy_url": sb.url}, worker={"ops_port": 0})
        await publish_items(connection, settings, 5)
        async with Service(settings) as service, httpx.AsyncClient() as http:
            await wait_until(lambda: sb.stats.stored == 5)
            base = f"http://127.0.0.1:{service.ops_port}"
            metrics = (await http.get(f"{base}/insertion-metrics")).json()
            prometheus = (await http.get(f"{base}/metrics")).text
            ready = await http.get(f"{base}/readyz")
            health = await http.get(f"{base}/healthz")
    assert metrics["total_items_inserted"] == 5
    assert metrics["max_concurrent_insertions"] == settings.concurrency
    assert 'memory_worker_messages_total{action="ack",outcome="stored",reason=""} 5.0' in prometheus
    assert ready.status_code == 200 and health.status_code == 200


@pytest.mark.parametrize("signals", [1, 2])
async def test_sigterm_mid_flight_finishes_inserts_and_loses_nothing(
    make_settings, connection, signals
):
    """SIGTERM: in-flight inserts finish within the grace period, the rest stay queued, exit 0;
    two SIGTERMs a millisecond apart (a group-wide kill) are the same one graceful stop."""
    async with StandIn(StandInConfig(latency_s=0.4)) as sb:
        settings = make_settings(
            pools={"session_buddy_url": sb.url, "max_concurrent_memory_insertions": 5},
            worker={"grace_s": 10},
        )
        await publish_items(connection, settings, 40)
        process = await start_worker_process(worker_env(settings))
        await wait_until(lambda: sb.stats.in_flight == 5)
        for _ in range(signals):
            process.send_signal(signal.SIGTERM)
        _, stderr = await asyncio.wait_for(process.communicate(), 30)
        assert process.returncode == 0, stderr.decode()[-2000:]
        assert b"forced_exit" not in stderr
        stored = sb.stats.distinct_keys
    assert stored >= 5
    assert stored + await depth(connection, settings.rabbitmq.queue) == 40
    assert await depth(connection, settings.rabbitmq.dead_letter_queue) == 0


async def test_sigterm_with_short_grace_requeues_in_flight(make_settings, connection):
    """Inserts still running when the grace period ends are requeued, never dead-lettered."""
    async with StandIn() as sb:
        settings = make_settings(
            pools={"session_buddy_url": sb.url, "max_concurrent_memory_insertions": 5},
            worker={"grace_s": 0.5},
        )
        await publish_items(connection, settings, 12)
        sb.hold()
        process = await start_worker_process(worker_env(settings))
        await wait_until(lambda: sb.held == 5)
        process.send_signal(signal.SIGTERM)
        _, stderr = await asyncio.wait_for(process.communicate(), 30)
        assert process.returncode == 0, stderr.decode()[-2000:]
        sb.release()
    assert await depth(connection, settings.rabbitmq.queue) == 12
    assert await depth(connection, settings.rabbitmq.dead_letter_queue) == 0


async def test_queue_with_other_arguments_is_refused_with_a_clear_message(
    make_settings, connection
):
    """An existing classic queue where quorum is configured: exit 78 naming the difference."""
    settings = make_settings()
    async with connection.channel() as channel:
        await channel.declare_queue(settings.rabbitmq.queue, durable=True)
    process = await start_worker_process(worker_env(settings))
    _, stderr = await asyncio.wait_for(process.communicate(), 30)
    assert process.returncode == EXIT_CONFIG
    assert f"queue '{settings.rabbitmq.queue}' already exists with other arguments" in (
        stderr.decode()
    )
    assert "inequivalent arg" in stderr.decode()


async def test_sigterm_stops_a_worker_whose_log_reader_is_gone(make_settings, connection):
    """With the reader of its log pipe gone, a worker still stops on SIGTERM, exit 0."""
    async with StandIn() as sb:
        settings = make_settings(pools={"session_buddy_url": sb.url})
        await publish_items(connection, settings, 5)
        process = await start_worker_process(worker_env(settings))
        try:
            await wait_until(lambda: sb.stats.distinct_keys == 5)
            transport = process._transport  # type: ignore[attr-defined]
            for fd in (1, 2):
                transport.get_pipe_transport(fd).close()  # writes now fail with EPIPE
            await asyncio.sleep(0.2)
            process.send_signal(signal.SIGTERM)
            returncode = await asyncio.wait_for(process.wait(), 30)
        finally:
            if process.returncode is None:
                process.kill()
                await process.wait()
    assert returncode == 0
