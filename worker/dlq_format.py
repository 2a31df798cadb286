"""A dead letter's body and headers as text, the same for `dlq show` and the console."""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any


def pretty_body(body: bytes) -> str:
    """JSON indented; anything else as text, bytes that are not UTF-8 escaped (never run)."""
    try:
        return json.dumps(json.loads(body), indent=2, ensure_ascii=False)
    except (ValueError, RecursionError):
        return body.decode("utf-8", "backslashreplace")


def jsonable(value: object) -> Any:
    """AMQP header values (bytes, timestamps, nested tables) as JSON-ready values."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    if isinstance(value, bytes):
        return value.decode("utf-8", "backslashreplace")
    if isinstance(value, datetime):
        return value.isoformat()
    if value is None or isinstance(value, str | int | float | bool):
        return value
    return str(value)
