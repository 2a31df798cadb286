"""Tests for the adaptive concurrency limit, driven by simulated sinks (no clock, no network)."""

from __future__ import annotations

import heapq
import random
from collections.abc import Callable
from dataclasses import dataclass, field

from worker.limiter import AdaptiveLimit

UNLOADED_S = 0.05


@dataclass
class Clocks:
    """A simulated wall clock, process-CPU clock and wait-for-a-core clock for the limiter."""

    now: float = 0.0
    cpu: float = 0.0
    waited: float = 0.0

    def limit(self, maximum: int, **kwargs: object) -> AdaptiveLimit:
        """An AdaptiveLimit reading these clocks."""
        busy = lambda: (self.cpu, self.waited)  # noqa: E731
        return AdaptiveLimit(maximum, clock=lambda: self.now, busy_clock=busy, **kwargs)  # type: ignore[arg-type]


class Completions:
    """Reads a simulated sink's log: (time, limit after, latency) of each completed store."""

    log: list[tuple[float, int, float]]

    def limits(self, after_s: float = 0.0) -> list[int]:
        """The limit after each completion past `after_s`."""
        return [n for t, n, _ in self.log if t >= after_s]

    def latencies(self, after_s: float = 0.0) -> list[float]:
        """Latencies of the stores completed past `after_s`."""
        return [lat for t, _, lat in self.log if t >= after_s]


@dataclass
class Sim(Completions):
    """A sink with `capacity` servers (None: unbounded) serving calls first come, first served.

    Stores start whenever fewer than the limit are running, as the dispatcher's slots do;
    each completion costs the worker `cpu_per_store_s` of CPU and, on a machine busy with
    other processes, `wait_per_store_s` of waiting for a core.
    """

    service_s: Callable[[], float]
    capacity: int | None = None
    cpu_per_store_s: float = 0.0001
    wait_per_store_s: float = 0.0
    clocks: Clocks = field(default_factory=Clocks)
    servers: list[float] = field(default_factory=list)
    running: list[tuple[float, float]] = field(default_factory=list)  # (end, start)
    log: list[tuple[float, int, float]] = field(default_factory=list)  # (t, limit, latency)

    def set_capacity(self, capacity: int | None) -> None:
        """Change how many calls the sink serves at once."""
        self.capacity = capacity
        if capacity is not None:
            self.servers = sorted(self.servers)[:capacity]
            self.servers += [self.clocks.now] * (capacity - len(self.servers))
            heapq.heapify(self.servers)

    def run(self, limit: AdaptiveLimit, until_s: float) -> None:
        """Run stores until the simulated time passes `until_s`."""
        if self.capacity is not None and not self.servers:
            self.set_capacity(self.capacity)
        while self.clocks.now < until_s:
            while len(self.running) < limit.limit:
                now = self.clocks.now
                begin = now
                if self.capacity is not None:
                    begin = max(now, heapq.heappop(self.servers))
                end = begin + self.service_s()
                if self.capacity is not None:
                    heapq.heappush(self.servers, end)
                heapq.heappush(self.running, (end, now))
            end, start = heapq.heappop(self.running)
            self.clocks.now = max(self.clocks.now, end)
            self.clocks.cpu += self.cpu_per_store_s
            self.clocks.waited += self.wait_per_store_s
            limit.observe(end - start, overload=False, in_flight=len(self.running) + 1)
            self.log.append((self.clocks.now, limit.limit, end - start))


def p95(values: list[float]) -> float:
    """The 95th percentile."""
    ordered = sorted(values)
    return ordered[int(len(ordered) * 0.95)]


def lognormal(median_s: float, sigma: float, seed: int = 7) -> Callable[[], float]:
    """Service times of a healthy sink with spread."""
    rng = random.Random(seed)
    return lambda: rng.lognormvariate(0, sigma) * median_s


def recorder(clocks: Clocks, changes: list[tuple[float, int, str]]) -> Callable[[int, str], None]:
    """An on_change that records each change with the simulated time."""
    return lambda n, why: changes.append((clocks.now, n, why))


