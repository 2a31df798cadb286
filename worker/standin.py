"""A local stand-in for Session-Buddy: MCP over streamable HTTP (plus plain JSON), with fault knobs.

It follows /work/shared/design/session-buddy.md at the protocol level (status codes, headers,
SSE framing, result texts) and stays cheap on CPU so load tests measure the worker, not this:
orjson both ways, one dict lookup per session check, no per-request logging or pydantic.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import hashlib
import math
import random
import re
import secrets
import signal
import sys
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import orjson
from aiohttp import web
from pydantic import BaseModel, ConfigDict, ValidationError

MAX_CONTENT_CHARS = 10_000
PROTOCOL_VERSIONS = ("2024-11-05", "2025-03-26", "2025-06-18", "2025-11-25")
_PROJECT = re.compile(r"[a-zA-Z0-9._-]{1,128}")
_STR_ARGS = frozenset({"content", "project", "source_session_id", "source_artifact_uri"})
_FAULTS = ("reset", "error_503", "error_429", "commit_then_fail", "reject")
_EMPTY = "❌ Validation error: Store reflection - content cannot be empty"
_BAD_PROJECT = "❌ Validation error: Store reflection - project must match ^[a-zA-Z0-9._-]{1,128}$"
_GUARD = "Memory guard blocked write: rule=test"
_GUARD_RESULT = {"result": {"content": [{"type": "text", "text": _GUARD}], "isError": True}}
_GUARD_HTTP = {"status": 422, "body": {"stored": False, "error": _GUARD}}
_JSON = "application/json"
_SSE = "text/event-stream"
_STR = {"type": "string"}
_TOOLS = {
    "tools": [
        {
            "name": "store_reflection",
            "description": "Store an important insight or reflection for future reference.",
            "inputSchema": {
                "type": "object",
                "properties": {
                    "content": _STR,
                    "tags": {"type": "array", "items": _STR},
                    "project": _STR,
                    "source_session_id": _STR,
                    "source_artifact_uri": _STR,
                },
                "required": ["content"],
                "additionalProperties": False,
            },
        }
    ]
}
_Payload = dict[str, Any]
_Outcome = _Payload | web.StreamResponse


class _StoreArgs(BaseModel):
    """The tool's argument model, used only to word a refusal exactly as FastMCP's pydantic does."""

    model_config = ConfigDict(extra="forbid", title="store_reflectionArguments")
    content: str
    tags: list[str] | None = None
    project: str | None = None
    source_session_id: str | None = None
    source_artifact_uri: str | None = None


@dataclass
class StandInConfig:
    """Knobs of the stand-in: all off by default, read per request so they can change live."""

    latency_s: float = 0.0
    latency_sigma: float = 0.0
    error_503: float = 0.0
    error_429: float = 0.0
    retry_after_s: float = 1.0
    reset: float = 0.0
    commit_then_fail: float = 0.0
    reject: float = 0.0
    status_for_all: int | None = None
    outage_until: float = 0.0
    max_concurrency: int | None = None
    conflict_on_duplicate: bool = False
    seed: int | None = None
    max_items: int = 100_000


@dataclass
class StandInStats:
    """Counters since start or the last reset()."""

    calls: int = 0
    stored: int = 0
    distinct_keys: int = 0
    duplicates: int = 0
    rejected: int = 0
    faults: dict[str, int] = field(default_factory=dict)
    sessions_opened: int = 0
    in_flight: int = 0
    peak_in_flight: int = 0
    truncated: int = 0
    held: int = 0
    # Store calls in flight whose client is still connected, i.e. still waiting for the answer.
    waiting: int = 0


def _rpc_error(status: int, message: str, code: int = -32600) -> web.Response:
    """A JSON-RPC error without a request id, as the SDK's transport sends it."""
    body = {"jsonrpc": "2.0", "id": "server-error", "error": {"code": code, "message": message}}
    return web.Response(status=status, body=orjson.dumps(body), content_type=_JSON)


