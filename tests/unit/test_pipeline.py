"""Tests for the pipeline and dispatcher with a fake sink and fake deliveries (no broker)."""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import pytest
from structlog.testing import capture_logs

from tests.unit.fakes import Clock, FakeDelivery, FakeSink, until
from worker.breaker import CircuitBreaker, State
from worker.dispatch import Dispatcher
from worker.headers import H_ATTEMPTS, H_FIRST_FAILURE_MS
from worker.keys import item_key
from worker.limiter import AdaptiveLimit
from worker.metrics import Metrics
from worker.models import decode_item
from worker.outcome import Action, Decision, Kind, Outcome, Reason
from worker.pipeline import NOT_ATTEMPTED, Pipeline, Verdict
from worker.settings import Settings
from worker.testing.items import item_body


def make_settings(**sections: dict[str, Any]) -> Settings:
    """Settings with only the given fields changed from the defaults."""
    return Settings(**sections)


def make_pipeline(sink: FakeSink, settings: Settings | None = None) -> Pipeline:
    """A pipeline over the fake sink."""
    settings = settings or make_settings()
    return Pipeline(sink, settings, Metrics(settings.concurrency))


def delivery(content: str = "the build passed", **kwargs: Any) -> FakeDelivery:
    """A delivery holding one valid item."""
    return FakeDelivery(item_body(content), **kwargs)


async def run_all(dispatcher: Dispatcher, deliveries: list[FakeDelivery]) -> None:
    """Submit every delivery, then wait for all of them to be settled."""
    for d in deliveries:
        dispatcher.submit(d)
    settled = asyncio.gather(*(d.settled_event.wait() for d in deliveries))
    await asyncio.wait_for(settled, 60.0)
    assert await dispatcher.drain(grace_s=60.0) == 0


async def test_dispatcher_never_exceeds_limit() -> None:
    """With 200 deliveries and limit 7, never more than 7 inserts run, and 7 do run at once."""
    sink = FakeSink()
    dispatcher = Dispatcher(make_pipeline(sink), limit=7)
    deliveries = [delivery(f"item {i}") for i in range(200)]
    peak_in_flight = 0

    async def watch() -> None:
        nonlocal peak_in_flight
        while True:
            peak_in_flight = max(peak_in_flight, dispatcher.in_flight)
            await asyncio.sleep(0)

    watcher = asyncio.create_task(watch())
    await run_all(dispatcher, deliveries)
    watcher.cancel()
    assert sink.peak == 7
    assert peak_in_flight <= 7
    assert len(sink.requests) == 200
    assert all(d.verdict.decision.action is Action.ACK for d in deliveries)


@dataclass
class SlowAck(FakeDelivery):
    """A delivery whose settle waits for its gate, as on a channel slow to take the ack."""

    gate: asyncio.Event = field(default_factory=asyncio.Event)

    async def settle(self, verdict: Verdict) -> bool:
        """Record the verdict once the gate opens."""
        await self.gate.wait()
        return await super().settle(verdict)


async def test_a_slot_is_free_once_its_store_ends() -> None:
    """At limit 1 the next store starts while the last delivery is still being acked."""
    sink = FakeSink()
    dispatcher = Dispatcher(make_pipeline(sink), limit=1)
    first, second = SlowAck(item_body("first")), delivery("second")
    dispatcher.submit(first)
    dispatcher.submit(second)
    await until(lambda: bool(second.verdicts))
    assert first.verdicts == [] and sink.peak == 1 and dispatcher.in_flight == 0
    first.gate.set()
    assert await dispatcher.drain(grace_s=60.0) == 0  # the drain waits for the slow ack
    assert first.verdict.decision.action is second.verdict.decision.action is Action.ACK


async def test_each_delivery_settled_exactly_once() -> None:
    """Stored, rejected, transient, crashing and invalid deliveries are each settled once."""
    sink = FakeSink()
    sink.results["rejected"] = Outcome.rejected("❌ no")
    sink.results["transient"] = Outcome.transient("503")
    sink.results["crash"] = RuntimeError("boom")
    dispatcher = Dispatcher(make_pipeline(sink), limit=3)
    deliveries = [
        *(delivery(f"ok {i}") for i in range(20)),
        delivery("rejected"),
        delivery("transient"),
        delivery("crash"),
        FakeDelivery(b"{not json"),
    ]
    await run_all(dispatcher, deliveries)
    assert [len(d.verdicts) for d in deliveries] == [1] * len(deliveries)
    actions = Counter(d.verdict.decision.action for d in deliveries)
    assert actions == {Action.ACK: 20, Action.DEAD_LETTER: 3, Action.RETRY: 1}