def test_healthy_sink_is_used_fully_from_the_first_store() -> None:
    """50 ms log-normal (sigma 0.2): the maximum from the first store; one lone store at 2 s."""
    for maximum in (1, 5, 10, 20, 50):
        clocks = Clocks()
        changes: list[tuple[float, int, str]] = []
        limit = clocks.limit(maximum, on_change=recorder(clocks, changes))
        sim = Sim(lognormal(UNLOADED_S, 0.2), clocks=clocks)
        sim.run(limit, 20.0)
        assert set(sim.limits()[:maximum]) == {maximum}, maximum
        if maximum == 1:
            assert changes == []
            continue
        assert [(n, why) for _, n, why in changes] == [(1, "check"), (maximum, "checked")]
        began, ended = changes[0][0], changes[1][0]
        assert began >= 2.0 and ended - began < 3 * UNLOADED_S, maximum
        assert set(sim.limits()[: sim.limits().index(1)]) == {maximum}, maximum


def test_wide_spread_is_not_read_as_queueing() -> None:
    """sigma 0.5: the mean is far above the fastest calls, yet the limit stays near the maximum.

    At this spread a window now and then reads as queued and costs a step down, so the
    claim is over ten seeds (some seeds dip to 0.7 of the maximum, then recover).
    """
    for maximum in (5, 10, 20, 50):
        shares = []
        for seed in range(1, 11):
            clocks = Clocks()
            limit = clocks.limit(maximum)
            sim = Sim(lognormal(UNLOADED_S, 0.5, seed=seed), clocks=clocks)
            sim.run(limit, 60.0)
            limits = sim.limits()
            shares.append(sum(limits) / len(limits) / maximum)
        assert sum(shares) / len(shares) >= 0.95, maximum


def test_serial_sink_is_left_within_two_seconds() -> None:
    """One call at a time (22 ms): from 50 the limit is at 1-2 within 2 s, p95 then <= 2.2x."""
    clocks = Clocks()
    limit = clocks.limit(50)
    sim = Sim(lambda: 0.022, capacity=1, clocks=clocks)
    sim.run(limit, 30.0)
    assert max(sim.limits(after_s=2.0)) <= 3
    assert p95(sim.latencies(after_s=3.0)) <= 2.2 * 0.022
    assert limit.unloaded_s is not None and abs(limit.unloaded_s - 0.022) < 0.005


@dataclass
class SharedSim(Completions):
    """A sink that works on every call at once, each getting an equal share of one server.

    Like Session-Buddy: `work_s` of service per call, interleaved, so calls that arrive
    together all end late together (no call is answered first at the unloaded latency).
    """

    work_s: float
    clocks: Clocks = field(default_factory=Clocks)
    left: dict[int, float] = field(default_factory=dict)  # call -> work left
    started: dict[int, float] = field(default_factory=dict)
    log: list[tuple[float, int, float]] = field(default_factory=list)

    def run(self, limit: AdaptiveLimit, until_s: float) -> None:
        """Run stores until the simulated time passes `until_s`."""
        calls = len(self.started)
        while self.clocks.now < until_s:
            while len(self.left) < limit.limit:
                self.left[calls], self.started[calls] = self.work_s, self.clocks.now
                calls += 1
            done = min(self.left, key=self.left.__getitem__)
            step = self.left[done]
            self.clocks.now += step * len(self.left)
            self.left = {c: w - step for c, w in self.left.items() if c != done}
            latency = self.clocks.now - self.started.pop(done)
            self.clocks.cpu += 0.0001
            limit.observe(latency, overload=False, in_flight=len(self.left) + 1)
            self.log.append((self.clocks.now, limit.limit, latency))


def test_interleaving_serial_sink_is_left_at_any_maximum() -> None:
    """One server shared by every call (45 ms each): p95 <= 2x unloaded from the third second.

    Calls that start together end together, each late by the others' work: no window ever
    shows latency growing with what we keep in flight, only a store that ran alone tells
    the unloaded latency.
    """
    for maximum in (5, 10, 20, 50):
        clocks = Clocks()
        limit = clocks.limit(maximum)
        sim = SharedSim(0.045, clocks=clocks)
        sim.run(limit, 30.0)
        assert p95(sim.latencies(after_s=3.0)) <= 2 * 0.045, maximum
        assert max(sim.limits(after_s=3.0)) <= 2, maximum


