"""Runs through the library API (`MemoryInserter`) in the runner's own process, no broker."""

from __future__ import annotations

import statistics
import time

import orjson

from loadtest.broker import item_body
from loadtest.common import BenchError
from loadtest.context import Bench
from worker.inserter import MemoryInserter
from worker.models import MemoryItem, item_from_dict
from worker.outcome import Kind
from worker.settings import Settings

_seq = 0


def fresh_items(n: int) -> list[MemoryItem]:
    """`n` valid items, unique across the whole benchmark."""
    global _seq
    start, _seq = _seq, _seq + n
    return [item_from_dict(orjson.loads(item_body("inproc", s))) for s in range(start, start + n)]


async def inprocess_s(url: str, concurrency: int, items: list[MemoryItem], mode: str) -> float:
    """Seconds to store `items` through `MemoryInserter` (stream) or ACT-008's batch-and-wait."""
    settings = Settings(
        pools={"max_concurrent_memory_insertions": concurrency, "session_buddy_url": url}
    )
    async with MemoryInserter(settings) as inserter:
        await inserter.insert_batch(fresh_items(1))  # opens the MCP session
        t0 = time.perf_counter()
        if mode == "batch_and_wait":
            outcomes = []
            for i in range(0, len(items), concurrency):
                outcomes += await inserter.insert_batch(items[i : i + concurrency])
        else:
            outcomes = await inserter.insert_batch(items)
        elapsed = time.perf_counter() - t0
    if any(o.kind is not Kind.STORED for o in outcomes):
        raise BenchError(
            f"in-process insert failed: {[o for o in outcomes if o.kind is not Kind.STORED][:3]}"
        )
    return elapsed


async def inprocess_median_s(
    bench: Bench, concurrency: int, size: int, mode: str, reps: int
) -> float:
    """Median over `reps` of `inprocess_s` on fresh items."""
    times = [
        await inprocess_s(bench.standin.url, concurrency, fresh_items(size), mode)
        for _ in range(reps)
    ]
    return statistics.median(times)
