"""Preflight: what is checked before the worker consumes, and `memory-worker check`.

`Service` runs `check_settings` first (nothing opened yet), `check_sink` once Session-Buddy's
client is open, and `prepare_broker` once connected; any refusal raises `TopologyError` or
`SinkConfigError` (exit 78) before a delivery is taken. `check` reaches each service once and
reports instead of raising, for the `check` command.
"""

from __future__ import annotations

from typing import NamedTuple

import aiormq
import structlog
from aio_pika.abc import AbstractConnection, AbstractRobustConnection

from worker.addresses import unreachable
from worker.broker import (
    CONFIRM_TIMEOUT_S,
    BrokerRefused,
    BrokerUnavailable,
    address,
    connect,
    describe,
    masked,
)
from worker.exitcodes import EXIT_CONFIG, EXIT_FAILED, EXIT_OK, EXIT_UNAVAILABLE
from worker.ledger import ping as ledger_ping
from worker.management import check_queue_policies
from worker.mcp import McpSink, make_sink
from worker.queue_compare import IN_PROCESS_ATTEMPTS, Expected, Version, held_s, parse_version
from worker.settings import Settings
from worker.sink import HttpSink, SinkConfigError
from worker.topology import Topology, TopologyError
from worker.transport import TransportError, make_client

log = structlog.get_logger("worker.preflight")


def check_settings(settings: Settings) -> None:
    """Refuse settings the broker would punish (see `check_consumer_timeout`)."""
    s = settings
    check_consumer_timeout(s.sink.timeout_s, s.rabbitmq.consumer_timeout_s, CONFIRM_TIMEOUT_S)


async def check_sink(sink: McpSink | HttpSink, tool: str) -> None:
    """Refuse to start when Session-Buddy answers but lacks the tool; warn if it is down."""
    if not isinstance(sink, McpSink):
        return
    try:
        tools = await sink.list_tools()
    except (TransportError, SinkConfigError) as exc:
        log.warning("sink_unreachable_at_start", error=repr(exc))
        return
    if tool not in tools:
        raise SinkConfigError(f"Session-Buddy has no tool {tool!r} (it offers: {tools})")


async def prepare_broker(
    settings: Settings, topology: Topology, connection: AbstractRobustConnection
) -> None:
    """Declare the topology (or only check it exists), then compare the work queue's policies."""
    mq = settings.rabbitmq
    if mq.declare:
        await topology.declare(connection)
    else:
        await topology.check(connection)
    for warning in await _compare_queue(settings, topology, connection):
        log.warning("broker_disagrees_with_settings", detail=warning)


def broker_version(connection: AbstractConnection | None) -> Version | None:
    """The broker's version from the AMQP handshake (`server_properties`), if connected."""
    transport = getattr(connection, "transport", None)
    properties = getattr(getattr(transport, "connection", None), "server_properties", None)
    return parse_version(properties.get("version")) if isinstance(properties, dict) else None


def expected_of(settings: Settings, version: Version | None) -> Expected:
    """What the worker needs of a broker of `version`, from the settings."""
    mq = settings.rabbitmq
    return Expected(
        version=version,
        held_s=held_s(settings.sink.timeout_s, CONFIRM_TIMEOUT_S),
        consumer_timeout_s=mq.consumer_timeout_s,
        disconnected_timeout_s=mq.consumer_disconnected_timeout_s,
    )


async def _compare_queue(
    settings: Settings, topology: Topology, connection: AbstractConnection
) -> list[str]:
    """The management API's view of the work queue against the settings; its warnings."""
    mq = settings.rabbitmq
    if mq.management_url is None:
        return []
    # One management API for a cluster: any node's shows every queue. The vhost is the same in
    # every address (the settings check that).
    return await check_queue_policies(
        mq.management_url.get_secret_value(),
        mq.urls[0],
        topology,
        expected=expected_of(settings, broker_version(connection)),
    )


def check_consumer_timeout(
    sink_timeout_s: float, consumer_timeout_s: float, confirm_timeout_s: float
) -> None:
    """Refuse settings under which a delivery can be held longer than the broker allows.

    A delivery is held for at most `IN_PROCESS_ATTEMPTS` store calls of `sink.timeout_s` each,
    plus the publish confirm of its retry or dead letter. At shutdown the grace period cannot
    extend that: what is still in flight when it ends is requeued. A delivery held longer than
    the consumer timeout is taken back (the channel closed or the consumer cancelled) and
    redelivered, so the same item would be stored again and again. The worker asks for
    `consumer_timeout_s` on its own consumer; the queue's is compared by `worker.queue_compare`.
    """
    held = held_s(sink_timeout_s, confirm_timeout_s)
    if held <= consumer_timeout_s:
        return
    max_timeout_s = max(consumer_timeout_s - confirm_timeout_s, 0.0) / IN_PROCESS_ATTEMPTS
    raise TopologyError(
        f"sink.timeout_s (MAHAVISHNU_SINK__TIMEOUT_S) is {sink_timeout_s:g} s: a delivery can be "
        f"held up to {IN_PROCESS_ATTEMPTS} x {sink_timeout_s:g} + {confirm_timeout_s:g} = "
        f"{held:g} s ({IN_PROCESS_ATTEMPTS} in-process store attempts plus the publish "
        f"confirm of a retry or dead letter), more than rabbitmq.consumer_timeout_s "
        f"(MAHAVISHNU_RABBITMQ__CONSUMER_TIMEOUT_S), {consumer_timeout_s:g} s; the broker "
        "would take the delivery back and redeliver it. Lower sink.timeout_s to at most "
        f"{max_timeout_s:g} s, or raise rabbitmq.consumer_timeout_s (the worker asks for it on "
        "its consumer; RabbitMQ before 3.12 and 4.0 to 4.2 ignore that: raise the broker's "
        "consumer_timeout to match)."
    )


