"""Tests for the sink's circuit breaker: pure transitions on an injected clock."""

from __future__ import annotations

from tests.unit.fakes import Clock
from worker.breaker import CircuitBreaker, State


def make(
    failures: int = 3, open_s: float = 5.0, max_open_s: float = 60.0
) -> tuple[CircuitBreaker, Clock, list[State]]:
    """A breaker on a hand clock, recording every transition."""
    clock = Clock()
    seen: list[State] = []
    breaker = CircuitBreaker(failures, open_s, max_open_s, clock, lambda s, _: seen.append(s))
    return breaker, clock, seen


def test_opens_after_consecutive_failures_only() -> None:
    """A success resets the count; `failures` in a row open the breaker."""
    breaker, _, seen = make(failures=3)
    breaker.failure("503")
    breaker.failure("503")
    breaker.success()
    breaker.failure("503")
    breaker.failure("503")
    assert breaker.state is State.CLOSED
    breaker.failure("503")
    assert breaker.state is State.OPEN
    assert seen == [State.OPEN]


def test_zero_failures_means_off() -> None:
    """With `failures=0` the breaker never opens."""
    breaker, _, seen = make(failures=0)
    for _ in range(100):
        breaker.failure("503")
    assert breaker.state is State.CLOSED and seen == []


def test_open_then_half_open_after_open_s() -> None:
    """An open breaker lets no probe through until open_s has passed, then exactly one."""
    breaker, clock, seen = make(failures=1, open_s=5.0)
    breaker.failure("503")
    assert not breaker.try_probe()
    assert breaker.open_remaining_s == 5.0
    clock.now += 4.9
    assert breaker.state is State.OPEN and not breaker.try_probe()
    clock.now += 0.1
    assert breaker.try_probe()
    assert breaker.state is State.HALF_OPEN
    assert not breaker.try_probe()  # only one probe at a time
    assert seen == [State.OPEN, State.HALF_OPEN]


def test_probe_success_closes() -> None:
    """A successful probe closes the breaker and keeps the last failure for the log line."""
    details: list[str] = []
    clock = Clock()
    breaker = CircuitBreaker(1, 5.0, clock=clock, on_change=lambda _, d: details.append(d))
    breaker.failure("HTTP 401: bad token")
    clock.now += 5
    assert breaker.try_probe()
    breaker.success()
    assert breaker.state is State.CLOSED
    assert details == ["HTTP 401: bad token"] * 3


def test_failed_probes_double_open_time_up_to_max() -> None:
    """Each failed probe reopens for twice as long, capped; a close resets the open time."""
    breaker, clock, _ = make(failures=1, open_s=5.0, max_open_s=30.0)
    breaker.failure("503")
    opened_for = []
    for _ in range(4):
        opened_for.append(breaker.open_remaining_s)
        clock.now += breaker.open_remaining_s
        assert breaker.try_probe()
        breaker.failure("503")
    assert opened_for == [5.0, 10.0, 20.0, 30.0]
    assert breaker.open_remaining_s == 30.0
    clock.now += 30
    assert breaker.try_probe()
    breaker.success()
    breaker.failure("503")
    assert breaker.open_remaining_s == 5.0


def test_failures_while_open_do_not_extend_it() -> None:
    """Stores that started before the breaker opened and fail later change nothing."""
    breaker, clock, seen = make(failures=1, open_s=5.0)
    breaker.failure("503")
    clock.now += 3
    breaker.failure("503")
    assert breaker.open_remaining_s == 2.0
    assert seen == [State.OPEN]


def test_released_probe_can_be_taken_again() -> None:
    """A probe that ended without a verdict (cancelled) frees the slot for another."""
    breaker, clock, _ = make(failures=1)
    breaker.failure("503")
    clock.now += 5
    assert breaker.try_probe()
    changed = breaker.changed
    breaker.release()
    assert changed.is_set()
    assert breaker.try_probe()


def test_every_transition_replaces_the_changed_event() -> None:
    """Waiters holding the old event are woken on every transition."""
    breaker, clock, _ = make(failures=1)
    first = breaker.changed
    breaker.failure("503")
    assert first.is_set() and not breaker.changed.is_set()
    second = breaker.changed
    clock.now += 5
    assert breaker.state is State.HALF_OPEN
    assert second.is_set()
