"""Feeding memory-worker from Mahavishnu 0.36.0 as it is: its pool sync and its outbox drainer.

Two ways in, neither needing a change to Mahavishnu:

- `sync_every(pool_manager, publisher)`: `collect_and_publish` on Mahavishnu's sync interval
  (`pools.memory_sync_interval`, 60 s), in place of its `MemoryAggregator` (turned off with
  `pools.memory_aggregation_enabled: false`). Message ids leave out the collection time, so a
  worker reported on every sync is stored once.
- `make_outbox_sink(publisher)`: the `sink` of its `MemoryOutboxDrainer`,
  `async (key, payload) -> None`. The drainer stops its batch at the first exception, so the
  sink raises only when a retry can help (the broker did not confirm); a row that can never
  be an item is published as it is, to be dead-lettered with a reason, and counted.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import structlog

from worker.headers import H_OUTBOX_ERROR
from worker.outcome import Reason
from worker.pools import PoolManager, SyncReport, collect_and_publish
from worker.publisher import Publisher
from worker.strict_json import DecodeError

log = structlog.get_logger("worker.mahavishnu")

#: Mahavishnu 0.36.0's default `pools.memory_sync_interval` (core/config.py, PoolConfig).
SYNC_INTERVAL_S = 60.0
#: The one row kind Mahavishnu's own drainer sink stores (pools/memory_aggregator.py).
REFLECTION = "reflection"
OUTBOX_METADATA = {"pool_id": "mahavishnu-outbox", "pool_type": "outbox", "worker_id": "outbox"}


def row_item(key: str, payload: Mapping[str, Any]) -> dict[str, Any]:
    """A reflection row `{"text": ..., "tags": [...]}` as an item; `DecodeError` if it is none."""
    if not isinstance(payload, Mapping):  # the WAL holds JSON: any value, not only objects
        raise DecodeError(Reason.SCHEMA, f"row {key!r}: payload must be an object")
    text, tags = payload.get("text"), payload.get("tags", [])
    if not isinstance(text, str) or not text.strip():
        raise DecodeError(Reason.SCHEMA, f"row {key!r}: text must be a non-blank string")
    if not isinstance(tags, list) or not all(isinstance(t, str) for t in tags):
        raise DecodeError(Reason.SCHEMA, f"row {key!r}: tags must be a list of strings")
    metadata = {
        "type": REFLECTION,
        **OUTBOX_METADATA,
        "status": "queued",
        "timestamp": time.time(),  # not part of the key: the row key is the message id
        "tags": tags,
    }
    return {"content": text, "metadata": metadata}


@dataclass
class OutboxSink:
    """The drainer's sink: publishes each reflection row with its row key as the message id."""

    publisher: Publisher
    published: int = 0
    dead_lettered: int = 0
    skipped: int = 0

    def __repr__(self) -> str:
        return (
            f"<OutboxSink published={self.published} dead_lettered={self.dead_lettered} "
            f"skipped={self.skipped}>"
        )

    async def __call__(self, key: str, payload: dict[str, Any]) -> None:
        """Publish one row; raises `PublishFailed` only, which a later drain may cure."""
        kind = key.partition(":")[0]
        if kind != REFLECTION:
            # Mahavishnu's own sink skips other kinds too (code_graph:*): not memories.
            self.skipped += 1
            log.info("outbox_row_skipped", key=key, kind=kind)
            return
        try:
            body, _ = self.publisher.encode(row_item(key, payload))
        except DecodeError as exc:
            await self._dead_letter(key, payload, exc.detail)
            return
        await self.publisher.publish_raw(body, message_id=key)
        self.published += 1

    async def _dead_letter(self, key: str, payload: Mapping[str, Any], why: str) -> None:
        """Publish the row as it is: the worker dead-letters it, so it waits in the DLQ."""
        # Raising instead would stop the drainer's batch here, every drain, until the row
        # reached max_attempts: one bad row would hold back every row behind it.
        body = json.dumps({"key": key, "payload": payload}, default=str).encode()
        await self.publisher.publish_raw(body, message_id=key, headers={H_OUTBOX_ERROR: why})
        self.dead_lettered += 1
        log.warning("outbox_row_malformed", key=key, error=why)


def make_outbox_sink(publisher: Publisher) -> OutboxSink:
    """A sink for Mahavishnu's `MemoryOutboxDrainer(writer=..., breaker=..., sink=...)`."""
    return OutboxSink(publisher)


async def sync_every(
    pool_manager: PoolManager,
    publisher: Publisher,
    interval_s: float = SYNC_INTERVAL_S,
    *,
    rounds: int | None = None,
) -> list[SyncReport]:
    """Run `collect_and_publish` every `interval_s` (forever, or `rounds` times); the reports.

    A pool hands its items over once, so the unconfirmed ones are published again next round.
    """
    reports: list[SyncReport] = []
    retry: list[Mapping[str, Any]] = []
    while rounds is None or len(reports) < rounds:
        if retry:
            batch = await publisher.publish_many(retry)
            retry = [retry[f.index] for f in batch.failures if not isinstance(f.error, DecodeError)]
        report = await collect_and_publish(pool_manager, publisher)
        # An invalid item would fail again; one the broker did not confirm may not.
        retry.extend(f.item for f in report.item_failures if _valid(publisher, f.item))
        reports = [*reports[-1:], report] if rounds is None else [*reports, report]
        if rounds is None or len(reports) < rounds:
            await asyncio.sleep(interval_s)
    return reports


def _valid(publisher: Publisher, item: Mapping[str, Any]) -> bool:
    try:
        publisher.encode(item)
    except DecodeError:
        return False
    return True
