"""A Retry-After from Session-Buddy pauses every store to it: a real RabbitMQ, the stand-in."""

from __future__ import annotations

import time

import pytest

from tests.integration.helpers import depth, publish_items, wait_until
from worker.service import Service
from worker.testing import StandIn, StandInConfig

pytestmark = pytest.mark.integration

RETRY_AFTER_S = 3


async def test_retry_after_pauses_all_dispatch_not_one_item(make_settings, connection):
    """After 429s with Retry-After 3 s, no further store call reaches the sink until 3 s after
    the 429s were answered; the items waiting meanwhile are stored afterwards, none dead-lettered.

    The first stores are held at the stand-in and released together, so every 429 is answered
    after `released_at`; the pause then ends no earlier than `released_at + RETRY_AFTER_S`. The
    next call is seen at or after it reaches the stand-in, so a slow machine can only make the
    measured gap longer, never shorter: no tight wall-clock window.
    """
    published, concurrency = 20, 5
    async with StandIn(StandInConfig(error_429=1.0, retry_after_s=RETRY_AFTER_S)) as sb:
        settings = make_settings(
            pools={"session_buddy_url": sb.url, "max_concurrent_memory_insertions": concurrency},
            sink={"breaker_failures": 0},  # the pause alone, without the breaker
        )
        assert settings.sink.retry_after_max_s >= RETRY_AFTER_S
        await publish_items(connection, settings, published)
        sb.hold()
        async with Service(settings) as service:
            await wait_until(lambda: sb.held == concurrency)  # one store per slot, none answered
            released_at = time.monotonic()
            sb.release()
            await wait_until(lambda: sb.stats.faults.get("error_429", 0) >= concurrency)
            sb.config.error_429 = 0.0
            await wait_until(lambda: sb.stats.calls > concurrency)
            next_call_after_s = time.monotonic() - released_at
            await wait_until(lambda: sb.stats.distinct_keys == published, timeout_s=60)
            pauses = service.metrics.registry.get_sample_value("memory_worker_sink_pauses_total")
        dead = await depth(connection, settings.rabbitmq.dead_letter_queue)
    assert next_call_after_s >= RETRY_AFTER_S
    assert pauses is not None and pauses >= 1
    assert dead == 0 and sb.stats.duplicates == 0
