"""Results on disk: JSON, markdown tables, PNG plots, and a py-spy profile digest."""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only, never a window
import matplotlib.pyplot as plt
import orjson
from matplotlib.ticker import LogLocator, NullFormatter, ScalarFormatter

_FRAME = re.compile(r"^(?P<func>.*) \((?P<file>[^()]*?)(?::\d+)?\)$")


def fmt(value: object, digits: int = 1) -> str:
    """A table cell: numbers rounded, None and NaN as an em dash."""
    if value is None:
        return "—"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if math.isnan(value):
            return "—"
        return f"{value:,.{digits}f}"
    return str(value)


def md_table(headers: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    """A GitHub markdown table."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def verdict(ok: bool | None) -> str:
    """A target cell: met, missed or not measured."""
    return "—" if ok is None else ("**met**" if ok else "**missed**")


def write(out: Path, scenario: str, data: Mapping[str, Any], markdown: str) -> None:
    """Write `<scenario>.json` and `<scenario>.md` under `out`."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{scenario}.json").write_bytes(
        orjson.dumps(
            data, option=orjson.OPT_INDENT_2 | orjson.OPT_SERIALIZE_NUMPY | orjson.OPT_NON_STR_KEYS
        )
    )
    (out / f"{scenario}.md").write_text(markdown.rstrip() + "\n")


# --- plots ----------------------------------------------------------------------------------


def _save(fig: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_throughput(
    path: Path,
    title: str,
    series: Mapping[str, Sequence[tuple[float, float]]],
    ideal: Sequence[tuple[float, float]],
    xlabel: str,
) -> None:
    """Measured throughput per x (concurrency or workers) against the ideal line."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    if ideal:
        xs = [x for x, _ in ideal]
        ax.plot(xs, [y for _, y in ideal], "k--", label="ideal (W·c ÷ latency)")
        ax.plot(xs, [0.95 * y for _, y in ideal], ":", color="grey", label="target: 0.95 × ideal")
    for label, points in series.items():
        ax.plot([x for x, _ in points], [y for _, y in points], "o-", label=label)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("items/s")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    _save(fig, path)


def plot_latency(path: Path, title: str, rows: Sequence[tuple[str, float, float, float]]) -> None:
    """p50/p95/p99 bars per run label."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    width = 0.27
    for i, (name, offset) in enumerate((("p50", -width), ("p95", 0.0), ("p99", width))):
        ax.bar(
            [n + offset for n in range(len(rows))],
            [r[i + 1] for r in rows],
            width,
            label=name,
        )
    ax.set_xticks(range(len(rows)), [r[0] for r in rows])
    ax.set_ylabel("end-to-end latency, ms (publish → stored)")
    ax.set_title(title)
    ax.grid(alpha=0.3, axis="y")
    ax.legend(loc="lower right", framealpha=0.9)
    _save(fig, path)


def plot_timeline(
    path: Path, title: str, series: Mapping[str, Sequence[tuple[float, float]]], ylabel: str
) -> None:
    """Value over time, e.g. worker RSS while it drains a backlog."""
    fig, ax = plt.subplots(figsize=(7, 4))
    for label, points in series.items():
        ax.plot([t for t, _ in points], [v for _, v in points], label=label)
    ax.set_xlabel("seconds since the worker was ready")
    ax.set_ylabel(ylabel)
    ax.set_ylim(bottom=0)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    _save(fig, path)


def plot_adaptive(
    path: Path,
    title: str,
    limits: Mapping[str, Sequence[tuple[float, float]]],
    p95: Mapping[str, Sequence[tuple[float, float]]],
    drop: tuple[float, float],
) -> None:
    """Concurrency limit (top) and store latency p95 (bottom, log scale) around a drop window."""
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 6.5), sharex=True)
    for ax in (top, bottom):
        ax.axvspan(*drop, color="tab:red", alpha=0.08, label="capacity dropped")
        ax.grid(alpha=0.3)
    highest = 1.0
    for label, points in limits.items():
        top.step([t for t, _ in points], [v for _, v in points], where="post", label=label)
        highest = max([highest, *(v for _, v in points)])
    top.set_ylabel("concurrency limit")
    top.set_ylim(0, highest * 1.3)  # room for the legend above the lines
    top.set_title(title)
    top.legend(loc="upper center", ncol=3)
    slowest = 1.0
    for label, points in p95.items():
        bottom.plot([t for t, _ in points], [v for _, v in points], label=label)
        slowest = max([slowest, *(v for _, v in points)])
    bottom.set_yscale("log")
    bottom.set_ylim(top=slowest * 4)
    bottom.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
    bottom.yaxis.set_major_formatter(ScalarFormatter())
    bottom.yaxis.set_minor_formatter(NullFormatter())
    bottom.set_ylabel("store latency p95 per 0.5 s, ms")
    bottom.set_xlabel("seconds since the capacity dropped")
    bottom.legend(loc="upper center", ncol=3)
    _save(fig, path)