def _json(status: int, payload: object, headers: dict[str, str] | None = None) -> web.Response:
    """A plain JSON answer."""
    return web.Response(
        status=status, body=orjson.dumps(payload), content_type=_JSON, headers=headers
    )


def _tool_result(text: str, is_error: bool) -> _Payload:
    """A tools/call result with one text block."""
    return {"result": {"content": [{"type": "text", "text": text}], "isError": is_error}}


def _accepts(accept: str) -> tuple[bool, bool]:
    """Whether an Accept header admits JSON and SSE, with the SDK's wildcard rules."""
    types = {part.split(";", 1)[0].strip().lower() for part in accept.split(",")}
    anything = "*/*" in types
    return (
        anything or bool(types & {_JSON, "application/*"}),
        anything or bool(types & {_SSE, "text/*"}),
    )


def _well_typed(args: object) -> bool:
    """Fast check that arguments pass the tool's model (pydantic runs only to word a refusal)."""
    if not isinstance(args, dict) or type(args.get("content")) is not str:
        return False
    for key, value in args.items():
        if key == "tags":
            if value is not None and not (
                type(value) is list and all(type(t) is str for t in value)
            ):
                return False
        elif key not in _STR_ARGS or (type(value) is not str and value is not None):
            return False
    return True


def _validation_text(args: object) -> str:
    """The pydantic text FastMCP returns for arguments its model refuses."""
    try:
        _StoreArgs.model_validate(args)
    except ValidationError as exc:
        return str(exc)
    return "1 validation error for store_reflectionArguments"


def _success_text(content: str, tags: list[str]) -> str:
    """The real server's success text: first line exact, then a short summary."""
    more = "..." if len(content) > 100 else ""
    lines = ["💾 Reflection stored successfully!", f"📝 Content: {content[:100]}{more}"]
    if tags:
        lines.append(f"🏷️ Tags: {', '.join(tags)}")
    lines.append(f"📅 Stored: {datetime.now().strftime('%Y-%m-%d %H:%M:%S')}")
    return "\n".join(lines)


