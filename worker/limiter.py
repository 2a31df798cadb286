"""Adaptive concurrency: a latency-gradient limit within [1, `max_concurrent_memory_insertions`].

The limit moves once per window of completed stores (at least `window`, and at least one per
slot, so a window is about one round trip of every slot):

- the window's mean latency is compared with the *unloaded* latency: the lowest window mean
  since the limit was last 1. A window at limit 1 sets it afresh (nothing of ours was queued
  ahead), and it is never forgotten otherwise: a baseline that expired under sustained load
  would be relearned from loaded latency, and the limit would creep up with the queue;
- below `grow_below` times the unloaded latency, with every slot busy, the limit doubles while
  it is still starting and grows by a quarter (at least one) after, so capacity that comes
  back is found again within a few windows; above `shrink_above` it shrinks in proportion (at
  most by half); in between it holds;
- a window where at least `overload_share` of stores were overload signals (429, 503, a
  timeout) halves the limit whatever the latency;
- a limit that latency pushed back from is a ceiling: the limit grows to it again only when
  latency is flat (below `flat_below` times unloaded: the capacity is back) or after
  `patience` good windows in a row. Without it a sink whose latency at the best limit sits
  just under `grow_below` would be probed one step higher every few windows, and those
  windows set the p95.

A sink that handles one call at a time thus settles near a limit of two (one call running,
one waiting), latency close to unloaded and no throughput lost; a sink with room for every
slot sees flat latency and the limit reaches the maximum.
"""

from __future__ import annotations

import math
from collections.abc import Callable


class AdaptiveLimit:
    """How many stores may run at once, moved by observed latency and overload."""

    def __init__(
        self,
        maximum: int,
        *,
        enabled: bool = True,
        initial: int = 1,
        window: int = 20,
        grow_below: float = 1.7,
        shrink_above: float = 2.0,
        overload_share: float = 0.1,
        flat_below: float = 1.2,
        patience: int = 40,
        on_change: Callable[[int, str], None] | None = None,
    ) -> None:
        self.maximum = maximum
        self.enabled = enabled
        self.limit = max(1, min(initial, maximum)) if enabled else maximum
        self.unloaded_s: float | None = None
        self._window = window
        self._grow_below = grow_below
        self._shrink_above = shrink_above
        self._overload_share = overload_share
        self._on_change = on_change
        self._flat_below = flat_below
        self._patience = patience
        self._ceiling: int | None = None
        self._good_windows = 0
        self._starting = True
        self._reset_window()

    def _reset_window(self) -> None:
        self._count = 0
        self._total_s = 0.0
        self._overloads = 0
        self._busiest = 0
        self._window_limit = self.limit

    def observe(self, latency_s: float, overload: bool, in_flight: int) -> None:
        """Record one finished store: its latency, whether it signalled overload, how many ran."""
        if not self.enabled:
            return
        self._count += 1
        self._total_s += latency_s
        self._overloads += overload
        self._busiest = max(self._busiest, in_flight)
        if self._count >= max(self._window, self._window_limit):
            self._close_window()

    def _close_window(self) -> None:
        mean_s = self._total_s / self._count
        overloaded = self._overloads >= self._overload_share * self._count
        saturated = self._busiest >= self._window_limit
        if self._window_limit == 1 or self.unloaded_s is None:
            self.unloaded_s = mean_s
        else:
            self.unloaded_s = min(self.unloaded_s, mean_s)
        ratio = mean_s / self.unloaded_s if self.unloaded_s > 0 else 1.0
        limit = self.limit
        good = ratio < self._grow_below and saturated and not overloaded
        self._good_windows = self._good_windows + 1 if good else 0
        if overloaded:
            limit, why = limit // 2, "overload"
        elif ratio > self._shrink_above:
            self._ceiling = limit  # latency was too high here: come back only with evidence
            limit, why = math.floor(limit * max(0.5, self._shrink_above / ratio)), "latency"
        elif good:
            limit, why = (limit * 2 if self._starting else limit + max(1, limit // 4)), "headroom"
            if self._ceiling is not None and limit >= self._ceiling:
                if ratio < self._flat_below or self._good_windows >= self._patience:
                    self._ceiling = None
                else:
                    limit = max(self.limit, self._ceiling - 1)
        else:
            why = "steady"
        if why in ("overload", "latency") or ratio >= self._grow_below:
            self._starting = False
        self._set(max(1, min(limit, self.maximum)), why)
        self._reset_window()

    def _set(self, limit: int, why: str) -> None:
        if limit != self.limit:
            self.limit = limit
            if self._on_change is not None:
                self._on_change(limit, why)
