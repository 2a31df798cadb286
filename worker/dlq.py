"""Operator tools for the dead-letter queue: read it without disturbing it, replay, purge.

Reading leaves the queue as it was found. One channel consumes with a prefetch as large as the
queue and never acks what it only looked at; closing the channel hands every one of those back.
Measured on RabbitMQ 3.10, classic and quorum: messages handed back that way, or by a killed
process's dead connection, keep their order; messages taken with basic.get come back shuffled
on a quorum queue, so nothing here uses basic.get. Another consumer on the DLQ keeps what it
has taken: a read sees only what it leaves (`Snapshot.consumers` says whether there is one).

A quorum queue's channel holds back acks beyond 32 unapplied ones and drops them if the channel
closes first (the messages come back: duplicates, never losses). Cancelling the consumer sends
them and waits until the queue has applied them, so a session always cancels before it closes.

Replay publishes a copy with confirms and acks the dead letter only after the confirm: a kill
between the two leaves one message both replayed and still dead-lettered, never neither.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from types import TracebackType
from typing import Any, Self

import aio_pika
import aiormq
from aio_pika.abc import AbstractChannel, AbstractConnection, AbstractIncomingMessage
from aio_pika.exceptions import CONNECTION_EXCEPTIONS

from worker.models import idempotency_key
from worker.publisher import Publisher, PublishFailed
from worker.settle import copy_message
from worker.topology import (
    H_ATTEMPTS,
    H_DETAIL,
    H_FIRST_FAILURE_MS,
    H_LAST_FAILURE_MS,
    H_QUEUE,
    H_REASON,
    H_WORKER,
    Topology,
)

H_REPLAYED = "x-mw-replayed-from-dlq"
# AMQP's prefetch count is a 16-bit field: one channel can hold no more unacked messages.
MAX_HOLD = 65_535
IDLE_S = 1.0
SETTLE_TIMEOUT_S = 5.0
_MAX_POOL_PARSE_BYTES = 1_048_576
# Written by the broker; a replayed copy starts with a clean slate.
_BROKER_HEADERS = ("x-death", "x-delivery-count")
_BROKER_PREFIXES = ("x-first-death-", "x-last-death-", "x-mw-")

Progress = Callable[[int, int], None]


class DlqError(Exception):
    """The dead-letter queue cannot be read (missing, or the broker closed the channel)."""


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """One dead letter as read: why it failed, when, where, and the original message."""

    position: int
    id: str
    reason: str
    detail: str
    attempts: int | None
    first_failure_ms: int | None
    last_failure_ms: int | None
    worker: str | None
    source_queue: str | None
    pool: str | None
    replayed: int
    redelivered: bool
    content_type: str | None
    headers: Mapping[str, Any]
    body: bytes
    fingerprint: str

    def age_s(self, now_ms: int) -> float | None:
        """Seconds since the last failure, if known."""
        return None if self.last_failure_ms is None else (now_ms - self.last_failure_ms) / 1000

    def envelope(self) -> dict[str, Any]:
        """The failure envelope as JSON-ready values (the body is not included)."""
        return {
            "position": self.position,
            "id": self.id,
            "reason": self.reason,
            "detail": self.detail,
            "attempts": self.attempts,
            "first_failure": iso_time(self.first_failure_ms),
            "last_failure": iso_time(self.last_failure_ms),
            "worker": self.worker,
            "queue": self.source_queue,
            "pool": self.pool,
            "replayed": self.replayed,
            "content_type": self.content_type,
            "size": len(self.body),
        }

    def body_text(self) -> str:
        """The body as text, undecodable bytes escaped."""
        return self.body.decode("utf-8", "backslashreplace")


def read_letter(message: AbstractIncomingMessage, position: int) -> DeadLetter:
    """Parse a delivered dead letter; messages the broker dead-lettered carry only `x-death`."""
    headers: dict[str, Any] = dict(message.headers or {})
    raw_deaths = headers.get("x-death")
    deaths = (
        [d for d in raw_deaths if isinstance(d, Mapping)] if isinstance(raw_deaths, list) else []
    )
    death_ms = [ms for d in deaths if (ms := _epoch_ms(d.get("time"))) is not None]
    reason = _text(headers.get(H_REASON))
    if reason is None:
        reason = _text(deaths[0].get("reason")) if deaths else None
    source = _text(headers.get(H_QUEUE)) or (_text(deaths[0].get("queue")) if deaths else None)
    return DeadLetter(
        position=position,
        id=idempotency_key(message.message_id, message.body),
        reason=reason or "unknown",
        detail=_text(headers.get(H_DETAIL)) or "",
        attempts=_int(headers.get(H_ATTEMPTS)),
        first_failure_ms=_int(headers.get(H_FIRST_FAILURE_MS)) or min(death_ms, default=None),
        last_failure_ms=_int(headers.get(H_LAST_FAILURE_MS)) or max(death_ms, default=None),
        worker=_text(headers.get(H_WORKER)),
        source_queue=source,
        pool=_pool_of(message.body),
        replayed=_int(headers.get(H_REPLAYED)) or 0,
        redelivered=bool(message.redelivered),
        content_type=message.content_type,
        headers=headers,
        body=message.body,
        fingerprint=_fingerprint(message, headers),
    )


def replay_copy(message: AbstractIncomingMessage) -> aio_pika.Message:
    """The original body and properties, failure headers removed, replay count incremented."""
    headers = {
        k: v
        for k, v in (message.headers or {}).items()
        if k not in _BROKER_HEADERS and not k.startswith(_BROKER_PREFIXES)
    }
    headers[H_REPLAYED] = (_int((message.headers or {}).get(H_REPLAYED)) or 0) + 1
    return copy_message(message, headers)


@dataclass(frozen=True, slots=True)
class Filter:
    """Which dead letters an operation applies to; empty criteria match everything.

    An id matches itself or any prefix of it, so the shortened ids `list` prints work too.
    """

    ids: frozenset[str] = frozenset()
    reasons: frozenset[str] = frozenset()
    pools: frozenset[str] = frozenset()
    older_than_s: float | None = None
    newer_than_s: float | None = None
    text: str | None = None

    @property
    def is_empty(self) -> bool:
        """Whether this filter matches every dead letter."""
        return not (
            self.ids
            or self.reasons
            or self.pools
            or self.text
            or self.older_than_s is not None
            or self.newer_than_s is not None
        )

    def matches(self, letter: DeadLetter, now_ms: int) -> bool:
        """Whether `letter` meets every criterion given."""
        if self.ids and not any(letter.id.startswith(i) for i in self.ids):
            return False
        if self.reasons and letter.reason not in self.reasons:
            return False
        if self.pools and letter.pool not in self.pools:
            return False
        age = letter.age_s(now_ms)
        if self.older_than_s is not None and (age is None or age < self.older_than_s):
            return False
        if self.newer_than_s is not None and (age is None or age > self.newer_than_s):
            return False
        return self.text is None or self.text.lower() in _searchable(letter)


@dataclass(frozen=True, slots=True)
class Held:
    """A delivered dead letter still unacked on the session's channel."""

    letter: DeadLetter
    message: AbstractIncomingMessage


