"""aio-pika wiring: the consuming channel, QoS, the subscription, its recovery, pause/resume.

The consumer subscribes on aiormq's channel under aio-pika's robust one: aio-pika would wrap
each delivery in an `IncomingMessage` and a second task (~30 µs a message, a tenth of the
worker's CPU at 0 ms), and the pipeline needs only the body and three properties. aio-pika
still owns the connection, its recovery and the channel; the subscription follows the channel
through a reopen callback. How a delivery is settled on the broker is `worker.settle`'s.

A broker `basic.cancel` (consumer timeout, queue deleted, its node leaving) retires that
channel: nothing more is settled or started on it, and it is closed at once, so the broker
requeues all it held; then the consumer subscribes on a new one. RabbitMQ 4.3 keeps the
channel open after a consumer timeout, and an ack there re-activates the cancelled consumer.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
from collections.abc import Callable, Coroutine
from typing import Any

import aiormq
import structlog
from aio_pika.abc import AbstractQueue, AbstractRobustChannel, AbstractRobustConnection
from aio_pika.exceptions import CONNECTION_EXCEPTIONS
from aiormq.abc import DeliveredMessage

from worker.acks import AckBatcher
from worker.broker import CONFIRM_TIMEOUT_S
from worker.dispatch import Dispatcher
from worker.settle import AmqpDelivery, Outbox
from worker.topology import Topology

log = structlog.get_logger("worker.consumer")
BROKER_CALL_TIMEOUT_S = 10.0
# Waited before the first attempt too: made at once after a deleted queue's cancel, it passed
# the existence check on RabbitMQ 4.3, then failed with NOT_FOUND (the deletion under way).
RECOVERY_FIRST_S = 1.0  # doubles after each failed attempt
RECOVERY_MAX_S = 30.0


class Consumer:
    """Consumes the work queue on one channel with the prefetch `Settings.prefetch` derives."""

    def __init__(
        self,
        connection: AbstractRobustConnection,
        topology: Topology,
        dispatcher: Dispatcher,
        prefetch: int,
        worker_id: str,
        redeclare: bool = True,
        on_resubscribe: Callable[[], None] | None = None,
        on_cancel: Callable[[], None] | None = None,
    ) -> None:
        self._connection = connection
        self._topology = topology
        self._dispatcher = dispatcher
        self._prefetch = prefetch
        self._worker_id = worker_id
        self._redeclare = redeclare
        self._on_resubscribe = on_resubscribe or (lambda: None)
        self._on_cancel = on_cancel or (lambda: None)
        self._acks: AckBatcher | None = None
        self._retired: aiormq.abc.AbstractChannel | None = None  # its consumer was cancelled
        self._recovery: asyncio.Task[None] | None = None
        self._channel: AbstractRobustChannel | None = None
        self._queue: AbstractQueue | None = None
        self._tag: str | None = None
        self._on_delivered: Callable[[DeliveredMessage], Coroutine[Any, Any, None]] | None = None
        self._consuming_prefetch = prefetch
        self._stopped = False
        # Pause, resume and cancel run one at a time, so a resume never outlives a cancel.
        self._lock = asyncio.Lock()

    async def start(self) -> None:
        """Open the channel, set QoS, and start consuming."""
        await self._open(self._prefetch)

    async def _open(self, prefetch: int) -> None:
        # Without on_return_raises an unroutable retry or dead letter would count as confirmed.
        channel = await self._connection.channel(publisher_confirms=True, on_return_raises=True)
        self._channel = channel
        await channel.set_qos(prefetch_count=prefetch)
        outbox = Outbox(channel, self._topology, self._worker_id)
        await outbox.open()
        # Declared through aio-pika, so its recovery checks the queue before a reopen.
        self._queue = await channel.declare_queue(self._topology.queue, passive=True)

        async def on_delivered(message: DeliveredMessage) -> None:
            if message.channel is self._retired:
                return  # read before the cancel: the broker requeues it when the channel closes
            acks = self._acks
            if acks is None or acks.channel is not message.channel:
                # A reconnect brings a new channel, whose delivery tags start again at 1.
                acks = self._acks = AckBatcher(message.channel)
            self._dispatcher.submit(AmqpDelivery(message, outbox, acks))

        self._on_delivered = on_delivered
        await self._watch_cancel(channel)
        channel.reopen_callbacks.add(self._reopened)
        self._tag = await self._subscribe(channel, None)

    async def _subscribe(self, channel: AbstractRobustChannel, tag: str | None) -> str:
        """Consume the queue on the channel's current aiormq channel; returns the tag."""
        if self._on_delivered is None:
            raise RuntimeError("Consumer.start() was not awaited")
        underlay = await channel.get_underlay_channel()
        ok = await underlay.basic_consume(
            self._topology.queue,
            self._on_delivered,
            consumer_tag=tag,
            arguments=self._topology.consumer_arguments(),
        )
        if ok.consumer_tag is None:
            raise RuntimeError("the broker answered basic.consume without a consumer tag")
        return str(ok.consumer_tag)

    async def _reopened(self, channel: AbstractRobustChannel | None, /) -> None:
        # aio-pika restores the channel, QoS included, after a reconnect, but not a
        # subscription made on the channel beneath it: that is ours to restore, same tag, unless
        # the consumer is paused or stopped meanwhile.
        await self._watch_cancel(channel)
        if channel is None or channel is not self._channel or self._stopped:
            return
        if self._tag is not None:
            self._tag = await self._subscribe(channel, self._tag)

    @property
    def lost(self) -> bool:
        """Whether the broker cancelled the consumer and it is not consuming again yet."""
        return self._recovery is not None and not self._recovery.done()

    async def _watch_cancel(self, channel: AbstractRobustChannel | None, /) -> None:
        # aio-pika swaps the underlying channel on every reconnect, so each one is watched.
        if channel is None:
            return
        underlay = await channel.get_underlay_channel()
        watch = functools.partial(self._cancelled_by_broker, underlay)
        underlay.on_consumer_cancel_callbacks.add(watch)

    def _cancelled_by_broker(
        self, underlay: aiormq.abc.AbstractChannel, frame: aiormq.spec.Basic.Cancel
    ) -> None:
        """The broker ended our subscription (queue deleted, consumer timeout on 4.3+, ...).

        Runs in aiormq's frame reader before any later frame of the channel, so no ack leaves
        after the cancel; without it the worker would sit idle and look healthy.
        """
        if self._stopped or frame.consumer_tag != self._tag or self.lost:
            return
        self._retired = underlay
        acks = self._acks
        dropped_acks = acks.retire() if acks is not None and acks.channel is underlay else 0
        dropped = self._dispatcher.discard_waiting(
            lambda d: isinstance(d, AmqpDelivery) and d.acks.channel is underlay
        )
        log.warning(
            "consumer_cancelled_by_broker",
            queue=self._topology.queue,
            tag=frame.consumer_tag,
            acks_dropped=dropped_acks,
            not_started=dropped,
            in_flight=self._dispatcher.in_flight,
        )
        self._on_cancel()
        self._recovery = asyncio.create_task(self._recover())

    async def _recover(self) -> None:
        """Consume again, redeclaring the topology when allowed; back off while that fails."""
        queue = self._topology.queue
        delay_s = RECOVERY_FIRST_S
        # Closed at once, not at the reopen: the broker requeues what it held for the other
        # consumers now, and on 4.3 each delivery left on it would time out and cancel again.
        await self._close_channel()
        while not self._stopped:
            await asyncio.sleep(delay_s)
            try:
                if await self._subscribed():
                    log.info("consumer_restored", queue=queue)
                    return
                if self._redeclare:
                    await self._topology.declare(self._connection)
                else:
                    await self._topology.check(self._connection)
                if await self._reopen():
                    log.warning("consumer_reopened", queue=queue, redeclared=self._redeclare)
                return
            except Exception as exc:  # whatever it is, this watch must not die quietly
                delay_s = min(delay_s * 2, RECOVERY_MAX_S)
                log.warning(
                    "consumer_recovery_failed",
                    queue=queue,
                    redeclare=self._redeclare,
                    error=str(exc) or repr(exc),
                    retry_in_s=delay_s,
                )

    async def _subscribed(self) -> bool:
        channel, tag = self._channel, self._tag
        if channel is None or tag is None or channel.is_closed:
            return False
        underlay = await channel.get_underlay_channel()
        return isinstance(underlay, aiormq.Channel) and tag in underlay.consumers

    async def _reopen(self) -> bool:
        """Drop the channel and consume on a new one, with the prefetch last applied."""
        if self._channel is not None:
            # A resume that met the missing queue closed the channel, and the next one waits,
            # lock held, for aio-pika to restore it, which it may not retry: ask for it now.
            await asyncio.wait_for(self._channel.restore(), CONFIRM_TIMEOUT_S)
        async with self._lock:
            if self._stopped:
                return False
            await self._close_channel()
            # Subscribed even if the breaker paused us meanwhile: the service's steering loop
            # pauses again on its next pass, while a resume that failed on the dead channel
            # may never be retried.
            self._tag = None
            await self._open(self._consuming_prefetch)
            self._on_resubscribe()
            return True

    async def _close_channel(self) -> None:
        """Close the consuming channel; its unacked deliveries go back to the queue (if any)."""
        if self._channel is not None:
            with contextlib.suppress(TimeoutError, *CONNECTION_EXCEPTIONS):
                await asyncio.wait_for(self._channel.close(), CONFIRM_TIMEOUT_S)

    @property
    def prefetch(self) -> int:
        """The prefetch of the current (or last) subscription."""
        return self._consuming_prefetch

    @property
    def consuming(self) -> bool:
        """Whether the consumer is subscribed now."""
        return self._tag is not None

    @property
    def stopped(self) -> bool:
        """Whether `cancel()` ended consuming for good."""
        return self._stopped

    async def pause(self) -> None:
        """Stop new deliveries for a while (the sink's breaker is open)."""
        async with self._lock:
            await self._cancel()

    async def resume(self, prefetch: int) -> None:
        """Consume again with `prefetch`; a no-op if already so."""
        async with self._lock:
            if self._stopped or self._queue is None or self._channel is None:
                return
            if self._tag is not None and prefetch == self._consuming_prefetch:
                return
            await self._cancel()
            try:
                # A robust channel waits for its reconnect: bounded, so the lock is never held
                # for an outage (a shutdown waits for it); the caller tries again later.
                async with asyncio.timeout(BROKER_CALL_TIMEOUT_S):
                    # A per-consumer prefetch applies to consumers started after it is set.
                    await self._channel.set_qos(prefetch_count=prefetch)
                    self._tag = await self._subscribe(self._channel, None)
            except (*CONNECTION_EXCEPTIONS, TimeoutError) as exc:
                log.warning("consumer_resume_failed", error=repr(exc))
                return
            self._consuming_prefetch = prefetch
            self._on_resubscribe()

    async def cancel(self) -> None:
        """Stop new deliveries for good; what was delivered stays ours to settle."""
        async with self._lock:
            self._stopped = True
            await self._cancel()

    async def _cancel(self) -> None:
        if self._channel is not None and self._tag is not None:
            try:
                async with asyncio.timeout(BROKER_CALL_TIMEOUT_S):
                    underlay = await self._channel.get_underlay_channel()
                    await underlay.basic_cancel(self._tag)
            except (*CONNECTION_EXCEPTIONS, TimeoutError) as exc:
                log.warning("consumer_cancel_failed", error=repr(exc))
            self._tag = None

    async def close(self) -> None:
        """Close the channel; the broker requeues anything still unacked on it."""
        if self._recovery is not None:
            self._recovery.cancel()
            await asyncio.gather(self._recovery, return_exceptions=True)
        if self._acks is not None:
            # Acks of the last loop turns must reach the broker before the channel closes,
            # or it redelivers messages that were stored.
            await self._acks.flush()
        if self._channel is not None and not self._channel.is_closed:
            await self._channel.close()
