"""Scenario `session-buddy`: the real Session-Buddy, when installed."""

from __future__ import annotations

import re
import shutil
import tempfile
from pathlib import Path

from loadtest import report
from loadtest.context import Bench, RunSpec, Sink
from loadtest.inprocess import fresh_items, inprocess_s
from loadtest.real_sink import SessionBuddyProcess, mcp_tool_text
from loadtest.scenario import (
    Options,
    Outcome,
    say,
    sweep,
)
from loadtest.tables import ledger_target, target


async def scenario_session_buddy(bench: Bench, opt: Options) -> Outcome:
    """The real Session-Buddy, when installed: throughput and latency per concurrency limit."""
    home = opt.session_buddy_home
    if not SessionBuddyProcess.installed(home):
        md = (
            f"## Real Session-Buddy\n\nNot installed in `{home}` (set SESSION_BUDDY_HOME or run "
            "`loadtest/session_buddy/install.sh`): skipped."
        )
        return Outcome({"skipped": True, "home": str(home)}, md, [])
    levels = opt.pick((1, 5, 10, 20), (1, 10))
    state = Path(tempfile.mkdtemp(prefix="bench-sb-"))
    try:
        async with SessionBuddyProcess(home, state, bench.logs / "session-buddy.log") as sb:
            say(bench, f"Session-Buddy up on {sb.url}; warming up (first store is slow)")
            await inprocess_s(sb.url, 1, fresh_items(1), "stream")
            sink = Sink(sb.url, None, sb.pid)
            specs = [
                RunSpec(
                    f"session-buddy c={c}",
                    c,
                    latency_ms=0.0,
                    items=opt.pick(300, 60),
                    paced_s=opt.pick(6.0, 2.0),
                    max_s=120,
                )
                for c in levels
            ]
            results = await sweep(bench, specs, sink)
            stats_text = await mcp_tool_text(sb.url, "reflection_stats", {})
    finally:
        shutil.rmtree(state, ignore_errors=True)
    found = re.search(r"Total reflections:\s*([\d,]+)", stats_text)
    # inprocess_s stores one item to open its session, then the one warm-up item: 2 rows.
    in_server = int(found.group(1).replace(",", "")) - 2 if found else None
    published = sum(r["published_in_all_attempts"] for r in results)
    rows = [
        [
            r["spec"]["concurrency"],
            report.fmt(r["prefilled"]["throughput_items_per_s"], 1),
            report.fmt(r["paced"]["rate_items_per_s"], 1),
            report.fmt(r["paced"]["p50_ms"], 0),
            report.fmt(r["paced"]["p95_ms"], 0),
            report.fmt(r["paced"]["p99_ms"], 0),
            report.fmt(r["prefilled"]["sink_cpu_s_per_1000"], 1),
            report.fmt(r["prefilled"]["worker_cpu_s_per_1000"], 2),
            r["ledger"]["published"],
            r["ledger"]["stored"],
            r["ledger"]["lost"],
        ]
        for r in results
    ]
    report.plot_throughput(
        opt.plots / "session-buddy.png",
        "Real Session-Buddy 0.36.0 on this machine",
        {
            "memory-worker → Session-Buddy": [
                (r["spec"]["concurrency"], r["prefilled"]["throughput_items_per_s"])
                for r in results
            ]
        },
        [],
        "concurrency limit c",
    )
    md = "\n\n".join(
        [
            "## Real Session-Buddy (0.36.0, fresh database, loopback)",
            "Store times come from the worker's `message_settled` log lines (the server cannot "
            "be asked per item); latency is publish → settled as stored, under open-loop load at "
            "70 % of the measured throughput. No ideal line: the server handles one call at a "
            "time, so its own CPU, not the worker's concurrency, sets the ceiling.",
            report.md_table(
                [
                    "c",
                    "items/s",
                    "paced at /s",
                    "p50 ms",
                    "p95 ms",
                    "p99 ms",
                    "server CPU s/1k",
                    "worker CPU s/1k",
                    "published",
                    "stored",
                    "lost",
                ],
                rows,
            ),
            "![session-buddy](docs/bench/session-buddy.png)",
        ]
    )
    md += (
        f"\n\nServer-side check (`reflection_stats` on the fresh database, warm-up rows "
        f"excluded): **{in_server} rows** for {published} items published in all runs."
    )
    count = target(
        "Session-Buddy rows = items published (no loss, no duplicate)",
        f"{published}",
        f"{in_server}",
        in_server == published if in_server is not None else None,
    )
    data = {"runs": results, "reflection_stats": stats_text, "rows_in_server": in_server}
    return Outcome(data, md, [ledger_target(results), count])
