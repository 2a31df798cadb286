"""Processes the runner starts or watches: CPU and memory, a graceful stop, the stand-in."""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import re
import shutil
import signal
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self

import httpx
import orjson
import psutil

from loadtest.common import ROOT, BenchError
from worker.testing import free_port


@dataclass(frozen=True, slots=True)
class ProcSample:
    """CPU seconds (user + system), current and peak resident memory of one process."""

    cpu_s: float
    rss_mb: float
    peak_rss_mb: float


def sample(pid: int) -> ProcSample:
    """Read a process's CPU time and its VmRSS / VmHWM from /proc."""
    times = psutil.Process(pid).cpu_times()
    status = Path(f"/proc/{pid}/status").read_text()
    fields = dict(re.findall(r"^(VmRSS|VmHWM):\s+(\d+) kB", status, re.MULTILINE))
    return ProcSample(
        cpu_s=times.user + times.system,
        rss_mb=int(fields.get("VmRSS", 0)) / 1024,
        peak_rss_mb=int(fields.get("VmHWM", 0)) / 1024,
    )


def broker_pid() -> int | None:
    """The local RabbitMQ node's pid (beam.smp), to report its CPU; None if not visible."""
    for proc in psutil.process_iter(["name"]):
        if proc.info["name"] == "beam.smp":
            return int(proc.pid)
    return None


def busy_cpu_s() -> float:
    """CPU seconds the whole machine spent busy (all cores, everything but idle and iowait)."""
    t = psutil.cpu_times()
    return float(sum(t) - t.idle - getattr(t, "iowait", 0.0))


def cpu_s_of(pid: int | None) -> float:
    """CPU seconds of a process and its live children, 0 when it is unknown or gone."""
    if pid is None:
        return 0.0
    total = 0.0
    try:
        proc = psutil.Process(pid)
        # Its live child processes too: a server may do its work in helpers it spawned.
        for p in [proc, *proc.children(recursive=True)]:
            with contextlib.suppress(psutil.Error):
                times = p.cpu_times()
                total += times.user + times.system
    except psutil.Error:
        return 0.0
    return total


async def stop_process(proc: asyncio.subprocess.Process, timeout_s: float) -> int:
    """SIGTERM, wait up to `timeout_s`, then SIGKILL; returns the exit code."""
    if proc.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(proc.wait(), timeout_s)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
    return proc.returncode if proc.returncode is not None else -1


class StandInProcess:
    """`python -m loadtest.standin` in its own process, driven over its control routes."""

    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/mcp"
        self._proc: asyncio.subprocess.Process | None = None
        self._arrivals_url = ""
        self._http = httpx.AsyncClient(base_url=f"http://127.0.0.1:{self.port}", timeout=30)

    @property
    def pid(self) -> int:
        """The stand-in's pid."""
        assert self._proc is not None
        return self._proc.pid

    async def __aenter__(self) -> Self:
        self._proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "loadtest.standin",
            "--port",
            str(self.port),
            cwd=ROOT,
            stdout=asyncio.subprocess.PIPE,
        )
        assert self._proc.stdout is not None
        try:
            line = await asyncio.wait_for(self._proc.stdout.readline(), 20)
        except TimeoutError:
            line = b""
        with contextlib.suppress(TimeoutError):
            self._arrivals_url = (await asyncio.wait_for(self._proc.stdout.readline(), 5)).decode()
        if not line.startswith(b"http") or not self._arrivals_url.startswith("http"):
            await stop_process(self._proc, 2)
            raise BenchError("the stand-in did not start")
        self._arrivals_url = self._arrivals_url.strip()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._http.aclose()
        if self._proc is not None:
            await stop_process(self._proc, 5)

    async def _post(self, path: str, payload: object = None) -> Any:
        response = await self._http.post(path, content=orjson.dumps(payload or {}))
        response.raise_for_status()
        return orjson.loads(response.content)

    async def configure(
        self,
        latency_ms: float = 0.0,
        sigma: float = 0.0,
        seed: int = 1,
        max_concurrency: int | None = None,
    ) -> None:
        """Set the service time (median, log-normal spread) and capacity, reseed; faults stay off.

        `max_concurrency` is how many calls the stand-in serves at once (None: no cap); the
        rest wait in line inside it, as calls to a server that handles one at a time do.
        """
        patch = {
            "latency_s": latency_ms / 1000,
            "latency_sigma": sigma,
            "seed": seed,
            "max_concurrency": max_concurrency,
        }
        await self._post("/_standin/config", patch)

    async def set_capacity(self, max_concurrency: int | None) -> None:
        """Change only how many calls are served at once (None: no cap), live."""
        await self._post("/_standin/config", {"max_concurrency": max_concurrency})

    async def reset(self) -> None:
        """Zero the counters and forget keys and arrivals."""
        await self._post("/_standin/reset")

    async def stats(self) -> dict[str, Any]:
        """The stand-in's counters (`distinct_keys`, `duplicates`, `peak_in_flight`, ...)."""
        response = await self._http.get("/_standin/stats")
        response.raise_for_status()
        stats: dict[str, Any] = orjson.loads(response.content)
        return stats

    async def arrivals(self) -> dict[str, float]:
        """When each key was first stored (monotonic seconds)."""
        response = await self._http.get(self._arrivals_url)
        response.raise_for_status()
        data = orjson.loads(response.content)
        first: dict[str, float] = {}
        for key, t in zip(data["keys"], data["t"], strict=True):
            first.setdefault(key, t)
        return first

    async def store_latencies(self) -> dict[str, tuple[float, float]]:
        """Per key first stored: (when stored, seconds from the call reaching the stand-in)."""
        response = await self._http.get(self._arrivals_url)
        response.raise_for_status()
        data = orjson.loads(response.content)
        first: dict[str, tuple[float, float]] = {}
        for key, t, received in zip(data["keys"], data["t"], data["received"], strict=True):
            if received is not None:
                first.setdefault(key, (t, t - received))
        return first

    def cpu_s(self) -> float:
        """CPU seconds used so far."""
        return cpu_s_of(self.pid)


def py_spy() -> str | None:
    """py-spy from PATH or from this interpreter's bin folder (a venv run without activating it)."""
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    return shutil.which("py-spy", path=path)


async def start_profiler(pid: int, seconds: float, out: Path) -> asyncio.subprocess.Process:
    """py-spy sampling a worker for `seconds` (raw collapsed stacks)."""
    return await asyncio.create_subprocess_exec(
        py_spy() or "py-spy",
        "record",
        "--pid",
        str(pid),
        "--duration",
        str(math.ceil(seconds)),
        "--rate",
        "250",
        "--format",
        "raw",
        "--output",
        str(out),
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
