"""Preflight checks: the consumer_timeout budget and the work queue's type, arguments, policies."""

from __future__ import annotations

import base64
import json
from typing import Any

import httpx
import pytest
from structlog.testing import capture_logs

from worker.broker import CONFIRM_TIMEOUT_S
from worker.management import check_queue_policies, management_queue_url
from worker.preflight import check_consumer_timeout, check_settings, prepare_broker
from worker.queue_compare import queue_problems
from worker.settings import Settings
from worker.topology import Topology, TopologyError


@pytest.mark.parametrize(
    ("sink_timeout_s", "consumer_timeout_s", "refused"),
    [
        (30, 1800, False),  # the defaults
        (885, 1800, False),  # exactly at the limit: 2 x 885 + 30 = 1800
        (885.5, 1800, True),
        (1000, 1800, True),
        (10, 45, True),  # 2 x 10 + 30 = 50
        (5, 40, False),
        (3600, 604_800, False),
    ],
)
def test_consumer_timeout_budget(
    sink_timeout_s: float, consumer_timeout_s: float, refused: bool
) -> None:
    """Refused exactly when 2 x sink.timeout_s + the confirm timeout exceeds consumer_timeout."""
    if refused:
        with pytest.raises(TopologyError):
            check_consumer_timeout(sink_timeout_s, consumer_timeout_s, CONFIRM_TIMEOUT_S)
    else:
        check_consumer_timeout(sink_timeout_s, consumer_timeout_s, CONFIRM_TIMEOUT_S)


def test_consumer_timeout_message_names_settings_env_vars_and_numbers() -> None:
    """The refusal names both settings, their env vars, the numbers and the largest timeout."""
    with pytest.raises(TopologyError) as caught:
        check_consumer_timeout(1000, 1800, 30)
    text = str(caught.value)
    for part in (
        "sink.timeout_s",
        "MAHAVISHNU_SINK__TIMEOUT_S",
        "rabbitmq.consumer_timeout_s",
        "MAHAVISHNU_RABBITMQ__CONSUMER_TIMEOUT_S",
        "1000 s",
        "1800 s",
        "2030 s",
        "at most 885 s",
    ):
        assert part in text, part


def test_default_settings_pass_the_budget() -> None:
    """The committed defaults leave room: 2 x 30 + 30 s against 1800 s."""
    s = Settings()
    assert s.rabbitmq.consumer_timeout_s == 1800
    check_consumer_timeout(s.sink.timeout_s, s.rabbitmq.consumer_timeout_s, CONFIRM_TIMEOUT_S)


def topology(queue_type: str = "quorum") -> Topology:
    """The topology of the default settings, with this work queue type."""
    return Topology.from_settings(Settings(rabbitmq={"queue_type": queue_type}))


def queue_json(
    topo: Topology,
    *,
    type_: str | None = None,
    arguments: dict[str, Any] | None = None,
    policy: str | None = None,
    definition: Any = None,
) -> dict[str, Any]:
    """The shape of the management API's `GET /api/queues/<vhost>/<name>` (fields we read)."""
    return {
        "name": topo.queue,
        "vhost": "/",
        "durable": True,
        "type": type_ or topo.queue_type,
        "arguments": topo.work_queue_arguments() if arguments is None else arguments,
        "policy": policy,
        "operator_policy": None,
        "effective_policy_definition": {} if definition is None else definition,
    }


@pytest.mark.parametrize("queue_type", ["quorum", "classic"])
def test_a_queue_as_declared_has_no_problems(queue_type: str) -> None:
    """The queue the worker declares, with no policy, agrees with the settings."""
    topo = topology(queue_type)
    assert queue_problems(queue_json(topo), topo) == []


def test_an_empty_policy_definition_as_a_list_is_no_problem() -> None:
    """Some RabbitMQ versions render an empty definition as `[]`."""
    topo = topology()
    assert queue_problems(queue_json(topo, definition=[]), topo) == []