async def test_slow_item_does_not_hold_back_others() -> None:
    """Fast deliveries are settled while a slow one is still pending in the sink."""
    sink = FakeSink()
    sink.gates["slow"] = asyncio.Event()
    dispatcher = Dispatcher(make_pipeline(sink), limit=4)
    slow = delivery("slow")
    fast = [delivery(f"fast {i}") for i in range(12)]
    dispatcher.submit(slow)
    for d in fast:
        dispatcher.submit(d)
    await until(lambda: all(d.verdicts for d in fast))
    assert slow.verdicts == []
    assert sink.active == 1
    await until(lambda: dispatcher.in_flight == 1)  # done tasks leave the set a step later
    assert all(d.verdict.decision.action is Action.ACK for d in fast)
    sink.gates["slow"].set()
    await slow.settled_event.wait()
    assert slow.verdict.decision.action is Action.ACK
    assert sink.finished[-1] == "slow"


async def test_per_item_timeout_retries() -> None:
    """An insert that outlives sink.timeout_s is a TIMEOUT and is retried, not dead-lettered."""
    sink = FakeSink()
    sink.gate = asyncio.Event()  # never set: the sink never answers
    pipeline = make_pipeline(sink, make_settings(sink={"timeout_s": 0.05}))
    d = delivery()
    verdict = await pipeline.handle(d)
    assert d.verdict is verdict
    assert verdict.outcome.kind is Kind.TIMEOUT
    assert verdict.decision.action is Action.RETRY
    assert verdict.first_failure_ts is not None
    assert sink.active == 0  # the stuck call was cancelled


async def test_unexpected_sink_exception_dead_letters_and_continues() -> None:
    """A sink that raises dead-letters that item as internal_error; the others are stored."""
    sink = FakeSink()
    sink.results["bad"] = ZeroDivisionError("division by zero")
    dispatcher = Dispatcher(make_pipeline(sink), limit=2)
    bad = delivery("bad")
    others = [delivery(f"ok {i}") for i in range(5)]
    await run_all(dispatcher, [bad, *others])
    assert bad.verdict.decision.action is Action.DEAD_LETTER
    assert bad.verdict.decision.reason is Reason.INTERNAL_ERROR
    assert bad.verdict.outcome.kind is Kind.CRASHED
    assert "ZeroDivisionError" in bad.verdict.outcome.detail
    assert all(d.verdict.decision.action is Action.ACK for d in others)


VALID = json.loads(item_body())


@pytest.mark.parametrize(
    ("body", "content_type", "reason"),
    [
        (b"{not json", "application/json", Reason.INVALID_JSON),
        (b'{"content": NaN}', "application/json", Reason.INVALID_JSON),
        (b"[" * 100 + b"]" * 100, "application/json", Reason.INVALID_JSON),
        (b"\xff\xfe{}", "application/json", Reason.INVALID_ENCODING),
        (b"\x80abc", None, Reason.INVALID_ENCODING),
        (item_body(), "text/plain", Reason.WRONG_CONTENT_TYPE),
        (b"[]", "application/json", Reason.SCHEMA),
        (b'{"content": "x"}', None, Reason.SCHEMA),
        (json.dumps({**VALID, "content": "x" * 5000}).encode(), None, Reason.TOO_LARGE),
    ],
    ids=[
        "malformed",
        "nan",
        "deep",
        "utf16-bom",
        "bad-utf8",
        "content-type",
        "array",
        "no-metadata",
        "body-too-large",
    ],
)
async def test_invalid_body_dead_letters_without_calling_sink(
    body: bytes, content_type: str | None, reason: Reason
) -> None:
    """A body that can never be an item is dead-lettered at once with the decode reason."""
    sink = FakeSink()
    pipeline = make_pipeline(sink, make_settings(worker={"max_body_bytes": 4096}))
    d = FakeDelivery(body, content_type=content_type)
    verdict = await pipeline.handle(d)
    assert d.verdict is verdict
    assert verdict.decision.action is Action.DEAD_LETTER
    assert verdict.decision.reason is reason
    assert verdict.outcome.kind is Kind.INVALID
    assert verdict.outcome.detail
    assert sink.requests == []


