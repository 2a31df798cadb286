"""Scenario `standin`: the stand-in's own capacity and how exact its service time is."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import aiohttp
import orjson

from loadtest import report
from loadtest.common import BenchError
from loadtest.context import Bench
from loadtest.scenario import (
    Options,
    Outcome,
    say,
)
from loadtest.tables import target


async def scenario_standin(bench: Bench, opt: Options) -> Outcome:
    """The stand-in's capacity (0 ms) and how exact its 50 ms is, under a raw aiohttp client."""
    seconds = opt.pick(8.0, 3.0)
    data = [await hammer(bench, clients, seconds, 0.0) for clients in (8, 64)]
    data += [await hammer(bench, clients, seconds, 50.0) for clients in (1, 50)]
    f = report.fmt
    rows = []
    for r in data:
        ideal = r["clients"] / 0.05 if r["latency_ms"] else None
        rows.append(
            [
                f"{r['latency_ms']:g}",
                r["clients"],
                f(r["calls_per_s"], 0),
                f(r["calls_per_s"] / ideal, 3) if ideal else "—",
                f(r["mean_call_ms"], 2),
                f(r["standin_cpu_utilisation"], 2),
                f(r["standin_cpu_us_per_call"], 0),
                f(r["capacity_calls_per_s_one_core"], 0),
                r["peak_in_flight"],
            ]
        )
        say(
            bench,
            f"stand-in {r['latency_ms']:g} ms, {r['clients']} clients: "
            f"{r['calls_per_s']:.0f} calls/s, mean {r['mean_call_ms']:.2f} ms, "
            f"{r['standin_cpu_us_per_call']:.0f} µs CPU/call",
        )
    capacity = min(r["capacity_calls_per_s_one_core"] for r in data if not r["latency_ms"])
    headers = ["service ms", "clients", "calls/s", "efficiency (raw client)", "mean call ms",
               "stand-in CPU (cores)", "stand-in CPU µs/call", "capacity, calls/s on one core",
               "peak in flight"]  # fmt: skip
    md = "\n\n".join(
        [
            "## Stand-in Session-Buddy: capacity and accuracy",
            "A raw aiohttp MCP client (the runner; one session, keep-alive) calls "
            "`store_reflection` on `python -m loadtest.standin` in closed loops for "
            f"{seconds:g} s per row. Capacity is calls per CPU-second of the stand-in: what it "
            "serves with one whole core. The 50 ms rows measure the instrument itself: the "
            "efficiency a client with no overhead of its own gets (timer slack of `asyncio.sleep` "
            "plus loopback HTTP), i.e. the ceiling for the worker's efficiency figures.",
            report.md_table(headers, rows),
        ]
    )
    goal = target(
        "stand-in never the bottleneck",
        "≥ 4,000 calls/s/core (2 × the worker target)",
        f"{capacity:,.0f}",
        capacity >= 4000,
    )
    return Outcome({"runs": data}, md, [goal])


async def hammer(
    bench: Bench, clients: int, seconds: float, latency_ms: float, sigma: float = 0.0
) -> dict[str, Any]:
    standin = bench.standin
    await standin.reset()
    await standin.configure(latency_ms, sigma)
    headers = {"accept": "application/json, text/event-stream", "content-type": "application/json"}
    init = {
        "jsonrpc": "2.0",
        "id": 0,
        "method": "initialize",
        "params": {
            "protocolVersion": "2025-06-18",
            "capabilities": {},
            "clientInfo": {"name": "bench", "version": "0"},
        },
    }
    calls, busy_s = 0, 0.0
    connector = aiohttp.TCPConnector(limit=clients)
    async with aiohttp.ClientSession(connector=connector) as http:
        async with http.post(standin.url, data=orjson.dumps(init), headers=headers) as r:
            headers["mcp-session-id"] = r.headers["mcp-session-id"]
        note = {"jsonrpc": "2.0", "method": "notifications/initialized"}
        async with http.post(standin.url, data=orjson.dumps(note), headers=headers):
            pass
        stop_at = time.monotonic() + seconds

        async def loop(client: int) -> None:
            nonlocal calls, busy_s
            n = 0
            while time.monotonic() < stop_at:
                args = {
                    "content": f"capacity probe {client}-{n}",
                    "tags": ["bench"],
                    "source_session_id": f"cap-{client}-{n}",
                }
                body = {
                    "jsonrpc": "2.0",
                    "id": n,
                    "method": "tools/call",
                    "params": {"name": "store_reflection", "arguments": args},
                }
                t0 = time.monotonic()
                async with http.post(standin.url, data=orjson.dumps(body), headers=headers) as r:
                    text = await r.read()
                    if b"stored successfully" not in text:
                        raise BenchError(f"stand-in refused a probe: {text[:200]!r}")
                busy_s += time.monotonic() - t0
                n += 1
                calls += 1

        cpu0, t0 = standin.cpu_s(), time.monotonic()
        await asyncio.gather(*(loop(i) for i in range(clients)))
        cpu, elapsed = standin.cpu_s() - cpu0, time.monotonic() - t0
    stats = await standin.stats()
    return {
        "clients": clients,
        "latency_ms": latency_ms,
        "seconds": elapsed,
        "calls": calls,
        "calls_per_s": calls / elapsed,
        "mean_call_ms": busy_s / calls * 1000,
        "standin_cpu_utilisation": cpu / elapsed,
        "standin_cpu_us_per_call": cpu / calls * 1e6,
        "capacity_calls_per_s_one_core": calls / cpu if cpu else float("nan"),
        "peak_in_flight": stats["peak_in_flight"],
    }