class DlqSession:
    """Reads the DLQ in order on one channel, holding everything; leaving hands back the rest."""

    def __init__(
        self,
        connection: AbstractConnection,
        queue: str,
        *,
        limit: int | None = None,
        idle_s: float = IDLE_S,
    ) -> None:
        self._connection = connection
        self._queue_name = queue
        self._limit = min(limit or MAX_HOLD, MAX_HOLD)
        self._idle_s = idle_s
        self._channel: AbstractChannel | None = None
        self._queue: aio_pika.abc.AbstractQueue | None = None
        self._tag: str | None = None
        self._inbox: asyncio.Queue[AbstractIncomingMessage] = asyncio.Queue()
        self.depth = 0
        self.consumers = 0
        self.target = 0

    async def __aenter__(self) -> Self:
        channel = await self._connection.channel(publisher_confirms=False)
        self._channel = channel
        try:
            queue = await channel.declare_queue(self._queue_name, passive=True)
        except aiormq.exceptions.ChannelNotFoundEntity:
            raise DlqError(f"queue {self._queue_name!r} does not exist") from None
        self._queue = queue
        declared = queue.declaration_result
        self.depth = declared.message_count or 0
        self.consumers = declared.consumer_count or 0
        self.target = min(self.depth, self._limit)
        if self.target:
            # A prefetch of 0 would mean "unlimited", which quorum queues cap at 2,000.
            await channel.set_qos(prefetch_count=self.target)
            self._tag = await queue.consume(self._deliver)
        return self

    async def _deliver(self, message: AbstractIncomingMessage) -> None:
        self._inbox.put_nowait(message)

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        channel = self._channel
        if channel is None or channel.is_closed:
            return
        # A channel that already failed has nothing to flush; the broker requeued its messages.
        with contextlib.suppress(*CONNECTION_EXCEPTIONS):
            if self._queue is not None and self._tag is not None:
                await self._queue.cancel(self._tag)
            await channel.close()
            if self._tag is not None:
                await self._wait_until_returned()

    async def _wait_until_returned(self) -> None:
        """Wait until the queue has taken back what this session held.

        close-ok does not mean the messages are back: a quorum queue returns them a moment
        later, when it drops the consumer, and a read starting in between would find the queue
        empty. Our consumer leaving the count is the sign; with other consumers coming and
        going the count may never show it, so the wait is bounded.
        """
        deadline = time.monotonic() + SETTLE_TIMEOUT_S
        async with self._connection.channel(publisher_confirms=False) as channel:
            while time.monotonic() < deadline:
                queue = await channel.declare_queue(self._queue_name, passive=True)
                if (queue.declaration_result.consumer_count or 0) <= self.consumers:
                    return
                await asyncio.sleep(0.01)

    async def __aiter__(self) -> AsyncIterator[Held]:
        position = 0
        while position < self.target:
            try:
                message = await asyncio.wait_for(self._inbox.get(), self._idle_s)
            except TimeoutError:
                if self._channel is not None and self._channel.is_closed:
                    raise DlqError("the broker closed the channel during the read") from None
                return  # another consumer took the rest, or they were never there
            yield Held(read_letter(message, position), message)
            position += 1

    async def ack(self, held: Held) -> None:
        """Remove a held dead letter from the queue."""
        await held.message.ack()


