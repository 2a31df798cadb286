"""The adaptive scenario's settings and the figures it draws from a run's timelines."""

from __future__ import annotations

import itertools
import statistics
from collections.abc import Callable, Sequence
from typing import Any

from loadtest.common import percentiles

SERIAL_MS = 22.0  # the real Session-Buddy's ~45 calls/s, one at a time
SERIAL_FIXED = (1, 2, 3, 5, 50)  # fixed limits on a serial sink; 1 is the unloaded run
LATENCY_FROM_S = 3.0  # store latency counts from the third second on: the limit has settled
DROP_CAPACITY = 5
ADAPTIVE_MAX = 50
# The committed settings' maximum (settings/mahavishnu.yaml): the burst a default worker
# sends before the first answers come back.
DEFAULT_MAX = 10


def steady_window(rows: Sequence[tuple[float, float]]) -> tuple[float, float]:
    """The steady part of a drain: the 10th to the 90th percentile of settle times."""
    times = [t for t, _ in rows]
    if len(times) < 10:
        return (times[0], times[-1]) if times else (0.0, 0.0)
    return times[int(len(times) * 0.1)], times[int(len(times) * 0.9) - 1]


def latency_figures(rows: Sequence[tuple[float, float]], lo: float, hi: float) -> dict[str, Any]:
    """p50/p95/p99 of the store latencies of items settled in [lo, hi], and how many."""
    values = [ms for t, ms in rows if lo <= t <= hi]
    p50, p95, p99 = percentiles(values)
    return {"n": len(values), "p50_ms": p50, "p95_ms": p95, "p99_ms": p99}


def limit_figures(timeline: Sequence[tuple[float, int]], lo: float, hi: float) -> dict[str, Any]:
    """Median, range and number of changes of the polled limit within [lo, hi]."""
    values = [v for t, v in timeline if lo <= t <= hi]
    if not values:
        return {"median": None, "min": None, "max": None, "changes": 0}
    changes = sum(a != b for a, b in itertools.pairwise(values))
    return {
        "median": statistics.median(values),
        "min": min(values),
        "max": max(values),
        "changes": changes,
    }


def first_time(
    timeline: Sequence[tuple[float, int]], after: float, hit: Callable[[int], bool]
) -> float | None:
    """Seconds from `after` to the first polled limit at or after it for which `hit` holds."""
    return next((t - after for t, v in timeline if t >= after and hit(v)), None)
