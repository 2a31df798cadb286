"""Sinks: one store request in, one classified :class:`Outcome` out.

`McpSink` speaks MCP streamable HTTP to Session-Buddy (`store_reflection` inside one long-lived
session); `HttpSink` posts JSON to a plain HTTP service. Neither raises for a failed store:
every failure the sink understands becomes `rejected` (permanent) or `transient`. Only a bug
escapes as an exception, and the pipeline dead-letters that as `internal_error`.

An HTTP 200 from Session-Buddy does not mean stored: the answer's text is what counts.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import itertools
import json
import math
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Protocol, Self

import httpx
import orjson

from worker.outcome import Outcome
from worker.settings import Settings, SinkSettings

PROTOCOL_VERSION = "2025-06-18"
STORED_MARK = "stored successfully"
SOFT_ERROR_MARK = "❌"
PROJECT_PATTERN = re.compile(r"[^a-zA-Z0-9._-]")
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


def make_client(settings: Settings) -> httpx.AsyncClient:
    """An HTTP client whose pool fits the concurrency limit, on aiohttp's transport."""
    from httpx_aiohttp import AiohttpTransport

    size = settings.concurrency + 2
    limits = httpx.Limits(max_connections=size, max_keepalive_connections=size)
    timeout = httpx.Timeout(settings.sink.timeout_s, connect=settings.sink.connect_timeout_s)
    headers = {"user-agent": "memory-worker"}
    if settings.sink.token is not None:
        headers["authorization"] = f"Bearer {settings.sink.token.get_secret_value()}"
    return httpx.AsyncClient(
        transport=AiohttpTransport(limits=limits), timeout=timeout, headers=headers
    )


def retry_after_s(response: httpx.Response) -> float | None:
    """Seconds from a Retry-After header (delta or HTTP date), or None."""
    value = response.headers.get("retry-after")
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            parsed = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None  # neither delta-seconds nor an HTTP date: ignore it
        return max(0.0, parsed.timestamp() - time.time())
    return max(0.0, seconds) if math.isfinite(seconds) else None


def _clip(text: str) -> str:
    return text if len(text) <= DETAIL_CHARS else text[: DETAIL_CHARS - 1] + "…"


def _http_failure(response: httpx.Response) -> Outcome:
    status = response.status_code
    detail = _clip(f"HTTP {status}: {response.text.strip()}")
    if status in (401, 403, 408, 425, 429) or status >= 500:
        return Outcome.transient(detail, retry_after_s(response), overload=status in (429, 503))
    return Outcome.rejected(detail)


def reflection_arguments(request: StoreRequest, sink: SinkSettings) -> dict[str, Any]:
    """Map a store request onto `store_reflection`'s arguments."""
    tags = [
        f"{name}:{request.metadata[name]}"
        for name in sink.tag_fields
        if request.metadata.get(name) is not None
    ]
    tags.extend(sink.static_tags)
    tags.extend(request.extra_tags)
    args: dict[str, Any] = {"content": request.content, "tags": tags}
    project = sink.project or (
        request.metadata.get(sink.project_field) if sink.project_field else None
    )
    if project is not None:
        cleaned = PROJECT_PATTERN.sub("-", str(project))[:128]
        if cleaned:
            args["project"] = cleaned
    args["source_session_id"] = request.key
    return args


def judge_tool_result(result: Mapping[str, Any]) -> Outcome:
    """Judge a `tools/call` result by its content, not by the HTTP status."""
    text = "\n".join(
        str(part.get("text", ""))
        for part in result.get("content") or ()
        if isinstance(part, Mapping)
    ).strip()
    if result.get("isError"):
        if text.startswith("Unknown tool"):
            # A configuration error, not the item's fault: keep the message for a fixed worker.
            return Outcome.transient(_clip(text))
        return Outcome.rejected(_clip(text))
    if text.startswith(SOFT_ERROR_MARK):
        return Outcome.rejected(_clip(text))
    if STORED_MARK in text.split("\n", 1)[0]:
        return Outcome.stored()
    # Unknown wording: not provably stored, so keep the message where an operator sees it.
    return Outcome.rejected(_clip(f"unrecognised answer: {text}"))


def _sse_messages(body: str) -> list[Any]:
    messages = []
    data: list[str] = []
    for line in [*body.splitlines(), ""]:
        if line.startswith("data:"):
            data.append(line[5:].lstrip(" "))
        elif not line and data:
            messages.append(orjson.loads("\n".join(data)))
            data = []
    return messages


def _rpc_answer(response: httpx.Response, request_id: int) -> Mapping[str, Any] | None:
    if response.headers.get("content-type", "").startswith("text/event-stream"):
        candidates = _sse_messages(response.text)
    else:
        candidates = [orjson.loads(response.content)]
    for msg in candidates:
        if isinstance(msg, dict) and msg.get("id") == request_id:
            return msg
    return None


class SessionLost(Exception):
    """Session-Buddy no longer knows our session; open a new one."""


