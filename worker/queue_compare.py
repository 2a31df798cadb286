"""The work queue as the broker applies it, against the settings: pure, unit-tested comparisons.

Input is the management API's JSON of `GET /api/queues/<vhost>/<name>` (`type`, `arguments`,
`policy`, `effective_policy_definition`, on 4.x `delivery_limit`), its policy fields resolved
afresh from the policy lists where those can be read (`with_live_policies`), and the broker's
version; `worker.management` reads them. A problem stops the worker (exit 78); a warning is
logged.

Which consumer timeout RabbitMQ applies to a delivery (its docs and release notes; 4.0.5 and
4.3.6 as observed on the test machine):

| version | the timeout that applies |
|---|---|
| < 3.11.15 | the global `consumer_timeout` only |
| 3.11.15 to 3.13 | the consumer's `x-consumer-timeout`, else the queue's (argument or policy) |
| 4.0 to 4.2 | the queue's, else the global: 4.0.5 ignored the consumer's (4.1, 4.2 assumed alike) |
| 4.3 and later | as 3.11.15 to 3.13, on quorum queues |

The queue's is the shorter of its `x-consumer-timeout` argument and a policy's
`consumer-timeout`. The worker sets its own on every `basic.consume`, so where the consumer's
wins, the queue's cannot take deliveries back early.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from worker.topology import Topology

Version = tuple[int, ...]

#: One store attempt per delivery (retries go through the broker), but an MCP session re-open
#: can run the store call a second time within the same delivery.
IN_PROCESS_ATTEMPTS = 2
#: RabbitMQ's default `consumer_disconnected_timeout` (4.3 and later).
BROKER_DISCONNECTED_TIMEOUT_S = 60.0


def held_s(sink_timeout_s: float, confirm_timeout_s: float) -> float:
    """The longest the worker holds a delivery: its store attempts plus one publish confirm."""
    return IN_PROCESS_ATTEMPTS * sink_timeout_s + confirm_timeout_s


def parse_version(text: object) -> Version | None:
    """`(4, 3, 6)` from "4.3.6" (str or bytes, suffixes ignored); None when it is no version."""
    if isinstance(text, bytes):
        text = text.decode(errors="replace")
    match = re.match(r"(\d+)\.(\d+)(?:\.(\d+))?", text) if isinstance(text, str) else None
    return tuple(int(part) for part in match.groups(default="0")) if match else None


def consumer_argument_applies(version: Version | None) -> bool:
    """Whether the broker lets a consumer's own `x-consumer-timeout` win over the queue's."""
    return version is not None and ((3, 11, 15) <= version < (4,) or version >= (4, 3))


def _queue_timeout_applies(version: Version | None, queue_type: Any) -> bool:
    """Whether a queue's own consumer timeout is enforced (unknown version: assume so)."""
    if version is None:
        return True
    # 4.3 enforces consumer timeouts on quorum queues only.
    return version >= (3, 11, 15) and (version < (4, 3) or queue_type == "quorum")


@dataclass(frozen=True, slots=True)
class Expected:
    """What the worker needs of the broker beyond the queue's declaration."""

    version: Version | None = None
    held_s: float = 0.0  # the longest the worker holds a delivery
    consumer_timeout_s: float = 1800.0  # what it asks for on basic.consume
    disconnected_timeout_s: float | None = None  # None: not checked

    @property
    def shown_version(self) -> str:
        """The version as RabbitMQ prints it, or "an unknown version"."""
        return ".".join(map(str, self.version)) if self.version else "an unknown version"


def _normalised(definition: Any) -> dict[str, Any]:
    # An empty policy definition is `[]` in some RabbitMQ versions' JSON.
    if not isinstance(definition, Mapping):
        return {}
    return {str(k).removeprefix("x-"): v for k, v in definition.items()}


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def _policy(queue: Mapping[str, Any]) -> str:
    return str(queue.get("policy") or queue.get("operator_policy") or "?")


def queue_value_ms(queue: Mapping[str, Any], key: str) -> tuple[float, str] | None:
    """The shorter of the queue's argument `x-<key>` and its policy's `<key>`, and its source."""
    found = []
    if (value := _number(_normalised(queue.get("arguments")).get(key))) is not None:
        found.append((value, f"argument x-{key}"))
    definition = _normalised(queue.get("effective_policy_definition"))
    if (value := _number(definition.get(key))) is not None:
        found.append((value, f"policy {_policy(queue)!r}"))
    return min(found) if found else None


def _applies_to(apply_to: Any, queue_type: Any) -> bool:
    kinds = {"quorum": "quorum_queues", "classic": "classic_queues", "stream": "streams"}
    return apply_to in ("all", "queues") or apply_to == kinds.get(str(queue_type))


def _matches(pattern: Any, name: str) -> bool:
    try:
        return isinstance(pattern, str) and re.search(pattern, name) is not None
    except re.error:  # an Erlang-only regex: that policy cannot be resolved here
        return False


def _winner(policies: Any, name: str, queue_type: Any) -> Mapping[str, Any] | None:
    """The matching policy of highest priority (the first of equals), as RabbitMQ picks one."""
    found = [
        p
        for p in (policies if isinstance(policies, list) else [])
        if isinstance(p, Mapping)
        and _applies_to(p.get("apply-to"), queue_type)
        and _matches(p.get("pattern"), name)
    ]
    return max(found, key=lambda p: _number(p.get("priority")) or 0, default=None)


