"""`memory-worker publish`: validate every line of a JSONL file first, then publish with confirms.

Exit codes: 0 every item confirmed; 1 some not confirmed (each listed with its line); 2 the
file cannot be read; 65 invalid lines and nothing published; 69 no broker.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import BinaryIO

from rich.markup import escape

from worker.cli.common import (
    PUBLISH_FLAGS,
    Subparsers,
    add_settings_flags,
    console,
    positive_int,
    progress,
    run_tool,
)
from worker.exitcodes import EXIT_DATAERR, EXIT_FAILED, EXIT_OK, EXIT_USAGE
from worker.models import MemoryItem, decode_item, too_large
from worker.outcome import Reason
from worker.publisher import PublishResult, open_publisher
from worker.settings import Settings
from worker.strict_json import DecodeError
from worker.summary import blank_refusal

SHOWN_ERRORS = 20


def add_parser(sub: Subparsers) -> None:
    """Register `publish` on the top-level subparsers."""
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
        "--max-outstanding", type=positive_int, default=256, help="confirms pending at once"
    )
    publish.set_defaults(func=cmd_publish)
    add_settings_flags(publish, only=PUBLISH_FLAGS)


def cmd_publish(args: argparse.Namespace, settings: Settings) -> int:
    """Validate a JSONL file (or stdin) line by line, then publish it with confirms."""
    err = console(stderr=True)
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
    return run_tool(_publish(items, len(bad), args.max_outstanding, settings))


async def _publish(
    items: list[tuple[int, MemoryItem]], skipped: int, max_outstanding: int, settings: Settings
) -> int:
    out, err = console(), console(stderr=True)
    failures: list[PublishResult] = []
    # Robust: an item whose node is lost before its confirm is sent again on the next node.
    async with open_publisher(settings, purpose="publish") as publisher:
        with progress(err, "publishing", len(items)) as advance:
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
        sink = settings.sink
        if why := blank_refusal(item, sink):
            bad.append((number, f"{Reason.SCHEMA.value}: {why}"))
            continue
        if sink.oversize == "dead_letter" and (
            why := too_large(item.content, sink.max_content_chars)
        ):
            # The worker would dead-letter it: refuse it here, before it is sent.
            bad.append((number, f"{Reason.TOO_LARGE.value}: {why}"))
            continue
        items.append((number, item))
    return items, bad
