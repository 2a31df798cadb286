"""The publisher's validation and batching, without a broker."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Iterator
from typing import Any, cast

import pytest

from tests.unit.fakes import until
from worker.keys import item_key
from worker.models import MemoryItem
from worker.outcome import Reason
from worker.publish_sync import BlockingPublisher
from worker.publisher import (
    BatchFailed,
    BatchResult,
    ConnectionLost,
    Publisher,
    PublishResult,
)
from worker.settings import Settings
from worker.strict_json import DecodeError
from worker.testing.items import valid_item
from worker.topology import Tier, Topology

TOPOLOGY = Topology("x", "q", "x.retry", "x.dlx", "q.dlq", "quorum", 20, (Tier(1.0, "q.retry.1s"),))


class GatedPublisher(Publisher):
    """A Publisher whose sends wait for the test to release them; records peak concurrency."""

    def __init__(self, fail: set[str] | None = None, max_body_bytes: int | None = None) -> None:
        super().__init__(cast(Any, None), TOPOLOGY, max_body_bytes=max_body_bytes)
        self.fail = fail or set()
        self.release = asyncio.Event()
        self.in_flight = 0
        self.peak = 0
        self.sent: list[bytes] = []

    async def publish_raw(self, body: bytes, **kwargs: Any) -> None:
        self.in_flight += 1
        self.peak = max(self.peak, self.in_flight)
        try:
            await self.release.wait()
            if json.loads(body)["content"] in self.fail:
                raise ConnectionLost("cut")
            self.sent.append(body)
        finally:
            self.in_flight -= 1


def test_encode_is_compact_json_keyed_by_its_stable_fields():
    """An item encodes to compact JSON; its message id is the key of its stable fields."""
    body, key = GatedPublisher().encode(valid_item("hello"))
    assert json.loads(body) == valid_item("hello") and b", " not in body
    assert key == item_key(MemoryItem.model_validate(valid_item("hello")))
    _, later = GatedPublisher().encode(valid_item("hello", timestamp=1_800_000_000.0))
    assert later == key  # a later collection of the same memory: the same message id


def test_a_model_encodes_like_its_dict():
    """A MemoryItem and the dict it came from give the same body and key."""
    publisher = GatedPublisher()
    model = MemoryItem.model_validate(valid_item("hi"))
    assert publisher.encode(model) == publisher.encode(valid_item("hi"))


@pytest.mark.parametrize(
    ("value", "reason", "text"),
    [
        ("just text", Reason.SCHEMA, "object, not str"),
        ({"content": "x"}, Reason.SCHEMA, "metadata"),
        (valid_item("x" * 5000), Reason.TOO_LARGE, "limit is 2048"),
    ],
)
def test_encode_refuses_what_the_worker_would_refuse(value, reason, text):
    """Non-objects, schema errors and oversize bodies raise DecodeError before any send."""
    with pytest.raises(DecodeError) as caught:
        GatedPublisher(max_body_bytes=2048).encode(value)
    assert caught.value.reason is reason and text in caught.value.detail


async def test_publish_many_holds_at_most_n_outstanding():
    """With 50 items and a limit of 8, never more than 8 sends wait for a confirm."""
    publisher = GatedPublisher()
    task = asyncio.create_task(
        publisher.publish_many([valid_item(f"i{n}") for n in range(50)], max_outstanding=8)
    )
    await until(lambda: publisher.in_flight == 8)
    for _ in range(100):
        await asyncio.sleep(0)
    assert publisher.in_flight == publisher.peak == 8
    publisher.release.set()
    batch = await task
    assert batch.published == 50 and publisher.peak == 8


async def test_publish_many_reports_each_item_in_input_order():
    """Results come back in input order, failures included, and on_result sees every one."""
    publisher = GatedPublisher(fail={"i3"})
    publisher.release.set()
    seen: list[PublishResult] = []

    async def items() -> AsyncIterator[Any]:
        for n in range(6):
            yield valid_item(f"i{n}") if n != 4 else {"content": "bad"}

    batch = await publisher.publish_many(items(), max_outstanding=2, on_result=seen.append)
    assert [r.index for r in batch.results] == list(range(6))
    assert [r.ok for r in batch.results] == [True, True, True, False, False, True]
    assert isinstance(batch.results[3].error, ConnectionLost)
    assert isinstance(batch.results[4].error, DecodeError)
    assert batch.results[4].message_id is None and batch.results[3].message_id is not None
    assert sorted(r.index for r in seen) == list(range(6))
    with pytest.raises(BatchFailed, match="2 item"):
        batch.raise_for_failures()


async def test_publish_many_cancels_sends_when_the_input_fails():
    """If reading the input raises, sends already started are cancelled and the error surfaces."""
    publisher = GatedPublisher()

    def items() -> Iterator[Any]:
        yield valid_item("first")
        raise OSError("disk gone")

    with pytest.raises(OSError, match="disk gone"):
        await publisher.publish_many(items())
    assert publisher.in_flight == 0


def test_a_batch_without_failures_raises_nothing():
    """A batch whose items were all confirmed, or that had no items, raises nothing."""
    confirmed = BatchResult((PublishResult(0, "k0"), PublishResult(1, "k1")))
    assert confirmed.published == 2 and confirmed.failures == []
    confirmed.raise_for_failures()
    BatchResult(()).raise_for_failures()


async def test_publishing_before_opening_is_a_clear_error_even_under_python_o():
    """A Publisher used outside `async with` raises RuntimeError, not an assert -O would drop."""
    publisher = Publisher(cast(Any, None), TOPOLOGY)
    with pytest.raises(RuntimeError, match="async with Publisher"):
        await publisher.publish_item(valid_item("early"))


def test_blocking_publisher_before_opening_is_a_clear_error():
    """A BlockingPublisher used outside `with` raises RuntimeError naming how to open it."""
    publisher = BlockingPublisher(Settings())
    with pytest.raises(RuntimeError, match="with BlockingPublisher"):
        publisher.publish_item(valid_item("early"))
    with pytest.raises(RuntimeError, match="with BlockingPublisher"):
        publisher.publish_many([valid_item("early")])