class Finding(NamedTuple):
    """One line of `check`: what was checked, None when fine or what is wrong, the exit code."""

    name: str
    problem: str | None
    code: int = EXIT_OK


async def check(settings: Settings) -> list[Finding]:
    """`run`'s preflight without consuming or changing anything, one finding per part."""
    s, mq = settings, settings.rabbitmq
    url = mq.url.get_secret_value()
    files = ", ".join(s.files) or "none (defaults and environment)"
    about = f"files {files}; concurrency {s.concurrency}, prefetch {s.prefetch}"
    try:
        check_settings(s)
        found = [Finding(f"settings ({about})", None)]
    except TopologyError as exc:
        found = [Finding(f"settings ({about})", str(exc), EXIT_CONFIG)]
    try:
        connection = await connect(s, "check", robust=False)
    except BrokerRefused as exc:
        found.append(Finding(f"broker {masked(url)}", str(exc), EXIT_CONFIG))
    except BrokerUnavailable as exc:
        down = unreachable(exc.error) if len(exc.failures) == 1 else describe(exc.failures)
        found.append(Finding(f"broker {masked(url)}", f"no broker: {down}", EXIT_UNAVAILABLE))
    else:
        several = f"{address(connection)} (one of {len(mq.urls)} addresses)"
        found.append(Finding(f"broker {masked(url) if len(mq.urls) == 1 else several}", None))
        async with connection:
            found.append(await _check_topology(s, Topology.from_settings(s), connection))
    found.append(await _check_sink(s))
    if s.ledger.url is not None:
        redis_url = s.ledger.url.get_secret_value()
        # A ledger call normally gets ledger.timeout_s; a one-off check can wait a little longer.
        problem = await ledger_ping(redis_url, max(1.0, s.ledger.timeout_s))
        found.append(Finding(f"ledger {masked(redis_url)}", problem, EXIT_FAILED))
    return found


async def _check_topology(
    settings: Settings, topology: Topology, connection: AbstractConnection
) -> Finding:
    """Each queue passively; an existing one declared as `run` would (which changes nothing
    unless its arguments differ: then the broker refuses, as it would refuse `run`)."""
    name = f"queues of exchange {topology.exchange!r}"
    missing = []
    queues = [
        (topology.dead_letter_queue, topology.dead_letter_queue_arguments()),
        (topology.queue, topology.work_queue_arguments()),
        *((tier.queue, topology.tier_arguments(tier)) for tier in topology.tiers),
    ]
    try:
        for queue, arguments in queues:
            try:
                async with connection.channel() as channel:
                    await channel.declare_queue(queue, passive=True)
            except aiormq.exceptions.ChannelNotFoundEntity:
                missing.append(queue)
                continue
            await topology.declare_queue(connection, queue, arguments)
        warnings = (
            []
            if topology.queue in missing
            else await _compare_queue(settings, topology, connection)
        )
    except TopologyError as exc:
        return Finding(name, str(exc), EXIT_CONFIG)
    if missing and not settings.rabbitmq.declare:
        problem = f"missing (rabbitmq.declare is off): {', '.join(missing)}"
        return Finding(name, problem, EXIT_CONFIG)
    notes = [f"{len(missing)} to be declared by run"] if missing else []
    # Warnings do not stop `run`, so they do not fail `check` either: they ride on the name.
    notes += [f"warning: {w}" for w in warnings]
    return Finding(name + "".join(f" ({n})" for n in notes), None)


async def _check_sink(settings: Settings) -> Finding:
    """Session-Buddy answers and has the tool (an HTTP sink: answers at all)."""
    sink_url = str(settings.pools.session_buddy_url)
    async with make_client(settings) as client, make_sink(settings, client) as sink:
        try:
            if isinstance(sink, McpSink):
                tools = await sink.list_tools()
                if settings.sink.tool not in tools:
                    missing = f"Session-Buddy lacks the tool {settings.sink.tool!r} ({tools})"
                    return Finding(f"sink {sink_url}", missing, EXIT_CONFIG)
            else:
                await client.request("HEAD", sink_url, {})
        except (TransportError, SinkConfigError) as exc:
            return Finding(f"sink {sink_url}", str(exc), EXIT_FAILED)
    return Finding(f"sink {sink_url}", None)
