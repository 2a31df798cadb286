"""Scenario `act008`: ACT-008's batch and concurrency tables, in process and end to end."""

from __future__ import annotations

import math
import statistics
from typing import Any

from loadtest import report
from loadtest.context import Bench, RunSpec
from loadtest.inprocess import inprocess_median_s
from loadtest.runs import run_or_raise
from loadtest.scenario import (
    Options,
    Outcome,
    say,
    standin_sink,
)
from loadtest.tables import ledger_table, ledger_target

ACT008_BATCH = {
    10: (0.50, 0.05, 189.0),
    20: (1.00, 0.11, 176.0),
    50: (2.50, 0.26, 189.0),
    100: (5.00, 0.52, 193.0),
}
ACT008_CONCURRENCY = {1: (2.58, 19.4), 5: (0.52, 96.1), 10: (0.26, 189.7), 20: (0.16, 316.2)}


async def scenario_act008(bench: Bench, opt: Options) -> Outcome:
    """ACT-008's two tables at 50 ms: in process through the library, and end to end."""
    sizes = (10, 20, 50, 100)
    levels = (1, 5, 10, 20, 50)
    reps = opt.pick(3, 1)
    await bench.standin.reset()
    await bench.standin.configure(50.0)
    inproc: dict[str, dict[int, float]] = {"seq": {}, "par": {}, "conc": {}}
    task = bench.task("act008: in-process", len(sizes) * 2 + len(levels))
    for size in sizes:
        inproc["seq"][size] = await inprocess_median_s(bench, 1, size, "stream", reps)
        bench.progress.advance(task)
        inproc["par"][size] = await inprocess_median_s(bench, 10, size, "stream", reps)
        bench.progress.advance(task)
    for c in levels:
        inproc["conc"][c] = await inprocess_median_s(bench, c, 50, "stream", reps)
        bench.progress.advance(task)
    bench.done(task)
    e2e: dict[int, dict[int, float]] = {}
    runs = []
    for c in levels:
        batches = sizes if c in (1, 10) else (50,)
        spec = RunSpec(f"act008 e2e c={c}", c, batches=batches, batch_reps=reps, max_s=60)
        result = await run_or_raise(bench, spec, standin_sink(bench))
        runs.append(result)
        by_size: dict[int, list[float]] = {}
        for b in result["batches"]:
            by_size.setdefault(b["size"], []).append(b["time_s"])
        e2e[c] = {s: statistics.median(t) for s, t in by_size.items()}
        say(bench, f"act008 e2e c={c}: " + ", ".join(f"{s}→{t:.3f}s" for s, t in e2e[c].items()))
    md, targets = _act008_md(inproc, e2e, runs, reps)
    data = {"in_process": inproc, "end_to_end": e2e, "runs": runs, "reps": reps}
    return Outcome(data, md, targets)


def _act008_md(
    inproc: dict[str, dict[int, float]],
    e2e: dict[int, dict[int, float]],
    runs: list[dict[str, Any]],
    reps: int,
) -> tuple[str, list[dict[str, Any]]]:
    f = report.fmt
    batch_rows = []
    for size, (a_seq, a_par, a_tput) in ACT008_BATCH.items():
        s, p = inproc["seq"][size], inproc["par"][size]
        es, ep = e2e[1][size], e2e[10][size]
        batch_rows.append(
            [
                size,
                f(s, 2),
                f(p, 3),
                f(s / p, 2) + "x",
                f(size / p, 0),
                f(es, 2),
                f(ep, 3),
                f(es / ep, 2) + "x",
                f(size / ep, 0),
                f"{a_seq:.2f} / {a_par:.2f} / {a_tput:.0f}",
            ]
        )
    conc_rows = []
    for c in (1, 5, 10, 20, 50):
        t_in, t_e2e = inproc["conc"][c], e2e[c][50]
        best_s = math.ceil(50 / c) * 0.05  # rounds of c calls, 50 ms each
        ref = ACT008_CONCURRENCY.get(c)
        conc_rows.append(
            [
                c,
                f(t_in, 3),
                f(50 / t_in, 1),
                f(best_s / t_in, 2),
                f(t_e2e, 3),
                f(50 / t_e2e, 1),
                f(best_s / t_e2e, 2),
                f"{ref[0]:.2f} s / {ref[1]:.1f}" if ref else "—",
            ]
        )
    md = "\n\n".join(
        [
            "## ACT-008's tables (50 ms sink)",
            f"Median of {reps} repetition(s). *In process*: `MemoryInserter.insert_batch` in the "
            "runner against the stand-in (sequential = concurrency 1, parallel = concurrency 10). "
            "*End to end*: the batch is published to an idle `memory-worker run` process through "
            "RabbitMQ and timed from the first publish to the last store in the sink.",
            "### Batch sizes",
            report.md_table(
                [
                    "batch",
                    "in-process sequential s",
                    "parallel s",
                    "speedup",
                    "items/s",
                    "e2e sequential s",
                    "e2e parallel s",
                    "speedup",
                    "items/s",
                    "ACT-008 seq / par s / items/s",
                ],
                batch_rows,
            ),
            "### Concurrency (50 items)",
            "Efficiency here is against the best a 50-item batch can do: ⌈50 ÷ c⌉ rounds of 50 ms.",
            report.md_table(
                [
                    "c",
                    "in-process s",
                    "items/s",
                    "efficiency",
                    "e2e s",
                    "items/s",
                    "efficiency",
                    "ACT-008 s / items/s",
                ],
                conc_rows,
            ),
            "### Runs (end to end)",
            ledger_table(runs),
        ]
    )
    return md, [ledger_target(runs)]