@dataclass(frozen=True, slots=True)
class Snapshot:
    """Everything one non-destructive read saw, in queue order."""

    queue: str
    depth: int
    consumers: int
    letters: tuple[DeadLetter, ...]
    read_at_ms: int

    @property
    def complete(self) -> bool:
        """Whether the read saw every message that was ready when it began."""
        return len(self.letters) >= self.depth

    def matching(self, flt: Filter) -> list[DeadLetter]:
        """The dead letters `flt` selects."""
        return [d for d in self.letters if flt.matches(d, self.read_at_ms)]


async def read(
    connection: AbstractConnection,
    queue: str,
    *,
    limit: int | None = None,
    idle_s: float = IDLE_S,
    on_progress: Progress | None = None,
) -> Snapshot:
    """Read the DLQ without changing it: every message goes back, in order."""
    letters: list[DeadLetter] = []
    async with DlqSession(connection, queue, limit=limit, idle_s=idle_s) as session:
        async for held in session:
            letters.append(held.letter)
            if on_progress is not None:
                on_progress(len(letters), session.target)
    return Snapshot(queue, session.depth, session.consumers, tuple(letters), current_ms())


@dataclass(frozen=True, slots=True)
class PoolStats:
    """Dead letters of one pool."""

    count: int
    reasons: dict[str, int]
    oldest_ms: int | None
    newest_ms: int | None


@dataclass(frozen=True, slots=True)
class Stats:
    """Depth, reasons, failure times and pools of the dead letters a read saw."""

    depth: int
    seen: int
    consumers: int
    reasons: dict[str, int]
    oldest_ms: int | None
    newest_ms: int | None
    pools: dict[str | None, PoolStats]


