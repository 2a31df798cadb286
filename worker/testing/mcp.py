"""The stand-in's MCP endpoint: sessions, the streamable-HTTP checks, and JSON-RPC dispatch."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Awaitable, Callable

import orjson
from aiohttp import web

import worker.testing.protocol as p

Outcome = p.Payload | web.StreamResponse


class McpEndpoint:
    """POST, GET and DELETE on /mcp; tools/call is handed to `tools_call`."""

    def __init__(
        self,
        blocked: Callable[[], web.Response | None],
        tools_call: Callable[[web.Request, object], Awaitable[Outcome]],
        session_opened: Callable[[], None],
    ) -> None:
        self._blocked = blocked
        self._tools_call = tools_call
        self._session_opened = session_opened
        # Each session maps to the event its open GET stream waits on, if it has one.
        self._sessions: dict[str, asyncio.Event | None] = {}

    def forget_sessions(self) -> None:
        """Drop every session as a server restart does: their ids now answer 404."""
        for stream_closed in self._sessions.values():
            if stream_closed is not None:
                stream_closed.set()
        self._sessions.clear()

    def _session(self, request: web.Request) -> tuple[str | None, web.Response | None]:
        """The request's session id, or the answer that ends it first (outage, 404 session)."""
        if (blocked := self._blocked()) is not None:
            return None, blocked
        sid = request.headers.get("mcp-session-id")
        if sid is not None and sid not in self._sessions:
            return sid, p.rpc_error(404, "Session not found")
        return sid, None

    async def post(self, request: web.Request) -> web.StreamResponse:
        """One JSON-RPC message in, one SSE answer out (202 for a notification)."""
        sid, refusal = self._session(request)
        if refusal is not None:
            return refusal
        msg = await self._message(request)
        if not isinstance(msg, dict):
            return msg
        method = msg.get("method")
        if method == "initialize" and "id" in msg:
            return self._initialize(msg, sid)
        if sid is None:
            return p.rpc_error(400, "Bad Request: Missing session ID")
        version = request.headers.get("mcp-protocol-version")
        if version is not None and version not in p.PROTOCOL_VERSIONS:
            why = f"Bad Request: Unsupported protocol version: {version}. Supported versions: "
            return p.rpc_error(400, why + ", ".join(p.PROTOCOL_VERSIONS))
        if "id" not in msg or not isinstance(method, str):
            return web.Response(status=202)  # a notification or a client's response
        payload = await self._call(request, method, msg.get("params"))
        if isinstance(payload, web.StreamResponse):
            return payload
        return p.sse_answer(sid, {"jsonrpc": "2.0", "id": msg["id"], **payload})

    async def _message(self, request: web.Request) -> p.Payload | web.Response:
        """The request's JSON-RPC message, or the answer refusing it (headers, JSON, shape)."""
        if not all(p.accepts(request.headers.get("Accept", ""))):
            why = "Not Acceptable: Client must accept both application/json and text/event-stream"
            return p.rpc_error(406, why)
        if request.content_type != p.JSON:
            return p.rpc_error(415, "Unsupported Media Type: Content-Type must be application/json")
        try:
            msg = orjson.loads(await request.read())
        except orjson.JSONDecodeError as exc:
            return p.rpc_error(400, f"Parse error: {exc}", -32700)
        if not isinstance(msg, dict) or msg.get("jsonrpc") != "2.0":
            return p.rpc_error(400, "Validation error: not a JSON-RPC 2.0 message", -32602)
        return msg

    async def _call(self, request: web.Request, method: str, params: object) -> Outcome:
        """The answer to one request: a result, an error, or a whole response (a fault)."""
        if method == "tools/call":
            return await self._tools_call(request, params)
        if method == "tools/list":
            return {"result": p.TOOLS}
        if method == "ping":
            return {"result": {}}
        return {"error": {"code": -32601, "message": "Method not found"}}

    def _initialize(self, msg: p.Payload, sid: str | None) -> web.Response:
        params = msg.get("params")
        asked = params.get("protocolVersion") if isinstance(params, dict) else None
        if sid is None:
            sid = secrets.token_hex(16)
            self._sessions[sid] = None
            self._session_opened()
        result = {
            "protocolVersion": asked if asked in p.PROTOCOL_VERSIONS else p.PROTOCOL_VERSIONS[-1],
            "capabilities": {"experimental": {}, "tools": {"listChanged": True}},
            "serverInfo": {"name": "session-buddy", "version": "0.36.0"},
        }
        return p.sse_answer(sid, {"jsonrpc": "2.0", "id": msg["id"], "result": result})

    async def get(self, request: web.Request) -> web.StreamResponse:
        """The standalone SSE stream: open and silent until its session ends."""
        sid, refusal = self._session(request)
        if refusal is not None:
            return refusal
        if not p.accepts(request.headers.get("Accept", ""))[1]:
            return p.rpc_error(406, "Not Acceptable: Client must accept text/event-stream")
        if sid is None:
            return p.rpc_error(400, "Bad Request: Missing session ID")
        if self._sessions[sid] is not None:
            return p.rpc_error(409, "Conflict: Only one SSE stream is allowed per session")
        closed = self._sessions[sid] = asyncio.Event()
        response = web.StreamResponse(headers={"Content-Type": p.SSE, "mcp-session-id": sid})
        await response.prepare(request)
        try:
            await closed.wait()
        finally:
            if self._sessions.get(sid) is closed:
                self._sessions[sid] = None
        return response

    async def delete(self, request: web.Request) -> web.Response:
        """End a session (and its GET stream)."""
        sid, refusal = self._session(request)
        if refusal is not None:
            return refusal
        if sid is None:
            return p.rpc_error(400, "Bad Request: Missing session ID")
        if (stream_closed := self._sessions.pop(sid)) is not None:
            stream_closed.set()
        return web.Response(status=200, content_type=p.JSON)
