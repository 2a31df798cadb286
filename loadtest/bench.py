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
import asyncio
import contextlib
import itertools
import math
import os
import re
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # `python loadtest/bench.py` as well as `python -m loadtest.bench`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import aiohttp
import httpx
import orjson
import uvloop
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
)

from loadtest import report
from loadtest.broker import check_item_body, connect, item_body
from loadtest.common import COMMITTED_SETTINGS, ROOT, BenchError, machine, percentiles
from loadtest.context import Bench, RunSpec, Sink
from loadtest.procs import StandInProcess, cpu_s_of, py_spy
from loadtest.real_sink import SessionBuddyProcess, mcp_tool_text, session_buddy_home
from loadtest.runs import run_or_raise
from loadtest.workers import PEERS
from worker.models import MemoryItem, item_from_dict
from worker.outcome import Kind
from worker.service import MemoryInserter
from worker.settings import Settings

ACT008_BATCH = {
    10: (0.50, 0.05, 189.0),
    20: (1.00, 0.11, 176.0),
    50: (2.50, 0.26, 189.0),
    100: (5.00, 0.52, 193.0),
}
ACT008_CONCURRENCY = {1: (2.58, 19.4), 5: (0.52, 96.1), 10: (0.26, 189.7), 20: (0.16, 316.2)}
ACT008_SPREAD = {10: 0.49, 50: 0.33}  # the measurement of batch-and-wait at σ = 0.5
LEVELS = (1, 5, 10, 20, 50)
NOISY_CORES = 0.25  # unrelated CPU load (of 2 cores) above which a run counts as disturbed
RESULTS = ROOT / "loadtest" / "results"
PLOTS = ROOT / "docs" / "bench"


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


# --- common table ---------------------------------------------------------------------------

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


# --- in-process (the library API) -----------------------------------------------------------

_seq = 0


def fresh_items(n: int) -> list[MemoryItem]:
    """`n` valid items, unique across the whole benchmark."""
    global _seq
    start, _seq = _seq, _seq + n
    return [item_from_dict(orjson.loads(item_body("inproc", s))) for s in range(start, start + n)]


async def inprocess_s(url: str, concurrency: int, items: list[MemoryItem], mode: str) -> float:
    """Seconds to store `items` through `MemoryInserter` (stream) or ACT-008's batch-and-wait."""
    settings = Settings(
        pools={"max_concurrent_memory_insertions": concurrency, "session_buddy_url": url}
    )
    async with MemoryInserter(settings) as inserter:
        await inserter.insert_batch(fresh_items(1))  # opens the MCP session
        t0 = time.perf_counter()
        if mode == "batch_and_wait":
            outcomes = []
            for i in range(0, len(items), concurrency):
                outcomes += await inserter.insert_batch(items[i : i + concurrency])
        else:
            outcomes = await inserter.insert_batch(items)
        elapsed = time.perf_counter() - t0
    if any(o.kind is not Kind.STORED for o in outcomes):
        raise BenchError(
            f"in-process insert failed: {[o for o in outcomes if o.kind is not Kind.STORED][:3]}"
        )
    return elapsed


async def inprocess_median_s(
    bench: Bench, concurrency: int, size: int, mode: str, reps: int
) -> float:
    """Median over `reps` of `inprocess_s` on fresh items."""
    times = [
        await inprocess_s(bench.standin.url, concurrency, fresh_items(size), mode)
        for _ in range(reps)
    ]
    return statistics.median(times)


# --- scenarios ------------------------------------------------------------------------------


