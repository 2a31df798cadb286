"""`memory-worker run`: consume and store until SIGTERM or SIGINT; a later second one forces it."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import time

import structlog

from worker.cli.common import Subparsers, add_settings_flags
from worker.exitcodes import EXIT_FORCED, EXIT_OK
from worker.runner import run as run_async
from worker.service import Service
from worker.settings import Settings

log = structlog.get_logger("worker.cli")
SAME_SIGNAL_S = 0.5  # signals closer than this are one request to stop


def add_parser(sub: Subparsers) -> None:
    """Register `run` on the top-level subparsers."""
    parser = sub.add_parser(
        "run",
        help="consume the queue and store items",
        description="Consume the work queue and store each item in Session-Buddy, in parallel, "
        "until SIGTERM or SIGINT.",
    )
    parser.set_defaults(func=cmd_run)
    add_settings_flags(parser)


def cmd_run(args: argparse.Namespace, settings: Settings) -> int:
    """Consume and store until SIGTERM or SIGINT."""
    return run_async(_run(settings))


async def _run(settings: Settings) -> int:
    loop = asyncio.get_running_loop()
    service = Service(settings)
    first_signal_s: float | None = None

    def on_signal(signum: int) -> None:
        nonlocal first_signal_s
        now = time.monotonic()
        name = signal.Signals(signum).name
        if first_signal_s is not None and now - first_signal_s < SAME_SIGNAL_S:
            # A group-wide kill (a shell's Ctrl-C, `kill -- -PGID`, a supervisor) can deliver
            # the same request twice within milliseconds: it asks once for a graceful stop.
            return
        # Act before logging: with its log pipe gone (a dead reader), a log call raises and
        # the worker must still stop.
        if first_signal_s is not None:
            # Unacked deliveries go back to the queue when our connection drops.
            with contextlib.suppress(OSError):
                log.warning("forced_exit", signal=name)
            os._exit(EXIT_FORCED)
        first_signal_s = now
        service.stop()
        with contextlib.suppress(OSError):
            log.info("shutdown_requested", signal=name)

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_signal, signum)
    async with service:
        await service.wait()
    return EXIT_OK
