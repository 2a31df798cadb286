"""Tests for ACT-008's metrics (busy-period accounting) and the in-process MemoryInserter."""

from __future__ import annotations

import asyncio
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from prometheus_client import generate_latest

import worker.metrics
from tests.unit.fakes import FakeSink, until
from worker.inserter import MemoryInserter
from worker.metrics import Metrics
from worker.models import MemoryItem
from worker.outcome import Kind, Outcome, Reason
from worker.settings import CONFIG_ENV, Settings, SettingsError
from worker.testing.items import valid_item

ACT008_KEYS = {
    "total_items_inserted",
    "total_insertion_time_seconds",
    "batches_processed",
    "errors",
    "average_throughput_items_per_sec",
    "average_latency_seconds_per_item",
    "max_concurrent_insertions",
}


class Clock:
    """A manual perf_counter for the metrics module."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    """Replace worker.metrics' clock (only that module's) with a manual one."""
    fake = Clock()
    monkeypatch.setattr(worker.metrics, "time", SimpleNamespace(perf_counter=fake))
    return fake


def test_keys_are_exactly_act008() -> None:
    """get_insertion_metrics returns exactly ACT-008's keys, zeroed at start."""
    m = Metrics(10).get_insertion_metrics()
    assert set(m) == ACT008_KEYS
    assert m == {
        "total_items_inserted": 0,
        "total_insertion_time_seconds": 0.0,
        "batches_processed": 0,
        "errors": 0,
        "average_throughput_items_per_sec": 0.0,
        "average_latency_seconds_per_item": 0.0,
        "max_concurrent_insertions": 10,
    }


def test_busy_periods(clock: Clock) -> None:
    """A batch is a busy period: it closes when in-flight returns to 0; idle time is not counted."""
    m = Metrics(5)
    m.insert_started()
    clock.now += 1
    m.insert_started()
    clock.now += 1
    m.insert_finished(True, 2.0)
    assert m.batches_processed == 0  # one still running
    clock.now += 2
    m.insert_finished(True, 3.0)
    assert m.batches_processed == 1
    clock.now += 100  # idle
    m.insert_started()
    clock.now += 4
    m.insert_finished(False, 4.0)
    result = m.get_insertion_metrics()
    assert result["batches_processed"] == 2
    assert result["total_items_inserted"] == 2
    assert result["errors"] == 1
    assert result["total_insertion_time_seconds"] == pytest.approx(8.0)
    assert result["average_throughput_items_per_sec"] == pytest.approx(2 / 8)
    assert result["average_latency_seconds_per_item"] == pytest.approx(8 / 2)


def test_open_busy_period_counts_so_far(clock: Clock) -> None:
    """While inserts run, the open busy period counts toward total time but not as a batch."""
    m = Metrics(5)
    m.insert_started()
    clock.now += 3
    result = m.get_insertion_metrics()
    assert result["total_insertion_time_seconds"] == pytest.approx(3.0)
    assert result["batches_processed"] == 0


def test_in_flight_gauge_and_latency_histogram() -> None:
    """The Prometheus gauge follows in-flight inserts; the histogram counts every insert."""
    m = Metrics(3)
    m.insert_started()
    m.insert_started()
    assert m.registry.get_sample_value("memory_worker_in_flight") == 2
    m.insert_finished(True, 0.01)
    m.insert_finished(False, 0.02)
    assert m.registry.get_sample_value("memory_worker_in_flight") == 0
    assert m.registry.get_sample_value("memory_worker_sink_latency_seconds_count") == 2
    assert m.registry.get_sample_value("memory_worker_concurrency_limit") == 3


def test_settled_counter_labels() -> None:
    """settled() counts deliveries by outcome, action and reason."""
    m = Metrics(3)
    m.settled("stored", "ack")
    m.settled("stored", "ack")
    m.settled("invalid", "dead_letter", "schema")
    labels = {"outcome": "stored", "action": "ack", "reason": ""}
    assert m.registry.get_sample_value("memory_worker_messages_total", labels) == 2
    labels = {"outcome": "invalid", "action": "dead_letter", "reason": "schema"}
    assert m.registry.get_sample_value("memory_worker_messages_total", labels) == 1


def test_reset_metrics(clock: Clock) -> None:
    """reset_metrics zeroes ACT-008's counters but keeps the limit."""
    m = Metrics(7)
    for stored in (True, False):
        m.insert_started()
        clock.now += 1
        m.insert_finished(stored, 1.0)
    m.reset_metrics()
    result = m.get_insertion_metrics()
    assert result["total_items_inserted"] == 0
    assert result["errors"] == 0
    assert result["batches_processed"] == 0
    assert result["total_insertion_time_seconds"] == 0.0
    assert result["max_concurrent_insertions"] == 7


def test_reset_while_busy_restarts_the_open_period(clock: Clock) -> None:
    """A reset during inserts counts only the time after the reset."""
    m = Metrics(7)
    m.insert_started()
    clock.now += 10
    m.reset_metrics()
    clock.now += 2
    m.insert_finished(True, 12.0)
    result = m.get_insertion_metrics()
    assert result["total_insertion_time_seconds"] == pytest.approx(2.0)
    assert result["batches_processed"] == 1
    assert result["total_items_inserted"] == 1


