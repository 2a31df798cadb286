"""The bounded pipeline: decode, store with a timeout, classify, settle each delivery once.

`Pipeline.handle` turns one delivery into one outcome and settles it exactly once, as soon
as its own insert ends: there is no batch barrier, so a slow item never holds back others.
How many run at once is `worker.dispatch`'s.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import structlog

from worker.breaker import CircuitBreaker, State
from worker.headers import first_failure, previous_attempts
from worker.keys import key_of
from worker.ledger import Claim, Ledger, NoLedger, RecentKeys, Status
from worker.limiter import AdaptiveLimit
from worker.metrics import Metrics
from worker.models import MemoryItem, decode_item, idempotency_key
from worker.outcome import Action, Decision, Kind, Outcome, RetryPolicy, classify
from worker.settings import Settings
from worker.sink import Sink, StoreRequest
from worker.strict_json import DecodeError
from worker.summary import requests_for

log = structlog.get_logger("worker.pipeline")
NOT_ATTEMPTED = "sink circuit open: not attempted"
IN_FLIGHT_ELSEWHERE = "another store of this item is in flight: not attempted"
IN_FLIGHT_HERE = "a store of this item is in flight in this worker: not attempted"
_DUPLICATE = Outcome.duplicate()  # immutable, so one instance serves every store


@dataclass(frozen=True, slots=True)
class Verdict:
    """A decision plus what a retry or dead letter must carry along."""

    decision: Decision
    outcome: Outcome
    attempt: int
    first_failure_ts: float | None


class Delivery(Protocol):
    """One message as the pipeline sees it; the consumer adapts aio-pika's message to this."""

    body: bytes
    content_type: str | None
    message_id: str | None
    headers: Mapping[str, Any]

    async def settle(self, verdict: Verdict) -> bool:
        """Ack, retry, dead-letter or requeue; False when the channel was already gone."""
        ...


