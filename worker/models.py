"""The memory item model, and its decoding from and encoding to RabbitMQ message bodies."""

from __future__ import annotations

import hashlib
import json
import sys
from collections.abc import Mapping
from datetime import datetime
from typing import Annotated

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError
from pydantic_core import ErrorDetails, PydanticCustomError

from worker.outcome import Reason
from worker.strict_json import DecodeError, clip, parse_body

_MAX_NAME = 40
_MAX_ERRORS = 5
_MAX_EPOCH_S = 253_402_300_799  # 9999-12-31T23:59:59Z; also catches milliseconds sent as seconds
_JSON_TYPES: dict[type[object], str] = {
    list: "array",
    str: "string",
    int: "number",
    float: "number",
    bool: "boolean",
    type(None): "null",
}


def _timestamp(value: object) -> float | datetime:
    """Accept finite epoch seconds or an ISO-8601 string from 1970 to 9999."""
    if isinstance(value, bool):
        raise PydanticCustomError("timestamp_type", "must be epoch seconds, not a boolean")
    if isinstance(value, int | float):
        # Compare before converting: float() of a huge int overflows, and NaN fails every test.
        if not 0 <= value <= _MAX_EPOCH_S:
            raise PydanticCustomError("timestamp_range", "epoch seconds out of range 1970..9999")
        return float(value)
    if isinstance(value, str):
        try:
            value = datetime.fromisoformat(value)
        except ValueError:
            raise PydanticCustomError("timestamp_format", "not an ISO-8601 datetime") from None
    if isinstance(value, datetime):
        if value.year < 1970:
            raise PydanticCustomError("timestamp_range", "datetime before 1970")
        return value
    raise PydanticCustomError("timestamp_type", "must be epoch seconds or an ISO-8601 string")


class MemoryMetadata(BaseModel):
    """Where a memory came from; unknown keys are kept because Mahavishnu adds more."""

    model_config = ConfigDict(strict=True, extra="allow", frozen=True, allow_inf_nan=False)

    type: str = Field(min_length=1)
    pool_id: str = Field(min_length=1)
    pool_type: str = Field(min_length=1)
    worker_id: str = Field(min_length=1)
    status: str = Field(min_length=1)
    timestamp: Annotated[float | datetime, BeforeValidator(_timestamp)]
    duration_seconds: float | None = None
    exit_code: int | None = None
    error: str | None = None


class MemoryItem(BaseModel):
    """One memory to store: its text and where it came from."""

    model_config = ConfigDict(strict=True, extra="forbid", frozen=True)

    # Blank content decodes: Mahavishnu's pools send it, and `worker.summary` decides its fate.
    content: str
    metadata: MemoryMetadata


def too_large(content: str, limit: int) -> str | None:
    """Why content is over the sink's limit, or None; the worker and `publish` share the rule."""
    if len(content) <= limit:
        return None
    return f"content has {len(content)} characters; the sink keeps at most {limit}"


def _describe(exc: ValidationError) -> str:
    """Summarise validation errors as `path: message`, joined with '; '."""
    errors = exc.errors(include_url=False)
    parts = [f"{_path(error)}: {error['msg']}" for error in errors[:_MAX_ERRORS]]
    if len(errors) > _MAX_ERRORS:
        parts.append(f"and {len(errors) - _MAX_ERRORS} more")
    return "; ".join(parts)


def _path(error: ErrorDetails) -> str:
    """Render an error location like `metadata.tags[2]`."""
    text = "".join(
        f"[{part}]" if isinstance(part, int) else f".{clip(part, _MAX_NAME)}"
        for part in error["loc"]
    )
    return text.removeprefix(".") or "top level"


def decode_item(
    body: bytes, content_type: str | None, *, max_bytes: int = 1_048_576, max_depth: int = 32
) -> MemoryItem:
    """Decode a message body into a memory item or raise `DecodeError` saying why not."""
    value = parse_body(body, content_type, max_bytes, max_depth)
    if not isinstance(value, dict):
        kind = _JSON_TYPES.get(type(value), type(value).__name__)
        raise DecodeError(Reason.SCHEMA, f"top level must be a JSON object, not {kind}")
    try:
        return MemoryItem.model_validate(value)
    except ValidationError as exc:
        raise DecodeError(Reason.SCHEMA, _describe(exc)) from None


def _json_default(value: object) -> str:
    """Serialise the one non-JSON type a valid item holds: a datetime timestamp."""
    if isinstance(value, datetime):
        return value.isoformat()
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def encode_item(item: MemoryItem) -> bytes:
    """Encode an item as compact UTF-8 JSON that `decode_item` accepts."""
    # Unset optional fields stay absent rather than becoming nulls. The stdlib encoder,
    # unlike orjson, also writes integers wider than 64 bits, which decoding allows.
    data = item.model_dump(exclude_unset=True)
    text = json.dumps(
        data, ensure_ascii=False, separators=(",", ":"), allow_nan=False, default=_json_default
    )
    return text.encode("utf-8")


def idempotency_key(message_id: str | None, body: bytes) -> str:
    """The message id if set, else a SHA-256 of the body: a message's identity, as in the DLQ."""
    if message_id:
        return message_id
    return "sha256:" + hashlib.sha256(body).hexdigest()


def item_from_dict(data: Mapping[str, object]) -> MemoryItem:
    """Validate an item before publishing; raise `DecodeError(Reason.SCHEMA)` if invalid."""
    try:
        item = MemoryItem.model_validate(dict(data))
    except ValidationError as exc:
        raise DecodeError(Reason.SCHEMA, _describe(exc)) from None
    # Extra metadata may hold anything; prove the worker will decode what gets published.
    try:
        decode_item(encode_item(item), None, max_bytes=sys.maxsize)
    except DecodeError as exc:
        raise DecodeError(Reason.SCHEMA, exc.detail) from None
    except (TypeError, ValueError, RecursionError) as exc:
        raise DecodeError(Reason.SCHEMA, f"not encodable as JSON: {exc}") from None
    return item
