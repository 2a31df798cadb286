"""The benchmark's moving parts: processes, queues, publishing, and what is measured about them.

Every process the runner starts is its own OS process so its CPU is measured on its own: the
stand-in Session-Buddy (`python -m loadtest.standin`), each worker (`python -m worker run`, or a
peer from `loadtest/peers/`, configured by the same `MAHAVISHNU_*` env vars), and the real
Session-Buddy when it is installed. Only loopback addresses are used, every broker name starts
with `bench-`, and every queue and exchange a run declares is deleted when the run ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import secrets
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Self

import aio_pika
import httpx
import numpy as np
import orjson
import psutil
from aio_pika.abc import AbstractRobustConnection
from aio_pika.exceptions import CONNECTION_EXCEPTIONS

from worker.models import decode_item
from worker.settings import Settings
from worker.settings_env import ENV_PREFIX, settings_env
from worker.testing import free_port, valid_item
from worker.topology import Topology

ROOT = Path(__file__).resolve().parent.parent
AMQP_URL = os.environ.get("BENCH_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")
COMMITTED_SETTINGS = ROOT / "settings" / "mahavishnu.yaml"
PUBLISH_WINDOW = 1000
FILLER = "Pool worker finished its task; summary of what it learned goes here. " * 2
# The workers memory-worker is measured against (`RunSpec.peer`); they have no metrics or logs.
PEERS = {
    "naive": [sys.executable, "-m", "loadtest.peers.naive"],
    "faststream": [sys.executable, "-m", "loadtest.peers.faststream_peer"],
}
_LIMIT_GAUGE = re.compile(r"^memory_worker_concurrency_limit(?:\{[^}]*\})? (\S+)$", re.MULTILINE)


class BenchError(Exception):
    """A run could not be carried out (a process died, a broker call failed, a timeout)."""


def unique_name() -> str:
    """A fresh broker name prefix, e.g. `bench-3f9a0c1d2e`."""
    return f"bench-{secrets.token_hex(5)}"


def percentiles(values: Iterable[float], points: Iterable[float] = (50, 95, 99)) -> list[float]:
    """Percentiles of `values` (NaN for none)."""
    data = np.fromiter(values, dtype=float)
    if data.size == 0:
        return [float("nan") for _ in points]
    return [float(v) for v in np.percentile(data, list(points))]


# --- processes ------------------------------------------------------------------------------


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


async def _stop_process(proc: asyncio.subprocess.Process, timeout_s: float) -> int:
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
            await _stop_process(self._proc, 2)
            raise BenchError("the stand-in did not start")
        self._arrivals_url = self._arrivals_url.strip()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._http.aclose()
        if self._proc is not None:
            await _stop_process(self._proc, 5)

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


@dataclass
class WorkerProcess:
    """One `python -m worker run` process (or a peer: `peer` names it) on the run's queues."""

    index: int
    env: dict[str, str]
    log_path: Path
    peer: str = ""
    ops_port: int = field(default_factory=free_port)
    proc: asyncio.subprocess.Process | None = None
    ready_at: float = 0.0

    async def start(self) -> None:
        """Start the process; its logs go to `log_path`."""
        env = {**self.env, "MAHAVISHNU_WORKER__OPS_PORT": str(self.ops_port)}
        env["MAHAVISHNU_WORKER__ID"] = (
            f"{env.get('MAHAVISHNU_RABBITMQ__QUEUE', 'bench')}-w{self.index}"
        )
        # BENCH_WORKER_CMD runs another build of the worker (an A/B check) in its place.
        command = (
            PEERS[self.peer]
            if self.peer
            else shlex.split(os.environ.get("BENCH_WORKER_CMD", ""))
            or [sys.executable, "-m", "worker", "run"]
        )
        with self.log_path.open("wb") as log:
            self.proc = await asyncio.create_subprocess_exec(
                *command, cwd=ROOT, env=env, stdout=log, stderr=log
            )

    @property
    def pid(self) -> int:
        """The worker's pid."""
        assert self.proc is not None
        return self.proc.pid

    async def wait_ready(self, client: httpx.AsyncClient, timeout_s: float = 60.0) -> None:
        """Poll `/readyz` until the worker consumes; raise if it exits or never gets ready."""
        assert self.proc is not None
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.returncode is not None:
                raise BenchError(f"worker {self.index} exited: {self.log_tail()}")
            with contextlib.suppress(httpx.HTTPError):
                response = await client.get(f"http://127.0.0.1:{self.ops_port}/readyz")
                if response.status_code == 200:
                    self.ready_at = time.monotonic()
                    return
            await asyncio.sleep(0.02)
        raise BenchError(f"worker {self.index} not ready within {timeout_s:g} s: {self.log_tail()}")

    async def insertion_metrics(self, client: httpx.AsyncClient) -> dict[str, Any]:
        """The worker's ACT-008 metrics."""
        response = await client.get(f"http://127.0.0.1:{self.ops_port}/insertion-metrics")
        metrics: dict[str, Any] = response.json()
        return metrics

    async def concurrency_limit(self, client: httpx.AsyncClient) -> int | None:
        """The `memory_worker_concurrency_limit` gauge on `/metrics` (None if unreadable)."""
        if self.peer:
            return None
        with contextlib.suppress(httpx.HTTPError):
            response = await client.get(f"http://127.0.0.1:{self.ops_port}/metrics")
            found = _LIMIT_GAUGE.search(response.text)
            if found is not None:
                return round(float(found.group(1)))
        return None

    async def stop(self) -> int:
        """SIGTERM and wait for the graceful stop; returns the exit code."""
        assert self.proc is not None
        return await _stop_process(self.proc, 30)

    def log_tail(self, lines: int = 5) -> str:
        """The last log lines, for error messages."""
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return " | ".join(text.strip().splitlines()[-lines:])

    def stored_at(self) -> dict[str, float]:
        """Wall-clock time each message id was settled as stored, from the JSON log lines."""
        return {key: ts for key, (ts, _) in self.store_latencies().items()}

    def store_latencies(self) -> dict[str, tuple[float, float]]:
        """Per message id settled as stored: (wall-clock time, the line's `latency_s`).

        `latency_s` runs from the moment the delivery got a slot to its settlement: decode,
        the sink call, the ack. Waits for a slot are not in it; waits inside the sink are.
        """
        stored: dict[str, tuple[float, float]] = {}
        with self.log_path.open("rb") as log:
            for line in log:
                if b'"message_settled"' not in line or b'"stored"' not in line:
                    continue
                with contextlib.suppress(ValueError, KeyError):
                    event = orjson.loads(line)
                    if event["outcome"] != "stored":
                        continue
                    ts = datetime.fromisoformat(event["timestamp"]).timestamp()
                    stored.setdefault(str(event["message_id"]), (ts, float(event["latency_s"])))
        return stored


