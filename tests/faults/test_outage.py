"""A ten-minute Session-Buddy outage under production breaker and retry settings.

Marked `slow`: `make test` runs it apart from the rest of the suite, in the background first,
since most of its time is spent waiting for the outage to end. `MW_OUTAGE_S` shortens the outage
for a local try; CI runs the full ten minutes.
"""

from __future__ import annotations

import asyncio
import os

import pytest

from tests.faults.ledger import drained, tally
from tests.integration.helpers import depth, publish_items, wait_until
from worker.breaker import State
from worker.service import Service
from worker.testing import StandIn, StandInConfig

pytestmark = [pytest.mark.integration, pytest.mark.faults, pytest.mark.slow]

OUTAGE_S = float(os.environ.get("MW_OUTAGE_S", "600"))


@pytest.mark.timeout(OUTAGE_S + 600)
async def test_ten_minute_outage_ends_with_zero_dead_letters(make_settings, connection):
    """Session-Buddy down for 10 minutes mid-run: the worker pauses, probes, and after recovery
    stores every item; nothing is dead-lettered, nothing lost, nothing spins."""
    published = 400
    async with StandIn(StandInConfig(latency_s=0.02, error_503=0.05, seed=5)) as sb:
        # Production breaker, retry and delivery-limit settings: only the names are the test's.
        settings = make_settings(pools={"session_buddy_url": sb.url, "adaptive_concurrency": True})
        await publish_items(connection, settings, published)
        async with Service(settings) as service:
            await wait_until(lambda: sb.stats.distinct_keys >= published // 4, timeout_s=60)
            # Transient failures just before: some items wait in retry queues when it starts.
            sb.config.error_503 = 0.0
            sb.outage(OUTAGE_S)
            refused_before = sb.stats.faults.get("outage", 0)
            stored_at_start = sb.stats.distinct_keys
            open_seen = False
            loop = asyncio.get_running_loop()
            ends = loop.time() + OUTAGE_S
            dead_during = 0
            while loop.time() < ends:
                open_seen = open_seen or service.breaker.state is State.OPEN
                dead_during = await depth(connection, settings.rabbitmq.dead_letter_queue)
                await asyncio.sleep(min(5.0, max(0.0, ends - loop.time())))
            refused = sb.stats.faults.get("outage", 0) - refused_before
            await wait_until(lambda: sb.stats.distinct_keys == published, timeout_s=180)
            await drained(connection, settings, sb, timeout_s=60)
            assert service.breaker.state is State.CLOSED and service.ready
            parked = service.metrics.counts["retry"]
        ledger = await tally(connection, settings, sb, published)
    print(
        f"outage {OUTAGE_S:g} s: {stored_at_start} stored before, {refused} requests refused "
        f"during it (probes and in-flight stores), {parked} retries and parked copies in all"
    )
    print(f"outage ledger: {ledger}")
    assert open_seen and dead_during == 0
    assert ledger.lost == 0 and ledger.dead == 0 and ledger.stored == published
    assert ledger.still_queued == 0
    # The worker paused instead of spinning: a handful of probes per minute at most.
    assert refused <= settings.concurrency + 20 * max(1.0, OUTAGE_S / 60)
