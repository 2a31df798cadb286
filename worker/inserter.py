"""`MemoryInserter`: ACT-008's in-process API, a batch stored through the worker's pipeline.

No broker: each item goes straight to the sink through the same `Pipeline` the worker uses
(timeout, classification, metrics), at most `max_concurrent_memory_insertions` at once.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Mapping
from contextlib import AsyncExitStack
from types import TracebackType
from typing import Any, Self

from worker.keys import item_key
from worker.mcp import make_sink
from worker.metrics import Metrics
from worker.models import MemoryItem, item_from_dict
from worker.outcome import Outcome
from worker.pipeline import Pipeline
from worker.settings import Settings, load_settings
from worker.sink import Sink
from worker.strict_json import DecodeError
from worker.transport import make_client


class MemoryInserter:
    """ACT-008's in-process use: insert a batch in parallel, one outcome per item."""

    def __init__(self, settings: Settings | None = None, sink: Sink | None = None) -> None:
        """Without `settings`, load them as the worker does: `load_settings()`."""
        self.settings = settings or load_settings()
        self.metrics = Metrics(self.settings.concurrency)
        self._sink = sink
        self._stack = AsyncExitStack()
        self._pipeline: Pipeline | None = None

    async def __aenter__(self) -> Self:
        sink = self._sink
        if sink is None:
            client = await self._stack.enter_async_context(make_client(self.settings))
            owned = make_sink(self.settings, client)
            await self._stack.enter_async_context(owned)
            sink = owned
        self._pipeline = Pipeline(sink, self.settings, self.metrics)
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self._stack.aclose()

    async def insert_batch(self, items: Iterable[MemoryItem | Mapping[str, Any]]) -> list[Outcome]:
        """Store every item, at most `max_concurrent_memory_insertions` at once, in order."""
        if self._pipeline is None:
            raise RuntimeError("not open: use `async with MemoryInserter(...)`")
        pipeline = self._pipeline
        slots = asyncio.Semaphore(self.settings.concurrency)

        async def insert(raw: MemoryItem | Mapping[str, Any]) -> Outcome:
            async with slots:
                try:
                    item = raw if isinstance(raw, MemoryItem) else item_from_dict(raw)
                except DecodeError as exc:
                    return Outcome.invalid(exc.reason, exc.detail)
                key = item_key(item, self.settings.worker.key_fields)
                return await pipeline.store_item(item, key)

        return list(await asyncio.gather(*(insert(i) for i in items)))

    def get_insertion_metrics(self) -> dict[str, Any]:
        """ACT-008's metrics dict."""
        return self.metrics.get_insertion_metrics()

    def reset_metrics(self) -> None:
        """Zero ACT-008's counters."""
        self.metrics.reset_metrics()
