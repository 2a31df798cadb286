"""What every part of the benchmark shares: where things are, its error, names and statistics.

Every process the runner starts is its own OS process so its CPU is measured on its own: the
stand-in Session-Buddy (`python -m loadtest.standin`, see `procs`), each worker (`python -m
worker run`, or a peer from `loadtest/peers/`, configured by the same `MAHAVISHNU_*` env vars,
see `workers`), and the real Session-Buddy when it is installed (`real_sink`). Only loopback
addresses are used, every broker name starts with `bench-`, and every queue and exchange a run
declares is deleted when the run ends (`broker`).
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import subprocess
import sys
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import psutil

ROOT = Path(__file__).resolve().parent.parent
AMQP_URL = os.environ.get("BENCH_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")
COMMITTED_SETTINGS = ROOT / "settings" / "mahavishnu.yaml"


class BenchError(Exception):
    """A run could not be carried out (a process died, a broker call failed, a timeout)."""


def unique_name() -> str:
    """A fresh broker name prefix, e.g. `bench-3f9a0c1d2e`."""
    return f"bench-{secrets.token_hex(5)}"


def percentiles(values: Iterable[float], points: Iterable[float] = (50, 95, 99)) -> list[float]:
    """Percentiles of `values` (NaN for none)."""
    data = np.fromiter(values, dtype=float)
    if data.size == 0:
        return [float("nan") for _ in points]
    return [float(v) for v in np.percentile(data, list(points))]


def summarize_latencies(
    sent: Mapping[str, float], done: Mapping[str, float]
) -> dict[str, float | int]:
    """p50/p95/p99/max of done − sent in milliseconds, over keys present in both."""
    values = [(done[k] - t) * 1000 for k, t in sent.items() if k in done]
    p50, p95, p99, top = percentiles(values, (50, 95, 99, 100))
    return {"n": len(values), "p50_ms": p50, "p95_ms": p95, "p99_ms": p99, "max_ms": top}


def machine() -> dict[str, Any]:
    """What the figures were measured on."""
    cpu = "unknown"
    with contextlib.suppress(OSError):
        match = re.search(r"model name\s*:\s*(.+)", Path("/proc/cpuinfo").read_text())
        cpu = match.group(1).strip() if match else cpu
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
        "python": sys.version.split()[0],
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
        "kernel": os.uname().release,
        "git": _git_describe(),
    }


def _git_describe() -> str:
    """The commit measured, `-dirty` when the work tree has changes."""
    try:
        out = subprocess.run(
            ["git", "describe", "--always", "--dirty"],
            cwd=ROOT, capture_output=True, text=True, timeout=5, check=False,
        )  # fmt: skip
    except OSError:
        return "unknown"
    return out.stdout.strip() or "unknown"


def steady_throughput(times: Sequence[float]) -> float:
    """Items per second between the 10th and the 90th percentile of store times."""
    ordered = sorted(times)
    n = len(ordered)
    if n < 10:
        span = ordered[-1] - ordered[0] if n > 1 else 0.0
        return (n - 1) / span if span > 0 else float("nan")
    lo, hi = int(n * 0.1), int(n * 0.9) - 1
    span = ordered[hi] - ordered[lo]
    return (hi - lo) / span if span > 0 else float("nan")


def timeline(times: Sequence[float], t0: float, bucket_s: float = 1.0) -> list[tuple[float, int]]:
    """Items stored per `bucket_s` since `t0`: (bucket start, count)."""
    counts: dict[int, int] = {}
    for t in times:
        counts[int((t - t0) // bucket_s)] = counts.get(int((t - t0) // bucket_s), 0) + 1
    return [(b * bucket_s, counts.get(b, 0)) for b in range(max(counts, default=-1) + 1)]
