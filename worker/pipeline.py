"""The bounded pipeline: decode, store with a timeout, classify, settle each delivery once.

`Pipeline.handle` turns one delivery into one outcome and settles it exactly once, as soon
as its own insert ends: there is no batch barrier, so a slow item never holds back others.
`Dispatcher` bounds concurrency with a semaphore taken *before* a task exists, keeps every
task in a set so none is lost, and drains within a grace period at shutdown.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict, deque
from collections.abc import Coroutine, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import structlog

from worker.breaker import CircuitBreaker, State
from worker.headers import first_failure, previous_attempts
from worker.keys import key_of
from worker.ledger import Claim, Ledger, NoLedger, Status
from worker.limiter import AdaptiveLimit
from worker.metrics import Metrics
from worker.models import DecodeError, MemoryItem, decode_item, idempotency_key
from worker.outcome import Action, Decision, Kind, Outcome, RetryPolicy, classify
from worker.settings import Settings
from worker.sink import Sink, StoreRequest
from worker.summary import requests_for

log = structlog.get_logger("worker.pipeline")
NOT_ATTEMPTED = "sink circuit open: not attempted"
IN_FLIGHT_ELSEWHERE = "another store of this item is in flight: not attempted"
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


class RecentKeys:
    """A bounded LRU of idempotency keys this process has stored."""

    def __init__(self, size: int) -> None:
        self._size = size
        self._keys: OrderedDict[str, None] = OrderedDict()

    def __contains__(self, key: object) -> bool:
        return key in self._keys

    def add(self, key: str) -> None:
        """Remember a stored key, forgetting the oldest beyond the bound."""
        if self._size <= 0:
            return
        self._keys[key] = None
        self._keys.move_to_end(key)
        if len(self._keys) > self._size:
            self._keys.popitem(last=False)


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
        self._sink = sink
        self._settings = settings
        self._metrics = metrics
        self._breaker = breaker
        self._limit = limit
        self._resume_at = 0.0  # monotonic time before which no store starts (Retry-After)
        self._policy: RetryPolicy = settings.retry.policy
        self._recent = RecentKeys(settings.worker.dedupe_cache_size)
        self._ledger: Ledger = ledger if ledger is not None else NoLedger()

    async def store_item(self, item: MemoryItem, key: str) -> Outcome:
        """Store one item within the per-item timeout; never raises for a failed store."""
        if key in self._recent:
            return _DUPLICATE
        requests = self._requests(item, key)
        if isinstance(requests, Outcome):
            return requests
        await self._wait_out_retry_after()
        admitted, probe = await self._admit()
        if not admitted:
            return Outcome.transient(NOT_ATTEMPTED)
        claim = await self._claim(key, requests)
        if isinstance(claim, Outcome):
            self._report(claim, probe)  # hands a half-open probe back
            return claim
        timeout_s = self._settings.sink.timeout_s
        outcome = _DUPLICATE  # stays so only if every part was stored before
        self._metrics.insert_started()
        started = time.perf_counter()
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
            outcome = Outcome.timeout(timeout_s)
        except BaseException:
            if probe and self._breaker is not None:
                self._breaker.release()
            await self._ledger.release(claim)
            raise
        finally:
            latency_s = time.perf_counter() - started
            if self._limit is not None and outcome.kind is not Kind.DUPLICATE:
                # Read before insert_finished: the stores running while this one ran, itself too.
                self._limit.observe(latency_s, outcome.overload, self._metrics.in_flight)
            self._metrics.insert_finished(outcome.kind is Kind.STORED, latency_s)
        self._report(outcome, probe)
        if outcome.retry_after_s:
            self._hold_off(outcome.retry_after_s)
        if outcome.kind in (Kind.STORED, Kind.DUPLICATE):
            await self._ledger.mark_stored(key)
        else:
            await self._ledger.release(claim)  # not stored: whoever gets it next may store it
        return outcome

    async def _claim(self, key: str, requests: list[StoreRequest]) -> Claim | Outcome:
        """Claim the item in the shared ledger; the outcome instead if stored or being stored.

        Only `stored` skips a store. The claim covers the whole item, so one worker at a time
        stores its parts; each part is marked as it is stored, so a retry skips those.
        """
        parts = [r.key for r in requests] if len(requests) > 1 else []
        claim = await self._ledger.claim(key, parts)
        if claim.status is Status.STORED:
            self._recent.add(key)
            return _DUPLICATE
        if claim.status is Status.ELSEWHERE:
            return Outcome.deferred(IN_FLIGHT_ELSEWHERE)
        return claim

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

    async def _admit(self) -> tuple[bool, bool]:
        """Whether a store may start, and whether it is the half-open probe.

        While a probe is out the other stores wait for its verdict rather than being handed
        back: a requeued message comes straight back, and a wait is bounded by the probe's
        own timeout.
        """
        breaker = self._breaker
        while breaker is not None:
            changed = breaker.changed  # taken before looking, so no transition is missed
            state = breaker.state
            if state is State.CLOSED:
                break
            if state is State.OPEN:
                return False, False
            if breaker.try_probe():
                return True, True
            await changed.wait()
        return True, False

    def _report(self, outcome: Outcome, probe: bool) -> None:
        """Tell the breaker what the sink did."""
        if self._breaker is None:
            return
        if outcome.kind in (Kind.TRANSIENT, Kind.TIMEOUT):
            self._breaker.failure(outcome.detail)
        elif outcome.kind in (Kind.STORED, Kind.REJECTED):
            self._breaker.success()
        elif probe:
            self._breaker.release()

    def _requests(self, item: MemoryItem, key: str) -> list[StoreRequest] | Outcome:
        return requests_for(item, key, self._settings.sink)

    async def requeue(self, delivery: Delivery) -> Verdict:
        """Hand a delivery back untouched because the worker is stopping; logged like any other."""
        attempt = previous_attempts(delivery.headers) + 1
        key = idempotency_key(delivery.message_id, delivery.body)
        return await self._settle(delivery, Outcome.cancelled(), attempt, key, time.perf_counter())

    async def handle(self, delivery: Delivery) -> Verdict:
        """Turn one delivery into one outcome and settle it exactly once."""
        started = time.perf_counter()
        attempt = previous_attempts(delivery.headers) + 1
        key = idempotency_key(delivery.message_id, delivery.body)
        try:
            outcome = await self._outcome(delivery, key)
        except asyncio.CancelledError:
            # Shutdown is not the message's fault: put it back, then let the cancel through.
            await self._settle(delivery, Outcome.cancelled(), attempt, key, started)
            raise
        return await self._settle(delivery, outcome, attempt, key, started)

    async def _outcome(self, delivery: Delivery, key: str) -> Outcome:
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
            key = key_of(delivery.message_id, item, self._settings.worker.key_fields)
            return await self.store_item(item, key)
        except Exception as exc:
            log.exception("store_crashed", idempotency_key=key)
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


class Dispatcher:
    """Runs `Pipeline.handle` for each delivery, never more than the current limit at once.

    A delivery gets its task only once a slot is free (the slot before the task, as in arq);
    until then it waits in line, first come first served. Every task is kept in a set and
    reaped, so none is lost, and `drain` finishes or requeues each one within a grace period.
    """

    def __init__(self, pipeline: Pipeline, limit: int) -> None:
        self._pipeline = pipeline
        self.limit = limit
        self._running = 0
        self._waiting: deque[Delivery] = deque()
        self._tasks: set[asyncio.Task[Verdict]] = set()
        self._closing = False

    def __repr__(self) -> str:
        return (
            f"<Dispatcher running={self._running} limit={self.limit} "
            f"waiting={len(self._waiting)} closing={self._closing}>"
        )

    @property
    def in_flight(self) -> int:
        """Deliveries being handled now."""
        return self._running

    def resize(self, limit: int) -> None:
        """Let `limit` deliveries run at once from now on; running ones are not taken back."""
        self.limit = limit
        self._start_waiting()

    def submit(self, delivery: Delivery) -> None:
        """Start handling a delivery once a slot is free; requeue it if we are draining."""
        if self._closing:
            self._spawn(self._pipeline.requeue(delivery))
            return
        self._waiting.append(delivery)
        self._start_waiting()

    def _start_waiting(self) -> None:
        while self._waiting and self._running < self.limit and not self._closing:
            self._running += 1
            self._spawn(self._run(self._waiting.popleft()))

    def _spawn(self, work: Coroutine[Any, Any, Verdict]) -> None:
        task = asyncio.create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._reap)

    def _reap(self, task: asyncio.Task[Verdict]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and (exc := task.exception()) is not None:
            # Settling raised something the consumer does not know; the broker redelivers.
            log.error("delivery_task_failed", error=repr(exc))

    async def _run(self, delivery: Delivery) -> Verdict:
        try:
            return await self._pipeline.handle(delivery)
        finally:
            self._running -= 1
            self._start_waiting()

    async def drain(self, grace_s: float) -> int:
        """Stop taking work, let in-flight inserts finish within `grace_s`, requeue the rest.

        Returns how many deliveries were handed back: running inserts cancelled at the end of
        the grace period, and deliveries still waiting for a slot (requeued, never started).
        """
        self._closing = True
        waiting = len(self._waiting)
        while self._waiting:
            self._spawn(self._pipeline.requeue(self._waiting.popleft()))
        pending = set(self._tasks)
        if pending:
            _, pending = await asyncio.wait(pending, timeout=grace_s)
        for task in pending:
            task.cancel()
        # Requeues of deliveries that arrived meanwhile are awaited too.
        await asyncio.gather(*pending, *self._tasks, return_exceptions=True)
        return len(pending) + waiting
