"""Tests for the pipeline with a shared ledger: a fake ledger stands in for Redis (no network)."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from pathlib import Path

import pytest

from tests.unit.fakes import Clock, FakeDelivery, FakeSink, until
from worker.breaker import CircuitBreaker, State
from worker.dispatch import Dispatcher
from worker.headers import H_ATTEMPTS
from worker.ledger import UNCHECKED, Claim, NoLedger, Status
from worker.metrics import Metrics
from worker.outcome import Action, Kind, Outcome
from worker.pipeline import IN_FLIGHT_ELSEWHERE, Pipeline
from worker.sections import LedgerSettings
from worker.settings import CONFIG_ENV, Settings, SettingsError, load_settings
from worker.testing.items import item_body

KEY = "k-1"


class FakeLedger:
    """A ledger that answers every claim with `status` and records what it was asked."""

    def __init__(self, status: Status, stored_parts: Sequence[str] = ()) -> None:
        self.status = status
        self.stored_parts = frozenset(stored_parts)
        self.claims: list[tuple[str, tuple[str, ...]]] = []
        self.marked: list[str] = []
        self.released: list[Claim] = []

    async def claim(self, key: str, parts: Sequence[str] = ()) -> Claim:
        """Answer with the configured status; a token only when the claim is ours."""
        self.claims.append((key, tuple(parts)))
        if self.status is Status.UNCHECKED:
            return UNCHECKED
        token = "t:pending" if self.status is Status.MINE else None
        return Claim(self.status, key, token, self.stored_parts)

    async def mark_stored(self, key: str) -> None:
        """Record the mark."""
        self.marked.append(key)

    async def release(self, claim: Claim) -> None:
        """Record the release."""
        self.released.append(claim)


def make_pipeline(
    sink: FakeSink,
    ledger: FakeLedger,
    breaker: CircuitBreaker | None = None,
    **sink_settings: object,
) -> Pipeline:
    """A pipeline over the fake sink and the fake ledger."""
    settings = Settings(sink=sink_settings)
    return Pipeline(sink, settings, Metrics(settings.concurrency), breaker, ledger=ledger)


def delivery(content: str = "the build passed", **kwargs: object) -> FakeDelivery:
    """A delivery holding one valid item, keyed `KEY` unless given another message id."""
    kwargs.setdefault("message_id", KEY)
    return FakeDelivery(item_body(content), **kwargs)  # type: ignore[arg-type]


async def test_stored_in_ledger_is_acked_without_calling_sink() -> None:
    """A key the ledger says is stored is a duplicate: acked, and the sink is never called."""
    sink, ledger = FakeSink(), FakeLedger(Status.STORED)
    pipeline = make_pipeline(sink, ledger)
    verdict = await pipeline.handle(delivery())
    assert verdict.outcome.kind is Kind.DUPLICATE
    assert verdict.decision.action is Action.ACK
    assert sink.requests == [] and ledger.marked == [] and ledger.released == []
    again = await pipeline.handle(delivery())  # remembered locally: Redis is not asked again
    assert again.outcome.kind is Kind.DUPLICATE and len(ledger.claims) == 1


async def test_only_stored_skips_a_store() -> None:
    """Mine and unchecked (no ledger, Redis down) both store; only stored skips the sink."""
    for status in (Status.MINE, Status.UNCHECKED):
        sink = FakeSink()
        verdict = await make_pipeline(sink, FakeLedger(status)).handle(delivery())
        assert verdict.outcome.kind is Kind.STORED, status
        assert len(sink.requests) == 1


async def test_in_flight_elsewhere_is_retried_without_an_attempt() -> None:
    """Another worker's claim defers the item: a retry that uses no attempt and starts no clock."""
    sink, ledger = FakeSink(), FakeLedger(Status.ELSEWHERE)
    pipeline = make_pipeline(sink, ledger)
    verdict = await pipeline.handle(delivery(headers={H_ATTEMPTS: 3}))
    assert sink.requests == []
    assert verdict.outcome == Outcome.deferred(IN_FLIGHT_ELSEWHERE)
    assert verdict.decision.action is Action.RETRY and not verdict.decision.counts
    assert verdict.attempt == 3  # carried on unchanged in x-mw-attempts
    assert verdict.first_failure_ts is None
    assert ledger.released == [] and ledger.marked == []


async def test_in_flight_elsewhere_never_dead_letters() -> None:
    """Deferred at the last attempt allowed, and 100 times over: always a retry, never the DLQ."""
    sink, ledger = FakeSink(), FakeLedger(Status.ELSEWHERE)
    pipeline = make_pipeline(sink, ledger)
    attempts = pipeline._settings.retry.max_attempts - 1
    for _ in range(100):
        verdict = await pipeline.handle(delivery(headers={H_ATTEMPTS: attempts}))
        assert verdict.decision.action is Action.RETRY
        attempts = verdict.attempt
    assert attempts == pipeline._settings.retry.max_attempts - 1
    ledger.status = Status.MINE  # the other store failed and released its claim
    verdict = await pipeline.handle(delivery(headers={H_ATTEMPTS: attempts}))
    assert verdict.outcome.kind is Kind.STORED and len(sink.requests) == 1


async def test_confirmed_store_is_marked_stored() -> None:
    """After the sink confirms, the key is marked stored and the claim is not released."""
    sink, ledger = FakeSink(), FakeLedger(Status.MINE)
    await make_pipeline(sink, ledger).handle(delivery())
    assert ledger.claims == [(KEY, ())]
    assert ledger.marked == [KEY] and ledger.released == []


