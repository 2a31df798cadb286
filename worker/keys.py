"""The idempotency key of an item: its message id, else a hash of the fields that identify it.

Mahavishnu reports every worker on every sync with a fresh `timestamp`, so a hash of the whole
body would change each minute and store the same memory again. The key is built from fields
that stay the same while the memory does (`worker.key_fields`); the collection time is not one.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence

from worker.models import MemoryItem
from worker.sections import DEFAULT_KEY_FIELDS, WorkerSettings

__all__ = ["DEFAULT_KEY_FIELDS", "item_key", "key_of"]


def item_key(item: MemoryItem, fields: Sequence[str] = DEFAULT_KEY_FIELDS) -> str:
    """A SHA-256 of the named fields (`content` or a metadata key); absent ones count as null."""
    metadata = item.metadata.model_dump(mode="json")
    values = [[name, item.content if name == "content" else metadata.get(name)] for name in fields]
    # Pairs in the configured order, fixed separators: the same item gives the same key anywhere.
    text = json.dumps(values, ensure_ascii=False, separators=(",", ":"), default=str)
    return "sha256:" + hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


def key_of(message_id: str | None, item: MemoryItem, worker: WorkerSettings) -> str:
    """The message id when the publisher set one, else the item's stable key.

    Under `worker.key_source: fields` the message id is not used: aio-pika (so oneiric's
    adapter) gives every message without one a random id, which would make each copy new.
    """
    if worker.key_source == "message_id" and message_id:
        return message_id
    return item_key(item, worker.key_fields)
