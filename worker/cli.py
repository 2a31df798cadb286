"""The `memory-worker` command: run, check, demo. Exit codes are named below."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import sys
from collections.abc import Callable, Sequence
from typing import Any

import structlog

from worker.logs import configure_logging
from worker.runner import run as run_async
from worker.settings import Settings, SettingsError, load_settings

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_UNAVAILABLE = 69
EXIT_CONFIG = 78
EXIT_FORCED = 130

log = structlog.get_logger("worker.cli")

# flag, settings path, type, help
FLAGS: tuple[tuple[str, tuple[str, str], Callable[[str], Any], str], ...] = (
    ("--concurrency", ("pools", "max_concurrent_memory_insertions"), int, "inserts at once"),
    ("--session-buddy-url", ("pools", "session_buddy_url"), str, "Session-Buddy MCP URL"),
    ("--rabbitmq-url", ("rabbitmq", "url"), str, "amqp://user:pass@host:port/vhost"),
    ("--queue", ("rabbitmq", "queue"), str, "work queue"),
    ("--dead-letter-queue", ("rabbitmq", "dead_letter_queue"), str, "dead-letter queue"),
    ("--sink", ("sink", "kind"), str, "mcp or http"),
    ("--timeout-s", ("sink", "timeout_s"), float, "per-item timeout"),
    ("--grace-s", ("worker", "grace_s"), float, "shutdown grace period"),
    ("--ops-port", ("worker", "ops_port"), int, "ops HTTP port (0: any free port, -1: off)"),
    ("--log-format", ("worker", "log_format"), str, "auto, json or console"),
)


def add_settings_flags(parser: argparse.ArgumentParser) -> None:
    """Flags that override settings, shared by every subcommand."""
    group = parser.add_argument_group("settings (override YAML and MAHAVISHNU_* env vars)")
    group.add_argument("--config", help="YAML settings file(s), separated by ':'")
    for flag, _, kind, text in FLAGS:
        group.add_argument(flag, type=kind, help=text)


def settings_from_args(args: argparse.Namespace) -> Settings:
    """Load settings with the CLI flags on top."""
    if getattr(args, "config", None):
        os.environ["MEMORY_WORKER_CONFIG"] = args.config
    overrides: dict[str, dict[str, Any]] = {}
    for flag, (section, field), _, _ in FLAGS:
        value = getattr(args, flag.lstrip("-").replace("-", "_"), None)
        if value is not None:
            overrides.setdefault(section, {})[field] = value
    return load_settings(overrides)


async def _run(settings: Settings) -> int:
    from worker.service import Service

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


async def _check(settings: Settings) -> int:
    from worker.service import check

    problems = await check(settings)
    for name, problem in problems.items():
        print(f"{name}: {'ok' if problem is None else 'FAILED: ' + problem}")
    return EXIT_OK if all(p is None for p in problems.values()) else EXIT_FAILED


def cmd_run(args: argparse.Namespace, settings: Settings) -> int:
    """Consume and store until SIGTERM or SIGINT."""
    return run_async(_run(settings))


def cmd_check(args: argparse.Namespace, settings: Settings) -> int:
    """Reach the broker and Session-Buddy; exit 0 when both answer."""
    return run_async(_check(settings))


def cmd_demo(args: argparse.Namespace, settings: Settings) -> int:
    """Publish sample items to a local stand-in Session-Buddy and show what happens."""
    from worker.demo import run_demo

    # The demo reports every outcome itself; per-message log lines would bury the display.
    configure_logging("console", "error")
    return run_async(run_demo(settings, items=args.items, latency_ms=args.latency_ms))


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every subcommand."""
    parser = argparse.ArgumentParser(
        prog="memory-worker",
        description="Store memory items from RabbitMQ in Session-Buddy, in parallel.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="consume the queue and store items")
    run.set_defaults(func=cmd_run)
    check = sub.add_parser("check", help="check the broker and Session-Buddy are reachable")
    check.set_defaults(func=cmd_check)
    demo = sub.add_parser("demo", help="a self-contained demo on local defaults")
    demo.add_argument("--items", type=int, default=500, help="valid items to publish")
    demo.add_argument("--latency-ms", type=float, default=20.0, help="stand-in store latency")
    demo.set_defaults(func=cmd_demo)
    for command in (run, check, demo):
        add_settings_flags(command)
    from worker.commands import add_commands

    add_commands(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `memory-worker` console script."""
    args = build_parser().parse_args(argv)
    try:
        settings = settings_from_args(args)
    except SettingsError as exc:
        print(f"memory-worker: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    configure_logging(settings.worker.log_format, settings.worker.log_level)
    from worker.service import BrokerUnavailable
    from worker.sink import SinkConfigError
    from worker.topology import TopologyError

    try:
        code: int = args.func(args, settings)
    except (TopologyError, SinkConfigError) as exc:
        print(f"memory-worker: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except BrokerUnavailable as exc:
        print(f"memory-worker: {exc}", file=sys.stderr)
        return EXIT_UNAVAILABLE
    except KeyboardInterrupt:
        return EXIT_FORCED
    return code
