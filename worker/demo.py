"""The README's first command: a self-contained run on local defaults.

It starts a stand-in Session-Buddy on loopback (the real tool and answer texts, a little
latency and a few transient faults), publishes sample items plus a handful of broken ones to
demo queues of its own, runs the real worker until everything is settled, and reports.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections import Counter
from typing import Any

from aio_pika.abc import AbstractRobustConnection
from rich.console import Console
from rich.live import Live
from rich.table import Table

from worker.broker import BrokerUnavailable, connect, masked
from worker.cli.common import console as make_console
from worker.exitcodes import EXIT_OK, EXIT_UNAVAILABLE
from worker.headers import H_DETAIL, H_REASON
from worker.publisher import Publisher
from worker.service import Service
from worker.settings import Settings
from worker.testing import StandIn, StandInConfig, valid_item
from worker.topology import Topology


def sample_item(n: int) -> dict[str, Any]:
    """One memory item as a Mahavishnu pool produces it."""
    pool = f"pool-{n % 3}"
    return valid_item(
        f"Task {n} finished: refactored module {n % 17} and ran its tests.",
        pool_id=pool,
        pool_type="mahavishnu",
        worker_id=f"{pool}-worker-{n % 4}",
        status="completed" if n % 10 else "failed",
        timestamp=time.time(),
        duration_seconds=1.5 + n % 7,
        exit_code=0 if n % 10 else 1,
    )


def broken_messages() -> list[tuple[bytes, str | None]]:
    """Messages a worker must dead-letter at once (body, content type).

    Blank and long content are not among them: by default they are stored, as a summary and
    in parts.
    """
    item = sample_item(0)
    nan = {**item, "metadata": {**item["metadata"], "duration_seconds": float("nan")}}
    no_pool = {**item, "metadata": {k: v for k, v in item["metadata"].items() if k != "pool_id"}}
    json_type = "application/json"
    return [
        (b'{"content": "half a mess', json_type),
        (b'{"content": "\xff\xfe"}', json_type),
        (json.dumps(nan).encode(), json_type),
        (json.dumps(no_pool).encode(), json_type),
        (b"plain words", "text/plain"),
    ]


async def _broker_or_none(settings: Settings) -> AbstractRobustConnection | None:
    try:
        return await connect(settings, "demo")
    except BrokerUnavailable:
        return None


def _demo_settings(settings: Settings, sb_url: str, prefix: str) -> Settings:
    return settings.model_copy(
        update={
            "pools": settings.pools.model_copy(update={"session_buddy_url": sb_url}),
            "rabbitmq": settings.rabbitmq.model_copy(
                update={
                    "exchange": prefix,
                    "queue": f"{prefix}.items",
                    "dead_letter_queue": f"{prefix}.items.dlq",
                }
            ),
            "retry": settings.retry.model_copy(update={"tiers_s": [0.5, 1.0, 2.0], "cap_s": 2.0}),
            "worker": settings.worker.model_copy(update={"ops_port": -1}),
        }
    )


def _progress(published: int, service: Service, elapsed_s: float) -> Table:
    counts = service.metrics.counts
    stored, dead = counts["ack"], counts["dead_letter"]
    table = Table(title="memory-worker demo", show_header=False)
    table.add_row("published", str(published))
    table.add_row("stored", str(stored))
    table.add_row("dead-lettered", str(dead))
    table.add_row("retries scheduled", str(counts["retry"]))
    table.add_row("in flight", str(service.metrics.in_flight))
    table.add_row("items/s", f"{stored / elapsed_s:,.0f}" if elapsed_s > 0 else "-")
    return table


async def run_demo(settings: Settings, items: int = 500, latency_ms: float = 20.0) -> int:
    """Run the demo; returns a process exit code."""
    console = make_console()
    connection = await _broker_or_none(settings)
    if connection is None:
        url = masked(settings.rabbitmq.url.get_secret_value())
        console.print(
            f"[red]No RabbitMQ answers at {url}.[/red]\n"
            "Start one, then run the demo again:\n"
            "  Debian/Ubuntu:  apt-get install rabbitmq-server && rabbitmq-server -detached\n"
            "  Docker:         docker run -d -p 5672:5672 rabbitmq:3.13-management\n"
            "  (the test suite starts one itself through testcontainers when Docker is up)\n"
            "Or point MAHAVISHNU_RABBITMQ__URL (or --rabbitmq-url) at yours."
        )
        return EXIT_UNAVAILABLE
    prefix = f"memory-demo-{uuid.uuid4().hex[:8]}"
    config = StandInConfig(latency_s=latency_ms / 1000, latency_sigma=0.3, error_503=0.02, seed=8)
    async with connection, StandIn(config) as standin:
        demo = _demo_settings(settings, standin.url, prefix)
        topology = Topology.from_settings(demo)
        await topology.declare(connection)
        try:
            return await _run(console, connection, demo, topology, standin, items)
        finally:
            await topology.delete(connection)


async def _run(
    console: Console,
    connection: AbstractRobustConnection,
    settings: Settings,
    topology: Topology,
    standin: StandIn,
    items: int,
) -> int:
    broken = broken_messages()
    console.print(
        f"Stand-in Session-Buddy at {standin.url}; queue {topology.queue}; "
        f"concurrency {settings.concurrency}; publishing {items} items and {len(broken)} broken."
    )
    async with Publisher(connection, topology) as publisher:
        await asyncio.gather(*(publisher.publish_item(sample_item(n)) for n in range(items)))
        for body, content_type in broken:
            await publisher.publish_raw(body, content_type=content_type)
    published = items + len(broken)
    started = time.perf_counter()
    async with Service(settings) as service:
        with Live(console=console, refresh_per_second=8) as live:
            while True:
                elapsed_s = time.perf_counter() - started
                live.update(_progress(published, service, elapsed_s))
                counts = service.metrics.counts
                settled = counts["ack"] + counts["dead_letter"]
                if settled >= published or elapsed_s > 120:
                    break
                await asyncio.sleep(0.1)
        elapsed_s = time.perf_counter() - started
        insertion = service.metrics.get_insertion_metrics()
    console.line()
    await _report(console, connection, topology, standin, items, elapsed_s)
    console.print(
        f"ACT-008 metrics: {insertion['average_throughput_items_per_sec']:,.0f} items/s while "
        f"inserting, {insertion['average_latency_seconds_per_item'] * 1000:.2f} ms mean time per "
        f"item, max concurrency {insertion['max_concurrent_insertions']}."
    )
    return EXIT_OK


async def _report(
    console: Console,
    connection: AbstractRobustConnection,
    topology: Topology,
    standin: StandIn,
    items: int,
    elapsed_s: float,
) -> None:
    channel = await connection.channel()
    dlq = await channel.declare_queue(topology.dead_letter_queue, passive=True)
    reasons: Counter[str] = Counter()
    examples: dict[str, str] = {}
    while (message := await dlq.get(no_ack=True, fail=False)) is not None:
        headers = message.headers or {}
        reason = str(headers.get(H_REASON, "?"))
        reasons[reason] += 1
        examples.setdefault(reason, str(headers.get(H_DETAIL, ""))[:90])
    await channel.close()
    stats = standin.stats
    table = Table(title="What happened")
    table.add_column("outcome")
    table.add_column("count", justify="right")
    table.add_column("example reason")
    table.add_row("stored in Session-Buddy", str(stats.distinct_keys), "")
    for reason, count in sorted(reasons.items()):
        table.add_row(f"dead-lettered: {reason}", str(count), examples[reason])
    console.print(table)
    faults = sum(stats.faults.values())
    console.print(
        f"{stats.distinct_keys}/{items} valid items stored in {elapsed_s:.2f} s, retries included "
        f"({stats.distinct_keys / elapsed_s:,.0f} items/s); {faults} transient faults retried; "
        f"{stats.duplicates} duplicates; {sum(reasons.values())} dead letters with reasons."
    )
