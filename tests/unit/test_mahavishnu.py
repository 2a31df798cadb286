"""Tests for the Mahavishnu 0.36 wiring: the outbox drainer's sink and the sync loop."""

from __future__ import annotations

from typing import Any, cast

import pytest

from tests.fixtures.mahavishnu_0_36 import (
    MahavishnuPool,
    OutboxDrainer,
    PoolManager,
    Row,
    RunPodPool,
    WorkerResult,
    reflection_row,
)
from worker.headers import H_OUTBOX_ERROR
from worker.mahavishnu import make_outbox_sink, row_item, sync_every
from worker.models import MemoryItem
from worker.publisher import BatchResult, ConnectionLost, Publisher, PublishResult
from worker.strict_json import DecodeError


class StubPublisher:
    """Records what would be published; fails while `down` is set."""

    def __init__(self) -> None:
        self.sent: list[tuple[bytes, str | None, dict[str, Any]]] = []
        self.down = False
        self.fail_next = 0

    def encode(self, item: Any) -> tuple[bytes, str]:
        """Validate like the real publisher (no blank-content rule)."""
        model = MemoryItem.model_validate(item)
        return model.model_dump_json().encode(), "k"

    async def publish_raw(
        self, body: bytes, *, message_id: str | None = None, headers: Any = None, **_: Any
    ) -> None:
        """Record, or fail as a lost connection."""
        if self.down or self.fail_next > 0:
            self.fail_next -= 1
            raise ConnectionLost("cut")
        self.sent.append((body, message_id, dict(headers or {})))

    async def publish_many(self, items: Any, **_: Any) -> BatchResult:
        """Publish each item; failures are results."""
        results = []
        for index, item in enumerate(list(items)):
            try:
                body, key = self.encode(item)
                await self.publish_raw(body, message_id=key)
            except (DecodeError, ConnectionLost) as exc:
                results.append(PublishResult(index, None, exc))
                continue
            results.append(PublishResult(index, key))
        return BatchResult(tuple(results))


def test_row_item_maps_text_and_tags() -> None:
    """A reflection row's text is the content; its tags ride in the metadata."""
    data = row_item("reflection:1", reflection_row("learned", ("a", "b")))
    assert data["content"] == "learned"
    assert data["metadata"]["tags"] == ["a", "b"] and data["metadata"]["type"] == "reflection"
    MemoryItem.model_validate(data)


@pytest.mark.parametrize(
    "payload", [{"text": ""}, {"text": 3}, {"text": "x", "tags": "a"}, {}, ["x"], None]
)
def test_row_item_refuses_malformed_rows(payload: Any) -> None:
    """Missing or blank text, tags not a list of strings, a payload not an object: DecodeError."""
    with pytest.raises(DecodeError):
        row_item("reflection:1", payload)


async def test_broker_failure_raises_so_the_drainer_keeps_the_row() -> None:
    """A publish the broker did not confirm raises: the row stays pending, nothing is lost."""
    stub = StubPublisher()
    stub.down = True
    drainer = OutboxDrainer(make_outbox_sink(cast(Publisher, stub)))
    drainer.rows = [Row(1, "reflection:a", reflection_row("a"))]
    assert await drainer.drain_once() == (0, 1)
    stub.down = False
    assert await drainer.drain_once() == (1, 0)
    assert [m for _, m, _ in stub.sent] == ["reflection:a"]


async def test_bad_row_is_published_for_the_dlq_and_does_not_block() -> None:
    """A malformed row goes out raw with the reason in a header; the rows behind it drain."""
    stub = StubPublisher()
    sink = make_outbox_sink(cast(Publisher, stub))
    drainer = OutboxDrainer(sink)
    drainer.rows = [
        Row(1, "reflection:bad", {"tags": []}),
        Row(2, "reflection:ok", reflection_row("ok")),
    ]
    assert await drainer.drain_once() == (2, 0)
    (_, bad_id, bad_headers), (_, ok_id, _) = stub.sent
    assert (bad_id, ok_id) == ("reflection:bad", "reflection:ok")
    assert "text" in bad_headers[H_OUTBOX_ERROR]
    assert repr(sink) == "<OutboxSink published=1 dead_lettered=1 skipped=0>"


async def test_sync_every_publishes_unconfirmed_items_again() -> None:
    """RunPod hands results over once: an unconfirmed one is published on the next round."""
    stub = StubPublisher()
    runpod = RunPodPool("gpu")
    runpod.finish("r-1", "out")
    manager = PoolManager(runpod, MahavishnuPool("m", [WorkerResult("w-1")]))
    stub.fail_next = 2  # the whole first round
    reports = await sync_every(manager, cast(Publisher, stub), 0.0, rounds=2)
    assert [(r.published, r.failed) for r in reports] == [(0, 2), (1, 0)]
    # Round 2: both failed items again first (the RunPod pool had handed its over), then the
    # worker MahavishnuPool reports on every sync: the same key, a duplicate for the worker.
    assert [b"out" in body for body, _, _ in stub.sent] == [True, False, False]