class StandIn:
    """An in-process Session-Buddy stand-in on aiohttp; `async with` starts and stops it."""

    def __init__(
        self, config: StandInConfig | None = None, host: str = "127.0.0.1", port: int = 0
    ) -> None:
        self.config = config if config is not None else StandInConfig()
        self.host = host
        self.port = port
        self._stats = StandInStats()
        self._keys: set[str] = set()
        self._items: deque[_Payload] = deque(maxlen=self.config.max_items)
        self._open: dict[int, web.Request] = {}  # by id(): a Request is not hashable
        # Each session maps to the event its open GET stream waits on, if it has one.
        self._sessions: dict[str, asyncio.Event | None] = {}
        self._gate: asyncio.Event | None = None
        self._sem: asyncio.Semaphore | None = None
        self._sem_size: int | None = None
        self._runner: web.AppRunner | None = None
        self._reseed()

    @property
    def base_url(self) -> str:
        """The server root, e.g. http://127.0.0.1:PORT."""
        return f"http://{self.host}:{self.port}"

    @property
    def url(self) -> str:
        """The MCP endpoint."""
        return f"{self.base_url}/mcp"

    @property
    def stats(self) -> StandInStats:
        """A snapshot of the counters."""
        waiting = sum(
            1 for r in self._open.values() if r.transport and not r.transport.is_closing()
        )
        return dataclasses.replace(self._stats, faults=dict(self._stats.faults), waiting=waiting)

    @property
    def items(self) -> list[_Payload]:
        """The stored rows, oldest first (at most `config.max_items`)."""
        return list(self._items)

    @property
    def held(self) -> int:
        """Store calls currently waiting behind hold()."""
        return self._stats.held

    async def __aenter__(self) -> StandIn:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def start(self) -> None:
        """Bind and serve; with port 0 the chosen port lands in `self.port`."""
        app = web.Application(client_max_size=16 * 1024 * 1024)
        app.router.add_post("/mcp", self._mcp_post)
        app.router.add_get("/mcp", self._mcp_get)
        app.router.add_delete("/mcp", self._mcp_delete)
        app.router.add_get("/healthz", self._healthz)
        app.router.add_post("/memory", self._memory)
        app.router.add_get("/_standin/stats", self._control)
        app.router.add_post("/_standin/{action}", self._control)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=2)
        await self._runner.setup()
        await web.TCPSite(self._runner, self.host, self.port).start()
        self.port = self._runner.addresses[0][1]

    async def stop(self) -> None:
        """Let held calls go, end GET streams, and close the server."""
        self.release()
        self.forget_sessions()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    def forget_sessions(self) -> None:
        """Drop every MCP session as a server restart does: their ids now answer 404."""
        for stream_closed in self._sessions.values():
            if stream_closed is not None:
                stream_closed.set()
        self._sessions.clear()

    def reset(self) -> None:
        """Zero the counters, forget stored rows and keys, reseed; config and sessions stay."""
        self._stats = StandInStats(in_flight=self._stats.in_flight, held=self._stats.held)
        self._keys.clear()
        self._items = deque(maxlen=self.config.max_items)
        self._reseed()

    def hold(self) -> None:
        """Make new store calls wait until release()."""
        if self._gate is None:
            self._gate = asyncio.Event()

    def release(self) -> None:
        """Let held store calls through."""
        if self._gate is not None:
            self._gate.set()
            self._gate = None

    def outage(self, seconds: float) -> None:
        """Answer 503 to every request on /mcp and /memory for the next `seconds`."""
        self.config.outage_until = time.monotonic() + seconds

    def _reseed(self) -> None:
        seed = self.config.seed
        self._rng = random.Random(seed)
        # Latency has its own generator so a fault sequence does not shift with latency knobs.
        self._latency_rng = random.Random(None if seed is None else seed + 1)

    def _count_fault(self, name: str) -> None:
        self._stats.faults[name] = self._stats.faults.get(name, 0) + 1

    def _blocked(self) -> web.Response | None:
        """The whole-server answers that come before any protocol handling."""
        cfg = self.config
        if cfg.status_for_all is not None:
            self._count_fault("status")
            status = cfg.status_for_all
            auth = {"WWW-Authenticate": 'Bearer error="invalid_token"'} if status == 401 else None
            return _json(status, {"error": "stand-in status_for_all"}, auth)
        if cfg.outage_until and time.monotonic() < cfg.outage_until:
            self._count_fault("outage")
            return web.Response(status=503, text="Service Unavailable")
        return None

    def _session(self, request: web.Request) -> tuple[str | None, web.Response | None]:
        """The request's session id, or the answer that ends it first (outage, 404 session)."""
        if (blocked := self._blocked()) is not None:
            return None, blocked
        sid = request.headers.get("mcp-session-id")
        if sid is not None and sid not in self._sessions:
            return sid, _rpc_error(404, "Session not found")
        return sid, None

    @staticmethod
    def _sse(sid: str, message: _Payload) -> web.Response:
        body = b"event: message\r\ndata: " + orjson.dumps(message) + b"\r\n\r\n"
        headers = {
            "Content-Type": _SSE,
            "Cache-Control": "no-cache, no-transform",
            "mcp-session-id": sid,
        }
        return web.Response(body=body, headers=headers)

    async def _mcp_post(self, request: web.Request) -> web.StreamResponse:
        sid, refusal = self._session(request)
        if refusal is not None:
            return refusal
        if not all(_accepts(request.headers.get("Accept", ""))):
            why = "Not Acceptable: Client must accept both application/json and text/event-stream"
            return _rpc_error(406, why)
        if request.content_type != _JSON:
            return _rpc_error(415, "Unsupported Media Type: Content-Type must be application/json")
        try:
            msg = orjson.loads(await request.read())
        except orjson.JSONDecodeError as exc:
            return _rpc_error(400, f"Parse error: {exc}", -32700)
        if not isinstance(msg, dict) or msg.get("jsonrpc") != "2.0":
            return _rpc_error(400, "Validation error: not a JSON-RPC 2.0 message", -32602)
        method = msg.get("method")
        if method == "initialize" and "id" in msg:
            return self._initialize(msg, sid)
        if sid is None:
            return _rpc_error(400, "Bad Request: Missing session ID")
        version = request.headers.get("mcp-protocol-version")
        if version is not None and version not in PROTOCOL_VERSIONS:
            why = f"Bad Request: Unsupported protocol version: {version}. Supported versions: "
            return _rpc_error(400, why + ", ".join(PROTOCOL_VERSIONS))
        if "id" not in msg or not isinstance(method, str):
            return web.Response(status=202)  # a notification or a client's response
        payload: _Outcome
        if method == "tools/call":
            payload = await self._tools_call(request, msg.get("params"))
            if isinstance(payload, web.StreamResponse):
                return payload
        elif method == "tools/list":
            payload = {"result": _TOOLS}
        elif method == "ping":
            payload = {"result": {}}
        else:
            payload = {"error": {"code": -32601, "message": "Method not found"}}
        return self._sse(sid, {"jsonrpc": "2.0", "id": msg["id"], **payload})

    def _initialize(self, msg: _Payload, sid: str | None) -> web.Response:
        params = msg.get("params")
        asked = params.get("protocolVersion") if isinstance(params, dict) else None
        if sid is None:
            sid = secrets.token_hex(16)
            self._sessions[sid] = None
            self._stats.sessions_opened += 1
        result = {
            "protocolVersion": asked if asked in PROTOCOL_VERSIONS else PROTOCOL_VERSIONS[-1],
            "capabilities": {"experimental": {}, "tools": {"listChanged": True}},
            "serverInfo": {"name": "session-buddy", "version": "0.36.0"},
        }
        return self._sse(sid, {"jsonrpc": "2.0", "id": msg["id"], "result": result})

    async def _mcp_get(self, request: web.Request) -> web.StreamResponse:
        """The standalone SSE stream: open and silent until its session ends."""
        sid, refusal = self._session(request)
        if refusal is not None:
            return refusal
        if not _accepts(request.headers.get("Accept", ""))[1]:
            return _rpc_error(406, "Not Acceptable: Client must accept text/event-stream")
        if sid is None:
            return _rpc_error(400, "Bad Request: Missing session ID")
        if self._sessions[sid] is not None:
            return _rpc_error(409, "Conflict: Only one SSE stream is allowed per session")
        closed = self._sessions[sid] = asyncio.Event()
        response = web.StreamResponse(headers={"Content-Type": _SSE, "mcp-session-id": sid})
        await response.prepare(request)
        try:
            await closed.wait()
        finally:
            if self._sessions.get(sid) is closed:
                self._sessions[sid] = None
        return response

    async def _mcp_delete(self, request: web.Request) -> web.Response:
        sid, refusal = self._session(request)
        if refusal is not None:
            return refusal
        if sid is None:
            return _rpc_error(400, "Bad Request: Missing session ID")
        if (stream_closed := self._sessions.pop(sid)) is not None:
            stream_closed.set()
        return web.Response(status=200, content_type=_JSON)

    async def _healthz(self, _: web.Request) -> web.Response:
        return _json(200, {"status": "ok"})

    async def _tools_call(self, request: web.Request, params: object) -> _Outcome:
        if not isinstance(params, dict) or not isinstance(params.get("name"), str):
            return {"error": {"code": -32602, "message": "Invalid request parameters"}}
        return await self._admitted(request, lambda: self._store_call(params), _GUARD_RESULT)

    async def _admitted(
        self, request: web.Request, serve: Callable[[], _Payload], guard: _Payload
    ) -> _Outcome:
        """Run one store call through hold, the concurrency limit, latency and the fault draw."""
        stats = self._stats
        stats.calls += 1
        stats.in_flight += 1
        stats.peak_in_flight = max(stats.peak_in_flight, stats.in_flight)
        self._open[id(request)] = request
        try:
            if (gate := self._gate) is not None:
                self._stats.held += 1
                try:
                    await gate.wait()
                finally:
                    self._stats.held -= 1
            async with self._semaphore() or contextlib.nullcontext():
                await self._delay()
                fault = self._draw_fault()
                if fault == "reset" and request.transport is not None:
                    request.transport.abort()  # the answer below is never written
                if fault in ("reset", "error_503"):
                    return web.Response(status=503, text="Service Unavailable")
                if fault == "error_429":
                    retry_after = str(math.ceil(self.config.retry_after_s))
                    headers = {"Retry-After": retry_after}
                    return web.Response(status=429, text="Too Many Requests", headers=headers)
                if fault == "reject":
                    self._stats.rejected += 1
                    return guard
                answer = serve()
                if fault == "commit_then_fail":
                    return web.Response(status=500, text="Internal Server Error")
                return answer
        finally:
            self._stats.in_flight -= 1
            del self._open[id(request)]

    def _semaphore(self) -> asyncio.Semaphore | None:
        limit = self.config.max_concurrency
        if limit != self._sem_size:
            self._sem_size = limit
            self._sem = None if limit is None else asyncio.Semaphore(limit)
        return self._sem

    async def _delay(self) -> None:
        cfg = self.config
        if cfg.latency_s > 0:
            delay = cfg.latency_s
            if cfg.latency_sigma > 0:
                delay = self._latency_rng.lognormvariate(math.log(delay), cfg.latency_sigma)
            await asyncio.sleep(delay)

    def _draw_fault(self) -> str | None:
        """One uniform draw against the stacked fault probabilities (exact while they sum ≤ 1)."""
        cfg = self.config
        if not (cfg.reset or cfg.error_503 or cfg.error_429 or cfg.commit_then_fail or cfg.reject):
            return None
        draw = self._rng.random()
        for name in _FAULTS:
            p: float = getattr(cfg, name)
            if draw < p:
                self._count_fault(name)
                return name
            draw -= p
        return None

    def _store_call(self, params: _Payload) -> _Payload:
        name = params["name"]
        if name != "store_reflection":
            self._stats.rejected += 1
            return _tool_result(f"Unknown tool: {name!r}", True)
        args = params.get("arguments")
        args = {} if args is None else args
        if not _well_typed(args):
            self._stats.rejected += 1
            return _tool_result(_validation_text(args), True)
        content: str = args["content"]
        project = args.get("project")
        if not content.strip() or (project is not None and not _PROJECT.fullmatch(project)):
            self._stats.rejected += 1
            return _tool_result(_BAD_PROJECT if content.strip() else _EMPTY, False)
        tags: list[str] = list(args.get("tags") or ())
        session = args.get("source_session_id")
        uri = args.get("source_artifact_uri")
        row = {"project": project, "source_session_id": session, "source_artifact_uri": uri}
        return _tool_result(_success_text(content, self._store(content, tags, session, row)), False)

    def _store(self, content: str, tags: list[str], key: str | None, row: _Payload) -> list[str]:
        """Record one row, counted by key or content hash; oversized content is quarantined."""
        stats = self._stats
        if key is None:
            key = "sha1:" + hashlib.sha1(content.encode("utf-8", "surrogatepass")).hexdigest()
        if key in self._keys:
            stats.duplicates += 1
        else:
            self._keys.add(key)
            stats.distinct_keys += 1
        if len(content) > MAX_CONTENT_CHARS:
            content = content[:MAX_CONTENT_CHARS]
            tags = [*tags, "quarantine"]
            stats.truncated += 1
        stats.stored += 1
        row["content"] = content
        row["tags"] = tags
        self._items.append(row)
        return tags

    async def _memory(self, request: web.Request) -> web.StreamResponse:
        """Plain JSON mode for non-MCP sinks: 201 stored, 409 duplicate key, 422 no content."""
        if (blocked := self._blocked()) is not None:
            return blocked
        try:
            body = orjson.loads(await request.read())
        except orjson.JSONDecodeError:
            return _json(400, {"error": "invalid JSON"})
        content = body.get("content") if isinstance(body, dict) else None
        if not isinstance(content, str) or not content.strip():
            return _json(422, {"error": "content is required"})
        key = request.headers.get("Idempotency-Key")
        row = {"project": None, "source_session_id": key, "metadata": body.get("metadata")}
        outcome = await self._admitted(
            request, lambda: self._memory_store(content, key, row), _GUARD_HTTP
        )
        if isinstance(outcome, web.StreamResponse):
            return outcome
        return _json(outcome["status"], outcome["body"])

    def _memory_store(self, content: str, key: str | None, row: _Payload) -> _Payload:
        if key is not None and self.config.conflict_on_duplicate and key in self._keys:
            self._stats.duplicates += 1
            return {"status": 409, "body": {"stored": False, "error": "duplicate idempotency key"}}
        self._store(content, [], key, row)
        return {"status": 201, "body": {"stored": True}}

    async def _control(self, request: web.Request) -> web.Response:
        """Out-of-process control: stats, a JSON config patch, and the no-argument actions."""
        action = request.match_info.get("action", "stats")
        if action == "config":
            try:
                patch = orjson.loads(await request.read())
            except orjson.JSONDecodeError:
                patch = None
            known = {f.name for f in dataclasses.fields(StandInConfig)} | {"outage_s"}
            if not isinstance(patch, dict) or not set(patch) <= known:
                return _json(400, {"error": f"expected an object with keys among {sorted(known)}"})
            for name, value in patch.items():
                if name == "outage_s":  # a relative deadline, as the client cannot read our clock
                    self.outage(float(value))
                else:
                    setattr(self.config, name, value)
            if "seed" in patch:
                self._reseed()
            return _json(200, dataclasses.asdict(self.config))
        actions: dict[str, Callable[[], None]] = {
            "forget-sessions": self.forget_sessions,
            "reset": self.reset,
            "hold": self.hold,
            "release": self.release,
            "stats": lambda: None,
        }
        if (run := actions.get(action)) is None:
            return _json(404, {"error": f"unknown action; one of {sorted(actions)}"})
        run()
        return _json(200, dataclasses.asdict(self.stats))


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m worker.standin", description=__doc__)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8678)
    p.add_argument("--latency-ms", type=float, default=0.0, help="median service time")
    p.add_argument("--latency-sigma", type=float, default=0.0, help="log-normal spread")
    for fault in ("error-503", "error-429", "reset", "commit-then-fail", "reject"):
        p.add_argument(f"--{fault}", type=float, default=0.0, metavar="P", help="per-call chance")
    p.add_argument("--retry-after-s", type=float, default=1.0)
    p.add_argument("--status-for-all", type=int, default=None, metavar="STATUS")
    p.add_argument("--max-concurrency", type=int, default=None)
    p.add_argument("--conflict-on-duplicate", action="store_true")
    p.add_argument("--seed", type=int, default=None)
    return p.parse_args(argv)


async def _serve(config: StandInConfig, host: str, port: int) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with StandIn(config, host=host, port=port) as standin:
        print(standin.url, flush=True)
        await stop.wait()


def main(argv: list[str] | None = None) -> int:
    """Run the stand-in until SIGTERM or SIGINT, printing its MCP URL once it listens."""
    args = _parse_args(argv)
    names = {f.name for f in dataclasses.fields(StandInConfig)}
    config = StandInConfig(
        latency_s=args.latency_ms / 1000, **{k: v for k, v in vars(args).items() if k in names}
    )
    loop_factory: Callable[[], asyncio.AbstractEventLoop] | None = None
    with contextlib.suppress(ImportError):
        import uvloop

        loop_factory = uvloop.new_event_loop
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        runner.run(_serve(config, args.host, args.port))
    return 0


if __name__ == "__main__":
    sys.exit(main())
