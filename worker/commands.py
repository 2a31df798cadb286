"""The `publish` and `dlq` subcommands: parse arguments, print with rich; the work is elsewhere.

Exit codes: 0 everything asked for was done (every item confirmed); 1 something was not (an
unconfirmed publish, a replay stopped, a purge declined, an id not found); 65 the input had
invalid lines and nothing was published; 69 no broker.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import sys
from collections import Counter
from collections.abc import Coroutine, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, BinaryIO

from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Table

from worker import dlq
from worker.cli import (
    EXIT_FAILED,
    EXIT_OK,
    EXIT_UNAVAILABLE,
    EXIT_USAGE,
    add_settings_flags,
)
from worker.models import DecodeError, MemoryItem, decode_item
from worker.publisher import BrokerUnreachable, PublishResult, connect, open_publisher
from worker.runner import run
from worker.settings import Settings
from worker.topology import Topology

EXIT_DATAERR = 65
SHOWN_ERRORS = 20
DETAIL_CHARS = 60
ID_CHARS = 23  # 'sha256:' and 16 hex digits: unique enough to copy into show or --id
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*$")
_UNIT_S = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


def add_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register `publish` and `dlq` on the top-level subparsers."""
    publish = sub.add_parser(
        "publish",
        help="publish memory items from a JSONL file or stdin",
        description="Validate every line first, then publish with confirms.",
    )
    publish.add_argument("file", nargs="?", default="-", help="JSONL file; '-' or absent: stdin")
    publish.add_argument(
        "--skip-invalid", action="store_true", help="publish the valid lines even if some are bad"
    )
    publish.add_argument(
        "--max-outstanding", type=_positive_int, default=256, help="confirms pending at once"
    )
    publish.set_defaults(func=cmd_publish)
    add_settings_flags(publish)
    _add_dlq(sub)


def _add_dlq(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = sub.add_parser("dlq", help="inspect, replay and purge the dead-letter queue")
    commands = parser.add_subparsers(dest="dlq_command", required=True)
    stats = commands.add_parser("stats", help="depth, reasons, failure times, pools")
    stats.add_argument("--json", action="store_true", help="machine-readable output")
    stats.set_defaults(func=cmd_dlq_stats)
    listing = commands.add_parser("list", help="list dead letters without removing any")
    _add_filters(listing)
    listing.add_argument("--json", action="store_true", help="one JSON object per line")
    listing.set_defaults(func=cmd_dlq_list)
    show = commands.add_parser("show", help="the failure envelope and body of one message")
    show.add_argument("id", help="message id (the idempotency key), or a unique prefix of it")
    show.add_argument("--json", action="store_true", help="machine-readable output")
    show.set_defaults(func=cmd_dlq_show)
    replay = commands.add_parser("replay", help="send dead letters back to the work queue")
    _add_filters(replay, selecting=True)
    replay.add_argument("--dry-run", action="store_true", help="list what would be replayed")
    replay.add_argument("--rate", type=_positive_float, help="at most this many messages a second")
    replay.set_defaults(func=cmd_dlq_replay)
    purge = commands.add_parser("purge", help="remove dead letters for good")
    _add_filters(purge, selecting=True)
    purge.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    purge.set_defaults(func=cmd_dlq_purge)
    for command in (stats, listing, show, replay, purge):
        add_settings_flags(command)


def _add_filters(parser: argparse.ArgumentParser, *, selecting: bool = False) -> None:
    group = parser.add_argument_group("filters (all given must match)")
    if selecting:
        group.add_argument(
            "--id", action="append", default=[], help="message id or its prefix (repeatable)"
        )
        group.add_argument("--all", action="store_true", help="every dead letter")
    group.add_argument("--reason", action="append", default=[], help="failure reason (repeatable)")
    group.add_argument("--pool", action="append", default=[], help="metadata.pool_id (repeatable)")
    group.add_argument("--older-than", type=parse_duration, help="failed longer ago, e.g. 2h")
    group.add_argument("--newer-than", type=parse_duration, help="failed more recently, e.g. 15m")
    group.add_argument("--grep", help="text in the id, reason, detail, worker, pool or body")
    group.add_argument(
        "--limit", type=_positive_int, help=f"read at most this many (max {dlq.MAX_HOLD})"
    )


def parse_duration(text: str) -> float:
    """Seconds in '90', '90s', '15m', '2h' or '1.5d'."""
    match = _DURATION.match(text)
    if match is None:
        raise argparse.ArgumentTypeError(f"{text!r} is not a duration like 90s, 15m, 2h or 3d")
    return float(match[1]) * _UNIT_S[match[2]]


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError("must be greater than 0")
    return value


def _filter(args: argparse.Namespace) -> dlq.Filter:
    return dlq.Filter(
        ids=frozenset(getattr(args, "id", None) or ()),
        reasons=frozenset(args.reason),
        pools=frozenset(args.pool),
        older_than_s=args.older_than,
        newer_than_s=args.newer_than,
        text=args.grep,
    )


def _run(main: Coroutine[Any, Any, int]) -> int:
    try:
        return run(main)
    except BrokenPipeError:
        # The reader (`| head`) has what it wanted; Python would otherwise complain at exit.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK
    except (BrokerUnreachable, dlq.DlqError) as exc:
        Console(stderr=True).print(f"[red]memory-worker:[/] {escape(str(exc))}")
        return EXIT_UNAVAILABLE if isinstance(exc, BrokerUnreachable) else EXIT_FAILED


@contextmanager
def _progress(console: Console, description: str, total: int) -> Iterator[Any]:
    """A progress bar on stderr; yields a function that advances it to a count."""
    if not console.is_terminal:
        # Scripts read stdout; a bar redrawn into a pipe or log is only noise.
        yield lambda done, new_total=None: None
        return
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TaskProgressColumn(),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=console) as progress:
        task = progress.add_task(description, total=total)

        def update(done: int, new_total: int | None = None) -> None:
            progress.update(task, completed=done, total=new_total or total)

        yield update


