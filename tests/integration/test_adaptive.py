"""Adaptive concurrency end to end: a real RabbitMQ, the stand-in Session-Buddy with a capacity."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from tests.integration.helpers import publish_items, wait_until
from worker.service import Service
from worker.settings import Settings
from worker.testing import StandIn, StandInConfig

pytestmark = pytest.mark.integration

MAX = 20
PREFETCH = 25  # MAX and a quarter


def sink_settings(make_settings: Any, sb: StandIn, adaptive: bool) -> Settings:
    """Settings on the stand-in with a maximum of MAX, adaptation on or off."""
    pools = {"session_buddy_url": sb.url, "max_concurrent_memory_insertions": MAX}
    return make_settings(pools={**pools, "adaptive_concurrency": adaptive})


async def test_one_call_at_a_time_sink_keeps_the_limit_low_and_prefetch_still(
    make_settings, connection
):
    """A sink that serves one call at a time: from the maximum the limit comes down to 1-3;
    prefetch stays where it started and the consumer never re-subscribes for it."""
    published = 400
    async with StandIn(StandInConfig(latency_s=0.01, max_concurrency=1)) as sb:
        settings = sink_settings(make_settings, sb, adaptive=True)
        await publish_items(connection, settings, published)
        async with Service(settings) as service:
            consumer = service._consumer
            assert consumer is not None
            assert service.limit.limit == MAX  # nothing to learn before the first store
            await wait_until(lambda: sb.stats.distinct_keys >= 150, timeout_s=60)
            assert service.limit.unloaded_s is not None  # measured by stores that ran alone
            limits, prefetches, peaks = [], [], []
            while sb.stats.distinct_keys < published - 50:
                limits.append(service.limit.limit)
                prefetches.append(consumer.prefetch)
                peaks.append(sb.stats.in_flight)
                await asyncio.sleep(0.01)
            await wait_until(lambda: sb.stats.distinct_keys == published, timeout_s=60)
            resubscribed = service.metrics.registry.get_sample_value(
                "memory_worker_consumer_resubscriptions_total"
            )
        print(f"limits {sorted(set(limits))}, prefetches {sorted(set(prefetches))}")
    assert max(limits) <= 4
    assert set(prefetches) == {PREFETCH}
    assert max(peaks) <= 4
    assert resubscribed == 0
    assert sb.stats.duplicates == 0


async def test_adaptation_off_keeps_the_fixed_limit(make_settings, connection):
    """With pools.adaptive_concurrency false the limit and the prefetch stay where they start."""
    published = 200
    async with StandIn(StandInConfig(latency_s=0.01, max_concurrency=1)) as sb:
        settings = sink_settings(make_settings, sb, adaptive=False)
        await publish_items(connection, settings, published)
        async with Service(settings) as service:
            consumer = service._consumer
            assert consumer is not None
            await wait_until(lambda: sb.stats.in_flight == MAX, timeout_s=30)
            assert service.limit.limit == MAX and consumer.prefetch == PREFETCH
            await wait_until(lambda: sb.stats.distinct_keys == published, timeout_s=60)
            assert service.limit.limit == MAX and consumer.prefetch == PREFETCH


async def test_limit_follows_a_capacity_drop_and_recovers(make_settings, connection):
    """Healthy sink: the limit stays at the max; capacity drops to 3: it follows; back: climbs."""
    published = 6_000
    async with StandIn(StandInConfig(latency_s=0.05)) as sb:
        settings = sink_settings(make_settings, sb, adaptive=True)
        await publish_items(connection, settings, published)
        async with Service(settings) as service:
            consumer = service._consumer
            assert consumer is not None
            await wait_until(lambda: sb.stats.in_flight == MAX)
            assert service.limit.limit == MAX
            sb.config.max_concurrency = 3
            await wait_until(lambda: service.limit.limit <= 6, timeout_s=20)
            assert consumer.prefetch == PREFETCH
            dropped_to = service.limit.limit
            sb.config.max_concurrency = None
            await wait_until(lambda: service.limit.limit == MAX, timeout_s=60)
            sb.config.latency_s = 0.0
            await wait_until(lambda: sb.stats.distinct_keys == published, timeout_s=120)
        print(f"dropped to {dropped_to}, unloaded {service.limit.unloaded_s:.3f} s")
    assert sb.stats.duplicates == 0