# --- broker ---------------------------------------------------------------------------------


def bench_settings(name: str, sink_url: str, concurrency: int) -> Settings:
    """Settings on the run's unique names: one short retry tier, fast startup, JSON logs."""
    return Settings(
        pools={"max_concurrent_memory_insertions": concurrency, "session_buddy_url": sink_url},
        rabbitmq={
            "url": AMQP_URL,
            "exchange": name,
            "queue": f"{name}.items",
            "dead_letter_queue": f"{name}.items.dlq",
            "startup_wait_s": 10,
        },
        retry={"tiers_s": [1.0]},
        worker={"ops_port": -1, "grace_s": 10, "log_format": "json"},
    )


def worker_env(
    settings: Settings, log_level: str = "info", adaptive: bool | None = None
) -> dict[str, str]:
    """The environment that makes `python -m worker run` use `settings`' names and sink.

    Adaptive concurrency keeps the committed default (on, within [1, c]) unless `adaptive`
    sets it: a run measures memory-worker as a user gets it unless its label says otherwise.
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith(ENV_PREFIX)}
    # Only the committed settings: a developer's settings/local.yaml must not leak in.
    env["MEMORY_WORKER_CONFIG"] = str(COMMITTED_SETTINGS)
    env.update(settings_env(settings))
    env["MAHAVISHNU_WORKER__LOG_FORMAT"] = "json"
    env["MAHAVISHNU_WORKER__LOG_LEVEL"] = log_level
    # The committed YAML decides the queue type and, unless the run sets it, adaptation; the
    # ops port is each worker process's own (WorkerProcess.start).
    for name in ("RABBITMQ__QUEUE_TYPE", "POOLS__ADAPTIVE_CONCURRENCY", "WORKER__OPS_PORT"):
        del env[ENV_PREFIX + name]
    if adaptive is not None:
        env["MAHAVISHNU_POOLS__ADAPTIVE_CONCURRENCY"] = str(adaptive).lower()
    return env


@dataclass(frozen=True, slots=True)
class QueueDepths:
    """Messages ready in the run's queues (unacked ones are not counted by the broker)."""

    work: int
    retrying: int
    dead_lettered: int


class BenchQueues:
    """A run's exchanges and queues: declared at entry, deleted at exit."""

    def __init__(self, connection: AbstractRobustConnection, settings: Settings) -> None:
        self.connection = connection
        self.settings = settings
        self.topology = Topology.from_settings(settings)

    async def __aenter__(self) -> Self:
        await self.topology.declare(self.connection)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.delete()

    async def _count(self, name: str) -> int:
        async with self.connection.channel() as channel:
            queue = await channel.declare_queue(name, passive=True)
            count = queue.declaration_result.message_count
            return int(count or 0)

    async def depths(self) -> QueueDepths:
        """Ready messages in the work queue, the retry tiers and the DLQ."""
        t = self.topology
        retrying = 0
        for tier in t.tiers:
            retrying += await self._count(tier.queue)
        return QueueDepths(
            await self._count(t.queue), retrying, await self._count(t.dead_letter_queue)
        )

    async def dead_lettered(self) -> int:
        """Messages in the DLQ."""
        return await self._count(self.topology.dead_letter_queue)

    async def delete(self) -> None:
        """Delete every queue and exchange of the run (idempotent, best effort per name)."""
        async with self.connection.channel() as channel:
            for name in self.topology.queues:
                with contextlib.suppress(*CONNECTION_EXCEPTIONS):
                    await channel.queue_delete(name)
        async with self.connection.channel() as channel:
            for name in self.topology.exchanges:
                with contextlib.suppress(*CONNECTION_EXCEPTIONS):
                    await channel.exchange_delete(name)


