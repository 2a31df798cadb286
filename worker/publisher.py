"""Confirmed publishing of memory items: for pool managers, replays, the demo and load tests.

A publish returns only once the broker confirmed it; anything else raises, so nothing is ever
assumed published:

    PublishFailed           the broker did not confirm the publish (a timeout, for one)
    ├── Unroutable          the mandatory publish came back: no queue is bound for it
    ├── Refused             the broker nacked it (a full quorum queue with reject-publish)
    ├── ConnectionLost      the connection closed before the confirm (robust: stayed away)
    └── BatchFailed         some items of `publish_many` failed; `.failures` says which
    DecodeError             (worker.models) the item is invalid; it was never sent
    BrokerUnavailable       (worker.broker) `open_publisher` could open no connection at all
    TopologyError           (worker.topology) on opening: the exchange does not exist

A lost confirm does not mean the broker dropped the message, so a retry may store a duplicate;
the message id is the item's idempotency key, which the worker uses to drop such duplicates.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterable, AsyncIterator, Callable, Iterable, Mapping, Sequence
from contextlib import asynccontextmanager
from types import TracebackType
from typing import Any, Self

import aio_pika
import aiormq
from aio_pika.abc import (
    AbstractChannel,
    AbstractConnection,
    AbstractExchange,
    AbstractRobustChannel,
)
from aio_pika.exceptions import CONNECTION_EXCEPTIONS, DeliveryError, PublishError

from worker.broker import CONFIRM_TIMEOUT_S, connect
from worker.confirms import (
    BatchFailed,
    BatchResult,
    ConnectionLost,
    PublishFailed,
    PublishResult,
    Refused,
    Unroutable,
)
from worker.keys import DEFAULT_KEY_FIELDS, item_key
from worker.models import MemoryItem, encode_item, item_from_dict
from worker.outcome import Reason
from worker.sections import BlankContent
from worker.settings import Settings
from worker.strict_json import DecodeError
from worker.summary import BLANK_DETAIL, is_blank
from worker.topology import Topology, TopologyError

# The library API: the publisher and everything a publish can end as (defined in confirms).
__all__ = [
    "MAX_OUTSTANDING",
    "BatchFailed",
    "BatchResult",
    "ConnectionLost",
    "ItemLike",
    "PublishFailed",
    "PublishResult",
    "Publisher",
    "Refused",
    "Unroutable",
    "open_publisher",
]

MAX_OUTSTANDING = 256
#: Before a publish is sent again after a lost connection: aio-pika's recovery goes first.
RETRY_PAUSE_S = 0.1

ItemLike = MemoryItem | Mapping[str, Any]


class Publisher:
    """Publishes items to the work exchange on a channel with publisher confirms."""

    def __init__(
        self,
        connection: AbstractConnection,
        topology: Topology,
        *,
        confirm_timeout_s: float = CONFIRM_TIMEOUT_S,
        max_body_bytes: int | None = None,
        key_fields: Sequence[str] = DEFAULT_KEY_FIELDS,
        blank_content: BlankContent = "summarize",
    ) -> None:
        self._connection = connection
        self._topology = topology
        self._timeout_s = confirm_timeout_s
        self._max_body_bytes = max_body_bytes
        self._key_fields = tuple(key_fields)
        self._blank_content: BlankContent = blank_content
        self._channel: AbstractChannel | None = None
        self._exchange: AbstractExchange | None = None
        self._down_since: float | None = None  # when a robust connection was lost, if it is

    async def __aenter__(self) -> Self:
        # on_return_raises: without it aio-pika reports an unroutable mandatory publish as a
        # successful result, and the item would be silently lost.
        self._channel = await self._connection.channel(
            publisher_confirms=True, on_return_raises=True
        )
        name = self._topology.exchange
        try:
            # A passive declare: publishing to a missing exchange would only fail at the confirm.
            self._exchange = await self._channel.get_exchange(name, ensure=True)
        except aiormq.exceptions.ChannelNotFoundEntity:
            raise TopologyError(
                f"exchange {name!r} does not exist: start a worker first, it declares the "
                "topology (or check rabbitmq.exchange)"
            ) from None
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._channel is not None and not self._channel.is_closed:
            # A dead connection has nothing left to flush.
            with contextlib.suppress(*CONNECTION_EXCEPTIONS):
                await self._channel.close()

    def encode(self, item: ItemLike) -> tuple[bytes, str]:
        """Validate an item as the worker will and return its body and idempotency key."""
        if isinstance(item, MemoryItem):
            item = item.model_dump(exclude_unset=True)
        elif not isinstance(item, Mapping):
            raise DecodeError(
                Reason.SCHEMA, f"an item must be an object, not {type(item).__name__}"
            )
        model = item_from_dict(item)
        if self._blank_content == "dead_letter" and is_blank(model.content):
            # The worker would dead-letter it: refuse it here, before it is sent.
            raise DecodeError(Reason.SCHEMA, BLANK_DETAIL)
        body = encode_item(model)
        if self._max_body_bytes is not None and len(body) > self._max_body_bytes:
            detail = f"body is {len(body)} bytes, limit is {self._max_body_bytes}"
            raise DecodeError(Reason.TOO_LARGE, detail)
        # The message id is the idempotency key, built without the collection time, so the
        # same worker collected on every sync is one key (see worker.keys).
        return body, item_key(model, self._key_fields)

    async def publish_item(self, item: ItemLike) -> str:
        """Validate and publish one item; returns its idempotency key (the message id)."""
        body, key = self.encode(item)
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
        message = aio_pika.Message(
            body=body,
            content_type=content_type,
            message_id=message_id,
            headers=dict(headers or {}),
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            timestamp=time.time(),
            app_id="memory-worker",
        )
        await self.publish_message(message, routing_key=routing_key)

    async def publish_message(
        self, message: aio_pika.Message, *, routing_key: str | None = None
    ) -> None:
        """Publish a prepared message, mandatory, and wait for the broker's confirm.

        On a robust connection, a publish whose connection is lost is sent again once the
        channel is back (on the next node after a failover), within the one confirm timeout:
        the broker may then hold it twice, which the message id dedupes.
        """
        if self._exchange is None or (channel := self._channel) is None:
            raise RuntimeError("not open: use `async with Publisher(...)`")
        key = routing_key or self._topology.queue
        deadline = asyncio.get_running_loop().time() + self._timeout_s
        while True:
            try:
                async with asyncio.timeout_at(self._until(deadline, channel)):
                    if self._down_since is not None and isinstance(channel, AbstractRobustChannel):
                        await asyncio.sleep(RETRY_PAUSE_S)
                        await channel.ready()  # reconnected, the channel restored
                    await self._confirmed(self._exchange, message, key)
                self._down_since = None
                return
            except TimeoutError as exc:
                if self._down_since is not None:  # the outage outlasted the timeout
                    raise ConnectionLost(f"connection lost for over {self._timeout_s:g} s") from exc
                raise PublishFailed(f"no confirm within {self._timeout_s:g} s") from exc
            except CONNECTION_EXCEPTIONS as exc:
                if not isinstance(channel, AbstractRobustChannel):
                    raise ConnectionLost(f"connection lost before the confirm: {exc!r}") from exc
                if self._down_since is None:
                    self._down_since = asyncio.get_running_loop().time()

    def _until(self, deadline: float, channel: AbstractChannel) -> float:
        """A try's deadline: while the channel is down, no later than the outage's own."""
        down = self._down_since
        outage_ends = deadline if down is None or not channel.is_closed else down + self._timeout_s
        return min(deadline, outage_ends)

    async def _confirmed(self, to: AbstractExchange, message: aio_pika.Message, key: str) -> None:
        """One publish and its confirm; the broker's refusals raised as what they mean."""
        try:
            await to.publish(message, key, mandatory=True)
        except PublishError as exc:
            raise Unroutable(f"no queue bound for {self._topology.exchange!r}/{key!r}") from exc
        except DeliveryError as exc:
            raise Refused(f"broker refused the publish: {exc!r}") from exc
        except aiormq.exceptions.ChannelNotFoundEntity as exc:
            raise Unroutable(f"exchange {self._topology.exchange!r} does not exist") from exc

    async def publish_many(
        self,
        items: Iterable[ItemLike] | AsyncIterable[ItemLike],
        *,
        max_outstanding: int = MAX_OUTSTANDING,
        on_result: Callable[[PublishResult], None] | None = None,
    ) -> BatchResult:
        """Publish items with at most `max_outstanding` confirms pending; failures are results."""
        if max_outstanding < 1:
            raise ValueError("max_outstanding must be at least 1")
        slots = asyncio.Semaphore(max_outstanding)
        tasks: list[asyncio.Task[PublishResult]] = []

        async def one(index: int, item: ItemLike) -> PublishResult:
            try:
                result = await self._result(index, item)
            finally:
                slots.release()
            if on_result is not None:
                on_result(result)
            return result

        try:
            async for index, item in _enumerate(items):
                # The slot is taken before the task exists, so a long input never piles up tasks.
                await slots.acquire()
                tasks.append(asyncio.create_task(one(index, item)))
            return BatchResult(tuple(await asyncio.gather(*tasks)))
        except BaseException:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            raise

    async def _result(self, index: int, item: ItemLike) -> PublishResult:
        try:
            body, key = self.encode(item)
        except DecodeError as exc:
            return PublishResult(index, None, exc)
        try:
            await self.publish_raw(body, message_id=key)
        except PublishFailed as exc:
            return PublishResult(index, key, exc)
        return PublishResult(index, key)


async def _enumerate(
    items: Iterable[ItemLike] | AsyncIterable[ItemLike],
) -> AsyncIterator[tuple[int, ItemLike]]:
    if isinstance(items, AsyncIterable):
        index = 0
        async for item in items:
            yield index, item
            index += 1
    else:
        for index, item in enumerate(items):
            yield index, item


@asynccontextmanager
async def open_publisher(
    settings: Settings, *, purpose: str = "publisher", robust: bool = True
) -> AsyncIterator[Publisher]:
    """A connected `Publisher` for these settings; closes its connection on exit."""
    connection = await connect(settings, purpose, robust=robust)
    topology = Topology.from_settings(settings)
    async with (
        connection,
        Publisher(
            connection,
            topology,
            max_body_bytes=settings.worker.max_body_bytes,
            key_fields=settings.worker.key_fields,
            blank_content=settings.sink.blank_content,
        ) as publisher,
    ):
        yield publisher