# --- publish


def cmd_publish(args: argparse.Namespace, settings: Settings) -> int:
    """Validate a JSONL file (or stdin) line by line, then publish it with confirms."""
    err = Console(stderr=True)
    try:
        if args.file == "-":
            items, bad = _validate(sys.stdin.buffer, settings)
        else:
            with Path(args.file).open("rb") as stream:
                items, bad = _validate(stream, settings)
    except OSError as exc:
        err.print(f"[red]memory-worker:[/] cannot read {escape(args.file)}: {exc.strerror}")
        return EXIT_USAGE
    for line, problem in bad[:SHOWN_ERRORS]:
        err.print(f"[red]line {line}:[/] {escape(problem)}")
    if len(bad) > SHOWN_ERRORS:
        err.print(f"... and {len(bad) - SHOWN_ERRORS} more invalid line(s)")
    if bad and not args.skip_invalid:
        err.print(
            f"[red]nothing published:[/] {len(bad)} invalid line(s); "
            "fix them or pass --skip-invalid"
        )
        return EXIT_DATAERR
    return _run(_publish(items, len(bad), args.max_outstanding, settings))


async def _publish(
    items: list[tuple[int, MemoryItem]], skipped: int, max_outstanding: int, settings: Settings
) -> int:
    out, err = Console(), Console(stderr=True)
    failures: list[PublishResult] = []
    async with open_publisher(settings, purpose="publish", robust=False) as publisher:
        with _progress(err, "publishing", len(items)) as advance:
            done = 0

            def on_result(result: PublishResult) -> None:
                nonlocal done
                done += 1
                advance(done)
                if not result.ok:
                    failures.append(result)

            batch = await publisher.publish_many(
                (item for _, item in items),
                max_outstanding=max_outstanding,
                on_result=on_result,
            )
    for failure in sorted(failures, key=lambda f: f.index)[:SHOWN_ERRORS]:
        line = items[failure.index][0]
        err.print(f"[red]line {line}:[/] not confirmed: {escape(str(failure.error))}")
    note = f", {skipped} invalid line(s) skipped" if skipped else ""
    out.print(
        f"published {batch.published} of {len(items)} item(s), {len(failures)} not confirmed{note}"
    )
    return EXIT_OK if not failures else EXIT_FAILED


def _validate(
    stream: BinaryIO, settings: Settings
) -> tuple[list[tuple[int, MemoryItem]], list[tuple[int, str]]]:
    """Decode every line as the worker would; blank lines are skipped."""
    items: list[tuple[int, MemoryItem]] = []
    bad: list[tuple[int, str]] = []
    limits = settings.worker
    for number, raw in enumerate(stream, start=1):
        line = raw.rstrip(b"\r\n")
        if not line.strip():
            continue
        try:
            item = decode_item(
                line, None, max_bytes=limits.max_body_bytes, max_depth=limits.max_json_depth
            )
        except DecodeError as exc:
            bad.append((number, f"{exc.reason.value}: {exc.detail}"))
            continue
        items.append((number, item))
    return items, bad


# --- dlq


