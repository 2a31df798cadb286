"""The one way tests, the demo and the load test build a valid memory item."""

from __future__ import annotations

import json
from typing import Any

#: The metadata every valid item carries; `valid_item`'s keyword arguments change or add keys.
METADATA: dict[str, Any] = {
    "type": "task_result",
    "pool_id": "pool-1",
    "pool_type": "local",
    "worker_id": "w-7",
    "status": "completed",
    "timestamp": 1_717_171_717.25,
}


def valid_item(content: str = "the build passed", **metadata: Any) -> dict[str, Any]:
    """A valid memory item as a dict; keyword arguments change or add metadata keys."""
    return {"content": content, "metadata": {**METADATA, **metadata}}


def item_body(content: str = "the build passed", **metadata: Any) -> bytes:
    """A valid memory item encoded as a JSON message body."""
    return json.dumps(valid_item(content, **metadata)).encode()