def test_a_busy_first_window_does_not_become_the_baseline() -> None:
    """Serial sink, the machine busy while the first stores queue: the queued latency of that
    window is not taken for the unloaded one, and the limit still comes down to 1-2."""
    clocks = Clocks()
    limit = clocks.limit(20)
    sim = Sim(lambda: 0.022, capacity=1, clocks=clocks)
    # The first 0.4 s the loop thread waits for a core most of the time (startup, other load).
    sim.cpu_per_store_s = 0.02
    sim.run(limit, 0.4)
    sim.cpu_per_store_s = 0.0001
    sim.run(limit, 10.0)
    assert max(sim.limits(after_s=3.0)) <= 2
    assert limit.unloaded_s is not None and limit.unloaded_s < 0.03


def test_a_capacity_drop_is_followed_when_every_healthy_window_was_busy() -> None:
    """On a box where the healthy sink keeps our loop busy in every window, the unloaded latency
    is still learnt, so a drop of the sink's capacity to 5 brings the limit below 10."""
    clocks = Clocks()
    limit = clocks.limit(50)
    # 0.6 ms of our CPU per store: ~60 % busy at ~1,000 stores/s, ~6 % once capacity is 5.
    sim = Sim(lognormal(UNLOADED_S, 0.2), cpu_per_store_s=0.0006, clocks=clocks)
    sim.run(limit, 5.0)
    assert set(sim.limits()) == {50}
    sim.set_capacity(5)
    sim.run(limit, 10.0)
    assert min(sim.limits(after_s=5.0)) < 10


def test_waiting_for_a_core_alone_does_not_hide_a_capacity_drop() -> None:
    """Other processes keep our mostly idle loop waiting for a core at every wake-up: the loop
    reads busy, yet a drop of the sink's capacity to 3 still brings the limit down."""
    clocks = Clocks()
    changes: list[tuple[float, int, str]] = []
    limit = clocks.limit(20, on_change=recorder(clocks, changes))
    sim = Sim(lognormal(UNLOADED_S, 0.2), cpu_per_store_s=0.001, clocks=clocks)
    sim.run(limit, 5.0)
    assert [(n, why) for _, n, why in changes] == [(1, "check"), (20, "checked")]
    sim.set_capacity(3)
    sim.wait_per_store_s = 0.015  # ~90 % of the wall time at ~60 stores/s
    sim.run(limit, 15.0)
    assert max(sim.limits(after_s=8.0)) <= 6


def test_serial_sink_is_left_on_a_machine_busy_with_other_work() -> None:
    """One call at a time (10 ms) while other processes keep the loop waiting for a core: the
    limit still comes down from the maximum to 1-3."""
    clocks = Clocks()
    limit = clocks.limit(20)
    sim = Sim(lambda: 0.01, capacity=1, wait_per_store_s=0.008, clocks=clocks)
    sim.run(limit, 20.0)
    assert max(sim.limits(after_s=3.0)) <= 3


def test_own_cpu_limit_is_not_read_as_queueing() -> None:
    """0 ms sink, the worker's loop busy all the time: latency grows with in-flight, limit stays."""
    clocks = Clocks()
    limit = clocks.limit(50)
    cost_s = 0.0004
    sim = Sim(lambda: 0.0, cpu_per_store_s=cost_s, clocks=clocks)
    # Our loop is the only queue: each store waits for everything in flight to be handled.
    sim.service_s = lambda: len(sim.running) * cost_s
    sim.run(limit, 10.0)
    assert set(sim.limits()) == {50}  # no check either: a lone store would measure our loop