def test_a_policy_that_agrees_is_no_problem() -> None:
    """A policy repeating the worker's values is fine."""
    topo = topology()
    definition = {"dead-letter-exchange": topo.dead_letter_exchange, "delivery-limit": 20}
    assert queue_problems(queue_json(topo, policy="p", definition=definition), topo) == []


def test_another_queue_type_is_named() -> None:
    """A classic queue where quorum is expected is reported with the setting and env var."""
    topo = topology("quorum")
    classic = topology("classic")
    problems = queue_problems(
        queue_json(topo, type_="classic", arguments=classic.work_queue_arguments()), topo
    )
    assert any("type 'classic'" in p and "MAHAVISHNU_RABBITMQ__QUEUE_TYPE" in p for p in problems)
    assert any("x-delivery-limit is not set" in p for p in problems)


def test_policies_that_change_dead_lettering_and_delivery_limit_are_each_named() -> None:
    """Each disagreeing policy key is named with its value and what the settings expect."""
    topo = topology()
    definition = {"dead-letter-exchange": "elsewhere", "delivery-limit": 3, "queue-mode": "lazy"}
    problems = queue_problems(queue_json(topo, policy="ops-dlx", definition=definition), topo)
    assert problems == [
        f"queue {topo.queue!r}: policy 'ops-dlx' sets dead-letter-exchange to 'elsewhere', "
        f"settings expect {topo.dead_letter_exchange!r} (rabbitmq.exchange (its .dlx))",
        f"queue {topo.queue!r}: policy 'ops-dlx' sets delivery-limit to 3, settings expect 20 "
        "(rabbitmq.delivery_limit)",
    ]


def test_policy_keys_with_an_x_prefix_are_compared_too() -> None:
    """`x-delivery-limit` in a definition is read as `delivery-limit`."""
    topo = topology()
    problems = queue_problems(queue_json(topo, definition={"x-delivery-limit": 5}), topo)
    assert len(problems) == 1 and "delivery-limit to 5" in problems[0]


def test_arguments_that_differ_are_named() -> None:
    """A queue declared with other arguments (e.g. with `declare: false`) is reported."""
    topo = topology()
    arguments = {**topo.work_queue_arguments(), "x-dead-letter-exchange": "other"}
    del arguments["x-delivery-limit"]
    problems = queue_problems(queue_json(topo, arguments=arguments), topo)
    assert len(problems) == 2
    assert "argument x-dead-letter-exchange is 'other'" in problems[0]
    assert "argument x-delivery-limit is not set, settings expect 20" in problems[1]


@pytest.mark.parametrize(
    ("amqp_url", "queue", "expected_path"),
    [
        ("amqp://guest:guest@h:5672/", "memory.items", "/api/queues/%2F/memory.items"),
        ("amqp://guest:guest@h:5672", "memory.items", "/api/queues/%2F/memory.items"),
        ("amqp://u:p@h/%2F", "q", "/api/queues/%2F/q"),
        ("amqp://u:p@h/prod", "a/b c", "/api/queues/prod/a%2Fb%20c"),
    ],
)
def test_management_url_names_the_vhost_and_queue(
    amqp_url: str, queue: str, expected_path: str
) -> None:
    """The vhost comes from the AMQP URL; both are percent-encoded."""
    url, auth = management_queue_url("http://m:pw@127.0.0.1:15672", amqp_url, queue)
    assert url.raw_path.decode() == expected_path
    assert url.username == "" and auth is not None
    sent = next(auth.auth_flow(httpx.Request("GET", url)))
    assert sent.headers["Authorization"] == httpx.BasicAuth("m", "pw")._auth_header


