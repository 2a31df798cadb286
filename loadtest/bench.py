"""memory-worker's benchmark: real worker processes, a real RabbitMQ, a stand-in Session-Buddy.

    python -m loadtest.bench all --quick        # every scenario, reduced (< 8 minutes)
    python -m loadtest.bench all                # the full set (< 30 minutes)
    python -m loadtest.bench concurrency cpu    # some scenarios

memory-worker runs with the committed settings unless a row's label says otherwise (e.g.
"adaptive off"); the peers in `loadtest/peers/` (naive, faststream) run beside it in the same
sweep of the concurrency, cpu, horizontal and adaptive scenarios.

Results go to `loadtest/results/<scenario>.{json,md}` (quick: `loadtest/results/quick/`);
plots of a full run to `docs/bench/`. Every run is bounded in items and seconds, uses only
loopback addresses and `bench-<random>` broker names, and deletes its queues when it ends.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # `python loadtest/bench.py` as well as `python -m loadtest.bench`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import httpx
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
)

from loadtest import report
from loadtest.broker import check_item_body, connect
from loadtest.common import COMMITTED_SETTINGS, ROOT, BenchError, machine
from loadtest.context import Bench
from loadtest.procs import StandInProcess, cpu_s_of
from loadtest.real_sink import session_buddy_home
from loadtest.scenario import Options, Scenario, say
from loadtest.scenarios.act008 import scenario_act008
from loadtest.scenarios.adaptive import scenario_adaptive
from loadtest.scenarios.backlog import scenario_backlog
from loadtest.scenarios.concurrency import scenario_concurrency
from loadtest.scenarios.cpu import scenario_cpu
from loadtest.scenarios.horizontal import scenario_horizontal
from loadtest.scenarios.session_buddy import scenario_session_buddy
from loadtest.scenarios.spread import scenario_spread
from loadtest.scenarios.standin import scenario_standin
from loadtest.tables import targets_md
from worker.runner import run

RESULTS = ROOT / "loadtest" / "results"
PLOTS = ROOT / "docs" / "bench"


SCENARIOS: dict[str, Scenario] = {
    "standin": scenario_standin,
    "act008": scenario_act008,
    "concurrency": scenario_concurrency,
    "spread": scenario_spread,
    "cpu": scenario_cpu,
    "horizontal": scenario_horizontal,
    "backlog": scenario_backlog,
    "session-buddy": scenario_session_buddy,
    "adaptive": scenario_adaptive,
}


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """The command line."""
    parser = argparse.ArgumentParser(
        prog="python -m loadtest.bench",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "scenarios",
        nargs="*",
        default=["all"],
        choices=["all", *SCENARIOS],
        metavar="SCENARIO",
        help=f"all (default) or some of: {', '.join(SCENARIOS)}",
    )
    parser.add_argument("--quick", action="store_true", help="reduced sizes: < 8 minutes in all")
    parser.add_argument(
        "--out", type=Path, help="results folder (default loadtest/results[/quick])"
    )
    parser.add_argument(
        "--plots", type=Path, help="plots folder (default docs/bench; quick: --out)"
    )
    parser.add_argument(
        "--log-level",
        default="info",
        choices=["debug", "info", "warning"],
        help="the workers' log level (info logs one line per message)",
    )
    parser.add_argument(
        "--noisy-retries",
        type=int,
        help="reruns of a run disturbed by unrelated CPU load (default 2, quick 0)",
    )
    parser.add_argument("--keep-logs", action="store_true", help="keep worker logs of good runs")
    parser.add_argument("--session-buddy-home", type=Path, default=session_buddy_home())
    return parser.parse_args(argv)


async def amain(args: argparse.Namespace) -> int:
    """Run the chosen scenarios, write their results, print the targets."""
    out = args.out or (RESULTS / "quick" if args.quick else RESULTS)
    plots = args.plots or (out if args.quick else PLOTS)
    logs = out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    opt = Options(args.quick, out, plots, args.session_buddy_home)
    names = list(SCENARIOS) if "all" in args.scenarios else list(dict.fromkeys(args.scenarios))
    console = Console(stderr=True, width=None if sys.stderr.isatty() else 160)
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
    )
    all_targets: list[dict[str, Any]] = []
    started = time.monotonic()
    connection = await connect()
    try:
        async with (
            StandInProcess() as standin,
            httpx.AsyncClient(timeout=10) as http,
        ):
            with Progress(*columns, console=console) as progress:
                bench = Bench(
                    connection,
                    standin,
                    http,
                    progress,
                    logs,
                    args.quick,
                    args.log_level,
                    keep_logs=args.keep_logs,
                    noisy_retries=args.noisy_retries
                    if args.noisy_retries is not None
                    else (0 if args.quick else 2),
                )
                env = {"machine": machine(), "quick": args.quick, "log_level": args.log_level}
                for name in names:
                    t0, cpu0 = time.monotonic(), cpu_s_of(bench.broker)
                    say(bench, f"[bold]{name}[/bold]")
                    outcome = await SCENARIOS[name](bench, opt)
                    outcome.data.update(
                        env,
                        seconds=time.monotonic() - t0,
                        broker_cpu_s=cpu_s_of(bench.broker) - cpu0,
                    )
                    outcome.data["targets"] = outcome.targets
                    md = outcome.markdown
                    if outcome.targets:
                        md += "\n\n### Targets\n\n" + targets_md(outcome.targets)
                    report.write(out, name, outcome.data, md)
                    all_targets += [{**t, "scenario": name} for t in outcome.targets]
                    say(bench, f"{name}: {time.monotonic() - t0:.0f} s → {out / name}.md")
    finally:
        await connection.close()
    summary = targets_md(all_targets)
    if args.quick:
        summary = (
            "Quick mode: small samples, a smoke test; the verdicts are indicative only.\n\n"
            + summary
        )
    (out / "targets.md").write_text(summary + "\n")
    console.print(summary)
    console.print(f"total {time.monotonic() - started:.0f} s; results in {out}, plots in {plots}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: `python -m loadtest.bench`."""
    args = parse_args(argv)
    # The benchmark's own Settings (in-process runs) must not pick up settings/local.yaml.
    os.environ["MEMORY_WORKER_CONFIG"] = str(COMMITTED_SETTINGS)
    os.chdir(ROOT)
    check_item_body()
    with contextlib.suppress(KeyboardInterrupt):
        try:
            return run(amain(args))
        except BenchError as exc:
            print(f"bench: {exc}", file=sys.stderr)
            return 1
    return 130


if __name__ == "__main__":
    sys.exit(main())
