"""aio-pika wiring: the consuming channel, QoS, the consumer, and settling on the broker.

The consumer subscribes on aiormq's channel under aio-pika's robust one: aio-pika would wrap
each delivery in an `IncomingMessage` and a second task (~30 µs a message, a tenth of the
worker's CPU at 0 ms), and the pipeline needs only the body and three properties. aio-pika
still owns the connection, its recovery and the channel; the subscription follows the channel
through a reopen callback.

Delivery rules, in the order they happen:
- a retry or dead letter is *published with confirms first* and the original acked after, so a
  failed publish loses nothing (at worst a duplicate copy);
- a settlement on a channel that has closed is counted and dropped, never retried: the broker
  has already requeued that delivery, and its tag means nothing on a new channel.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Coroutine, Mapping
from typing import Any, cast

import aio_pika
import aiormq
import structlog
from aio_pika.abc import (
    AbstractChannel,
    AbstractExchange,
    AbstractIncomingMessage,
    AbstractQueue,
    AbstractRobustChannel,
    AbstractRobustConnection,
)
from aio_pika.exceptions import CONNECTION_EXCEPTIONS, DeliveryError, PublishError
from aio_pika.message import IncomingMessage
from aiormq import spec
from aiormq.abc import DeliveredMessage

from worker.acks import AckBatcher
from worker.broker import CONFIRM_TIMEOUT_S
from worker.headers import dead_letter_headers, failure_headers
from worker.outcome import Action
from worker.pipeline import Dispatcher, Verdict
from worker.topology import Topology

log = structlog.get_logger("worker.consumer")
BROKER_CALL_TIMEOUT_S = 10.0
RECOVERY_FIRST_S = 1.0  # aio-pika re-consumes on its own when the queue still exists
RECOVERY_MAX_S = 30.0


def copy_message(message: AbstractIncomingMessage, headers: Mapping[str, Any]) -> aio_pika.Message:
    """A persistent copy of a delivered message: same body and properties, new headers."""
    return aio_pika.Message(
        body=message.body,
        headers=dict(headers),
        content_type=message.content_type,
        content_encoding=message.content_encoding,
        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        priority=message.priority,
        correlation_id=message.correlation_id,
        reply_to=message.reply_to,
        message_id=message.message_id,
        timestamp=message.timestamp,
        type=message.type,
        user_id=message.user_id,
        app_id=message.app_id,
    )


class Outbox:
    """Publishes retries and dead letters on the consuming channel, with confirms."""

    def __init__(self, channel: AbstractChannel, topology: Topology, worker_id: str) -> None:
        self._channel = channel
        self._topology = topology
        self._worker_id = worker_id
        self._retry: AbstractExchange | None = None
        self._dlx: AbstractExchange | None = None

    async def open(self) -> None:
        """Look up the exchanges once."""
        self._retry = await self._channel.get_exchange(self._topology.retry_exchange, ensure=False)
        self._dlx = await self._channel.get_exchange(
            self._topology.dead_letter_exchange, ensure=False
        )

    @staticmethod
    def _failure_headers(verdict: Verdict) -> dict[str, Any]:
        detail = verdict.outcome.detail
        return failure_headers(verdict.attempt, verdict.first_failure_ts, detail, time.time())

    async def retry(self, message: AbstractIncomingMessage, verdict: Verdict) -> None:
        """Park a copy in the wait queue of its delay tier."""
        if self._retry is None:
            raise RuntimeError("Outbox.open() was not awaited")
        # x-death belongs to the broker; the retry carries our own attempt counter instead.
        headers = {k: v for k, v in (message.headers or {}).items() if k != "x-death"}
        headers.update(self._failure_headers(verdict))
        tier = self._topology.tier_for(verdict.decision.delay_s)
        await self._retry.publish(
            copy_message(message, headers), tier.queue, mandatory=True, timeout=CONFIRM_TIMEOUT_S
        )

    async def dead_letter(self, message: AbstractIncomingMessage, verdict: Verdict) -> None:
        """Publish the original body and headers plus why it failed to the DLQ."""
        if self._dlx is None or verdict.decision.reason is None:
            raise RuntimeError("dead letter without an opened outbox or a reason")
        headers = dict(message.headers or {})
        headers.update(self._failure_headers(verdict))
        reason = verdict.decision.reason.value
        headers.update(dead_letter_headers(reason, self._worker_id, self._topology.queue))
        await self._dlx.publish(
            copy_message(message, headers),
            self._topology.dead_letter_queue,
            mandatory=True,
            timeout=CONFIRM_TIMEOUT_S,
        )


class AmqpDelivery:
    """A delivery read off aiormq's channel, adapted to the pipeline's `Delivery` protocol."""

    __slots__ = (
        "_acks",
        "_message",
        "_outbox",
        "_tag",
        "body",
        "content_type",
        "headers",
        "message_id",
    )

    def __init__(self, message: DeliveredMessage, outbox: Outbox, acks: AckBatcher) -> None:
        properties = message.header.properties
        self._message = message
        self._outbox = outbox
        self._acks = acks
        # Consumed with acks, so every delivery has a tag.
        self._tag = cast(int, cast(spec.Basic.Deliver, message.delivery).delivery_tag)
        self.body = message.body
        self.content_type: str | None = properties.content_type
        self.message_id: str | None = properties.message_id
        self.headers: Mapping[str, Any] = properties.headers or {}
        acks.delivered(self._tag)

    async def settle(self, verdict: Verdict) -> bool:
        """Settle on the broker exactly once; False when the channel had already closed."""
        action = verdict.decision.action
        try:
            if action is Action.RETRY:
                await self._outbox.retry(IncomingMessage(self._message), verdict)
            elif action is Action.DEAD_LETTER:
                await self._outbox.dead_letter(IncomingMessage(self._message), verdict)
        except (DeliveryError, PublishError, TimeoutError) as exc:
            # The copy was not confirmed, so the original must stay: hand it back.
            log.error("publish_unconfirmed", action=action.value, error=repr(exc))
            action = Action.REQUEUE
        except CONNECTION_EXCEPTIONS as exc:
            return _closed(action.value, exc)
        if action is Action.REQUEUE:
            settled = await self._acks.nack(self._tag)
        else:
            settled = self._acks.ack(self._tag)
        return settled or _closed(action.value, None)


def _closed(action: str, exc: BaseException | None) -> bool:
    """Log a settlement the closed channel refused; never retried, the broker requeued it."""
    error = repr(exc) if exc is not None else "channel closed"
    log.warning("settle_on_closed_channel", action=action, error=error, redelivery_expected=True)
    return False


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
    ) -> None:
        self._connection = connection
        self._topology = topology
        self._dispatcher = dispatcher
        self._prefetch = prefetch
        self._worker_id = worker_id
        self._redeclare = redeclare
        self._on_resubscribe = on_resubscribe
        self._acks: AckBatcher | None = None
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
            self._topology.queue, self._on_delivered, consumer_tag=tag
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
        underlay.on_consumer_cancel_callbacks.add(self._cancelled_by_broker)

    def _cancelled_by_broker(self, frame: aiormq.spec.Basic.Cancel) -> None:
        """The broker ended our subscription (queue deleted, consumer timeout on 4.3+, ...).

        aio-pika re-consumes by itself only while the queue exists, and says so at debug level
        only; without a watch the worker would sit idle and look healthy.
        """
        if self._stopped or frame.consumer_tag != self._tag or self.lost:
            return
        log.warning(
            "consumer_cancelled_by_broker", queue=self._topology.queue, tag=frame.consumer_tag
        )
        self._recovery = asyncio.create_task(self._recover())

    async def _recover(self) -> None:
        """Consume again, redeclaring the topology when allowed; back off while that fails."""
        queue = self._topology.queue
        delay_s = RECOVERY_FIRST_S
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
            if self._channel is not None:
                # Its unacked deliveries go back to the queue (if it still exists).
                with contextlib.suppress(TimeoutError, *CONNECTION_EXCEPTIONS):
                    await asyncio.wait_for(self._channel.close(), CONFIRM_TIMEOUT_S)
            # Subscribed even if the breaker paused us meanwhile: the service's steering loop
            # pauses again on its next pass, while a resume that failed on the dead channel
            # may never be retried.
            self._tag = None
            await self._open(self._consuming_prefetch)
            self._resubscribed()
            return True

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
            self._resubscribed()

    def _resubscribed(self) -> None:
        if self._on_resubscribe is not None:
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
