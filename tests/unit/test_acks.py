"""Tests for AckBatcher: which frames go out, in which order, and what a closed channel does."""

from __future__ import annotations

import asyncio
import random

from worker.acks import AckBatcher


class FakeChannel:
    """Records ack and nack frames in the order they are queued; can hold writes or be closed."""

    def __init__(self) -> None:
        self.frames: list[tuple[str, int, bool]] = []
        self.is_closed = False
        self.gate: asyncio.Event | None = None  # while set and unset, a waited-for write hangs

    async def _write(self, frame: tuple[str, int, bool], wait: bool) -> None:
        if self.is_closed:
            raise RuntimeError("channel closed")
        self.frames.append(frame)
        if wait and self.gate is not None:
            await self.gate.wait()

    async def basic_ack(self, tag: int, multiple: bool = False, wait: bool = True) -> None:
        await self._write(("ack", tag, multiple), wait)

    async def basic_reject(self, tag: int, *, requeue: bool = True, wait: bool = True) -> None:
        await self._write(("nack", tag, False), wait)


def batcher(tags: range) -> tuple[AckBatcher, FakeChannel]:
    """A batcher on a fake channel with `tags` delivered."""
    channel = FakeChannel()
    acks = AckBatcher(channel)  # type: ignore[arg-type]
    for tag in tags:
        acks.delivered(tag)
    return acks, channel


async def turn() -> None:
    """Let the batcher's turn end and its frames be written."""
    for _ in range(5):
        await asyncio.sleep(0)


async def test_a_run_of_acks_is_one_multiple_ack() -> None:
    """Acks of deliveries 1-5 in one loop turn leave as a single basic.ack(5, multiple)."""
    acks, channel = batcher(range(1, 6))
    assert all(acks.ack(tag) for tag in (3, 1, 5, 2, 4))
    await turn()
    assert channel.frames == [("ack", 5, True)]


async def test_a_delivery_still_running_stops_the_run() -> None:
    """With 2 still being stored, 1 is acked alone and 3, 4 one by one: nothing covers 2."""
    acks, channel = batcher(range(1, 5))
    for tag in (1, 3, 4):
        acks.ack(tag)
    await turn()
    assert channel.frames == [("ack", 1, False), ("ack", 3, False), ("ack", 4, False)]
    acks.ack(2)
    await turn()
    assert channel.frames[-1] == ("ack", 2, False)


async def test_a_requeued_delivery_is_never_covered_by_a_multiple_ack() -> None:
    """A nack of 2 goes out before any multiple ack that passes tag 2."""
    acks, channel = batcher(range(1, 5))
    assert await acks.nack(2)
    for tag in (1, 3, 4):
        acks.ack(tag)
    await turn()
    assert channel.frames == [("nack", 2, False), ("ack", 4, True)]


async def test_frames_keep_their_order_when_a_write_waits() -> None:
    """A requeue decided while an ack turn's write hangs goes out after that turn's frames."""
    acks, channel = batcher(range(1, 7))
    channel.gate = asyncio.Event()
    for tag in (1, 2, 4):
        acks.ack(tag)
    await turn()  # turn 1: ack(2, multiple), then ack 4 alone, whose write hangs
    nack = asyncio.create_task(acks.nack(3))
    await turn()
    acks.ack(5)
    acks.ack(6)
    await turn()
    channel.gate.set()
    assert await nack
    await turn()
    assert channel.frames == [
        ("ack", 2, True),
        ("ack", 4, False),
        ("nack", 3, False),
        ("ack", 5, False),  # decided while 3 was still unsettled: one by one, never covering 3
        ("ack", 6, False),
    ]


async def test_closed_channel_refuses_and_sends_nothing() -> None:
    """On a closed channel an ack or nack says False, and no frame is written."""
    acks, channel = batcher(range(1, 3))
    channel.is_closed = True
    assert acks.ack(1) is False
    assert await acks.nack(2) is False
    await turn()
    assert channel.frames == []


