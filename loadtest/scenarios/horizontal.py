"""Scenario `horizontal`: several worker processes on one queue, and pairs of each peer."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from loadtest import report
from loadtest.context import Bench, RunSpec
from loadtest.scenario import (
    Options,
    Outcome,
    contender,
    contenders,
    items_for,
    say,
    sweep,
)
from loadtest.tables import ledger_target, ratio, runs_table, target


async def scenario_horizontal(bench: Bench, opt: Options) -> Outcome:
    """1, 2 and 4 worker processes at c = 10, then 2 at c = 50 against two of each peer."""
    seconds = opt.pick(10.0, 2.0)
    specs = [
        RunSpec(
            f"memory-worker W={w} c=10",
            10,
            workers=w,
            items=items_for(w * 200, seconds),
            max_s=120,
        )
        for w in (1, 2, 4)
    ]
    results = await sweep(bench, specs)
    pair = RunSpec("", 50, workers=2, items=items_for(2 * 50 / 0.05, seconds), max_s=120)
    pairs = await sweep(bench, contenders(pair, "W=2 c=50"))
    one = results[0]["prefilled"]["throughput_items_per_s"]
    rows, scaled = [], []
    for r in results:
        w = r["spec"]["workers"]
        tput = r["prefilled"]["throughput_items_per_s"]
        scaled.append((w, tput / (w * one)))
        rows.append(
            [
                w,
                report.fmt(w * one, 0),
                report.fmt(tput, 0),
                f"{tput / (w * one):.2f}",
                report.fmt(r["prefilled"]["efficiency"], 2),
            ]
        )
    report.plot_throughput(
        opt.plots / "scaling.png",
        "Horizontal scaling: W workers × c = 10, 50 ms sink",
        {
            "measured": [
                (r["spec"]["workers"], r["prefilled"]["throughput_items_per_s"]) for r in results
            ],
            "W × one worker": [(w, w * one) for w in (1, 2, 4)],
        },
        [(w, w * 10 / 0.05) for w in (1, 2, 4)],
        "worker processes W",
    )
    worst = min(s for w, s in scaled if w > 1)
    md = "\n\n".join(
        [
            "## Horizontal: W worker processes on one queue (c = 10 each, 50 ms sink)",
            "memory-worker with the committed settings.",
            report.md_table(
                ["W", "W × one worker", "measured items/s", "ratio", "efficiency vs ideal"], rows
            ),
            runs_table(results),
            "### Two processes at c = 50 each: memory-worker and peers",
            f"{pair.items:,} items queued, then two processes of one kind drain them; efficiency "
            "is items/s between the first and the last store ÷ (2 · 50 ÷ 50 ms).",
            report.md_table(PAIR_HEADERS, _pair_rows(bench, pairs)),
            runs_table(pairs),
            "![scaling](docs/bench/scaling.png)",
        ]
    )
    goals = [
        target(
            "W workers ≥ 0.9 × W × one worker",
            "≥ 0.90",
            ", ".join(f"W={w}: {s:.2f}" for w, s in scaled if w > 1),
            worst >= 0.9,
        ),
        ledger_target([*results, *pairs]),
    ]
    return Outcome({"runs": results, "pairs": pairs}, md, goals)


PAIR_HEADERS = ["workers", "ideal items/s", "items/s", "efficiency", "memory-worker ÷ this"]


def _pair_rows(bench: Bench, pairs: Sequence[dict[str, Any]]) -> list[list[str]]:
    """One row per kind of worker pair: throughput, efficiency, memory-worker's ratio to it."""
    own = pairs[0]["prefilled"]["efficiency_first_last"]
    rows = []
    for r in pairs:
        pre = r["prefilled"]
        eff = pre["efficiency_first_last"]
        rows.append(
            [
                f"2 × {contender(r)}",
                report.fmt(pre["ideal_items_per_s"], 0),
                report.fmt(pre["throughput_first_last_items_per_s"], 0),
                report.fmt(eff, 3),
                ratio(own, eff),
            ]
        )
        say(
            bench,
            f"W=2 c=50 {contender(r)}: efficiency {report.fmt(eff, 3)}, "
            f"memory-worker ÷ this {ratio(own, eff)}",
        )
    return rows
