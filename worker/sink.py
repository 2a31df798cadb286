"""Sinks: one store request in, one classified :class:`Outcome` out.

`Sink` is the seam the pipeline stores through; `HttpSink` posts JSON to a plain HTTP service,
and `worker.mcp.McpSink` speaks MCP to Session-Buddy. No sink raises for a failed store: every
failure it understands becomes `rejected` (permanent) or `transient`. Only a bug escapes as an
exception, and the pipeline dead-letters that as `internal_error`. Both speak through
`worker.transport.HttpClient`, whose errors they turn into `transient`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Protocol, Self

import orjson

from worker.outcome import Outcome
from worker.transport import HttpClient, Reply, TransportError, TransportTimeout

DETAIL_CHARS = 1000


@dataclass(frozen=True, slots=True)
class StoreRequest:
    """One store call: the content, the item's metadata, its idempotency key, extra tags."""

    content: str
    metadata: Mapping[str, Any]
    key: str
    extra_tags: Sequence[str] = field(default_factory=tuple)


class Sink(Protocol):
    """Stores one request and says what happened; never raises for a failed store."""

    async def store(self, request: StoreRequest) -> Outcome:
        """Store one request."""
        ...


class SinkConfigError(Exception):
    """The sink answers, but not the way this configuration needs (unknown tool, auth)."""


def clip(text: str) -> str:
    """`text`, cut to the length a detail may have."""
    return text if len(text) <= DETAIL_CHARS else text[: DETAIL_CHARS - 1] + "…"


def http_failure(reply: Reply) -> Outcome:
    """A non-success HTTP answer: transient for auth, throttling and 5xx, else the item's fault."""
    status = reply.status
    detail = clip(f"HTTP {status}: {reply.text.strip()}")
    if status in (401, 403, 408, 425, 429) or status >= 500:
        return Outcome.transient(detail, reply.retry_after_s, overload=status in (429, 503))
    return Outcome.rejected(detail)


class HttpSink:
    """A plain JSON-over-HTTP store (ACT-008's `POST /memory` shape)."""

    def __init__(self, client: HttpClient, url: str) -> None:
        self._client = client
        self._url = url

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        return None

    async def store(self, request: StoreRequest) -> Outcome:
        """POST the item; 2xx and 409 (already there) count as stored."""
        body = {"content": request.content, "metadata": dict(request.metadata)}
        if request.extra_tags:
            body["tags"] = list(request.extra_tags)
        try:
            content = orjson.dumps(body)
        except TypeError:
            # orjson stops at 64-bit integers; decoding admits wider ones in extra metadata.
            content = json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode()
        headers = {"content-type": "application/json", "idempotency-key": request.key}
        try:
            reply = await self._client.request("POST", self._url, headers, content)
        except TransportTimeout as exc:
            return Outcome.transient(f"timeout: {exc}", overload=True)
        except TransportError as exc:
            return Outcome.transient(str(exc))
        if 200 <= reply.status < 300 or reply.status == 409:
            return Outcome.stored()
        return http_failure(reply)
