"""Preflight: what is checked before the worker consumes, and `memory-worker check`.

`Service` runs `check_settings` first (nothing opened yet), `check_sink` once Session-Buddy's
client is open, and `prepare_broker` once connected; any refusal raises `TopologyError` or
`SinkConfigError` (exit 78) before a delivery is taken. `check` reaches each service once and
reports instead of raising, for the `check` command.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any
from urllib.parse import quote, unquote, urlparse

import httpx
import structlog
from aio_pika.abc import AbstractRobustConnection

from worker.broker import CONFIRM_TIMEOUT_S, BrokerUnavailable, connect, masked
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
        await check_queue_policies(
            mq.management_url.get_secret_value(), mq.url.get_secret_value(), topology
        )


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


async def check(settings: Settings) -> dict[str, str | None]:
    """Reach the broker, the sink and (with `ledger.url`) Redis once; None (fine) or what failed."""
    results: dict[str, str | None] = {}
    url = settings.rabbitmq.url.get_secret_value()
    try:
        connection = await connect(settings, "check", robust=False)
        await connection.close()
        results[f"broker {masked(url)}"] = None
    except BrokerUnavailable as exc:
        results[f"broker {masked(url)}"] = repr(exc.error)
    sink_url = str(settings.pools.session_buddy_url)
    async with make_client(settings) as client, make_sink(settings, client) as sink:
        try:
            if isinstance(sink, McpSink):
                tools = await sink.list_tools()
                missing = settings.sink.tool not in tools
                results[f"sink {sink_url}"] = f"no tool {settings.sink.tool!r}" if missing else None
            else:
                await client.request("HEAD", sink_url, {})
                results[f"sink {sink_url}"] = None
        except (TransportError, SinkConfigError) as exc:
            results[f"sink {sink_url}"] = repr(exc)
    if settings.ledger.url is not None:
        redis_url = settings.ledger.url.get_secret_value()
        # A ledger call normally gets ledger.timeout_s; a one-off check can wait a little longer.
        problem = await ledger_ping(redis_url, max(1.0, settings.ledger.timeout_s))
        results[f"ledger {masked(redis_url)}"] = problem
    return results
