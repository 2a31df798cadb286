"""A local stand-in for Session-Buddy: MCP over streamable HTTP (plus plain JSON), with fault knobs.

It answers as Session-Buddy's `store_reflection` does at the protocol level (see `protocol`) and
stays cheap on CPU so load tests measure the worker, not this: orjson both ways, one dict lookup
per session check, no per-request logging or pydantic.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import math
import time
from collections import deque
from collections.abc import Awaitable, Callable

import orjson
from aiohttp import web

import worker.testing.protocol as p
from worker.testing.config import OnStore, StandInConfig, StandInStats, StoreCall
from worker.testing.control import Control
from worker.testing.faults import Faults
from worker.testing.mcp import McpEndpoint, Outcome


class StandIn:
    """An in-process Session-Buddy stand-in on aiohttp; `async with` starts and stops it.

    `on_store`, if set, is awaited for each valid store before it is recorded (see `OnStore`).
    """

    def __init__(
        self,
        config: StandInConfig | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
        on_store: OnStore | None = None,
    ) -> None:
        self.config = config if config is not None else StandInConfig()
        self.host = host
        self.port = port
        self.on_store = on_store
        self._stats = StandInStats()
        self._keys: set[str] = set()
        self._items: deque[p.Payload] = deque(maxlen=self.config.max_items)
        self._open: dict[int, web.Request] = {}  # by id(): a Request is not hashable
        self._gate: asyncio.Event | None = None
        self._faults = Faults(self.config.seed)
        self._mcp = McpEndpoint(self._blocked, self._tools_call, self._session_opened)
        actions = {"forget-sessions": self.forget_sessions, "reset": self.reset}
        actions |= {"hold": self.hold, "release": self.release}
        self._control = Control(
            lambda: self.config, lambda: self.stats, self.outage, self._reseed, actions
        )
        self._runner: web.AppRunner | None = None

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
    def items(self) -> list[p.Payload]:
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
        app.router.add_post("/mcp", self._mcp.post)
        app.router.add_get("/mcp", self._mcp.get)
        app.router.add_delete("/mcp", self._mcp.delete)
        app.router.add_get("/healthz", self._healthz)
        app.router.add_post("/memory", self._memory)
        app.router.add_get("/_standin/stats", self._control.handle)
        app.router.add_post("/_standin/{action}", self._control.handle)
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
        self._mcp.forget_sessions()

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
        self._faults.reseed(self.config.seed)

    def _count_fault(self, name: str) -> None:
        self._stats.faults[name] = self._stats.faults.get(name, 0) + 1

    def _session_opened(self) -> None:
        self._stats.sessions_opened += 1

    def _blocked(self) -> web.Response | None:
        """The whole-server answers that come before any protocol handling."""
        cfg = self.config
        if cfg.status_for_all is not None:
            self._count_fault("status")
            status = cfg.status_for_all
            auth = {"WWW-Authenticate": 'Bearer error="invalid_token"'} if status == 401 else None
            return p.json_answer(status, {"error": "stand-in status_for_all"}, auth)
        if cfg.outage_until and time.monotonic() < cfg.outage_until:
            self._count_fault("outage")
            return web.Response(status=503, text="Service Unavailable")
        return None

    async def _healthz(self, _: web.Request) -> web.Response:
        return p.json_answer(200, {"status": "ok"})

    async def _tools_call(self, request: web.Request, params: object) -> Outcome:
        if not isinstance(params, dict) or not isinstance(params.get("name"), str):
            return {"error": {"code": -32602, "message": "Invalid request parameters"}}
        return await self._admitted(request, lambda t: self._store_call(params, t), p.GUARD_RESULT)

    async def _admitted(
        self,
        request: web.Request,
        serve: Callable[[float], Awaitable[Outcome]],
        guard: p.Payload,
    ) -> Outcome:
        """Run one store call through hold, the concurrency limit, latency and the fault draw."""
        received = time.monotonic()
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
            async with (
                self._faults.semaphore(self.config.max_concurrency) or contextlib.nullcontext()
            ):
                await self._faults.delay(self.config)
                fault = self._faults.draw(self.config)
                if fault is not None:
                    self._count_fault(fault)
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
                answer = await serve(received)
                if fault == "commit_then_fail":
                    return web.Response(status=500, text="Internal Server Error")
                return answer
        finally:
            self._stats.in_flight -= 1
            del self._open[id(request)]

    async def _store_call(self, params: p.Payload, received: float) -> Outcome:
        if (refused := p.refusal(params)) is not None:
            self._stats.rejected += 1
            return refused
        args = params["arguments"]
        content: str = args["content"]
        tags: list[str] = list(args.get("tags") or ())
        key, uri = args.get("source_session_id"), args.get("source_artifact_uri")
        row = {"project": args.get("project"), "source_session_id": key, "source_artifact_uri": uri}
        if (instead := await self._on_store(StoreCall(key, content, received))) is not None:
            return instead
        return p.tool_result(p.success_text(content, self._store(content, tags, key, row)), False)

    async def _on_store(self, call: StoreCall) -> web.StreamResponse | None:
        return None if self.on_store is None else await self.on_store(call)

    def _store(self, content: str, tags: list[str], key: str | None, row: p.Payload) -> list[str]:
        """Record one row, counted by key or content hash; oversized content is quarantined."""
        stats = self._stats
        if key is None:
            key = "sha1:" + hashlib.sha1(content.encode("utf-8", "surrogatepass")).hexdigest()
        if key in self._keys:
            stats.duplicates += 1
        else:
            self._keys.add(key)
            stats.distinct_keys += 1
        if len(content) > p.MAX_CONTENT_CHARS:
            content = content[: p.MAX_CONTENT_CHARS]
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
            return p.json_answer(400, {"error": "invalid JSON"})
        content = body.get("content") if isinstance(body, dict) else None
        if not isinstance(content, str) or not content.strip():
            return p.json_answer(422, {"error": "content is required"})
        key = request.headers.get("Idempotency-Key")
        row = {"project": None, "source_session_id": key, "metadata": body.get("metadata")}
        outcome = await self._admitted(
            request, lambda t: self._memory_store(content, key, row, t), p.GUARD_HTTP
        )
        if isinstance(outcome, web.StreamResponse):
            return outcome
        return p.json_answer(outcome["status"], outcome["body"])

    async def _memory_store(
        self, content: str, key: str | None, row: p.Payload, received: float
    ) -> Outcome:
        if key is not None and self.config.conflict_on_duplicate and key in self._keys:
            self._stats.duplicates += 1
            return {"status": 409, "body": {"stored": False, "error": "duplicate idempotency key"}}
        if (instead := await self._on_store(StoreCall(key, content, received))) is not None:
            return instead
        self._store(content, [], key, row)
        return {"status": 201, "body": {"stored": True}}
