"""How the dlq subcommands show dead letters: rich tables for people, JSON for scripts."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from worker import dlq_model
from worker.cli.common import console
from worker.dlq_format import jsonable, pretty_body
from worker.headers import PREFIX
from worker.settings import Settings

DETAIL_CHARS = 60
ID_CHARS = 23  # 'sha256:' and 16 hex digits: unique enough to copy into show or --id


def print_stats(out: Console, queue: str, summary: dlq_model.Stats) -> None:
    """The depth, then tables of reasons and of pools."""
    out.print(f"[bold]{escape(queue)}[/]: {summary.depth} dead letter(s)")
    if not summary.seen:
        return
    out.print(f"oldest failure {_when(summary.oldest_ms)}, newest {_when(summary.newest_ms)}")
    reasons = Table(title="reasons", title_justify="left")
    reasons.add_column("reason")
    reasons.add_column("count", justify="right")
    reasons.add_column("")
    top = max(summary.reasons.values())
    for reason, count in summary.reasons.items():
        reasons.add_row(reason, str(count), "█" * max(1, round(30 * count / top)))
    out.print(reasons)
    pools = Table(title="pools", title_justify="left")
    for name in ("pool", "count", "reasons", "oldest failure", "newest failure"):
        pools.add_column(name, justify="right" if name == "count" else "left")
    for pool, row in summary.pools.items():
        text = ", ".join(f"{r} {n}" for r, n in row.reasons.items())
        pools.add_row(pool or "-", str(row.count), text, _when(row.oldest_ms), _when(row.newest_ms))
    out.print(pools)


def caveats(snapshot: dlq_model.Snapshot, settings: Settings) -> None:
    """Say on stderr what a read could not see: other consumers' messages, a capped read."""
    if snapshot.consumers:
        warn_consumers(snapshot.consumers, settings)
    if not snapshot.complete:
        console(stderr=True).print(
            f"[yellow]note:[/] read {len(snapshot.letters)} of {snapshot.depth} dead letter(s)"
        )


def warn_consumers(count: int, settings: Settings) -> None:
    """Say on stderr that other consumers hold dead letters this command cannot see."""
    text = (
        f"[yellow]note:[/] {count} other consumer(s) on the DLQ hold what they have taken; "
        "this shows only what they leave"
    )
    if settings.rabbitmq.queue_type == "quorum":
        # Measured on 3.10: a quorum queue puts returned messages in front, in return order.
        text += ", and what they hand back later queues behind what this read handed back"
    console(stderr=True).print(text)


def letters_table(letters: list[dlq_model.DeadLetter], now_ms: int, title: str = "") -> Table:
    """One row per dead letter: position, short id, reason, pool, tries, age, detail."""
    table = Table(title=title or None, title_justify="left")
    for name in ("#", "id", "reason", "pool", "tries", "failed"):
        table.add_column(name, justify="right" if name in ("#", "tries") else "left", no_wrap=True)
    table.add_column("detail")
    for d in letters:
        table.add_row(
            str(d.position),
            d.id[:ID_CHARS],
            d.reason,
            d.pool or "-",
            "-" if d.attempts is None else str(d.attempts),
            _ago(d.last_failure_ms, now_ms),
            escape(_clip(d.detail, DETAIL_CHARS)),
        )
    return table


def print_letter(out: Console, d: dlq_model.DeadLetter, now_ms: int) -> None:
    """One dead letter whole: its failure envelope, other headers and body."""
    table = Table(show_header=False, box=None)
    table.add_column(style="bold")
    table.add_column(overflow="fold")
    for key, value in d.envelope().items():
        shown = "-" if value is None else str(value)
        if key in ("first_failure", "last_failure") and value is not None:
            ms = d.first_failure_ms if key == "first_failure" else d.last_failure_ms
            shown = f"{value} ({_ago(ms, now_ms)})"
        table.add_row(key, escape(shown))
    out.print(table)
    # x-delivery-count on a quorum DLQ counts reads like this one, not the message's failures.
    skip = (PREFIX, "x-delivery-count")
    other = {k: v for k, v in d.headers.items() if not k.startswith(skip)}
    if other:
        out.print("[bold]headers[/]", escape(json.dumps(jsonable(other))))
    out.print("[bold]body[/]")
    out.print(escape(pretty_body(d.body)), soft_wrap=True)
    out.print()


def stats_json(snapshot: dlq_model.Snapshot, summary: dlq_model.Stats) -> dict[str, Any]:
    """The object `dlq stats --json` prints."""
    return {
        "queue": snapshot.queue,
        "depth": summary.depth,
        "seen": summary.seen,
        "other_consumers": summary.consumers,
        "reasons": summary.reasons,
        "oldest_failure": dlq_model.iso_time(summary.oldest_ms),
        "newest_failure": dlq_model.iso_time(summary.newest_ms),
        "pools": [
            {
                "pool": pool,
                "count": row.count,
                "reasons": row.reasons,
                "oldest_failure": dlq_model.iso_time(row.oldest_ms),
                "newest_failure": dlq_model.iso_time(row.newest_ms),
            }
            for pool, row in summary.pools.items()
        ],
    }


def show_json(d: dlq_model.DeadLetter) -> dict[str, Any]:
    """One dead letter in `dlq show --json`: the envelope, headers and body."""
    return {**d.envelope(), "headers": jsonable(dict(d.headers)), "body": d.body_text()}


def _when(ms: int | None) -> str:
    if ms is None:
        return "-"
    return datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _ago(ms: int | None, now_ms: int) -> str:
    if ms is None:
        return "-"
    seconds = max(0, (now_ms - ms) // 1000)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit} ago"
    return f"{seconds}s ago"


def _clip(text: str, limit: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"
