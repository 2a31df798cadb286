"""Preflight through the management API, on RabbitMQ 4.3: the queue's consumer timeouts, its
disconnected timeout and its delivery limit as the broker applies them. The machine's broker
has no management API, so these run on a private 4.3 node unless the session's broker has one."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import pytest
from structlog.testing import capture_logs

from tests.integration.conftest import broker_with_management
from tests.integration.helpers import depth, publish_items, rabbitmqctl, wait_until
from worker.exitcodes import EXIT_CONFIG
from worker.management import management_queue_url
from worker.preflight import broker_version, check
from worker.service import Service
from worker.testing import StandIn, StandInConfig

pytestmark = pytest.mark.integration

#: The management URL of the broker this module's tests run on (set by `amqp_url`).
_API: list[str] = []


@pytest.fixture(scope="module")
def amqp_url(amqp_url: str) -> Iterator[str]:
    """The session's broker where it has a management API, else a private 4.3 node with one."""
    yield from broker_with_management(amqp_url, _API, "the preflight's management API tests")


@pytest.fixture
def management_url(amqp_url: str) -> str:
    """The management API of this module's broker."""
    return _API[-1]


@contextlib.asynccontextmanager
async def policy(queue: str, definition: dict[str, Any]) -> AsyncIterator[None]:
    """A policy on exactly `queue` (nothing else on the broker matches it), cleared after."""
    name = f"mw-test-{uuid.uuid4().hex[:8]}"
    pattern = "^" + re.escape(queue) + "$"
    await rabbitmqctl("set_policy", name, pattern, json.dumps(definition), "--apply-to", "queues")
    try:
        yield
    finally:
        await rabbitmqctl("clear_policy", name)


async def version_of(connection) -> tuple[int, ...]:
    """The version of the broker under test, from its AMQP handshake."""
    version = broker_version(connection)
    assert version is not None
    return version


async def needs_4_3(connection) -> None:
    """Skip on brokers before 4.3: what the test shows is 4.3's behaviour."""
    if await version_of(connection) < (4, 3):
        pytest.skip("RabbitMQ 4.3 behaviour: run with MEMORY_WORKER_TEST_RABBITMQ=4.3")


async def test_a_short_queue_policy_cannot_take_a_delivery_back_on_4_3(
    make_settings, connection, management_url
):
    """On 4.3 a 2 s consumer-timeout policy cannot take back 5 s stores: one call each, warned."""
    await needs_4_3(connection)
    async with StandIn(StandInConfig(latency_s=5.0)) as sb:
        settings = make_settings(
            pools={"session_buddy_url": sb.url},
            rabbitmq={"management_url": management_url},
            sink={"timeout_s": 20},
        )
        await publish_items(connection, settings, 2)
        async with policy(settings.rabbitmq.queue, {"consumer-timeout": 2000}):
            with capture_logs() as logs:
                async with Service(settings) as service:
                    await wait_until(lambda: service.metrics.counts["ack"] == 2, 30)
    assert sb.stats.calls == 2 and sb.stats.duplicates == 0
    events = [entry["event"] for entry in logs]
    assert "consumer_cancelled_by_broker" not in events, events
    warnings = [e["detail"] for e in logs if e["event"] == "broker_disagrees_with_settings"]
    [warning] = [w for w in warnings if "consumer timeout" in w]
    assert "sets the consumer timeout to 2 s" in warning and "applies the worker's own" in warning
    assert await depth(connection, settings.rabbitmq.queue) == 0


async def test_check_reports_the_disconnected_timeout_until_a_policy_sets_it(
    make_settings, connection, management_url
):
    """On 4.3 `check` warns about the disconnected timeout until a policy sets 15 s."""
    await needs_4_3(connection)
    async with StandIn() as sb:
        settings = make_settings(
            pools={"session_buddy_url": sb.url}, rabbitmq={"management_url": management_url}
        )
        await publish_items(connection, settings, 1)
        before = await check(settings)
        async with policy(settings.rabbitmq.queue, {"consumer-disconnected-timeout": 15000}):
            after = await check(settings)
    [queues_before] = [f for f in before if f.name.startswith("queues of")]
    [queues_after] = [f for f in after if f.name.startswith("queues of")]
    assert queues_before.problem is None and queues_after.problem is None
    assert "warning:" in queues_before.name and "60 s" in queues_before.name
    assert "consumer-disconnected-timeout" in queues_before.name
    assert "warning" not in queues_after.name


async def statistics_shown(management_url: str, queue: str) -> None:
    """Wait until the management API's view of `queue` has its statistics (its policy field)."""
    url, auth = management_queue_url(management_url, "amqp://h/", queue)
    async with httpx.AsyncClient(auth=auth) as http:
        for _ in range(150):
            if "policy" in (await http.get(url)).json():
                return
            await asyncio.sleep(0.1)
    raise AssertionError(f"the management API never showed statistics for {queue}")


async def test_a_delivery_limit_policy_set_just_before_the_start_is_not_missed(
    make_settings, connection, management_url
):
    """A delivery-limit policy set a moment before `check`, unseen in the queue view, is refused."""
    async with StandIn() as sb:
        settings = make_settings(
            pools={"session_buddy_url": sb.url}, rabbitmq={"management_url": management_url}
        )
        await publish_items(connection, settings, 1)
        await statistics_shown(management_url, settings.rabbitmq.queue)
        async with policy(settings.rabbitmq.queue, {"delivery-limit": 5}):
            found = await check(settings)
    [queues] = [f for f in found if f.name.startswith("queues of")]
    assert queues.code == EXIT_CONFIG and queues.problem is not None
    assert "delivery" in queues.problem and "5" in queues.problem, queues.problem
