"""The dead-letter queue session: read it in order without disturbing it, hold, hand back.

Reading leaves the queue as it was found. One channel consumes with a prefetch as large as the
queue and never acks what it only looked at; closing the channel hands every one of those back.
Measured on RabbitMQ 3.10, classic and quorum: messages handed back that way, or by a killed
process's dead connection, keep their order; messages taken with basic.get come back shuffled
on a quorum queue, so nothing here uses basic.get. Another consumer on the DLQ keeps what it
has taken: a read sees only what it leaves (`Snapshot.consumers` says whether there is one).

A quorum queue's channel holds back acks beyond 32 unapplied ones and drops them if the channel
closes first (the messages come back: duplicates, never losses). Cancelling the consumer sends
them and waits until the queue has applied them, so a session always cancels before it closes.

Replay and purge (`worker.dlq_edit`) read through a session and ack what they take.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from types import TracebackType
from typing import Self

import aio_pika
import aiormq
from aio_pika.abc import AbstractChannel, AbstractConnection, AbstractIncomingMessage
from aio_pika.exceptions import CONNECTION_EXCEPTIONS

from worker.dlq_model import DeadLetter, Snapshot, current_ms, read_letter

# AMQP's prefetch count is a 16-bit field: one channel can hold no more unacked messages.
MAX_HOLD = 65_535
IDLE_S = 1.0
SETTLE_TIMEOUT_S = 5.0

Progress = Callable[[int, int], None]


class DlqError(Exception):
    """The dead-letter queue cannot be read (missing, or the broker closed the channel)."""


@dataclass(frozen=True, slots=True)
class Held:
    """A delivered dead letter still unacked on the session's channel."""

    letter: DeadLetter
    message: AbstractIncomingMessage


class DlqSession:
    """Reads the DLQ in order on one channel, holding everything; leaving hands back the rest."""

    def __init__(
        self,
        connection: AbstractConnection,
        queue: str,
        *,
        limit: int | None = None,
        idle_s: float = IDLE_S,
    ) -> None:
        self._connection = connection
        self._queue_name = queue
        self._limit = min(limit or MAX_HOLD, MAX_HOLD)
        self._idle_s = idle_s
        self._channel: AbstractChannel | None = None
        self._queue: aio_pika.abc.AbstractQueue | None = None
        self._tag: str | None = None
        self._inbox: asyncio.Queue[AbstractIncomingMessage] = asyncio.Queue()
        self._delivered = 0
        #: Dead letters that arrived after the read began (a replayed one failing again among
        #: them): held like the rest and handed back at the end, but never read in order.
        self.late: list[DeadLetter] = []
        self.depth = 0
        self.consumers = 0
        self.target = 0

    async def __aenter__(self) -> Self:
        channel = await self._connection.channel(publisher_confirms=False)
        self._channel = channel
        try:
            queue = await channel.declare_queue(self._queue_name, passive=True)
        except aiormq.exceptions.ChannelNotFoundEntity:
            raise DlqError(f"queue {self._queue_name!r} does not exist") from None
        self._queue = queue
        declared = queue.declaration_result
        self.depth = declared.message_count or 0
        self.consumers = declared.consumer_count or 0
        self.target = min(self.depth, self._limit)
        if self.target:
            # A prefetch of 0 would mean "unlimited", which quorum queues cap at 2,000.
            await channel.set_qos(prefetch_count=self.target)
            self._tag = await queue.consume(self._deliver)
        return self

    async def _deliver(self, message: AbstractIncomingMessage) -> None:
        self._delivered += 1
        if self._delivered > self.target:
            # Each ack frees a prefetch slot, so what arrives meanwhile is delivered to us too.
            self.late.append(read_letter(message, -1))
            return
        self._inbox.put_nowait(message)

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        channel = self._channel
        if channel is None or channel.is_closed:
            return
        # A channel that already failed has nothing to flush; the broker requeued its messages.
        with contextlib.suppress(*CONNECTION_EXCEPTIONS):
            if self._queue is not None and self._tag is not None:
                await self._queue.cancel(self._tag)
            await channel.close()
            if self._tag is not None:
                await self._wait_until_returned()

    async def _wait_until_returned(self) -> None:
        """Wait until the queue has taken back what this session held.

        close-ok does not mean the messages are back: a quorum queue returns them a moment
        later, when it drops the consumer, and a read starting in between would find the queue
        empty. Our consumer leaving the count is the sign; with other consumers coming and
        going the count may never show it, so the wait is bounded.
        """
        deadline = time.monotonic() + SETTLE_TIMEOUT_S
        async with self._connection.channel(publisher_confirms=False) as channel:
            while time.monotonic() < deadline:
                queue = await channel.declare_queue(self._queue_name, passive=True)
                if (queue.declaration_result.consumer_count or 0) <= self.consumers:
                    return
                await asyncio.sleep(0.01)

    async def __aiter__(self) -> AsyncIterator[Held]:
        position = 0
        while position < self.target:
            try:
                message = await asyncio.wait_for(self._inbox.get(), self._idle_s)
            except TimeoutError:
                if self._channel is not None and self._channel.is_closed:
                    raise DlqError("the broker closed the channel during the read") from None
                return  # another consumer took the rest, or they were never there
            yield Held(read_letter(message, position), message)
            position += 1

    async def ack(self, held: Held) -> None:
        """Remove a held dead letter from the queue."""
        await held.message.ack()


async def read(
    connection: AbstractConnection,
    queue: str,
    *,
    limit: int | None = None,
    idle_s: float = IDLE_S,
    on_progress: Progress | None = None,
) -> Snapshot:
    """Read the DLQ without changing it: every message goes back, in order."""
    letters: list[DeadLetter] = []
    async with DlqSession(connection, queue, limit=limit, idle_s=idle_s) as session:
        async for held in session:
            letters.append(held.letter)
            if on_progress is not None:
                on_progress(len(letters), session.target)
    return Snapshot(queue, session.depth, session.consumers, tuple(letters), current_ms())