class Pipeline:
    """Stores items through a sink and settles deliveries; shared by the worker and library."""

    def __init__(
        self,
        sink: Sink,
        settings: Settings,
        metrics: Metrics,
        breaker: CircuitBreaker | None = None,
        limit: AdaptiveLimit | None = None,
        ledger: Ledger | None = None,
    ) -> None:
        self._sink, self._settings, self._metrics = sink, settings, metrics
        self._breaker, self._limit = breaker, limit
        self._resume_at = 0.0  # monotonic time before which no store starts (Retry-After)
        self._policy: RetryPolicy = settings.retry.policy
        self._recent = RecentKeys(settings.worker.dedupe_cache_size)
        self._storing: set[str] = set()  # keys of the deliveries being stored now
        self._ledger: Ledger = ledger if ledger is not None else NoLedger()

    async def store_item(self, item: MemoryItem, key: str) -> Outcome:
        """Store one item within the per-item timeout; never raises for a failed store.

        Three steps: admission (Retry-After, breaker, ledger claim), the attempt (each part,
        within the timeout), and the report (metrics, limit, breaker, Retry-After, ledger).
        """
        if key in self._recent:
            return _DUPLICATE
        requests = requests_for(item, key, self._settings.sink)
        if isinstance(requests, Outcome):
            return requests
        admitted = await self._admission(key, requests)
        if isinstance(admitted, Outcome):
            return admitted
        claim, probe = admitted
        self._metrics.insert_started()
        started = time.perf_counter()
        outcome = await self._attempt(requests, key, claim, probe, started)
        await self._report(outcome, key, claim, probe, started)
        return outcome

    async def _admission(
        self, key: str, requests: list[StoreRequest]
    ) -> tuple[Claim, bool] | Outcome:
        """The ledger's claim and whether this store is the breaker's probe, or why not to store."""
        # Each check costs an await only when it has something to wait for.
        if self._resume_at > time.monotonic():
            await self._wait_out_retry_after()
        breaker, probe = self._breaker, False
        if breaker is not None and breaker.state is not State.CLOSED:
            admitted, probe = await breaker.admit()
            if not admitted:
                return Outcome.transient(NOT_ATTEMPTED)
        # Only `stored` skips a store. The claim covers the whole item, so one worker at a time
        # stores its parts; each part is marked as it is stored, so a retry skips those.
        parts = [r.key for r in requests] if len(requests) > 1 else []
        claim = await self._ledger.claim(key, parts)
        if claim.status is Status.STORED:
            self._recent.add(key)
            skipped = _DUPLICATE
        elif claim.status is Status.ELSEWHERE:
            skipped = Outcome.deferred(IN_FLIGHT_ELSEWHERE)
        else:
            return claim, probe
        if probe and breaker is not None:
            breaker.release()  # the sink was not asked: another store may probe it
        return skipped

    async def _attempt(
        self, requests: list[StoreRequest], key: str, claim: Claim, probe: bool, started: float
    ) -> Outcome:
        """Store each part not stored before, all within the per-item timeout."""
        timeout_s = self._settings.sink.timeout_s
        outcome = _DUPLICATE  # stays so only if every part was stored before
        try:
            async with asyncio.timeout(timeout_s):
                for request in requests:
                    if request.key in self._recent or request.key in claim.stored_parts:
                        continue
                    outcome = await self._sink.store(request)
                    if outcome.kind is not Kind.STORED:
                        break
                    if request.key != key:  # a part: a retry on any worker skips it
                        self._recent.add(request.key)
                        await self._ledger.mark_stored(request.key)
                else:
                    self._recent.add(key)  # every part stored: a redelivery is a duplicate
        except TimeoutError:
            return Outcome.timeout(timeout_s)
        except BaseException as exc:
            cancelled = isinstance(exc, asyncio.CancelledError)
            await self._abandon(outcome, claim, probe, started, cancelled)
            raise
        return outcome

    async def _abandon(
        self, outcome: Outcome, claim: Claim, probe: bool, started: float, cancelled: bool
    ) -> None:
        """A cancelled or crashed attempt: hand back the probe and the claim, end the insert."""
        try:
            if probe and self._breaker is not None:
                self._breaker.release()
            await self._ledger.release(claim)
        finally:
            if cancelled:
                # A shutdown cut the store short: not the sink's latency, not an error.
                self._metrics.insert_finished(False, time.perf_counter() - started, error=False)
            else:
                self._measure(outcome, started)

    async def _report(
        self, outcome: Outcome, key: str, claim: Claim, probe: bool, started: float
    ) -> None:
        """Tell the metrics, the limit, the breaker and the ledger how the attempt ended."""
        self._measure(outcome, started)
        kind, breaker = outcome.kind, self._breaker
        if breaker is not None:
            if kind in (Kind.TRANSIENT, Kind.TIMEOUT):
                breaker.failure(outcome.detail)
            elif kind in (Kind.STORED, Kind.REJECTED):
                breaker.success()
            elif probe:
                breaker.release()  # no verdict on the sink (a duplicate): let another probe
        if outcome.retry_after_s:
            self._hold_off(outcome.retry_after_s)
        if kind in (Kind.STORED, Kind.DUPLICATE):
            await self._ledger.mark_stored(key)
        else:
            await self._ledger.release(claim)  # not stored: whoever gets it next may store it

    def _measure(self, outcome: Outcome, started: float) -> None:
        latency_s, stored = time.perf_counter() - started, outcome.kind is Kind.STORED
        if self._limit is not None and outcome.kind is not Kind.DUPLICATE:
            # Read before insert_finished: the stores running while this one ran, itself too.
            self._limit.observe(latency_s, outcome.overload, self._metrics.in_flight, stored)
        self._metrics.insert_finished(stored, latency_s)

    async def _wait_out_retry_after(self) -> None:
        """Start no store while the sink's Retry-After runs: it asked all of us, not one item."""
        # Another answer may push the deadline later while this one sleeps: look again.
        while (wait_s := self._resume_at - time.monotonic()) > 0:  # noqa: ASYNC110
            await asyncio.sleep(wait_s)

    def _hold_off(self, retry_after_s: float) -> None:
        now = time.monotonic()
        until = now + min(retry_after_s, self._settings.sink.retry_after_max_s)
        if until <= self._resume_at:
            return
        if self._resume_at <= now:
            log.warning("sink_retry_after", wait_s=round(until - now, 3))
            self._metrics.sink_pauses.inc()
        self._resume_at = until

    async def requeue(self, delivery: Delivery) -> Verdict:
        """Hand a delivery back untouched because the worker is stopping; logged like any other."""
        attempt = previous_attempts(delivery.headers) + 1
        key = idempotency_key(delivery.message_id, delivery.body)
        return await self._settle(delivery, Outcome.cancelled(), attempt, key, time.perf_counter())

    async def handle(self, delivery: Delivery, ended: Callable[[], None] = lambda: None) -> Verdict:
        """Turn one delivery into one outcome and settle it once; `ended()` as its store ends."""
        started = time.perf_counter()
        attempt = previous_attempts(delivery.headers) + 1
        keys = [idempotency_key(delivery.message_id, delivery.body)]  # + the item's, decoded
        try:
            outcome = await self._outcome(delivery, keys)
        except asyncio.CancelledError:
            # Shutdown is not the message's fault: put it back, then let the cancel through.
            await self._settle(delivery, Outcome.cancelled(), attempt, keys[-1], started)
            raise
        # The store is over: the next one may start while this delivery is acked and logged.
        ended()
        return await self._settle(delivery, outcome, attempt, keys[-1], started)

    async def _outcome(self, delivery: Delivery, keys: list[str]) -> Outcome:
        try:
            item = decode_item(
                delivery.body,
                delivery.content_type,
                max_bytes=self._settings.worker.max_body_bytes,
                max_depth=self._settings.worker.max_json_depth,
            )
        except DecodeError as exc:
            return Outcome.invalid(exc.reason, exc.detail)
        try:
            key = key_of(delivery.message_id, item, self._settings.worker)
            keys.append(key)
            if key in self._storing:
                # A redelivery whose first store still runs here (its channel closed, or the
                # broker cancelled our consumer): it waits, as for another worker's store.
                return Outcome.deferred(IN_FLIGHT_HERE)
            self._storing.add(key)
            try:
                return await self.store_item(item, key)
            finally:
                self._storing.discard(key)
        except Exception as exc:
            log.exception("store_crashed", idempotency_key=keys[-1])
            return Outcome.crashed(exc)

    async def _settle(
        self, delivery: Delivery, outcome: Outcome, attempt: int, key: str, started: float
    ) -> Verdict:
        first = first_failure(delivery.headers)
        failed = outcome.kind not in (Kind.STORED, Kind.DUPLICATE, Kind.CANCELLED)
        elapsed_s = time.time() - first if first is not None else 0.0
        # While the breaker is not closed a transient failure is the sink's, not the message's.
        systemic = self._breaker is not None and self._breaker.state is not State.CLOSED
        decision = classify(outcome, attempt, elapsed_s, self._policy, systemic=systemic)
        if not decision.counts:
            # Not the message's fault: no attempt used, and the budget's clock starts afresh
            # at its next real failure, so an outage alone never exhausts it.
            attempt, first = attempt - 1, None
        elif failed and first is None:
            first = time.time()
        verdict = Verdict(decision, outcome, attempt, first)
        settled = await delivery.settle(verdict)
        action = decision.action
        kind, action_name = outcome.kind.value, action.value  # each enum .value is a lookup
        reason = decision.reason.value if decision.reason else ""
        self._metrics.settled(kind, action_name, reason)
        if not settled:
            self._metrics.late_acks.inc()
        log.log(
            20 if action in (Action.ACK, Action.REQUEUE) else 30,
            "message_settled",
            message_id=delivery.message_id,
            idempotency_key=key,
            attempt=attempt,
            outcome=kind,
            action=action_name,
            reason=reason or None,
            detail=outcome.detail or None,
            retry_in_s=round(decision.delay_s, 3) if action is Action.RETRY else None,
            counted=None if decision.counts else False,
            latency_s=round(time.perf_counter() - started, 6),
            settled=settled,
        )
        return verdict
