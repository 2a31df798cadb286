"""Tests for the pure delivery policy: `classify` and `RetryPolicy.backoff_s`."""

from __future__ import annotations

import math
import random

import pytest

from worker.outcome import Action, Decision, Kind, Outcome, Reason, RetryPolicy, classify

POLICY = RetryPolicy(base_s=1.0, cap_s=120.0, budget_s=600.0, max_attempts=5)
HALF = 0.5  # the fixed jitter draw: every retry delay is half its ceiling


def half() -> float:
    """A fixed jitter draw."""
    return HALF


def ack() -> Decision:
    return Decision(Action.ACK)


def requeue() -> Decision:
    return Decision(Action.REQUEUE)


def parked() -> Decision:
    return Decision(Action.RETRY, delay_s=POLICY.base_s, counts=False)


def dead(reason: Reason) -> Decision:
    return Decision(Action.DEAD_LETTER, reason)


def retry(delay_s: float) -> Decision:
    return Decision(Action.RETRY, delay_s=delay_s)


EXHAUSTED = dead(Reason.RETRIES_EXHAUSTED)
INVALID_REASONS = [
    Reason.INVALID_ENCODING,
    Reason.INVALID_JSON,
    Reason.WRONG_CONTENT_TYPE,
    Reason.SCHEMA,
    Reason.TOO_LARGE,
]

# id, outcome, attempt, elapsed_s, expected decision (POLICY: base 1, cap 120, budget 600, 5 tries)
CASES: list[tuple[str, Outcome, int, float, Decision]] = [
    ("stored-first", Outcome.stored(), 1, 0.0, ack()),
    ("stored-after-retries", Outcome.stored(), 4, 300.0, ack()),
    ("stored-past-every-limit", Outcome.stored(), 99, 10_000.0, ack()),
    ("duplicate", Outcome.duplicate(), 1, 0.0, ack()),
    ("duplicate-past-every-limit", Outcome.duplicate(), 99, 10_000.0, ack()),
    ("skipped", Outcome.skipped("blank"), 1, 0.0, ack()),
    ("skipped-past-every-limit", Outcome.skipped("blank"), 99, 10_000.0, ack()),
    *[(f"invalid-{r.value}", Outcome.invalid(r, "bad"), 1, 0.0, dead(r)) for r in INVALID_REASONS],
    ("invalid-later-attempt", Outcome.invalid(Reason.SCHEMA, "bad"), 3, 5.0, dead(Reason.SCHEMA)),
    ("invalid-without-reason", Outcome(Kind.INVALID, "bad"), 1, 0.0, dead(Reason.SCHEMA)),
    ("rejected-first", Outcome.rejected("❌ no"), 1, 0.0, dead(Reason.REJECTED_BY_SINK)),
    ("rejected-later", Outcome.rejected("❌ no"), 4, 100.0, dead(Reason.REJECTED_BY_SINK)),
    ("crashed", Outcome.crashed(RuntimeError("boom")), 1, 0.0, dead(Reason.INTERNAL_ERROR)),
    ("cancelled-first", Outcome.cancelled(), 1, 0.0, requeue()),
    ("cancelled-at-max-attempts", Outcome.cancelled(), 5, 0.0, requeue()),
    ("cancelled-past-budget", Outcome.cancelled(), 99, 10_000.0, requeue()),
    ("deferred-first", Outcome.deferred("elsewhere"), 1, 0.0, parked()),
    ("deferred-at-max-attempts", Outcome.deferred("elsewhere"), 5, 0.0, parked()),
    ("deferred-past-budget", Outcome.deferred("elsewhere"), 99, 10_000.0, parked()),
    ("transient-attempt-1", Outcome.transient("503"), 1, 0.0, retry(0.5)),
    ("transient-attempt-3", Outcome.transient("503"), 3, 10.0, retry(2.0)),
    ("transient-last-allowed", Outcome.transient("503"), 4, 10.0, retry(4.0)),
    ("transient-at-max-attempts", Outcome.transient("503"), 5, 10.0, EXHAUSTED),
    ("transient-past-max-attempts", Outcome.transient("503"), 9, 10.0, EXHAUSTED),
    ("transient-retry-after-floor", Outcome.transient("429", 30.0), 1, 0.0, retry(30.0)),
    ("transient-retry-after-below", Outcome.transient("429", 0.1), 3, 0.0, retry(2.0)),
    ("transient-retry-after-zero", Outcome.transient("429", 0.0), 2, 0.0, retry(1.0)),
    ("transient-retry-after-over-cap", Outcome.transient("429", 300.0), 1, 0.0, retry(300.0)),
    ("transient-retry-after-over-budget", Outcome.transient("429", 700.0), 1, 0.0, EXHAUSTED),
    ("transient-retry-after-ends-budget", Outcome.transient("429", 100.0), 1, 550.0, EXHAUSTED),
    ("transient-budget-just-fits", Outcome.transient("503"), 1, 599.5, retry(0.5)),
    ("transient-budget-just-over", Outcome.transient("503"), 1, 599.6, EXHAUSTED),
    ("transient-budget-spent", Outcome.transient("503"), 2, 600.0, EXHAUSTED),
    ("timeout-attempt-1", Outcome.timeout(30.0), 1, 0.0, retry(0.5)),
    ("timeout-attempt-2", Outcome.timeout(30.0), 2, 30.0, retry(1.0)),
    ("timeout-at-max-attempts", Outcome.timeout(30.0), 5, 30.0, EXHAUSTED),
    ("timeout-past-budget", Outcome.timeout(30.0), 2, 601.0, EXHAUSTED),
]