async def test_oversize_content_dead_letters_when_set() -> None:
    """With oversize=dead_letter, content over sink.max_content_chars is dead-lettered."""
    sink = FakeSink()
    settings = make_settings(sink={"max_content_chars": 10, "oversize": "dead_letter"})
    pipeline = make_pipeline(sink, settings)
    verdict = await pipeline.handle(delivery("x" * 25))
    assert verdict.decision.action is Action.DEAD_LETTER
    assert verdict.decision.reason is Reason.TOO_LARGE
    assert "25" in verdict.outcome.detail
    assert sink.requests == []


SPLIT = {"max_content_chars": 10, "oversize": "split"}


async def test_oversize_content_split_into_linked_parts() -> None:
    """With oversize=split, the content is stored as linked parts tagged part:i/n and of:key."""
    sink = FakeSink()
    pipeline = make_pipeline(sink, make_settings(sink=SPLIT))
    content = "abcdefghij" + "klmnopqrst" + "uvwxy"
    verdict = await pipeline.handle(delivery(content, message_id="m-1"))
    assert verdict.decision.action is Action.ACK
    assert [r.content for r in sink.requests] == ["abcdefghij", "klmnopqrst", "uvwxy"]
    assert [r.key for r in sink.requests] == ["m-1#1/3", "m-1#2/3", "m-1#3/3"]
    assert [tuple(r.extra_tags) for r in sink.requests] == [
        ("part:1/3", "of:m-1"),
        ("part:2/3", "of:m-1"),
        ("part:3/3", "of:m-1"),
    ]
    assert "".join(r.content for r in sink.requests) == content


async def test_split_retry_skips_parts_already_stored() -> None:
    """When a later part fails, the retry stores only the parts not stored yet."""
    sink = FakeSink()
    sink.results["klmnopqrst"] = Outcome.transient("503")
    pipeline = make_pipeline(sink, make_settings(sink=SPLIT))
    content = "abcdefghij" + "klmnopqrst" + "uvwxy"
    first = await pipeline.handle(delivery(content, message_id="m-2"))
    assert first.decision.action is Action.RETRY
    del sink.results["klmnopqrst"]
    sink.requests.clear()
    again = await pipeline.handle(delivery(content, message_id="m-2", headers={H_ATTEMPTS: 1}))
    assert again.decision.action is Action.ACK
    assert [r.key for r in sink.requests] == ["m-2#2/3", "m-2#3/3"]


async def test_split_redelivery_after_full_store_is_acked() -> None:
    """A split item redelivered after all its parts were stored is acked without a sink call."""
    sink = FakeSink()
    pipeline = make_pipeline(sink, make_settings(sink=SPLIT))
    content = "x" * 25
    assert (await pipeline.handle(delivery(content, message_id="m-3"))).decision.action is (
        Action.ACK
    )
    sink.requests.clear()
    again = await pipeline.handle(delivery(content, message_id="m-3"))
    assert sink.requests == []
    assert again.decision.action is Action.ACK


async def test_duplicate_key_is_acked_without_calling_sink() -> None:
    """An idempotency key this worker already stored is acked as a duplicate, sink not called."""
    sink = FakeSink()
    pipeline = make_pipeline(sink)
    await pipeline.handle(delivery("same", message_id="dup-1"))
    again = await pipeline.handle(delivery("same", message_id="dup-1"))
    assert again.outcome.kind is Kind.DUPLICATE
    assert again.decision.action is Action.ACK
    assert len(sink.requests) == 1
    # Without a message id, the body hash is the key: same body, same key.
    await pipeline.handle(FakeDelivery(item_body("hashed")))
    hashed = await pipeline.handle(FakeDelivery(item_body("hashed")))
    assert hashed.outcome.kind is Kind.DUPLICATE
    assert len(sink.requests) == 2


async def test_failed_key_is_not_remembered() -> None:
    """A key whose store failed is tried again on redelivery, not treated as a duplicate."""
    sink = FakeSink(default=Outcome.transient("503"))
    pipeline = make_pipeline(sink)
    await pipeline.handle(delivery(message_id="k"))
    sink.default = Outcome.stored()
    again = await pipeline.handle(delivery(message_id="k", headers={H_ATTEMPTS: 1}))
    assert again.outcome.kind is Kind.STORED
    assert len(sink.requests) == 2


async def test_dedupe_cache_disabled() -> None:
    """With worker.dedupe_cache_size=0 every delivery goes to the sink."""
    sink = FakeSink()
    pipeline = make_pipeline(sink, make_settings(worker={"dedupe_cache_size": 0}))
    for _ in range(3):
        assert (await pipeline.handle(delivery(message_id="same"))).outcome.kind is Kind.STORED
    assert len(sink.requests) == 3


