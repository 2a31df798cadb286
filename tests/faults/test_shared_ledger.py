"""Redelivery across workers with the shared ledger in Redis; each test prints its ledger."""

from __future__ import annotations

import asyncio
import signal

import pytest

from tests.faults.ledger import Proxy, broker_address, drained, tally, via
from tests.integration.helpers import publish_items, start_worker_process, wait_until, worker_env
from tests.integration.test_redis_ledger import counted
from worker.service import Service
from worker.testing import StandIn, StandInConfig

pytestmark = [pytest.mark.integration, pytest.mark.faults]


@pytest.mark.parametrize("shared", [True, False], ids=["ledger", "no-ledger"])
async def test_link_cut_mid_store_redelivers_to_another_worker(
    make_settings, connection, amqp_url, redis_url, ledger_prefix, shared
):
    """A loses its broker link mid-store and B gets the items: no duplicate with the ledger."""
    published = 10
    async with StandIn() as sb, Proxy(*broker_address(amqp_url)) as proxy:
        ledger = {"url": redis_url, "key_prefix": ledger_prefix} if shared else {}
        pools = {
            "session_buddy_url": sb.url,
            "max_concurrent_memory_insertions": published,
            "adaptive_concurrency": False,  # A takes every item at once
        }
        # B first: the fixture cleans up through the first settings, which must not use the proxy.
        b_settings = make_settings(pools=pools, ledger=ledger, worker={"id": "b"})
        a_settings = make_settings(
            pools=pools,
            ledger=ledger,
            worker={"id": "a"},
            rabbitmq={"url": via(amqp_url, proxy.port)},
        )
        sb.hold()  # every store stays open at Session-Buddy until release()
        await publish_items(connection, a_settings, published)
        async with Service(a_settings) as a:
            await wait_until(lambda: sb.held == published and a.metrics.in_flight == published)
            async with Service(b_settings) as b:  # idle: A has every item
                # The broker requeues A's deliveries and hands them to B, the only consumer
                # until A reconnects (0.5 s later); A's stores go on.
                proxy.cut()
                if shared:
                    # A holds every claim, so B puts each item off.
                    await wait_until(lambda: counted(b.metrics, "ledger_deferred") >= published)
                else:
                    await wait_until(lambda: sb.held == 2 * published)
                sb.release()
                await wait_until(lambda: sb.stats.distinct_keys == published)
                await drained(connection, b_settings, sb)
        deferred = counted(b.metrics, "ledger_deferred")
        hits = counted(a.metrics, "ledger_duplicates") + counted(b.metrics, "ledger_duplicates")
        result = await tally(connection, b_settings, sb, published)
    print(f"deferred by B: {deferred}, acked on the ledger's word: {hits}")
    assert result.lost == 0 and result.stored == published
    assert result.dead == 0 and result.still_queued == 0
    if shared:
        assert result.duplicates == 0
    else:
        assert result.duplicates == published  # B stored each item A was storing


async def test_sigkill_claims_expire_and_waiting_never_dead_letters(
    make_settings, connection, redis_url, ledger_prefix
):
    """SIGKILL mid-store: B waits out the dead worker's claims uncounted, then stores them."""
    published = 40
    async with StandIn(StandInConfig(latency_s=0.3)) as sb:
        ledger = {"url": redis_url, "key_prefix": ledger_prefix, "claim_margin_s": 4}
        settings = make_settings(
            pools={
                "session_buddy_url": sb.url,
                "max_concurrent_memory_insertions": 5,
                "adaptive_concurrency": False,
            },
            sink={"timeout_s": 1},
            ledger=ledger,
            retry={"max_attempts": 2},
        )
        await publish_items(connection, settings, published)
        env = worker_env(
            settings,
            MAHAVISHNU_SINK__TIMEOUT_S="1",
            MAHAVISHNU_POOLS__ADAPTIVE_CONCURRENCY="false",
            MAHAVISHNU_LEDGER__URL=redis_url,
            MAHAVISHNU_LEDGER__KEY_PREFIX=ledger_prefix,
            MAHAVISHNU_LEDGER__CLAIM_MARGIN_S="4",
        )
        process = await start_worker_process(env)
        try:
            await wait_until(lambda: sb.stats.stored >= 10 and sb.stats.in_flight == 5)
        finally:
            process.send_signal(signal.SIGKILL)
            await asyncio.wait_for(process.communicate(), 30)
        # Claims live sink.timeout_s + claim_margin_s = 5 s: B starts well within that.
        async with Service(settings) as service:
            await wait_until(lambda: sb.stats.distinct_keys == published)
            await drained(connection, settings, sb)
        deferred = counted(service.metrics, "ledger_deferred")
        result = await tally(connection, settings, sb, published)
    print(
        f"deferred: {deferred}, ledger duplicates: {counted(service.metrics, 'ledger_duplicates')}"
    )
    assert process.returncode == -signal.SIGKILL
    assert deferred >= 1
    assert result.lost == 0 and result.stored == published
    assert result.dead == 0 and result.still_queued == 0
    # A store the killed worker sent but never marked may have landed: at most those repeat.
    assert result.duplicates <= settings.prefetch