def cmd_dlq_stats(args: argparse.Namespace, settings: Settings) -> int:
    """Depth, a histogram of reasons, oldest and newest failure, per pool."""
    return _run(_stats(args, settings))


async def _stats(args: argparse.Namespace, settings: Settings) -> int:
    snapshot = await _read(settings)
    summary = dlq.stats(snapshot)
    if args.json:
        print(json.dumps(_stats_json(snapshot, summary)))
        return EXIT_OK
    out = Console()
    _caveats(snapshot, settings)
    out.print(f"[bold]{escape(snapshot.queue)}[/]: {summary.depth} dead letter(s)")
    if not summary.seen:
        return EXIT_OK
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
    return EXIT_OK


def cmd_dlq_list(args: argparse.Namespace, settings: Settings) -> int:
    """List dead letters, filtered; the queue is left exactly as it was."""
    return _run(_list(args, settings))


async def _list(args: argparse.Namespace, settings: Settings) -> int:
    snapshot = await _read(settings, limit=args.limit)
    letters = snapshot.matching(_filter(args))
    if args.json:
        for letter in letters:
            print(json.dumps(letter.envelope()))
        return EXIT_OK
    _caveats(snapshot, settings)
    out = Console()
    if letters:
        out.print(_letters_table(letters, snapshot.read_at_ms))
    out.print(f"{len(letters)} of {len(snapshot.letters)} dead letter(s) match")
    return EXIT_OK


def cmd_dlq_show(args: argparse.Namespace, settings: Settings) -> int:
    """The failure envelope and body of the dead letters with this id."""
    return _run(_show(args, settings))


async def _show(args: argparse.Namespace, settings: Settings) -> int:
    snapshot = await _read(settings)
    letters = [d for d in snapshot.letters if d.id == args.id]
    if not letters:
        prefixed = {d.id for d in snapshot.letters if d.id.startswith(args.id)}
        if len(prefixed) > 1:
            Console(stderr=True).print(f"{args.id!r} is a prefix of {len(prefixed)} ids")
            return EXIT_FAILED
        letters = [d for d in snapshot.letters if d.id in prefixed]
    if args.json:
        print(json.dumps([_show_json(d) for d in letters]))
        return EXIT_OK if letters else EXIT_FAILED
    _caveats(snapshot, settings)
    out = Console()
    if not letters:
        out.print(f"no dead letter with id {escape(args.id)!r}")
        return EXIT_FAILED
    for letter in letters:
        _print_letter(out, letter, snapshot.read_at_ms)
    return EXIT_OK


def cmd_dlq_replay(args: argparse.Namespace, settings: Settings) -> int:
    """Send dead letters back to the work queue with their retry counters reset."""
    return _run(_replay(args, settings))


async def _replay(args: argparse.Namespace, settings: Settings) -> int:
    flt = _filter(args)
    if not _selected(flt, args):
        return EXIT_FAILED
    out, err = Console(), Console(stderr=True)
    topology = Topology.from_settings(settings)
    async with await connect(settings, purpose="dlq-replay", robust=False) as connection:
        with _progress(err, "replaying" if not args.dry_run else "reading", 0) as advance:
            report = await dlq.replay(
                connection,
                topology,
                flt,
                dry_run=args.dry_run,
                rate_per_s=args.rate,
                limit=args.limit,
                on_progress=advance,
            )
    if report.consumers:
        _warn_consumers(report.consumers, settings)
    if args.dry_run:
        if report.matched:
            out.print(_letters_table(report.matched, dlq.current_ms()))
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


def cmd_dlq_purge(args: argparse.Namespace, settings: Settings) -> int:
    """Remove matching dead letters for good, after confirmation."""
    return _run(_purge(args, settings))


async def _purge(args: argparse.Namespace, settings: Settings) -> int:
    flt = _filter(args)
    if not _selected(flt, args):
        return EXIT_FAILED
    out, err = Console(), Console(stderr=True)
    queue = settings.rabbitmq.dead_letter_queue
    async with await connect(settings, purpose="dlq-purge", robust=False) as connection:
        only: Counter[str] | None = None
        if not args.yes:
            snapshot = await dlq.read(connection, queue, limit=args.limit)
            chosen = snapshot.matching(flt)
            if not chosen:
                out.print("no dead letter matches; nothing removed")
                return EXIT_OK
            out.print(_letters_table(chosen, snapshot.read_at_ms))
            if not await _confirm(err, f"Remove these {len(chosen)} dead letter(s) for good?"):
                err.print("nothing removed")
                return EXIT_FAILED
            # Remove exactly what was shown, even if more matching ones arrived since.
            only = Counter(d.fingerprint for d in chosen)
        with _progress(err, "purging", 0) as advance:
            report = await dlq.purge(
                connection, queue, flt, only=only, limit=args.limit, on_progress=advance
            )
    if report.removed:
        out.print(_letters_table(report.removed, dlq.current_ms(), title="removed"))
    missing = f"; {report.missing} confirmed one(s) were already gone" if report.missing else ""
    out.print(f"removed {len(report.removed)} dead letter(s) from {queue}{missing}")
    if report.error:
        err.print(f"[red]stopped:[/] {escape(report.error)}")
        return EXIT_FAILED
    return EXIT_OK