async def test_drain_lets_in_flight_finish_within_grace() -> None:
    """In-flight inserts that finish during the grace period are settled normally (acked)."""
    sink = FakeSink()
    sink.gate = asyncio.Event()
    dispatcher = Dispatcher(make_pipeline(sink), limit=5)
    deliveries = [delivery(f"item {i}") for i in range(3)]
    for d in deliveries:
        dispatcher.submit(d)
    await until(lambda: sink.active == 3)
    drain = asyncio.create_task(dispatcher.drain(grace_s=60.0))
    await asyncio.sleep(0)
    assert not drain.done()
    sink.gate.set()
    assert await drain == 0
    assert all(d.verdict.decision.action is Action.ACK for d in deliveries)


async def test_drain_cancels_and_requeues_the_rest() -> None:
    """Inserts still running when the grace period ends are cancelled and requeued, never DLQ'd,
    and not counted as ACT-008 errors."""
    sink = FakeSink()
    sink.gate = asyncio.Event()  # the stuck ones never finish
    sink.gates["quick"] = asyncio.Event()
    pipeline = make_pipeline(sink)
    dispatcher = Dispatcher(pipeline, limit=5)
    quick = delivery("quick")
    stuck = [delivery(f"stuck {i}", headers={H_ATTEMPTS: 3}) for i in range(3)]
    for d in (quick, *stuck):
        dispatcher.submit(d)
    await until(lambda: sink.active == 4)
    drain = asyncio.create_task(dispatcher.drain(grace_s=0.1))
    await asyncio.sleep(0)
    sink.gates["quick"].set()
    assert await drain == 3
    assert quick.verdict.decision.action is Action.ACK
    for d in stuck:
        assert d.verdict.decision.action is Action.REQUEUE
        assert d.verdict.outcome.kind is Kind.CANCELLED
        assert d.verdict.attempt == 4
    assert sink.active == 0
    assert dispatcher.in_flight == 0
    # A shutdown requeue is not a failure: ACT-008's errors stays 0, the one store counted.
    metrics = pipeline._metrics.get_insertion_metrics()
    assert metrics["errors"] == 0 and metrics["total_items_inserted"] == 1


async def test_submit_after_drain_started_is_requeued() -> None:
    """A delivery submitted after drain began is requeued at once; the sink never sees it."""
    sink = FakeSink()
    sink.gate = asyncio.Event()
    dispatcher = Dispatcher(make_pipeline(sink), limit=5)
    running = delivery("running")
    dispatcher.submit(running)
    await until(lambda: sink.active == 1)
    drain = asyncio.create_task(dispatcher.drain(grace_s=60.0))
    await asyncio.sleep(0)
    late = delivery("late", headers={H_ATTEMPTS: 2})
    dispatcher.submit(late)
    await until(lambda: bool(late.verdicts))
    assert late.verdict.decision.action is Action.REQUEUE
    assert late.verdict.attempt == 3
    assert not drain.done()
    sink.gate.set()
    assert await drain == 0
    assert running.verdict.decision.action is Action.ACK
    assert [r.content for r in sink.requests] == ["running"]


async def test_submit_waiting_for_a_slot_is_requeued_on_drain() -> None:
    """A delivery waiting for a free slot when drain starts is requeued, not started."""
    sink = FakeSink()
    sink.gate = asyncio.Event()
    dispatcher = Dispatcher(make_pipeline(sink), limit=1)
    first, waiting = delivery("first"), delivery("waiting")
    dispatcher.submit(first)
    dispatcher.submit(waiting)
    await until(lambda: sink.active == 1)
    await asyncio.sleep(0)
    assert not waiting.verdicts
    assert await dispatcher.drain(grace_s=0.01) == 2  # one cancelled, one never started
    assert first.verdict.decision.action is Action.REQUEUE
    assert waiting.verdict.decision.action is Action.REQUEUE
    assert [r.content for r in sink.requests] == ["first"]


@pytest.mark.parametrize(
    ("value", "attempt"),
    [
        (None, 1),
        (0, 1),
        (1, 2),
        (4, 5),
        (True, 1),
        (False, 1),
        (-1, 1),
        ("3", 1),
        (2.0, 1),
        ([1], 1),
    ],
)
async def test_attempt_header(value: Any, attempt: int) -> None:
    """The attempt is x-mw-attempts + 1, and a bool, negative or non-int header counts as 0."""
    headers = {} if value is None else {H_ATTEMPTS: value}
    sink = FakeSink(default=Outcome.transient("503"))
    verdict = await make_pipeline(sink).handle(delivery(headers=headers))
    assert verdict.attempt == attempt


