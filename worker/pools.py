"""ACT-008's `collect_and_sync(pool_manager)`, through the queue: collect from every pool, publish.

Works with Mahavishnu's `PoolManager` as it is: `await list_pools()` gives dicts with a
`pool_id`, the pools live in `_pools`, and `collect_memory()` may be async or not. A pool's
`collect_memory()` usually hands its results over only once, so every item that was collected
but not confirmed is returned in the report for the caller to keep or retry.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import structlog

from worker.publisher import MAX_OUTSTANDING, Publisher, open_publisher
from worker.settings import Settings, load_settings

log = structlog.get_logger("worker.pools")
COLLECT_TIMEOUT_S = 60.0

Items = Sequence[Mapping[str, Any]]


class MemoryPool(Protocol):
    """A Mahavishnu pool: anything with `collect_memory()`, async or not."""

    def collect_memory(self) -> Awaitable[Items] | Items:
        """Hand over the memory items gathered since the last call."""
        ...


class PoolManager(Protocol):
    """The two things of Mahavishnu's `PoolManager` that ACT-008's sync used."""

    @property
    def _pools(self) -> Mapping[str, MemoryPool]: ...

    async def list_pools(self) -> Sequence[Mapping[str, Any]]:
        """One dict per pool, each with a `pool_id`."""
        ...


@dataclass(frozen=True, slots=True)
class PoolFailure:
    """A pool whose items could not be collected."""

    pool_id: str
    error: str


@dataclass(frozen=True, slots=True)
class ItemFailure:
    """A collected item that the broker did not confirm, with the item itself."""

    pool_id: str
    item: Mapping[str, Any]
    error: str


@dataclass(frozen=True, slots=True)
class SyncReport:
    """Counts of one sync, plus what failed and why."""

    pools: int
    collected: int
    published: int
    pool_failures: tuple[PoolFailure, ...] = ()
    item_failures: tuple[ItemFailure, ...] = ()
    timestamp: float = field(default_factory=time.time)

    @property
    def failed(self) -> int:
        """Collected items the broker did not confirm (invalid or unconfirmed)."""
        return len(self.item_failures)

    def as_dict(self) -> dict[str, Any]:
        """The counts as a dict, with ACT-008's keys alongside."""
        return {
            "pools": self.pools,
            "collected": self.collected,
            "published": self.published,
            "failed": self.failed,
            "failed_pools": len(self.pool_failures),
            "pools_synced": self.pools,
            "memory_items_synced": self.published,
            "timestamp": self.timestamp,
        }


async def collect_and_publish(
    pool_manager: PoolManager,
    publisher: Publisher,
    *,
    collect_timeout_s: float = COLLECT_TIMEOUT_S,
    max_outstanding: int = MAX_OUTSTANDING,
) -> SyncReport:
    """Collect from every pool concurrently, publish every item, report the counts."""
    infos = await pool_manager.list_pools()
    pool_ids = [str(info["pool_id"]) for info in infos]
    collected = await asyncio.gather(
        *(_collect(pool_manager, pool_id, collect_timeout_s) for pool_id in pool_ids)
    )
    pool_failures = tuple(c for c in collected if isinstance(c, PoolFailure))
    owned = [
        (pool_id, item)
        for pool_id, items in zip(pool_ids, collected, strict=True)
        if not isinstance(items, PoolFailure)
        for item in items
    ]
    batch = await publisher.publish_many(
        (item for _, item in owned), max_outstanding=max_outstanding
    )
    item_failures = tuple(
        ItemFailure(owned[r.index][0], owned[r.index][1], str(r.error)) for r in batch.failures
    )
    report = SyncReport(len(pool_ids), len(owned), batch.published, pool_failures, item_failures)
    log.info(
        "pools_synced",
        pools=report.pools,
        collected=report.collected,
        published=report.published,
        failed=report.failed,
        failed_pools=len(pool_failures),
    )
    return report


async def collect_and_sync(
    pool_manager: PoolManager, settings: Settings | None = None
) -> SyncReport:
    """ACT-008's one call: connect, collect from every pool, publish, disconnect.

    It connects before it collects, so with the broker down no pool hands its items over.
    """
    settings = settings or load_settings()
    async with open_publisher(settings, purpose="pools") as publisher:
        return await collect_and_publish(pool_manager, publisher)


async def _collect(
    pool_manager: PoolManager, pool_id: str, timeout_s: float
) -> list[Mapping[str, Any]] | PoolFailure:
    """One pool's items, or why there are none; a failing pool never stops the others."""
    pool = pool_manager._pools.get(pool_id)
    if pool is None:
        return _failed(pool_id, "not found in the pool manager")
    try:
        async with asyncio.timeout(timeout_s):
            result = pool.collect_memory()
            items = await result if inspect.isawaitable(result) else result
    except TimeoutError:
        return _failed(pool_id, f"collect_memory() took longer than {timeout_s:g} s")
    except Exception as exc:
        return _failed(pool_id, f"collect_memory() raised {exc!r}")
    if isinstance(items, str | bytes) or not isinstance(items, Sequence):
        return _failed(pool_id, f"collect_memory() returned {type(items).__name__}, not a list")
    return list(items)


def _failed(pool_id: str, error: str) -> PoolFailure:
    log.warning("pool_collect_failed", pool_id=pool_id, error=error)
    return PoolFailure(pool_id, error)
