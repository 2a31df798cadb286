"""The adaptive scenario's capacity drop: the sink's capacity falls, then comes back."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from loadtest import report
from loadtest.common import percentiles
from loadtest.context import Bench, RunSpec
from loadtest.scenario import (
    Options,
    say,
    sweep,
)
from loadtest.scenarios.adaptive_stats import (
    ADAPTIVE_MAX,
    DROP_CAPACITY,
    first_time,
    latency_figures,
    limit_figures,
)


async def capacity_drop_runs(bench: Bench, opt: Options) -> list[dict[str, Any]]:
    """50 ms, no cap → capacity 5 for a while → no cap: fixed c = 50, then memory-worker."""
    drop_s = opt.pick(10.0, 4.0)
    results = []
    # (label, adaptive, healthy s before the drop, s after it): adaptive needs time to climb.
    for label, adaptive, before_s, after_s in (
        (f"drop fixed c={ADAPTIVE_MAX}", False, opt.pick(4.0, 3.0), opt.pick(4.0, 3.0)),
        (
            f"drop memory-worker ≤{ADAPTIVE_MAX} (committed settings)",
            None,
            opt.pick(10.0, 6.0),
            opt.pick(25.0, 8.0),
        ),
    ):
        total_s = before_s + drop_s + after_s
        ideal = ADAPTIVE_MAX / 0.05
        # Enough that the backlog outlasts the run even at the ideal rate; the rest stays queued.
        items = int(ideal * (before_s + after_s) + DROP_CAPACITY / 0.05 * drop_s + 1000)
        spec = RunSpec(
            label,
            ADAPTIVE_MAX,
            latency_ms=50.0,
            adaptive=adaptive,
            items=items,
            capacity_changes=((before_s, DROP_CAPACITY), (before_s + drop_s, None)),
            stop_after_s=total_s,
            watch_limit_s=0.1,
            store_latency=True,
            rss_every_s=0.0,
            max_s=total_s + 30,
        )
        [r] = await sweep(bench, [spec], retries=0)
        results.append(r)
        r["drop"] = _drop_figures(r, before_s, drop_s, total_s)
        d = r["drop"]
        say(
            bench,
            f"  {label}: reached {ADAPTIVE_MAX} after {report.fmt(d['reached_max_s'])} s; "
            f"< {2 * DROP_CAPACITY} {report.fmt(d['fell_s'])} s after the drop; back at "
            f"{ADAPTIVE_MAX} {report.fmt(d['recovered_s'])} s after; p95 in the drop "
            f"{d['during']['p95_ms']:.0f} ms",
        )
    return results


def _drop_figures(
    r: dict[str, Any], before_s: float, drop_s: float, total_s: float
) -> dict[str, Any]:
    """How the limit and store latency followed the capacity drop of one run."""
    applied = dict((cap, t) for t, cap in r["capacity_changes"])
    t_drop = applied.get(DROP_CAPACITY, before_s)
    t_back = applied.get(None, before_s + drop_s)
    limits, rows = r["limit_timeline"], r["store_latency"]
    full = ADAPTIVE_MAX

    def rate(lo: float, hi: float) -> float:
        return sum(lo <= t < hi for t, _ in rows) / (hi - lo) if hi > lo else float("nan")

    during = limit_figures(limits, t_drop, t_back)
    after = [(t, v) for t, v in limits if t_back <= t <= total_s]
    climb = None
    if after:
        top = max(v for _, v in after)
        t_top = next(t for t, v in after if v == top)
        # From the lowest point after the lift to the first time at the highest.
        low_t, low = min(((t, v) for t, v in after if t <= t_top), key=lambda x: x[1])
        climb = (top - low) / (t_top - low_t) if t_top > low_t else None
    return {
        "t_drop_s": t_drop,
        "t_back_s": t_back,
        "t_end_s": total_s,
        "reached_max_s": first_time(limits, 0.0, lambda v: v >= full),
        "fell_s": first_time(limits, t_drop, lambda v: v < 2 * DROP_CAPACITY),
        "recovered_s": first_time(limits, t_back, lambda v: v >= full),
        "limit_during": during,
        "limit_after_max": limit_figures(limits, t_back, total_s)["max"],
        "climb_per_s": climb,
        "healthy": latency_figures(rows, max(0.0, t_drop - 3.0), t_drop),
        "during": latency_figures(rows, t_drop, t_back),
        "during_second_half": latency_figures(rows, (t_drop + t_back) / 2, t_back),
        "after": latency_figures(rows, t_back, total_s),
        "items_per_s_healthy": rate(max(0.0, t_drop - 3.0), t_drop),
        "items_per_s_during": rate(t_drop, t_back),
        "items_per_s_after": rate(t_back, total_s),
    }


def plot_drop(path: Path, results: Sequence[dict[str, Any]]) -> None:
    """Limit and store latency p95 over time around the drop, fixed against adaptive."""
    series_limit, series_p95 = {}, {}
    for r in results:
        d = r["drop"]
        name = f"fixed c={ADAPTIVE_MAX}" if r["spec"]["adaptive"] is False else "memory-worker"
        t_drop, t_end = d["t_drop_s"], d["t_end_s"]
        series_limit[name] = [(t - t_drop, v) for t, v in r["limit_timeline"] if t <= t_end]
        buckets: dict[int, list[float]] = {}
        for t, ms in r["store_latency"]:
            if t <= t_end:
                buckets.setdefault(math.floor((t - t_drop) / 0.5), []).append(ms)
        series_p95[name] = [
            (b * 0.5 + 0.25, percentiles(v, (95,))[0]) for b, v in sorted(buckets.items())
        ]
    d = results[-1]["drop"]
    report.plot_adaptive(
        path,
        f"50 ms sink, capacity {DROP_CAPACITY} for {d['t_back_s'] - d['t_drop_s']:.0f} s: "
        f"limit and store latency",
        series_limit,
        series_p95,
        (0.0, d["t_back_s"] - d["t_drop_s"]),
    )
