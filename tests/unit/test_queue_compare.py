"""The queue as the broker applies it on 3.x and 4.x: consumer timeouts, disconnected timeout,
the effective delivery limit, live policies, and the read that waits for 4.x's statistics."""

from __future__ import annotations

import json
from types import SimpleNamespace
from typing import Any

import httpx
import pytest

from worker import management
from worker.management import check_queue_policies
from worker.preflight import broker_version, expected_of
from worker.queue_compare import (
    Expected,
    consumer_argument_applies,
    consumer_timeout_findings,
    disconnected_timeout_warning,
    findings,
    parse_version,
    queue_problems,
    with_live_policies,
)
from worker.settings import Settings
from worker.topology import Topology, TopologyError

V3_10, V4_0, V4_3 = (3, 10, 8), (4, 0, 5), (4, 3, 6)
HELD_S = 90.0  # 2 x 30 s + 30 s: the defaults


def topology() -> Topology:
    """The default settings' topology (quorum work queue, delivery limit 20)."""
    return Topology.from_settings(Settings())


def queue_json(
    *,
    arguments: dict[str, Any] | None = None,
    policy: str | None = None,
    definition: dict[str, Any] | None = None,
    **fields: Any,
) -> dict[str, Any]:
    """The work queue as the management API shows it: declared by the worker, plus extras."""
    topo = topology()
    return {
        "name": topo.queue,
        "type": "quorum",
        "arguments": {**topo.work_queue_arguments(), **(arguments or {})},
        "policy": policy,
        "operator_policy": None,
        "effective_policy_definition": definition or {},
        **fields,
    }


def expected(version: tuple[int, ...] | None, disconnected_s: float | None = 15.0) -> Expected:
    """The default settings' expectations of a broker of `version`."""
    return Expected(
        version=version,
        held_s=HELD_S,
        consumer_timeout_s=1800.0,
        disconnected_timeout_s=disconnected_s,
    )


@pytest.mark.parametrize(
    ("text", "version"),
    [
        ("4.3.6", (4, 3, 6)),
        (b"3.10.8", (3, 10, 8)),
        ("4.2.0-rc.1", (4, 2, 0)),
        ("4.1", (4, 1, 0)),
        ("", None),
        (None, None),
    ],
)
def test_versions_parse_from_server_properties(text: object, version: Any) -> None:
    """The handshake's version string (or bytes) becomes a comparable tuple; junk becomes None."""
    assert parse_version(text) == version


@pytest.mark.parametrize(
    ("version", "applies"),
    [
        ((3, 10, 8), False),
        ((3, 11, 15), True),
        ((3, 13, 7), True),
        ((4, 0, 5), False),
        ((4, 2, 9), False),
        ((4, 3, 0), True),
        ((4, 4, 1), True),
        (None, False),
    ],
)
def test_which_versions_apply_the_consumers_own_timeout(version: Any, applies: bool) -> None:
    """3.11.15 to 3.13 and 4.3+ let the consumer's x-consumer-timeout win; 3.10, 4.0-4.2 not."""
    assert consumer_argument_applies(version) is applies


def test_a_short_policy_timeout_stops_the_worker_where_its_own_is_ignored() -> None:
    """On 4.0 a policy's 60 s consumer-timeout below the 90 s budget is a problem, with the fix."""
    queue = queue_json(policy="ops", definition={"consumer-timeout": 60_000})
    problems, warnings = consumer_timeout_findings(queue, expected(V4_0))
    [problem] = problems
    for part in ("policy 'ops'", "60 s", "90 s", "4.0.5 applies it", "at least 90000 ms"):
        assert part in problem, part
    assert "MAHAVISHNU_SINK__TIMEOUT_S" in problem and warnings == []


def test_a_short_policy_timeout_is_only_a_warning_where_the_worker_sets_its_own() -> None:
    """On 4.3 the worker's own x-consumer-timeout wins: the short policy is named, not refused."""
    queue = queue_json(policy="ops", definition={"consumer-timeout": 60_000})
    problems, [warning] = consumer_timeout_findings(queue, expected(V4_3))
    assert problems == []
    assert "policy 'ops'" in warning and "4.3.6 applies the worker's own" in warning
    assert "1800 s" in warning


