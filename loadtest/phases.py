"""The phases of a run (see `runs`): publish, drain a prefilled queue, paced load, batches."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from loadtest.broker import BenchQueues, Publisher, item_body, message_id
from loadtest.common import steady_throughput, summarize_latencies, timeline
from loadtest.context import Bench, RunSpec, Sink
from loadtest.procs import busy_cpu_s, cpu_s_of
from loadtest.workers import WorkerSet

POLL_S = 0.1


@dataclass
class RunContext:
    """One run in progress: what each of its phases reads, and the result they add to."""

    bench: Bench
    spec: RunSpec
    sink: Sink
    queues: BenchQueues
    publisher: Publisher
    workers: WorkerSet
    name: str  # the run's broker names and message ids start with it
    result: dict[str, Any]

    async def done(self) -> int:
        """Items stored so far: distinct keys in the stand-in, else what the workers report."""
        if self.sink.standin is None:
            return await self.workers.stored()
        return int((await self.sink.standin.stats())["distinct_keys"])

    async def store_times(self, keys: Sequence[str]) -> dict[str, float]:
        """When each key was stored: stand-in arrivals (monotonic) or worker logs (wall clock)."""
        if self.sink.standin is not None:
            arrivals = await self.sink.standin.arrivals()
        else:
            arrivals = self.workers.stored_at()
        return {k: arrivals[k] for k in keys if k in arrivals}


async def publish_many(ctx: RunContext, seqs: range) -> list[str]:
    """Publish items `seqs` as fast as confirms allow, with a progress line."""
    bench, publisher, run = ctx.bench, ctx.publisher, ctx.name
    task = bench.task(f"{ctx.spec.label}: publish", len(seqs))
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


async def publish_paced(ctx: RunContext, seqs: range, rate: float) -> list[str]:
    """Publish items `seqs` at `rate` per second on a fixed schedule (open loop)."""
    keys = []
    t0 = time.monotonic()
    for i, seq in enumerate(seqs):
        delay = t0 + i / rate - time.monotonic()
        if delay > 0.001:
            await asyncio.sleep(delay)
        key = message_id(ctx.name, seq)
        await ctx.publisher.publish(key, item_body(ctx.name, seq))
        keys.append(key)
    return keys


async def wait_settled(
    ctx: RunContext, expected: int, deadline: float, label: str, poll_s: float = POLL_S
) -> bool:
    """Wait until stored + dead-lettered reaches `expected` or the deadline passes."""
    bench = ctx.bench
    task = bench.task(label, expected)
    dead, next_dlq_check = 0, 0.0
    try:
        while True:
            now = time.monotonic()
            if now >= next_dlq_check:
                dead, next_dlq_check = await ctx.queues.dead_lettered(), now + 0.5
            settled = await ctx.done() + dead
            bench.progress.update(task, completed=settled)
            if settled >= expected:
                return True
            if now > deadline:
                return False
            await asyncio.sleep(poll_s)
    finally:
        bench.done(task)


async def prefilled(ctx: RunContext) -> dict[str, Any]:
    """Drain the prefilled queue; throughput, CPU and memory of that drain."""
    spec, sink, workers = ctx.spec, ctx.sink, ctx.workers
    t_start = min(w.ready_at for w in workers.workers)
    others = {"sink": sink.pid, "broker": ctx.bench.broker, "runner": None}
    others_before = {
        k: cpu_s_of(pid) if k != "runner" else time.process_time() for k, pid in others.items()
    }
    busy_before = busy_cpu_s()
    # stop_after_s ends the drain early on purpose; what is left stays queued (and in the ledger).
    bound_s = min(spec.max_s, spec.stop_after_s) if spec.stop_after_s > 0 else spec.max_s
    settled = await wait_settled(ctx, spec.items, t_start + bound_s, f"{spec.label}: drain")
    t_end = time.monotonic()
    busy = busy_cpu_s() - busy_before
    after = workers.samples()
    others_cpu = {
        k: (cpu_s_of(pid) if k != "runner" else time.process_time()) - others_before[k]
        for k, pid in others.items()
    }
    times = await ctx.store_times([message_id(ctx.name, s) for s in range(spec.items)])
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


async def paced(ctx: RunContext, rate: float, seqs: range) -> dict[str, Any]:
    """Open-loop load at `rate`: end-to-end latency from publish to stored."""
    bench, spec, publisher = ctx.bench, ctx.spec, ctx.publisher
    task = bench.task(f"{spec.label}: paced {rate:.0f}/s", len(seqs))
    publishing = asyncio.create_task(publish_paced(ctx, seqs, rate))
    while not publishing.done():
        bench.progress.update(task, completed=len(publisher.sent_at))
        await asyncio.sleep(POLL_S)
    keys = await publishing
    bench.done(task)
    await publisher.flush()
    settled = await wait_settled(
        ctx, publisher.confirmed, time.monotonic() + spec.max_s, f"{spec.label}: paced drain"
    )
    stored = await ctx.store_times(keys)
    # The stand-in's store times are monotonic, the workers' log lines wall-clock.
    if ctx.sink.standin is not None:
        sent = {k: publisher.sent_at[k] for k in keys if k in publisher.sent_at}
    else:
        sent = {k: publisher.sent_wall[k] for k in keys if k in publisher.sent_wall}
    return {
        "rate_items_per_s": rate,
        "items": len(keys),
        "settled": settled,
        **summarize_latencies(sent, stored),
    }


async def batches(ctx: RunContext, seq: int) -> list[dict[str, Any]]:
    """ACT-008's batches end to end: publish n items to idle workers, time to the last store."""
    spec, standin, run = ctx.spec, ctx.sink.standin, ctx.name
    assert standin is not None, "batch timing needs the stand-in's arrival times"
    plan: list[tuple[int, list[str], float]] = []
    for size in spec.batches:
        for _ in range(spec.batch_reps):
            before = await ctx.done()
            t_start = time.monotonic()
            keys = [message_id(run, s) for s in range(seq, seq + size)]
            for s, key in zip(range(seq, seq + size), keys, strict=True):
                await ctx.publisher.publish(key, item_body(run, s))
            seq += size
            deadline = time.monotonic() + spec.max_s
            label = f"{spec.label}: batch {size}"
            await wait_settled(ctx, before + size, deadline, label, 0.005)
            plan.append((size, keys, t_start))
    arrivals = await standin.arrivals()
    out = []
    for size, keys, t_start in plan:
        last = max((arrivals[k] for k in keys if k in arrivals), default=float("nan"))
        out.append({"size": size, "time_s": last - t_start})
    return out
