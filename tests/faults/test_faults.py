"""Faults end to end: every run is accounted for in a ledger, and nothing is lost."""

from __future__ import annotations

import asyncio
import shutil
import signal
import uuid
from datetime import UTC, datetime

import pytest

from tests.faults.ledger import (
    Proxy,
    broker_address,
    connection_pids,
    drained,
    rabbitmqctl,
    tally,
    via,
)
from tests.integration.helpers import (
    item,
    publish_items,
    start_worker_process,
    wait_until,
    worker_env,
)
from worker.outcome import Reason
from worker.publisher import Publisher
from worker.service import Service
from worker.standin import StandIn, StandInConfig
from worker.topology import Topology

pytestmark = pytest.mark.integration


# --- 1. SIGKILL -------------------------------------------------------------------------------


async def test_sigkill_in_flight_is_redelivered_to_another_worker(make_settings, connection):
    """SIGKILL mid-flight: a second worker finishes, nothing lost, duplicates ≤ in flight."""
    published = 40
    async with StandIn(StandInConfig(latency_s=0.3)) as sb:
        settings = make_settings(
            pools={"session_buddy_url": sb.url, "max_concurrent_memory_insertions": 5}
        )
        await publish_items(connection, settings, published)
        process = await start_worker_process(worker_env(settings))
        try:
            await wait_until(lambda: sb.stats.stored >= 10 and sb.stats.in_flight == 5)
        finally:
            process.send_signal(signal.SIGKILL)
            await asyncio.wait_for(process.communicate(), 30)
        # Unacked at the kill is at most the prefetch, which equals the concurrency.
        in_flight = settings.prefetch
        async with Service(settings):
            await wait_until(lambda: sb.stats.distinct_keys == published)
            await drained(connection, settings, sb)
        ledger = await tally(connection, settings, sb, published)
    assert process.returncode == -signal.SIGKILL
    assert ledger.lost == 0 and ledger.stored == published
    assert ledger.dead == 0 and ledger.still_queued == 0
    assert ledger.duplicates <= in_flight


# --- 2. Broker closes the worker's connection --------------------------------------------------


@pytest.mark.skipif(shutil.which("rabbitmqctl") is None, reason="rabbitmqctl is not on PATH")
async def test_broker_closes_worker_connection_five_times(make_settings, connection, amqp_url):
    """The broker closes the worker's connection 5 times: it reconnects, stores all, loses none."""
    published, closes = 500, 5
    worker_id = f"faults-{uuid.uuid4().hex[:8]}"
    name = f"memory-worker {worker_id}"
    async with StandIn(StandInConfig(latency_s=0.2)) as sb:
        settings = make_settings(
            rabbitmq={"url": via(amqp_url)},
            pools={"session_buddy_url": sb.url, "max_concurrent_memory_insertions": 5},
            worker={"id": worker_id},
        )
        await publish_items(connection, settings, published)
        closed: list[str] = []
        async with Service(settings) as service:
            for _ in range(closes):
                target = sb.stats.distinct_keys + 10
                await wait_until(lambda t=target: sb.stats.distinct_keys >= t)
                pids = [p for p in await connection_pids(name) if p not in closed]
                assert len(pids) == 1, pids
                await rabbitmqctl("close_connection", pids[0], "fault test")
                closed.append(pids[0])
            sb.config.latency_s = 0.0
            await wait_until(lambda: sb.stats.distinct_keys == published)
            await drained(connection, settings, sb)
            assert service.ready
        ledger = await tally(connection, settings, sb, published)
    assert ledger.lost == 0 and ledger.stored == published
    assert ledger.dead == 0 and ledger.still_queued == 0
    assert ledger.duplicates <= closes * settings.concurrency


# --- 3. A TCP proxy that cuts and stalls -------------------------------------------------------


