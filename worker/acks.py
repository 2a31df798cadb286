"""Acks sent once per event-loop turn: one `basic.ack(multiple)` for a run of settled deliveries.

An ack frame per message is a good share of aio-pika's consume-and-ack cost (~105 µs per
message, ~90 µs with acks coalesced: about 3 acks a frame at 0 ms, measured on the 2-core box),
so the acks a turn of the loop produces leave together, under these rules:

- a multiple ack covers a delivery tag only when that delivery and every earlier one on the
  channel were settled by us: the run stops at the first delivery still being handled, so an
  ack never covers a message that is not stored;
- a delivery settled by another frame (a requeue) leaves the run before that frame is sent;
  the broker then forgets it, and a multiple ack above its tag does not touch it;
- acks past the first unsettled delivery go out one by one in the same turn, so a slow store
  never holds back the others' acks (nor the prefetch credit an ack returns);
- frames, requeues included, are written one sender at a time in the order they were
  decided: a multiple ack that overtook a requeue below it would ack that message, and a
  single ack that came after a multiple ack covering it is an unknown tag, on which the
  broker closes the channel;
- an ack on a channel already closed says False (a late settlement); one whose frame the
  closing channel never wrote is redelivered by the broker, like any ack lost on the way;
- once the broker has cancelled the consumer (`retire`), nothing more is written on the
  channel, not even acks decided before the cancel arrived: see `retire` for why.
"""

from __future__ import annotations

import asyncio
import bisect

from aio_pika.exceptions import CONNECTION_EXCEPTIONS
from aiormq.abc import AbstractChannel


class AckBatcher:
    """Settles the deliveries of one AMQP channel; a new channel (a reconnect) gets its own."""

    def __init__(self, channel: AbstractChannel) -> None:
        self.channel = channel
        self._unsettled: list[int] = []  # delivered, not yet covered by a frame: ascending
        self._acked: set[int] = set()  # settled with an ack that has not been sent yet
        self._flushing = False
        self._sends: set[asyncio.Task[bool]] = set()
        # Frames leave in the order they were decided: aiormq's write queue is bounded, so a
        # put can wait, and another sender must not overtake it.
        self._sending = asyncio.Lock()
        self.frames_sent = 0
        self.retired = False

    @property
    def live(self) -> bool:
        """Whether a settlement can still be sent: not retired and the channel open."""
        return not self.retired and not self.channel.is_closed

    def __repr__(self) -> str:
        return (
            f"<AckBatcher unsettled={len(self._unsettled)} pending_acks={len(self._acked)} "
            f"frames_sent={self.frames_sent} retired={self.retired}>"
        )

    def retire(self) -> int:
        """The broker cancelled the consumer: settle nothing more here; returns acks dropped.

        RabbitMQ 4.3 keeps the channel open after a broker `basic.cancel` (a consumer
        timeout), and an ack on it re-activates the cancelled consumer: the broker then sends
        deliveries to a tag the client has dropped, which sit unacked until the channel closes.
        The consumer closes this channel next, and the broker requeues every delivery still
        unacked on it, so an ack dropped here costs a redelivery, which the idempotency key
        turns into an ack without a store.
        """
        self.retired = True
        dropped = len(self._acked)
        self._acked.clear()
        self._unsettled.clear()
        return dropped

    def delivered(self, tag: int) -> None:
        """A delivery arrived; its tag stays unsettled until a frame covers it."""
        bisect.insort(self._unsettled, tag)

    def ack(self, tag: int) -> bool:
        """Ack a delivery with the others of this loop turn; False if the channel had closed.

        The frame is written after the turn, so a channel that closes in between is not seen
        here: the broker then redelivers the message, as for any ack lost on the way.
        """
        if not self.live:
            return False
        self._acked.add(tag)
        if not self._flushing:
            self._flushing = True
            asyncio.get_running_loop().call_soon(self._flush)
        return True

    async def nack(self, tag: int) -> bool:
        """Requeue a delivery with a frame of its own; False if the channel had closed."""
        async with self._sending:
            if not self.live:
                return False
            self._forget(tag)  # before the frame: no multiple ack may cover it from now on
            try:
                # basic.reject, not basic.nack: on RabbitMQ 4.3 a nack-requeue no longer counts
                # toward a quorum queue's delivery limit, so a message requeued again and
                # again would never reach the dead-letter queue; a reject counts on every version.
                await self.channel.basic_reject(tag, requeue=True)
            except CONNECTION_EXCEPTIONS:
                return False
        self.frames_sent += 1
        return True

    async def flush(self) -> None:
        """Write every ack decided so far; call before closing the channel, or they are lost."""
        if self._flushing:
            self._flush()
        await asyncio.gather(*self._sends, return_exceptions=True)

    def _forget(self, tag: int) -> None:
        index = bisect.bisect_left(self._unsettled, tag)
        if index < len(self._unsettled) and self._unsettled[index] == tag:
            del self._unsettled[index]

    def _flush(self) -> None:
        self._flushing = False
        task = asyncio.ensure_future(self._send(self._frames()))
        self._sends.add(task)
        task.add_done_callback(self._sends.discard)

    def _frames(self) -> list[tuple[int, bool]]:
        """(tag, multiple) for this turn's acks, taking their tags out of the unsettled list."""
        unsettled, acked = self._unsettled, self._acked
        run = 0
        while run < len(unsettled) and unsettled[run] in acked:
            acked.discard(unsettled[run])
            run += 1
        frames = [(unsettled[run - 1], run > 1)] if run else []
        del unsettled[:run]
        for tag in sorted(acked):
            self._forget(tag)
            frames.append((tag, False))
        acked.clear()
        return frames

    async def _send(self, frames: list[tuple[int, bool]]) -> bool:
        last = len(frames) - 1
        async with self._sending:
            try:
                for index, (tag, multiple) in enumerate(frames):
                    # Checked before each frame: a write that waits lets the cancel in between.
                    if self.retired:
                        return False  # decided before the cancel, written after it: see `retire`
                    # Only the turn's last write waits for the frame to leave.
                    await self.channel.basic_ack(tag, multiple=multiple, wait=index == last)
                    self.frames_sent += 1
            except CONNECTION_EXCEPTIONS:
                return False
        return True
