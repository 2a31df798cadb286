"""`memory-worker console`: the dead letters and the workers in a browser, until SIGTERM."""

from __future__ import annotations

import argparse
import asyncio
import signal

import structlog
from rich.markup import escape

from worker.cli.common import (
    BROKER_FLAGS,
    Subparsers,
    add_settings_flags,
    console,
    positive_float,
    run_tool,
)
from worker.console.server import ConsoleServer, bind_refusal
from worker.exitcodes import EXIT_OK, EXIT_USAGE
from worker.settings import Settings

log = structlog.get_logger("worker.cli")


def add_parser(sub: Subparsers) -> None:
    """Register `console` on the top-level subparsers."""
    parser = sub.add_parser(
        "console",
        help="work the dead letters and watch the workers in a browser",
        description="Serve a web page: queues and workers live, dead letters grouped by "
        "reason, replay and purge. Listens on loopback unless told otherwise.",
    )
    parser.add_argument("--host", help="address to listen on (default console.host, 127.0.0.1)")
    parser.add_argument("--port", type=int, help="port (default console.port, 9470; 0: any)")
    parser.add_argument(
        "--read-only", action="store_true", help="show everything, change nothing (405)"
    )
    parser.add_argument(
        "--insecure",
        action="store_true",
        help="allow a non-loopback address without console.token",
    )
    parser.add_argument(
        "--replay-rate",
        type=positive_float,
        help="default replay pace, messages a second (console.replay_rate_per_s, 50)",
    )
    parser.set_defaults(func=cmd_console)
    add_settings_flags(parser, only=BROKER_FLAGS)


def cmd_console(args: argparse.Namespace, settings: Settings) -> int:
    """Serve the console until SIGTERM or SIGINT."""
    host = args.host or settings.console.host
    port = settings.console.port if args.port is None else args.port
    refusal = bind_refusal(host, settings.console.token, args.insecure)
    if refusal is not None:
        console(stderr=True).print(f"[red]memory-worker:[/] {escape(refusal)}")
        return EXIT_USAGE
    if args.replay_rate is not None:
        settings.console.replay_rate_per_s = args.replay_rate
    return run_tool(_serve(settings, host, port, read_only=args.read_only))


async def _serve(settings: Settings, host: str, port: int, *, read_only: bool) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    async with ConsoleServer(settings, host, port, read_only=read_only) as server:
        log.info("console_started", url=server.url, read_only=read_only)
        print(f"memory-worker console on {server.url}", flush=True)
        await stop.wait()
    log.info("console_stopped")
    return EXIT_OK
