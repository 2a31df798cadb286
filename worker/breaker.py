"""A circuit breaker on the sink: systemic failures pause the worker instead of burning messages.

Closed: every store goes through; `failures` consecutive transient or timed-out stores open it.
Open: no store goes through for `open_s`; the consumer is paused and unstarted items are
handed back without counting an attempt. Half-open: exactly one probe store goes through;
its success closes the breaker, its failure opens it again for twice as long (up to
`max_open_s`). The clock is injected, so every transition is tested without sleeping.
"""

from __future__ import annotations

import asyncio
import enum
import time
from collections.abc import Callable


class State(enum.IntEnum):
    """The breaker's state; the value is what the `memory_worker_breaker_state` gauge shows."""

    CLOSED = 0
    HALF_OPEN = 1
    OPEN = 2


class CircuitBreaker:
    """Counts consecutive sink failures and decides whether a store may start."""

    def __init__(
        self,
        failures: int,
        open_s: float,
        max_open_s: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
        on_change: Callable[[State, str], None] | None = None,
    ) -> None:
        self._threshold = failures
        self._base_open_s = open_s
        self._max_open_s = max(open_s, max_open_s)
        self._clock = clock
        self._on_change = on_change
        self._state = State.CLOSED
        self._failures = 0
        self._open_s = open_s
        self._until = 0.0
        self._probing = False
        self.last_failure = ""
        # Replaced on every transition, so a waiter that took it before looking never misses one.
        self.changed = asyncio.Event()

    @property
    def state(self) -> State:
        """The current state; an open breaker whose time is up becomes half-open here."""
        if self._state is State.OPEN and self._clock() >= self._until:
            self._to(State.HALF_OPEN)
        return self._state

    @property
    def open_remaining_s(self) -> float:
        """Seconds until an open breaker lets a probe through (0 when not open)."""
        return max(0.0, self._until - self._clock()) if self._state is State.OPEN else 0.0

    def try_probe(self) -> bool:
        """Claim the one half-open probe; False if it is taken or the breaker is not half-open."""
        if self.state is not State.HALF_OPEN or self._probing:
            return False
        self._probing = True
        return True

    async def admit(self) -> tuple[bool, bool]:
        """Whether a store may start, and whether it is the half-open probe.

        While a probe is out the other stores wait for its verdict rather than being handed
        back: a requeued message comes straight back, and a wait is bounded by the probe's
        own timeout.
        """
        while True:
            changed = self.changed  # taken before looking, so no transition is missed
            state = self.state
            if state is State.CLOSED:
                return True, False
            if state is State.OPEN:
                return False, False
            if self.try_probe():
                return True, True
            await changed.wait()

    def success(self) -> None:
        """The sink answered (stored, or refused the item for good): it is working."""
        self._failures = 0
        if self._state is State.HALF_OPEN:
            self._probing = False
            self._open_s = self._base_open_s
            self._to(State.CLOSED)

    def failure(self, detail: str) -> None:
        """A store failed transiently or timed out."""
        self.last_failure = detail
        if self._threshold <= 0 or self._state is State.OPEN:
            return  # disabled, or a store that started before the breaker opened
        if self._state is State.HALF_OPEN:
            self._probing = False
            self._open_s = min(self._open_s * 2, self._max_open_s)
            self._open()
            return
        self._failures += 1
        if self._failures >= self._threshold:
            self._open()

    def release(self) -> None:
        """The probe ended without a verdict on the sink (cancelled, crashed): let another try."""
        if self._probing:
            self._probing = False
            self._notify()

    def _open(self) -> None:
        self._failures = 0
        self._until = self._clock() + self._open_s
        self._to(State.OPEN)

    def _to(self, state: State) -> None:
        self._state = state
        if self._on_change is not None:
            self._on_change(state, self.last_failure)
        self._notify()

    def _notify(self) -> None:
        self.changed.set()
        self.changed = asyncio.Event()
