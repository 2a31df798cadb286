"""`memory-worker check`: reach the broker, Session-Buddy and the ledger; print one line each."""

from __future__ import annotations

import argparse

from worker.cli.common import Subparsers, add_settings_flags
from worker.exitcodes import EXIT_FAILED, EXIT_OK
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
    """Reach the broker and Session-Buddy; exit 0 when both answer."""
    return run_async(_check(settings))


async def _check(settings: Settings) -> int:
    problems = await check(settings)
    for name, problem in problems.items():
        print(f"{name}: {'ok' if problem is None else 'FAILED: ' + problem}")
    return EXIT_OK if all(p is None for p in problems.values()) else EXIT_FAILED