def mock(status: int, body: Any, seen: list[httpx.Request]) -> httpx.MockTransport:
    """A management API answering `status` with `body` as JSON; requests land in `seen`."""

    def handle(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(status, content=json.dumps(body).encode())

    return httpx.MockTransport(handle)


async def test_check_queue_policies_reads_with_basic_auth_and_refuses_on_a_difference() -> None:
    """The check GETs the queue with the URL's credentials and raises naming the difference."""
    topo = topology()
    seen: list[httpx.Request] = []
    body = queue_json(topo, policy="p", definition={"delivery-limit": 2})
    with pytest.raises(TopologyError, match="policy 'p' sets delivery-limit to 2"):
        await check_queue_policies(
            "http://m:pw@mq:15672", "amqp://g:g@mq/", topo, transport=mock(200, body, seen)
        )
    # The queue, then the policy lists (this mock answers those with the queue: unreadable).
    queue_request, policies_request = seen
    assert queue_request.url.raw_path.decode() == f"/api/queues/%2F/{topo.queue}"
    assert policies_request.url.raw_path.decode() == "/api/policies/%2F"
    for request in seen:
        assert request.headers["authorization"] == "Basic " + base64.b64encode(b"m:pw").decode()
        assert "pw" not in str(request.url)


async def test_check_queue_policies_passes_an_agreeing_queue() -> None:
    """A queue that agrees with the settings passes after reading it and its policies."""
    topo = topology()
    seen: list[httpx.Request] = []
    transport = mock(200, queue_json(topo), seen)
    await check_queue_policies("http://m:pw@mq:15672", "amqp://g:g@mq/", topo, transport=transport)
    assert len(seen) == 2


async def test_check_queue_policies_refuses_bad_credentials() -> None:
    """A 401 from the management API is refused, naming the status: the credentials are wrong."""
    topo = topology()
    with pytest.raises(TopologyError, match="HTTP 401"):
        await check_queue_policies(
            "http://m:bad@mq:15672", "amqp://g:g@mq/", topo, transport=mock(401, {}, [])
        )


async def test_check_queue_policies_only_warns_when_the_api_does_not_answer() -> None:
    """The management API is an aid: down or failing, the check logs a warning, raises nothing."""
    refused: list[httpx.Request] = []

    def refuse(request: httpx.Request) -> httpx.Response:
        refused.append(request)
        raise httpx.ConnectError("refused", request=request)

    topo = topology()
    failed: list[httpx.Request] = []
    with capture_logs() as logs:
        await check_queue_policies(
            "http://m:pw@mq:15672", "amqp://g:g@mq/", topo, transport=httpx.MockTransport(refuse)
        )
        await check_queue_policies(
            "http://m:pw@mq:15672", "amqp://g:g@mq/", topo, transport=mock(503, {}, failed)
        )
    assert len(refused) == len(failed) == 1
    unreachable, failing = logs
    assert unreachable["event"] == "management_api_unreachable"
    assert unreachable["log_level"] == "warning" and "ConnectError" in unreachable["error"]
    assert failing["event"] == "management_api_failed"
    assert failing["log_level"] == "warning" and failing["status"] == 503
    for entry in logs:
        assert entry["url"] == "http://m:***@mq:15672" and "pw" not in str(entry)


def test_check_settings_refuses_a_sink_timeout_beyond_the_consumer_timeout() -> None:
    """The service's first preflight step reads both timeouts from the settings."""
    check_settings(Settings())
    with pytest.raises(TopologyError, match="MAHAVISHNU_SINK__TIMEOUT_S"):
        check_settings(Settings(sink={"timeout_s": 1000}))


class RecordingTopology:
    """Records which of declare/check ran; the real one needs a broker."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    async def declare(self, connection: object) -> None:
        """Record a declaration."""
        self.calls.append("declare")

    async def check(self, connection: object) -> None:
        """Record a passive check."""
        self.calls.append("check")


@pytest.mark.parametrize(("declare", "expected"), [(True, ["declare"]), (False, ["check"])])
async def test_prepare_broker_declares_or_only_checks(declare: bool, expected: list[str]) -> None:
    """`rabbitmq.declare` chooses between declaring the topology and checking it exists."""
    topo = RecordingTopology()
    settings = Settings(rabbitmq={"declare": declare})
    await prepare_broker(settings, topo, connection=None)
    assert topo.calls == expected
