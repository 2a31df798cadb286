"""Scenario `cpu`: a 0 ms sink, so the worker's own CPU is the limit; a py-spy profile."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from loadtest import report
from loadtest.context import Bench, RunSpec
from loadtest.procs import py_spy
from loadtest.scenario import (
    Options,
    Outcome,
    contender,
    contenders,
    say,
    sweep,
)
from loadtest.tables import PACED_NOTE, ledger_target, ratio, runs_table, target


async def scenario_cpu(bench: Bench, opt: Options) -> Outcome:
    """0 ms sink: items/s and CPU per item of one worker process, plus a py-spy profile."""
    items = 12_000
    base = RunSpec(
        "",
        50,
        latency_ms=0.0,
        items=items,
        paced_s=opt.pick(5.0, 2.0),
        max_s=180,
        watch_limit_s=0.1,
    )
    specs = contenders(base, "0 ms c=50", adaptive_off=True)
    specs += [
        replace(base, label=f"memory-worker 0 ms c={c}", concurrency=c)
        for c in opt.pick((10, 20), ())
    ]
    results = await sweep(bench, specs)
    best = max(r["prefilled"]["throughput_items_per_s"] for r in results if not r["spec"]["peer"])
    versus = _cpu_versus(bench, results)
    profile: dict[str, Any] = {}
    if py_spy():
        seconds = opt.pick(10.0, 3.0)
        spec = RunSpec(
            "memory-worker 0 ms c=50 (py-spy)",
            50,
            latency_ms=0.0,
            items=opt.pick(30_000, 6_000),
            profile_s=seconds,
            max_s=180,
        )
        [prof] = await sweep(bench, [spec])
        if prof.get("profile_path"):
            profile = report.profile_digest(Path(prof["profile_path"]), opt.out / "cpu-profile.txt")
    md_parts = [
        "## CPU-bound: 0 ms sink, one worker process",
        "The stand-in answers at once, so the worker's own CPU (and the broker's and the "
        "stand-in's, on the same 2 cores) is the limit. memory-worker with the committed "
        "settings, with adaptive concurrency off, and the two peers (see the concurrency "
        "sweep), all at c = 50 in the same sweep. Worker CPU per item covers the whole drain; "
        "the limit is memory-worker's `memory_worker_concurrency_limit` gauge, polled every "
        "0.1 s over the drain (its lowest value once it first reached its maximum, too).",
        report.md_table(CPU_HEADERS, versus),
        PACED_NOTE,
        runs_table(results),
    ]
    if profile:
        md_parts += [
            f"### Where the worker's CPU goes (py-spy, {profile['samples']:,} samples)",
            "By stage (each sample counted once, in the first stage it touches):",
            report.md_table(["stage", "% of samples"], profile["by_stage_pct"]),
            "Self time by package:",
            report.md_table(["package", "% of samples"], profile["self_by_package_pct"][:12]),
            "Inclusive time by function:",
            report.md_table(
                ["function", "% of samples"], profile["inclusive_by_function_pct"][:25]
            ),
            "Self time by function:",
            report.md_table(["function", "% of samples"], profile["self_by_function_pct"][:20]),
        ]
    goals = [
        target(
            "one worker, 0 ms sink, end to end over MCP (memory-worker)",
            "≥ 2,000 items/s",
            f"{best:,.0f} items/s",
            best >= 2000,
        ),
        ledger_target(results),
    ]
    data = {"runs": results, "versus": versus, "profile": profile}
    return Outcome(data, "\n\n".join(md_parts), goals)


CPU_HEADERS = [
    "worker",
    "items/s",
    "÷ naive",
    "worker CPU ms/item",
    "limit: lowest",
    "first at its max after s",
    "lowest after that",
    "published",
    "lost",
]


def _cpu_versus(bench: Bench, results: Sequence[dict[str, Any]]) -> list[list[str]]:
    """One row per c = 50 run: items/s, ratio to naive, CPU per item, the limit's lowest."""
    at50 = [r for r in results if r["spec"]["concurrency"] == 50]
    naive = next(r for r in at50 if r["spec"]["peer"] == "naive")
    floor = naive["prefilled"]["throughput_items_per_s"]
    rows = []
    for r in at50:
        pre, spec = r["prefilled"], r["spec"]
        limits = [(t, v) for t, v in r.get("limit_timeline", []) if t <= pre["drain_s"]]
        top = spec["concurrency"]
        at_max = next((t for t, v in limits if v >= top), None)
        lowest = min((v for _, v in limits), default=None)
        after = min((v for t, v in limits if at_max is not None and t >= at_max), default=None)
        rows.append(
            [
                contender(r),
                report.fmt(pre["throughput_items_per_s"], 0),
                ratio(pre["throughput_items_per_s"], floor),
                report.fmt(pre["worker_cpu_s_per_1000"], 3),
                report.fmt(lowest),
                report.fmt(at_max, 1) if limits else "—",
                report.fmt(after),
                report.fmt(r["ledger"]["published"]),
                report.fmt(r["ledger"]["lost"]),
            ]
        )
        say(
            bench,
            f"0 ms c=50 {contender(r)}: {pre['throughput_items_per_s']:.0f} items/s "
            f"({rows[-1][2]} × naive), {pre['worker_cpu_s_per_1000']:.3f} ms CPU/item"
            + (f", limit lowest {lowest}, lowest after reaching {top}: {after}" if limits else ""),
        )
    return rows
