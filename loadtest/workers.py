"""The workers under test: a process each (memory-worker or a peer), sampled as a set."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shlex
import sys
import time
from collections.abc import Coroutine
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import orjson

from loadtest.common import COMMITTED_SETTINGS, ROOT, BenchError
from loadtest.context import Bench, RunSpec
from loadtest.procs import ProcSample, sample, stop_process
from worker.settings import Settings
from worker.settings_env import ENV_PREFIX, settings_env
from worker.testing import free_port

# The workers memory-worker is measured against (`RunSpec.peer`); they have no metrics or logs.
PEERS = {
    "naive": [sys.executable, "-m", "loadtest.peers.naive"],
    "faststream": [sys.executable, "-m", "loadtest.peers.faststream_peer"],
}
_LIMIT_GAUGE = re.compile(r"^memory_worker_concurrency_limit(?:\{[^}]*\})? (\S+)$", re.MULTILINE)


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
        return await stop_process(self.proc, 30)

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


class WorkerSet:
    """W worker processes on one queue, started together and sampled together."""

    def __init__(self, bench: Bench, spec: RunSpec, env: dict[str, str], name: str) -> None:
        self.bench = bench
        self.workers = [
            WorkerProcess(i, env, bench.logs / f"{name}-w{i}.log", spec.peer)
            for i in range(spec.workers)
        ]
        self.baseline: list[ProcSample] = []
        self.rss_timeline: list[tuple[float, float]] = []
        self.limit_timeline: list[tuple[float, int]] = []
        self.t0 = 0.0  # monotonic: when the first worker was ready
        self.t0_wall = 0.0  # the same moment on the wall clock (the workers' log timestamps)
        self._samplers: list[asyncio.Task[None]] = []
        self._every_s = spec.rss_every_s
        self._watch_s = 0.0 if spec.peer else spec.watch_limit_s  # a peer has no gauge

    async def start(self) -> None:
        """Start every worker and wait until all of them consume."""
        for w in self.workers:
            await w.start()
        await asyncio.gather(*(w.wait_ready(self.bench.http) for w in self.workers))
        self.t0 = min(w.ready_at for w in self.workers)
        self.t0_wall = time.time() - (time.monotonic() - self.t0)
        self.baseline = [sample(w.pid) for w in self.workers]
        if self._every_s > 0:
            self._samplers.append(asyncio.create_task(self._sample_rss()))
        if self._watch_s > 0:
            self._samplers.append(asyncio.create_task(self._watch_limit()))

    def alongside(self, work: Coroutine[Any, Any, None]) -> None:
        """Run `work` while the workers run; it is cancelled when they stop."""
        self._samplers.append(asyncio.create_task(work))

    async def _watch_limit(self) -> None:
        """Poll the workers' concurrency limits (summed): (s since t0, limit) per sample."""
        while True:
            limits = await asyncio.gather(
                *(w.concurrency_limit(self.bench.http) for w in self.workers)
            )
            if all(x is not None for x in limits):
                now = round(time.monotonic() - self.t0, 3)
                self.limit_timeline.append((now, sum(x for x in limits if x is not None)))
            await asyncio.sleep(self._watch_s)

    async def _sample_rss(self) -> None:
        t0 = time.monotonic()
        while True:
            with contextlib.suppress(OSError):
                rss = sum(sample(w.pid).rss_mb for w in self.workers)
                self.rss_timeline.append((round(time.monotonic() - t0, 2), round(rss, 1)))
            await asyncio.sleep(self._every_s)

    def samples(self) -> list[ProcSample]:
        """CPU and memory of every worker now."""
        return [sample(w.pid) for w in self.workers]

    async def stored(self) -> int:
        """Items the workers say they stored (for a sink that cannot be asked)."""
        metrics = [await w.insertion_metrics(self.bench.http) for w in self.workers]
        return sum(int(m["total_items_inserted"]) for m in metrics)

    async def stop(self) -> list[int]:
        """Stop every worker gracefully; returns their exit codes."""
        for sampler in self._samplers:
            sampler.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sampler
        return list(await asyncio.gather(*(w.stop() for w in self.workers)))

    def store_latencies(self) -> list[tuple[float, float]]:
        """(s since t0 when settled, store latency ms) per item stored, in settle order."""
        merged: dict[str, tuple[float, float]] = {}
        for w in self.workers:
            for key, row in w.store_latencies().items():
                merged.setdefault(key, row)
        rows = [(round(ts - self.t0_wall, 4), round(s * 1000, 3)) for ts, s in merged.values()]
        return sorted(rows)

    def stored_at(self) -> dict[str, float]:
        """Wall-clock time each message id was settled as stored, from every worker's log."""
        merged: dict[str, float] = {}
        for w in self.workers:
            for key, t in w.stored_at().items():
                merged.setdefault(key, t)
        return merged
