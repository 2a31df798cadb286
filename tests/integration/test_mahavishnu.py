"""Mahavishnu 0.36.0's real item shapes through publish -> worker -> the Session-Buddy stand-in."""

from __future__ import annotations

import json
from typing import Any

import aio_pika
import aiormq
import pytest

from tests.fixtures.mahavishnu_0_36 import (
    MahavishnuPool,
    OutboxDrainer,
    PoolManager,
    Row,
    RunPodPool,
    WorkerResult,
    mahavishnu_item,
    reflection_row,
)
from tests.integration.helpers import depth, headers, take_all, wait_until
from worker.headers import H_OUTBOX_ERROR
from worker.mahavishnu import make_outbox_sink, sync_every
from worker.pools import collect_and_publish
from worker.publisher import open_publisher
from worker.service import Service
from worker.settings import Settings
from worker.summary import SUMMARY_TAG
from worker.testing import StandIn
from worker.topology import Topology

pytestmark = pytest.mark.integration


def workers() -> list[WorkerResult]:
    """Three shell workers as 0.36.0 reports them: no output, int and float durations."""
    return [
        WorkerResult("w-1", duration_seconds=0),
        WorkerResult("w-2", duration_seconds=1.75),
        WorkerResult(
            "w-3", status="failed", exit_code=1, error="exit status 1", duration_seconds=3
        ),
    ]


async def declared(settings: Settings, connection: Any) -> Settings:
    """The settings, after declaring their topology."""
    await Topology.from_settings(settings).declare(connection)
    return settings


async def test_blank_content_items_are_stored_as_summaries(make_settings, connection):
    """MahavishnuPool's items (content "") are stored as tagged texts from their metadata."""
    async with StandIn() as sb:
        settings = await declared(make_settings(pools={"session_buddy_url": sb.url}), connection)
        manager = PoolManager(MahavishnuPool("pool-m", workers()))
        async with open_publisher(settings) as publisher:
            report = await collect_and_publish(manager, publisher)
        assert (report.collected, report.published) == (3, 3)
        async with Service(settings) as service:
            await wait_until(lambda: service.metrics.counts["ack"] == 3)
    rows = sorted(sb.items, key=lambda r: str(r["content"]))
    assert [r["content"].split(" finished")[0] for r in rows] == [
        f"Worker w-{n} of mahavishnu pool pool-m" for n in (1, 2, 3)
    ]
    assert all(SUMMARY_TAG in r["tags"] for r in rows)
    assert "exit code 1" in rows[2]["content"] and "Error: exit status 1" in rows[2]["content"]
    assert await depth(connection, settings.rabbitmq.dead_letter_queue) == 0


async def test_three_syncs_store_each_worker_once(make_settings, connection):
    """Three syncs of the same workers (9 messages) store each worker once; a new status again.

    Each sync is consumed before the next is published, as with Mahavishnu's 60 s interval:
    without the shared ledger, two copies of one key in flight at once would both be stored.
    """
    async with StandIn() as sb:
        settings = await declared(make_settings(pools={"session_buddy_url": sb.url}), connection)
        pool = MahavishnuPool("pool-m", workers())
        manager = PoolManager(pool)
        async with Service(settings) as service, open_publisher(settings) as publisher:
            for n in range(1, 4):
                (report,) = await sync_every(manager, publisher, 0.0, rounds=1)
                assert report.published == 3
                await wait_until(lambda n=n: service.metrics.counts["ack"] == 3 * n)
            assert service.metrics.counts["outcome:duplicate"] == 6
            assert sb.stats.stored == 3
            pool.results["w-1"] = WorkerResult("w-1", status="failed", exit_code=1)
            await collect_and_publish(manager, publisher)
            await wait_until(lambda: service.metrics.counts["ack"] == 12)
    assert sb.stats.stored == 4 and sb.stats.duplicates == 0


async def test_three_syncs_by_three_workers_store_once_with_the_shared_ledger(
    make_settings, connection, redis_url, ledger_prefix
):
    """Each sync consumed by a fresh worker (empty recent-keys cache): the ledger stores once.

    A fourth sync, after one worker's status changed, stores that worker again.
    """
    async with StandIn() as sb:
        settings = await declared(
            make_settings(
                pools={"session_buddy_url": sb.url},
                ledger={"url": redis_url, "key_prefix": ledger_prefix},
            ),
            connection,
        )
        pool = MahavishnuPool("pool-m", workers())
        manager = PoolManager(pool)
        duplicates = []
        for n in range(4):
            if n == 3:
                pool.results["w-1"] = WorkerResult("w-1", status="failed", exit_code=1)
            async with Service(settings) as service, open_publisher(settings) as publisher:
                await collect_and_publish(manager, publisher)
                await wait_until(lambda: service.metrics.counts["ack"] == 3)
                duplicates.append(service.metrics.counts["outcome:duplicate"])
            if n == 2:
                assert sb.stats.stored == 3
    assert duplicates == [0, 3, 3, 2]
    assert sb.stats.stored == 4 and sb.stats.duplicates == 0