# --- py-spy ---------------------------------------------------------------------------------


def _frame(raw: str) -> tuple[str, str]:
    match = _FRAME.match(raw.strip())
    if match is None:
        return raw.strip(), ""
    return match["func"], match["file"]


def _package(file: str) -> str:
    """The top-level package of a py-spy short file name (`aio_pika/queue.py` → aio_pika)."""
    if not file or file.startswith("<"):
        return file or "?"
    head = file.split("/", 1)[0]
    return head.removesuffix(".py")


# Each sample goes to the first stage one of whose frames it contains (an exclusive split).
STAGES: tuple[tuple[str, Callable[[str, str], bool]], ...] = (
    ("log line per message (structlog, orjson in worker/logs.py)",
     lambda fn, fl: fl.startswith("structlog/")),
    ("Prometheus metrics", lambda fn, fl: fl.startswith("prometheus_client/")),
    ("decode + validate the body (json, pydantic)", lambda fn, fl: "decode_item" in fn),
    ("HTTP transport (aiohttp)", lambda fn, fl: fl.startswith(("aiohttp/", "httpx_aiohttp/"))),
    ("HTTP client layer above it (httpx)", lambda fn, fl: fl.startswith("httpx/")),
    ("settle: ack, classify (worker/settle, pipeline)", lambda fn, fl: "settle" in fn),
    ("MCP sink: arguments, SSE/JSON-RPC parsing",
     lambda fn, fl: fl in ("worker/mcp.py", "worker/sink.py")),
    ("AMQP receive/send (aio_pika, aiormq, pamqp)",
     lambda fn, fl: fl.startswith(("aio_pika/", "aiormq/", "pamqp/"))),
    ("other worker code (pipeline, dispatcher, models)", lambda fn, fl: fl.startswith("worker/")),
)  # fmt: skip


def profile_digest(raw_path: Path, keep: Path | None = None, top: int = 25) -> dict[str, Any]:
    """Self and inclusive sample shares per function and self share per package ({} if none)."""
    if not raw_path.is_file() or not raw_path.stat().st_size:
        return {}
    if keep is not None:
        keep.write_bytes(raw_path.read_bytes())
    self_fn: Counter[str] = Counter()
    incl_fn: Counter[str] = Counter()
    by_stage: Counter[str] = Counter()
    self_pkg: Counter[str] = Counter()
    total = 0
    for line in raw_path.read_text(errors="replace").splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [_frame(f) for f in stack.split(";") if not f.startswith("process ")]
        if not frames:
            continue
        total += count
        stage = next(
            (name for name, hit in STAGES if any(hit(fn, fl) for fn, fl in frames)),
            "event loop, asyncio, other",
        )
        by_stage[stage] += count
        func, file = frames[-1]
        self_fn[f"{func} ({file})"] += count
        self_pkg[_package(file)] += count
        for name in {f"{fn} ({fl})" for fn, fl in frames}:
            incl_fn[name] += count

    def shares(counter: Counter[str]) -> list[tuple[str, float]]:
        # Frames on every stack (the interpreter's entry, the event loop's run) say nothing.
        ranked = [(k, round(100 * v / total, 1)) for k, v in counter.most_common() if v < total]
        return ranked[:top]

    return {
        "samples": total,
        "by_stage_pct": shares(by_stage),
        "self_by_package_pct": shares(self_pkg),
        "self_by_function_pct": shares(self_fn),
        "inclusive_by_function_pct": shares(incl_fn),
    }
