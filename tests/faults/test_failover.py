"""Failover between broker addresses: `rabbitmq.url` lists two private nodes, and one goes down.

The two nodes are not clustered: each holds its own queues, and what is published to one is
that node's. So the worker's tests publish to both and add up, in the ledger, what each node
still holds; the publisher's test looks for every confirmed message on either node. The
shared broker is never touched. Every test prints its ledger.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator, Iterator
from typing import Any

import aio_pika
import httpx
import pytest
from structlog.testing import capture_logs

from tests.faults.broker_node import BrokerNode, BrokerNodeError, find_install, selected_version
from tests.faults.ledger import Ledger, drained, via
from tests.integration.helpers import depth, item, publish_items, take_all, wait_until
from worker.broker import shown
from worker.headers import H_REASON
from worker.publisher import PublishResult, open_publisher
from worker.service import Service
from worker.settings import Settings
from worker.testing import StandIn, StandInConfig, StoreCall, free_port
from worker.topology import Topology

pytestmark = [pytest.mark.integration, pytest.mark.faults]


@pytest.fixture(scope="module")
def nodes() -> Iterator[tuple[BrokerNode, BrokerNode]]:
    """Two private RabbitMQ nodes for this module, not clustered; stopped at the end."""
    try:
        install = find_install()  # the installed RabbitMQ, or 4.3 when asked for
    except BrokerNodeError as exc:
        message = f"{exc}: these tests start private nodes"
        if os.environ.get("CI") or selected_version():
            pytest.fail(message)
        pytest.skip(message)
    with BrokerNode(install=install) as first, BrokerNode(install=install) as second:
        yield first, second


@pytest.fixture(scope="module")
def amqp_url(nodes: tuple[BrokerNode, BrokerNode]) -> str:
    """`make_settings` and its teardown use the first node (the second is removed whole)."""
    return nodes[0].amqp_url


@contextlib.asynccontextmanager
async def on(node: BrokerNode) -> AsyncIterator[aio_pika.abc.AbstractRobustConnection]:
    """A connection of the test's own to one node."""
    connection = await aio_pika.connect_robust(node.amqp_url)
    async with connection:
        yield connection


def settings_for(make_settings: Any, sb: StandIn, *urls: str, **worker: Any) -> Settings:
    """Settings listing `urls`, each reconnecting every 0.5 s; 5 inserts at once."""
    pools = {"session_buddy_url": sb.url, "max_concurrent_memory_insertions": 5}
    url = ",".join(via(u) for u in urls)
    return make_settings(rabbitmq={"url": url}, pools=pools, worker=worker)


async def tally_nodes(
    nodes: tuple[BrokerNode, ...], settings: Settings, sb: StandIn, published: int
) -> Ledger:
    """The ledger over several nodes: the stand-in's rows, and what each node still holds."""
    topology = Topology.from_settings(settings)
    dead: dict[str, int] = {}
    queued = 0
    for node in nodes:
        async with on(node) as connection:
            for letter in await take_all(connection, topology.dead_letter_queue):
                reason = str((letter.headers or {}).get(H_REASON, "broker"))
                dead[reason] = dead.get(reason, 0) + 1
            for queue in (topology.queue, *(tier.queue for tier in topology.tiers)):
                queued += await depth(connection, queue)
    stats = sb.stats
    ledger = Ledger(published, stats.distinct_keys, stats.duplicates, dead, queued)
    print(ledger)
    return ledger


async def message_ids(node: BrokerNode, topology: Topology) -> set[str]:
    """The message ids in a node's work queue, which is emptied."""
    async with on(node) as connection:
        messages = await take_all(connection, topology.queue)
    ids = {str(m.message_id) for m in messages}
    print(f"node :{node.port} holds {len(messages)} messages, {len(ids)} distinct")
    return ids


def failovers(logs: list[dict[str, Any]]) -> list[tuple[str, str]]:
    """(previous, url) of every `broker_failover` line."""
    return [(e["previous"], e["url"]) for e in logs if e["event"] == "broker_failover"]


async def test_worker_starts_on_the_second_address_when_the_first_is_down(nodes, make_settings):
    """First address refuses: the worker starts on the second with one failover line; /readyz
    names that node, and every item published there is stored."""
    _, second = nodes
    dead = f"amqp://guest:guest@127.0.0.1:{free_port()}/"
    published = 100
    async with StandIn(StandInConfig(latency_s=0.01)) as sb:
        settings = settings_for(make_settings, sb, dead, second.amqp_url, ops_port=0)
        async with on(second) as connection:
            await publish_items(connection, settings, published)
        with capture_logs() as logs:
            async with Service(settings) as service:
                await wait_until(lambda: sb.stats.distinct_keys == published, 60)
                async with on(second) as connection:
                    await drained(connection, settings, sb)
                async with httpx.AsyncClient() as http:
                    readyz = await http.get(f"http://127.0.0.1:{service.ops_port}/readyz")
        ledger = await tally_nodes((second,), settings, sb, published)
    print("failovers:", failovers(logs), "readyz:", readyz.json())
    assert failovers(logs) == [(shown(dead), shown(second.amqp_url))]
    assert readyz.status_code == 200
    assert readyz.json() == {"ready": True, "broker": shown(second.amqp_url), "broker_failovers": 1}
    assert "guest:guest" not in repr(logs)
    assert ledger.lost == 0 and ledger.stored == published
    assert ledger.dead == 0 and ledger.still_queued == 0 and ledger.duplicates == 0


