"""The `x-mw-*` headers: what a retry or dead letter carries, written and read only here.

A retry copy carries the attempts made and when they failed; a dead letter adds why, which
worker and which queue; a replayed copy drops all of that and counts the replay; an outbox row
that is no item says why it is not. Times are integer epoch milliseconds: AMQP float headers
are 32-bit and would lose seconds of an epoch.
The attempt count is our own header, never the broker's `x-death` (not ours to trust).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

PREFIX = "x-mw-"
H_ATTEMPTS = "x-mw-attempts"
H_FIRST_FAILURE_MS = "x-mw-first-failure-ms"
H_LAST_FAILURE_MS = "x-mw-last-failure-ms"
H_REASON = "x-mw-reason"
H_DETAIL = "x-mw-detail"
H_WORKER = "x-mw-worker"
H_QUEUE = "x-mw-queue"
H_REPLAYED = "x-mw-replayed-from-dlq"
#: Set by the publisher on a Mahavishnu outbox row that is no item: why (`worker.mahavishnu`).
H_OUTBOX_ERROR = "x-mw-outbox-error"
#: A failure detail is cut to this many characters: a header travels with every copy.
DETAIL_HEADER_CHARS = 1000
# Written by the broker; a replayed copy starts with a clean slate.
_BROKER_HEADERS = ("x-death", "x-delivery-count")
_CLEARED_ON_REPLAY = ("x-first-death-", "x-last-death-", PREFIX)


def as_text(value: object) -> str | None:
    """A header value as text (AMQP may hand strings over as bytes), else None."""
    if isinstance(value, bytes):
        return value.decode("utf-8", "backslashreplace")
    return value if isinstance(value, str) else None


def as_int(value: object) -> int | None:
    """A header value as an integer (a bool is not one), else None."""
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def previous_attempts(headers: Mapping[str, Any]) -> int:
    """Attempts already made, from our own header (the broker's x-death is not ours to trust)."""
    value = as_int(headers.get(H_ATTEMPTS))
    return value if value is not None and value >= 0 else 0


def first_failure(headers: Mapping[str, Any]) -> float | None:
    """Epoch seconds of the first failed attempt, if a previous attempt failed."""
    value = as_int(headers.get(H_FIRST_FAILURE_MS))
    return None if value is None else value / 1000


def failure_headers(
    attempt: int, first_failure_ts: float | None, detail: str, now_s: float
) -> dict[str, Any]:
    """What a retry or dead letter adds about the attempt that just failed at `now_s`."""
    headers: dict[str, Any] = {
        H_ATTEMPTS: attempt,
        H_LAST_FAILURE_MS: round(now_s * 1000),
        H_DETAIL: detail[:DETAIL_HEADER_CHARS],
    }
    # None only for a copy parked without counting: its budget clock has not started.
    if first_failure_ts is not None:
        headers[H_FIRST_FAILURE_MS] = round(first_failure_ts * 1000)
    return headers


def dead_letter_headers(reason: str, worker: str, queue: str) -> dict[str, str]:
    """What a dead letter adds beyond the failure: why, which worker, from which queue."""
    return {H_REASON: reason, H_WORKER: worker, H_QUEUE: queue}


def replay_count(headers: Mapping[str, Any]) -> int:
    """How often this message was replayed from the DLQ."""
    return as_int(headers.get(H_REPLAYED)) or 0


def replay_headers(headers: Mapping[str, Any]) -> dict[str, Any]:
    """The headers of a replayed copy: failure and broker headers removed, replays counted."""
    kept = {
        k: v
        for k, v in headers.items()
        if k not in _BROKER_HEADERS and not k.startswith(_CLEARED_ON_REPLAY)
    }
    kept[H_REPLAYED] = replay_count(headers) + 1
    return kept
