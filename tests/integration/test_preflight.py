"""Preflight against a real broker: refused settings exit 78 before anything is consumed, and the
worker's own consumer timeout (what the broker applies through its management API is in
`test_preflight_management.py`)."""

from __future__ import annotations

import asyncio
import os

import pytest

from tests.integration.helpers import (
    depth,
    has_rabbitmqctl,
    publish_items,
    rabbitmqctl,
    start_worker_process,
    wait_until,
    worker_env,
)
from worker.exitcodes import EXIT_CONFIG
from worker.service import Service
from worker.testing import StandIn

pytestmark = pytest.mark.integration


async def test_timeout_beyond_consumer_timeout_exits_78_before_consuming(make_settings, connection):
    """sink.timeout_s 1000 against consumer_timeout 1800 s: exit 78, the item stays queued."""
    settings = make_settings()
    await publish_items(connection, settings, 1)
    env = worker_env(
        settings,
        MAHAVISHNU_SINK__TIMEOUT_S="1000",
        MAHAVISHNU_RABBITMQ__CONSUMER_TIMEOUT_S="1800",
    )
    process = await start_worker_process(env)
    _, stderr = await asyncio.wait_for(process.communicate(), 60)
    text = stderr.decode()
    assert process.returncode == EXIT_CONFIG, text
    for part in (
        "MAHAVISHNU_SINK__TIMEOUT_S",
        "MAHAVISHNU_RABBITMQ__CONSUMER_TIMEOUT_S",
        "2030 s",
        "1800 s",
    ):
        assert part in text, text
    assert await depth(connection, settings.rabbitmq.queue) == 1


async def test_management_api_that_does_not_answer_does_not_stop_the_worker(
    make_settings, connection
):
    """With management_url set but nothing listening there, the worker warns and consumes."""
    async with StandIn() as sb:
        settings = make_settings(
            pools={"session_buddy_url": sb.url},
            rabbitmq={"management_url": "http://guest:guest@127.0.0.1:9/"},
        )
        await publish_items(connection, settings, 3)
        async with Service(settings):
            await wait_until(lambda: sb.stats.distinct_keys == 3)
    assert await depth(connection, settings.rabbitmq.queue) == 0


async def consumer_arguments(queue: str) -> str:
    """The arguments column of `rabbitmqctl list_consumers` for `queue`'s consumers."""
    listing = await rabbitmqctl("list_consumers", "queue_name", "arguments")
    return "\n".join(row for row in listing.splitlines() if row.startswith(queue + "\t"))


async def test_the_worker_asks_for_its_own_consumer_timeout(make_settings, connection):
    """The worker's basic.consume carries x-consumer-timeout = consumer_timeout_s in ms."""
    if not has_rabbitmqctl():
        if os.environ.get("CI"):
            pytest.fail("rabbitmqctl is needed to list the worker's consumer")
        pytest.skip("needs rabbitmqctl for the broker under test")
    async with StandIn() as sb:
        settings = make_settings(
            pools={"session_buddy_url": sb.url}, rabbitmq={"consumer_timeout_s": 1234.5}
        )
        await publish_items(connection, settings, 2)
        async with Service(settings):
            await wait_until(lambda: sb.stats.distinct_keys == 2)
            shown = await consumer_arguments(settings.rabbitmq.queue)
    assert "x-consumer-timeout" in shown and "1234500" in shown, shown


async def test_a_classic_work_queue_is_consumed_without_a_consumer_timeout_argument(
    make_settings, connection
):
    """A classic work queue is consumed without x-consumer-timeout, which 4.3 refuses there."""
    async with StandIn() as sb:
        settings = make_settings(
            pools={"session_buddy_url": sb.url}, rabbitmq={"queue_type": "classic"}
        )
        await publish_items(connection, settings, 3)
        async with Service(settings):
            await wait_until(lambda: sb.stats.distinct_keys == 3)
    assert await depth(connection, settings.rabbitmq.queue) == 0