async def test_a_node_stopped_mid_run_fails_over_to_the_other_and_back(nodes, make_settings):
    """Stop the worker's node mid-run: it consumes on the other; when that one stops too (the
    first back), it returns. Each failover is one line; nothing is lost on either node."""
    first, second = nodes
    per_node = 300
    on_first, on_second = set(range(per_node)), set(range(per_node, 2 * per_node))
    stored: set[int] = set()

    async def record(call: StoreCall) -> None:
        number = call.content.rsplit(" ", 1)[-1]  # "memory item <n>"
        if number.isdigit():
            stored.add(int(number))

    async with StandIn(StandInConfig(latency_s=0.05), on_store=record) as sb:
        settings = settings_for(make_settings, sb, first.amqp_url, second.amqp_url)
        async with on(first) as connection:
            await publish_items(connection, settings, per_node)
        async with on(second) as connection:
            await publish_items(connection, settings, per_node, start=per_node)
        with capture_logs() as logs:
            async with Service(settings) as service:
                try:
                    await wait_until(lambda: len(stored & on_first) >= 30, 60)
                    await first.stop_app()
                    # The second node's items are stored only by a worker consuming there.
                    await wait_until(lambda: len(stored & on_second) >= 30, 60)
                    ready_on_second = service.ready
                    sb.config.latency_s = 0.0
                    await wait_until(lambda: on_second <= stored, 60)
                    await first.start_app()
                    await second.stop_app()
                    await wait_until(lambda: on_first <= stored, 60)
                finally:
                    await first.ensure_running()
                    await second.ensure_running()
                async with on(first) as connection:
                    await drained(connection, settings, sb)
                ready = service.ready
        ledger = await tally_nodes(nodes, settings, sb, 2 * per_node)
    a, b = shown(first.amqp_url), shown(second.amqp_url)
    print("failovers:", failovers(logs))
    assert failovers(logs) == [(a, b), (b, a)]
    assert ready_on_second and ready
    assert ledger.lost == 0 and ledger.stored == 2 * per_node
    assert ledger.dead == 0 and ledger.still_queued == 0
    # Only what was unacked when a node stopped can come back twice: the prefetch, each time.
    assert ledger.duplicates <= 2 * settings.prefetch


async def test_publisher_keeps_confirms_across_a_failover(nodes, make_settings):
    """The publisher's node stops mid-batch: every item is confirmed, on one node or the other,
    and each item reported confirmed is held by a node; none is reported sent unconfirmed."""
    first, second = nodes
    settings = make_settings(rabbitmq={"url": f"{via(first.amqp_url)},{via(second.amqp_url)}"})
    topology = Topology.from_settings(settings)
    for node in nodes:
        async with on(node) as connection:
            await topology.declare(connection)
    confirmed: set[str] = set()
    stopping: asyncio.Task[None] | None = None

    def on_result(result: PublishResult) -> None:
        if result.ok and result.message_id is not None:
            confirmed.add(result.message_id)

    async def items() -> AsyncIterator[dict[str, Any]]:
        # At full speed until the node has stopped, so confirms are pending when it goes.
        nonlocal stopping
        n = 0
        while n < 500 or stopping is None or not stopping.done():
            if n == 500:
                stopping = asyncio.create_task(first.stop_app())
            yield item(n)
            await asyncio.sleep(0)
            n += 1
        for tail in range(n, n + 500):  # and some more on the other node
            yield item(tail)

    sends = 0
    try:
        with capture_logs() as logs:
            async with open_publisher(settings) as publisher:
                confirmed_send = publisher._confirmed

                async def counted(*args: Any) -> None:
                    nonlocal sends
                    sends += 1
                    await confirmed_send(*args)

                publisher._confirmed = counted  # type: ignore[method-assign]
                batch = await publisher.publish_many(
                    items(), max_outstanding=100, on_result=on_result
                )
        assert stopping is not None
        await stopping
    finally:
        await first.ensure_running()
    held = {
        "first": await message_ids(first, topology),
        "second": await message_ids(second, topology),
    }
    published = len(batch.results)
    both = len(held["first"] & held["second"])
    print(f"published {published} in {sends} sends, confirmed {batch.published}, on both: {both}")
    print("failovers:", failovers(logs))
    assert batch.published == published and batch.failures == []
    assert sends > published  # publishes the lost node had not confirmed were sent again
    assert confirmed <= held["first"] | held["second"]
    assert held["first"] and held["second"]  # the batch really moved to the other node
    assert failovers(logs) == [(shown(first.amqp_url), shown(second.amqp_url))]