class McpSink:
    """Session-Buddy over MCP streamable HTTP: one long-lived session, concurrent calls."""

    def __init__(self, client: httpx.AsyncClient, url: str, sink: SinkSettings) -> None:
        self._client = client
        self._url = url
        self._sink = sink
        self._ids = itertools.count(1)
        self._session: str | None = None
        self._lock = asyncio.Lock()
        self.sessions_opened = 0

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def close(self) -> None:
        """End the MCP session politely; the server forgets it either way."""
        session, self._session = self._session, None
        if session is not None:
            with contextlib.suppress(httpx.HTTPError):
                await self._client.delete(self._url, headers={"mcp-session-id": session})

    async def store(self, request: StoreRequest) -> Outcome:
        """Call the store tool once; re-open the session once if the server lost it."""
        arguments = reflection_arguments(request, self._sink)
        for _ in range(2):
            try:
                return await self._call_tool(arguments)
            except SessionLost:
                continue
            except httpx.TimeoutException as exc:
                return Outcome.transient(f"timeout: {type(exc).__name__}", overload=True)
            except httpx.TransportError as exc:
                return Outcome.transient(f"{type(exc).__name__}: {exc}")
        return Outcome.transient("session lost twice in a row")

    async def list_tools(self) -> list[str]:
        """Names of the tools the server offers; raises `SinkConfigError` if it will not say."""
        session = await self._ensure_session()
        request_id = next(self._ids)
        payload = {"jsonrpc": "2.0", "id": request_id, "method": "tools/list"}
        response = await self._post(payload, session)
        if response.status_code != 200:
            raise SinkConfigError(f"tools/list: HTTP {response.status_code}")
        try:
            answer = _rpc_answer(response, request_id)
        except orjson.JSONDecodeError as exc:
            raise SinkConfigError(f"tools/list: unreadable answer: {exc}") from None
        tools = (answer or {}).get("result", {}).get("tools", [])
        return [str(t.get("name")) for t in tools]

    async def _call_tool(self, arguments: dict[str, Any]) -> Outcome:
        session = await self._ensure_session()
        request_id = next(self._ids)
        payload = {
            "jsonrpc": "2.0",
            "id": request_id,
            "method": "tools/call",
            "params": {"name": self._sink.tool, "arguments": arguments},
        }
        response = await self._post(payload, session)
        if response.status_code == 404:
            await self._forget(session)
            raise SessionLost
        if response.status_code != 200:
            return _http_failure(response)
        try:
            answer = _rpc_answer(response, request_id)
        except orjson.JSONDecodeError as exc:
            # A proxy page or a truncated stream: the server's problem, not the item's.
            return Outcome.transient(_clip(f"unreadable answer: {exc}"))
        if answer is None:
            return Outcome.transient("no JSON-RPC answer in the response")
        err, result = answer.get("error"), answer.get("result") or {}
        # An answer of the wrong shape is the server's problem, like an unreadable one.
        if err is not None and not isinstance(err, Mapping):
            return Outcome.transient(_clip(f"malformed JSON-RPC error: {err!r}"))
        if not isinstance(result, Mapping) or not isinstance(result.get("content") or [], list):
            return Outcome.transient(_clip(f"malformed tools/call result: {result!r}"))
        if err is not None:
            text = _clip(f"JSON-RPC {err.get('code')}: {err.get('message')}")
            # Invalid params is the item's fault; anything else is the server's.
            return Outcome.rejected(text) if err.get("code") == -32602 else Outcome.transient(text)
        return judge_tool_result(result)

    async def _post(self, payload: Mapping[str, Any], session: str | None) -> httpx.Response:
        headers = {
            "accept": "application/json, text/event-stream",
            "content-type": "application/json",
            "mcp-protocol-version": PROTOCOL_VERSION,
        }
        if session is not None:
            headers["mcp-session-id"] = session
        return await self._client.post(self._url, content=orjson.dumps(payload), headers=headers)

    async def _ensure_session(self) -> str:
        session = self._session
        if session is not None:
            return session
        async with self._lock:
            # Many calls may find the session gone at once; only the first re-opens it.
            if self._session is None:
                self._session = await self._open_session()
            return self._session

    async def _forget(self, session: str) -> None:
        async with self._lock:
            if self._session == session:
                self._session = None

    async def _open_session(self) -> str:
        init = {
            "jsonrpc": "2.0",
            "id": next(self._ids),
            "method": "initialize",
            "params": {
                "protocolVersion": PROTOCOL_VERSION,
                "capabilities": {},
                "clientInfo": {"name": "memory-worker", "version": "0.1.0"},
            },
        }
        response = await self._post(init, None)
        session = response.headers.get("mcp-session-id")
        if response.status_code != 200 or not session:
            raise httpx.TransportError(
                f"initialize failed: HTTP {response.status_code} {_clip(response.text)}"
            )
        notified = await self._post(
            {"jsonrpc": "2.0", "method": "notifications/initialized"}, session
        )
        if notified.status_code >= 300:
            raise httpx.TransportError(f"notifications/initialized: HTTP {notified.status_code}")
        self.sessions_opened += 1
        return str(session)


class HttpSink:
    """A plain JSON-over-HTTP store (ACT-008's `POST /memory` shape)."""

    def __init__(self, client: httpx.AsyncClient, url: str) -> None:
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
        try:
            response = await self._client.post(
                self._url,
                content=content,
                headers={"content-type": "application/json", "idempotency-key": request.key},
            )
        except httpx.TimeoutException as exc:
            return Outcome.transient(f"timeout: {type(exc).__name__}", overload=True)
        except httpx.TransportError as exc:
            return Outcome.transient(f"{type(exc).__name__}: {exc}")
        if response.is_success or response.status_code == 409:
            return Outcome.stored()
        return _http_failure(response)
