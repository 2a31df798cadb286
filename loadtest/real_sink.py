"""The real Session-Buddy as a sink, when `loadtest/session_buddy/install.sh` has installed it."""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Self

import httpx
import orjson

from loadtest.common import ROOT, BenchError
from loadtest.procs import stop_process
from worker.testing import free_port


def session_buddy_home() -> Path:
    """Where `loadtest/session_buddy/install.sh` put the real server, by its own default."""
    default = Path.home() / ".cache" / "memory-worker" / "session-buddy"
    return Path(os.environ.get("SESSION_BUDDY_HOME", default))


class SessionBuddyProcess:
    """The real Session-Buddy via `loadtest/session_buddy/run.sh`, on a fresh state folder."""

    def __init__(self, home: Path, state: Path, log_path: Path) -> None:
        self.home = home
        self.state = state
        self.log_path = log_path
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/mcp"
        self._proc: asyncio.subprocess.Process | None = None

    @staticmethod
    def installed(home: Path) -> bool:
        """Whether install.sh completed in `home`."""
        return (home / "venv" / "bin" / "session-buddy").exists()

    @property
    def pid(self) -> int:
        """The server's pid (run.sh execs it)."""
        assert self._proc is not None
        return self._proc.pid

    async def __aenter__(self) -> Self:
        script = ROOT / "loadtest" / "session_buddy" / "run.sh"
        env = {
            **os.environ,
            "SESSION_BUDDY_HOME": str(self.home),
            "SESSION_BUDDY_STATE": str(self.state),
        }
        with self.log_path.open("wb") as log:
            self._proc = await asyncio.create_subprocess_exec(
                "bash", str(script), str(self.port), env=env, stdout=log, stderr=log
            )
        deadline = time.monotonic() + 180
        async with httpx.AsyncClient(timeout=2) as client:
            while time.monotonic() < deadline:
                if self._proc.returncode is not None:
                    raise BenchError(f"Session-Buddy exited; see {self.log_path}")
                with contextlib.suppress(httpx.HTTPError):
                    response = await client.get(f"http://127.0.0.1:{self.port}/healthz")
                    if response.status_code == 200:
                        return self
                await asyncio.sleep(0.25)
        await stop_process(self._proc, 10)
        raise BenchError(f"Session-Buddy not ready within 180 s; see {self.log_path}")

    async def __aexit__(self, *exc: object) -> None:
        if self._proc is not None:
            await stop_process(self._proc, 20)


async def mcp_tool_text(url: str, tool: str, arguments: Mapping[str, Any]) -> str:
    """Call one MCP tool on a fresh session and return its text (raw httpx, SSE answers)."""
    headers = {"accept": "application/json, text/event-stream", "content-type": "application/json"}
    init = {
        "jsonrpc": "2.0",
        "id": 1,
        "method": "initialize",
        "params": {
            "protocolVersion": "2025-06-18",
            "capabilities": {},
            "clientInfo": {"name": "bench", "version": "0"},
        },
    }
    async with httpx.AsyncClient(timeout=60) as http:
        response = await http.post(url, content=orjson.dumps(init), headers=headers)
        headers["mcp-session-id"] = response.headers["mcp-session-id"]
        note = {"jsonrpc": "2.0", "method": "notifications/initialized"}
        await http.post(url, content=orjson.dumps(note), headers=headers)
        call = {
            "jsonrpc": "2.0",
            "id": 2,
            "method": "tools/call",
            "params": {"name": tool, "arguments": dict(arguments)},
        }
        response = await http.post(url, content=orjson.dumps(call), headers=headers)
        await http.delete(url, headers=headers)
    for line in response.text.splitlines():
        if line.startswith("data:"):
            result = orjson.loads(line[5:])["result"]
            return "\n".join(str(part.get("text", "")) for part in result["content"])
    raise BenchError(f"{tool}: no answer ({response.status_code})")
