"""The markdown every scenario shares: the runs table, the ledger, targets and ratios."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from loadtest import report

RUN_HEADERS = [
    "run",
    "ideal items/s",
    "items/s",
    "efficiency",
    "p50 ms",
    "p95 ms",
    "p99 ms",
    "worker CPU s/1k",
    "stand-in CPU s/1k",
    "broker CPU s/1k",
    "unrelated load, cores",
    "sink peak in flight",
    "peak RSS MB",
    "published",
    "stored",
    "DLQ",
    "queued",
    "lost",
    "dup",
]


def run_row(result: dict[str, Any]) -> list[str]:
    """One row of RUN_HEADERS from a run's result."""
    pre = result.get("prefilled", {})
    paced = result.get("paced", {})
    ledger = result["ledger"]
    f = report.fmt
    return [
        result["spec"]["label"],
        f(pre.get("ideal_items_per_s"), 0),
        f(pre.get("throughput_items_per_s"), 0),
        f(pre.get("efficiency"), 2),
        f(paced.get("p50_ms")),
        f(paced.get("p95_ms")),
        f(paced.get("p99_ms")),
        f(pre.get("worker_cpu_s_per_1000"), 2),
        f(pre.get("sink_cpu_s_per_1000"), 2),
        f(pre.get("broker_cpu_s_per_1000"), 2),
        f(pre.get("unrelated_busy_cores"), 2),
        f(ledger["sink_peak_in_flight"]),
        f(pre.get("peak_rss_mb")),
        f(ledger["published"]),
        f(ledger["stored"]),
        f(ledger["dead_lettered"]),
        f(ledger["queued"]),
        f(ledger["lost"]),
        f(ledger["duplicates"]),
    ]


def runs_table(results: Sequence[dict[str, Any]]) -> str:
    """The common table over several runs."""
    return report.md_table(RUN_HEADERS, [run_row(r) for r in results])


def ledger_table(results: Sequence[dict[str, Any]]) -> str:
    """Only the ledger columns, for runs without a throughput phase."""
    keys = ("published", "stored", "dead_lettered", "queued", "lost", "duplicates")
    rows = [[r["spec"]["label"], *(report.fmt(r["ledger"][k]) for k in keys)] for r in results]
    return report.md_table(["run", "published", "stored", "DLQ", "queued", "lost", "dup"], rows)


def ledger_target(results: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Nothing lost, nothing duplicated, in every run."""
    lost = sum(r["ledger"]["lost"] for r in results)
    dup = sum(r["ledger"]["duplicates"] or 0 for r in results)
    return target("ledger: lost = 0, duplicates = 0", "0 / 0", f"{lost} / {dup}", lost == dup == 0)


def target(name: str, goal: str, measured: str, ok: bool | None) -> dict[str, Any]:
    """One target line."""
    return {"target": name, "goal": goal, "measured": measured, "met": ok}


def targets_md(targets: Sequence[dict[str, Any]]) -> str:
    """Targets as a table."""
    rows = [(t["target"], t["goal"], t["measured"], report.verdict(t["met"])) for t in targets]
    return report.md_table(["target", "goal", "measured", "verdict"], rows)


PACED_NOTE = (
    "Latency is end to end (publish → stored in the sink) under open-loop load at 70 % of the "
    "lower of the ideal and the measured throughput; items/s is the steady drain of a "
    "pre-filled queue (10th–90th percentile of store times)."
)


def ratio(a: float | None, b: float | None) -> str:
    """a ÷ b as a table cell (an em dash when either is missing)."""
    if a is None or b is None or not b or math.isnan(a) or math.isnan(b):
        return "—"
    return f"{a / b:.2f}"