def _selected(flt: dlq.Filter, args: argparse.Namespace) -> bool:
    if flt.is_empty and not args.all:
        Console(stderr=True).print("choose what to act on: --id, --reason, --pool, ... or --all")
        return False
    return True


async def _confirm(console: Console, question: str) -> bool:
    if not sys.stdin.isatty():
        console.print("[red]refusing to purge without a terminal to confirm on:[/] pass --yes")
        return False
    console.print(f"{escape(question)} \\[y/N] ", end="")
    # input() blocks; in a thread the event loop keeps the connection's heartbeats going.
    answer = await asyncio.to_thread(sys.stdin.readline)
    return answer.strip().lower() in ("y", "yes")


async def _read(settings: Settings, *, limit: int | None = None) -> dlq.Snapshot:
    queue = settings.rabbitmq.dead_letter_queue
    async with await connect(settings, purpose="dlq-read", robust=False) as connection:
        with _progress(Console(stderr=True), "reading", 0) as advance:
            return await dlq.read(connection, queue, limit=limit, on_progress=advance)


def _caveats(snapshot: dlq.Snapshot, settings: Settings) -> None:
    if snapshot.consumers:
        _warn_consumers(snapshot.consumers, settings)
    if not snapshot.complete:
        Console(stderr=True).print(
            f"[yellow]note:[/] read {len(snapshot.letters)} of {snapshot.depth} dead letter(s)"
        )


def _warn_consumers(count: int, settings: Settings) -> None:
    text = (
        f"[yellow]note:[/] {count} other consumer(s) on the DLQ hold what they have taken; "
        "this shows only what they leave"
    )
    if settings.rabbitmq.queue_type == "quorum":
        # Measured on 3.10: a quorum queue puts returned messages in front, in return order.
        text += ", and what they hand back later queues behind what this read handed back"
    Console(stderr=True).print(text)


def _letters_table(letters: list[dlq.DeadLetter], now_ms: int, title: str = "") -> Table:
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


def _print_letter(out: Console, d: dlq.DeadLetter, now_ms: int) -> None:
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
    skip = ("x-mw-", "x-delivery-count")
    other = {k: v for k, v in d.headers.items() if not k.startswith(skip)}
    if other:
        out.print("[bold]headers[/]", escape(json.dumps(_jsonable(other))))
    out.print("[bold]body[/]")
    out.print(escape(_pretty(d.body)), soft_wrap=True)
    out.print()


def _pretty(body: bytes) -> str:
    try:
        return json.dumps(json.loads(body), indent=2, ensure_ascii=False)
    except (ValueError, RecursionError):
        return body.decode("utf-8", "backslashreplace")


def _stats_json(snapshot: dlq.Snapshot, summary: dlq.Stats) -> dict[str, Any]:
    return {
        "queue": snapshot.queue,
        "depth": summary.depth,
        "seen": summary.seen,
        "other_consumers": summary.consumers,
        "reasons": summary.reasons,
        "oldest_failure": dlq.iso_time(summary.oldest_ms),
        "newest_failure": dlq.iso_time(summary.newest_ms),
        "pools": [
            {
                "pool": pool,
                "count": row.count,
                "reasons": row.reasons,
                "oldest_failure": dlq.iso_time(row.oldest_ms),
                "newest_failure": dlq.iso_time(row.newest_ms),
            }
            for pool, row in summary.pools.items()
        ],
    }


def _show_json(d: dlq.DeadLetter) -> dict[str, Any]:
    return {**d.envelope(), "headers": _jsonable(dict(d.headers)), "body": d.body_text()}


def _jsonable(value: object) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, bytes):
        return value.decode("utf-8", "backslashreplace")
    if isinstance(value, datetime):
        return value.isoformat()
    if value is None or isinstance(value, str | int | float | bool):
        return value
    return str(value)


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
