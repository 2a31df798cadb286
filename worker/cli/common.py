"""What the subcommands share: settings flags, argument types, the event-loop runner, output."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Coroutine, Iterator
from contextlib import contextmanager
from typing import Any, TypeAlias

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

from worker import dlq
from worker.broker import BrokerRefused, BrokerUnavailable
from worker.exitcodes import EXIT_CONFIG, EXIT_FAILED, EXIT_OK, EXIT_UNAVAILABLE
from worker.runner import run as run_async
from worker.settings import Settings, load_settings

# What `add_subparsers` returns; each subcommand module registers itself on it.
Subparsers: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"

# flag, settings path, type, help
FLAGS: tuple[tuple[str, tuple[str, str], Callable[[str], Any], str], ...] = (
    ("--concurrency", ("pools", "max_concurrent_memory_insertions"), int, "inserts at once"),
    ("--session-buddy-url", ("pools", "session_buddy_url"), str, "Session-Buddy MCP URL"),
    ("--rabbitmq-url", ("rabbitmq", "url"), str, "amqp://user:pass@host:port/vhost[,amqp://...]"),
    ("--queue", ("rabbitmq", "queue"), str, "work queue"),
    ("--dead-letter-queue", ("rabbitmq", "dead_letter_queue"), str, "dead-letter queue"),
    ("--sink", ("sink", "kind"), str, "mcp or http"),
    ("--timeout-s", ("sink", "timeout_s"), float, "per-item timeout"),
    ("--grace-s", ("worker", "grace_s"), float, "shutdown grace period"),
    ("--ops-port", ("worker", "ops_port"), int, "ops HTTP port (0: any free port, -1: off)"),
    ("--log-format", ("worker", "log_format"), str, "auto, json or console"),
)


# What the broker-only tools read; the worker and `check` read every flag. `publish` sends to
# the work queue only, and the dlq commands other than replay read the dead-letter queue only.
BROKER_FLAGS = ("--rabbitmq-url", "--queue", "--dead-letter-queue", "--log-format")
PUBLISH_FLAGS = ("--rabbitmq-url", "--queue", "--log-format")
DLQ_FLAGS = ("--rabbitmq-url", "--dead-letter-queue", "--log-format")


def add_settings_flags(parser: argparse.ArgumentParser, only: tuple[str, ...] = ()) -> None:
    """Flags that override settings: all of them, or `only` those the subcommand reads."""
    group = parser.add_argument_group("settings (override YAML and MAHAVISHNU_* env vars)")
    group.add_argument("--config", help="YAML settings file(s), separated by ':'")
    for flag, _, kind, text in FLAGS:
        if not only or flag in only:
            group.add_argument(flag, type=kind, help=text)


def settings_from_args(args: argparse.Namespace) -> Settings:
    """Load settings with the CLI flags on top."""
    overrides: dict[str, dict[str, Any]] = {}
    for flag, (section, field), _, _ in FLAGS:
        value = getattr(args, flag.lstrip("-").replace("-", "_"), None)
        if value is not None:
            overrides.setdefault(section, {})[field] = value
    return load_settings(overrides, config=getattr(args, "config", None))


#: The width of piped output: wide enough that no line or table is folded to fit.
PIPED_WIDTH = 1000


def console(stderr: bool = False) -> Console:
    """A rich console that wraps only on a terminal: piped output keeps one line per line.

    Off a terminal rich would fold lines and tables to 80 columns; there it gets a width no
    row reaches, unless COLUMNS names one.
    """
    stream = sys.stderr if stderr else sys.stdout
    if stream.isatty():
        return Console(stderr=stderr)
    width = None if os.environ.get("COLUMNS") else PIPED_WIDTH
    return Console(stderr=stderr, soft_wrap=True, width=width)


def positive_int(text: str) -> int:
    """An argument type: an integer of at least 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def positive_float(text: str) -> float:
    """An argument type: a number greater than 0."""
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError("must be greater than 0")
    return value


def run_tool(main: Coroutine[Any, Any, int]) -> int:
    """Run a `publish` or `dlq` coroutine; a closed stdout, no broker or a DLQ error end it."""
    try:
        return run_async(main)
    except BrokenPipeError:
        # The reader (`| head`) has what it wanted; Python would otherwise complain at exit.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK
    except (BrokerUnavailable, dlq.DlqError) as exc:
        console(stderr=True).print(f"[red]memory-worker:[/] {escape(str(exc))}")
        if isinstance(exc, BrokerRefused):
            return EXIT_CONFIG
        return EXIT_UNAVAILABLE if isinstance(exc, BrokerUnavailable) else EXIT_FAILED


@contextmanager
def progress(console: Console, description: str, total: int) -> Iterator[Any]:
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
    with Progress(*columns, console=console) as bar:
        task = bar.add_task(description, total=total)

        def update(done: int, new_total: int | None = None) -> None:
            bar.update(task, completed=done, total=new_total or total)

        yield update
