"""What fault tests share: the ledger, the early-ack probe, the drain wait, broker tools."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from urllib.parse import unquote, urlparse, urlunparse

from aio_pika.abc import AbstractIncomingMessage

from tests.integration.helpers import depth, rabbitmqctl, take_all
from worker.headers import H_REASON
from worker.testing import StandIn
from worker.topology import Topology

FAST_RECONNECT = "reconnect_interval=0.5"


@dataclass
class Ledger:
    """Where every published item ended up, and how many acks came before their store.

    `early_acks` is measured by an `EarlyAcks` probe run alongside the test (None when the
    test ran none): the largest number of deliveries the broker had already seen acked while
    their store was still open at the stand-in, over every sample. See `EarlyAcks`.
    `letters` keeps the dead letters `tally` drained, for a test to read their headers.
    """

    published: int
    stored: int
    duplicates: int
    dead_lettered: dict[str, int] = field(default_factory=dict)
    still_queued: int = 0
    early_acks: int | None = None
    letters: list[AbstractIncomingMessage] = field(default_factory=list)  # the drained DLQ

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
            f"still_queued={self.still_queued}, lost={self.lost}, "
            f"early_acks={'not measured' if self.early_acks is None else self.early_acks})"
        )


async def tally(
    connection, settings, sb: StandIn, published: int, early: EarlyAcks | None = None
) -> Ledger:
    """Count the stand-in's rows, drain the DLQ by reason, count what is still queued.

    With an `early` probe, its worst excess becomes the ledger's `early_acks`.
    """
    topology = Topology.from_settings(settings)
    dead: dict[str, int] = {}
    letters = await take_all(connection, topology.dead_letter_queue)
    for message in letters:
        reason = str((message.headers or {}).get(H_REASON, "broker"))
        dead[reason] = dead.get(reason, 0) + 1
    queued = await depth(connection, topology.queue)
    for tier in topology.tiers:
        queued += await depth(connection, tier.queue)
    stats = sb.stats
    ledger = Ledger(published, stats.distinct_keys, stats.duplicates, dead, queued, letters=letters)
    if early is not None:
        ledger.early_acks = early.early_acks
        print(early)
    print(ledger)
    return ledger


class EarlyAcks:
    """Samples, during a run, the broker's unacked deliveries against the stand-in's open stores.

    A store the stand-in has started and not answered, whose client is still connected
    (`StandInStats.waiting`), belongs to a delivery the worker has not settled: the worker
    settles after the answer, or after giving up on it, and giving up closes the connection.
    So without early acks the broker counts at least that many deliveries unacked on the
    worker's channels. rabbitmqctl reads that count (`list_channels messages_unacknowledged`,
    over the connections named `memory-worker <worker.id>`): it is live, where a quorum
    queue's own `messages_unacknowledged` is refreshed only every few seconds.

    One sample reads the stand-in, then the broker, then the stand-in again. A store still
    waiting at the end either started during the read (counted in `calls`) or was waiting
    throughout, so `waiting_after - started_during` stores surely waited while the broker
    counted. The excess of that over unacked is the number of early acks seen; the probe
    keeps the largest. It is a lower bound: a prefetched delivery not yet started counts as
    unacked too and can hide one. A sample in which no store started or ended is exact
    (`exact` counts those): a held or paused sink gives many. A connection opened between
    the two rabbitmqctl calls of a sample is missed, so tests that cut connections skip it,
    or pause it around the cut (`paused`). With several workers' settings, their connections
    are counted together, as the stand-in counts all their stores.
    """

    def __init__(self, sb: StandIn, *settings, interval_s: float = 0.5) -> None:
        self._sb = sb
        # Several workers' settings: their connections together against the one stand-in.
        self._connection_names = [f"memory-worker {s.worker.id}" for s in settings]
        self._interval_s = interval_s
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._sampling = asyncio.Lock()
        self._paused = False
        self.paused_samples = 0  # samples skipped while paused
        self.samples = 0
        self.exact = 0
        self.worst = 0  # the largest (surely waiting - unacked); above 0 is an early ack
        self.max_unacked = 0

    @property
    def early_acks(self) -> int:
        """Early acks seen in the worst sample."""
        return max(0, self.worst)

    async def sample(self) -> tuple[int, int]:
        """Take one sample; returns (stores surely waiting, unacked deliveries)."""
        before = self._sb.stats
        unacked = await unacked_deliveries(*self._connection_names)
        after = self._sb.stats
        started = after.calls - before.calls
        waiting = max(0, after.waiting - started)
        self.samples += 1
        if started == 0 and (after.in_flight, after.waiting) == (before.in_flight, before.waiting):
            self.exact += 1
        self.worst = max(self.worst, waiting - unacked)
        self.max_unacked = max(self.max_unacked, unacked)
        return waiting, unacked

    @contextlib.asynccontextmanager
    async def paused(self) -> AsyncIterator[None]:
        """No samples inside: for a fault that drops a worker's channel while its stores run.

        Entering waits for a sample in progress, so none straddles the fault. Those stores
        then wait at the stand-in with no unacked delivery behind them (the broker requeued
        it), which a sample would read as early acks; leave once they have ended.
        """
        async with self._sampling:
            self._paused = True
        try:
            yield
        finally:
            self._paused = False

    async def _run(self) -> None:
        while not self._stop.is_set():
            async with self._sampling:
                if self._paused:
                    self.paused_samples += 1
                else:
                    await self.sample()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), self._interval_s)

    async def __aenter__(self) -> EarlyAcks:
        self._task = asyncio.create_task(self._run())
        return self

    async def __aexit__(self, *exc: object) -> None:
        # Let the sample in progress finish rather than orphan its rabbitmqctl process.
        self._stop.set()
        assert self._task is not None
        await self._task

    def __str__(self) -> str:
        paused = f", paused={self.paused_samples}" if self.paused_samples else ""
        return (
            f"EarlyAcks(samples={self.samples}, exact={self.exact}, "
            f"max_unacked={self.max_unacked}, early_acks={self.early_acks}{paused})"
        )


def vhost(amqp_url: str) -> str:
    """The virtual host an AMQP URL names ("/" when it names none)."""
    path = urlparse(amqp_url).path
    return unquote(path[1:]) if len(path) > 1 else "/"


async def unacked_deliveries(*connection_names: str) -> int:
    """Deliveries unacked on the channels of the connections named any of `connection_names`."""
    pids = set(await connection_pids(*connection_names))
    raw = await rabbitmqctl(
        "list_channels", "--no-table-headers", "connection", "messages_unacknowledged"
    )
    rows = (line.rsplit("\t", 1) for line in raw.splitlines() if "\t" in line)
    return sum(int(count) for pid, count in rows if pid in pids)


async def unacked_in_queue(queue: str, vhost: str = "/") -> int:
    """The queue's own `messages_unacknowledged` (refreshed periodically for quorum queues)."""
    raw = await rabbitmqctl(
        "list_queues", "-p", vhost, "--no-table-headers", "name", "messages_unacknowledged"
    )
    for line in raw.splitlines():
        name, _, count = line.rpartition("\t")
        if name == queue:
            return int(count)
    raise AssertionError(f"queue {queue!r} not found by rabbitmqctl in vhost {vhost!r}")


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


async def connection_pids(*connection_names: str) -> list[str]:
    """Erlang pids of the broker connections whose client named itself one of the names."""
    raw = await rabbitmqctl("list_connections", "pid", "client_properties")
    wanted = [f'{{"connection_name","{name}"}}' for name in connection_names]
    return [
        line.split("\t", 1)[0] for line in raw.splitlines() if any(name in line for name in wanted)
    ]


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


def broker_address(amqp_url: str) -> tuple[str, int]:
    """Host and port of an AMQP URL."""
    parsed = urlparse(amqp_url)
    return parsed.hostname or "127.0.0.1", parsed.port or 5672