async def test_attempt_header_exhausts_retries() -> None:
    """A transient failure on the last allowed attempt is dead-lettered as retries_exhausted."""
    sink = FakeSink(default=Outcome.transient("503"))
    pipeline = make_pipeline(sink, make_settings(retry={"max_attempts": 3}))
    retried = await pipeline.handle(delivery(headers={H_ATTEMPTS: 1}))
    assert retried.decision.action is Action.RETRY
    exhausted = await pipeline.handle(delivery(headers={H_ATTEMPTS: 2}))
    assert exhausted.decision.action is Action.DEAD_LETTER
    assert exhausted.decision.reason is Reason.RETRIES_EXHAUSTED


async def test_first_failure_header_in_ms_exhausts_budget() -> None:
    """x-mw-first-failure-ms (integer ms) is carried on and counts toward the retry budget."""
    first_ms = round((time.time() - 100) * 1000)
    sink = FakeSink(default=Outcome.transient("503"))
    pipeline = make_pipeline(sink, make_settings(retry={"budget_s": 50}))
    headers = {H_ATTEMPTS: 1, H_FIRST_FAILURE_MS: first_ms}
    verdict = await pipeline.handle(delivery(headers=headers))
    assert verdict.first_failure_ts == first_ms / 1000
    assert verdict.decision.reason is Reason.RETRIES_EXHAUSTED
    roomy = make_pipeline(sink, make_settings(retry={"budget_s": 1000, "cap_s": 1}))
    assert (await roomy.handle(delivery(headers=headers))).decision.action is Action.RETRY


@pytest.mark.parametrize("value", [True, "1700000000000", 1.7e12, None])
async def test_first_failure_header_ignored_unless_int(value: Any) -> None:
    """A non-integer first-failure header is ignored: the first failure is now."""
    headers = {} if value is None else {H_FIRST_FAILURE_MS: value}
    sink = FakeSink(default=Outcome.transient("503"))
    before = time.time()
    verdict = await make_pipeline(sink).handle(delivery(headers=headers))
    assert verdict.first_failure_ts is not None
    assert verdict.first_failure_ts >= before
    assert verdict.decision.action is Action.RETRY


async def test_success_has_no_first_failure() -> None:
    """A first-time success carries no first-failure timestamp."""
    verdict = await make_pipeline(FakeSink()).handle(delivery())
    assert verdict.first_failure_ts is None


async def test_retry_delay_respects_sink_retry_after() -> None:
    """A transient outcome with Retry-After is retried no sooner than that."""
    sink = FakeSink(default=Outcome.transient("429", retry_after_s=42.0))
    verdict = await make_pipeline(sink).handle(delivery())
    assert verdict.decision.action is Action.RETRY
    assert verdict.decision.delay_s >= 42.0


async def test_late_settlement_is_counted() -> None:
    """A settle that reports a closed channel is counted as a late settlement."""
    pipeline = make_pipeline(FakeSink())
    metrics = pipeline._metrics
    await pipeline.handle(delivery(settle_result=False))
    assert metrics.registry.get_sample_value("memory_worker_late_settlements_total") == 1.0


LOG_KEYS = {
    "message_id",
    "idempotency_key",
    "attempt",
    "outcome",
    "action",
    "reason",
    "latency_s",
}


async def test_one_message_settled_line_per_delivery() -> None:
    """Every delivery logs exactly one message_settled line with its key facts."""
    sink = FakeSink()
    sink.results["rejected"] = Outcome.rejected("❌ no")
    sink.results["transient"] = Outcome.transient("503")
    deliveries = [
        delivery("ok", message_id="m-ok"),
        delivery("rejected", message_id="m-rej", headers={H_ATTEMPTS: 2}),
        delivery("transient", message_id="m-tr"),
        FakeDelivery(b"{nope", message_id="m-bad"),
        FakeDelivery(item_body("no id")),
    ]
    dispatcher = Dispatcher(make_pipeline(sink), limit=2)
    with capture_logs() as logs:
        await run_all(dispatcher, deliveries)
    lines = [e for e in logs if e["event"] == "message_settled"]
    assert len(lines) == len(deliveries)
    by_key = {e["idempotency_key"]: e for e in lines}
    assert len(by_key) == len(deliveries)
    for e in lines:
        assert e.keys() >= LOG_KEYS
        assert isinstance(e["latency_s"], float)
        assert e["latency_s"] >= 0
    expected_ok = {
        "message_id": "m-ok",
        "attempt": 1,
        "outcome": "stored",
        "action": "ack",
        "reason": None,
    }
    assert by_key["m-ok"].items() >= expected_ok.items()
    assert by_key["m-rej"]["attempt"] == 3
    assert by_key["m-rej"]["reason"] == "rejected_by_sink"
    assert by_key["m-tr"]["action"] == "retry"
    assert by_key["m-bad"]["reason"] == "invalid_json"
    stable = item_key(decode_item(item_body("no id"), None))
    assert by_key[stable]["message_id"] is None
    assert by_key[stable]["outcome"] == "stored"


