"""What both peers share: their settings, the `store_reflection` call over aiohttp, `/readyz`.

The settings are read from the same `MAHAVISHNU_*` variables the runner gives memory-worker,
and the store call carries the same arguments memory-worker sends with its committed settings
(`reflection_arguments` in worker/mcp.py), so the stand-in sees the same requests from all.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from itertools import count
from typing import Any

import aiohttp
from aiohttp import web

# The committed `sink.tag_fields` and `sink.project_field` (settings/mahavishnu.yaml).
TAG_FIELDS = ("type", "pool_id", "pool_type", "worker_id", "status", "exit_code")
PROJECT_FIELD = "pool_id"
NOT_IN_PROJECT = re.compile(r"[^a-zA-Z0-9._-]")
STORED = "stored successfully"


@dataclass(frozen=True, slots=True)
class PeerConfig:
    """Broker, queue, sink, concurrency and ops port, from the worker's environment."""

    amqp_url: str
    queue: str
    mcp_url: str
    concurrency: int
    ops_port: int

    @classmethod
    def from_env(cls) -> PeerConfig:
        """Read the `MAHAVISHNU_*` variables the benchmark sets for every worker."""
        env = os.environ
        return cls(
            amqp_url=env["MAHAVISHNU_RABBITMQ__URL"],
            queue=env["MAHAVISHNU_RABBITMQ__QUEUE"],
            mcp_url=env["MAHAVISHNU_POOLS__SESSION_BUDDY_URL"],
            concurrency=int(env.get("MAHAVISHNU_POOLS__MAX_CONCURRENT_MEMORY_INSERTIONS", "10")),
            ops_port=int(env.get("MAHAVISHNU_WORKER__OPS_PORT", "9464")),
        )


def reflection_arguments(content: str, metadata: dict[str, Any], key: str | None) -> dict[str, Any]:
    """`store_reflection` arguments for one item, as memory-worker builds them."""
    tags = [f"{name}:{metadata[name]}" for name in TAG_FIELDS if metadata.get(name) is not None]
    args: dict[str, Any] = {"content": content, "tags": tags}
    project = metadata.get(PROJECT_FIELD)
    if project is not None and (cleaned := NOT_IN_PROJECT.sub("-", str(project))[:128]):
        args["project"] = cleaned
    args["source_session_id"] = key
    return args


class McpClient:
    """One MCP session on an aiohttp `ClientSession`, carrying concurrent store calls."""

    def __init__(self, http: aiohttp.ClientSession, url: str) -> None:
        self.http = http
        self.url = url
        self.headers = {
            "accept": "application/json, text/event-stream",
            "content-type": "application/json",
        }
        self._ids = count(1)

    async def open(self) -> None:
        """`initialize`, keep the session id, then `notifications/initialized`."""
        init = {
            "jsonrpc": "2.0",
            "id": next(self._ids),
            "method": "initialize",
            "params": {
                "protocolVersion": "2025-06-18",
                "capabilities": {},
                "clientInfo": {"name": "bench-peer", "version": "0"},
            },
        }
        async with self.http.post(self.url, data=json.dumps(init), headers=self.headers) as r:
            r.raise_for_status()
            self.headers["mcp-session-id"] = r.headers["mcp-session-id"]
        note = {"jsonrpc": "2.0", "method": "notifications/initialized"}
        async with self.http.post(self.url, data=json.dumps(note), headers=self.headers) as r:
            r.raise_for_status()

    async def store(self, arguments: dict[str, Any]) -> bool:
        """Call `store_reflection`; True when the answer says the item was stored."""
        call = {
            "jsonrpc": "2.0",
            "id": next(self._ids),
            "method": "tools/call",
            "params": {"name": "store_reflection", "arguments": arguments},
        }
        async with self.http.post(self.url, data=json.dumps(call), headers=self.headers) as r:
            text = await r.text()
        for line in text.splitlines():
            if line.startswith("data:"):
                result = json.loads(line[5:]).get("result") or {}
                answer = " ".join(part.get("text", "") for part in result.get("content", []))
                return not result.get("isError") and STORED in answer
        return False


async def serve_readyz(port: int, ready: Callable[[], bool]) -> web.AppRunner:
    """Serve `GET /readyz` on loopback: 200 once `ready()` is true, else 503."""

    async def readyz(_: web.Request) -> web.Response:
        return web.Response(status=200 if ready() else 503, text="ok" if ready() else "starting")

    app = web.Application()
    app.router.add_get("/readyz", readyz)
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    return runner