async def test_proxy_cut_twice_loses_nothing(make_settings, connection, amqp_url):
    """The TCP path is cut twice mid-run: the worker reconnects and every item is stored."""
    published = 300
    async with (
        StandIn(StandInConfig(latency_s=0.1)) as sb,
        Proxy(*broker_address(amqp_url)) as proxy,
    ):
        make_settings()  # first: the fixture cleans up through this one, not the proxy
        settings = make_settings(
            rabbitmq={"url": via(amqp_url, proxy.port)},
            pools={"session_buddy_url": sb.url, "max_concurrent_memory_insertions": 5},
        )
        await publish_items(connection, settings, published)
        async with Service(settings):
            for cut in range(2):
                target = sb.stats.distinct_keys + 20
                await wait_until(lambda t=target: sb.stats.distinct_keys >= t)
                await wait_until(lambda c=cut: proxy.accepted >= c + 1)
                proxy.cut()
            sb.config.latency_s = 0.0
            await wait_until(lambda: sb.stats.distinct_keys == published)
            await drained(connection, settings, sb)
        ledger = await tally(connection, settings, sb, published)
    assert proxy.accepted >= 3  # reconnected after each cut
    assert ledger.lost == 0 and ledger.stored == published
    assert ledger.dead == 0 and ledger.still_queued == 0
    assert ledger.duplicates <= 2 * settings.concurrency


@pytest.mark.parametrize("stall_s", [3, 7])
async def test_proxy_stall_longer_than_heartbeat_recovers(
    make_settings, connection, amqp_url, stall_s
):
    """Forwarding stalls (3 s; 7 s drops the link) with a 2 s heartbeat: recovers, loses none."""
    published = 200
    async with (
        StandIn(StandInConfig(latency_s=0.1)) as sb,
        Proxy(*broker_address(amqp_url)) as proxy,
    ):
        make_settings()  # first: the fixture cleans up through this one, not the proxy
        settings = make_settings(
            rabbitmq={"url": via(amqp_url, proxy.port), "heartbeat_s": 2},
            pools={"session_buddy_url": sb.url, "max_concurrent_memory_insertions": 5},
        )
        await publish_items(connection, settings, published)
        async with Service(settings):
            await wait_until(lambda: sb.stats.distinct_keys >= 20)
            proxy.stall()
            before = sb.stats.distinct_keys
            await asyncio.sleep(stall_s)
            during = sb.stats.distinct_keys - before  # only what was already delivered
            proxy.resume()
            sb.config.latency_s = 0.0
            await wait_until(lambda: sb.stats.distinct_keys == published)
            await drained(connection, settings, sb)
        ledger = await tally(connection, settings, sb, published)
    print(f"stored during the stall: {during}, proxied connections: {proxy.accepted}")
    assert during <= settings.prefetch  # the stall really stopped the flow
    if stall_s >= 7:  # past the heartbeat timeout: the link was dropped and re-established
        assert proxy.accepted >= 2
    assert ledger.lost == 0 and ledger.stored == published
    assert ledger.dead == 0 and ledger.still_queued == 0
    assert ledger.duplicates <= settings.concurrency


# --- 4. Session-Buddy faults -------------------------------------------------------------------


async def test_commit_then_fail_stores_everything_with_counted_duplicates(
    make_settings, connection
):
    """Commit-then-fail at 0.2: every item stored, duplicates counted, no dead letters."""
    published = 100
    async with StandIn(StandInConfig(latency_s=0.01, commit_then_fail=0.2, seed=7)) as sb:
        settings = make_settings(
            pools={"session_buddy_url": sb.url},
            retry={"max_attempts": 100},
            sink={"breaker_failures": 0},
        )
        await publish_items(connection, settings, published)
        async with Service(settings):
            await wait_until(lambda: sb.stats.distinct_keys == published)
            await drained(connection, settings, sb)
        faults = sb.stats.faults.get("commit_then_fail", 0)
        ledger = await tally(connection, settings, sb, published)
    assert faults > 0
    assert ledger.lost == 0 and ledger.stored == published
    assert ledger.dead_lettered == {} and ledger.still_queued == 0
    assert 0 <= ledger.duplicates <= faults


