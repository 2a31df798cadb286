"""Tests for AmqpDelivery: what a settlement does once the broker cancelled the consumer."""

from __future__ import annotations

from typing import Any

from aiormq import spec
from aiormq.abc import DeliveredMessage
from pamqp.header import ContentHeader
from structlog.testing import capture_logs

from tests.unit.test_acks import FakeChannel
from worker.acks import AckBatcher
from worker.outcome import Action, Decision, Outcome
from worker.pipeline import Verdict
from worker.settle import AmqpDelivery


class FakeOutbox:
    """Records the retries and dead letters it is asked to publish."""

    def __init__(self) -> None:
        self.published: list[str] = []

    async def retry(self, message: Any, verdict: Verdict) -> None:
        self.published.append("retry")

    async def dead_letter(self, message: Any, verdict: Verdict) -> None:
        self.published.append("dead_letter")


def amqp_delivery(tag: int, channel: FakeChannel, acks: AckBatcher, outbox: FakeOutbox) -> Any:
    """An AmqpDelivery of an empty JSON body with delivery tag `tag`."""
    header = ContentHeader(properties=spec.Basic.Properties(content_type="application/json"))
    message = DeliveredMessage(
        delivery=spec.Basic.Deliver(consumer_tag="ctag", delivery_tag=tag),
        header=header,
        body=b"{}",
        channel=channel,  # type: ignore[arg-type]
    )
    return AmqpDelivery(message, outbox, acks)  # type: ignore[arg-type]


async def test_after_a_broker_cancel_nothing_is_published_or_acked() -> None:
    """After the cancel a retry publishes no copy and nothing is acked; the broker redelivers."""
    channel, outbox = FakeChannel(), FakeOutbox()
    acks = AckBatcher(channel)  # type: ignore[arg-type]
    retry, ack = amqp_delivery(1, channel, acks, outbox), amqp_delivery(2, channel, acks, outbox)
    acks.retire()
    with capture_logs() as logs:
        retried = await retry.settle(
            Verdict(Decision(Action.RETRY, delay_s=1.0), Outcome.transient("503"), 1, None)
        )
        acked = await ack.settle(Verdict(Decision(Action.ACK), Outcome.stored(), 1, None))
    await acks.flush()
    assert retried is False and acked is False
    assert outbox.published == [] and channel.frames == []
    assert [e["error"] for e in logs] == ["consumer cancelled by the broker"] * 2
    assert all(e["redelivery_expected"] for e in logs)
