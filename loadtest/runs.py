"""One measured run: real worker processes on fresh queues, against the stand-in or the real sink.

The workers are memory-worker processes with the committed settings (adaptive concurrency on,
within [1, `concurrency`]) unless the spec sets `adaptive`, or, with `peer`, one of the workers
it is measured against (`loadtest/peers/`): those have no metrics and no log lines, so their
stores are counted and timed by the stand-in only.

A run goes through up to three phases with the same workers:

1. **prefilled** — `items` are published *before* the workers start; the workers drain them.
   Throughput is taken over the steady part (the 10th to the 90th percentile of store times, so
   process start-up and the last stragglers do not count), and also between the first and the
   last store (the issue's definition); CPU over the whole drain.
2. **paced** — items are published at a fixed rate below what phase 1 reached (open loop), so
   end-to-end latency (publish → stored in the sink) measures the worker, not a queue backlog.
3. **batches** — ACT-008's shape: publish a batch of n items to idle workers and time until the
   last one is stored.

Then the workers stop, and the ledger is drawn: published = stored + dead-lettered + still
queued; anything else is lost.

A spec can also cap the stand-in's capacity (`capacity`: calls served at once) and change that
cap at set times, end the drain after `stop_after_s` (the rest stays queued), watch the workers'
concurrency-limit gauge and keep every item's store latency (from the stand-in when it is the
sink: from the call reaching it to the row stored; else from the worker's log lines).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import shutil
import sys
import time
from collections.abc import Awaitable, Callable, Coroutine, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
from aio_pika.abc import AbstractRobustConnection
from rich.progress import Progress, TaskID

from loadtest.harness import (
    BenchError,
    BenchQueues,
    ProcSample,
    Publisher,
    StandInProcess,
    WorkerProcess,
    bench_settings,
    broker_pid,
    busy_cpu_s,
    cpu_s_of,
    item_body,
    message_id,
    percentiles,
    sample,
    summarize_latencies,
    unique_name,
    worker_env,
)

POLL_S = 0.1


@dataclass
class Bench:
    """What every run shares: the broker connection, the stand-in, the progress display."""

    connection: AbstractRobustConnection
    standin: StandInProcess
    http: httpx.AsyncClient
    progress: Progress
    logs: Path
    quick: bool
    log_level: str = "info"
    broker: int | None = field(default_factory=broker_pid)
    keep_logs: bool = False
    noisy_retries: int = 0

    def task(self, description: str, total: float) -> TaskID:
        """A new line on the progress display."""
        return self.progress.add_task(description, total=total)

    def done(self, task: TaskID) -> None:
        """Remove a finished line from the progress display."""
        self.progress.remove_task(task)


@dataclass(frozen=True)
class RunSpec:
    """What one run does: workers, concurrency, sink latency, and which phases."""

    label: str
    concurrency: int
    workers: int = 1
    latency_ms: float = 50.0
    sigma: float = 0.0
    items: int = 0
    paced_s: float = 0.0
    paced_load: float = 0.7
    batches: tuple[int, ...] = ()
    batch_reps: int = 1
    max_s: float = 120.0
    profile_s: float = 0.0
    rss_every_s: float = 1.0
    adaptive: bool | None = None  # None: the committed default (on)
    peer: str = ""  # "" is memory-worker; else a key of harness.PEERS
    capacity: int | None = None
    capacity_changes: tuple[tuple[float, int | None], ...] = ()
    stop_after_s: float = 0.0
    watch_limit_s: float = 0.0
    store_latency: bool = False

    @property
    def mean_latency_s(self) -> float:
        """Mean service time of the sink: median × exp(σ²/2) for a log-normal."""
        return self.latency_ms / 1000 * math.exp(self.sigma**2 / 2)

    @property
    def ideal_items_per_s(self) -> float | None:
        """min(W·c, capacity) ÷ mean latency: what perfect concurrency would reach.

        None for a 0 ms sink. `capacity` is the stand-in's cap at the start of the run.
        """
        if self.mean_latency_s <= 0:
            return None
        slots = self.workers * self.concurrency
        if self.capacity is not None:
            slots = min(slots, self.capacity)
        return slots / self.mean_latency_s


@dataclass
class Sink:
    """Where items go and how the runner learns they arrived."""

    url: str
    standin: StandInProcess | None
    pid: int | None

    @property
    def name(self) -> str:
        """`stand-in` or `session-buddy`."""
        return "stand-in" if self.standin is not None else "session-buddy"


@dataclass
class Phase:
    """Keys published in one phase and when."""

    keys: list[str] = field(default_factory=list)


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


async def publish_many(
    bench: Bench, publisher: Publisher, run: str, seqs: range, label: str
) -> list[str]:
    """Publish items `seqs` as fast as confirms allow, with a progress line."""
    task = bench.task(f"{label}: publish", len(seqs))
    keys = []
    for n, seq in enumerate(seqs, 1):
        key = message_id(run, seq)
        await publisher.publish(key, item_body(run, seq))
        keys.append(key)
        if n % 500 == 0:
            bench.progress.update(task, completed=n)
    await publisher.flush()
    bench.done(task)
    return keys


async def publish_paced(publisher: Publisher, run: str, seqs: range, rate: float) -> list[str]:
    """Publish items `seqs` at `rate` per second on a fixed schedule (open loop)."""
    keys = []
    t0 = time.monotonic()
    for i, seq in enumerate(seqs):
        delay = t0 + i / rate - time.monotonic()
        if delay > 0.001:
            await asyncio.sleep(delay)
        key = message_id(run, seq)
        await publisher.publish(key, item_body(run, seq))
        keys.append(key)
    return keys


async def wait_settled(
    bench: Bench,
    queues: BenchQueues,
    done: Callable[[], Awaitable[int]],
    expected: int,
    deadline: float,
    label: str,
    poll_s: float = POLL_S,
) -> bool:
    """Wait until stored + dead-lettered reaches `expected` or the deadline passes."""
    task = bench.task(label, expected)
    dead, next_dlq_check = 0, 0.0
    try:
        while True:
            now = time.monotonic()
            if now >= next_dlq_check:
                dead, next_dlq_check = await queues.dead_lettered(), now + 0.5
            settled = await done() + dead
            bench.progress.update(task, completed=settled)
            if settled >= expected:
                return True
            if now > deadline:
                return False
            await asyncio.sleep(poll_s)
    finally:
        bench.done(task)


def steady_throughput(times: Sequence[float]) -> float:
    """Items per second between the 10th and the 90th percentile of store times."""
    ordered = sorted(times)
    n = len(ordered)
    if n < 10:
        span = ordered[-1] - ordered[0] if n > 1 else 0.0
        return (n - 1) / span if span > 0 else float("nan")
    lo, hi = int(n * 0.1), int(n * 0.9) - 1
    span = ordered[hi] - ordered[lo]
    return (hi - lo) / span if span > 0 else float("nan")


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


async def run_workers(bench: Bench, spec: RunSpec, sink: Sink) -> dict[str, Any]:
    """Carry out one run (see the module docstring) and return everything measured."""
    name = unique_name()
    settings = bench_settings(name, sink.url, spec.concurrency)
    if spec.peer and sink.standin is None:
        raise BenchError(f"run {spec.label}: a peer's stores can only be counted by the stand-in")
    if sink.standin is not None:
        await sink.standin.reset()
        await sink.standin.configure(spec.latency_ms, spec.sigma, 7, spec.capacity)
    elif spec.capacity is not None or spec.capacity_changes:
        raise BenchError(f"run {spec.label}: only the stand-in's capacity can be set")
    result: dict[str, Any] = {"spec": asdict(spec), "sink": sink.name, "queue": name}
    async with BenchQueues(bench.connection, settings) as queues:
        publisher = Publisher(bench.connection, queues.topology)
        async with publisher.open():
            env = worker_env(settings, bench.log_level, spec.adaptive)
            workers = WorkerSet(bench, spec, env, name)
            try:
                await _phases(bench, spec, sink, queues, publisher, workers, name, result)
            finally:
                codes = await workers.stop()
                if sink.standin is not None and spec.capacity_changes:
                    await sink.standin.set_capacity(None)
        result["exit_codes"] = codes
        if spec.watch_limit_s > 0:
            result["limit_timeline"] = workers.limit_timeline
        if spec.store_latency:
            result["store_latency"] = await _store_latencies(sink, workers)
        result["ledger"] = await _ledger(queues, publisher, sink, workers, result)
    if not bench.keep_logs and result["ledger"]["lost"] == 0 and not any(codes):
        for w in workers.workers:
            w.log_path.unlink(missing_ok=True)
    return result


async def _phases(
    bench: Bench,
    spec: RunSpec,
    sink: Sink,
    queues: BenchQueues,
    publisher: Publisher,
    workers: WorkerSet,
    run: str,
    result: dict[str, Any],
) -> None:
    seq = 0
    if spec.items:
        t0 = time.monotonic()
        await publish_many(bench, publisher, run, range(spec.items), spec.label)
        result["publish_items_per_s"] = spec.items / (time.monotonic() - t0)
        seq = spec.items
    await workers.start()
    done = _done_counter(sink, workers)
    if spec.capacity_changes and sink.standin is not None:
        applied: list[tuple[float, int | None]] = []
        result["capacity_changes"] = applied
        workers.alongside(
            _change_capacity(sink.standin, workers.t0, spec.capacity_changes, applied)
        )
    profiler = None
    if spec.profile_s > 0:
        out = bench.logs / f"{run}.pyspy.txt"
        profiler = await start_profiler(workers.workers[0].pid, spec.profile_s, out)
        result["profile_path"] = str(out)
    if spec.items:
        result["prefilled"] = await _prefilled(bench, spec, sink, queues, workers, done, run)
    if profiler is not None:
        await profiler.wait()
    if spec.paced_s > 0:
        measured = result.get("prefilled", {}).get("throughput_items_per_s")
        capacity = min(x for x in (spec.ideal_items_per_s, measured) if x and x == x)
        rate = max(1.0, spec.paced_load * capacity)
        seqs = range(seq, seq + max(20, int(rate * spec.paced_s)))
        seq = seqs.stop
        result["paced"] = await _paced(
            bench, spec, sink, queues, publisher, workers, done, rate, seqs, run
        )
    if spec.batches:
        result["batches"] = await _batches(bench, spec, sink, queues, publisher, done, seq, run)
    result["rss_timeline"] = workers.rss_timeline


async def _change_capacity(
    standin: StandInProcess,
    t0: float,
    changes: Sequence[tuple[float, int | None]],
    applied: list[tuple[float, int | None]],
) -> None:
    """Set the stand-in's capacity at each (seconds after t0, capacity); record when it was."""
    for at_s, capacity in changes:
        delay = t0 + at_s - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        await standin.set_capacity(capacity)
        applied.append((round(time.monotonic() - t0, 3), capacity))


