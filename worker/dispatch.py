"""The dispatcher: at most the current limit of deliveries handled at once, FIFO, drained."""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable, Coroutine
from typing import Any

import structlog

from worker.pipeline import Delivery, Pipeline, Verdict

log = structlog.get_logger("worker.dispatch")


class Dispatcher:
    """Runs `Pipeline.handle` for each delivery, never more than the current limit at once.

    A delivery gets its task only once a slot is free (the slot before the task, as in arq);
    until then it waits in line, first come first served. It gives the slot back when its
    store ends, so the sink does not wait for its ack and log line. Every task is kept in a
    set and reaped, so none is lost, and `drain` finishes or requeues each one within a grace
    period.
    """

    def __init__(self, pipeline: Pipeline, limit: int) -> None:
        self._pipeline = pipeline
        self.limit = limit
        self._running = 0
        self._waiting: deque[Delivery] = deque()
        self._tasks: set[asyncio.Task[Verdict]] = set()
        self._closing = False

    def __repr__(self) -> str:
        return (
            f"<Dispatcher running={self._running} limit={self.limit} "
            f"waiting={len(self._waiting)} closing={self._closing}>"
        )

    @property
    def in_flight(self) -> int:
        """Deliveries holding a slot now: decoding or storing."""
        return self._running

    def resize(self, limit: int) -> None:
        """Let `limit` deliveries run at once from now on; running ones are not taken back."""
        self.limit = limit
        self._start_waiting()

    def submit(self, delivery: Delivery) -> None:
        """Start handling a delivery once a slot is free; requeue it if we are draining."""
        if self._closing:
            self._spawn(self._pipeline.requeue(delivery))
            return
        self._waiting.append(delivery)
        self._start_waiting()

    def discard_waiting(self, stale: Callable[[Delivery], bool]) -> int:
        """Never start the waiting deliveries `stale` picks; returns how many were dropped.

        For deliveries of a channel whose consumer the broker cancelled: they are not settled
        at all, because the broker requeues them when that channel closes, and storing them
        first would only make that redelivery a duplicate.
        """
        kept = deque(d for d in self._waiting if not stale(d))
        dropped = len(self._waiting) - len(kept)
        self._waiting = kept
        return dropped

    def _start_waiting(self) -> None:
        while self._waiting and self._running < self.limit and not self._closing:
            self._running += 1
            self._spawn(self._run(self._waiting.popleft()))

    def _spawn(self, work: Coroutine[Any, Any, Verdict]) -> None:
        task = asyncio.create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._reap)

    def _reap(self, task: asyncio.Task[Verdict]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and (exc := task.exception()) is not None:
            # Settling raised something the consumer does not know; the broker redelivers.
            log.error("delivery_task_failed", error=repr(exc))

    async def _run(self, delivery: Delivery) -> Verdict:
        slot = [True]
        try:
            return await self._pipeline.handle(delivery, lambda: self._free(slot))
        finally:
            self._free(slot)

    def _free(self, slot: list[bool]) -> None:
        """Give the delivery's slot to the next one, once: when its store ends or it is done."""
        if slot:
            slot.clear()
            self._running -= 1
            self._start_waiting()

    async def drain(self, grace_s: float) -> int:
        """Stop taking work, let in-flight inserts finish within `grace_s`, requeue the rest.

        Returns how many deliveries were handed back: running inserts cancelled at the end of
        the grace period, and deliveries still waiting for a slot (requeued, never started).
        """
        self._closing = True
        waiting = len(self._waiting)
        while self._waiting:
            self._spawn(self._pipeline.requeue(self._waiting.popleft()))
        pending = set(self._tasks)
        if pending:
            _, pending = await asyncio.wait(pending, timeout=grace_s)
        for task in pending:
            task.cancel()
        # Requeues of deliveries that arrived meanwhile are awaited too.
        await asyncio.gather(*pending, *self._tasks, return_exceptions=True)
        return len(pending) + waiting