async def scenario_standin(bench: Bench, opt: Options) -> Outcome:
    """The stand-in's capacity (0 ms) and how exact its 50 ms is, under a raw aiohttp client."""
    seconds = opt.pick(8.0, 3.0)
    data = [await _hammer(bench, clients, seconds, 0.0) for clients in (8, 64)]
    data += [await _hammer(bench, clients, seconds, 50.0) for clients in (1, 50)]
    f = report.fmt
    rows = []
    for r in data:
        ideal = r["clients"] / 0.05 if r["latency_ms"] else None
        rows.append(
            [
                f"{r['latency_ms']:g}",
                r["clients"],
                f(r["calls_per_s"], 0),
                f(r["calls_per_s"] / ideal, 3) if ideal else "—",
                f(r["mean_call_ms"], 2),
                f(r["standin_cpu_utilisation"], 2),
                f(r["standin_cpu_us_per_call"], 0),
                f(r["capacity_calls_per_s_one_core"], 0),
                r["peak_in_flight"],
            ]
        )
        say(
            bench,
            f"stand-in {r['latency_ms']:g} ms, {r['clients']} clients: "
            f"{r['calls_per_s']:.0f} calls/s, mean {r['mean_call_ms']:.2f} ms, "
            f"{r['standin_cpu_us_per_call']:.0f} µs CPU/call",
        )
    capacity = min(r["capacity_calls_per_s_one_core"] for r in data if not r["latency_ms"])
    headers = ["service ms", "clients", "calls/s", "efficiency (raw client)", "mean call ms",
               "stand-in CPU (cores)", "stand-in CPU µs/call", "capacity, calls/s on one core",
               "peak in flight"]  # fmt: skip
    md = "\n\n".join(
        [
            "## Stand-in Session-Buddy: capacity and accuracy",
            "A raw aiohttp MCP client (the runner; one session, keep-alive) calls "
            "`store_reflection` on `python -m loadtest.standin` in closed loops for "
            f"{seconds:g} s per row. Capacity is calls per CPU-second of the stand-in: what it "
            "serves with one whole core. The 50 ms rows measure the instrument itself: the "
            "efficiency a client with no overhead of its own gets (timer slack of `asyncio.sleep` "
            "plus loopback HTTP), i.e. the ceiling for the worker's efficiency figures.",
            report.md_table(headers, rows),
        ]
    )
    goal = target(
        "stand-in never the bottleneck",
        "≥ 4,000 calls/s/core (2 × the worker target)",
        f"{capacity:,.0f}",
        capacity >= 4000,
    )
    return Outcome({"runs": data}, md, [goal])


async def _hammer(
    bench: Bench, clients: int, seconds: float, latency_ms: float, sigma: float = 0.0
) -> dict[str, Any]:
    standin = bench.standin
    await standin.reset()
    await standin.configure(latency_ms, sigma)
    headers = {"accept": "application/json, text/event-stream", "content-type": "application/json"}
    init = {
        "jsonrpc": "2.0",
        "id": 0,
        "method": "initialize",
        "params": {
            "protocolVersion": "2025-06-18",
            "capabilities": {},
            "clientInfo": {"name": "bench", "version": "0"},
        },
    }
    calls, busy_s = 0, 0.0
    connector = aiohttp.TCPConnector(limit=clients)
    async with aiohttp.ClientSession(connector=connector) as http:
        async with http.post(standin.url, data=orjson.dumps(init), headers=headers) as r:
            headers["mcp-session-id"] = r.headers["mcp-session-id"]
        note = {"jsonrpc": "2.0", "method": "notifications/initialized"}
        async with http.post(standin.url, data=orjson.dumps(note), headers=headers):
            pass
        stop_at = time.monotonic() + seconds

        async def loop(client: int) -> None:
            nonlocal calls, busy_s
            n = 0
            while time.monotonic() < stop_at:
                args = {
                    "content": f"capacity probe {client}-{n}",
                    "tags": ["bench"],
                    "source_session_id": f"cap-{client}-{n}",
                }
                body = {
                    "jsonrpc": "2.0",
                    "id": n,
                    "method": "tools/call",
                    "params": {"name": "store_reflection", "arguments": args},
                }
                t0 = time.monotonic()
                async with http.post(standin.url, data=orjson.dumps(body), headers=headers) as r:
                    text = await r.read()
                    if b"stored successfully" not in text:
                        raise BenchError(f"stand-in refused a probe: {text[:200]!r}")
                busy_s += time.monotonic() - t0
                n += 1
                calls += 1

        cpu0, t0 = standin.cpu_s(), time.monotonic()
        await asyncio.gather(*(loop(i) for i in range(clients)))
        cpu, elapsed = standin.cpu_s() - cpu0, time.monotonic() - t0
    stats = await standin.stats()
    return {
        "clients": clients,
        "latency_ms": latency_ms,
        "seconds": elapsed,
        "calls": calls,
        "calls_per_s": calls / elapsed,
        "mean_call_ms": busy_s / calls * 1000,
        "standin_cpu_utilisation": cpu / elapsed,
        "standin_cpu_us_per_call": cpu / calls * 1e6,
        "capacity_calls_per_s_one_core": calls / cpu if cpu else float("nan"),
        "peak_in_flight": stats["peak_in_flight"],
    }


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


