"""Confirmed publishing for code that is not async: a `Publisher` on a loop in a thread."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine, Iterable
from contextlib import AsyncExitStack
from types import TracebackType
from typing import Any, Self, TypeVar

from worker.confirms import BatchResult
from worker.publisher import MAX_OUTSTANDING, ItemLike, Publisher, open_publisher
from worker.settings import Settings

T = TypeVar("T")


class BlockingPublisher:
    """A `Publisher` for code that is not async: its own event loop runs in a background thread."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stack = AsyncExitStack()
        self._publisher: Publisher | None = None

    def __enter__(self) -> Self:
        loop = asyncio.new_event_loop()
        self._loop = loop
        self._thread = threading.Thread(
            target=loop.run_forever, name="memory-worker-publisher", daemon=True
        )
        self._thread.start()
        try:
            opened = self._stack.enter_async_context(open_publisher(self._settings))
            self._publisher = self._call(opened)
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def publish_item(self, item: ItemLike) -> str:
        """Validate and publish one item; returns its message id once confirmed."""
        if self._publisher is None:
            raise RuntimeError("not open: use `with BlockingPublisher(...)`")
        return self._call(self._publisher.publish_item(item))

    def publish_many(
        self, items: Iterable[ItemLike], *, max_outstanding: int = MAX_OUTSTANDING
    ) -> BatchResult:
        """Publish every item with at most `max_outstanding` confirms pending."""
        if self._publisher is None:
            raise RuntimeError("not open: use `with BlockingPublisher(...)`")
        batch: BatchResult = self._call(
            self._publisher.publish_many(items, max_outstanding=max_outstanding)
        )
        return batch

    def close(self) -> None:
        """Close the channel and connection, then stop the loop thread."""
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        try:
            self._call(self._stack.aclose())
        finally:
            loop.call_soon_threadsafe(loop.stop)
            thread.join()
            loop.close()
            self._loop = self._thread = self._publisher = None

    def _call(self, coro: Coroutine[Any, Any, T]) -> T:
        assert self._loop is not None
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()


def publish_items_sync(items: Iterable[ItemLike], settings: Settings) -> BatchResult:
    """Publish items from code that is not async; returns per-item results."""
    with BlockingPublisher(settings) as publisher:
        return publisher.publish_many(items)
