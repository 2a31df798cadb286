"""`python -m worker.testing`: serve the stand-in Session-Buddy until SIGTERM or SIGINT."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import signal
import sys

from worker.exitcodes import EXIT_OK
from worker.runner import run
from worker.testing.config import StandInConfig
from worker.testing.server import StandIn


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m worker.testing",
        description="A local stand-in for Session-Buddy: MCP over streamable HTTP (plus plain "
        "JSON), with fault knobs.",
    )
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8678)
    p.add_argument("--latency-ms", type=float, default=0.0, help="median service time")
    p.add_argument("--latency-sigma", type=float, default=0.0, help="log-normal spread")
    for fault in ("error-503", "error-429", "reset", "commit-then-fail", "reject"):
        p.add_argument(f"--{fault}", type=float, default=0.0, metavar="P", help="per-call chance")
    p.add_argument("--retry-after-s", type=float, default=1.0)
    p.add_argument("--status-for-all", type=int, default=None, metavar="STATUS")
    p.add_argument("--max-concurrency", type=int, default=None)
    p.add_argument("--conflict-on-duplicate", action="store_true")
    p.add_argument("--seed", type=int, default=None)
    return p.parse_args(argv)


async def _serve(config: StandInConfig, host: str, port: int) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with StandIn(config, host=host, port=port) as standin:
        print(standin.url, flush=True)
        await stop.wait()


def main(argv: list[str] | None = None) -> int:
    """Run the stand-in until SIGTERM or SIGINT, printing its MCP URL once it listens."""
    args = _parse_args(argv)
    names = {f.name for f in dataclasses.fields(StandInConfig)}
    config = StandInConfig(
        latency_s=args.latency_ms / 1000, **{k: v for k, v in vars(args).items() if k in names}
    )
    run(_serve(config, args.host, args.port))
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
