"""How a verdict becomes broker operations: publish a retry or dead letter, then ack or nack.

Delivery rules, in the order they happen:
- a retry or dead letter is *published with confirms first* and the original acked after, so a
  failed publish loses nothing (at worst a duplicate copy);
- a settlement on a channel that has closed is counted and dropped, never retried: the broker
  has already requeued that delivery, and its tag means nothing on a new channel;
- so is one on a channel whose consumer the broker cancelled (`AckBatcher.retire`): the
  consumer closes that channel, so the delivery comes back, and a retry or dead letter
  published for it now would be a second copy.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any, cast

import aio_pika
import structlog
from aio_pika.abc import AbstractChannel, AbstractExchange, AbstractIncomingMessage
from aio_pika.exceptions import CONNECTION_EXCEPTIONS, DeliveryError, PublishError
from aio_pika.message import IncomingMessage
from aiormq import spec
from aiormq.abc import DeliveredMessage

from worker.acks import AckBatcher
from worker.broker import CONFIRM_TIMEOUT_S
from worker.headers import dead_letter_headers, failure_headers
from worker.outcome import Action
from worker.pipeline import Verdict
from worker.topology import Topology

log = structlog.get_logger("worker.settle")
CANCELLED = "consumer cancelled by the broker"  # why a settlement after a cancel was dropped


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

    @property
    def acks(self) -> AckBatcher:
        """The settler of the channel this delivery came on."""
        return self._acks

    async def settle(self, verdict: Verdict) -> bool:
        """Settle on the broker exactly once; False when the channel had already closed."""
        action = verdict.decision.action
        if self._acks.retired:
            return _closed(action.value, None, CANCELLED)
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
        if settled:
            return True
        why = CANCELLED if self._acks.retired else "channel closed"
        return _closed(action.value, None, why)


def _closed(action: str, exc: BaseException | None, why: str = "channel closed") -> bool:
    """Log a settlement the closed channel refused; never retried, the broker requeued it."""
    error = repr(exc) if exc is not None else why
    log.warning("settle_on_closed_channel", action=action, error=error, redelivery_expected=True)
    return False
