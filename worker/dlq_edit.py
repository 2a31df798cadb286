"""Replay and purge: the operations that take dead letters off the queue.

Replay publishes a copy with confirms and acks the dead letter only after the confirm: a kill
between the two leaves one message both replayed and still dead-lettered, never neither. Purge
acks only what the filter (and, when given, the fingerprints an operator was shown) selects.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import aio_pika
from aio_pika.abc import AbstractConnection, AbstractIncomingMessage
from aio_pika.exceptions import CONNECTION_EXCEPTIONS

from worker.dlq import DlqSession, Held, Progress
from worker.dlq_model import DeadLetter, Filter, current_ms
from worker.headers import replay_headers
from worker.publisher import Publisher, PublishFailed
from worker.settle import copy_message
from worker.topology import Topology

#: Awaited before each replayed message: None to go on (it may wait first, e.g. while the
#: sink's breaker is open), else why the replay stops (e.g. "cancelled").
Gate = Callable[[], Awaitable[str | None]]


def replay_copy(message: AbstractIncomingMessage) -> aio_pika.Message:
    """The original body and properties, failure headers removed, replay count incremented."""
    return copy_message(message, replay_headers(message.headers or {}))


@dataclass(slots=True)
class ReplayReport:
    """What a replay did; `duplicate` is a message replayed whose DLQ copy could not be acked."""

    depth: int = 0
    seen: int = 0
    consumers: int = 0
    matched: list[DeadLetter] = field(default_factory=list)
    replayed: int = 0
    error: str | None = None
    duplicate: DeadLetter | None = None
    missing: int = 0
    returned: int = 0
    replayed_ids: set[str] = field(default_factory=set)


async def replay(
    connection: AbstractConnection,
    topology: Topology,
    flt: Filter,
    *,
    dry_run: bool = False,
    rate_per_s: float | None = None,
    limit: int | None = None,
    on_progress: Progress | None = None,
    only: Counter[str] | None = None,
    gate: Gate | None = None,
    stop_on_return: bool = False,
    report: ReplayReport | None = None,
) -> ReplayReport:
    """Send matching dead letters back to the work queue, each exactly once, in DLQ order.

    Each is published with confirms and only then acked; on the first failure the replay stops
    and everything not yet replayed stays in the DLQ, in order. With `only`, at most those
    fingerprints (what an operator was shown); with `stop_on_return`, the replay stops once a
    message it replayed is dead-lettered again, instead of feeding the same failures round.
    `report`, when given, is filled in as the replay goes, for a caller showing progress.
    """
    report = report if report is not None else ReplayReport()
    remaining = Counter(only) if only is not None else None
    step = _Step(_Pacer(rate_per_s), gate, stop_on_return)
    now_ms = current_ms()
    session = DlqSession(connection, topology.dead_letter_queue, limit=limit)
    async with session, Publisher(connection, topology) as publisher:
        report.depth, report.consumers = session.depth, session.consumers
        async for held in session:
            report.seen += 1
            if flt.matches(held.letter, now_ms) and _take(remaining, held.letter.fingerprint):
                report.matched.append(held.letter)
                if not dry_run and not await step.replay(session, publisher, held, report):
                    break
            if on_progress is not None:
                on_progress(report.seen, session.target)
    # Only a replay that read to the end knows that the copies it did not meet are gone.
    if remaining is not None and report.error is None:
        report.missing = sum(remaining.values())
    return report


@dataclass(slots=True)
class _Step:
    """One replayed message: pace, ask the gate, check for returns, publish, ack."""

    pace: _Pacer
    gate: Gate | None
    stop_on_return: bool

    async def replay(
        self, session: DlqSession, publisher: Publisher, held: Held, report: ReplayReport
    ) -> bool:
        await self.pace.wait()
        if self.gate is not None and (stop := await self.gate()) is not None:
            report.error = stop
            return False
        if self.stop_on_return:
            report.returned = sum(1 for d in session.late if d.id in report.replayed_ids)
            if report.returned:
                report.error = (
                    f"{report.returned} replayed message(s) came back to the DLQ; replay stopped"
                )
                return False
        if not await _replay_one(session, publisher, held, report):
            return False
        report.replayed_ids.add(held.letter.id)
        return True


async def _replay_one(
    session: DlqSession, publisher: Publisher, held: Held, report: ReplayReport
) -> bool:
    try:
        await publisher.publish_message(replay_copy(held.message), routing_key=None)
    except PublishFailed as exc:
        report.error = f"publish of {held.letter.id} not confirmed, replay stopped: {exc}"
        return False
    try:
        await session.ack(held)
    except CONNECTION_EXCEPTIONS as exc:
        report.duplicate = held.letter
        report.error = f"replayed {held.letter.id} but could not remove it from the DLQ: {exc!r}"
        return False
    report.replayed += 1
    return True


@dataclass(slots=True)
class PurgeReport:
    """What a purge removed, how many confirmed ones it no longer found, and why it stopped."""

    depth: int = 0
    seen: int = 0
    consumers: int = 0
    removed: list[DeadLetter] = field(default_factory=list)
    missing: int = 0
    error: str | None = None


async def purge(
    connection: AbstractConnection,
    queue: str,
    flt: Filter,
    *,
    only: Counter[str] | None = None,
    limit: int | None = None,
    on_progress: Progress | None = None,
    report: PurgeReport | None = None,
) -> PurgeReport:
    """Remove matching dead letters; with `only`, at most those fingerprints (what was shown)."""
    report = report if report is not None else PurgeReport()
    remaining = Counter(only) if only is not None else None
    now_ms = current_ms()
    async with DlqSession(connection, queue, limit=limit) as session:
        report.depth, report.consumers = session.depth, session.consumers
        async for held in session:
            report.seen += 1
            letter = held.letter
            if flt.matches(letter, now_ms) and _take(remaining, letter.fingerprint):
                try:
                    await session.ack(held)
                except CONNECTION_EXCEPTIONS as exc:
                    report.error = f"channel closed, purge stopped: {exc!r}"
                    break
                report.removed.append(letter)
            if on_progress is not None:
                on_progress(report.seen, session.target)
    report.missing = sum(remaining.values()) if remaining is not None else 0
    return report


def _take(remaining: Counter[str] | None, fingerprint: str) -> bool:
    if remaining is None:
        return True
    if remaining[fingerprint] <= 0:
        return False
    remaining[fingerprint] -= 1
    return True


class _Pacer:
    """Spaces calls to at most `rate_per_s` a second."""

    def __init__(self, rate_per_s: float | None) -> None:
        self._interval_s = 1.0 / rate_per_s if rate_per_s else 0.0
        self._next = 0.0

    async def wait(self) -> None:
        if not self._interval_s:
            return
        now = time.monotonic()
        if now < self._next:
            await asyncio.sleep(self._next - now)
        self._next = max(now, self._next) + self._interval_s
