"""Names and declaration of everything on the broker; shared by worker, publisher and dlq tools.

    publisher ──▶ <exchange> ──(queue name)──▶ <queue>  (quorum; delivery limit → DLX)
    worker retry ──▶ <exchange>.retry ──▶ <queue>.retry.<N>s  (TTL N s, dead-letters back)
    worker / broker dead letter ──▶ <exchange>.dlx ──▶ <dead_letter_queue>

Delayed retries live in per-tier TTL queues because a per-message TTL only expires at the head
of a queue; a waiting retry therefore holds no worker slot and survives a worker restart.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import aio_pika
import aiormq
from aio_pika.abc import (
    AbstractChannel,
    AbstractConnection,
    AbstractExchange,
    AbstractRobustConnection,
)

from worker.settings import Settings

DLQ_DELIVERY_LIMIT = 1_000_000


class TopologyError(Exception):
    """The broker holds a queue or exchange that disagrees with the settings."""


@dataclass(frozen=True, slots=True)
class Tier:
    """One retry delay tier and the wait queue that holds it."""

    delay_s: float
    queue: str


@dataclass(frozen=True, slots=True)
class Topology:
    """Every name and argument the worker, publisher and dlq tools agree on."""

    exchange: str
    queue: str
    retry_exchange: str
    dead_letter_exchange: str
    dead_letter_queue: str
    queue_type: str
    delivery_limit: int
    tiers: tuple[Tier, ...]
    consumer_timeout_s: float = 1800.0

    @classmethod
    def from_settings(cls, settings: Settings) -> Topology:
        """Derive the topology from the settings."""
        mq = settings.rabbitmq
        tiers = tuple(Tier(t, f"{mq.queue}.retry.{t:g}s") for t in settings.retry.tiers_s)
        return cls(
            exchange=mq.exchange,
            queue=mq.queue,
            retry_exchange=mq.retry_exchange,
            dead_letter_exchange=mq.dead_letter_exchange,
            dead_letter_queue=mq.dead_letter_queue,
            queue_type=mq.queue_type,
            delivery_limit=mq.delivery_limit,
            tiers=tiers,
            consumer_timeout_s=mq.consumer_timeout_s,
        )

    def tier_for(self, delay_s: float) -> Tier:
        """The shortest tier not shorter than `delay_s` (the longest if none is)."""
        for tier in self.tiers:
            if tier.delay_s >= delay_s:
                return tier
        return self.tiers[-1]

    def _durable_args(self, dead_letter_to: str, routing_key: str) -> dict[str, Any]:
        args: dict[str, Any] = {
            "x-queue-type": self.queue_type,
            "x-dead-letter-exchange": dead_letter_to,
            "x-dead-letter-routing-key": routing_key,
        }
        if self.queue_type == "quorum":
            # Classic queues dead-letter at most once; quorum queues can do it at least once.
            args["x-dead-letter-strategy"] = "at-least-once"
            args["x-overflow"] = "reject-publish"
        return args

    def work_queue_arguments(self) -> dict[str, Any]:
        """Arguments of the work queue: its poison messages go to the DLQ."""
        args = self._durable_args(self.dead_letter_exchange, self.dead_letter_queue)
        if self.queue_type == "quorum":
            args["x-delivery-limit"] = self.delivery_limit
        return args

    def tier_arguments(self, tier: Tier) -> dict[str, Any]:
        """Arguments of a wait queue: expired retries go back to the work queue."""
        args = self._durable_args(self.exchange, self.queue)
        args["x-message-ttl"] = int(tier.delay_s * 1000)
        return args

    def consumer_arguments(self) -> dict[str, Any]:
        """Arguments of the worker's `basic.consume` on the work queue.

        On a quorum queue, its own consumer timeout, which RabbitMQ 3.12+ and 4.3+ apply over
        the queue's and the global one: the worker knows how long it holds a delivery
        (`worker.queue_compare`), so a shorter policy cannot take deliveries back mid-store.
        3.10 and 4.0 to 4.2 ignore it; 4.3 refuses it on a classic queue (PRECONDITION_FAILED).
        """
        if self.queue_type != "quorum":
            return {}
        return {"x-consumer-timeout": round(self.consumer_timeout_s * 1000)}

    def dead_letter_queue_arguments(self) -> dict[str, Any]:
        """Arguments of the DLQ."""
        args: dict[str, Any] = {"x-queue-type": self.queue_type}
        if self.queue_type == "quorum":
            # Operators read the DLQ by taking and returning messages; on RabbitMQ 4.x the default
            # quorum delivery limit (20) would otherwise drop a dead letter after ~20 reads.
            args["x-delivery-limit"] = DLQ_DELIVERY_LIMIT
        return args

    async def declare(self, connection: AbstractRobustConnection) -> None:
        """Declare everything idempotently; raise `TopologyError` naming any disagreement."""
        # A failed declaration closes its channel, so each runs on a short-lived one.
        async with connection.channel() as channel:
            work = await _exchange(channel, self.exchange)
            retry = await _exchange(channel, self.retry_exchange)
            dlx = await _exchange(channel, self.dead_letter_exchange)
        await self.declare_queue(
            connection, self.dead_letter_queue, self.dead_letter_queue_arguments()
        )
        await self._bind(connection, self.dead_letter_queue, dlx.name, self.dead_letter_queue)
        await self.declare_queue(connection, self.queue, self.work_queue_arguments())
        await self._bind(connection, self.queue, work.name, self.queue)
        for tier in self.tiers:
            await self.declare_queue(connection, tier.queue, self.tier_arguments(tier))
            await self._bind(connection, tier.queue, retry.name, tier.queue)

    async def declare_queue(
        self, connection: AbstractConnection, name: str, arguments: dict[str, Any]
    ) -> None:
        """Declare one queue durable with `arguments`; `TopologyError` if it exists otherwise."""
        try:
            async with connection.channel() as channel:
                await channel.declare_queue(name, durable=True, arguments=arguments)
        except aiormq.exceptions.ChannelPreconditionFailed as exc:
            raise TopologyError(
                f"queue {name!r} already exists with other arguments: {_broker_text(exc)}. "
                "Change the settings to match it, or delete the queue (its messages go with it)."
            ) from None

    async def _bind(
        self, connection: AbstractRobustConnection, queue: str, exchange: str, key: str
    ) -> None:
        async with connection.channel() as channel:
            declared = await channel.get_queue(queue, ensure=False)
            await declared.bind(exchange, routing_key=key)

    @property
    def queues(self) -> tuple[str, ...]:
        """Every queue this topology declares."""
        return (self.queue, self.dead_letter_queue, *(tier.queue for tier in self.tiers))

    @property
    def exchanges(self) -> tuple[str, ...]:
        """Every exchange this topology declares."""
        return (self.exchange, self.retry_exchange, self.dead_letter_exchange)

    async def delete(self, connection: AbstractRobustConnection) -> None:
        """Delete every queue and exchange, messages included (demo and test teardown)."""
        async with connection.channel() as channel:
            for name in self.queues:
                await channel.queue_delete(name)
            for name in self.exchanges:
                await channel.exchange_delete(name)

    async def check(self, connection: AbstractRobustConnection) -> None:
        """Check passively that the work queue and DLQ exist."""
        for name in (self.queue, self.dead_letter_queue):
            try:
                async with connection.channel() as channel:
                    await channel.declare_queue(name, passive=True)
            except aiormq.exceptions.ChannelNotFoundEntity:
                raise TopologyError(f"queue {name!r} does not exist") from None


async def _exchange(channel: AbstractChannel, name: str) -> AbstractExchange:
    try:
        return await channel.declare_exchange(name, aio_pika.ExchangeType.DIRECT, durable=True)
    except aiormq.exceptions.ChannelPreconditionFailed as exc:
        raise TopologyError(
            f"exchange {name!r} exists with another type: {_broker_text(exc)}"
        ) from None


def _broker_text(exc: BaseException) -> str:
    text = str(exc.args[0]) if exc.args else str(exc)
    return text.removeprefix("PRECONDITION_FAILED - ")