def test_the_shorter_of_argument_and_policy_is_the_queues_timeout() -> None:
    """Argument 200 s and policy 45 s: the 45 s policy is what the queue applies and is named."""
    queue = queue_json(
        arguments={"x-consumer-timeout": 200_000},
        policy="p",
        definition={"consumer-timeout": 45_000},
    )
    [problem], _ = consumer_timeout_findings(queue, expected(V4_0))
    assert "policy 'p' sets the consumer timeout to 45 s" in problem


def test_a_short_queue_argument_is_a_problem_too() -> None:
    """A queue declared with x-consumer-timeout 30 s (by someone else) is named as the argument."""
    queue = queue_json(arguments={"x-consumer-timeout": 30_000})
    [problem], _ = consumer_timeout_findings(queue, expected(None))
    assert "argument x-consumer-timeout sets the consumer timeout to 30 s" in problem


@pytest.mark.parametrize(
    ("version", "timeout_ms"),
    [(V3_10, 60_000), (V4_0, 90_000), (V4_3, 3_600_000), (V4_0, None)],
)
def test_queue_timeouts_that_cannot_take_a_delivery_back_early_pass(
    version: Any, timeout_ms: int | None
) -> None:
    """3.10 applies no per-queue timeout; one at or above the budget, or none, is fine anywhere."""
    definition = {} if timeout_ms is None else {"consumer-timeout": timeout_ms}
    queue = queue_json(policy="p", definition=definition)
    assert consumer_timeout_findings(queue, expected(version)) == ([], [])


def test_an_unset_disconnected_timeout_on_4_3_is_a_warning_naming_the_broker_default() -> None:
    """No argument or policy on 4.3: the 60 s broker default applies, the settings want 15 s."""
    warning = disconnected_timeout_warning(queue_json(), expected(V4_3))
    assert warning is not None
    for part in ("60 s", "15 s", "consumer_disconnected_timeout_s", "by policy"):
        assert part in warning, part


def test_a_disconnected_timeout_policy_that_agrees_is_no_warning() -> None:
    """A policy setting 15000 ms, as the settings expect, passes silently."""
    queue = queue_json(policy="mw", definition={"consumer-disconnected-timeout": 15_000})
    assert disconnected_timeout_warning(queue, expected(V4_3)) is None


def test_a_disconnected_timeout_argument_that_differs_is_named() -> None:
    """An x-consumer-disconnected-timeout argument of 60 s is reported as the argument's."""
    queue = queue_json(arguments={"x-consumer-disconnected-timeout": 60_000})
    warning = disconnected_timeout_warning(queue, expected(V4_3))
    assert warning is not None and "is 60 s (argument x-consumer-disconnected-timeout)" in warning


@pytest.mark.parametrize(
    ("version", "queue_type", "disconnected_s"),
    [
        (V4_0, "quorum", 15.0),
        (V3_10, "quorum", 15.0),
        (V4_3, "classic", 15.0),
        (V4_3, "quorum", None),
    ],
)
def test_the_disconnected_timeout_is_checked_only_on_4_3_quorum_queues_when_asked(
    version: Any, queue_type: str, disconnected_s: float | None
) -> None:
    """Before 4.3, on a classic queue, or with the setting null, nothing is said."""
    queue = queue_json(type=queue_type)
    assert disconnected_timeout_warning(queue, expected(version, disconnected_s)) is None


def test_the_brokers_effective_delivery_limit_is_compared() -> None:
    """4.x's delivery_limit of 5 (say from an operator policy) against 20 is a problem."""
    problems = queue_problems(queue_json(delivery_limit=5), topology())
    assert problems == [
        "queue 'memory.items': the broker applies a delivery limit of 5 (delivery_limit in the "
        "management API), settings expect 20 (rabbitmq.delivery_limit)"
    ]
    assert queue_problems(queue_json(delivery_limit=20), topology()) == []


