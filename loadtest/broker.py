"""A run's broker side: settings on unique names, its queues and items, confirmed publishing."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Self

import aio_pika
import orjson
from aio_pika.abc import AbstractRobustConnection
from aio_pika.exceptions import CONNECTION_EXCEPTIONS

from loadtest.common import AMQP_URL, BenchError
from worker.models import decode_item
from worker.settings import Settings
from worker.testing import valid_item
from worker.topology import Topology

PUBLISH_WINDOW = 1000
FILLER = "Pool worker finished its task; summary of what it learned goes here. " * 2


def bench_settings(name: str, sink_url: str, concurrency: int) -> Settings:
    """Settings on the run's unique names: one short retry tier, fast startup, JSON logs."""
    return Settings(
        pools={"max_concurrent_memory_insertions": concurrency, "session_buddy_url": sink_url},
        rabbitmq={
            "url": AMQP_URL,
            "exchange": name,
            "queue": f"{name}.items",
            "dead_letter_queue": f"{name}.items.dlq",
            "startup_wait_s": 10,
        },
        retry={"tiers_s": [1.0]},
        worker={"ops_port": -1, "grace_s": 10, "log_format": "json"},
    )


@dataclass(frozen=True, slots=True)
class QueueDepths:
    """Messages ready in the run's queues (unacked ones are not counted by the broker)."""

    work: int
    retrying: int
    dead_lettered: int


class BenchQueues:
    """A run's exchanges and queues: declared at entry, deleted at exit."""

    def __init__(self, connection: AbstractRobustConnection, settings: Settings) -> None:
        self.connection = connection
        self.settings = settings
        self.topology = Topology.from_settings(settings)

    async def __aenter__(self) -> Self:
        await self.topology.declare(self.connection)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.delete()

    async def _count(self, name: str) -> int:
        async with self.connection.channel() as channel:
            queue = await channel.declare_queue(name, passive=True)
            count = queue.declaration_result.message_count
            return int(count or 0)

    async def depths(self) -> QueueDepths:
        """Ready messages in the work queue, the retry tiers and the DLQ."""
        t = self.topology
        retrying = 0
        for tier in t.tiers:
            retrying += await self._count(tier.queue)
        return QueueDepths(
            await self._count(t.queue), retrying, await self._count(t.dead_letter_queue)
        )

    async def dead_lettered(self) -> int:
        """Messages in the DLQ."""
        return await self._count(self.topology.dead_letter_queue)

    async def delete(self) -> None:
        """Delete every queue and exchange of the run (idempotent, best effort)."""
        with contextlib.suppress(*CONNECTION_EXCEPTIONS):
            await self.topology.delete(self.connection)


def item_body(run: str, seq: int) -> bytes:
    """A valid memory item of ~150 characters of content, unique per (run, seq)."""
    item = valid_item(
        f"[{run} #{seq}] {FILLER}",
        pool_id="bench-pool",
        pool_type="mahavishnu",
        worker_id=f"pool-worker-{seq % 8}",
        timestamp=1_764_000_000.0 + seq,
        duration_seconds=1.5,
        exit_code=0,
    )
    return orjson.dumps(item)


def check_item_body() -> None:
    """Fail fast if the worker would refuse the benchmark's items."""
    decode_item(item_body("bench-check", 0), "application/json")


def message_id(run: str, seq: int) -> str:
    """The message id (the worker's idempotency key) of item `seq` of a run."""
    return f"{run}-{seq:07d}"


class Publisher:
    """Confirmed publishing with many confirms outstanding; records when each item went out."""

    def __init__(self, connection: AbstractRobustConnection, topology: Topology) -> None:
        self._connection = connection
        self._topology = topology
        self._window = asyncio.Semaphore(PUBLISH_WINDOW)
        self._tasks: set[asyncio.Task[None]] = set()
        self.sent_at: dict[str, float] = {}
        self.sent_wall: dict[str, float] = {}
        self.confirmed = 0
        self.failed = 0

    @contextlib.asynccontextmanager
    async def open(self) -> AsyncIterator[Self]:
        """A publishing channel with confirms; waits for every outstanding confirm at exit."""
        async with self._connection.channel(publisher_confirms=True) as channel:
            self._exchange = await channel.get_exchange(self._topology.exchange, ensure=False)
            try:
                yield self
            finally:
                await self.flush()

    async def publish(self, key: str, body: bytes) -> None:
        """Send one item without waiting for its confirm (at most PUBLISH_WINDOW outstanding)."""
        await self._window.acquire()
        self.sent_at[key] = time.monotonic()
        self.sent_wall[key] = time.time()
        task = asyncio.create_task(self._send(key, body))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _send(self, key: str, body: bytes) -> None:
        message = aio_pika.Message(
            body,
            content_type="application/json",
            message_id=key,
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        )
        try:
            await self._exchange.publish(message, self._topology.queue, mandatory=True, timeout=60)
            self.confirmed += 1
        except Exception:  # counted: an unconfirmed item is not "published" in the ledger
            self.failed += 1
            self.sent_at.pop(key, None)
        finally:
            self._window.release()

    async def flush(self) -> None:
        """Wait for every outstanding confirm."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)


async def connect() -> AbstractRobustConnection:
    """The runner's own broker connection."""
    try:
        return await aio_pika.connect_robust(AMQP_URL, timeout=10)
    except (*CONNECTION_EXCEPTIONS, TimeoutError) as exc:
        raise BenchError(f"no RabbitMQ at {AMQP_URL}: {exc!r}") from None
