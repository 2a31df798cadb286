"""The console's view of the DLQ: the last read, as `memory-worker dlq` reads it.

A RabbitMQ queue cannot be browsed without taking its messages, so a read takes and holds
every message, then hands them all back (`worker.dlq.read`). While an action holds the DLQ a
read would see nothing, so the page keeps the snapshot it has and says how old it is.
"""

from __future__ import annotations

import asyncio

from aio_pika.abc import AbstractConnection

from worker import dlq
from worker.console.groups import Group, group_by_reason
from worker.dlq_model import DeadLetter, Snapshot


class DeadLetters:
    """The last snapshot of the DLQ, its groups, and the lock an action holds the DLQ by."""

    def __init__(self, connection: AbstractConnection, queue: str) -> None:
        self._connection = connection
        self.queue = queue
        self.snapshot: Snapshot | None = None
        self.groups: list[Group] = []
        self.error: str | None = None
        #: Held by a read and by each action: one of them at a time takes the DLQ's messages.
        self.lock = asyncio.Lock()

    def __repr__(self) -> str:
        seen = 0 if self.snapshot is None else len(self.snapshot.letters)
        return f"<DeadLetters queue={self.queue!r} seen={seen} busy={self.lock.locked()}>"

    async def read(self) -> Snapshot | None:
        """Read the DLQ again, unless an action holds it (then the last snapshot stays)."""
        if self.lock.locked():
            return self.snapshot
        async with self.lock:
            await self.read_held()
        return self.snapshot

    async def read_held(self) -> None:
        """Read the DLQ; the caller holds `lock`."""
        try:
            snapshot = await dlq.read(self._connection, self.queue)
        except dlq.DlqError as exc:
            self.error = str(exc)
            return
        self.error = None
        self.snapshot = snapshot
        self.groups = group_by_reason(snapshot.letters)

    def letters(self, reason: str | None = None) -> list[DeadLetter]:
        """The snapshot's dead letters, of one reason when given, in queue order."""
        if self.snapshot is None:
            return []
        return [d for d in self.snapshot.letters if reason is None or d.reason == reason]

    def find(self, fingerprint: str) -> DeadLetter | None:
        """The dead letter with this fingerprint in the snapshot, if any."""
        return next((d for d in self.letters() if d.fingerprint == fingerprint), None)
