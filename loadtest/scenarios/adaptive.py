"""Scenario `adaptive`: the adaptive limit against fixed ones and the naive peer; capacity drops."""

from __future__ import annotations

import math
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from loadtest.context import Bench, RunSpec, Sink
from loadtest.inprocess import fresh_items, inprocess_s
from loadtest.real_sink import SessionBuddyProcess
from loadtest.scenario import (
    Options,
    Outcome,
    say,
    standin_sink,
    sweep,
)
from loadtest.scenarios.adaptive_stats import (
    ADAPTIVE_MAX,
    DEFAULT_MAX,
    LATENCY_FROM_S,
    SERIAL_FIXED,
    SERIAL_MS,
    latency_figures,
    limit_figures,
    steady_window,
)
from loadtest.scenarios.adaptive_tables import adaptive_md
from loadtest.scenarios.capacity_drop import capacity_drop_runs, plot_drop


async def _compare(
    bench: Bench,
    opt: Options,
    sink: Sink,
    name: str,
    items: int,
    fixed: Sequence[int],
    latency_ms: float = 0.0,
) -> list[dict[str, Any]]:
    """One backlog each: fixed limits (the first is the unloaded run), memory-worker, naive.

    memory-worker runs with the committed settings (adaptive, within [1, 50]); the naive peer
    at c = 50 only on the stand-in, which is what counts its stores.
    """
    capacity = 1 if sink.standin is not None else None
    base = RunSpec(
        "",
        ADAPTIVE_MAX,
        latency_ms=latency_ms,
        items=items,
        capacity=capacity,
        watch_limit_s=0.1,
        store_latency=True,
        rss_every_s=0.0,
        max_s=120.0,
    )
    specs = [
        replace(base, label=f"{name} fixed c={c}", concurrency=c, adaptive=False) for c in fixed
    ]
    specs[0] = replace(specs[0], label=f"{specs[0].label} (unloaded)")
    specs.append(replace(base, label=f"{name} memory-worker ≤{ADAPTIVE_MAX} (committed settings)"))
    specs.append(
        replace(
            base,
            label=f"{name} memory-worker ≤{DEFAULT_MAX} (committed settings, default maximum)",
            concurrency=DEFAULT_MAX,
        )
    )
    if sink.standin is not None:
        specs.append(replace(base, label=f"{name} naive c={ADAPTIVE_MAX}", peer="naive"))
    results = await sweep(bench, specs, sink, retries=1)
    for r in results:
        rows = r["store_latency"]
        lo, hi = steady_window(rows)
        r["steady"] = {
            "window_s": [lo, hi],
            "store_latency": latency_figures(rows, LATENCY_FROM_S, math.inf),
            "limit": limit_figures(r["limit_timeline"], lo, hi),
        }
        lat, lim = r["steady"]["store_latency"], r["steady"]["limit"]
        say(
            bench,
            f"  {r['spec']['label']}: {r['prefilled']['throughput_items_per_s']:.1f} items/s, "
            f"store latency p50/p95/p99 {lat['p50_ms']:.0f}/{lat['p95_ms']:.0f}/"
            f"{lat['p99_ms']:.0f} ms"
            + (
                f", limit median {lim['median']} ({lim['min']}–{lim['max']}, "
                f"{lim['changes']} changes)"
                if lim["median"] is not None
                else ""
            ),
        )
    return results


async def scenario_adaptive(bench: Bench, opt: Options) -> Outcome:
    """memory-worker's adaptive limit against fixed limits and the naive peer; a capacity drop."""
    # Quick runs still need a few seconds past LATENCY_FROM_S at ~45 items/s.
    items = opt.pick(700, 250)
    serial = await _compare(
        bench, opt, standin_sink(bench), "serial stand-in", items, SERIAL_FIXED, SERIAL_MS
    )
    real: list[dict[str, Any]] = []
    real_note = ""
    home = opt.session_buddy_home
    if SessionBuddyProcess.installed(home):
        state = Path(tempfile.mkdtemp(prefix="bench-sb-"))
        try:
            log = bench.logs / "session-buddy-adaptive.log"
            async with SessionBuddyProcess(home, state, log) as sb:
                say(bench, f"Session-Buddy up on {sb.url}; warming up (first store is slow)")
                await inprocess_s(sb.url, 1, fresh_items(1), "stream")
                real = await _compare(
                    bench,
                    opt,
                    Sink(sb.url, None, sb.pid),
                    "session-buddy",
                    opt.pick(600, 250),
                    opt.pick(SERIAL_FIXED, (1, 5, ADAPTIVE_MAX)),
                )
        finally:
            shutil.rmtree(state, ignore_errors=True)
    else:
        real_note = (
            f"Real Session-Buddy not installed in `{home}` (set SESSION_BUDDY_HOME or run "
            "`loadtest/session_buddy/install.sh`): skipped."
        )
        say(bench, real_note)
    drop = await capacity_drop_runs(bench, opt)
    plot_drop(opt.plots / "adaptive.png", drop)
    md, goals = adaptive_md(serial, real, real_note, drop)
    data = {"serial_standin": serial, "session_buddy": real, "capacity_drop": drop}
    return Outcome(data, md, goals)