async def test_session_forgotten_three_times_loses_nothing(make_settings, connection):
    """Session-Buddy forgets the session 3 times mid-run: nothing lost, no dead letters."""
    published = 300
    async with StandIn(StandInConfig(latency_s=0.05)) as sb:
        settings = make_settings(
            pools={"session_buddy_url": sb.url, "max_concurrent_memory_insertions": 5},
            retry={"max_attempts": 100},
        )
        await publish_items(connection, settings, published)
        async with Service(settings):
            for n in range(3):
                await wait_until(lambda n=n: sb.stats.distinct_keys >= 50 * (n + 1))
                sb.forget_sessions()
            await wait_until(lambda: sb.stats.distinct_keys == published)
            await drained(connection, settings, sb)
        opened = sb.stats.sessions_opened
        ledger = await tally(connection, settings, sb, published)
    assert opened >= 4
    assert ledger.lost == 0 and ledger.stored == published
    assert ledger.dead_lettered == {} and ledger.still_queued == 0


async def test_per_item_timeout_shorter_than_sink_latency(make_settings, connection):
    """Timeouts (0.2 s vs 0.5 s latency) for a while, then recovery: nothing lost or dead."""
    published = 30
    async with StandIn(StandInConfig(latency_s=0.5)) as sb:
        settings = make_settings(
            pools={"session_buddy_url": sb.url, "max_concurrent_memory_insertions": 5},
            sink={"timeout_s": 0.2, "breaker_failures": 0},
            retry={"max_attempts": 200},
        )
        await publish_items(connection, settings, published)
        async with Service(settings) as service:
            await wait_until(lambda: service.metrics.counts["retry"] >= 20)
            sb.config.latency_s = 0.0
            await wait_until(lambda: sb.stats.distinct_keys == published)
            await drained(connection, settings, sb)
        ledger = await tally(connection, settings, sb, published)
    assert ledger.lost == 0 and ledger.stored == published
    assert ledger.dead_lettered == {}


# --- 5. Forged headers -------------------------------------------------------------------------


def _forged_death(queue: str) -> list[dict[str, object]]:
    return [
        {
            "count": 30,
            "reason": "rejected",
            "queue": queue,
            "exchange": "",
            "routing-keys": [queue],
            "time": datetime.now(UTC),
        }
    ]


async def test_forged_headers(make_settings, connection):
    """A forged x-death is ignored (stored); a forged attempts count dead-letters on a failure."""
    async with StandIn() as sb:
        settings = make_settings(pools={"session_buddy_url": sb.url})
        topology = Topology.from_settings(settings)
        await topology.declare(connection)
        async with Publisher(connection, topology) as publisher:
            body, key = publisher.encode(item(1))
            await publisher.publish_raw(
                body, message_id=key, headers={"x-death": _forged_death(topology.queue)}
            )
            body2, key2 = publisher.encode(item(2))
            await publisher.publish_raw(body2, message_id=key2, headers={"x-mw-attempts": 999})
        async with Service(settings):
            await wait_until(lambda: sb.stats.distinct_keys == 2)
            # With a transient failure, a forged 999 exceeds max_attempts at once.
            sb.config.error_503 = 1.0
            async with Publisher(connection, topology) as publisher:
                body3, key3 = publisher.encode(item(3))
                await publisher.publish_raw(body3, message_id=key3, headers={"x-mw-attempts": 999})
            await wait_until(lambda: sb.stats.faults.get("error_503", 0) >= 1)
            sb.config.error_503 = 0.0
            await drained(connection, settings, sb, dead=1)
        stored_keys = {row["source_session_id"] for row in sb.items}
        ledger = await tally(connection, settings, sb, 3)
    assert {key, key2} <= stored_keys
    assert key3 not in stored_keys
    assert ledger.lost == 0 and ledger.stored == 2
    assert ledger.dead_lettered == {Reason.RETRIES_EXHAUSTED: 1}
