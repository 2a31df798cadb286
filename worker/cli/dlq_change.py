"""`dlq replay` and `dlq purge`: send dead letters back to the work queue, or remove them."""

from __future__ import annotations

import asyncio
import sys
from collections import Counter

from rich.console import Console
from rich.markup import escape

from worker import dlq, dlq_edit, dlq_model
from worker.broker import connect
from worker.cli import dlq_view
from worker.cli.common import console, progress
from worker.exitcodes import EXIT_FAILED, EXIT_OK
from worker.settings import Settings
from worker.topology import Topology


async def replay(
    settings: Settings,
    flt: dlq_model.Filter,
    *,
    dry_run: bool,
    rate_per_s: float | None,
    limit: int | None,
) -> int:
    """Send the matching dead letters back to the work queue with their retry counters reset."""
    out, err = console(), console(stderr=True)
    topology = Topology.from_settings(settings)
    async with await connect(settings, purpose="dlq-replay", robust=False) as connection:
        with progress(err, "replaying" if not dry_run else "reading", 0) as advance:
            report = await dlq_edit.replay(
                connection,
                topology,
                flt,
                dry_run=dry_run,
                rate_per_s=rate_per_s,
                limit=limit,
                on_progress=advance,
            )
    if report.consumers:
        dlq_view.warn_consumers(report.consumers, settings)
    if dry_run:
        if report.matched:
            out.print(dlq_view.letters_table(report.matched, dlq_model.current_ms()))
        out.print(f"would replay {len(report.matched)} of {report.seen} dead letter(s)")
        return EXIT_OK
    out.print(
        f"replayed {report.replayed} of {len(report.matched)} matching dead letter(s) "
        f"to {topology.exchange}/{topology.queue} (read {report.seen} of {report.depth})"
    )
    if report.error:
        err.print(f"[red]stopped:[/] {escape(report.error)}")
        if report.duplicate is not None:
            err.print(f"{report.duplicate.id} is now both replayed and still in the DLQ")
        return EXIT_FAILED
    return EXIT_OK


async def purge(settings: Settings, flt: dlq_model.Filter, *, yes: bool, limit: int | None) -> int:
    """Remove the matching dead letters for good, after confirmation unless `yes`."""
    out, err = console(), console(stderr=True)
    queue = settings.rabbitmq.dead_letter_queue
    async with await connect(settings, purpose="dlq-purge", robust=False) as connection:
        only: Counter[str] | None = None
        if not yes:
            snapshot = await dlq.read(connection, queue, limit=limit)
            chosen = snapshot.matching(flt)
            if not chosen:
                out.print("no dead letter matches; nothing removed")
                return EXIT_OK
            out.print(dlq_view.letters_table(chosen, snapshot.read_at_ms))
            if not await _confirm(err, f"Remove these {len(chosen)} dead letter(s) for good?"):
                err.print("nothing removed")
                return EXIT_FAILED
            # Remove exactly what was shown, even if more matching ones arrived since.
            only = Counter(d.fingerprint for d in chosen)
        with progress(err, "purging", 0) as advance:
            report = await dlq_edit.purge(
                connection, queue, flt, only=only, limit=limit, on_progress=advance
            )
    if report.removed:
        out.print(dlq_view.letters_table(report.removed, dlq_model.current_ms(), title="removed"))
    missing = f"; {report.missing} confirmed one(s) were already gone" if report.missing else ""
    out.print(f"removed {len(report.removed)} dead letter(s) from {queue}{missing}")
    if report.error:
        err.print(f"[red]stopped:[/] {escape(report.error)}")
        return EXIT_FAILED
    return EXIT_OK


async def _confirm(console: Console, question: str) -> bool:
    if not sys.stdin.isatty():
        console.print("[red]refusing to purge without a terminal to confirm on:[/] pass --yes")
        return False
    console.print(f"{escape(question)} \\[y/N] ", end="")
    # input() blocks; in a thread the event loop keeps the connection's heartbeats going.
    answer = await asyncio.to_thread(sys.stdin.readline)
    return answer.strip().lower() in ("y", "yes")
