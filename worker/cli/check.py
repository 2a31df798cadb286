"""`memory-worker check`: `run`'s preflight as a dry run; one line per part, `run`'s exit code."""

from __future__ import annotations

import argparse

from worker.cli.common import Subparsers, add_settings_flags
from worker.exitcodes import EXIT_OK
from worker.preflight import check
from worker.runner import run as run_async
from worker.settings import Settings


def add_parser(sub: Subparsers) -> None:
    """Register `check` on the top-level subparsers."""
    parser = sub.add_parser(
        "check",
        help="check the broker and Session-Buddy are reachable",
        description="Check the settings, the broker and Session-Buddy as `run` would; "
        "exit 0 when all are usable.",
    )
    parser.set_defaults(func=cmd_check)
    add_settings_flags(parser)


def cmd_check(args: argparse.Namespace, settings: Settings) -> int:
    """Check what `run` would check, change nothing; exit 0 when `run` would start."""
    return run_async(_check(settings))


async def _check(settings: Settings) -> int:
    findings = await check(settings)
    for name, problem, _ in findings:
        print(f"{name}: {'ok' if problem is None else 'FAILED: ' + problem}")
    # The exit code `run` would end with: the first failure's (78 settings, 69 no broker, ...).
    return next((f.code for f in findings if f.problem is not None), EXIT_OK)
