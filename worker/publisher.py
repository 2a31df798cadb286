"""Confirmed publishing of memory items: for pool managers, replays, the demo and load tests.

A publish returns only once the broker confirmed it; an unroutable item (mandatory flag) or a
broker nack raises `PublishFailed`. Nothing is ever assumed published.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import TracebackType
from typing import Any, Self

import aio_pika
from aio_pika.abc import AbstractChannel, AbstractConnection, AbstractExchange
from aio_pika.exceptions import CONNECTION_EXCEPTIONS

from worker.models import MemoryItem, encode_item, idempotency_key, item_from_dict
from worker.topology import Topology

CONFIRM_TIMEOUT_S = 30.0


class PublishFailed(Exception):
    """The broker did not confirm a publish."""


class Publisher:
    """Publishes items to the work exchange on a channel with publisher confirms."""

    def __init__(self, connection: AbstractConnection, topology: Topology) -> None:
        self._connection = connection
        self._topology = topology
        self._channel: AbstractChannel | None = None
        self._exchange: AbstractExchange | None = None

    async def __aenter__(self) -> Self:
        self._channel = await self._connection.channel(publisher_confirms=True)
        self._exchange = await self._channel.get_exchange(self._topology.exchange, ensure=False)
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._channel is not None and not self._channel.is_closed:
            await self._channel.close()

    async def publish_item(self, item: MemoryItem | Mapping[str, Any]) -> str:
        """Validate and publish one item; returns its idempotency key (the message id)."""
        model = item if isinstance(item, MemoryItem) else item_from_dict(item)
        body = encode_item(model)
        key = idempotency_key(None, body)
        await self.publish_raw(body, message_id=key)
        return key

    async def publish_raw(
        self,
        body: bytes,
        *,
        content_type: str | None = "application/json",
        message_id: str | None = None,
        headers: Mapping[str, Any] | None = None,
        routing_key: str | None = None,
    ) -> None:
        """Publish bytes as they are (replays and tests); raise `PublishFailed` if unconfirmed."""
        assert self._exchange is not None, "use `async with Publisher(...)`"
        message = aio_pika.Message(
            body=body,
            content_type=content_type,
            message_id=message_id,
            headers=dict(headers or {}),
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        )
        try:
            await self._exchange.publish(
                message,
                routing_key or self._topology.queue,
                mandatory=True,
                timeout=CONFIRM_TIMEOUT_S,
            )
        except (*CONNECTION_EXCEPTIONS, TimeoutError) as exc:
            raise PublishFailed(f"publish not confirmed: {exc!r}") from exc
