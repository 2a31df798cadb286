"""`memory-worker run`: consume and store until SIGTERM or SIGINT; a second signal exits at once."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal

import structlog

from worker.cli.common import Subparsers, add_settings_flags
from worker.exitcodes import EXIT_FORCED, EXIT_OK
from worker.runner import run as run_async
from worker.service import Service
from worker.settings import Settings

log = structlog.get_logger("worker.cli")


def add_parser(sub: Subparsers) -> None:
    """Register `run` on the top-level subparsers."""
    parser = sub.add_parser("run", help="consume the queue and store items")
    parser.set_defaults(func=cmd_run)
    add_settings_flags(parser)


def cmd_run(args: argparse.Namespace, settings: Settings) -> int:
    """Consume and store until SIGTERM or SIGINT."""
    return run_async(_run(settings))


async def _run(settings: Settings) -> int:
    loop = asyncio.get_running_loop()
    service = Service(settings)
    signals = 0

    def on_signal(signum: int) -> None:
        nonlocal signals
        signals += 1
        name = signal.Signals(signum).name
        # Act before logging: with its log pipe gone (a dead reader), a log call raises and
        # the worker must still stop.
        if signals > 1:
            # Unacked deliveries go back to the queue when our connection drops.
            with contextlib.suppress(OSError):
                log.warning("forced_exit", signal=name)
            os._exit(EXIT_FORCED)
        service.stop()
        with contextlib.suppress(OSError):
            log.info("shutdown_requested", signal=name)

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_signal, signum)
    async with service:
        await service.wait()
    return EXIT_OK