def test_a_delivery_limit_difference_is_reported_once() -> None:
    """A policy's delivery-limit 5 and the resulting delivery_limit 5 make one line, not two."""
    queue = queue_json(policy="p", definition={"delivery-limit": 5}, delivery_limit=5)
    problems = queue_problems(queue, topology())
    assert len(problems) == 1 and "policy 'p' sets delivery-limit to 5" in problems[0]


def test_findings_gather_problems_and_warnings() -> None:
    """One call returns the declaration's problems, the timeout's and the disconnected warning."""
    queue = queue_json(policy="p", definition={"consumer-timeout": 10_000}, delivery_limit=3)
    problems, warnings = findings(queue, topology(), expected(V4_0))
    assert len(problems) == 2 and warnings == []
    problems, warnings = findings(queue, topology(), expected(V4_3))
    assert len(problems) == 1 and len(warnings) == 2


def test_the_worker_asks_for_its_consumer_timeout_on_basic_consume() -> None:
    """A quorum queue's consume carries consumer_timeout_s in ms; a classic one's nothing."""
    settings = Settings(rabbitmq={"consumer_timeout_s": 600.5})
    assert Topology.from_settings(settings).consumer_arguments() == {"x-consumer-timeout": 600_500}
    assert topology().consumer_arguments() == {"x-consumer-timeout": 1_800_000}
    classic = Settings(rabbitmq={"queue_type": "classic"})
    assert Topology.from_settings(classic).consumer_arguments() == {}


@pytest.mark.parametrize(("version", "refused"), [(V4_3, False), ((3, 13, 7), True)])
def test_a_classic_queues_short_timeout_counts_where_enforced(version: Any, refused: bool) -> None:
    """A classic queue's short timeout is a problem on 3.13, which enforces it; not on 4.3."""
    queue = queue_json(type="classic", policy="p", definition={"consumer-timeout": 10_000})
    problems, warnings = consumer_timeout_findings(queue, expected(version))
    assert (len(problems) == 1) is refused and warnings == []


def test_expectations_come_from_the_settings_and_the_handshake() -> None:
    """The budget, the timeouts and the broker's version (from server_properties) in one place."""
    handshake = SimpleNamespace(server_properties={"version": "4.3.6", "product": "RabbitMQ"})
    version = broker_version(SimpleNamespace(transport=SimpleNamespace(connection=handshake)))
    assert version == V4_3 and broker_version(None) is None
    settings = Settings(sink={"timeout_s": 10}, rabbitmq={"consumer_disconnected_timeout_s": 30})
    assert expected_of(settings, version) == Expected(V4_3, 50.0, 1800.0, 30.0)
    assert Settings().rabbitmq.consumer_disconnected_timeout_s == 15.0


def api(
    *bodies: dict[str, Any],
    seen: list[httpx.Request],
    policies: list[Any] | None = None,
    operator_policies: list[Any] | None = None,
) -> httpx.MockTransport:
    """A management API: queue GETs answer the bodies in turn, policy lists 403 unless given."""

    def handle(request: httpx.Request) -> httpx.Response:
        path = request.url.path
        if path.startswith(("/api/policies/", "/api/operator-policies/")):
            listed = policies if path.startswith("/api/policies/") else operator_policies
            if policies is None:
                return httpx.Response(403)
            return httpx.Response(200, content=json.dumps(listed or []).encode())
        seen.append(request)
        body = bodies[min(len(seen), len(bodies)) - 1]
        return httpx.Response(200, content=json.dumps(body).encode())

    return httpx.MockTransport(handle)


async def read(transport: httpx.MockTransport, version: Any) -> list[str]:
    """`check_queue_policies` as the preflight calls it, against a broker of `version`."""
    return await check_queue_policies(
        "http://m:pw@mq:15672", "amqp://g:g@mq/", topology(), transport, expected(version)
    )


def listed(name: str, definition: dict[str, Any], **fields: Any) -> dict[str, Any]:
    """A policy as `GET /api/policies/<vhost>` lists it, on the work queue by default."""
    return {
        "vhost": "/",
        "name": name,
        "pattern": r"^memory\.items$",
        "apply-to": "queues",
        "definition": definition,
        "priority": 0,
        **fields,
    }


