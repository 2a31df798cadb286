"""Broker faults on a private RabbitMQ node: restart, closed connections, down at start, cancel.

These tests stop and disconnect their broker, so they run on a node of their own (see
`broker_node.py`), never on the shared one. One node serves the module; each test leaves it
running. Every test prints its ledger.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import aio_pika
import httpx
import pytest
from structlog.testing import capture_logs

from tests.faults.broker_node import BrokerNode, BrokerNodeError, find_install, selected_version
from tests.faults.ledger import drained, tally, via
from tests.integration.helpers import (
    item,
    publish_items,
    start_worker_process,
    wait_until,
    worker_env,
)
from worker.exitcodes import EXIT_CONFIG, EXIT_UNAVAILABLE
from worker.publisher import Publisher
from worker.service import Service
from worker.settings import Settings
from worker.testing import StandIn, StandInConfig
from worker.topology import Topology

pytestmark = [pytest.mark.integration, pytest.mark.faults]

RECOVERY_EVENTS = (
    "consumer_cancelled_by_broker",
    "consumer_recovery_failed",
    "consumer_restored",
    "consumer_reopened",
)


def private_node(version: str | None = None) -> Iterator[BrokerNode]:
    """A private RabbitMQ node, stopped and removed at the end (body of a module's `node`)."""
    try:
        install = find_install(version)  # the installed RabbitMQ, or 4.3 when asked for
    except BrokerNodeError as exc:
        message = f"{exc}: these tests start a private node"
        # A Docker-only developer may not have it; CI machines always do, so there it fails,
        # as it does when 4.3 was asked for and is not prepared.
        if os.environ.get("CI") or selected_version():
            pytest.fail(message)
        pytest.skip(message)
    # management: the policy preflight
    with BrokerNode(management=True, install=install) as broker:
        yield broker


@pytest.fixture(scope="module")
def node() -> Iterator[BrokerNode]:
    """A private RabbitMQ node for this module; stopped and removed at the end."""
    yield from private_node()


@pytest.fixture(scope="module")
def amqp_url(node: BrokerNode) -> str:
    """In this module every fixture (settings, teardown, `connection`) uses the private node."""
    return node.amqp_url


@contextlib.asynccontextmanager
async def fresh(node: BrokerNode) -> AsyncIterator[aio_pika.abc.AbstractRobustConnection]:
    """A new connection for after a fault (the `connection` fixture's was dropped with it)."""
    connection = await aio_pika.connect_robust(node.amqp_url)
    async with connection:
        yield connection


async def consumer_prefetches(node: BrokerNode, queue: str) -> list[int]:
    """The prefetch of every consumer the broker has on `queue`."""
    raw = await node.ctl("list_consumers", "--no-table-headers", "queue_name", "prefetch_count")
    rows = [line.split("\t") for line in raw.splitlines() if line.strip()]
    return [int(prefetch) for name, prefetch in rows if name == queue]


async def connection_count(node: BrokerNode, connection_name: str) -> int:
    """Connections on the node whose client named itself `connection_name`."""
    raw = await node.ctl("list_connections", "--no-table-headers", "client_properties")
    return sum(f'{{"connection_name","{connection_name}"}}' in line for line in raw.splitlines())


def late_settlements(service: Service) -> int:
    """Settlements the worker dropped because their channel had closed."""
    value = service.metrics.registry.get_sample_value("memory_worker_late_settlements_total")
    return int(value or 0)


class WorkerLog:
    """Reads a worker process's stderr as it comes; finds its JSON log events by name."""

    def __init__(self, process: asyncio.subprocess.Process) -> None:
        assert process.stderr is not None
        self.lines: list[str] = []
        self._task = asyncio.create_task(self._read(process.stderr))

    async def _read(self, stream: asyncio.StreamReader) -> None:
        while line := await stream.readline():
            self.lines.append(line.decode(errors="replace").rstrip())

    def events(self, name: str) -> list[dict[str, Any]]:
        """Every logged event called `name`, oldest first."""
        found = []
        for line in self.lines:
            with contextlib.suppress(ValueError):
                record = json.loads(line)
                if isinstance(record, dict) and record.get("event") == name:
                    found.append(record)
        return found

    async def wait_for(self, name: str, count: int = 1, timeout_s: float = 60.0) -> None:
        """Wait until `name` was logged `count` times."""
        try:
            await wait_until(lambda: len(self.events(name)) >= count, timeout_s)
        except AssertionError:
            tail = "\n".join(self.lines[-30:])
            raise AssertionError(
                f"{name!r} not logged {count} times; stderr ends:\n{tail}"
            ) from None

    async def close(self) -> str:
        """Wait for end of output; return all of it."""
        await self._task
        return "\n".join(self.lines)


def worker_settings(make_settings: Any, node: BrokerNode, sb: StandIn, **pools: Any) -> Settings:
    """Settings on the private node, reconnecting every 0.5 s, 5 inserts at once."""
    pools = {"session_buddy_url": sb.url, "max_concurrent_memory_insertions": 5, **pools}
    return make_settings(rabbitmq={"url": via(node.amqp_url)}, pools=pools)


# --- 1. Broker restart -------------------------------------------------------------------------


async def test_broker_restart_mid_run_loses_nothing(node, make_settings, connection):
    """stop_app then start_app mid-run: consumer and prefetch come back, nothing lost or dead."""
    published = 300
    async with StandIn(StandInConfig(latency_s=0.1)) as sb:
        settings = worker_settings(make_settings, node, sb)
        queue = settings.rabbitmq.queue
        await publish_items(connection, settings, published)
        async with Service(settings) as service:
            await wait_until(lambda: sb.stats.distinct_keys >= 30)
            try:
                await node.stop_app()
                at_stop = sb.stats.distinct_keys
                await asyncio.sleep(3)
                ready_while_down = service.ready
                await node.start_app()
            finally:
                await node.ensure_running()  # when something failed while it was down
            # Stores resume only through a restored consumer on the restarted broker.
            await wait_until(lambda: sb.stats.distinct_keys >= at_stop + 20, 60)
            prefetches = await consumer_prefetches(node, queue)
            sb.config.latency_s = 0.0
            await wait_until(lambda: sb.stats.distinct_keys == published, 60)
            async with fresh(node) as conn:
                await drained(conn, settings, sb)
            ready, late = service.ready, late_settlements(service)
        async with fresh(node) as conn:
            ledger = await tally(conn, settings, sb, published)
    print(f"consumer prefetch after the restart: {prefetches}, late settlements: {late}")
    assert len(prefetches) == 1 and 1 <= prefetches[0] <= settings.prefetch
    assert ready and not ready_while_down  # /readyz is 503 while the broker is away
    assert ledger.lost == 0 and ledger.stored == published
    assert ledger.dead == 0 and ledger.still_queued == 0
    # Only what was unacked at the stop can come back twice: at most the prefetch.
    assert ledger.duplicates <= settings.prefetch


# --- 2. The broker closes every connection, five times -----------------------------------------


async def test_close_all_connections_five_times_loses_nothing(node, make_settings, connection):
    """close_all_connections 5 times mid-run: reconnects each time, late acks logged, none lost."""
    # Enough work to outlast five closes (each takes rabbitmqctl 1-3 s) at 100 stores a second.
    published, closes = 2_000, 5
    async with StandIn(StandInConfig(latency_s=0.1)) as sb:
        settings = worker_settings(make_settings, node, sb)
        await publish_items(connection, settings, published)
        with capture_logs() as logs:
            async with Service(settings) as service:
                for _ in range(closes):
                    # Progress between closes proves each reconnect restored the consumer.
                    target = sb.stats.distinct_keys + 10
                    await wait_until(lambda t=target: sb.stats.distinct_keys >= t, 60)
                    await node.close_all_connections()
                sb.config.latency_s = 0.0
                await wait_until(lambda: sb.stats.distinct_keys == published, 60)
                prefetches = await consumer_prefetches(node, settings.rabbitmq.queue)
                async with fresh(node) as conn:
                    await drained(conn, settings, sb)
                ready, late = service.ready, late_settlements(service)
        async with fresh(node) as conn:
            ledger = await tally(conn, settings, sb, published)
    late_lines = [e for e in logs if e["event"] == "settle_on_closed_channel"]
    print(f"consumer prefetch at the end: {prefetches}, late settlements: {late}")
    assert len(prefetches) == 1 and 1 <= prefetches[0] <= settings.prefetch
    assert ready
    assert ledger.lost == 0 and ledger.stored == published
    assert ledger.dead == 0 and ledger.still_queued == 0
    assert ledger.duplicates <= closes * settings.concurrency
    # Each settlement on a dead channel is counted once and logged as a redelivery to come.
    assert len(late_lines) == late
    assert all(e["redelivery_expected"] is True for e in late_lines)


# --- 3. Broker down when the worker starts -----------------------------------------------------


async def test_worker_started_before_the_broker_waits_then_consumes(node, make_settings):
    """Broker down at start: `broker_unreachable` lines with backoff, then it consumes all."""
    published = 100
    worker_id = f"down-at-start-{uuid.uuid4().hex[:8]}"
    async with StandIn(StandInConfig(latency_s=0.01)) as sb:
        settings = worker_settings(make_settings, node, sb)
        env = worker_env(
            settings, MAHAVISHNU_RABBITMQ__STARTUP_WAIT_S="120", MAHAVISHNU_WORKER__ID=worker_id
        )
        process: asyncio.subprocess.Process | None = None
        await node.stop_app()
        try:
            process = await start_worker_process(env)
            log = WorkerLog(process)
            await log.wait_for("broker_unreachable", count=2)
            await node.start_app()
            await log.wait_for("worker_started")
            # Failed first attempts leave no connection of their own behind.
            connections = await connection_count(node, f"memory-worker {worker_id}")
            async with fresh(node) as conn:
                await publish_items(conn, settings, published)
                await wait_until(lambda: sb.stats.distinct_keys == published, 60)
                await drained(conn, settings, sb)
            process.send_signal(signal.SIGTERM)
            await asyncio.wait_for(process.wait(), 60)
        finally:
            await node.ensure_running()
            if process is not None and process.returncode is None:
                process.kill()
                await process.wait()
        output = await log.close()
        async with fresh(node) as conn:
            ledger = await tally(conn, settings, sb, published)
    retries = log.events("broker_unreachable")
    print(f"broker_unreachable lines: {len(retries)}; first: {retries[0]}")
    assert process.returncode == 0, output[-3000:]
    assert connections == 1
    assert retries[0]["url"].startswith(f"amqp://guest:***@127.0.0.1:{node.port}/")
    assert retries[0]["error"] == "connection refused"
    delays = [r["retry_in_s"] for r in retries]
    assert delays == sorted(delays) and delays[0] < delays[-1]  # backs off
    assert "guest:guest" not in output
    assert ledger.lost == 0 and ledger.stored == published
    assert ledger.dead == 0 and ledger.still_queued == 0 and ledger.duplicates == 0


async def test_broker_down_with_no_startup_wait_exits_69(node, make_settings):
    """Broker down and startup_wait_s 0: exit 69 at once, naming the (masked) broker URL."""
    async with StandIn() as sb:
        settings = worker_settings(make_settings, node, sb)
        env = worker_env(settings, MAHAVISHNU_RABBITMQ__STARTUP_WAIT_S="0")
        process: asyncio.subprocess.Process | None = None
        await node.stop_app()
        try:
            process = await start_worker_process(env)
            _, stderr = await asyncio.wait_for(process.communicate(), 60)
        finally:
            await node.ensure_running()
            if process is not None and process.returncode is None:
                process.kill()
                await process.wait()
    output = stderr.decode()
    print(output.strip().splitlines()[-1])
    assert process.returncode == EXIT_UNAVAILABLE, output[-3000:]
    assert f"memory-worker: no broker at amqp://guest:***@127.0.0.1:{node.port}/" in output
    assert "broker_unreachable" not in output  # no wait was asked for


# --- 4. The broker cancels the worker's consumer -----------------------------------------------


# Adaptive or fixed, recovery must end with one consumer at the full prefetch.
@pytest.mark.parametrize("adaptive", [False, True], ids=["fixed", "adaptive"])
async def test_deleted_work_queue_is_redeclared_and_consumed_again(
    node, make_settings, connection, adaptive
):
    """Work queue deleted under the worker: logged, redeclared, consumed again; nothing lost."""
    first, second = 100, 100
    async with StandIn(StandInConfig(latency_s=0.01)) as sb:
        settings = worker_settings(make_settings, node, sb, adaptive_concurrency=adaptive)
        topology = Topology.from_settings(settings)
        await publish_items(connection, settings, first)
        with capture_logs() as logs:
            async with Service(settings) as service:
                await wait_until(lambda: sb.stats.distinct_keys == first)
                # Emptied first, so the deletion itself throws nothing away.
                await drained(connection, settings, sb)
                async with connection.channel() as channel:
                    await channel.queue_delete(topology.queue)
                await wait_until(lambda: any(e["event"] == "consumer_reopened" for e in logs), 60)
                # Published without declaring: only the worker can have brought the queue back.
                async with Publisher(connection, topology) as publisher:
                    for n in range(first, first + second):
                        await publisher.publish_item(item(n))
                await wait_until(lambda: sb.stats.distinct_keys == first + second, 60)
                await drained(connection, settings, sb)
                prefetches = await consumer_prefetches(node, topology.queue)
                ready = service.ready
            ledger = await tally(connection, settings, sb, first + second)
    recovery = [e for e in logs if e["event"] in RECOVERY_EVENTS]
    print("consumer events:", [(e["event"], e.get("error")) for e in recovery])
    assert recovery[0]["event"] == "consumer_cancelled_by_broker"
    assert recovery[0]["queue"] == topology.queue
    assert recovery[-1]["event"] == "consumer_reopened"
    assert len(prefetches) == 1 and 1 <= prefetches[0] <= settings.prefetch
    assert ready
    assert ledger.lost == 0 and ledger.stored == first + second
    assert ledger.dead == 0 and ledger.still_queued == 0 and ledger.duplicates == 0


# --- 6. Preflight against the broker's effective policy ---------------------------------------


async def shown_policy(node: BrokerNode, queue: str, policy: str | None) -> None:
    """Wait until the management API shows `policy` on `queue` (it lags by a statistics pass)."""
    api = f"http://127.0.0.1:{node.management_port}/api/queues/%2F/{queue}"
    async with httpx.AsyncClient(auth=("guest", "guest")) as http:
        for _ in range(300):
            if (await http.get(api)).json().get("policy") == policy:
                return
            await asyncio.sleep(0.1)
    raise AssertionError(f"the management API never showed policy {policy!r} on {queue}")


async def test_queue_policy_that_disagrees_stops_the_worker_with_exit_78(
    node, make_settings, connection
):
    """A policy lowering the delivery limit: with management_url set the worker refuses to start
    (exit 78) and names the difference; without the policy it starts and consumes."""
    async with StandIn() as sb:
        settings = make_settings(pools={"session_buddy_url": sb.url})
        queue = settings.rabbitmq.queue
        await publish_items(connection, settings, 3)
        env = worker_env(settings, MAHAVISHNU_RABBITMQ__MANAGEMENT_URL=node.management_url)
        policy = f"mw-test-{uuid.uuid4().hex[:6]}"
        pattern = "^" + queue.replace(".", "\\.") + "$"
        limit = '{"delivery-limit": 5}'
        await node.ctl("set_policy", policy, pattern, limit, "--apply-to", "queues")
        try:
            await shown_policy(node, queue, policy)
            refused = await start_worker_process(env)
            _, stderr = await asyncio.wait_for(refused.communicate(), 60)
        finally:
            await node.ctl("clear_policy", policy)
        await shown_policy(node, queue, None)
        allowed = await start_worker_process(env)
        try:
            await wait_until(lambda: sb.stats.distinct_keys == 3)
        finally:
            allowed.send_signal(signal.SIGTERM)
            await asyncio.wait_for(allowed.communicate(), 60)
    text = stderr.decode()
    print(text.strip().splitlines()[-3:])
    assert refused.returncode == EXIT_CONFIG, text
    assert "delivery" in text and "5" in text, text
    assert allowed.returncode == 0
