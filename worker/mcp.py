"""The MCP client: Session-Buddy's `store_reflection` over MCP streamable HTTP.

`McpSink` keeps one long-lived session (initialize, then `tools/call` requests, concurrent),
re-opens it when the server has lost it, and reads answers sent as JSON or as server-sent
events. An HTTP 200 from Session-Buddy does not mean stored: the answer's text is what counts.
`make_sink` picks this client or the plain HTTP one, as `sink.kind` says.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import re
from collections.abc import Mapping
from types import TracebackType
from typing import Any, Self

import orjson

from worker import __version__
from worker.outcome import Outcome
from worker.sections import SinkSettings
from worker.settings import Settings
from worker.sink import HttpSink, SinkConfigError, StoreRequest, clip, http_failure
from worker.transport import HttpClient, Reply, TransportError, TransportTimeout

PROTOCOL_VERSION = "2025-06-18"
# Built once: every MCP request carries these; a session's requests add its id.
MCP_HEADERS = {
    "accept": "application/json, text/event-stream",
    "content-type": "application/json",
    "mcp-protocol-version": PROTOCOL_VERSION,
}
STORED_MARK = "stored successfully"
SOFT_ERROR_MARK = "❌"
PROJECT_PATTERN = re.compile(r"[^a-zA-Z0-9._-]")


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
            return Outcome.transient(clip(text))
        return Outcome.rejected(clip(text))
    if text.startswith(SOFT_ERROR_MARK):
        return Outcome.rejected(clip(text))
    if STORED_MARK in text.split("\n", 1)[0]:
        return Outcome.stored()
    # Unknown wording: not provably stored, so keep the message where an operator sees it.
    return Outcome.rejected(clip(f"unrecognised answer: {text}"))


def _sse_messages(body: bytes) -> list[Any]:
    text = body.decode("utf-8", "replace")
    if "\r" in text:
        text = text.replace("\r\n", "\n").replace("\r", "\n")
    messages = []
    data: list[str] = []
    # SSE ends lines only at CR, LF or CRLF; str.splitlines would also cut a JSON string at a
    # raw U+2028 or U+0085, which JSON (and Session-Buddy's echo of the content) may hold.
    for line in [*text.split("\n"), ""]:
        if line.startswith("data:"):
            data.append(line[5:].lstrip(" "))
        elif not line and data:
            messages.append(orjson.loads("\n".join(data)))
            data = []
    return messages


def _rpc_answer(reply: Reply, request_id: int) -> Mapping[str, Any] | None:
    if reply.headers.get("content-type", "").startswith("text/event-stream"):
        candidates = _sse_messages(reply.body)
    else:
        candidates = [orjson.loads(reply.body)]
    for msg in candidates:
        if isinstance(msg, dict) and msg.get("id") == request_id:
            return msg
    return None


class SessionLost(Exception):
    """Session-Buddy no longer knows our session; open a new one."""


class McpSink:
    """Session-Buddy over MCP streamable HTTP: one long-lived session, concurrent calls."""

    def __init__(self, client: HttpClient, url: str, sink: SinkSettings) -> None:
        self._client = client
        self._url = url
        self._sink = sink
        self._ids = itertools.count(1)
        # The live session's request headers (its id included), built once per session.
        self._session: dict[str, str] | None = None
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
            end = {"mcp-session-id": session["mcp-session-id"]}
            with contextlib.suppress(TransportError):
                await self._client.request("DELETE", self._url, end)

    async def store(self, request: StoreRequest) -> Outcome:
        """Call the store tool once; re-open the session once if the server lost it."""
        arguments = reflection_arguments(request, self._sink)
        for _ in range(2):
            try:
                return await self._call_tool(arguments)
            except SessionLost:
                continue
            except TransportTimeout as exc:
                return Outcome.transient(f"timeout: {exc}", overload=True)
            except TransportError as exc:
                return Outcome.transient(str(exc))
        return Outcome.transient("session lost twice in a row")

    async def list_tools(self) -> list[str]:
        """Names of the tools the server offers; raises `SinkConfigError` if it will not say."""
        session = await self._ensure_session()
        request_id = next(self._ids)
        payload = {"jsonrpc": "2.0", "id": request_id, "method": "tools/list"}
        reply = await self._post(payload, session)
        if reply.status != 200:
            raise SinkConfigError(f"tools/list: HTTP {reply.status}")
        try:
            answer = _rpc_answer(reply, request_id)
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
        reply = await self._post(payload, session)
        if reply.status == 404:
            await self._forget(session)
            raise SessionLost
        if reply.status != 200:
            return http_failure(reply)
        try:
            answer = _rpc_answer(reply, request_id)
        except orjson.JSONDecodeError as exc:
            # A proxy page or a truncated stream: the server's problem, not the item's.
            return Outcome.transient(clip(f"unreadable answer: {exc}"))
        if answer is None:
            return Outcome.transient("no JSON-RPC answer in the response")
        err, result = answer.get("error"), answer.get("result") or {}
        # An answer of the wrong shape is the server's problem, like an unreadable one.
        if err is not None and not isinstance(err, Mapping):
            return Outcome.transient(clip(f"malformed JSON-RPC error: {err!r}"))
        if not isinstance(result, Mapping) or not isinstance(result.get("content") or [], list):
            return Outcome.transient(clip(f"malformed tools/call result: {result!r}"))
        if err is not None:
            text = clip(f"JSON-RPC {err.get('code')}: {err.get('message')}")
            # Invalid params is the item's fault; anything else is the server's.
            return Outcome.rejected(text) if err.get("code") == -32602 else Outcome.transient(text)
        return judge_tool_result(result)

    async def _post(self, payload: Mapping[str, Any], headers: Mapping[str, str]) -> Reply:
        return await self._client.request("POST", self._url, headers, orjson.dumps(payload))

    async def _ensure_session(self) -> dict[str, str]:
        session = self._session
        if session is not None:
            return session
        async with self._lock:
            # Many calls may find the session gone at once; only the first re-opens it.
            if self._session is None:
                self._session = await self._open_session()
            return self._session

    async def _forget(self, session: dict[str, str]) -> None:
        async with self._lock:
            if self._session is session:
                self._session = None

    async def _open_session(self) -> dict[str, str]:
        init = {
            "jsonrpc": "2.0",
            "id": next(self._ids),
            "method": "initialize",
            "params": {
                "protocolVersion": PROTOCOL_VERSION,
                "capabilities": {},
                "clientInfo": {"name": "memory-worker", "version": __version__},
            },
        }
        reply = await self._post(init, MCP_HEADERS)
        session_id = reply.headers.get("mcp-session-id")
        if reply.status != 200 or not session_id:
            raise TransportError(f"initialize failed: HTTP {reply.status} {clip(reply.text)}")
        session = {**MCP_HEADERS, "mcp-session-id": session_id}
        notified = await self._post(
            {"jsonrpc": "2.0", "method": "notifications/initialized"}, session
        )
        if notified.status >= 300:
            raise TransportError(f"notifications/initialized: HTTP {notified.status}")
        self.sessions_opened += 1
        return session


def make_sink(settings: Settings, client: HttpClient) -> McpSink | HttpSink:
    """The sink the settings name: this MCP client, or the plain HTTP one."""
    url = str(settings.pools.session_buddy_url)
    if settings.sink.kind == "http":
        return HttpSink(client, url)
    return McpSink(client, url, settings.sink)
