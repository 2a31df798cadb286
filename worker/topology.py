"""Names and declaration of everything on the broker; shared by worker, publisher and dlq tools.

    publisher ──▶ <exchange> ──(queue name)──▶ <queue>  (quorum; delivery limit → DLX)
    worker retry ──▶ <exchange>.retry ──▶ <queue>.retry.<N>s  (TTL N s, dead-letters back)
    worker / broker dead letter ──▶ <exchange>.dlx ──▶ <dead_letter_queue>

Delayed retries live in per-tier TTL queues because a per-message TTL only expires at the head
of a queue; a waiting retry therefore holds no worker slot and survives a worker restart.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, unquote, urlparse

import aio_pika
import aiormq
import httpx
import structlog
from aio_pika.abc import AbstractChannel, AbstractExchange, AbstractRobustConnection

from worker.broker import masked
from worker.settings import Settings

DLQ_DELIVERY_LIMIT = 1_000_000
# One store attempt per delivery (retries go through the broker), but an MCP session re-open
# can run the store call a second time within the same delivery.
IN_PROCESS_ATTEMPTS = 2
MANAGEMENT_TIMEOUT_S = 10.0

log = structlog.get_logger("worker.topology")


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
        await self._queue(connection, self.dead_letter_queue, self.dead_letter_queue_arguments())
        await self._bind(connection, self.dead_letter_queue, dlx.name, self.dead_letter_queue)
        await self._queue(connection, self.queue, self.work_queue_arguments())
        await self._bind(connection, self.queue, work.name, self.queue)
        for tier in self.tiers:
            await self._queue(connection, tier.queue, self.tier_arguments(tier))
            await self._bind(connection, tier.queue, retry.name, tier.queue)

    async def _queue(
        self, connection: AbstractRobustConnection, name: str, arguments: dict[str, Any]
    ) -> None:
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


def check_consumer_timeout(
    sink_timeout_s: float, consumer_timeout_s: float, confirm_timeout_s: float
) -> None:
    """Refuse settings under which a delivery can be held longer than the broker allows.

    A delivery is held for at most `IN_PROCESS_ATTEMPTS` store calls of `sink.timeout_s` each,
    plus the publish confirm of its retry or dead letter. At shutdown the grace period cannot
    extend that: what is still in flight when it ends is requeued. A delivery held longer than
    `consumer_timeout` closes the channel (or cancels the consumer) and is redelivered, so the
    same item would be stored again and again.
    """
    held_s = IN_PROCESS_ATTEMPTS * sink_timeout_s + confirm_timeout_s
    if held_s <= consumer_timeout_s:
        return
    max_timeout_s = max(consumer_timeout_s - confirm_timeout_s, 0.0) / IN_PROCESS_ATTEMPTS
    raise TopologyError(
        f"sink.timeout_s (MAHAVISHNU_SINK__TIMEOUT_S) is {sink_timeout_s:g} s: a delivery can be "
        f"held up to {IN_PROCESS_ATTEMPTS} x {sink_timeout_s:g} + {confirm_timeout_s:g} = "
        f"{held_s:g} s ({IN_PROCESS_ATTEMPTS} in-process store attempts plus the publish "
        f"confirm of a retry or dead letter), more than rabbitmq.consumer_timeout_s "
        f"(MAHAVISHNU_RABBITMQ__CONSUMER_TIMEOUT_S), {consumer_timeout_s:g} s; the broker "
        "would take the delivery back and redeliver it. Lower sink.timeout_s to at most "
        f"{max_timeout_s:g} s, or raise the broker's consumer_timeout and set "
        "rabbitmq.consumer_timeout_s to match."
    )


def _normalised(definition: Any) -> dict[str, Any]:
    # An empty policy definition is `[]` in some RabbitMQ versions' JSON.
    if not isinstance(definition, Mapping):
        return {}
    return {str(k).removeprefix("x-"): v for k, v in definition.items()}


_SETTING_OF = {
    "dead-letter-exchange": "rabbitmq.exchange (its .dlx)",
    "dead-letter-routing-key": "rabbitmq.dead_letter_queue",
    "delivery-limit": "rabbitmq.delivery_limit",
    "dead-letter-strategy": "rabbitmq.queue_type",
    "overflow": "rabbitmq.queue_type",
}


def queue_problems(queue: Mapping[str, Any], topology: Topology) -> list[str]:
    """Differences between the management API's queue object and the work queue we expect.

    `queue` is the JSON of `GET /api/queues/<vhost>/<name>`: `type`, `arguments`, `policy`
    and `effective_policy_definition` (operator policies included). A policy key that
    disagrees is reported even when the queue's own argument takes precedence, because the
    operator's intent and the worker's disagree either way.
    """
    problems: list[str] = []
    name = topology.queue
    actual_type = queue.get("type")
    if actual_type != topology.queue_type:
        problems.append(
            f"queue {name!r} is of type {actual_type!r}, settings expect "
            f"{topology.queue_type!r} (rabbitmq.queue_type, MAHAVISHNU_RABBITMQ__QUEUE_TYPE)"
        )
    expected = {
        k.removeprefix("x-"): v
        for k, v in topology.work_queue_arguments().items()
        if k != "x-queue-type"
    }
    arguments = _normalised(queue.get("arguments"))
    for key, want in expected.items():
        have = arguments.get(key)
        if have != want:
            shown = "is not set" if key not in arguments else f"is {have!r}"
            problems.append(
                f"queue {name!r}: argument x-{key} {shown}, settings expect {want!r} "
                f"({_SETTING_OF.get(key, 'rabbitmq')})"
            )
    policy = queue.get("policy") or queue.get("operator_policy") or "?"
    for key, have in _normalised(queue.get("effective_policy_definition")).items():
        if key in expected and have != expected[key]:
            problems.append(
                f"queue {name!r}: policy {policy!r} sets {key} to {have!r}, settings expect "
                f"{expected[key]!r} ({_SETTING_OF.get(key, 'rabbitmq')})"
            )
    return problems


def management_queue_url(management_url: str, amqp_url: str, queue: str) -> httpx.URL:
    """`<management>/api/queues/<vhost>/<queue>` for the vhost of the AMQP URL, credentials kept."""
    path = urlparse(amqp_url).path
    vhost = unquote(path[1:]) if len(path) > 1 else "/"
    base = httpx.URL(management_url)
    prefix = base.path.rstrip("/")
    return base.copy_with(
        path=f"{prefix}/api/queues/{quote(vhost, safe='')}/{quote(queue, safe='')}"
    )


async def check_queue_policies(
    management_url: str,
    amqp_url: str,
    topology: Topology,
    transport: httpx.AsyncBaseTransport | None = None,
) -> None:
    """Read the work queue from the management API; raise `TopologyError` on a difference.

    An unreachable management API is only warned about: it is an aid, not a dependency.
    """
    url = management_queue_url(management_url, amqp_url, topology.queue)
    auth = httpx.BasicAuth(url.username, url.password) if url.username else None
    bare = url.copy_with(username=None, password=None)
    shown = masked(management_url)
    try:
        async with httpx.AsyncClient(transport=transport, timeout=MANAGEMENT_TIMEOUT_S) as client:
            response = await client.get(bare, auth=auth)
    except httpx.HTTPError as exc:
        log.warning("management_api_unreachable", url=shown, error=repr(exc))
        return
    if response.status_code in (401, 403):
        raise TopologyError(
            f"the management API at {shown} refused rabbitmq.management_url's credentials "
            f"(HTTP {response.status_code}); the user needs the monitoring tag"
        )
    if response.status_code != 200:
        log.warning("management_api_failed", url=shown, status=response.status_code)
        return
    problems = queue_problems(response.json(), topology)
    if problems:
        raise TopologyError(
            "the broker's queue disagrees with the settings:\n  " + "\n  ".join(problems)
        )
