"""`memory-worker dlq`: the subcommands' arguments and the filters they share.

`dlq_inspect` runs stats, list and show; `dlq_change` runs replay and purge. Exit codes: 0
done; 1 not done (replay stopped, purge declined, id not found, queue missing); 69 no broker.
"""

from __future__ import annotations

import argparse
import re

from worker.cli import dlq_change, dlq_inspect
from worker.cli.common import (
    BROKER_FLAGS,
    DLQ_FLAGS,
    Subparsers,
    add_settings_flags,
    console,
    positive_float,
    positive_int,
    run_tool,
)
from worker.dlq import MAX_HOLD
from worker.dlq_model import Filter
from worker.exitcodes import EXIT_USAGE
from worker.outcome import PERMANENT, Reason
from worker.settings import Settings

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*$")
_UNIT_S = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


def add_parser(sub: Subparsers) -> None:
    """Register `dlq` and its subcommands on the top-level subparsers."""
    parser = sub.add_parser(
        "dlq",
        help="inspect, replay and purge the dead-letter queue",
        description="Inspect, replay and purge dead letters; each carries why it failed.",
    )
    commands = parser.add_subparsers(dest="dlq_command", required=True)
    stats = commands.add_parser(
        "stats",
        help="depth, reasons, failure times, pools",
        description="Depth of the dead-letter queue; its messages by reason, time and pool.",
    )
    stats.add_argument("--json", action="store_true", help="machine-readable output")
    stats.set_defaults(func=cmd_dlq_stats)
    listing = commands.add_parser(
        "list",
        help="list dead letters without removing any",
        description="List dead letters, filtered, without removing any.",
    )
    _add_filters(listing)
    listing.add_argument("--json", action="store_true", help="one JSON object per line")
    listing.set_defaults(func=cmd_dlq_list)
    show = commands.add_parser(
        "show",
        help="the failure envelope and body of one message",
        description="The failure envelope (reason, attempts, times) and body of one message.",
    )
    show.add_argument("id", help="message id (the idempotency key), or a unique prefix of it")
    show.add_argument("--json", action="store_true", help="machine-readable output")
    show.set_defaults(func=cmd_dlq_show)
    replay = commands.add_parser(
        "replay",
        help="send dead letters back to the work queue",
        description="Send the selected dead letters back to the work queue, with confirms.",
    )
    _add_filters(replay, selecting=True)
    replay.add_argument("--dry-run", action="store_true", help="list what would be replayed")
    replay.add_argument("--rate", type=positive_float, help="at most this many messages a second")
    replay.add_argument(
        "--force", action="store_true", help="replay reasons a retry cannot fix (e.g. schema)"
    )
    replay.set_defaults(func=cmd_dlq_replay)
    purge = commands.add_parser(
        "purge",
        help="remove dead letters for good",
        description="Remove the selected dead letters for good.",
    )
    _add_filters(purge, selecting=True)
    purge.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    purge.set_defaults(func=cmd_dlq_purge)
    for command in (stats, listing, show, purge):
        add_settings_flags(command, only=DLQ_FLAGS)
    add_settings_flags(replay, only=BROKER_FLAGS)


def _add_filters(parser: argparse.ArgumentParser, *, selecting: bool = False) -> None:
    group = parser.add_argument_group("filters (all given must match)")
    if selecting:
        group.add_argument(
            "--id", action="append", default=[], help="message id or its prefix (repeatable)"
        )
        group.add_argument("--all", action="store_true", help="every dead letter")
    group.add_argument(
        "--reason",
        action="append",
        default=[],
        type=reason_name,
        help="failure reason (repeatable): " + ", ".join(sorted(REASONS)),
    )
    group.add_argument("--pool", action="append", default=[], help="metadata.pool_id (repeatable)")
    group.add_argument("--older-than", type=parse_duration, help="failed longer ago, e.g. 2h")
    group.add_argument("--newer-than", type=parse_duration, help="failed more recently, e.g. 15m")
    group.add_argument("--grep", help="text in the id, reason, detail, worker, pool or body")
    group.add_argument(
        "--limit", type=positive_int, help=f"read at most this many (max {MAX_HOLD})"
    )


def parse_duration(text: str) -> float:
    """Seconds in '90', '90s', '15m', '2h' or '1.5d'."""
    match = _DURATION.match(text)
    if match is None:
        raise argparse.ArgumentTypeError(f"{text!r} is not a duration like 90s, 15m, 2h or 3d")
    return float(match[1]) * _UNIT_S[match[2]]


# Ours (x-mw-reason), then the broker's own (x-death) for what it dead-lettered itself.
REASONS = frozenset({*(r.value for r in Reason), "delivery_limit", "rejected", "expired", "maxlen"})


def reason_name(text: str) -> str:
    """An argument type: a dead-letter reason that exists."""
    if text not in REASONS:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a reason; the reasons are {', '.join(sorted(REASONS))}"
        )
    return text


def filter_from_args(args: argparse.Namespace) -> Filter:
    """The dead letters the filter flags choose."""
    return Filter(
        ids=frozenset(getattr(args, "id", None) or ()),
        reasons=frozenset(args.reason),
        pools=frozenset(args.pool),
        older_than_s=args.older_than,
        newer_than_s=args.newer_than,
        text=args.grep,
    )


def cmd_dlq_stats(args: argparse.Namespace, settings: Settings) -> int:
    """Depth, a histogram of reasons, oldest and newest failure, per pool."""
    return run_tool(dlq_inspect.stats(settings, as_json=args.json))


def cmd_dlq_list(args: argparse.Namespace, settings: Settings) -> int:
    """List dead letters, filtered; the queue is left exactly as it was."""
    flt = filter_from_args(args)
    return run_tool(dlq_inspect.list_letters(settings, flt, limit=args.limit, as_json=args.json))


def cmd_dlq_show(args: argparse.Namespace, settings: Settings) -> int:
    """The failure envelope and body of the dead letters with this id."""
    return run_tool(dlq_inspect.show(settings, args.id, as_json=args.json))


def cmd_dlq_replay(args: argparse.Namespace, settings: Settings) -> int:
    """Send dead letters back to the work queue with their retry counters reset."""
    flt = filter_from_args(args)
    if not _selected(flt, args):
        return EXIT_USAGE
    hopeless = sorted(flt.reasons & PERMANENT) if not args.force else []
    if hopeless:
        console(stderr=True).print(
            f"replaying {', '.join(hopeless)} cannot succeed: the worker refuses such a message "
            "again. Fix the items and publish them anew, or pass --force to replay anyway."
        )
        return EXIT_USAGE
    replay = dlq_change.replay(
        settings, flt, dry_run=args.dry_run, rate_per_s=args.rate, limit=args.limit
    )
    return run_tool(replay)


def cmd_dlq_purge(args: argparse.Namespace, settings: Settings) -> int:
    """Remove matching dead letters for good, after confirmation."""
    flt = filter_from_args(args)
    if not _selected(flt, args):
        return EXIT_USAGE
    return run_tool(dlq_change.purge(settings, flt, yes=args.yes, limit=args.limit))


def _selected(flt: Filter, args: argparse.Namespace) -> bool:
    # Replay and purge act on every dead letter only when asked to in so many words.
    if flt.is_empty and not args.all:
        console(stderr=True).print("choose what to act on: --id, --reason, --pool, ... or --all")
        return False
    return True