def stats(snapshot: Snapshot) -> Stats:
    """Summarise a snapshot; reasons and pools are sorted by count, largest first."""
    letters = snapshot.letters
    oldest, newest = _span(letters)
    by_pool: dict[str | None, list[DeadLetter]] = {}
    for letter in letters:
        by_pool.setdefault(letter.pool, []).append(letter)
    pools = {
        pool: PoolStats(len(group), _histogram(group), *_span(group))
        for pool, group in sorted(by_pool.items(), key=lambda kv: (-len(kv[1]), str(kv[0])))
    }
    return Stats(
        snapshot.depth, len(letters), snapshot.consumers, _histogram(letters), oldest, newest, pools
    )


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


async def replay(
    connection: AbstractConnection,
    topology: Topology,
    flt: Filter,
    *,
    dry_run: bool = False,
    rate_per_s: float | None = None,
    limit: int | None = None,
    on_progress: Progress | None = None,
) -> ReplayReport:
    """Send matching dead letters back to the work queue, each exactly once, in DLQ order.

    Each is published with confirms and only then acked; on the first failure the replay stops
    and everything not yet replayed stays in the DLQ, in order.
    """
    report = ReplayReport()
    pace = _Pacer(rate_per_s)
    now_ms = current_ms()
    session = DlqSession(connection, topology.dead_letter_queue, limit=limit)
    async with session, Publisher(connection, topology) as publisher:
        report.depth, report.consumers = session.depth, session.consumers
        async for held in session:
            report.seen += 1
            if flt.matches(held.letter, now_ms):
                report.matched.append(held.letter)
                if not dry_run and not await _replay_one(session, publisher, held, pace, report):
                    break
            if on_progress is not None:
                on_progress(report.seen, session.target)
    return report


async def _replay_one(
    session: DlqSession, publisher: Publisher, held: Held, pace: _Pacer, report: ReplayReport
) -> bool:
    await pace.wait()
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
) -> PurgeReport:
    """Remove matching dead letters; with `only`, at most those fingerprints (what was shown)."""
    report = PurgeReport()
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


def _histogram(letters: tuple[DeadLetter, ...] | list[DeadLetter]) -> dict[str, int]:
    return dict(Counter(d.reason for d in letters).most_common())


def _span(letters: tuple[DeadLetter, ...] | list[DeadLetter]) -> tuple[int | None, int | None]:
    times = [d.last_failure_ms for d in letters if d.last_failure_ms is not None]
    return min(times, default=None), max(times, default=None)


def _searchable(letter: DeadLetter) -> str:
    parts = (
        letter.id,
        letter.reason,
        letter.detail,
        letter.worker,
        letter.pool,
        letter.body_text(),
    )
    return "\n".join(p for p in parts if p).lower()


def _pool_of(body: bytes) -> str | None:
    """`metadata.pool_id` of a JSON body, if it has one; bad bodies are expected here."""
    if len(body) > _MAX_POOL_PARSE_BYTES:
        return None
    try:
        data = json.loads(body.decode("utf-8"))
    except (ValueError, RecursionError):
        return None
    metadata = data.get("metadata") if isinstance(data, dict) else None
    pool = metadata.get("pool_id") if isinstance(metadata, dict) else None
    return pool if isinstance(pool, str) else None


def _fingerprint(message: AbstractIncomingMessage, headers: Mapping[str, Any]) -> str:
    """Identity of one dead-lettered copy; stable across reads (the broker's count excluded)."""
    stable = sorted((k, repr(v)) for k, v in headers.items() if k != "x-delivery-count")
    digest = hashlib.sha256(message.body)
    digest.update(repr((message.message_id, stable)).encode("utf-8", "backslashreplace"))
    return digest.hexdigest()


def _text(value: object) -> str | None:
    if isinstance(value, bytes):
        return value.decode("utf-8", "backslashreplace")
    return value if isinstance(value, str) else None


def _int(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _epoch_ms(value: object) -> int | None:
    if isinstance(value, datetime):
        return round(value.timestamp() * 1000)
    return None


def iso_time(ms: int | None) -> str | None:
    """Epoch milliseconds as an ISO-8601 UTC time."""
    if ms is None:
        return None
    return datetime.fromtimestamp(ms / 1000, UTC).isoformat(timespec="milliseconds")


def current_ms() -> int:
    """The time now in epoch milliseconds."""
    return round(time.time() * 1000)