# The same decisions while the sink's breaker is open (`systemic=True`): a transient failure or
# timeout is parked for `base_s` without counting an attempt; every other outcome is settled as
# before.
SYSTEMIC_CASES: list[tuple[str, Outcome, int, float, Decision]] = [
    ("systemic-stored", Outcome.stored(), 1, 0.0, ack()),
    ("systemic-duplicate", Outcome.duplicate(), 1, 0.0, ack()),
    ("systemic-skipped", Outcome.skipped("blank"), 1, 0.0, ack()),
    ("systemic-invalid", Outcome.invalid(Reason.SCHEMA, "bad"), 1, 0.0, dead(Reason.SCHEMA)),
    ("systemic-rejected", Outcome.rejected("❌ no"), 1, 0.0, dead(Reason.REJECTED_BY_SINK)),
    ("systemic-crashed", Outcome.crashed(RuntimeError("x")), 1, 0.0, dead(Reason.INTERNAL_ERROR)),
    ("systemic-cancelled", Outcome.cancelled(), 1, 0.0, requeue()),
    ("systemic-deferred", Outcome.deferred("elsewhere"), 5, 601.0, parked()),
    ("systemic-transient-first", Outcome.transient("503"), 1, 0.0, parked()),
    ("systemic-transient-at-max-attempts", Outcome.transient("503"), 5, 10.0, parked()),
    ("systemic-transient-past-budget", Outcome.transient("401"), 99, 10_000.0, parked()),
    ("systemic-transient-retry-after", Outcome.transient("429", 700.0), 1, 0.0, parked()),
    ("systemic-timeout", Outcome.timeout(30.0), 1, 0.0, parked()),
    ("systemic-timeout-at-max-attempts", Outcome.timeout(30.0), 5, 601.0, parked()),
]


def test_table_covers_every_kind() -> None:
    """Both classify tables have at least one row for every outcome kind."""
    assert {outcome.kind for _, outcome, _, _, _ in CASES} == set(Kind)
    assert {outcome.kind for _, outcome, _, _, _ in SYSTEMIC_CASES} == set(Kind)


@pytest.mark.parametrize(
    ("outcome", "attempt", "elapsed_s", "expected"),
    [case[1:] for case in CASES],
    ids=[case[0] for case in CASES],
)
def test_classify(outcome: Outcome, attempt: int, elapsed_s: float, expected: Decision) -> None:
    """Each outcome, at each attempt and elapsed time, is settled by the expected decision."""
    assert classify(outcome, attempt, elapsed_s, POLICY, half) == expected


