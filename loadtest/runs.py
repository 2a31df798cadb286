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
import math
import time
from collections.abc import Sequence
from dataclasses import asdict
from typing import Any

from loadtest.broker import BenchQueues, Publisher, bench_settings
from loadtest.common import BenchError, unique_name
from loadtest.context import Bench, RunSpec, Sink
from loadtest.phases import RunContext, batches, paced, prefilled, publish_many
from loadtest.procs import StandInProcess, start_profiler
from loadtest.workers import WorkerSet, worker_env


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
            ctx = RunContext(bench, spec, sink, queues, publisher, workers, name, result)
            try:
                await _phases(ctx)
            finally:
                codes = await workers.stop()
                if sink.standin is not None and spec.capacity_changes:
                    await sink.standin.set_capacity(None)
        result["exit_codes"] = codes
        if spec.watch_limit_s > 0:
            result["limit_timeline"] = workers.limit_timeline
        if spec.store_latency:
            result["store_latency"] = await _store_latencies(ctx)
        result["ledger"] = await _ledger(ctx)
    if not bench.keep_logs and result["ledger"]["lost"] == 0 and not any(codes):
        for w in workers.workers:
            w.log_path.unlink(missing_ok=True)
    return result


async def _phases(ctx: RunContext) -> None:
    spec, sink, workers, result = ctx.spec, ctx.sink, ctx.workers, ctx.result
    seq = 0
    if spec.items:
        t0 = time.monotonic()
        await publish_many(ctx, range(spec.items))
        result["publish_items_per_s"] = spec.items / (time.monotonic() - t0)
        seq = spec.items
    await workers.start()
    if spec.capacity_changes and sink.standin is not None:
        applied: list[tuple[float, int | None]] = []
        result["capacity_changes"] = applied
        workers.alongside(
            _change_capacity(sink.standin, workers.t0, spec.capacity_changes, applied)
        )
    profiler = None
    if spec.profile_s > 0:
        out = ctx.bench.logs / f"{ctx.name}.pyspy.txt"
        profiler = await start_profiler(workers.workers[0].pid, spec.profile_s, out)
        result["profile_path"] = str(out)
    if spec.items:
        result["prefilled"] = await prefilled(ctx)
    if profiler is not None:
        await profiler.wait()
    if spec.paced_s > 0:
        measured = result.get("prefilled", {}).get("throughput_items_per_s")
        capacity = min(x for x in (spec.ideal_items_per_s, measured) if x and not math.isnan(x))
        rate = max(1.0, spec.paced_load * capacity)
        seqs = range(seq, seq + max(20, int(rate * spec.paced_s)))
        seq = seqs.stop
        result["paced"] = await paced(ctx, rate, seqs)
    if spec.batches:
        result["batches"] = await batches(ctx, seq)
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


async def _store_latencies(ctx: RunContext) -> list[tuple[float, float]]:
    """(s since t0 when stored, store latency ms) per item, in store order."""
    if ctx.sink.standin is None:
        return ctx.workers.store_latencies()
    latencies = await ctx.sink.standin.store_latencies()
    t0 = ctx.workers.t0
    return sorted((round(t - t0, 4), round(s * 1000, 3)) for t, s in latencies.values())


async def _ledger(ctx: RunContext) -> dict[str, Any]:
    """published = stored + dead-lettered + still queued; `lost` is whatever is missing."""
    publisher = ctx.publisher
    depths = await ctx.queues.depths()
    if ctx.sink.standin is not None:
        stats = await ctx.sink.standin.stats()
        stored, duplicates, peak = (
            stats["distinct_keys"],
            stats["duplicates"],
            stats["peak_in_flight"],
        )
    else:
        # The real server cannot be asked cheaply; count what the workers settled as stored.
        stored, duplicates, peak = len(ctx.workers.stored_at()), None, None
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
