"""The floor: the aio-pika + aiohttp worker anyone would write in an afternoon.

`python -m loadtest.peers.naive`, configured like memory-worker (see `PeerConfig`). Prefetch
and a semaphore of c, one aiohttp session, one MCP session; ack once the answer says stored,
reject (no requeue: the queue dead-letters it) otherwise. No retries, no logging per message.
SIGTERM: stop consuming, wait for the stores in flight, close, exit 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import sys

import aio_pika
import aiohttp
import uvloop
from aio_pika.abc import AbstractIncomingMessage, AbstractQueue

from loadtest.peers.mcp import McpClient, PeerConfig, reflection_arguments, serve_readyz


async def handle(mcp: McpClient, message: AbstractIncomingMessage) -> None:
    """Store one item; ack when stored, reject otherwise."""
    try:
        item = json.loads(message.body)
        args = reflection_arguments(item["content"], item.get("metadata") or {}, message.message_id)
        stored = await mcp.store(args)
    except Exception:
        stored = False
    if stored:
        await message.ack()
    else:
        await message.reject(requeue=False)


async def consume(queue: AbstractQueue, mcp: McpClient, concurrency: int) -> None:
    """Take deliveries one at a time, each as a task once a slot is free."""
    slots = asyncio.Semaphore(concurrency)
    in_flight: set[asyncio.Task[None]] = set()

    async def one(message: AbstractIncomingMessage) -> None:
        try:
            await handle(mcp, message)
        finally:
            slots.release()

    try:
        async with queue.iterator() as messages:
            async for message in messages:
                await slots.acquire()
                task = asyncio.create_task(one(message))
                in_flight.add(task)
                task.add_done_callback(in_flight.discard)
    finally:
        # Cancelled on SIGTERM: the iterator's exit cancelled the subscription; finish the rest.
        await asyncio.gather(*in_flight, return_exceptions=True)


async def run(cfg: PeerConfig) -> None:
    """Consume until SIGTERM or SIGINT."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    consuming = False
    ops = await serve_readyz(cfg.ops_port, lambda: consuming)
    connection = await aio_pika.connect_robust(cfg.amqp_url)
    try:
        async with aiohttp.ClientSession() as http:
            mcp = McpClient(http, cfg.mcp_url)
            await mcp.open()
            channel = await connection.channel()
            await channel.set_qos(prefetch_count=cfg.concurrency)
            queue = await channel.declare_queue(cfg.queue, passive=True)
            consumer = asyncio.create_task(consume(queue, mcp, cfg.concurrency))
            consumer.add_done_callback(lambda _: stop.set())  # a crash ends the process too
            consuming = True
            await stop.wait()
            consumer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await consumer
    finally:
        await connection.close()
        await ops.cleanup()


def main() -> int:
    """Entry point: `python -m loadtest.peers.naive`."""
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(run(PeerConfig.from_env()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
