"""Tests for blank content (summarize, dead_letter, skip) and the stable idempotency key."""

from __future__ import annotations

from typing import Any

import pytest
from structlog.testing import capture_logs

from tests.unit.fakes import FakeDelivery, FakeSink
from worker.keys import item_key, key_of
from worker.metrics import Metrics
from worker.models import MemoryItem, decode_item, encode_item, idempotency_key
from worker.outcome import Action, Kind, Reason
from worker.pipeline import Pipeline
from worker.settings import Settings
from worker.summary import SUMMARY_TAG, summarize
from worker.testing.items import item_body, valid_item


def pipeline(sink: FakeSink, **sink_settings: Any) -> Pipeline:
    """A pipeline over the fake sink with these sink settings."""
    settings = Settings(sink=sink_settings)
    return Pipeline(sink, settings, Metrics(settings.concurrency))


def item(content: str = "", **metadata: Any) -> MemoryItem:
    """A validated item."""
    return MemoryItem.model_validate(valid_item(content, **metadata))


def test_blank_content_decodes() -> None:
    """Empty and whitespace-only content are valid items: the sink settings decide their fate."""
    for content in ("", " \n\t\u3000"):
        assert decode_item(item_body(content), None).content == content


def test_summary_names_pool_worker_status_exit_code_duration_and_error() -> None:
    """The generated text says what the metadata says, error only when there is one."""
    failed = item(
        exit_code=1, duration_seconds=2.5, error="boom\n  at line 3", pool_type="mahavishnu"
    )
    text = summarize(failed.metadata)
    for part in ("w-7", "mahavishnu pool pool-1", "status completed", "exit code 1", "2.5 s"):
        assert part in text
    assert "Error: boom at line 3" in text
    plain = summarize(item(exit_code=0, duration_seconds=0).metadata)
    assert "Error" not in plain and "exit code 0" in plain


async def test_blank_content_is_stored_as_a_tagged_summary_by_default() -> None:
    """Under the default `summarize` the sink gets the summary, tagged summary:generated."""
    sink = FakeSink()
    verdict = await pipeline(sink).handle(FakeDelivery(item_body("", exit_code=0)))
    assert verdict.decision.action is Action.ACK
    (request,) = sink.requests
    assert request.content.startswith("Worker w-7 of local pool pool-1")
    assert SUMMARY_TAG in request.extra_tags


async def test_content_with_text_is_stored_untagged() -> None:
    """Content that says something is stored as it is, without the summary tag."""
    sink = FakeSink()
    await pipeline(sink).handle(FakeDelivery(item_body("ran 3 tests")))
    assert [(r.content, tuple(r.extra_tags)) for r in sink.requests] == [("ran 3 tests", ())]


async def test_blank_content_dead_letters_under_dead_letter() -> None:
    """Under `dead_letter` a blank item is dead-lettered (schema) without a sink call."""
    sink = FakeSink()
    verdict = await pipeline(sink, blank_content="dead_letter").handle(FakeDelivery(item_body("")))
    assert verdict.decision.action is Action.DEAD_LETTER
    assert verdict.decision.reason is Reason.SCHEMA
    assert "blank" in verdict.outcome.detail and sink.requests == []


async def test_blank_content_is_acked_and_counted_under_skip() -> None:
    """Under `skip` a blank item is acked unstored, counted and logged as outcome `skipped`."""
    sink = FakeSink()
    p = pipeline(sink, blank_content="skip")
    with capture_logs() as logs:
        verdict = await p.handle(FakeDelivery(item_body(" ")))
    assert verdict.decision.action is Action.ACK
    assert verdict.outcome.kind is Kind.SKIPPED and sink.requests == []
    labels = {"outcome": "skipped", "action": "ack", "reason": ""}
    sample = p._metrics.registry.get_sample_value("memory_worker_messages_total", labels)
    assert sample == 1.0
    (line,) = [e for e in logs if e["event"] == "message_settled"]
    assert line["outcome"] == "skipped" and "blank_content = skip" in line["detail"]


def test_key_leaves_out_the_collection_time() -> None:
    """Two collections of the same worker's memory have one key; a new status a new key."""
    first, later = item(timestamp=1_700_000_000.0), item(timestamp=1_700_000_060.5)
    assert item_key(first) == item_key(later)
    assert item_key(item(status="failed")) != item_key(first)
    assert item_key(item(exit_code=1)) != item_key(item(exit_code=0))
    assert item_key(item("out")) != item_key(first)


def test_key_fields_are_configurable() -> None:
    """With key_fields [pool_id, worker_id] a status change keeps the key."""
    fields = ["pool_id", "worker_id"]
    assert item_key(item(status="failed"), fields) == item_key(item(), fields)
    assert item_key(item(), fields) != item_key(item(), ["pool_id", "worker_id", "status"])


async def test_redelivered_collection_without_message_id_is_a_duplicate() -> None:
    """A worker without message ids sees the next sync's copy as a duplicate of the first."""
    sink = FakeSink()
    p = pipeline(sink)
    first = await p.handle(FakeDelivery(item_body("", timestamp=1_700_000_000.0)))
    again = await p.handle(FakeDelivery(item_body("", timestamp=1_700_000_060.0)))
    changed = await p.handle(FakeDelivery(item_body("", status="failed")))
    kinds = [v.outcome.kind for v in (first, again, changed)]
    assert kinds == [Kind.STORED, Kind.DUPLICATE, Kind.STORED]
    assert sink.requests[0].key == item_key(item(timestamp=1_700_000_000.0))


async def test_settled_line_names_the_key_the_item_was_stored_under() -> None:
    """Without a message id the logged idempotency_key is the stable key, one for every sync."""
    sink = FakeSink()
    p = pipeline(sink)
    with capture_logs() as logs:
        for timestamp in (1_700_000_000.0, 1_700_000_060.0):
            await p.handle(FakeDelivery(item_body("", timestamp=timestamp)))
        await p.handle(FakeDelivery(b"{nope"))
    keys = [e["idempotency_key"] for e in logs if e["event"] == "message_settled"]
    assert keys[:2] == [sink.requests[0].key] * 2
    assert keys[2] == idempotency_key(None, b"{nope")  # no item: the body's hash


def test_key_source_fields_leaves_out_the_message_id() -> None:
    """Under key_source: fields a random message id (aio-pika's) does not make a copy new."""
    default, fields = Settings().worker, Settings(worker={"key_source": "fields"}).worker
    assert key_of("m-1", item(), default) == "m-1"
    assert key_of("m-1", item(), fields) == key_of("m-2", item(), fields) == item_key(item())
    assert key_of(None, item(), default) == item_key(item())


@pytest.mark.parametrize("message_id", ["m-1", "reflection:abc"])
async def test_a_message_id_is_the_key(message_id: str) -> None:
    """A message id set by the publisher is the key, whatever the body."""
    sink = FakeSink()
    await pipeline(sink).handle(FakeDelivery(encode_item(item("x")), message_id=message_id))
    assert [r.key for r in sink.requests] == [message_id]
