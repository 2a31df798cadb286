"""The closed set of outcomes of one delivery, and the pure decision that settles it.

Every delivery ends in exactly one :class:`Outcome`; :func:`classify` turns it into exactly
one :class:`Decision`. Nothing here does I/O, so the whole delivery policy is one table test.
"""

from __future__ import annotations

import enum
import random
from collections.abc import Callable
from dataclasses import dataclass


class Reason(enum.StrEnum):
    """Why a message was dead-lettered; written to the `x-mw-reason` header."""

    INVALID_ENCODING = "invalid_encoding"
    INVALID_JSON = "invalid_json"
    WRONG_CONTENT_TYPE = "wrong_content_type"
    SCHEMA = "schema"
    TOO_LARGE = "too_large"
    REJECTED_BY_SINK = "rejected_by_sink"
    RETRIES_EXHAUSTED = "retries_exhausted"
    INTERNAL_ERROR = "internal_error"


#: A retry meets the same bytes and the same rules: these fail again, whatever the sink does.
PERMANENT = frozenset(
    r.value
    for r in (
        Reason.INVALID_ENCODING,
        Reason.INVALID_JSON,
        Reason.WRONG_CONTENT_TYPE,
        Reason.SCHEMA,
        Reason.TOO_LARGE,
    )
)


class Kind(enum.StrEnum):
    """What happened to one delivery."""

    STORED = "stored"
    DUPLICATE = "duplicate"
    INVALID = "invalid"
    REJECTED = "rejected"
    TRANSIENT = "transient"
    TIMEOUT = "timeout"
    CRASHED = "crashed"
    CANCELLED = "cancelled"
    DEFERRED = "deferred"
    SKIPPED = "skipped"


@dataclass(frozen=True, slots=True)
class Outcome:
    """One delivery's result: its kind plus what the decision needs to know."""

    kind: Kind
    detail: str = ""
    invalid_reason: Reason | None = None
    retry_after_s: float | None = None
    overload: bool = False

    @classmethod
    def stored(cls) -> Outcome:
        """The sink confirmed the store."""
        return cls(Kind.STORED)

    @classmethod
    def duplicate(cls) -> Outcome:
        """Already stored, so not sent again: acked without a sink call.

        The idempotency key (or every part of a split item) is in this process's recent-keys
        cache, or the shared ledger says some worker stored it.
        """
        return cls(Kind.DUPLICATE, "already stored")

    @classmethod
    def invalid(cls, reason: Reason, detail: str) -> Outcome:
        """The message can never be stored as it is."""
        return cls(Kind.INVALID, detail, invalid_reason=reason)

    @classmethod
    def rejected(cls, detail: str) -> Outcome:
        """The sink refused the item for good."""
        return cls(Kind.REJECTED, detail)

    @classmethod
    def transient(
        cls, detail: str, retry_after_s: float | None = None, *, overload: bool = False
    ) -> Outcome:
        """The sink may accept the item later; `overload` when it said it is too busy."""
        return cls(Kind.TRANSIENT, detail, retry_after_s=retry_after_s, overload=overload)

    @classmethod
    def timeout(cls, timeout_s: float) -> Outcome:
        """The per-item timeout ran out."""
        return cls(Kind.TIMEOUT, f"no answer within {timeout_s:g} s", overload=True)

    @classmethod
    def crashed(cls, exc: BaseException) -> Outcome:
        """An unexpected exception escaped the store path."""
        return cls(Kind.CRASHED, f"{type(exc).__name__}: {exc}")

    @classmethod
    def cancelled(cls) -> Outcome:
        """The worker is shutting down before the insert finished."""
        return cls(Kind.CANCELLED, "worker shutting down")

    @classmethod
    def skipped(cls, detail: str) -> Outcome:
        """Not stored on purpose (blank content under `skip`): acked, counted by its kind."""
        return cls(Kind.SKIPPED, detail)

    @classmethod
    def deferred(cls, detail: str) -> Outcome:
        """Another worker is storing the same item now; not attempted here."""
        return cls(Kind.DEFERRED, detail)


class Action(enum.StrEnum):
    """How a delivery is settled."""

    ACK = "ack"
    RETRY = "retry"
    DEAD_LETTER = "dead_letter"
    REQUEUE = "requeue"


@dataclass(frozen=True, slots=True)
class Decision:
    """The one way a delivery is settled; `delay_s` only for retries, `reason` for dead letters.

    `counts` is False for a retry that is not the message's fault: it does not use up an attempt.
    """

    action: Action
    reason: Reason | None = None
    delay_s: float = 0.0
    counts: bool = True


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """Exponential backoff with full jitter, bounded by attempts and by total time."""

    base_s: float = 1.0
    cap_s: float = 120.0
    budget_s: float = 600.0
    max_attempts: int = 25

    def backoff_s(self, attempt: int, rand: Callable[[], float] = random.random) -> float:
        """Full-jitter delay before attempt `attempt + 1` (attempt counts from 1)."""
        ceiling = min(self.cap_s, self.base_s * 2.0 ** min(attempt - 1, 60))
        return rand() * ceiling


def classify(
    outcome: Outcome,
    attempt: int,
    elapsed_s: float,
    policy: RetryPolicy,
    rand: Callable[[], float] = random.random,
    *,
    systemic: bool = False,
) -> Decision:
    """Decide how to settle a delivery.

    `attempt` is the attempt that just ended (1 for the first delivery); `elapsed_s` is the
    time since its first failure. A cancelled insert is requeued, never dead-lettered: the
    message did nothing wrong, the worker is leaving. A transient failure while the failure
    is `systemic` (the sink's circuit breaker is not closed) is parked for `base_s` without
    counting an attempt: a fresh copy, because every requeue of the same message counts toward
    the quorum queue's delivery limit, and a long outage would use it up. So is a deferred
    item, whose store another worker has in flight (the shared ledger says so).
    """
    match outcome.kind:
        case Kind.STORED | Kind.DUPLICATE | Kind.SKIPPED:
            return Decision(Action.ACK)
        case Kind.CANCELLED:
            return Decision(Action.REQUEUE)
        case Kind.DEFERRED:
            # It waits for the other store's verdict; that is no fault of the message.
            return Decision(Action.RETRY, delay_s=policy.base_s, counts=False)
        case Kind.INVALID:
            return Decision(Action.DEAD_LETTER, outcome.invalid_reason or Reason.SCHEMA)
        case Kind.REJECTED:
            return Decision(Action.DEAD_LETTER, Reason.REJECTED_BY_SINK)
        case Kind.CRASHED:
            return Decision(Action.DEAD_LETTER, Reason.INTERNAL_ERROR)
        case Kind.TRANSIENT | Kind.TIMEOUT if systemic:
            return Decision(Action.RETRY, delay_s=policy.base_s, counts=False)
        case Kind.TRANSIENT | Kind.TIMEOUT:
            delay_s = max(policy.backoff_s(attempt, rand), outcome.retry_after_s or 0.0)
            if attempt >= policy.max_attempts or elapsed_s + delay_s > policy.budget_s:
                return Decision(Action.DEAD_LETTER, Reason.RETRIES_EXHAUSTED)
            return Decision(Action.RETRY, delay_s=delay_s)
