"""The pool-manager adapter publishing through a real RabbitMQ."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

from tests.integration.helpers import depth, item, take_all
from worker.pools import collect_and_publish, collect_and_sync
from worker.publisher import Publisher
from worker.topology import Topology

pytestmark = pytest.mark.integration


class AsyncPool:
    """A pool whose collect_memory() is a coroutine, like Mahavishnu's pools."""

    def __init__(self, items: list[Any], delay_s: float = 0.0) -> None:
        self.items = items
        self.delay_s = delay_s

    async def collect_memory(self) -> list[Any]:
        """Hand over the items once."""
        await asyncio.sleep(self.delay_s)
        items, self.items = self.items, []
        return items


class SyncPool:
    """A pool whose collect_memory() is a plain method."""

    def __init__(self, items: list[Any]) -> None:
        self.items = items

    def collect_memory(self) -> list[Any]:
        """Hand over the items."""
        return self.items


class BrokenPool:
    """A pool whose collect_memory() raises."""

    async def collect_memory(self) -> list[Any]:
        """Fail."""
        raise RuntimeError("worker crashed")


class PoolManager:
    """An in-memory stand-in for Mahavishnu's PoolManager: `_pools` and `list_pools()`."""

    def __init__(self, pools: dict[str, Any], listed: list[str] | None = None) -> None:
        self._pools = pools
        self._listed = listed if listed is not None else list(pools)

    async def list_pools(self) -> list[dict[str, Any]]:
        """One dict per pool, as Mahavishnu returns them."""
        return [{"pool_id": p, "pool_type": "mahavishnu"} for p in self._listed]


async def test_every_pool_is_collected_and_published(make_settings, connection):
    """Items of async and sync pools are all published; the counts add up."""
    settings = make_settings()
    topology = Topology.from_settings(settings)
    await topology.declare(connection)
    manager = PoolManager(
        {
            "pool-a": AsyncPool([item(n, "pool-a") for n in range(30)], delay_s=0.05),
            "pool-b": SyncPool([item(n, "pool-b") for n in range(20)]),
            "pool-c": AsyncPool([]),
        }
    )
    async with Publisher(connection, topology) as publisher:
        report = await collect_and_publish(manager, publisher)
    assert (report.pools, report.collected, report.published, report.failed) == (3, 50, 50, 0)
    assert report.as_dict()["memory_items_synced"] == 50
    bodies = [json.loads(m.body) for m in await take_all(connection, topology.queue)]
    assert sorted(b["metadata"]["pool_id"] for b in bodies) == ["pool-a"] * 30 + ["pool-b"] * 20


async def test_failing_pools_are_reported_and_the_others_published(make_settings, connection):
    """A raising, hanging, missing or odd pool is reported; the healthy pool still publishes."""
    settings = make_settings()
    topology = Topology.from_settings(settings)
    await topology.declare(connection)
    manager = PoolManager(
        {
            "good": SyncPool([item(1, "good"), item(2, "good")]),
            "broken": BrokenPool(),
            "slow": AsyncPool([item(3, "slow")], delay_s=30),
            "odd": SyncPool("not a list"),  # type: ignore[arg-type]
        },
        listed=["good", "broken", "slow", "odd", "gone"],
    )
    async with Publisher(connection, topology) as publisher:
        report = await collect_and_publish(manager, publisher, collect_timeout_s=0.5)
    assert (report.pools, report.collected, report.published) == (5, 2, 2)
    errors = {f.pool_id: f.error for f in report.pool_failures}
    assert "worker crashed" in errors["broken"] and "0.5 s" in errors["slow"]
    assert "not found" in errors["gone"] and "str" in errors["odd"]
    assert await depth(connection, topology.queue) == 2


async def test_invalid_items_come_back_with_their_pool(make_settings, connection):
    """Items the worker would reject are not sent; the report hands them back with the reason."""
    settings = make_settings()
    topology = Topology.from_settings(settings)
    await topology.declare(connection)
    bad = {"content": "no metadata"}
    manager = PoolManager({"p1": SyncPool([item(1, "p1"), bad]), "p2": SyncPool(["text"])})
    async with Publisher(connection, topology) as publisher:
        report = await collect_and_publish(manager, publisher)
    assert (report.collected, report.published, report.failed) == (3, 1, 2)
    failures = {(f.pool_id, str(f.item)): f.error for f in report.item_failures}
    assert "metadata" in failures[("p1", str(bad))]
    assert "object" in failures[("p2", "text")]
    assert await depth(connection, topology.queue) == 1


async def test_collect_and_sync_is_one_call(make_settings, connection):
    """collect_and_sync(pool_manager, settings) connects, publishes and disconnects by itself."""
    settings = make_settings()
    await Topology.from_settings(settings).declare(connection)
    manager = PoolManager({"pool-a": AsyncPool([item(n, "pool-a") for n in range(5)])})
    report = await collect_and_sync(manager, settings)
    assert (report.pools, report.collected, report.published, report.failed) == (1, 5, 5, 0)
    assert await depth(connection, settings.rabbitmq.queue) == 5
