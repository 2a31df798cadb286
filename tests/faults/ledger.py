"""What fault tests share: the ledger, waiting for a drained run, broker tools, a TCP proxy."""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass, field
from urllib.parse import urlparse, urlunparse

from tests.integration.helpers import depth, take_all
from worker.standin import StandIn
from worker.topology import H_REASON, Topology

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


async def rabbitmqctl(*args: str) -> str:
    """Run `rabbitmqctl -q ARGS` and return its output; fail the test if it fails."""
    process = await asyncio.create_subprocess_exec(
        "rabbitmqctl", "-q", *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await asyncio.wait_for(process.communicate(), 30)
    assert process.returncode == 0, err.decode()
    return out.decode()


async def connection_pids(connection_name: str) -> list[str]:
    """Erlang pids of the broker connections whose client named itself `connection_name`."""
    raw = await rabbitmqctl("list_connections", "pid", "client_properties")
    wanted = f'{{"connection_name","{connection_name}"}}'
    return [line.split("\t", 1)[0] for line in raw.splitlines() if wanted in line]


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