async def test_channel_closing_before_the_turn_ends_loses_nothing() -> None:
    """Acks queued just before the channel closed are not written; the broker redelivers them."""
    acks, channel = batcher(range(1, 4))
    for tag in (1, 2, 3):
        assert acks.ack(tag)
    channel.is_closed = True
    await turn()
    assert channel.frames == []
    assert acks.frames_sent == 0


async def test_a_requeue_is_a_basic_reject_never_a_nack() -> None:
    """A requeue is a basic.reject: it counts toward 4.3's delivery limit, a nack would not."""
    frames: list[tuple[str, int, bool]] = []

    class Recording(FakeChannel):
        async def basic_reject(self, tag: int, *, requeue: bool = True, wait: bool = True) -> None:
            frames.append(("reject", tag, requeue))

        async def basic_nack(self, tag: int, *args: object, **kwargs: object) -> None:
            frames.append(("nack", tag, True))

    acks = AckBatcher(Recording())  # type: ignore[arg-type]
    acks.delivered(1)
    assert await acks.nack(1)
    assert frames == [("reject", 1, True)]


async def test_retired_batcher_drops_pending_acks_and_refuses_more() -> None:
    """After the broker's cancel, acks decided before it and any settlement after send nothing."""
    acks, channel = batcher(range(1, 5))
    assert acks.ack(1) and acks.ack(2)  # decided, not yet written: the turn has not ended
    assert acks.retire() == 2
    assert acks.ack(3) is False
    assert await acks.nack(4) is False
    await turn()
    assert channel.frames == []
    assert not acks.live and acks.frames_sent == 0


async def test_a_turn_waiting_to_write_when_retired_is_not_written() -> None:
    """A turn's acks queued behind a hanging write are dropped when the consumer is cancelled."""
    acks, channel = batcher(range(1, 4))
    channel.gate = asyncio.Event()
    acks.ack(1)
    await turn()  # ack 1 is written and its write hangs, holding the sender
    acks.ack(2)
    await turn()  # the turn with ack 2 waits for the sender
    acks.retire()
    channel.gate.set()
    await acks.flush()
    assert channel.frames == [("ack", 1, False)]


class Broker(FakeChannel):
    """A fake channel that checks each frame as RabbitMQ would, against what we settled."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.outstanding = set(range(1, n + 1))
        self.acked_by_us: set[int] = set()
        self.requeued_by_us: set[int] = set()

    async def _write(self, frame: tuple[str, int, bool], wait: bool) -> None:
        kind, tag, multiple = frame
        assert tag in self.outstanding, f"unknown delivery tag {tag}: the channel would close"
        if kind == "nack":
            assert tag in self.requeued_by_us
            self.outstanding.discard(tag)
            return
        covered = {t for t in self.outstanding if t <= tag} if multiple else {tag}
        assert covered <= self.acked_by_us, f"acked before it was settled: {covered}"
        self.outstanding -= covered


async def test_random_settle_orders_ack_each_delivery_once_and_only_when_settled() -> None:
    """Any settle order: each delivery is acked or requeued once, never before we settled it."""
    rng = random.Random(5)
    for _ in range(300):
        n = rng.randint(1, 30)
        broker = Broker(n)
        acks = AckBatcher(broker)  # type: ignore[arg-type]
        for tag in range(1, n + 1):
            acks.delivered(tag)
        order = list(range(1, n + 1))
        rng.shuffle(order)
        for tag in order:
            if rng.random() < 0.2:
                broker.requeued_by_us.add(tag)
                assert await acks.nack(tag)
            else:
                broker.acked_by_us.add(tag)
                assert acks.ack(tag)
            if rng.random() < 0.3:
                await turn()
        await turn()
        assert broker.outstanding == set()


async def test_flush_writes_the_acks_of_the_current_turn_at_once() -> None:
    """flush() before a channel close writes the acks decided in this very turn."""
    acks, channel = batcher(range(1, 4))
    for tag in (1, 2, 3):
        acks.ack(tag)
    await acks.flush()  # no loop turn in between
    assert channel.frames == [("ack", 3, True)]
    await turn()
    assert channel.frames == [("ack", 3, True)]  # and nothing is written twice