async def test_requeue_on_drain_logs_one_line() -> None:
    """Deliveries requeued at shutdown (cancelled or submitted late) also log one line each."""
    sink = FakeSink()
    sink.gate = asyncio.Event()
    dispatcher = Dispatcher(make_pipeline(sink), limit=1)
    running, late = delivery("running", message_id="m-run"), delivery("late", message_id="m-late")
    with capture_logs() as logs:
        dispatcher.submit(running)
        await until(lambda: sink.active == 1)
        drain = asyncio.create_task(dispatcher.drain(grace_s=0.01))
        await asyncio.sleep(0)
        dispatcher.submit(late)
        await drain
    lines = [e for e in logs if e["event"] == "message_settled"]
    assert Counter(e["message_id"] for e in lines) == {"m-run": 1, "m-late": 1}
    assert {e["action"] for e in lines} == {"requeue"}


def breaker_pipeline(sink: FakeSink, failures: int = 2) -> tuple[Pipeline, CircuitBreaker, Clock]:
    """A pipeline whose sink breaker runs on a hand clock (open for 5 s)."""
    clock = Clock()
    breaker = CircuitBreaker(failures, 5.0, clock=clock)
    settings = make_settings()
    return Pipeline(sink, settings, Metrics(settings.concurrency), breaker), breaker, clock


async def test_breaker_parks_the_failure_that_opens_it_and_skips_the_sink_after() -> None:
    """Failures below the threshold are retried; the one that opens it and later ones are parked."""
    sink = FakeSink(Outcome.transient("HTTP 503"))
    pipeline, breaker, _ = breaker_pipeline(sink, failures=2)
    first, second, third = delivery("a"), delivery("b"), delivery("c")
    for d in (first, second, third):
        await pipeline.handle(d)
    assert first.verdict.decision.action is Action.RETRY and first.verdict.attempt == 1
    for parked in (second, third):
        assert parked.verdict.decision.action is Action.RETRY
        assert not parked.verdict.decision.counts
        assert parked.verdict.attempt == 0 and parked.verdict.first_failure_ts is None
    assert third.verdict.outcome.detail == NOT_ATTEMPTED
    assert [r.content for r in sink.requests] == ["a", "b"]  # c never reached the sink
    assert breaker.state is State.OPEN


async def test_breaker_half_open_sends_one_probe_others_wait_for_its_verdict() -> None:
    """In half-open one store probes; the rest wait, then store once the probe succeeds."""
    sink = FakeSink(Outcome.transient("HTTP 503"))
    pipeline, breaker, clock = breaker_pipeline(sink, failures=1)
    await pipeline.handle(delivery("trip"))
    clock.now += 5
    sink.default = Outcome.stored()
    sink.gate = asyncio.Event()
    dispatcher = Dispatcher(pipeline, limit=5)
    deliveries = [delivery(f"item {i}") for i in range(5)]
    for d in deliveries:
        dispatcher.submit(d)
    await until(lambda: sink.active == 1)
    for _ in range(50):
        await asyncio.sleep(0)
    assert sink.active == 1 and breaker.state is State.HALF_OPEN
    sink.gate.set()
    assert await dispatcher.drain(grace_s=5.0) == 0
    assert breaker.state is State.CLOSED
    assert all(d.verdict.decision.action is Action.ACK for d in deliveries)


async def test_breaker_failed_probe_parks_the_waiters_without_an_attempt() -> None:
    """When the probe fails the breaker reopens and the waiting deliveries are parked uncounted."""
    sink = FakeSink(Outcome.transient("HTTP 503"))
    pipeline, breaker, clock = breaker_pipeline(sink, failures=1)
    await pipeline.handle(delivery("trip"))
    clock.now += 5
    sink.gate = asyncio.Event()
    dispatcher = Dispatcher(pipeline, limit=3)
    deliveries = [delivery(f"item {i}") for i in range(3)]
    for d in deliveries:
        dispatcher.submit(d)
    await until(lambda: sink.active == 1)
    sink.gate.set()
    assert await dispatcher.drain(grace_s=5.0) == 0
    assert breaker.state is State.OPEN
    assert len(sink.requests) == 2  # the trip and one probe
    for d in deliveries:
        assert d.verdict.decision == Decision(Action.RETRY, delay_s=1.0, counts=False)
        assert d.verdict.attempt == 0


