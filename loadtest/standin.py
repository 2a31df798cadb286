"""The stand-in Session-Buddy for benchmarks: `worker.testing`'s stand-in plus per-key arrivals.

`python -m loadtest.standin --port P` serves exactly what `python -m worker.testing` serves and
also records when each idempotency key was stored (CLOCK_MONOTONIC, which every process on the
machine shares), so the runner can compute end-to-end latency per item and throughput over any
window, and when each of those calls reached it, so a store's latency inside the sink (any wait
for capacity plus the service time) is known whichever worker made the call. The arrivals are
served on a second loopback port (`GET /arrivals` answers `{"keys": [...], "t": [...],
"received": [...]}` for rows stored since the last reset), recorded through the stand-in's
`on_store` hook. It prints the MCP URL, then the arrivals URL. Every other knob is set through
the stand-in's own `/_standin/*` control routes.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
import time

import orjson
from aiohttp import web

from worker.runner import run
from worker.testing import StandIn, StandInConfig, StoreCall


class BenchStandIn(StandIn):
    """A stand-in that remembers when each key was stored and keeps no rows."""

    def __init__(self, config: StandInConfig, host: str, port: int) -> None:
        super().__init__(config, host=host, port=port, on_store=self._arrived)
        self._arrival_keys: list[str] = []
        self._arrival_t: list[float] = []
        self._arrival_received: list[float] = []

    def reset(self) -> None:
        """Zero the counters and forget arrivals."""
        super().reset()
        self._arrival_keys = []
        self._arrival_t = []
        self._arrival_received = []

    async def _arrived(self, call: StoreCall) -> None:
        """Record the store about to be made; the stand-in then stores it as usual."""
        self._arrival_keys.append(call.key or "")
        self._arrival_t.append(time.monotonic())
        self._arrival_received.append(call.received)

    async def arrivals(self, _: web.Request) -> web.Response:
        """Keys, store times and call arrival times since the last reset, in store order."""
        body = orjson.dumps(
            {"keys": self._arrival_keys, "t": self._arrival_t, "received": self._arrival_received}
        )
        return web.Response(body=body, content_type="application/json")


async def _serve(port: int) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    # max_items=1: the benchmark needs counts and arrival times, not the stored rows.
    standin = BenchStandIn(StandInConfig(max_items=1), "127.0.0.1", port)
    async with standin:
        app = web.Application()
        app.router.add_get("/arrivals", standin.arrivals)
        runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        try:
            print(standin.url, flush=True)
            print(f"http://127.0.0.1:{runner.addresses[0][1]}/arrivals", flush=True)
            await stop.wait()
        finally:
            await runner.cleanup()


def main(argv: list[str] | None = None) -> int:
    """Serve on loopback until SIGTERM or SIGINT, printing the MCP URL once listening."""
    parser = argparse.ArgumentParser(prog="python -m loadtest.standin", description=__doc__)
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    args = parser.parse_args(argv)
    run(_serve(args.port))
    return 0


if __name__ == "__main__":
    sys.exit(main())