def with_live_policies(
    queue: Mapping[str, Any], policies: Any, operator_policies: Any
) -> dict[str, Any]:
    """The queue object with its policy fields resolved from the policies as they are now.

    The management API fills a queue's `policy`, `effective_policy_definition` and (4.x)
    `delivery_limit` in at a statistics pass: absent for seconds after a declare, stale for up
    to ~10 s after a policy changes (3.10.8 and 4.3.6). The policy lists are read live, so the
    worker resolves them as the broker does: the user policy of highest priority, its numeric
    keys lowered by the operator policy's. The stale `delivery_limit` is dropped.
    """
    name, queue_type = str(queue.get("name")), queue.get("type")
    user = _winner(policies, name, queue_type)
    operator = _winner(operator_policies, name, queue_type)
    definition = dict(_normalised(user.get("definition")) if user else {})
    for key, value in _normalised(operator.get("definition") if operator else {}).items():
        mine, theirs = _number(definition.get(key)), _number(value)
        definition[key] = min(mine, theirs) if mine is not None and theirs is not None else value
    resolved = {k: v for k, v in queue.items() if k != "delivery_limit"}
    resolved["policy"] = user.get("name") if user else None
    resolved["operator_policy"] = operator.get("name") if operator else None
    resolved["effective_policy_definition"] = definition
    return resolved


_SETTING_OF = {
    "dead-letter-exchange": "rabbitmq.exchange (its .dlx)",
    "dead-letter-routing-key": "rabbitmq.dead_letter_queue",
    "delivery-limit": "rabbitmq.delivery_limit",
    "dead-letter-strategy": "rabbitmq.queue_type",
    "overflow": "rabbitmq.queue_type",
}


def queue_problems(queue: Mapping[str, Any], topology: Topology) -> list[str]:
    """Differences between the management API's queue object and the work queue we expect.

    A policy key that disagrees is reported even when the queue's own argument takes
    precedence, because the operator's intent and the worker's disagree either way. Where the
    queue object has 4.x's `delivery_limit`, the broker's own resolution, it is compared too.
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
    for key, have in _normalised(queue.get("effective_policy_definition")).items():
        if key in expected and have != expected[key]:
            problems.append(
                f"queue {name!r}: policy {_policy(queue)!r} sets {key} to {have!r}, settings "
                f"expect {expected[key]!r} ({_SETTING_OF.get(key, 'rabbitmq')})"
            )
    limit = queue.get("delivery_limit")
    said = any("delivery-limit" in p for p in problems)
    if "delivery-limit" in expected and not said and limit not in (None, topology.delivery_limit):
        problems.append(
            f"queue {name!r}: the broker applies a delivery limit of {limit} (delivery_limit "
            f"in the management API), settings expect {topology.delivery_limit} "
            "(rabbitmq.delivery_limit)"
        )
    return problems


def consumer_timeout_findings(
    queue: Mapping[str, Any], expected: Expected
) -> tuple[list[str], list[str]]:
    """Problems and warnings when the queue's consumer timeout is shorter than a delivery lasts."""
    found = queue_value_ms(queue, "consumer-timeout")
    version, queue_type = expected.version, queue.get("type")
    if found is None or not _queue_timeout_applies(version, queue_type):
        return [], []
    timeout_s, source = found[0] / 1000, found[1]
    if timeout_s >= expected.held_s:
        return [], []
    said = (
        f"queue {queue.get('name')!r}: {source} sets the consumer timeout to {timeout_s:g} s, "
        f"less than the {expected.held_s:g} s the worker can hold a delivery "
        f"({IN_PROCESS_ATTEMPTS} x sink.timeout_s + the publish confirm)"
    )
    # The worker sends its own on quorum queues only (Topology.consumer_arguments).
    if consumer_argument_applies(version) and queue_type == "quorum":
        return [], [
            f"{said}; RabbitMQ {expected.shown_version} applies the worker's own "
            f"x-consumer-timeout ({expected.consumer_timeout_s:g} s, "
            "rabbitmq.consumer_timeout_s) instead"
        ]
    return [
        f"{said}: RabbitMQ {expected.shown_version} applies it to the worker's consumer and would "
        "take the delivery back and redeliver it. Raise it to at least "
        f"{expected.held_s * 1000:.0f} ms, or lower sink.timeout_s (MAHAVISHNU_SINK__TIMEOUT_S)"
    ], []


def disconnected_timeout_warning(queue: Mapping[str, Any], expected: Expected) -> str | None:
    """A warning when a quorum queue returns a lost consumer's deliveries later or sooner than
    `rabbitmq.consumer_disconnected_timeout_s` says (RabbitMQ 4.3 and later)."""
    want_s, version = expected.disconnected_timeout_s, expected.version
    if want_s is None or version is None or version < (4, 3) or queue.get("type") != "quorum":
        return None
    found = queue_value_ms(queue, "consumer-disconnected-timeout")
    if found is not None and found[0] == want_s * 1000:
        return None
    if found is None:
        have = (
            f"is the broker's consumer_disconnected_timeout ({BROKER_DISCONNECTED_TIMEOUT_S:g} s "
            "unless rabbitmq.conf sets another)"
        )
    else:
        have = f"is {found[0] / 1000:g} s ({found[1]})"
    return (
        f"queue {queue.get('name')!r}: consumer-disconnected-timeout {have}, settings expect "
        f"{want_s:g} s (rabbitmq.consumer_disconnected_timeout_s): a lost node's deliveries wait "
        "that long. Set it by policy (deploy/README.md, RabbitMQ versions), or change the setting"
    )


def findings(
    queue: Mapping[str, Any], topology: Topology, expected: Expected
) -> tuple[list[str], list[str]]:
    """Every problem (refuse to start) and warning (start, say so) about the work queue."""
    problems = queue_problems(queue, topology)
    timeout_problems, warnings = consumer_timeout_findings(queue, expected)
    problems += timeout_problems
    if (warning := disconnected_timeout_warning(queue, expected)) is not None:
        warnings.append(warning)
    return problems, warnings