async def _store_latencies(sink: Sink, workers: WorkerSet) -> list[tuple[float, float]]:
    """(s since t0 when stored, store latency ms) per item, in store order."""
    if sink.standin is None:
        return workers.store_latencies()
    latencies = await sink.standin.store_latencies()
    t0 = workers.t0
    return sorted((round(t - t0, 4), round(s * 1000, 3)) for t, s in latencies.values())


def _done_counter(sink: Sink, workers: WorkerSet) -> Callable[[], Awaitable[int]]:
    standin = sink.standin
    if standin is None:
        return workers.stored

    async def distinct() -> int:
        return int((await standin.stats())["distinct_keys"])

    return distinct


async def _prefilled(
    bench: Bench,
    spec: RunSpec,
    sink: Sink,
    queues: BenchQueues,
    workers: WorkerSet,
    done: Callable[[], Awaitable[int]],
    run: str,
) -> dict[str, Any]:
    """Drain the prefilled queue; throughput, CPU and memory of that drain."""
    t_start = min(w.ready_at for w in workers.workers)
    others = {"sink": sink.pid, "broker": bench.broker, "runner": None}
    others_before = {
        k: cpu_s_of(pid) if k != "runner" else time.process_time() for k, pid in others.items()
    }
    busy_before = busy_cpu_s()
    # stop_after_s ends the drain early on purpose; what is left stays queued (and in the ledger).
    bound_s = min(spec.max_s, spec.stop_after_s) if spec.stop_after_s > 0 else spec.max_s
    settled = await wait_settled(
        bench, queues, done, spec.items, t_start + bound_s, f"{spec.label}: drain"
    )
    t_end = time.monotonic()
    busy = busy_cpu_s() - busy_before
    after = workers.samples()
    others_cpu = {
        k: (cpu_s_of(pid) if k != "runner" else time.process_time()) - others_before[k]
        for k, pid in others.items()
    }
    times = await _store_times(sink, workers, [message_id(run, s) for s in range(spec.items)])
    in_window = (
        [t for t in times.values() if t >= t_start] if sink.standin else list(times.values())
    )
    n = max(1, len(in_window))
    worker_cpu = sum(a.cpu_s - b.cpu_s for a, b in zip(after, workers.baseline, strict=True))
    steady = steady_throughput(list(times.values()))
    span = max(times.values()) - min(times.values()) if times else 0.0
    first_last = (len(times) - 1) / span if span > 0 else float("nan")
    overall = (
        len(times) / (max(times.values()) - t_start) if times and sink.standin else float("nan")
    )
    ideal = spec.ideal_items_per_s
    elapsed = max(1e-9, t_end - t_start)
    # Whatever else kept the 2 cores busy meanwhile (other people's tests, the OS).
    unrelated = busy - worker_cpu - sum(others_cpu.values())
    return {
        "settled": settled,
        "stored": len(times),
        "drain_s": t_end - t_start,
        "throughput_items_per_s": steady,
        "throughput_overall_items_per_s": overall,
        "ideal_items_per_s": ideal,
        "efficiency": steady / ideal if ideal else None,
        "throughput_first_last_items_per_s": first_last,
        "efficiency_first_last": first_last / ideal if ideal else None,
        "worker_cpu_s_per_1000": worker_cpu / n * 1000,
        "worker_cpu_utilisation": worker_cpu / elapsed,
        "machine_busy_cores": busy / elapsed,
        "unrelated_busy_cores": max(0.0, unrelated / elapsed),
        "sink_cpu_s_per_1000": others_cpu["sink"] / n * 1000,
        "broker_cpu_s_per_1000": others_cpu["broker"] / n * 1000,
        "runner_cpu_s_per_1000": others_cpu["runner"] / n * 1000,
        "peak_rss_mb": max(s.peak_rss_mb for s in after),
        "rss_after_start_mb": max(s.rss_mb for s in workers.baseline),
        "rss_at_end_mb": max(s.rss_mb for s in after),
        "throughput_timeline": timeline(in_window, t_start) if sink.standin else [],
    }


