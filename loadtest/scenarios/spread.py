"""Scenario `spread`: log-normal latency (σ = 0.5), streaming against ACT-008's batch-and-wait."""

from __future__ import annotations

import math
from typing import Any

from loadtest import report
from loadtest.context import Bench, RunSpec
from loadtest.inprocess import fresh_items, inprocess_s
from loadtest.scenario import (
    Options,
    Outcome,
    items_for,
    say,
    sweep,
)
from loadtest.tables import ledger_target, runs_table, target

ACT008_SPREAD = {10: 0.49, 50: 0.33}  # the measurement of batch-and-wait at σ = 0.5


async def scenario_spread(bench: Bench, opt: Options) -> Outcome:
    """σ = 0.5 log-normal latency: streaming (library, worker) against ACT-008's batch-and-wait."""
    seconds, sigma = opt.pick(10.0, 2.0), 0.5
    mean_s = 0.05 * math.exp(sigma**2 / 2)
    rows: list[list[object]] = []
    data: list[dict[str, Any]] = []
    await bench.standin.reset()
    await bench.standin.configure(50.0, sigma, seed=11)
    for c in (10, 50):
        ideal = c / mean_s
        n = items_for(ideal, seconds)
        bw = n / await inprocess_s(bench.standin.url, c, fresh_items(n), "batch_and_wait")
        st = n / await inprocess_s(bench.standin.url, c, fresh_items(n), "stream")
        spec = RunSpec(f"σ=0.5 c={c}", c, sigma=sigma, items=n, paced_s=opt.pick(5.0, 2.0))
        [e2e] = await sweep(bench, [spec])
        await bench.standin.configure(50.0, sigma, seed=11)
        wt = e2e["prefilled"]["throughput_items_per_s"]
        data.append(
            {"concurrency": c, "ideal": ideal, "batch_and_wait": bw, "stream": st, "worker": e2e}
        )
        rows.append(
            [
                c,
                report.fmt(ideal, 0),
                f"{bw:,.0f} ({bw / ideal:.2f})",
                f"{ACT008_SPREAD[c]:.2f}",
                f"{st:,.0f} ({st / ideal:.2f})",
                f"{wt:,.0f} ({wt / ideal:.2f})",
                report.fmt(e2e["paced"]["p50_ms"]),
                report.fmt(e2e["paced"]["p99_ms"]),
            ]
        )
        say(
            bench,
            f"spread c={c}: batch-and-wait {bw / ideal:.2f}, stream {st / ideal:.2f}, "
            f"worker {wt / ideal:.2f}",
        )
    report.plot_throughput(
        opt.plots / "spread.png",
        "σ = 0.5 log-normal, median 50 ms: streaming vs batch-and-wait",
        {
            "ACT-008 batch-and-wait (in process)": [
                (d["concurrency"], d["batch_and_wait"]) for d in data
            ],
            "MemoryInserter (in process)": [(d["concurrency"], d["stream"]) for d in data],
            "memory-worker (end to end)": [
                (d["concurrency"], d["worker"]["prefilled"]["throughput_items_per_s"]) for d in data
            ],
        },
        [(d["concurrency"], d["ideal"]) for d in data],
        "concurrency limit c",
    )
    md = "\n\n".join(
        [
            f"## Latency spread (log-normal σ = 0.5, median 50 ms, mean {mean_s * 1000:.1f} ms)",
            "Ideal = c ÷ mean latency. Cells are items/s (efficiency). Latency columns are the "
            "worker's end to end at 70 % load.",
            report.md_table(
                [
                    "c",
                    "ideal items/s",
                    "batch-and-wait (in process)",
                    "issue's figure",
                    "MemoryInserter stream (in process)",
                    "memory-worker e2e",
                    "p50 ms",
                    "p99 ms",
                ],
                rows,
            ),
            "### Worker runs",
            runs_table([d["worker"] for d in data]),
            "![spread](docs/bench/spread.png)",
        ]
    )
    worst = min(d["worker"]["prefilled"]["efficiency"] for d in data)
    goals = [
        target(
            "efficiency ≥ 0.95 with σ = 0.5 (worker, end to end)",
            "≥ 0.95",
            ", ".join(
                f"c={d['concurrency']}: {d['worker']['prefilled']['efficiency']:.3f}" for d in data
            ),
            worst >= 0.95,
        ),
        ledger_target([d["worker"] for d in data]),
    ]
    return Outcome({"mean_latency_s": mean_s, "levels": data}, md, goals)
