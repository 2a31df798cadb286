"""The sink's circuit breaker end to end: a real RabbitMQ, the stand-in Session-Buddy."""

from __future__ import annotations

import asyncio

import pytest

from tests.integration.helpers import depth, publish_items, wait_until
from worker.breaker import State
from worker.service import Service
from worker.testing import StandIn, StandInConfig

pytestmark = pytest.mark.integration

ITEMS = 100
MAX_ATTEMPTS = 3  # without the breaker, a 3 s outage would dead-letter most items


async def run_through_fault(service: Service, sb: StandIn) -> list[bool]:
    """Sample readiness until every item is stored; returns the samples."""
    samples: list[bool] = []

    async def sample() -> None:
        while True:
            samples.append(service.ready)
            await asyncio.sleep(0.05)

    sampler = asyncio.create_task(sample())
    try:
        await wait_until(lambda: sb.stats.distinct_keys == ITEMS, timeout_s=40)
    finally:
        sampler.cancel()
    return samples


def transitions(service: Service, state: str) -> float:
    """How often the breaker entered `state`, from the Prometheus registry."""
    value = service.metrics.registry.get_sample_value(
        "memory_worker_breaker_transitions_total", {"state": state}
    )
    return value or 0.0


async def test_outage_pauses_consumption_and_loses_nothing(make_settings, connection):
    """A Session-Buddy outage opens the breaker: no dead letters, no storm, all stored after."""
    async with StandIn(StandInConfig(latency_s=0.005)) as sb:
        settings = make_settings(
            pools={"session_buddy_url": sb.url},
            retry={"max_attempts": MAX_ATTEMPTS},
            sink={"breaker_open_s": 0.3},
        )
        await publish_items(connection, settings, ITEMS)
        sb.outage(3)
        async with Service(settings) as service:
            samples = await run_through_fault(service, sb)
            assert service.breaker.state is State.CLOSED and service.ready
            assert service.metrics.counts["dead_letter"] == 0
            assert transitions(service, "open") >= 1 and transitions(service, "closed") >= 1
            assert service.metrics.registry.get_sample_value("memory_worker_breaker_state") == 0
        assert False in samples  # not ready while the breaker was open
        # Every request refused during the outage: a few in-flight stores plus the probes,
        # far below items x attempts.
        assert sb.stats.faults["outage"] < 40 < ITEMS * MAX_ATTEMPTS
    assert await depth(connection, settings.rabbitmq.dead_letter_queue) == 0
    assert await depth(connection, settings.rabbitmq.queue) == 0


async def test_bad_credentials_pause_then_resume(make_settings, connection):
    """401 for every request opens the breaker; once credentials work again all is stored."""
    async with StandIn(StandInConfig(latency_s=0.005)) as sb:
        settings = make_settings(
            pools={"session_buddy_url": sb.url},
            retry={"max_attempts": MAX_ATTEMPTS},
            sink={"breaker_open_s": 0.3},
        )
        await publish_items(connection, settings, ITEMS)
        sb.config.status_for_all = 401
        asyncio.get_running_loop().call_later(2.0, setattr, sb.config, "status_for_all", None)
        async with Service(settings) as service:
            samples = await run_through_fault(service, sb)
            assert service.metrics.counts["dead_letter"] == 0
        assert False in samples
        assert sb.stats.faults["status"] < 40
    assert await depth(connection, settings.rabbitmq.dead_letter_queue) == 0
    assert await depth(connection, settings.rabbitmq.queue) == 0