def timeline(times: Sequence[float], t0: float, bucket_s: float = 1.0) -> list[tuple[float, int]]:
    """Items stored per `bucket_s` since `t0`: (bucket start, count)."""
    counts: dict[int, int] = {}
    for t in times:
        counts[int((t - t0) // bucket_s)] = counts.get(int((t - t0) // bucket_s), 0) + 1
    return [(b * bucket_s, counts.get(b, 0)) for b in range(max(counts, default=-1) + 1)]


async def _store_times(sink: Sink, workers: WorkerSet, keys: Sequence[str]) -> dict[str, float]:
    """When each key was stored: stand-in arrivals (monotonic) or worker logs (wall clock)."""
    if sink.standin is not None:
        arrivals = await sink.standin.arrivals()
    else:
        arrivals = workers.stored_at()
    return {k: arrivals[k] for k in keys if k in arrivals}


async def _paced(
    bench: Bench,
    spec: RunSpec,
    sink: Sink,
    queues: BenchQueues,
    publisher: Publisher,
    workers: WorkerSet,
    done: Callable[[], Awaitable[int]],
    rate: float,
    seqs: range,
    run: str,
) -> dict[str, Any]:
    """Open-loop load at `rate`: end-to-end latency from publish to stored."""
    task = bench.task(f"{spec.label}: paced {rate:.0f}/s", len(seqs))
    publishing = asyncio.create_task(publish_paced(publisher, run, seqs, rate))
    while not publishing.done():
        bench.progress.update(task, completed=len(publisher.sent_at))
        await asyncio.sleep(POLL_S)
    keys = await publishing
    bench.done(task)
    await publisher.flush()
    settled = await wait_settled(
        bench,
        queues,
        done,
        publisher.confirmed,
        time.monotonic() + spec.max_s,
        f"{spec.label}: paced drain",
    )
    if sink.standin is not None:
        stored = await _store_times(sink, workers, keys)
        sent = {k: publisher.sent_at[k] for k in keys if k in publisher.sent_at}
    else:
        stored = await _store_times(sink, workers, keys)
        sent = {k: publisher.sent_wall[k] for k in keys if k in publisher.sent_wall}
    return {
        "rate_items_per_s": rate,
        "items": len(keys),
        "settled": settled,
        **summarize_latencies(sent, stored),
    }


async def _batches(
    bench: Bench,
    spec: RunSpec,
    sink: Sink,
    queues: BenchQueues,
    publisher: Publisher,
    done: Callable[[], Awaitable[int]],
    seq: int,
    run: str,
) -> list[dict[str, Any]]:
    """ACT-008's batches end to end: publish n items to idle workers, time to the last store."""
    assert sink.standin is not None, "batch timing needs the stand-in's arrival times"
    plan: list[tuple[int, list[str], float]] = []
    for size in spec.batches:
        for _ in range(spec.batch_reps):
            before = await done()
            t_start = time.monotonic()
            keys = [message_id(run, s) for s in range(seq, seq + size)]
            for s, key in zip(range(seq, seq + size), keys, strict=True):
                await publisher.publish(key, item_body(run, s))
            seq += size
            deadline = time.monotonic() + spec.max_s
            await wait_settled(
                bench, queues, done, before + size, deadline, f"{spec.label}: batch {size}", 0.005
            )
            plan.append((size, keys, t_start))
    arrivals = await sink.standin.arrivals()
    out = []
    for size, keys, t_start in plan:
        last = max((arrivals[k] for k in keys if k in arrivals), default=float("nan"))
        out.append({"size": size, "time_s": last - t_start})
    return out


async def _ledger(
    queues: BenchQueues,
    publisher: Publisher,
    sink: Sink,
    workers: WorkerSet,
    result: Mapping[str, Any],
) -> dict[str, Any]:
    """published = stored + dead-lettered + still queued; `lost` is whatever is missing."""
    depths = await queues.depths()
    if sink.standin is not None:
        stats = await sink.standin.stats()
        stored, duplicates, peak = (
            stats["distinct_keys"],
            stats["duplicates"],
            stats["peak_in_flight"],
        )
    else:
        # The real server cannot be asked cheaply; count what the workers settled as stored.
        stored, duplicates, peak = len(workers.stored_at()), None, None
    published = publisher.confirmed
    accounted = stored + depths.dead_lettered + depths.work + depths.retrying
    return {
        "published": published,
        "publish_failed": publisher.failed,
        "stored": stored,
        "dead_lettered": depths.dead_lettered,
        "queued": depths.work + depths.retrying,
        "lost": max(0, published - accounted),
        "duplicates": duplicates,
        "sink_peak_in_flight": peak,
    }


async def run_or_raise(bench: Bench, spec: RunSpec, sink: Sink) -> dict[str, Any]:
    """`run_workers`, turning a timeout or a lost item into a visible flag, never a hang."""
    try:
        return await asyncio.wait_for(run_workers(bench, spec, sink), spec.max_s * 3 + 120)
    except TimeoutError:
        raise BenchError(f"run {spec.label} exceeded its time bound") from None


def latency_summary(values_ms: Sequence[float]) -> dict[str, float]:
    """p50/p95/p99 of a list of milliseconds."""
    p50, p95, p99 = percentiles(values_ms)
    return {"p50_ms": p50, "p95_ms": p95, "p99_ms": p99}
