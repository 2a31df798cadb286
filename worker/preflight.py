"""Preflight: what is checked before the worker consumes, and `memory-worker check`.

`Service` runs `check_settings` first (nothing opened yet), `check_sink` once Session-Buddy's
client is open, and `prepare_broker` once connected; any refusal raises `TopologyError` or
`SinkConfigError` (exit 78) before a delivery is taken. `check` reaches each service once and
reports instead of raising, for the `check` command.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple
from urllib.parse import quote, unquote, urlparse

import aiormq
import httpx
import structlog
from aio_pika.abc import AbstractConnection, AbstractRobustConnection

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
from worker.mcp import McpSink, make_sink
from worker.settings import Settings
from worker.sink import HttpSink, SinkConfigError
from worker.topology import Topology, TopologyError
from worker.transport import TransportError, make_client

#: One store attempt per delivery (retries go through the broker), but an MCP session re-open
#: can run the store call a second time within the same delivery.
IN_PROCESS_ATTEMPTS = 2
#: One read of the management API at start: a slow API delays the start at most this long.
MANAGEMENT_TIMEOUT_S = 10.0

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
    if mq.management_url is not None:
        # One management API for a cluster: any node's shows every queue. The vhost is the
        # same in every address (the settings check that).
        await check_queue_policies(mq.management_url.get_secret_value(), mq.urls[0], topology)


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
        down = f"{exc.error}" if len(exc.failures) == 1 else describe(exc.failures)
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
        mq = settings.rabbitmq
        if mq.management_url is not None:
            await check_queue_policies(mq.management_url.get_secret_value(), mq.urls[0], topology)
    except TopologyError as exc:
        return Finding(name, str(exc), EXIT_CONFIG)
    if missing and not settings.rabbitmq.declare:
        problem = f"missing (rabbitmq.declare is off): {', '.join(missing)}"
        return Finding(name, problem, EXIT_CONFIG)
    note = f" ({len(missing)} to be declared by run)" if missing else ""
    return Finding(name + note, None)


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