@pytest.mark.parametrize(
    ("outcome", "attempt", "elapsed_s", "expected"),
    [case[1:] for case in SYSTEMIC_CASES],
    ids=[case[0] for case in SYSTEMIC_CASES],
)
def test_classify_systemic(
    outcome: Outcome, attempt: int, elapsed_s: float, expected: Decision
) -> None:
    """While failures are systemic, transient ones are requeued uncounted; the rest unchanged."""
    assert classify(outcome, attempt, elapsed_s, POLICY, half, systemic=True) == expected


@pytest.mark.parametrize("retry_after_s", [0.0, 0.5, 3.0, 59.0, 119.9])
@pytest.mark.parametrize("draw", [0.0, 0.3, 0.999])
def test_retry_after_is_a_floor(retry_after_s: float, draw: float) -> None:
    """A retry never comes sooner than the sink's Retry-After, whatever the jitter draw."""
    outcome = Outcome.transient("429", retry_after_s)
    decision = classify(outcome, 3, 0.0, POLICY, lambda: draw)
    assert decision.action is Action.RETRY
    assert decision.delay_s >= retry_after_s
    assert decision.delay_s == max(retry_after_s, POLICY.backoff_s(3, lambda: draw))


@pytest.mark.parametrize(
    ("policy", "attempt", "ceiling_s"),
    [
        (RetryPolicy(base_s=1.0, cap_s=120.0), 1, 1.0),
        (RetryPolicy(base_s=1.0, cap_s=120.0), 2, 2.0),
        (RetryPolicy(base_s=1.0, cap_s=120.0), 7, 64.0),
        (RetryPolicy(base_s=1.0, cap_s=120.0), 8, 120.0),
        (RetryPolicy(base_s=0.25, cap_s=10.0), 3, 1.0),
        (RetryPolicy(base_s=10.0, cap_s=3.0), 1, 3.0),
        (RetryPolicy(base_s=1.0, cap_s=120.0), 1_000, 120.0),
        (RetryPolicy(base_s=1.0, cap_s=120.0), 10**18, 120.0),
        (RetryPolicy(base_s=1e300, cap_s=7.0), 10**9, 7.0),
    ],
)
@pytest.mark.parametrize("draw", [0.0, 0.25, 0.5, 1.0])
def test_backoff_full_jitter(
    policy: RetryPolicy, attempt: int, ceiling_s: float, draw: float
) -> None:
    """Backoff is the draw times min(cap, base * 2^(attempt-1)), even for huge attempt numbers."""
    delay_s = policy.backoff_s(attempt, lambda: draw)
    assert math.isfinite(delay_s)
    assert delay_s == pytest.approx(draw * ceiling_s)
    assert 0.0 <= delay_s <= policy.cap_s


@pytest.mark.parametrize("attempt", [1, 2, 5, 9, 64, 10**6])
def test_backoff_random_draws_stay_in_bounds(attempt: int) -> None:
    """With the real random source every delay lies in [0, min(cap, base * 2^(attempt-1))]."""
    policy = RetryPolicy(base_s=1.0, cap_s=120.0)
    ceiling_s = min(policy.cap_s, policy.base_s * 2.0 ** min(attempt - 1, 60))
    rng = random.Random(attempt)
    delays = [policy.backoff_s(attempt, rng.random) for _ in range(500)]
    assert all(0.0 <= d <= ceiling_s for d in delays)


def test_classify_uses_policy_limits() -> None:
    """Exhaustion follows the policy passed in: one attempt allowed means no retry at all."""
    once = RetryPolicy(max_attempts=1)
    assert classify(Outcome.transient("503"), 1, 0.0, once, half) == EXHAUSTED
    no_budget = RetryPolicy(budget_s=0.0)
    assert classify(Outcome.timeout(1.0), 1, 0.0, no_budget, half) == EXHAUSTED
