"""What a scenario is and the helpers scenarios share: options, outcome, sweeps, contenders."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from loadtest.context import Bench, RunSpec, Sink
from loadtest.runs import run_or_raise
from loadtest.workers import PEERS

NOISY_CORES = 0.25  # unrelated CPU load (of 2 cores) above which a run counts as disturbed


@dataclass
class Options:
    """Command-line choices every scenario sees."""

    quick: bool
    out: Path
    plots: Path
    session_buddy_home: Path

    def pick(self, full: Any, quick: Any) -> Any:
        """The full-run or the quick-run value."""
        return quick if self.quick else full


@dataclass
class Outcome:
    """What a scenario hands back: data for JSON, markdown, and targets met or missed."""

    data: dict[str, Any]
    markdown: str
    targets: list[dict[str, Any]] = field(default_factory=list)


Scenario = Callable[[Bench, Options], Awaitable[Outcome]]


def standin_sink(bench: Bench) -> Sink:
    """The stand-in as a run's sink."""
    return Sink(bench.standin.url, bench.standin, bench.standin.pid)


def say(bench: Bench, text: str) -> None:
    """One line above the progress display."""
    bench.progress.console.print(text)


async def sweep(
    bench: Bench, specs: Sequence[RunSpec], sink: Sink | None = None, retries: int | None = None
) -> list[dict[str, Any]]:
    """Run each spec; on a shared machine, rerun a disturbed run and keep the quietest."""
    retries = bench.noisy_retries if retries is None else min(retries, bench.noisy_retries)
    results = []
    for spec in specs:
        attempts: list[dict[str, Any]] = []
        while True:
            result = await run_or_raise(bench, spec, sink or standin_sink(bench))
            attempts.append(result)
            noise = _unrelated(result)
            _say_run(bench, result, noise)
            if noise <= NOISY_CORES or len(attempts) > retries:
                break
            say(bench, f"  {noise:.2f} cores of unrelated load: running {spec.label} again")
        best = min(attempts, key=_unrelated)
        best["unrelated_load_of_attempts"] = [round(_unrelated(a), 3) for a in attempts]
        best["published_in_all_attempts"] = sum(a["ledger"]["published"] for a in attempts)
        results.append(best)
    return results


def _unrelated(result: dict[str, Any]) -> float:
    return float(result.get("prefilled", {}).get("unrelated_busy_cores", 0.0))


def _say_run(bench: Bench, result: dict[str, Any], noise: float) -> None:
    pre, paced = result.get("prefilled", {}), result.get("paced", {})
    eff = pre.get("efficiency")
    say(
        bench,
        (
            f"{result['spec']['label']}: {pre.get('throughput_items_per_s', float('nan')):.0f} "
            "items/s"
            + (f", efficiency {eff:.3f}" if eff else "")
            + f", CPU {pre.get('worker_cpu_s_per_1000', float('nan')):.2f} s/1k"
            + (f", p50/p99 {paced['p50_ms']:.0f}/{paced['p99_ms']:.0f} ms" if paced else "")
            + f", lost {result['ledger']['lost']}, unrelated load {noise:.2f} cores"
        ),
    )


def items_for(spec_ideal: float, seconds: float, floor: int = 100) -> int:
    return max(floor, int(spec_ideal * seconds))


def contenders(spec: RunSpec, label: str, adaptive_off: bool = False) -> list[RunSpec]:
    """`spec` for memory-worker (committed settings), optionally adaptive off, and every peer."""
    specs = [replace(spec, label=f"memory-worker {label}")]
    if adaptive_off:
        specs.append(replace(spec, label=f"memory-worker {label} (adaptive off)", adaptive=False))
    specs += [
        replace(spec, label=f"{peer} {label}", peer=peer, watch_limit_s=0.0) for peer in PEERS
    ]
    return specs


def contender(result: dict[str, Any]) -> str:
    """Which worker a run measured: `memory-worker`, `memory-worker (adaptive off)`, a peer."""
    spec = result["spec"]
    if spec["peer"]:
        return str(spec["peer"])
    return "memory-worker (adaptive off)" if spec["adaptive"] is False else "memory-worker"


CONTENDERS = ("memory-worker", "memory-worker (adaptive off)", *PEERS)
