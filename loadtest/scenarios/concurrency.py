"""Scenario `concurrency`: efficiency per concurrency limit, memory-worker against its peers."""

from __future__ import annotations

from dataclasses import replace

from loadtest import report
from loadtest.context import Bench, RunSpec
from loadtest.scenario import (
    CONTENDERS,
    Options,
    Outcome,
    contender,
    contenders,
    say,
    sweep,
)
from loadtest.scenarios.standin import hammer
from loadtest.tables import PACED_NOTE, ledger_target, ratio, runs_table, target

LEVELS = (1, 5, 10, 20, 50)
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
    results = await sweep(bench, specs)
    by = {(r["spec"]["concurrency"], contender(r)): r for r in results}
    # The instrument's ceiling: a raw aiohttp client with no work of its own, same c, same sink.
    ceiling = {c: await hammer(bench, c, opt.pick(5.0, 1.5), 50.0, sigma) for c in LEVELS}
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
