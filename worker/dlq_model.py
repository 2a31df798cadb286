"""The dead-letter model: what a dead letter says, which ones a filter selects, their stats.

Pure functions over messages already delivered: reading the failure headers (ours, or the
broker's `x-death` for a message it dead-lettered itself), filtering, summarising. The queue
I/O that gets and settles them is `worker.dlq`'s.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from aio_pika.abc import AbstractIncomingMessage

from worker.headers import (
    H_ATTEMPTS,
    H_DETAIL,
    H_FIRST_FAILURE_MS,
    H_LAST_FAILURE_MS,
    H_QUEUE,
    H_REASON,
    H_WORKER,
    as_int,
    as_text,
    replay_count,
)
from worker.models import idempotency_key

_MAX_POOL_PARSE_BYTES = 1_048_576


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
    reason = as_text(headers.get(H_REASON))
    if reason is None:
        reason = as_text(deaths[0].get("reason")) if deaths else None
    source = as_text(headers.get(H_QUEUE)) or (as_text(deaths[0].get("queue")) if deaths else None)
    return DeadLetter(
        position=position,
        id=idempotency_key(message.message_id, message.body),
        reason=reason or "unknown",
        detail=as_text(headers.get(H_DETAIL)) or "",
        attempts=as_int(headers.get(H_ATTEMPTS)),
        first_failure_ms=as_int(headers.get(H_FIRST_FAILURE_MS)) or min(death_ms, default=None),
        last_failure_ms=as_int(headers.get(H_LAST_FAILURE_MS)) or max(death_ms, default=None),
        worker=as_text(headers.get(H_WORKER)),
        source_queue=source,
        pool=_pool_of(message.body),
        replayed=replay_count(headers),
        content_type=message.content_type,
        headers=headers,
        body=message.body,
        fingerprint=_fingerprint(message, headers),
    )


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
    oldest, newest = span(letters)
    by_pool: dict[str | None, list[DeadLetter]] = {}
    for letter in letters:
        by_pool.setdefault(letter.pool, []).append(letter)
    pools = {
        pool: PoolStats(len(group), _histogram(group), *span(group))
        for pool, group in sorted(by_pool.items(), key=lambda kv: (-len(kv[1]), str(kv[0])))
    }
    return Stats(
        snapshot.depth, len(letters), snapshot.consumers, _histogram(letters), oldest, newest, pools
    )


def _histogram(letters: tuple[DeadLetter, ...] | list[DeadLetter]) -> dict[str, int]:
    return dict(Counter(d.reason for d in letters).most_common())


def span(letters: tuple[DeadLetter, ...] | list[DeadLetter]) -> tuple[int | None, int | None]:
    """The oldest and the newest last failure of `letters` (epoch ms), None when none says."""
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


# Counted by the broker on each return to the queue (4.3 adds x-acquired-count): not identity.
_BROKER_COUNTS = frozenset({"x-delivery-count", "x-acquired-count"})


def _fingerprint(message: AbstractIncomingMessage, headers: Mapping[str, Any]) -> str:
    """Identity of one dead-lettered copy; stable across reads (the broker's count excluded)."""
    stable = sorted((k, repr(v)) for k, v in headers.items() if k not in _BROKER_COUNTS)
    digest = hashlib.sha256(message.body)
    digest.update(repr((message.message_id, stable)).encode("utf-8", "backslashreplace"))
    return digest.hexdigest()


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