def make_settings(concurrency: int = 3, **sections: Any) -> Settings:
    """Settings with the given concurrency limit."""
    return Settings(pools={"max_concurrent_memory_insertions": concurrency}, **sections)


async def test_inserter_outcomes_in_input_order() -> None:
    """insert_batch returns one outcome per item, in input order, whatever the finishing order."""
    sink = FakeSink()
    sink.results["item 2"] = Outcome.rejected("❌ no")
    sink.gates["item 0"] = asyncio.Event()  # the first item finishes last
    items = [valid_item(f"item {i}") for i in range(6)]
    async with MemoryInserter(make_settings(6), sink=sink) as inserter:
        batch = asyncio.create_task(inserter.insert_batch(items))
        await until(lambda: len(sink.finished) == 5)
        assert not batch.done()
        sink.gates["item 0"].set()
        outcomes = await batch
    assert [o.kind for o in outcomes] == [
        Kind.STORED,
        Kind.STORED,
        Kind.REJECTED,
        Kind.STORED,
        Kind.STORED,
        Kind.STORED,
    ]
    assert sink.finished[-1] == "item 0"


async def test_inserter_respects_concurrency_limit() -> None:
    """insert_batch never runs more than max_concurrent_memory_insertions stores at once."""
    sink = FakeSink()
    async with MemoryInserter(make_settings(4), sink=sink) as inserter:
        outcomes = await inserter.insert_batch([valid_item(f"i{n}") for n in range(40)])
    assert len(outcomes) == 40
    assert all(o.kind is Kind.STORED for o in outcomes)
    assert sink.peak == 4


async def test_inserter_accepts_items_and_rejects_invalid_dicts() -> None:
    """MemoryItem instances are stored; invalid dicts give INVALID outcomes and skip the sink."""
    sink = FakeSink()
    good = MemoryItem.model_validate(valid_item("a model"))
    bad_blank = valid_item("x", status="")
    bad_missing = {"content": "no metadata"}
    bad_type = valid_item("x", exit_code="zero")
    async with MemoryInserter(make_settings(), sink=sink) as inserter:
        outcomes = await inserter.insert_batch(
            [good, bad_blank, valid_item("a dict"), bad_missing, bad_type]
        )
    assert [o.kind for o in outcomes] == [
        Kind.STORED,
        Kind.INVALID,
        Kind.STORED,
        Kind.INVALID,
        Kind.INVALID,
    ]
    assert all(o.invalid_reason is Reason.SCHEMA for o in outcomes if o.kind is Kind.INVALID)
    assert sorted(r.content for r in sink.requests) == ["a dict", "a model"]


async def test_inserter_metrics_and_reset() -> None:
    """The inserter's metrics count stored items and failures; reset_metrics zeroes them."""
    sink = FakeSink()
    sink.results["fails"] = Outcome.transient("503")
    items = [valid_item(f"ok {i}") for i in range(5)] + [valid_item("fails")]
    async with MemoryInserter(make_settings(2), sink=sink) as inserter:
        await inserter.insert_batch(items)
        result = inserter.get_insertion_metrics()
        assert set(result) == ACT008_KEYS
        assert result["total_items_inserted"] == 5
        assert result["errors"] == 1
        assert result["batches_processed"] >= 1
        assert result["max_concurrent_insertions"] == 2
        assert result["total_insertion_time_seconds"] > 0
        inserter.reset_metrics()
        after = inserter.get_insertion_metrics()
    assert after["total_items_inserted"] == 0
    assert after["errors"] == 0
    assert after["batches_processed"] == 0


async def test_inserter_empty_batch() -> None:
    """An empty batch returns an empty list and touches nothing."""
    sink = FakeSink()
    async with MemoryInserter(make_settings(), sink=sink) as inserter:
        assert await inserter.insert_batch([]) == []
    assert sink.requests == []


def test_process_metrics_are_exported() -> None:
    """The registry carries the standard process_* series, to size a container from."""
    text = generate_latest(Metrics(5).registry).decode()
    for name in ("process_resident_memory_bytes", "process_cpu_seconds_total", "process_open_fds"):
        assert f"\n{name} " in text, name


async def test_inserter_used_before_opening_is_a_clear_error() -> None:
    """insert_batch outside `async with` raises RuntimeError, not an assert -O would drop."""
    inserter = MemoryInserter(make_settings(), sink=FakeSink())
    with pytest.raises(RuntimeError, match="async with MemoryInserter"):
        await inserter.insert_batch([valid_item("early")])


def test_inserter_without_settings_loads_them_like_the_worker(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """No settings given: `load_settings()` runs (env read, config files checked)."""
    monkeypatch.setenv("MAHAVISHNU_POOLS__MAX_CONCURRENT_MEMORY_INSERTIONS", "7")
    assert MemoryInserter().settings.concurrency == 7
    monkeypatch.setenv(CONFIG_ENV, str(tmp_path / "missing.yaml"))
    with pytest.raises(SettingsError, match="not found"):
        MemoryInserter()
