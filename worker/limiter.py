"""Adaptive concurrency: open at the maximum, come down only while the sink queues our calls.

The limit lives in [1, `max_concurrent_memory_insertions`] and starts at the maximum: a healthy
sink is used fully from the first store, and a burst shorter than `check_after_s` pays nothing for
adaptation. That long after the first store the limit checks itself once: one store runs alone. A
sink serving one call at a time that interleaves ten looks, from here, like ten servers ten times
slower; only a store that ran alone shows its unloaded latency, and the fastest store that shared
the sink before the check is judged against it. The limit moves once per window of completed
stores: at least `window` (a steady percentile), one per slot (about one round trip of every slot)
and `min_window_s` (a burst of answers read in one loop turn is not a window). A window whose mean
is already `early_above` times the unloaded latency closes after `early_window` stores: a serial
sink is left within about a second.

A window is judged by its typical latency, the 75th percentile, against the unloaded latency. Three
things raise latency, and only the last is the sink queueing behind us:

- **Spread.** A sink whose service time varies has slow calls at any concurrency. A
  percentile, unlike the mean or the fastest call, barely moves with spread, so a healthy sink
  with log-normal latency is not read as a queue. The unloaded latency is the first window's
  typical latency, then the lowest one seen; a window whose stores all ran alone sets it
  afresh. It never expires otherwise: a baseline relearned under load would let the limit
  creep up with the queue.
- **Our own CPU.** When the event loop's thread was running, or ready to run and waiting for
  a core, for `busy_share` of a window's wall time (Linux's schedstat; CPU time elsewhere),
  and the process itself ran for `cpu_share` of it, stores wait in our loop or for the
  machine, not in the sink, and fewer in flight would not make any faster. Both are needed:
  on a busy machine a mostly idle loop still waits for a core at every wake-up (a delay per
  store, not a queue), and a loop that others keep from a core runs for less than it wants.
  Such a window never lowers the limit: it doubles it toward the maximum. Its typical latency
  lowers the unloaded one only if its stores did not queue behind each other (a burst that
  starts on a busy machine would set it high).
- **Queueing in the sink.** Throughput stops growing while latency grows with what we keep
  in flight (Netflix concurrency-limits' Vegas and Gradient2 read the same evidence). Above
  `shrink_above` times unloaded the limit shrinks in proportion (at most halving); a window
  with `overload_share` of 429/503/timeouts halves it. When the check finds a queue (the
  fastest store before it took `shrink_above` times the lone one), or the first window does
  (its mean `early_above` times its fastest), the limit probes at 1 until a window of stores
  that ran alone has measured the unloaded latency (one store is one sample of the sink's
  spread), then grows from there. A window bounded by our own CPU skips the check: the sink is
  not what holds us back there, and a lone store would measure only our idle loop.

Growth needs demand: a window's stores ran with `demand_share` of the slots busy on average (not
one store with every slot busy: a window that straddles a drop in demand has some, and answers read
in one loop turn see each other's slots free). Then below `flat_below` times unloaded the limit
doubles, below `grow_below` it grows by a quarter, in between it holds. A limit latency pushed it
back from is a ceiling, remembered with what the sink served there (stores/s times unloaded
latency, by Little's law). The limit stays below it until latency is flat at a quarter (and one
call) more than that capacity, or for `patience` good windows: flat latency at one call says
nothing on a sink that serves one call at a time, and each probe above the ceiling costs a window
of queued calls (they would set the p95). Flat right under a ceiling of five or more, a quarter
step above is cheap and taken at once: the ceiling moves up with it.

So a sink serving one call at a time (Session-Buddy) settles at one call, p95 near its unloaded
latency; a sink with room for every slot, or a worker bound by its own CPU, stays at the maximum.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

from worker.busyclock import loop_busy_clock


class AdaptiveLimit:
    """How many stores may run at once, moved by observed latency, overload and our own CPU."""

    def __init__(
        self,
        maximum: int,
        *,
        enabled: bool = True,
        window: int = 32,
        early_window: int = 16,
        grow_below: float = 1.7,
        shrink_above: float = 1.8,
        flat_below: float = 1.2,
        early_above: float = 4.0,
        overload_share: float = 0.1,
        patience: int = 40,
        busy_share: float = 0.5,
        demand_share: float = 0.75,
        cpu_share: float = 0.25,
        min_window_s: float = 0.05,
        check_after_s: float = 2.0,
        clock: Callable[[], float] = time.monotonic,
        busy_clock: Callable[[], tuple[float, float]] | None = None,
        on_change: Callable[[int, str], None] | None = None,
    ) -> None:
        self.maximum, self.enabled, self.limit = maximum, enabled, maximum
        self.unloaded_s: float | None = None
        self._window, self._early_window = window, early_window
        self._grow_below = grow_below
        self._shrink_above = shrink_above
        self._flat_below = flat_below
        self._early_above = early_above
        self._overload_share = overload_share
        self._patience = patience
        self._busy_share = busy_share
        self._demand_share = demand_share
        self._cpu_share = cpu_share
        self._min_window_s = min_window_s
        self._check_after_s = check_after_s
        # When to run one store alone: 0 until the first store answers, None once done.
        self._check_at: float | None = 0.0 if enabled and maximum > 1 else None
        self._checking = False  # at 1 since `_check_began` until a store that ran alone answers
        self._check_began, self._restore = 0.0, maximum
        self._ours = False  # the last window was bounded by our own CPU
        self._clock, self._on_change = clock, on_change
        self._busy_clock = busy_clock if busy_clock is not None else loop_busy_clock()
        self._ceiling: int | None = None
        self._capacity = 0.0  # calls the sink served at once at the ceiling: stores/s x unloaded
        self._probing = False  # at 1 until a window of stores that ran alone shows the baseline
        self._good_windows = 0
        self._fastest_s = math.inf  # fastest store seen while the unloaded latency is unknown
        self._last_fastest_s = math.inf  # the last window's fastest store
        self._loaded_s = math.inf  # the fastest store that shared the sink, before the check
        self._started_s, self._busy_started_s = 0.0, (0.0, 0.0)
        self._reset_window()

    def __repr__(self) -> str:
        unloaded = f"{self.unloaded_s * 1000:.1f} ms" if self.unloaded_s else "unknown"
        return f"<AdaptiveLimit {self.limit}/{self.maximum} unloaded={unloaded}>"

    def _reset_window(self) -> None:
        self._latencies: list[float] = []
        self._total_s = 0.0
        self._overloads = self._busiest = self._in_flight_total = 0
        self._window_limit = self.limit

    def observe(self, latency_s: float, overload: bool, in_flight: int, ok: bool = True) -> None:
        """Record one finished store: its latency, overload signal, how many ran, if it stored."""
        if not self.enabled:
            return
        if self._check_at is not None and self._check(latency_s, overload, in_flight, ok):
            return
        latencies = self._latencies
        if not latencies:
            # The window's clocks start at its first store, so idle time before it is not in it.
            self._started_s, self._busy_started_s = self._clock(), self._busy_clock()
        latencies.append(latency_s)
        self._total_s += latency_s
        self._overloads += overload
        self._busiest = max(self._busiest, in_flight)
        self._in_flight_total += in_flight
        count = len(latencies)
        if count < self._early_window:
            return
        # The running mean is cheap enough to test on every store; the percentile only at the end.
        baseline_s = self.unloaded_s
        if baseline_s is None:
            # Not min(a, *latencies): that would copy the window into a tuple on every store.
            baseline_s = min(self._fastest_s, min(latencies))  # noqa: PLW3301
        early = self._total_s >= self._early_above * baseline_s * count
        if (early or count >= max(self._window, self._window_limit)) and (
            self._clock() - self._started_s >= self._min_window_s
        ):
            self._close_window(early)

    def _check(self, latency_s: float, overload: bool, in_flight: int, ok: bool) -> bool:
        """Run the check's lone store; whether it took this answer (so no window counts it)."""
        now = self._clock()
        if self._checking:
            # Stores started before the check shared the sink; one started after ran alone.
            # A failed store is no sample of the sink's latency: a refusal answers at once.
            if not ok or overload or in_flight > 1 or now - latency_s < self._check_began:
                self._loaded_s = min(self._loaded_s, latency_s) if ok else self._loaded_s
                return True
            self._checking, self._check_at = False, None
            # An interleaving sink answers every store late, the fastest too: latencies never
            # grow within a window, only the stores that shared it against the lone one show it.
            if self._loaded_s >= self._shrink_above * latency_s:
                self._probing, self.unloaded_s = True, None
                self._decide(1, "probe")
            else:
                self._decide(self._restore, "checked")
            return True
        if not self._check_at:
            self._check_at = now - latency_s + self._check_after_s
        elif now >= self._check_at:
            if self.limit == 1 or self._probing or self._ours:
                self._check_at = None  # stores already run alone, or the sink is not the bound
                return False
            self._checking, self._check_began, self._restore = True, now, self.limit
            self._loaded_s = min(self._last_fastest_s, latency_s, *self._latencies)
            self._decide(1, "check")
            return True
        return False

    def _close_window(self, early: bool) -> None:
        latencies = sorted(self._latencies)
        count = len(latencies)
        typical_s = latencies[count * 3 // 4]
        wall_s = self._clock() - self._started_s
        cpu_s, waited_s = self._busy_clock()
        cpu_s -= self._busy_started_s[0]
        waited_s -= self._busy_started_s[1]
        ours = self._ours = wall_s > 0 and (
            cpu_s >= self._cpu_share * wall_s and cpu_s + waited_s >= self._busy_share * wall_s
        )
        overloaded = self._overloads >= self._overload_share * count
        saturated = self._in_flight_total >= self._demand_share * self._window_limit * count
        self._last_fastest_s = latencies[0]
        unloaded_s = self._learn_unloaded(typical_s, latencies[0], early, ours and not overloaded)
        if unloaded_s is None:
            return  # the window went to learning how fast the sink is unloaded
        ratio = typical_s / unloaded_s if unloaded_s > 0 else 1.0
        # Little's law at the sink: stores/s times the unloaded latency is how many calls it
        # served at once. Not limit / ratio: calls queued at an earlier, higher limit inflate
        # the ratio of the window that shrinks, and the capacity would read low.
        served = count / wall_s * unloaded_s if wall_s > 0 else self.limit / ratio
        self._decide(*self._next_limit(ratio, saturated, overloaded, served))

    def _learn_unloaded(
        self, typical_s: float, fastest_s: float, early: bool, ours: bool
    ) -> float | None:
        """The unloaded latency this window teaches; None when it decided the limit itself."""
        if self._probing:
            if self._busiest > 1:
                self._decide(1, "probe")  # stores started before the probe are still ending
                return None
            self._probing = False
            self.unloaded_s = typical_s
        elif ours:
            # Our event loop was the queue, so the latency says little about the sink. A window
            # whose stores queued behind each other (early) must not set the unloaded latency
            # (a burst that started on a busy machine would set it high); its fastest store
            # still lets the next window see the queue. One that did not queue may lower it:
            # on a busy box every healthy window is ours, and a capacity drop must find it set.
            if not early:
                known = self.unloaded_s
                self.unloaded_s = typical_s if known is None else min(known, typical_s)
            elif self.unloaded_s is None:
                self._fastest_s = min(self._fastest_s, fastest_s)
            self._decide(min(self.maximum, self.limit * 2), "own_cpu")
            return None
        elif self.unloaded_s is None:
            if early:
                # The first stores queued behind each other: how fast the sink is unloaded is
                # unknown (a server that interleaves calls answers even the first one late),
                # so measure it: one store at a time until a window ran wholly alone.
                self._probing = True
                self._decide(1, "probe")
                return None
            self.unloaded_s = typical_s
        elif self._busiest == 1:
            self.unloaded_s = typical_s  # every store in the window ran alone
        else:
            self.unloaded_s = min(self.unloaded_s, typical_s)
        return self.unloaded_s

    def _next_limit(
        self, ratio: float, saturated: bool, overloaded: bool, served: float
    ) -> tuple[int, str]:
        """The limit for the next window and why, from the latency ratio and the signals."""
        limit = self.limit
        good = ratio < self._grow_below and saturated and not overloaded
        self._good_windows = self._good_windows + 1 if good else 0
        if overloaded:
            return limit // 2, "overload"
        if ratio > self._shrink_above:
            shrunk = max(1, math.floor(limit * max(0.5, self._shrink_above / ratio)))
            if shrunk < limit:
                # Latency was too high here: come back only with evidence of more capacity.
                self._ceiling, self._capacity = limit, served
            return shrunk, "latency"
        if good:
            return self._grown(limit, ratio), "headroom"
        return limit, "steady"

    def _grown(self, limit: int, ratio: float) -> int:
        """A larger limit: doubled while latency is flat and no ceiling holds, else a quarter."""
        flat = ratio < self._flat_below
        ceiling = self._ceiling
        # Flat latency at a quarter above what the sink served at the ceiling, or a long
        # run of good windows: the capacity is back. Flat below that says nothing: one
        # call at a time is flat on a sink that serves one call at a time.
        more = flat and limit >= 1.25 * self._capacity + 1
        if ceiling is not None and (more or self._good_windows >= self._patience):
            ceiling = self._ceiling = None
        grown = limit * 2 if flat and ceiling is None else limit + max(1, limit // 4)
        if ceiling is not None and grown >= ceiling:
            if flat and limit >= 4 and limit >= ceiling - 1:
                # Flat right under the ceiling with four or more running: a quarter step above
                # costs at most a quarter more latency, so take it (the ceiling moves up with
                # it) rather than wait out the patience; what the sink serves once it has
                # room again then shows as flat latency well above the old capacity.
                self._ceiling = grown + 1
            else:
                grown = max(limit, ceiling - 1)
        return grown

    def _decide(self, limit: int, why: str) -> None:
        limit = max(1, min(limit, self.maximum))
        if limit != self.limit:
            self.limit = limit
            if self._on_change is not None:
                self._on_change(limit, why)
        self._reset_window()
