"""Scenario `backlog`: a deep queue drained while the worker's memory is sampled."""

from __future__ import annotations

from loadtest import report
from loadtest.context import Bench, RunSpec
from loadtest.scenario import (
    Options,
    Outcome,
    sweep,
)
from loadtest.tables import ledger_target, runs_table, target


async def scenario_backlog(bench: Bench, opt: Options) -> Outcome:
    """A deep backlog (200,000 items): the worker's memory stays flat while it drains."""
    items = opt.pick(200_000, 20_000)
    spec = RunSpec(
        f"backlog {items:,}",
        50,
        latency_ms=0.0,
        items=items,
        max_s=opt.pick(600, 90),
        rss_every_s=1.0,
    )
    [result] = await sweep(bench, [spec])
    pre = result["prefilled"]
    timeline = result["rss_timeline"]
    report.plot_timeline(
        opt.plots / "backlog-rss.png",
        f"Worker RSS while draining {items:,} queued items (c = 50, 0 ms sink)",
        {"worker RSS (MB)": timeline},
        "MB",
    )
    rss = [v for _, v in timeline]
    md = "\n\n".join(
        [
            f"## Backlog: {items:,} items queued before the worker starts",
            f"Published at {result.get('publish_items_per_s', 0):,.0f} items/s (confirmed). "
            "One worker, c = 50, 0 ms sink. RSS sampled every second.",
            report.md_table(
                [
                    "RSS after start MB",
                    "RSS min / max while draining MB",
                    "peak RSS (VmHWM) MB",
                    "drain s",
                    "items/s",
                ],
                [
                    [
                        report.fmt(pre["rss_after_start_mb"]),
                        f"{min(rss, default=0):.1f} / {max(rss, default=0):.1f}",
                        report.fmt(pre["peak_rss_mb"]),
                        report.fmt(pre["drain_s"]),
                        report.fmt(pre["throughput_items_per_s"], 0),
                    ]
                ],
            ),
            runs_table([result]),
            "![backlog RSS](docs/bench/backlog-rss.png)",
        ]
    )
    goals = [
        target(
            f"peak RSS with {items:,} queued",
            "< 150 MB",
            f"{pre['peak_rss_mb']:.1f} MB",
            pre["peak_rss_mb"] < 150,
        ),
        ledger_target([result]),
    ]
    return Outcome({"run": result}, md, goals)
