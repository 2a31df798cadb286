"""Tests for the adaptive concurrency limit, driven by simulated sinks (no clock, no network)."""

from __future__ import annotations

import random
from collections.abc import Callable

from worker.limiter import AdaptiveLimit

UNLOADED_S = 0.05


def run(limit: AdaptiveLimit, latency_s: Callable[[int], float], stores: int) -> list[int]:
    """Feed `stores` completions, every slot busy; return the limit after each one."""
    seen = []
    for _ in range(stores):
        limit.observe(latency_s(limit.limit), overload=False, in_flight=limit.limit)
        seen.append(limit.limit)
    return seen


def serial(service_s: float) -> Callable[[int], float]:
    """A sink that handles one call at a time: each call waits behind the others in flight."""
    return lambda in_flight: in_flight * service_s


def test_healthy_sink_reaches_the_maximum() -> None:
    """Flat latency with every slot busy: the limit doubles from 1 up to the maximum."""
    limit = AdaptiveLimit(50)
    seen = run(limit, lambda _: UNLOADED_S, 400)
    assert seen[0] == 1 and limit.limit == 50
    assert sorted(set(seen)) == [1, 2, 4, 8, 16, 32, 50]


def test_noisy_healthy_sink_reaches_and_keeps_the_maximum() -> None:
    """Log-normal latency (sigma 0.5) without queueing: noise alone does not hold the limit down."""
    rng = random.Random(7)
    limit = AdaptiveLimit(50)
    seen = run(limit, lambda _: rng.lognormvariate(-3.0, 0.5), 20_000)
    assert max(seen) == 50
    assert min(seen[5_000:]) >= 40


def test_one_call_at_a_time_sink_settles_near_two() -> None:
    """A serial sink: latency grows with the limit, so the limit stays at 1-2, never climbs."""
    limit = AdaptiveLimit(50)
    seen = run(limit, serial(0.022), 5_000)
    assert max(seen) <= 4
    assert set(seen[1_000:]) <= {1, 2}
    assert limit.unloaded_s is not None and abs(limit.unloaded_s - 0.022) < 1e-9


def test_capacity_drop_is_followed_within_a_few_windows() -> None:
    """At 50 the capacity drops to 5: the limit falls to at most 2 x 5 and latency stays bounded."""
    capacity = 50

    def latency_s(in_flight: int) -> float:
        return UNLOADED_S * max(1.0, in_flight / capacity)

    limit = AdaptiveLimit(50)
    run(limit, latency_s, 400)
    assert limit.limit == 50
    capacity = 5
    seen = run(limit, latency_s, 300)  # 300 stores at 100/s is 3 s of the smaller sink
    assert 5 <= limit.limit <= 10
    assert max(seen[150:]) <= 10
    assert latency_s(limit.limit) <= 2 * UNLOADED_S


def test_capacity_back_is_found_again() -> None:
    """After a drop the limit climbs back by quarters within a few windows once latency is flat."""
    capacity = 5

    def latency_s(in_flight: int) -> float:
        return UNLOADED_S * max(1.0, in_flight / capacity)

    limit = AdaptiveLimit(50)
    run(limit, latency_s, 400)
    assert limit.limit <= 10
    capacity = 50
    seen = run(limit, latency_s, 600)  # 600 stores: about 1 s of the healthy sink at 50
    assert seen[-1] == 50


def test_overload_signals_halve_the_limit() -> None:
    """A window in which a tenth of the stores were 429/503/timeouts halves the limit."""
    limit = AdaptiveLimit(50)
    run(limit, lambda _: UNLOADED_S, 400)
    for n in range(50):
        limit.observe(UNLOADED_S, overload=n % 5 == 0, in_flight=50)
    assert limit.limit == 25


def test_a_rare_overload_signal_does_not_shrink_it() -> None:
    """One 503 in a window of 50 is noise, not overload."""
    limit = AdaptiveLimit(50)
    run(limit, lambda _: UNLOADED_S, 400)
    for n in range(50):
        limit.observe(UNLOADED_S, overload=n == 0, in_flight=50)
    assert limit.limit == 50


def test_no_growth_without_demand() -> None:
    """With fewer stores running than the limit allows there is no evidence for more."""
    limit = AdaptiveLimit(50, initial=4)
    for _ in range(500):
        limit.observe(UNLOADED_S, overload=False, in_flight=2)
    assert limit.limit == 4


def test_slower_sink_for_everyone_is_relearned_at_limit_one() -> None:
    """When the sink gets slower for all, the limit drops to 1, relearns, and grows again."""
    slow = 1.0

    def latency_s(_: int) -> float:
        return UNLOADED_S * slow

    limit = AdaptiveLimit(50)
    run(limit, latency_s, 400)
    slow = 5.0
    seen = run(limit, latency_s, 3_000)
    assert min(seen) == 1
    assert limit.limit == 50
    assert limit.unloaded_s is not None and abs(limit.unloaded_s - 5 * UNLOADED_S) < 1e-9


def test_disabled_limit_stays_at_the_maximum() -> None:
    """With adaptation off the limit is the maximum and observations change nothing."""
    changes: list[tuple[int, str]] = []
    limit = AdaptiveLimit(20, enabled=False, on_change=lambda n, why: changes.append((n, why)))
    run(limit, serial(0.5), 1_000)
    assert limit.limit == 20 and changes == []


def test_every_change_is_reported_with_its_cause() -> None:
    """on_change hears each new limit once, with why it moved."""
    changes: list[tuple[int, str]] = []
    limit = AdaptiveLimit(8, on_change=lambda n, why: changes.append((n, why)))
    run(limit, lambda _: UNLOADED_S, 100)
    for _ in range(20):
        limit.observe(UNLOADED_S, overload=True, in_flight=8)
    assert changes == [(2, "headroom"), (4, "headroom"), (8, "headroom"), (4, "overload")]


def test_limit_stays_within_bounds() -> None:
    """Whatever the sink does, the limit stays within [1, maximum]."""
    rng = random.Random(3)
    limit = AdaptiveLimit(10)
    for _ in range(20_000):
        n = limit.limit
        limit.observe(rng.expovariate(1.0) * n, overload=rng.random() < 0.2, in_flight=n)
        assert 1 <= limit.limit <= 10


def test_a_limit_latency_pushed_back_from_is_rarely_probed_again() -> None:
    """A sink whose latency at 2 is just under the growth bound (1.6x unloaded) and at 3 over
    the shrink bound: the limit stays at 2 instead of stepping to 3 every few windows."""
    rng = random.Random(11)
    limit = AdaptiveLimit(50)
    seen = run(limit, lambda n: 0.03 * (1 + 0.6 * (n - 1)) * rng.lognormvariate(0, 0.2), 6_000)
    late = seen[1_000:]
    assert sum(n >= 3 for n in late) / len(late) < 0.02
    assert late.count(2) / len(late) > 0.9