def test_capacity_drop_is_followed_and_recovered() -> None:
    """Capacity 50 -> 5: below 10 within 1.5 s, p95 bounded; back to 50: the maximum within 2 s."""
    clocks = Clocks()
    limit = clocks.limit(50)
    sim = Sim(lambda: UNLOADED_S, capacity=50, clocks=clocks)
    sim.run(limit, 5.0)
    assert limit.limit == 50
    sim.set_capacity(5)
    sim.run(limit, 10.0)
    dropped = [t for t, n, _ in sim.log if t >= 5.0 and n < 10]
    assert dropped and dropped[0] - 5.0 <= 1.5
    assert max(sim.limits(after_s=7.0)) <= 10
    assert p95(sim.latencies(after_s=7.0)) <= 2.05 * UNLOADED_S
    sim.set_capacity(50)
    sim.run(limit, 15.0)
    back = [t for t, n, _ in sim.log if t >= 10.0 and n == 50]
    assert back and back[0] - 10.0 <= 2.0


def test_an_underestimated_capacity_does_not_pin_the_limit_under_its_ceiling() -> None:
    """Shrinks from 8 to 5 at 1.85x (queued calls inflate the ratio, so the capacity estimate is
    low): once latency is flat again the limit is back at the maximum within a few windows."""
    clocks = Clocks()
    limit = clocks.limit(8)
    feed(limit, clocks, UNLOADED_S, 64)
    while limit.limit > 5:
        feed(limit, clocks, 1.85 * UNLOADED_S, 32)
    assert limit.limit == 5
    feed(limit, clocks, UNLOADED_S, 6 * 32)
    assert limit.limit == 8


def test_slower_sink_for_everyone_is_relearned_at_limit_one() -> None:
    """When the sink gets slower for all, the limit drops to 1, relearns, and grows again."""
    slow = [1.0]
    clocks = Clocks()
    limit = clocks.limit(50)
    sim = Sim(lambda: UNLOADED_S * slow[0], clocks=clocks)
    sim.run(limit, 5.0)
    slow[0] = 5.0
    sim.run(limit, 60.0)
    assert min(sim.limits(after_s=5.0)) == 1
    assert limit.limit == 50
    assert limit.unloaded_s is not None and abs(limit.unloaded_s - 5 * UNLOADED_S) < 1e-9


def feed(limit: AdaptiveLimit, clocks: Clocks, latency_s: float, n: int, **kw: object) -> None:
    """Feed `n` completions of `latency_s`, every slot busy, 10 % of wall time on our CPU."""
    overload = kw.get("overload", lambda i: False)
    for i in range(n):
        clocks.now += latency_s / limit.limit
        clocks.cpu += 0.1 * latency_s / limit.limit
        limit.observe(latency_s, overload=overload(i), in_flight=limit.limit)  # type: ignore[operator]


def test_overload_signals_halve_the_limit() -> None:
    """A window in which a tenth of the stores were 429/503/timeouts halves the limit."""
    clocks = Clocks()
    limit = clocks.limit(50)
    feed(limit, clocks, UNLOADED_S, 400)
    feed(limit, clocks, UNLOADED_S, 64, overload=lambda i: i % 5 == 0)
    assert limit.limit == 25


def test_a_rare_overload_signal_does_not_shrink_it() -> None:
    """One 503 in a window of 50 is noise, not overload."""
    clocks = Clocks()
    limit = clocks.limit(50)
    feed(limit, clocks, UNLOADED_S, 400)
    feed(limit, clocks, UNLOADED_S, 64, overload=lambda i: i == 0)
    assert limit.limit == 50


def test_no_growth_without_demand() -> None:
    """With fewer stores running than the limit allows there is no evidence for more."""
    clocks = Clocks()
    limit = clocks.limit(50)
    feed(limit, clocks, UNLOADED_S, 50)
    feed(limit, clocks, 10 * UNLOADED_S, 64)  # the sink slowed down: the limit came down
    low = limit.limit
    assert low < 50
    for _ in range(500):
        clocks.now += 0.01
        limit.observe(UNLOADED_S, overload=False, in_flight=1)
    assert limit.limit <= low