async def _sweep(
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


def _items_for(spec_ideal: float, seconds: float, floor: int = 100) -> int:
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


def ratio(a: float | None, b: float | None) -> str:
    """a ÷ b as a table cell (an em dash when either is missing)."""
    if a is None or b is None or not b or math.isnan(a) or math.isnan(b):
        return "—"
    return f"{a / b:.2f}"


CONTENDERS = ("memory-worker", "memory-worker (adaptive off)", *PEERS)
CONCURRENCY_SIGMA = 0.2
CONCURRENCY_NOTE = (
    "**memory-worker** runs with the committed settings (adaptive concurrency on, limit within "
    "[1, c]); the *adaptive off* column sets `pools.adaptive_concurrency: false` (a fixed limit "
    "of c). **naive** is `loadtest/peers/naive.py` (aio-pika + aiohttp, prefetch = semaphore = "
    "c, the floor), **faststream** is `loadtest/peers/faststream_peer.py` (FastStream's "
    "defaults, prefetch = c); both make the same MCP calls to the same stand-in in the same "
    "sweep. 25 · c items are queued before each worker starts; efficiency is the issue's: "
    "items/s between the first and the last store ÷ (c ÷ mean latency)."
)


async def scenario_concurrency(bench: Bench, opt: Options) -> Outcome:
    """Efficiency per concurrency limit at 50 ms (σ 0.2): memory-worker against its peers."""
    sigma = CONCURRENCY_SIGMA
    base = RunSpec("", 1, sigma=sigma, paced_s=opt.pick(5.0, 0.0), max_s=120)
    specs = [
        spec
        for c in LEVELS
        for spec in contenders(replace(base, concurrency=c, items=25 * c), f"c={c}", True)
    ]
    results = await _sweep(bench, specs)
    by = {(r["spec"]["concurrency"], contender(r)): r for r in results}
    # The instrument's ceiling: a raw aiohttp client with no work of its own, same c, same sink.
    ceiling = {c: await _hammer(bench, c, opt.pick(5.0, 1.5), 50.0, sigma) for c in LEVELS}
    mean_s = base.mean_latency_s

    def eff(c: int, who: str) -> float | None:
        value = by[(c, who)]["prefilled"]["efficiency_first_last"]
        return float(value) if value is not None else None

    rows = []
    for c in LEVELS:
        mw, naive, fs = eff(c, "memory-worker"), eff(c, "naive"), eff(c, "faststream")
        raw = ceiling[c]["calls_per_s"] / (c / mean_s)
        rows.append(
            [c, report.fmt(c / mean_s, 0)]
            + [report.fmt(eff(c, who), 3) for who in CONTENDERS]
            + [ratio(mw, naive), ratio(mw, fs), f"{raw:.3f}"]
        )
        say(
            bench,
            f"c={c} efficiency: "
            + " · ".join(f"{who} {report.fmt(eff(c, who), 3)}" for who in CONTENDERS)
            + f"; memory-worker ÷ naive {ratio(mw, naive)}, ÷ faststream {ratio(mw, fs)}"
            + f"; raw client {raw:.3f}",
        )
    report.plot_throughput(
        opt.plots / "concurrency.png",
        f"One worker, 50 ms sink (σ {sigma:g}): throughput against the ideal c ÷ mean latency",
        {
            **{
                who: [
                    (c, by[(c, who)]["prefilled"]["throughput_first_last_items_per_s"])
                    for c in LEVELS
                ]
                for who in CONTENDERS
            },
            "raw aiohttp client (instrument ceiling)": [
                (c, ceiling[c]["calls_per_s"]) for c in LEVELS
            ],
        },
        [(c, c / mean_s) for c in LEVELS],
        "concurrency limit c",
    )
    own = [by[(c, "memory-worker")] for c in LEVELS]
    if all(r.get("paced") for r in own):
        report.plot_latency(
            opt.plots / "latency.png",
            "memory-worker: end-to-end latency per concurrency (50 ms sink, 70 % load)",
            [
                (f"c={c}", *(r["paced"][k] for k in ("p50_ms", "p95_ms", "p99_ms")))
                for c, r in zip(LEVELS, own, strict=True)
            ],
        )
    md = "\n\n".join(
        [
            f"## Concurrency sweep (50 ms sink, σ {sigma:g}, one worker): memory-worker and peers",
            CONCURRENCY_NOTE,
            "The raw client is a bare aiohttp loop in the runner, with no broker and no work of "
            "its own, at the same concurrency against the same stand-in: what any client can "
            "reach on this machine.",
            report.md_table(
                [
                    "c",
                    "ideal items/s",
                    *(f"{who} efficiency" for who in CONTENDERS),
                    "memory-worker ÷ naive",
                    "memory-worker ÷ faststream",
                    "raw-client efficiency",
                ],
                rows,
            ),
            "### Runs",
            ("" if opt.quick else PACED_NOTE + " ")
            + "The efficiency column here is the steady one (10th–90th percentile).",
            runs_table(results),
            "![throughput per concurrency](docs/bench/concurrency.png)\n"
            "![latency per concurrency](docs/bench/latency.png)",
        ]
    )
    effs = [(c, eff(c, "memory-worker")) for c in LEVELS]
    goals = [
        target(
            "efficiency ≥ 0.95 for every c in 1..50 at 50 ms (memory-worker, committed settings)",
            "≥ 0.95",
            ", ".join(f"c={c}: {report.fmt(e, 3)}" for c, e in effs),
            all(e is not None and e >= 0.95 for _, e in effs),
        ),
        ledger_target(results),
    ]
    return Outcome({"runs": results, "raw_client": ceiling}, md, goals)


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
        n = _items_for(ideal, seconds)
        bw = n / await inprocess_s(bench.standin.url, c, fresh_items(n), "batch_and_wait")
        st = n / await inprocess_s(bench.standin.url, c, fresh_items(n), "stream")
        spec = RunSpec(f"σ=0.5 c={c}", c, sigma=sigma, items=n, paced_s=opt.pick(5.0, 2.0))
        [e2e] = await _sweep(bench, [spec])
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
    results = await _sweep(bench, specs)
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
        [prof] = await _sweep(bench, [spec])
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


async def scenario_horizontal(bench: Bench, opt: Options) -> Outcome:
    """1, 2 and 4 worker processes at c = 10, then 2 at c = 50 against two of each peer."""
    seconds = opt.pick(10.0, 2.0)
    specs = [
        RunSpec(
            f"memory-worker W={w} c=10",
            10,
            workers=w,
            items=_items_for(w * 200, seconds),
            max_s=120,
        )
        for w in (1, 2, 4)
    ]
    results = await _sweep(bench, specs)
    pair = RunSpec("", 50, workers=2, items=_items_for(2 * 50 / 0.05, seconds), max_s=120)
    pairs = await _sweep(bench, contenders(pair, "W=2 c=50"))
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
    [result] = await _sweep(bench, [spec])
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
            results = await _sweep(bench, specs, sink)
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


# --- adaptive concurrency -------------------------------------------------------------------

SERIAL_MS = 22.0  # the real Session-Buddy's ~45 calls/s, one at a time
SERIAL_FIXED = (1, 2, 3, 5, 50)  # fixed limits on a serial sink; 1 is the unloaded run
LATENCY_FROM_S = 3.0  # store latency counts from the third second on: the limit has settled
DROP_CAPACITY = 5
ADAPTIVE_MAX = 50


def _window(rows: Sequence[tuple[float, float]]) -> tuple[float, float]:
    """The steady part of a drain: the 10th to the 90th percentile of settle times."""
    times = [t for t, _ in rows]
    if len(times) < 10:
        return (times[0], times[-1]) if times else (0.0, 0.0)
    return times[int(len(times) * 0.1)], times[int(len(times) * 0.9) - 1]


def _store_latency(rows: Sequence[tuple[float, float]], lo: float, hi: float) -> dict[str, Any]:
    """p50/p95/p99 of the store latencies of items settled in [lo, hi], and how many."""
    values = [ms for t, ms in rows if lo <= t <= hi]
    p50, p95, p99 = percentiles(values)
    return {"n": len(values), "p50_ms": p50, "p95_ms": p95, "p99_ms": p99}


def _limits(timeline: Sequence[tuple[float, int]], lo: float, hi: float) -> dict[str, Any]:
    """Median, range and number of changes of the polled limit within [lo, hi]."""
    values = [v for t, v in timeline if lo <= t <= hi]
    if not values:
        return {"median": None, "min": None, "max": None, "changes": 0}
    changes = sum(a != b for a, b in itertools.pairwise(values))
    return {
        "median": statistics.median(values),
        "min": min(values),
        "max": max(values),
        "changes": changes,
    }


def _first(
    timeline: Sequence[tuple[float, int]], after: float, hit: Callable[[int], bool]
) -> float | None:
    """Seconds from `after` to the first polled limit at or after it for which `hit` holds."""
    return next((t - after for t, v in timeline if t >= after and hit(v)), None)


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
    if sink.standin is not None:
        specs.append(replace(base, label=f"{name} naive c={ADAPTIVE_MAX}", peer="naive"))
    results = await _sweep(bench, specs, sink, retries=1)
    for r in results:
        rows = r["store_latency"]
        lo, hi = _window(rows)
        r["steady"] = {
            "window_s": [lo, hi],
            "store_latency": _store_latency(rows, LATENCY_FROM_S, math.inf),
            "limit": _limits(r["limit_timeline"], lo, hi),
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


def _best_fixed(results: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The fixed-limit run with the highest throughput."""
    fixed = [r for r in results if r["spec"]["adaptive"] is False]
    return max(fixed, key=lambda r: r["prefilled"]["throughput_items_per_s"])


def _compare_rows(results: Sequence[dict[str, Any]]) -> list[list[str]]:
    """One table row per run of `_compare`: throughput, store latency, limit, ledger."""
    f = report.fmt
    unloaded = results[0]["steady"]["store_latency"]
    best = _best_fixed(results)["prefilled"]["throughput_items_per_s"]
    rows = []
    for r in results:
        tput = r["prefilled"]["throughput_items_per_s"]
        lat, lim, ledger = r["steady"]["store_latency"], r["steady"]["limit"], r["ledger"]
        rows.append(
            [
                r["spec"]["label"],
                f(tput, 1),
                ratio(tput, best),
                f(lat["p50_ms"]),
                f(lat["p95_ms"]),
                f(lat["p99_ms"]),
                ratio(lat["p95_ms"], unloaded["p50_ms"]),
                ratio(lat["p95_ms"], unloaded["p95_ms"]),
                f"{f(lim['median'], 0)} ({f(lim['min'])}–{f(lim['max'])})",
                f(lim["changes"]) if lim["median"] is not None else "—",
                f(r["prefilled"]["unrelated_busy_cores"], 2),
                f(ledger["published"]),
                f(ledger["stored"]),
                f(ledger["dead_lettered"]),
                f(ledger["queued"]),
                f(ledger["lost"]),
                f(ledger["duplicates"]),
            ]
        )
    return rows


COMPARE_HEADERS = [
    "run",
    "items/s",
    "÷ best fixed",
    "store p50 ms",
    "p95 ms",
    "p99 ms",
    "p95 ÷ unloaded p50",
    "p95 ÷ unloaded p95",
    "limit: median (min–max)",
    "limit changes",
    "unrelated load, cores",
    "published",
    "stored",
    "DLQ",
    "queued",
    "lost",
    "dup",
]


def _compare_targets(sink: str, results: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """memory-worker against the best fixed limit: throughput kept, p95 near unloaded."""
    unloaded = results[0]["steady"]["store_latency"]["p95_ms"]
    best = _best_fixed(results)
    own = next(r for r in results if r["spec"]["adaptive"] is None and not r["spec"]["peer"])
    others = [r for r in results if r is not own and r["spec"]["concurrency"] == ADAPTIVE_MAX]
    tput, best_tput = (r["prefilled"]["throughput_items_per_s"] for r in (own, best))
    p95 = own["steady"]["store_latency"]["p95_ms"]
    return [
        target(
            f"{sink}: memory-worker keeps the throughput of the best fixed limit",
            f"≥ 0.95 × best fixed (c={best['spec']['concurrency']})",
            f"{tput / best_tput:.2f} × ({tput:.1f} vs {best_tput:.1f} items/s)",
            tput >= 0.95 * best_tput,
        ),
        target(
            f"{sink}: memory-worker's p95 store latency near the unloaded latency",
            f"≤ 2 × unloaded p95 ({2 * unloaded:.0f} ms)",
            f"{p95:.0f} ms = {p95 / unloaded:.2f} × ("
            + ", ".join(
                f"{contender(r)} c={r['spec']['concurrency']}: "
                f"{r['steady']['store_latency']['p95_ms']:.0f} ms"
                for r in others
            )
            + ")",
            p95 <= 2 * unloaded,
        ),
    ]


async def _capacity_drop(bench: Bench, opt: Options) -> list[dict[str, Any]]:
    """50 ms, no cap → capacity 5 for a while → no cap: fixed c = 50, then memory-worker."""
    drop_s = opt.pick(10.0, 4.0)
    results = []
    # (label, adaptive, healthy s before the drop, s after it): adaptive needs time to climb.
    for label, adaptive, before_s, after_s in (
        (f"drop fixed c={ADAPTIVE_MAX}", False, opt.pick(4.0, 3.0), opt.pick(4.0, 3.0)),
        (
            f"drop memory-worker ≤{ADAPTIVE_MAX} (committed settings)",
            None,
            opt.pick(10.0, 6.0),
            opt.pick(25.0, 8.0),
        ),
    ):
        total_s = before_s + drop_s + after_s
        ideal = ADAPTIVE_MAX / 0.05
        # Enough that the backlog outlasts the run even at the ideal rate; the rest stays queued.
        items = int(ideal * (before_s + after_s) + DROP_CAPACITY / 0.05 * drop_s + 1000)
        spec = RunSpec(
            label,
            ADAPTIVE_MAX,
            latency_ms=50.0,
            adaptive=adaptive,
            items=items,
            capacity_changes=((before_s, DROP_CAPACITY), (before_s + drop_s, None)),
            stop_after_s=total_s,
            watch_limit_s=0.1,
            store_latency=True,
            rss_every_s=0.0,
            max_s=total_s + 30,
        )
        [r] = await _sweep(bench, [spec], retries=0)
        results.append(r)
        r["drop"] = _drop_figures(r, before_s, drop_s, total_s)
        d = r["drop"]
        say(
            bench,
            f"  {label}: reached {ADAPTIVE_MAX} after {report.fmt(d['reached_max_s'])} s; "
            f"< {2 * DROP_CAPACITY} {report.fmt(d['fell_s'])} s after the drop; back at "
            f"{ADAPTIVE_MAX} {report.fmt(d['recovered_s'])} s after; p95 in the drop "
            f"{d['during']['p95_ms']:.0f} ms",
        )
    return results


def _drop_figures(
    r: dict[str, Any], before_s: float, drop_s: float, total_s: float
) -> dict[str, Any]:
    """How the limit and store latency followed the capacity drop of one run."""
    applied = dict((cap, t) for t, cap in r["capacity_changes"])
    t_drop = applied.get(DROP_CAPACITY, before_s)
    t_back = applied.get(None, before_s + drop_s)
    limits, rows = r["limit_timeline"], r["store_latency"]
    full = ADAPTIVE_MAX

    def rate(lo: float, hi: float) -> float:
        return sum(lo <= t < hi for t, _ in rows) / (hi - lo) if hi > lo else float("nan")

    during = _limits(limits, t_drop, t_back)
    after = [(t, v) for t, v in limits if t_back <= t <= total_s]
    climb = None
    if after:
        top = max(v for _, v in after)
        t_top = next(t for t, v in after if v == top)
        # From the lowest point after the lift to the first time at the highest.
        low_t, low = min(((t, v) for t, v in after if t <= t_top), key=lambda x: x[1])
        climb = (top - low) / (t_top - low_t) if t_top > low_t else None
    return {
        "t_drop_s": t_drop,
        "t_back_s": t_back,
        "t_end_s": total_s,
        "reached_max_s": _first(limits, 0.0, lambda v: v >= full),
        "fell_s": _first(limits, t_drop, lambda v: v < 2 * DROP_CAPACITY),
        "recovered_s": _first(limits, t_back, lambda v: v >= full),
        "limit_during": during,
        "limit_after_max": _limits(limits, t_back, total_s)["max"],
        "climb_per_s": climb,
        "healthy": _store_latency(rows, max(0.0, t_drop - 3.0), t_drop),
        "during": _store_latency(rows, t_drop, t_back),
        "during_second_half": _store_latency(rows, (t_drop + t_back) / 2, t_back),
        "after": _store_latency(rows, t_back, total_s),
        "items_per_s_healthy": rate(max(0.0, t_drop - 3.0), t_drop),
        "items_per_s_during": rate(t_drop, t_back),
        "items_per_s_after": rate(t_back, total_s),
    }


def _plot_drop(path: Path, results: Sequence[dict[str, Any]]) -> None:
    """Limit and store latency p95 over time around the drop, fixed against adaptive."""
    series_limit, series_p95 = {}, {}
    for r in results:
        d = r["drop"]
        name = f"fixed c={ADAPTIVE_MAX}" if r["spec"]["adaptive"] is False else "memory-worker"
        t_drop, t_end = d["t_drop_s"], d["t_end_s"]
        series_limit[name] = [(t - t_drop, v) for t, v in r["limit_timeline"] if t <= t_end]
        buckets: dict[int, list[float]] = {}
        for t, ms in r["store_latency"]:
            if t <= t_end:
                buckets.setdefault(math.floor((t - t_drop) / 0.5), []).append(ms)
        series_p95[name] = [
            (b * 0.5 + 0.25, percentiles(v, (95,))[0]) for b, v in sorted(buckets.items())
        ]
    d = results[-1]["drop"]
    report.plot_adaptive(
        path,
        f"50 ms sink, capacity {DROP_CAPACITY} for {d['t_back_s'] - d['t_drop_s']:.0f} s: "
        f"limit and store latency",
        series_limit,
        series_p95,
        (0.0, d["t_back_s"] - d["t_drop_s"]),
    )


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
    drop = await _capacity_drop(bench, opt)
    _plot_drop(opt.plots / "adaptive.png", drop)
    md, goals = _adaptive_md(serial, real, real_note, drop)
    data = {"serial_standin": serial, "session_buddy": real, "capacity_drop": drop}
    return Outcome(data, md, goals)


def _adaptive_md(
    serial: list[dict[str, Any]],
    real: list[dict[str, Any]],
    real_note: str,
    drop: list[dict[str, Any]],
) -> tuple[str, list[dict[str, Any]]]:
    f = report.fmt
    parts = [
        "## Adaptive concurrency against fixed limits and the naive peer",
        "memory-worker with the committed settings (adaptive limit within [1, 50]) against "
        "fixed limits (`pools.adaptive_concurrency: false`, labelled *fixed*) and the naive "
        "peer at c = 50, each draining its own backlog. **Store latency** on the stand-in is "
        "from the store call reaching the sink to the row stored (any wait in line inside the "
        "sink plus its service time), the same yardstick for every worker; on the real server "
        "it is each stored item's `latency_s` from memory-worker's `message_settled` log line "
        "(slot taken → settled: the sink call and any wait inside it, not a wait for a slot). "
        f"Latency counts from {LATENCY_FROM_S:g} s after the worker was ready on; "
        "**unloaded** is the fixed c = 1 run of the same sweep. items/s is the steady drain "
        "(10th to 90th percentile of store times) and is compared with the best fixed limit of "
        "the same sweep. The **limit** is memory-worker's `memory_worker_concurrency_limit` "
        "gauge polled on `/metrics` every 100 ms, over the steady part.",
        f"### Serial sink: the stand-in serving one call at a time, {SERIAL_MS:g} ms each",
        f"Like the real Session-Buddy (~45 calls/s, one at a time): `max_concurrency = 1`, "
        f"{SERIAL_MS:g} ms per call, so the ideal is {1000 / SERIAL_MS:.1f} items/s whatever the "
        "limit. A pre-filled backlog per run.",
        report.md_table(COMPARE_HEADERS, _compare_rows(serial)),
        "### Real Session-Buddy (0.36.0, fresh database, loopback)",
    ]
    parts += (
        [
            "The same runs without the peer (its stores cannot be counted there) against the "
            "real server; items/s from memory-worker's log lines.",
            report.md_table(COMPARE_HEADERS, _compare_rows(real)),
        ]
        if real
        else [real_note]
    )
    fixed, adaptive = drop
    df, da = fixed["drop"], adaptive["drop"]
    drop_rows = []
    for r in drop:
        d = r["drop"]
        lim = d["limit_during"]
        moves = r["spec"]["adaptive"] is not False  # a fixed limit never moves: no timings
        drop_rows.append(
            [
                r["spec"]["label"],
                f(d["reached_max_s"] if moves else None),
                f(d["fell_s"] if moves else None),
                f"{lim['min']}–{lim['max']}",
                f(d["recovered_s"] if moves else None),
                f(d["limit_after_max"]),
                f(d["climb_per_s"] if moves else None, 2),
                f(d["items_per_s_healthy"], 0),
                f(d["items_per_s_during"], 0),
                f(d["items_per_s_after"], 0),
                f"{f(d['healthy']['p50_ms'], 0)} / {f(d['healthy']['p95_ms'], 0)}",
                f"{f(d['during']['p50_ms'], 0)} / {f(d['during']['p95_ms'], 0)} / "
                f"{f(d['during']['p99_ms'], 0)}",
                f(d["during_second_half"]["p95_ms"], 0),
                f"{f(d['after']['p50_ms'], 0)} / {f(d['after']['p95_ms'], 0)}",
            ]
        )
    drop_s = da["t_back_s"] - da["t_drop_s"]
    parts += [
        f"### Capacity drop: 50 ms sink, capacity {DROP_CAPACITY} for {drop_s:.0f} s",
        f"The stand-in answers in 50 ms with no cap; {da['t_drop_s']:.0f} s after the worker is "
        f"ready its capacity drops to {DROP_CAPACITY} calls at once (the rest wait in line "
        f"inside it), and {drop_s:.0f} s later the cap is lifted. A backlog larger than the run "
        "can drain keeps every slot busy; what is left stays queued (the `queued` column). "
        'Times are from the polled gauge (±0.1 s); "fell" is the first sample below '
        f"{2 * DROP_CAPACITY} (2 × the new capacity).",
        report.md_table(
            [
                "run",
                f"limit at {ADAPTIVE_MAX} after s",
                "fell after s",
                "limit in the drop",
                f"back at {ADAPTIVE_MAX} after s",
                "highest limit after",
                "climb, limit/s",
                "items/s healthy",
                "in the drop",
                "after",
                "store p50 / p95 ms healthy",
                "p50 / p95 / p99 ms in the drop",
                "p95 ms, drop's 2nd half",
                "p50 / p95 ms after",
            ],
            drop_rows,
        ),
        ledger_table(drop),
        "![adaptive](docs/bench/adaptive.png)",
    ]
    goals = _compare_targets("serial stand-in", serial)
    if real:
        goals += _compare_targets("real Session-Buddy", real)
    healthy = da["healthy"]["p50_ms"]
    goals += [
        target(
            f"healthy sink: the limit reaches the maximum ({ADAPTIVE_MAX})",
            f"reaches {ADAPTIVE_MAX}",
            f"after {f(da['reached_max_s'])} s"
            if da["reached_max_s"] is not None
            else f"highest {_limits(adaptive['limit_timeline'], 0, da['t_drop_s'])['max']}",
            da["reached_max_s"] is not None,
        ),
        target(
            f"capacity drops to {DROP_CAPACITY}: the limit follows within seconds",
            f"< {2 * DROP_CAPACITY} within 5 s",
            f"{f(da['fell_s'])} s" if da["fell_s"] is not None else "never",
            da["fell_s"] is not None and da["fell_s"] <= 5.0,
        ),
        target(
            f"capacity back: the limit climbs back to {ADAPTIVE_MAX} within seconds",
            "within 5 s",
            f"{f(da['recovered_s'])} s"
            if da["recovered_s"] is not None
            else f"not within {da['t_end_s'] - da['t_back_s']:.0f} s "
            f"(highest {da['limit_after_max']}, climbing {f(da['climb_per_s'], 2)} per s)",
            da["recovered_s"] is not None and da["recovered_s"] <= 5.0,
        ),
        target(
            "latency stays bounded in the drop (p95, drop's 2nd half)",
            f"≤ 2 × healthy p50 ({2 * healthy:.0f} ms)",
            f"{da['during_second_half']['p95_ms']:.0f} ms (fixed c={ADAPTIVE_MAX}: "
            f"{df['during_second_half']['p95_ms']:.0f} ms; whole drop "
            f"{da['during']['p95_ms']:.0f} vs {df['during']['p95_ms']:.0f} ms)",
            da["during_second_half"]["p95_ms"] <= 2 * healthy,
        ),
        ledger_target([*serial, *real, *drop]),
    ]
    return "\n\n".join(parts), goals


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


# --- main -----------------------------------------------------------------------------------


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
    with (
        contextlib.suppress(KeyboardInterrupt),
        asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner,
    ):
        try:
            return runner.run(amain(args))
        except BenchError as exc:
            print(f"bench: {exc}", file=sys.stderr)
            return 1
    return 130


if __name__ == "__main__":
    sys.exit(main())
