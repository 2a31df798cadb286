"""The publisher's validation and batching, without a broker."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Iterator
from typing import Any, cast

import pytest
from aio_pika.abc import AbstractRobustChannel
from aio_pika.exceptions import ConnectionClosed

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


class FlakyChannel:
    """A channel whose connection is lost under the first `lost` publishes, then comes back."""

    def __init__(self, lost: int, back: asyncio.Event | None = None) -> None:
        self.lost = lost
        self.back = back
        self.sent: list[bytes] = []
        self.ready_calls = 0

    @property
    def is_closed(self) -> bool:
        return self.back is not None and not self.back.is_set()

    async def publish(self, message: Any, routing_key: str, **kwargs: Any) -> None:
        if self.lost:
            self.lost -= 1
            raise ConnectionClosed(320, "CONNECTION_FORCED - node going down")
        self.sent.append(message.body)

    async def ready(self) -> None:
        self.ready_calls += 1
        if self.back is not None:
            await self.back.wait()


class RobustFlakyChannel(FlakyChannel):
    """The same, seen as aio-pika's robust channel, which reconnects (to the next node)."""


AbstractRobustChannel.register(RobustFlakyChannel)


def _open_on(channel: FlakyChannel, confirm_timeout_s: float = 5.0) -> Publisher:
    publisher = Publisher(cast(Any, None), TOPOLOGY, confirm_timeout_s=confirm_timeout_s)
    publisher._channel = publisher._exchange = cast(Any, channel)
    return publisher


async def test_a_publish_lost_with_a_robust_connection_is_sent_again_once_it_is_back():
    """Connection lost before the confirm on a robust channel: sent again, returns confirmed."""
    channel = RobustFlakyChannel(lost=2)
    publisher = _open_on(channel)
    await publisher.publish_raw(b"{}", message_id="k")
    assert channel.sent == [b"{}"] and channel.ready_calls == 2


async def test_a_publish_lost_with_a_plain_connection_fails_at_once():
    """A plain connection never comes back: the publish raises ConnectionLost, not sent again."""
    channel = FlakyChannel(lost=1)
    with pytest.raises(ConnectionLost, match="CONNECTION_FORCED"):
        await _open_on(channel).publish_raw(b"{}", message_id="k")
    assert channel.sent == [] and channel.ready_calls == 0


async def test_an_outage_longer_than_the_confirm_timeout_fails_the_publish_and_later_ones():
    """Not back within the timeout: ConnectionLost, later publishes fail at once until it is."""
    channel = RobustFlakyChannel(lost=1, back=asyncio.Event())
    publisher = _open_on(channel, confirm_timeout_s=0.2)
    loop = asyncio.get_running_loop()
    with pytest.raises(ConnectionLost, match=r"over 0\.2 s"):
        await publisher.publish_raw(b"{}", message_id="k")
    started = loop.time()
    with pytest.raises(ConnectionLost):
        await publisher.publish_raw(b"{}", message_id="k2")
    assert loop.time() - started < 0.1 and channel.sent == []
    channel.back.set()
    await publisher.publish_raw(b"{}", message_id="k3")
    assert channel.sent == [b"{}"]