def test_answers_read_in_pairs_still_show_demand() -> None:
    """Two answers per loop turn (the second sees the first's slot free) still let it grow."""
    clocks = Clocks()
    limit = clocks.limit(50)
    feed(limit, clocks, UNLOADED_S, 50)
    feed(limit, clocks, 10 * UNLOADED_S, 64)  # the sink slowed down: the limit came down
    low = limit.limit
    assert low < 50
    for i in range(400):  # the sink is back, and every slot refills after each pair of answers
        clocks.now += UNLOADED_S / limit.limit
        limit.observe(UNLOADED_S, overload=False, in_flight=limit.limit - i % 2)
    assert limit.limit > low


def test_disabled_limit_stays_at_the_maximum() -> None:
    """With adaptation off the limit is the maximum and observations change nothing."""
    changes: list[tuple[int, str]] = []
    clocks = Clocks()
    limit = clocks.limit(20, enabled=False, on_change=lambda n, why: changes.append((n, why)))
    sim = Sim(lambda: 0.022, capacity=1, clocks=clocks)
    sim.run(limit, 10.0)
    assert limit.limit == 20 and changes == []


def test_a_failed_store_is_not_taken_for_the_lone_one() -> None:
    """A refusal during the check answers at once: the next store that stored is the lone one."""
    changes: list[tuple[float, int, str]] = []
    clocks = Clocks()
    limit = clocks.limit(10, on_change=recorder(clocks, changes))
    while limit.limit == 10:  # until the check begins, 2 s in
        feed(limit, clocks, UNLOADED_S, 1)
    assert changes == [(changes[0][0], 1, "check")] and changes[0][0] >= 2.0 - UNLOADED_S
    clocks.now += 0.001
    limit.observe(0.001, overload=False, in_flight=1, ok=False)  # connection refused
    assert limit.limit == 1
    clocks.now += UNLOADED_S
    limit.observe(UNLOADED_S, overload=False, in_flight=1)
    assert changes[-1][1:] == (10, "checked")


def test_every_change_is_reported_with_its_cause() -> None:
    """on_change hears each new limit once, with why it moved."""
    changes: list[tuple[int, str]] = []
    clocks = Clocks()
    limit = clocks.limit(8, on_change=lambda n, why: changes.append((n, why)))
    feed(limit, clocks, UNLOADED_S, 32)
    feed(limit, clocks, UNLOADED_S, 32, overload=lambda i: True)
    feed(limit, clocks, UNLOADED_S, 32)
    assert changes == [(4, "overload"), (8, "headroom")]
    feed(limit, clocks, UNLOADED_S, 400)  # past check_after_s: one store runs alone
    assert changes[2:] == [(1, "check"), (8, "checked")]


def test_limit_stays_within_bounds() -> None:
    """Whatever the sink does, the limit stays within [1, maximum]."""
    rng = random.Random(3)
    clocks = Clocks()
    limit = clocks.limit(10)
    for _ in range(20_000):
        n = limit.limit
        clocks.now += rng.expovariate(100.0)
        clocks.cpu += rng.expovariate(200.0)
        limit.observe(rng.expovariate(1.0) * n, overload=rng.random() < 0.2, in_flight=n)
        assert 1 <= limit.limit <= 10


def test_a_limit_latency_pushed_back_from_is_rarely_probed_again() -> None:
    """A sink whose latency at 2 is just under the growth bound (1.6x unloaded) and at 3 over
    the shrink bound: the limit stays at 2 instead of stepping to 3 every few windows."""
    rng = random.Random(11)
    clocks = Clocks()
    limit = clocks.limit(50)
    sim = Sim(lambda: 0.0, clocks=clocks)
    # Each call is slower by 0.6x for every call of ours already running when it starts.
    sim.service_s = lambda: 0.03 * (1 + 0.6 * len(sim.running)) * rng.lognormvariate(0, 0.2)
    sim.run(limit, 200.0)
    late = sim.limits(after_s=20.0)
    assert sum(n >= 3 for n in late) / len(late) < 0.02
    assert late.count(2) / len(late) > 0.9