async def test_breaker_cancelled_probe_frees_the_slot() -> None:
    """A probe cancelled at shutdown does not leave the breaker stuck in half-open."""
    sink = FakeSink(Outcome.transient("HTTP 503"))
    pipeline, breaker, clock = breaker_pipeline(sink, failures=1)
    await pipeline.handle(delivery("trip"))
    clock.now += 5
    sink.gate = asyncio.Event()
    probe = asyncio.create_task(pipeline.handle(delivery("probe")))
    await until(lambda: sink.active == 1)
    probe.cancel()
    with pytest.raises(asyncio.CancelledError):
        await probe
    assert breaker.try_probe()


# --- Retry-After pauses every store, adjustable slots -------------------------------------------


class TimedSink(FakeSink):
    """A FakeSink that also records when each call started and ended (monotonic seconds)."""

    def __init__(self, default: Outcome | None = None) -> None:
        super().__init__(default)
        self.started: dict[str, float] = {}
        self.ended: dict[str, float] = {}

    async def store(self, request: Any) -> Outcome:
        """Record the times around the fake store."""
        self.started[request.content] = time.monotonic()
        try:
            return await super().store(request)
        finally:
            self.ended[request.content] = time.monotonic()


async def test_retry_after_pauses_every_store_not_only_its_item() -> None:
    """After a 429 with Retry-After 0.3 s, no other store starts before those 0.3 s are over."""
    sink = TimedSink()
    sink.results["a"] = Outcome.transient("HTTP 429", retry_after_s=0.3, overload=True)
    pipeline = make_pipeline(sink)
    dispatcher = Dispatcher(pipeline, limit=5)
    first = delivery("a")
    dispatcher.submit(first)
    await first.settled_event.wait()
    others = [delivery(c) for c in "bcd"]
    with capture_logs() as logs:
        await run_all(dispatcher, others)
    assert first.verdict.decision.action is Action.RETRY
    assert all(d.verdict.decision.action is Action.ACK for d in others)
    for content in "bcd":
        assert sink.started[content] >= sink.ended["a"] + 0.3
    assert not [e for e in logs if e["event"] == "sink_retry_after"]  # logged before, once
    metrics = pipeline._metrics
    assert metrics.registry.get_sample_value("memory_worker_sink_pauses_total") == 1.0


async def test_retry_after_pause_is_capped_and_logged_once() -> None:
    """A Retry-After longer than sink.retry_after_max_s pauses only that long; one log line."""
    sink = FakeSink(Outcome.transient("HTTP 503", retry_after_s=1000.0, overload=True))
    settings = make_settings(sink={"retry_after_max_s": 0.05})
    pipeline = make_pipeline(sink, settings)
    with capture_logs() as logs:
        for content in ("a", "b", "c"):
            await pipeline.handle(delivery(content))
    pauses = [e for e in logs if e["event"] == "sink_retry_after"]
    assert len(pauses) == 3  # each began after the previous one ended
    assert all(e["wait_s"] == 0.05 for e in pauses)
    assert len(sink.requests) == 3


async def test_no_retry_after_means_no_pause() -> None:
    """A plain 503 without Retry-After pauses nothing."""
    sink = FakeSink(Outcome.transient("HTTP 503"))
    pipeline = make_pipeline(sink)
    with capture_logs() as logs:
        await pipeline.handle(delivery("a"))
    assert not [e for e in logs if e["event"] == "sink_retry_after"]
    assert pipeline._metrics.registry.get_sample_value("memory_worker_sink_pauses_total") == 0.0


async def test_dispatcher_resize_down_then_up() -> None:
    """A smaller limit holds new starts until fewer run; a larger one lets more in at once."""
    sink = FakeSink()
    sink.gate = asyncio.Event()
    dispatcher = Dispatcher(make_pipeline(sink), limit=4)
    deliveries = [delivery(f"item {i}") for i in range(8)]
    for d in deliveries:
        dispatcher.submit(d)
    await until(lambda: sink.active == 4)
    dispatcher.resize(2)
    sink.gate.set()
    sink.gate = asyncio.Event()
    await until(lambda: sink.active == 2)
    for _ in range(50):
        await asyncio.sleep(0)
    assert sink.active == 2 and sink.peak == 4
    dispatcher.resize(6)
    await until(lambda: sink.active == 4)  # the 4 left, all at once
    sink.gate.set()
    assert await dispatcher.drain(grace_s=5.0) == 0
    assert all(d.verdict.decision.action is Action.ACK for d in deliveries)