def item_body(run: str, seq: int) -> bytes:
    """A valid memory item of ~150 characters of content, unique per (run, seq)."""
    item = valid_item(
        f"[{run} #{seq}] {FILLER}",
        pool_id="bench-pool",
        pool_type="mahavishnu",
        worker_id=f"pool-worker-{seq % 8}",
        timestamp=1_764_000_000.0 + seq,
        duration_seconds=1.5,
        exit_code=0,
    )
    return orjson.dumps(item)


def check_item_body() -> None:
    """Fail fast if the worker would refuse the benchmark's items."""
    decode_item(item_body("bench-check", 0), "application/json")


def message_id(run: str, seq: int) -> str:
    """The message id (the worker's idempotency key) of item `seq` of a run."""
    return f"{run}-{seq:07d}"


class Publisher:
    """Confirmed publishing with many confirms outstanding; records when each item went out."""

    def __init__(self, connection: AbstractRobustConnection, topology: Topology) -> None:
        self._connection = connection
        self._topology = topology
        self._window = asyncio.Semaphore(PUBLISH_WINDOW)
        self._tasks: set[asyncio.Task[None]] = set()
        self.sent_at: dict[str, float] = {}
        self.sent_wall: dict[str, float] = {}
        self.confirmed = 0
        self.failed = 0

    @contextlib.asynccontextmanager
    async def open(self) -> AsyncIterator[Self]:
        """A publishing channel with confirms; waits for every outstanding confirm at exit."""
        async with self._connection.channel(publisher_confirms=True) as channel:
            self._exchange = await channel.get_exchange(self._topology.exchange, ensure=False)
            try:
                yield self
            finally:
                await self.flush()

    async def publish(self, key: str, body: bytes) -> None:
        """Send one item without waiting for its confirm (at most PUBLISH_WINDOW outstanding)."""
        await self._window.acquire()
        self.sent_at[key] = time.monotonic()
        self.sent_wall[key] = time.time()
        task = asyncio.create_task(self._send(key, body))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _send(self, key: str, body: bytes) -> None:
        message = aio_pika.Message(
            body,
            content_type="application/json",
            message_id=key,
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        )
        try:
            await self._exchange.publish(message, self._topology.queue, mandatory=True, timeout=60)
            self.confirmed += 1
        except Exception:  # counted: an unconfirmed item is not "published" in the ledger
            self.failed += 1
            self.sent_at.pop(key, None)
        finally:
            self._window.release()

    async def flush(self) -> None:
        """Wait for every outstanding confirm."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)


async def connect() -> AbstractRobustConnection:
    """The runner's own broker connection."""
    try:
        return await aio_pika.connect_robust(AMQP_URL, timeout=10)
    except (*CONNECTION_EXCEPTIONS, TimeoutError) as exc:
        raise BenchError(f"no RabbitMQ at {AMQP_URL}: {exc!r}") from None


def machine() -> dict[str, Any]:
    """What the figures were measured on."""
    cpu = "unknown"
    with contextlib.suppress(OSError):
        match = re.search(r"model name\s*:\s*(.+)", Path("/proc/cpuinfo").read_text())
        cpu = match.group(1).strip() if match else cpu
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
        "python": sys.version.split()[0],
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
        "kernel": os.uname().release,
        "git": _git_describe(),
    }


def _git_describe() -> str:
    """The commit measured, `-dirty` when the work tree has changes."""
    try:
        out = subprocess.run(
            ["git", "describe", "--always", "--dirty"],
            cwd=ROOT, capture_output=True, text=True, timeout=5, check=False,
        )  # fmt: skip
    except OSError:
        return "unknown"
    return out.stdout.strip() or "unknown"


def summarize_latencies(
    sent: Mapping[str, float], done: Mapping[str, float]
) -> dict[str, float | int]:
    """p50/p95/p99/max of done − sent in milliseconds, over keys present in both."""
    values = [(done[k] - t) * 1000 for k, t in sent.items() if k in done]
    p50, p95, p99, top = percentiles(values, (50, 95, 99, 100))
    return {"n": len(values), "p50_ms": p50, "p95_ms": p95, "p99_ms": p99, "max_ms": top}


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
        await _stop_process(self._proc, 10)
        raise BenchError(f"Session-Buddy not ready within 180 s; see {self.log_path}")

    async def __aexit__(self, *exc: object) -> None:
        if self._proc is not None:
            await _stop_process(self._proc, 20)


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
