"""Faults end to end: every run is accounted for in a ledger, and nothing is lost."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import signal
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from urllib.parse import urlparse, urlunparse

import pytest

from tests.integration.helpers import (
    depth,
    item,
    publish_items,
    start_worker_process,
    take_all,
    wait_until,
    worker_env,
)
from worker.outcome import Reason
from worker.publisher import Publisher
from worker.service import Service
from worker.standin import StandIn, StandInConfig
from worker.topology import H_REASON, Topology

pytestmark = pytest.mark.integration

FAST_RECONNECT = "reconnect_interval=0.5"


@dataclass
class Ledger:
    """Where every published item ended up."""

    published: int
    stored: int
    duplicates: int
    dead_lettered: dict[str, int] = field(default_factory=dict)
    still_queued: int = 0

    @property
    def dead(self) -> int:
        return sum(self.dead_lettered.values())

    @property
    def lost(self) -> int:
        return self.published - self.stored - self.dead - self.still_queued

    def __str__(self) -> str:
        return (
            f"Ledger(published={self.published}, stored={self.stored}, "
            f"duplicates={self.duplicates}, dead_lettered={self.dead_lettered}, "
            f"still_queued={self.still_queued}, lost={self.lost})"
        )


async def tally(connection, settings, sb: StandIn, published: int) -> Ledger:
    """Count the stand-in's rows, drain the DLQ by reason, and count what is still queued."""
    topology = Topology.from_settings(settings)
    dead: dict[str, int] = {}
    for message in await take_all(connection, topology.dead_letter_queue):
        reason = str((message.headers or {}).get(H_REASON, "broker"))
        dead[reason] = dead.get(reason, 0) + 1
    queued = await depth(connection, topology.queue)
    for tier in topology.tiers:
        queued += await depth(connection, tier.queue)
    stats = sb.stats
    ledger = Ledger(published, stats.distinct_keys, stats.duplicates, dead, queued)
    print(ledger)
    return ledger


async def drained(
    connection, settings, sb: StandIn, dead: int = 0, quiet_s: float = 0.8, timeout_s: float = 20.0
) -> None:
    """Wait until the work and delay queues stay empty, the sink idle and the DLQ holds `dead`.

    "Stay" means for `quiet_s`, longer than the longest delay tier: a retry published by a
    delivery still in flight shows up in a delay queue within that window.
    """
    topology = Topology.from_settings(settings)
    queues = [topology.queue, *(t.queue for t in topology.tiers)]
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    quiet_since: float | None = None
    while True:
        queued = sum([await depth(connection, q) for q in queues])
        dlq = await depth(connection, topology.dead_letter_queue)
        if queued == 0 and dlq == dead and sb.stats.in_flight == 0:
            quiet_since = quiet_since if quiet_since is not None else loop.time()
            if loop.time() - quiet_since >= quiet_s:
                return
        else:
            quiet_since = None
        if loop.time() > deadline:
            raise AssertionError(f"queues not drained within {timeout_s} s")
        await asyncio.sleep(0.05)


def via(amqp_url: str, port: int | None = None, query: str = FAST_RECONNECT) -> str:
    """The broker URL, optionally through another local port, with extra query options."""
    parsed = urlparse(amqp_url)
    netloc = parsed.netloc
    if port is not None:
        netloc = f"{netloc.rsplit('@', 1)[0]}@127.0.0.1:{port}"
    return urlunparse(parsed._replace(netloc=netloc, query=query))


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


async def _rabbitmqctl(*args: str) -> str:
    process = await asyncio.create_subprocess_exec(
        "rabbitmqctl", "-q", *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await asyncio.wait_for(process.communicate(), 30)
    assert process.returncode == 0, err.decode()
    return out.decode()


async def _connection_pids(connection_name: str) -> list[str]:
    """Erlang pids of the broker connections whose client named itself `connection_name`."""
    raw = await _rabbitmqctl("list_connections", "pid", "client_properties")
    wanted = f'{{"connection_name","{connection_name}"}}'
    return [line.split("\t", 1)[0] for line in raw.splitlines() if wanted in line]


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
                pids = [p for p in await _connection_pids(name) if p not in closed]
                assert len(pids) == 1, pids
                await _rabbitmqctl("close_connection", pids[0], "fault test")
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


class Proxy:
    """127.0.0.1:<free port> → the broker; can cut every connection or stop forwarding."""

    def __init__(self, host: str, port: int) -> None:
        self._target = (host, port)
        self._flowing = asyncio.Event()
        self._flowing.set()
        self._writers: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._server: asyncio.Server | None = None
        self.port = 0
        self.accepted = 0

    async def __aenter__(self) -> Proxy:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        self.resume()
        self.cut()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        try:
            up_reader, up_writer = await asyncio.open_connection(*self._target)
        except OSError:
            writer.transport.abort()
            return
        self._writers |= {writer, up_writer}
        pumps = [
            asyncio.create_task(self._pump(reader, up_writer)),
            asyncio.create_task(self._pump(up_reader, writer)),
        ]
        self._tasks.update(pumps)
        try:
            await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in (writer, up_writer):
                w.transport.abort()
                self._writers.discard(w)
            for task in pumps:
                task.cancel()
                self._tasks.discard(task)

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError, asyncio.IncompleteReadError):
            while data := await reader.read(65536):
                await self._flowing.wait()
                writer.write(data)
                await writer.drain()

    def cut(self) -> None:
        """Abort every proxied connection, both sides."""
        for writer in list(self._writers):
            writer.transport.abort()

    def stall(self) -> None:
        """Stop forwarding bytes (connections stay open)."""
        self._flowing.clear()

    def resume(self) -> None:
        """Forward again."""
        self._flowing.set()


def _broker_address(amqp_url: str) -> tuple[str, int]:
    parsed = urlparse(amqp_url)
    return parsed.hostname or "127.0.0.1", parsed.port or 5672


async def test_proxy_cut_twice_loses_nothing(make_settings, connection, amqp_url):
    """The TCP path is cut twice mid-run: the worker reconnects and every item is stored."""
    published = 300
    async with (
        StandIn(StandInConfig(latency_s=0.1)) as sb,
        Proxy(*_broker_address(amqp_url)) as proxy,
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
        Proxy(*_broker_address(amqp_url)) as proxy,
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