async def test_waiting_deliveries_start_in_arrival_order() -> None:
    """Deliveries beyond the limit wait in line and start first come, first served."""
    sink = FakeSink()
    sink.gate = asyncio.Event()
    dispatcher = Dispatcher(make_pipeline(sink), limit=1)
    deliveries = [delivery(content) for content in "abcd"]
    for d in deliveries:
        dispatcher.submit(d)
    await until(lambda: sink.active == 1)
    assert dispatcher.in_flight == 1
    sink.gate.set()
    await until(lambda: all(d.verdicts for d in deliveries))
    assert await dispatcher.drain(grace_s=5.0) == 0
    assert [r.content for r in sink.requests] == ["a", "b", "c", "d"]


async def test_pipeline_feeds_the_adaptive_limit() -> None:
    """Each store's latency, overload and success reach the limit; duplicates do not."""
    observed: list[tuple[bool, int, bool]] = []

    class Recorder(AdaptiveLimit):
        def observe(
            self, latency_s: float, overload: bool, in_flight: int, ok: bool = True
        ) -> None:
            observed.append((overload, in_flight, ok))

    sink = FakeSink()
    sink.results["busy"] = Outcome.transient("HTTP 429", overload=True)
    settings = make_settings()
    pipeline = Pipeline(sink, settings, Metrics(settings.concurrency), limit=Recorder(10))
    for content in ("ok", "busy", "ok"):
        await pipeline.handle(delivery(content))
    assert observed == [(False, 1, True), (True, 1, False)]  # the second "ok" is a duplicate


async def test_parked_copy_keeps_its_attempts_and_restarts_the_budget_clock() -> None:
    """A copy parked by the open breaker keeps its attempts but drops the first-failure time."""
    sink = FakeSink(Outcome.transient("HTTP 503"))
    pipeline, breaker, _ = breaker_pipeline(sink, failures=1)
    await pipeline.handle(delivery("trip"))
    assert breaker.state is State.OPEN
    old = delivery("old", headers={H_ATTEMPTS: 3, H_FIRST_FAILURE_MS: 1_000})
    await pipeline.handle(old)
    assert old.verdict.decision.action is Action.RETRY and not old.verdict.decision.counts
    assert old.verdict.attempt == 3 and old.verdict.first_failure_ts is None


async def test_redelivery_while_its_store_runs_is_deferred_not_stored_twice() -> None:
    """A second delivery of an item whose store still runs here is parked, not stored again."""
    sink = FakeSink()
    sink.gate = asyncio.Event()
    pipeline = make_pipeline(sink)
    first = asyncio.create_task(pipeline.handle(delivery("slow", message_id="m-1")))
    await until(lambda: sink.active == 1)
    again = await pipeline.handle(delivery("slow", message_id="m-1"))
    sink.gate.set()
    assert (await first).outcome.kind is Kind.STORED
    assert again.outcome.kind is Kind.DEFERRED
    assert again.decision.action is Action.RETRY and not again.decision.counts
    assert len(sink.requests) == 1
    # Once stored, its next copy is a duplicate, acked without a store.
    later = await pipeline.handle(delivery("slow", message_id="m-1"))
    assert later.outcome.kind is Kind.DUPLICATE and len(sink.requests) == 1


async def test_discarded_waiting_deliveries_are_never_started_nor_settled() -> None:
    """Deliveries dropped from the line (their consumer was cancelled) get no store, no verdict."""
    sink = FakeSink()
    sink.gate = asyncio.Event()
    dispatcher = Dispatcher(make_pipeline(sink), limit=1)
    deliveries = [delivery(content) for content in "abcd"]
    for d in deliveries:
        dispatcher.submit(d)
    await until(lambda: sink.active == 1)
    dropped = dispatcher.discard_waiting(lambda d: d in (deliveries[1], deliveries[3]))
    sink.gate.set()
    await until(lambda: bool(deliveries[2].verdicts))
    assert await dispatcher.drain(grace_s=5.0) == 0
    assert dropped == 2
    assert [r.content for r in sink.requests] == ["a", "c"]
    assert not deliveries[1].verdicts and not deliveries[3].verdicts