async def test_a_policy_set_a_moment_ago_is_read_from_the_policy_list() -> None:
    """A policy the stale queue view lacks is read from the live list and refused at once."""
    seen: list[httpx.Request] = []
    stale = queue_json(delivery_limit=20)
    transport = api(stale, seen=seen, policies=[listed("p1", {"delivery-limit": 5})])
    with pytest.raises(TopologyError, match="policy 'p1' sets delivery-limit to 5"):
        await read(transport, V4_3)
    assert len(seen) == 1


async def test_a_policy_cleared_a_moment_ago_no_longer_refuses() -> None:
    """The queue object still shows a cleared policy and its delivery_limit; the list has none."""
    seen: list[httpx.Request] = []
    stale = queue_json(policy="old", definition={"delivery-limit": 3}, delivery_limit=3)
    fine = listed("mw", {"consumer-disconnected-timeout": 15000})
    assert await read(api(stale, seen=seen, policies=[fine]), V4_3) == []


def test_live_policies_resolve_as_the_broker_does() -> None:
    """Priority, apply-to and pattern pick the policy; an operator policy lowers its limits."""
    policies = [
        listed("low", {"delivery-limit": 9}, priority=1),
        listed("high", {"delivery-limit": 8, "consumer-timeout": 5000}, priority=5),
        listed("classic-only", {"delivery-limit": 1}, priority=9, **{"apply-to": "classic_queues"}),
        listed("exchanges", {"delivery-limit": 1}, priority=9, **{"apply-to": "exchanges"}),
        listed("broken", {"delivery-limit": 1}, priority=9, pattern="(?<"),
        listed("elsewhere", {"delivery-limit": 1}, priority=9, pattern="^other$"),
    ]
    operator = [listed("ops", {"delivery-limit": 6, "consumer-timeout": 9000}, pattern="items")]
    resolved = with_live_policies(queue_json(delivery_limit=20), policies, operator)
    assert resolved["policy"] == "high" and resolved["operator_policy"] == "ops"
    assert resolved["effective_policy_definition"] == {
        "delivery-limit": 6,
        "consumer-timeout": 5000,
    }
    assert "delivery_limit" not in resolved


def test_a_quorum_only_policy_applies_to_the_quorum_work_queue() -> None:
    """apply-to quorum_queues matches a quorum queue; nothing matching leaves no policy."""
    quorum = listed("q", {"delivery-limit": 4}, **{"apply-to": "quorum_queues"})
    assert with_live_policies(queue_json(), [quorum], [])["policy"] == "q"
    nothing = with_live_policies(queue_json(policy="stale"), [], [])
    assert nothing["policy"] is None and nothing["effective_policy_definition"] == {}


async def test_a_4x_queue_is_read_again_until_its_delivery_limit_shows() -> None:
    """Without policy lists a 4.x queue is read again until delivery_limit shows, then compared."""
    seen: list[httpx.Request] = []
    transport = api(queue_json(), queue_json(), queue_json(delivery_limit=3), seen=seen)
    with pytest.raises(TopologyError, match="delivery limit of 3"):
        await read(transport, V4_3)
    assert len(seen) == 3


async def test_a_3x_queue_is_read_once() -> None:
    """3.x never shows delivery_limit: one read, no wait."""
    seen: list[httpx.Request] = []
    assert await read(api(queue_json(), seen=seen), V3_10) == []
    assert len(seen) == 1


async def test_the_wait_for_statistics_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    """A delivery_limit that never shows ends the wait after STATS_WAIT_S; the rest is compared."""
    monkeypatch.setattr(management, "STATS_WAIT_S", 0.2)
    monkeypatch.setattr(management, "STATS_POLL_S", 0.05)
    seen: list[httpx.Request] = []
    [warning] = await read(api(queue_json(), seen=seen), V4_3)
    assert "consumer-disconnected-timeout" in warning
    assert 2 <= len(seen) <= 6