async def test_long_runpod_output_is_stored_in_parts(make_settings, connection):
    """A 30,000-character RunPod output is stored as three linked parts, nothing dead-lettered."""
    async with StandIn() as sb:
        settings = await declared(make_settings(pools={"session_buddy_url": sb.url}), connection)
        pool = RunPodPool("pool-gpu")
        output = "".join(f"line {n:05d} " for n in range(3_000))[:30_000]
        pool.finish("runpod-w-1", output)
        pool.finish("runpod-w-2", "")
        async with open_publisher(settings) as publisher:
            report = await collect_and_publish(PoolManager(pool), publisher)
        assert report.published == 2
        async with Service(settings) as service:
            await wait_until(lambda: service.metrics.counts["ack"] == 2)
    parts = sorted((r for r in sb.items if "of:" in str(r["tags"])), key=lambda r: r["tags"])
    assert [len(r["content"]) for r in parts] == [10_000, 10_000, 10_000]
    assert "".join(r["content"] for r in parts) == output
    assert [[t for t in r["tags"] if t.startswith("part:")] for r in parts] == [
        ["part:1/3"],
        ["part:2/3"],
        ["part:3/3"],
    ]
    assert sb.stats.truncated == 0
    (summary,) = [r for r in sb.items if SUMMARY_TAG in r["tags"]]
    assert summary["content"].startswith("Worker runpod-w-2 of runpod pool pool-gpu")


async def test_outbox_rows_are_stored_and_a_bad_row_blocks_nothing(make_settings, connection):
    """The drainer drains every row: reflections stored, a malformed one dead-lettered, once."""
    async with StandIn() as sb:
        settings = await declared(make_settings(pools={"session_buddy_url": sb.url}), connection)
        async with open_publisher(settings) as publisher:
            sink = make_outbox_sink(publisher)
            drainer = OutboxDrainer(
                sink,
                [
                    Row(1, "reflection:a", reflection_row("learned a", ("team:x",))),
                    Row(2, "reflection:bad", reflection_row(None)),
                    Row(3, "code_graph:c", {"nodes": []}),
                    Row(4, "reflection:d", reflection_row("learned d")),
                ],
            )
            assert await drainer.drain_once() == (4, 0)
            async with Service(settings) as service:
                counts = service.metrics.counts
                await wait_until(lambda: counts["ack"] + counts["dead_letter"] == 3)
                # The drainer sends a row again (a crash before mark_drained): the same key.
                drainer.rows.append(Row(5, "reflection:a", reflection_row("learned a")))
                assert await drainer.drain_once() == (1, 0)
                await wait_until(lambda: counts["outcome:duplicate"] == 1)
        assert (sink.published, sink.dead_lettered, sink.skipped) == (3, 1, 1)
    assert sorted(str(r["content"]) for r in sb.items) == ["learned a", "learned d"]
    assert "team:x" in next(r for r in sb.items if r["content"] == "learned a")["tags"]
    (dead,) = await take_all(connection, settings.rabbitmq.dead_letter_queue)
    assert dead.message_id == "reflection:bad"
    assert "text must be a non-blank string" in headers(dead)[H_OUTBOX_ERROR]
    assert json.loads(dead.body) == {"key": "reflection:bad", "payload": {"text": None, "tags": []}}


async def test_oneiric_style_publisher_declares_passively_and_is_stored_once(
    make_settings, connection
):
    """oneiric 0.33.3's RabbitMQ adapter, call for call (aio-pika defaults, as it uses them).

    Its argument-less declare is refused by the quorum queue; `passive: true` passes. aio-pika
    gives each of its messages a random message id, so three syncs are three keys unless the
    worker keys by fields (`worker.key_source: fields`): then they are stored once. A wrong
    routing key is returned by the broker, and its publish still returns normally.
    """
    async with StandIn() as sb:
        sections = {"pools": {"session_buddy_url": sb.url}, "worker": {"key_source": "fields"}}
        settings = await declared(make_settings(**sections), connection)
        queue = settings.rabbitmq.queue
        refused = await connection.channel()
        with pytest.raises(aiormq.exceptions.ChannelPreconditionFailed):
            await refused.declare_queue(queue, durable=True, passive=False)
        channel = await connection.channel()  # publisher_confirms=True, on_return_raises=False
        await channel.declare_queue(queue, durable=True, passive=True)
        result = WorkerResult("w-1", duration_seconds=1.5)
        for _ in range(3):
            body = json.dumps(mahavishnu_item("pool-o", result)).encode()
            await channel.default_exchange.publish(aio_pika.Message(body, headers={}), queue)
        lost = aio_pika.Message(body, headers={})
        await channel.default_exchange.publish(lost, f"{queue}.typo")  # returned, no error
        ids = {m.message_id for m in await take_all(connection, queue)}
        assert len(ids) == 3 and None not in ids  # random, one per publish
        for _ in range(3):
            body = json.dumps(mahavishnu_item("pool-o", result)).encode()
            await channel.default_exchange.publish(aio_pika.Message(body, headers={}), queue)
        async with Service(settings) as service:
            await wait_until(lambda: service.metrics.counts["ack"] == 3)
            assert service.metrics.counts["outcome:duplicate"] == 2
    assert sb.stats.stored == 1
    assert sb.items[0]["content"].startswith("Worker w-1 of mahavishnu pool pool-o")
