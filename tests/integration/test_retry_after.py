"""A Retry-After from Session-Buddy pauses every store to it: a real RabbitMQ, the stand-in."""

from __future__ import annotations

import asyncio

import pytest

from tests.integration.helpers import depth, publish_items, wait_until
from worker.service import Service
from worker.testing import StandIn, StandInConfig

pytestmark = pytest.mark.integration

RETRY_AFTER_S = 3


async def test_retry_after_pauses_all_dispatch_not_one_item(make_settings, connection):
    """After 429s with Retry-After 3 s no store call at all reaches the sink for 1.5 s; the
    items waiting meanwhile are stored afterwards, none dead-lettered."""
    published, concurrency = 20, 5
    async with StandIn(StandInConfig(error_429=1.0, retry_after_s=RETRY_AFTER_S)) as sb:
        settings = make_settings(
            pools={"session_buddy_url": sb.url, "max_concurrent_memory_insertions": concurrency},
            sink={"breaker_failures": 0},  # the pause alone, without the breaker
        )
        await publish_items(connection, settings, published)
        async with Service(settings) as service:
            await wait_until(lambda: sb.stats.faults.get("error_429", 0) >= concurrency)
            sb.config.error_429 = 0.0
            calls = sb.stats.calls
            await asyncio.sleep(RETRY_AFTER_S / 2)
            calls_during_pause = sb.stats.calls - calls
            await wait_until(lambda: sb.stats.distinct_keys == published, timeout_s=60)
            pauses = service.metrics.registry.get_sample_value("memory_worker_sink_pauses_total")
        dead = await depth(connection, settings.rabbitmq.dead_letter_queue)
    assert calls_during_pause == 0
    assert pauses is not None and pauses >= 1
    assert dead == 0 and sb.stats.duplicates == 0
