"""The parser and `main`: load settings once, run one subcommand, turn errors into exit codes."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from worker import __version__
from worker.broker import BrokerRefused, BrokerUnavailable
from worker.cli import check, console, demo, dlq, publish, run
from worker.cli.common import settings_from_args
from worker.exitcodes import EXIT_CONFIG, EXIT_FORCED, EXIT_SOFTWARE, EXIT_UNAVAILABLE
from worker.logs import configure_logging
from worker.settings import SettingsError
from worker.sink import SinkConfigError
from worker.steering import SteeringCrashed
from worker.topology import TopologyError


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every subcommand."""
    parser = argparse.ArgumentParser(
        prog="memory-worker",
        description="Store memory items from RabbitMQ in Session-Buddy, in parallel.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for family in (run, check, demo, publish, dlq, console):
        family.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `memory-worker` console script."""
    args = build_parser().parse_args(argv)
    try:
        settings = settings_from_args(args)
    except SettingsError as exc:
        return _fail(exc, EXIT_CONFIG)
    configure_logging(settings.worker.log_format, settings.worker.log_level)
    try:
        code: int = args.func(args, settings)
    except (TopologyError, SinkConfigError) as exc:
        return _fail(exc, EXIT_CONFIG)
    except BrokerRefused as exc:
        return _fail(exc, EXIT_CONFIG)
    except BrokerUnavailable as exc:
        return _fail(exc, EXIT_UNAVAILABLE)
    except SteeringCrashed as exc:
        return _fail(exc, EXIT_SOFTWARE)
    except KeyboardInterrupt:
        return EXIT_FORCED
    return code


def _fail(exc: Exception, code: int) -> int:
    print(f"memory-worker: {exc}", file=sys.stderr)
    return code
