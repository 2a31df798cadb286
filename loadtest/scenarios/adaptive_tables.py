"""The adaptive scenario's tables and targets."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from loadtest import report
from loadtest.scenario import (
    contender,
)
from loadtest.scenarios.adaptive_stats import (
    ADAPTIVE_MAX,
    DROP_CAPACITY,
    LATENCY_FROM_S,
    SERIAL_MS,
    limit_figures,
)
from loadtest.tables import ledger_table, ledger_target, ratio, target


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
    """memory-worker against the best fixed limit: throughput kept, p95 near unloaded.

    One pair of targets per memory-worker run: at the maximum of 50 and at the committed
    default maximum, whose first burst is that many calls.
    """
    unloaded = results[0]["steady"]["store_latency"]["p95_ms"]
    best = _best_fixed(results)
    best_tput = best["prefilled"]["throughput_items_per_s"]
    owns = [r for r in results if r["spec"]["adaptive"] is None and not r["spec"]["peer"]]
    others = [r for r in results if r not in owns and r["spec"]["concurrency"] == ADAPTIVE_MAX]
    found = []
    for own in owns:
        tput = own["prefilled"]["throughput_items_per_s"]
        p95 = own["steady"]["store_latency"]["p95_ms"]
        who = f"memory-worker ≤{own['spec']['concurrency']}"
        found += [
            target(
                f"{sink}: {who} keeps the throughput of the best fixed limit",
                f"≥ 0.95 × best fixed (c={best['spec']['concurrency']})",
                f"{tput / best_tput:.2f} × ({tput:.1f} vs {best_tput:.1f} items/s)",
                tput >= 0.95 * best_tput,
            ),
            target(
                f"{sink}: {who}'s p95 store latency near the unloaded latency",
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
    return found


def adaptive_md(
    serial: list[dict[str, Any]],
    real: list[dict[str, Any]],
    real_note: str,
    drop: list[dict[str, Any]],
) -> tuple[str, list[dict[str, Any]]]:
    f = report.fmt
    parts = [
        "## Adaptive concurrency against fixed limits and the naive peer",
        "memory-worker with the committed settings (adaptive limit within [1, 50], and within "
        "[1, 10], the committed default maximum) against "
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
            else f"highest {limit_figures(adaptive['limit_timeline'], 0, da['t_drop_s'])['max']}",
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
