"""`memory-worker demo`: its arguments; the demo itself is `worker.demo`."""

from __future__ import annotations

import argparse

from worker.cli.common import Subparsers, add_settings_flags
from worker.demo import run_demo
from worker.logs import configure_logging
from worker.runner import run as run_async
from worker.settings import Settings


def add_parser(sub: Subparsers) -> None:
    """Register `demo` on the top-level subparsers."""
    parser = sub.add_parser(
        "demo",
        help="a self-contained demo on local defaults",
        description="Publish sample items, store them through a stand-in Session-Buddy on "
        "loopback, and print ACT-008's figures.",
    )
    parser.add_argument("--items", type=int, default=500, help="valid items to publish")
    parser.add_argument("--latency-ms", type=float, default=20.0, help="stand-in store latency")
    parser.set_defaults(func=cmd_demo)
    add_settings_flags(parser, only=("--concurrency", "--rabbitmq-url", "--log-format"))


def cmd_demo(args: argparse.Namespace, settings: Settings) -> int:
    """Publish sample items to a local stand-in Session-Buddy and show what happens."""
    # The demo reports every outcome itself; per-message log lines would bury the display.
    configure_logging("console", "error")
    return run_async(run_demo(settings, items=args.items, latency_ms=args.latency_ms))
