"""Tests for what the consumer does the moment the broker cancels it (no broker needed)."""

from __future__ import annotations

import asyncio
from typing import Any

from aiormq import spec
from aiormq.abc import DeliveredMessage
from pamqp.header import ContentHeader
from structlog.testing import capture_logs

from tests.unit.fakes import FakeSink, until
from tests.unit.test_acks import FakeChannel
from tests.unit.test_settle import FakeOutbox
from worker.acks import AckBatcher
from worker.consumer import Consumer
from worker.dispatch import Dispatcher
from worker.metrics import Metrics
from worker.pipeline import Pipeline
from worker.settings import Settings
from worker.settle import AmqpDelivery
from worker.testing.items import item_body
from worker.topology import Topology


def delivery(tag: int, channel: FakeChannel, acks: AckBatcher, outbox: FakeOutbox) -> Any:
    """An AmqpDelivery of a valid item, delivery tag `tag`."""
    message = DeliveredMessage(
        delivery=spec.Basic.Deliver(consumer_tag="ctag", delivery_tag=tag),
        header=ContentHeader(properties=spec.Basic.Properties(content_type="application/json")),
        body=item_body(f"item {tag}"),
        channel=channel,  # type: ignore[arg-type]
    )
    return AmqpDelivery(message, outbox, acks)  # type: ignore[arg-type]


async def test_broker_cancel_retires_the_channel_and_drops_what_has_not_started() -> None:
    """On the broker's cancel: one log line, counted, waiting deliveries dropped, no ack after."""
    settings = Settings()
    sink = FakeSink()
    sink.gate = asyncio.Event()
    dispatcher = Dispatcher(Pipeline(sink, settings, Metrics(settings.concurrency)), limit=1)
    cancels: list[int] = []
    consumer = Consumer(
        None,  # type: ignore[arg-type]  # the cancel itself touches no connection
        Topology.from_settings(settings),
        dispatcher,
        prefetch=2,
        worker_id="w",
        on_cancel=lambda: cancels.append(1),
    )
    consumer._tag = "ctag"
    channel, outbox = FakeChannel(), FakeOutbox()
    acks = consumer._acks = AckBatcher(channel)  # type: ignore[arg-type]
    for tag in (1, 2, 3):
        dispatcher.submit(delivery(tag, channel, acks, outbox))
    await until(lambda: sink.active == 1)
    with capture_logs() as logs:
        consumer._cancelled_by_broker(channel, spec.Basic.Cancel(consumer_tag="ctag"))  # type: ignore[arg-type]
        sink.gate.set()
        await until(lambda: sink.active == 0 and dispatcher.in_flight == 0)
    assert consumer.lost and cancels == [1]
    [line] = [e for e in logs if e["event"] == "consumer_cancelled_by_broker"]
    assert (line["not_started"], line["in_flight"], line["acks_dropped"]) == (2, 1, 0)
    assert len(sink.requests) == 1  # the two waiting deliveries were never started
    await acks.flush()
    assert channel.frames == [] and outbox.published == []
    await consumer.close()