@pytest.mark.parametrize(
    "result",
    [Outcome.transient("503"), Outcome.rejected("❌ no"), RuntimeError("boom")],
    ids=["transient", "rejected", "crash"],
)
async def test_failed_store_releases_the_claim(result: Outcome | BaseException) -> None:
    """A store that failed, was refused or crashed gives its claim back and marks nothing."""
    sink, ledger = FakeSink(), FakeLedger(Status.MINE)
    sink.results["the build passed"] = result
    verdict = await make_pipeline(sink, ledger).handle(delivery())
    assert verdict.outcome.kind is not Kind.STORED
    assert [c.token for c in ledger.released] == ["t:pending"]
    assert ledger.marked == []


async def test_timed_out_store_releases_the_claim() -> None:
    """A store that outlives the per-item timeout gives its claim back."""
    sink, ledger = FakeSink(), FakeLedger(Status.MINE)
    sink.gate = asyncio.Event()  # never set
    verdict = await make_pipeline(sink, ledger, timeout_s=0.01).handle(delivery())
    assert verdict.outcome.kind is Kind.TIMEOUT
    assert len(ledger.released) == 1 and ledger.marked == []


async def test_cancelled_store_releases_the_claim() -> None:
    """A store cancelled at shutdown gives its claim back, so a redelivery need not wait."""
    sink, ledger = FakeSink(), FakeLedger(Status.MINE)
    sink.gate = asyncio.Event()
    dispatcher = Dispatcher(make_pipeline(sink, ledger), limit=1)
    stuck = delivery()
    dispatcher.submit(stuck)
    await until(lambda: sink.active == 1)
    assert await dispatcher.drain(grace_s=0) == 1
    assert stuck.verdict.decision.action is Action.REQUEUE
    assert len(ledger.released) == 1 and ledger.marked == []


async def test_split_item_skips_parts_the_ledger_has_and_marks_each_part() -> None:
    """A split item is claimed whole; parts stored elsewhere are skipped, new ones marked."""
    content = "x" * 25
    parts = (f"{KEY}#1/3", f"{KEY}#2/3", f"{KEY}#3/3")
    sink, ledger = FakeSink(), FakeLedger(Status.MINE, stored_parts=parts[:1])
    pipeline = make_pipeline(sink, ledger, max_content_chars=10, oversize="split")
    verdict = await pipeline.handle(delivery(content))
    assert verdict.outcome.kind is Kind.STORED
    assert ledger.claims == [(KEY, parts)]
    assert [r.key for r in sink.requests] == list(parts[1:])
    assert ledger.marked == [*parts[1:], KEY]


async def test_split_item_failing_midway_keeps_the_stored_parts_marked() -> None:
    """When part 2 fails, part 1 stays marked, the whole item is released, not marked."""
    content = "a" * 10 + "b" * 10
    sink, ledger = FakeSink(), FakeLedger(Status.MINE)
    sink.results["b" * 10] = Outcome.transient("503")
    pipeline = make_pipeline(sink, ledger, max_content_chars=10, oversize="split")
    verdict = await pipeline.handle(delivery(content))
    assert verdict.decision.action is Action.RETRY
    assert ledger.marked == [f"{KEY}#1/2"]
    assert [c.key for c in ledger.released] == [KEY]


@pytest.mark.parametrize("status", [Status.STORED, Status.ELSEWHERE])
async def test_half_open_probe_is_handed_back_when_the_ledger_skips_the_store(
    status: Status,
) -> None:
    """A probe that the ledger answers without a store frees the probe slot for the next item."""
    clock = Clock()
    breaker = CircuitBreaker(1, 5.0, clock=clock)
    sink = FakeSink(Outcome.transient("503"))
    ledger = FakeLedger(Status.MINE)
    pipeline = make_pipeline(sink, ledger, breaker)
    await pipeline.handle(delivery(message_id="opens"))
    assert breaker.state is State.OPEN
    clock.now += 5.0
    ledger.status = status
    await pipeline.handle(delivery())
    assert breaker.state is State.HALF_OPEN
    assert breaker.try_probe()  # free again


async def test_no_ledger_claims_nothing() -> None:
    """Without a ledger every item is unchecked, so it is stored as before."""
    ledger = NoLedger()
    assert await ledger.claim(KEY, ["p"]) is UNCHECKED
    await ledger.mark_stored(KEY)
    await ledger.release(UNCHECKED)


def test_ledger_settings_from_env_and_yaml(monkeypatch: pytest.MonkeyPatch) -> None:
    """The ledger is off by default; MAHAVISHNU_LEDGER__* set it; the committed YAML agrees."""
    assert load_settings().ledger.url is None
    root = Path(__file__).resolve().parents[2]
    monkeypatch.setenv(CONFIG_ENV, str(root / "settings" / "mahavishnu.yaml"))
    assert load_settings().ledger == LedgerSettings()
    monkeypatch.setenv("MAHAVISHNU_LEDGER__URL", "redis://:hunter2@cache:6379/1")
    monkeypatch.setenv("MAHAVISHNU_LEDGER__TTL_S", "3600")
    s = load_settings()
    assert s.ledger.url is not None
    assert s.ledger.url.get_secret_value() == "redis://:hunter2@cache:6379/1"
    assert s.ledger.ttl_s == 3600
    assert "hunter2" not in repr(s) and "hunter2" not in s.model_dump_json()


def test_ledger_settings_errors_name_the_env_var() -> None:
    """A URL that is not Redis and an out-of-range timeout are refused, one line each."""
    with pytest.raises(SettingsError) as caught:
        load_settings({"ledger": {"url": "http://cache:6379", "timeout_s": 0}})
    message = str(caught.value)
    assert "ledger.url = **** (command line; env MAHAVISHNU_LEDGER__URL): Value error" in message
    assert "ledger.timeout_s = 0 (command line; env MAHAVISHNU_LEDGER__TIMEOUT_S)" in message
