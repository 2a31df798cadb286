"""The steering loop: the consumer follows the sink's breaker (paused, probing, or consuming).

A crash in the loop is not retried: the done-callback logs `steering_crashed` (error, with the
exception) at once and calls `on_crash`, and the service stops the worker, which exits 70.
Restarting the loop would hide a bug that may recur on every pass, and a worker left consuming
without it would keep taking deliveries while the breaker is open; stopping lets the broker
hand its messages to the other workers, and the supervisor restarts this one.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import Protocol

import structlog

from worker.breaker import CircuitBreaker, State

log = structlog.get_logger("worker.steering")

#: How soon to try again when a subscribe failed: a worker must not sit idle unsubscribed.
RESUBSCRIBE_EVERY_S = 1.0


class Steerable(Protocol):
    """What the loop needs of the consumer."""

    @property
    def consuming(self) -> bool:
        """Whether the consumer is subscribed now."""
        ...

    @property
    def stopped(self) -> bool:
        """Whether consuming has ended for good."""
        ...

    async def pause(self) -> None:
        """Stop new deliveries for a while."""
        ...

    async def resume(self, prefetch: int) -> None:
        """Consume again with `prefetch`."""
        ...


class SteeringCrashed(RuntimeError):
    """The steering loop raised; the worker stopped rather than consume without it."""


class Steering:
    """Make the consumer follow the breaker: paused while open, prefetch 1 while probing.

    Closed: `prefetch` (from the maximum), whatever the adaptive limit is. A lower limit is
    enforced by the dispatcher's slots; following it with prefetch would re-subscribe the
    consumer on every change (a `basic.qos` applies to consumers started after it), and each
    re-subscription costs a round trip and can cause redeliveries.
    """

    def __init__(
        self,
        consumer: Steerable,
        breaker: CircuitBreaker,
        prefetch: int,
        on_crash: Callable[[BaseException], None],
    ) -> None:
        self._consumer = consumer
        self._breaker = breaker
        self._prefetch = prefetch
        self._on_crash = on_crash
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def __repr__(self) -> str:
        running = self._task is not None and not self._task.done()
        return (
            f"<Steering running={running} breaker={self._breaker.state.name} "
            f"consuming={self._consumer.consuming} prefetch={self._prefetch}>"
        )

    def wake(self) -> None:
        """Look at the breaker again now (it changed state)."""
        self._wakeup.set()

    def start(self) -> None:
        """Start the loop in a task, reaped by `_reap` the moment it ends."""
        if self._task is not None:
            raise RuntimeError("Steering.start() called twice")
        self._task = asyncio.create_task(self._run(), name="steering")
        self._task.add_done_callback(self._reap)

    async def stop(self) -> None:
        """Cancel the loop and wait for it; a crash was already reported by `_reap`."""
        if self._task is None:
            return
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)

    def _reap(self, task: asyncio.Task[None]) -> None:
        if task.cancelled():
            return
        error = task.exception()
        if error is None:
            error = SteeringCrashed("the steering loop returned")
        log.error("steering_crashed", error=repr(error), exc_info=error)
        self._on_crash(error)

    async def _run(self) -> None:
        consumer, breaker, wakeup = self._consumer, self._breaker, self._wakeup
        while True:
            wakeup.clear()  # before looking, so no change is missed
            state = breaker.state
            timeout_s: float | None = None
            if state is State.OPEN:
                await consumer.pause()
                timeout_s = breaker.open_remaining_s
            else:
                await consumer.resume(1 if state is State.HALF_OPEN else self._prefetch)
                if not consumer.consuming and not consumer.stopped:
                    timeout_s = RESUBSCRIBE_EVERY_S  # the subscribe failed: never sit idle
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(wakeup.wait(), timeout_s)
