"""What a user would pick instead: an idiomatic FastStream worker doing memory-worker's job.

`python -m loadtest.peers.faststream_peer` (or `faststream run loadtest.peers.faststream_peer:app`),
configured like memory-worker (see `PeerConfig`). Concurrency is FastStream's for RabbitMQ: the
channel's prefetch, every delivery handled as its own task. The body is validated by a pydantic
model, FastStream's default ack policy acks after the handler and rejects on an exception, and
its default logging (two lines per message) stays on, as a user would leave it.
"""

from __future__ import annotations

import sys
from typing import Any

import aiohttp
import anyio
import uvloop
from aiohttp import web
from faststream import FastStream
from faststream.exceptions import RejectMessage
from faststream.rabbit import Channel, RabbitBroker, RabbitMessage, RabbitQueue
from pydantic import BaseModel

from loadtest.peers.mcp import McpClient, PeerConfig, reflection_arguments, serve_readyz

config = PeerConfig.from_env()
broker = RabbitBroker(config.amqp_url, default_channel=Channel(prefetch_count=config.concurrency))
app = FastStream(broker)
state: dict[str, Any] = {}


class MemoryItem(BaseModel):
    """A memory item as pool workers publish it."""

    content: str
    metadata: dict[str, Any] = {}


# declare=False: the queue exists (its arguments are the worker's); only consume from it.
@broker.subscriber(RabbitQueue(config.queue, declare=False))
async def store(item: MemoryItem, message: RabbitMessage) -> None:
    """Store one item; an answer other than stored rejects the message."""
    mcp: McpClient = state["mcp"]
    if not await mcp.store(reflection_arguments(item.content, item.metadata, message.message_id)):
        raise RejectMessage


@app.on_startup
async def open_sink() -> None:
    """One aiohttp session and one MCP session for every handler."""
    http = aiohttp.ClientSession()
    state["mcp"] = mcp = McpClient(http, config.mcp_url)
    await mcp.open()


@app.after_startup
async def ready() -> None:
    """Serve `/readyz` once the subscriber consumes."""
    state["ops"] = await serve_readyz(config.ops_port, lambda: True)


@app.after_shutdown
async def close() -> None:
    """Close the HTTP session and the ops server after the broker stopped."""
    await state["mcp"].http.close()
    ops: web.AppRunner = state["ops"]
    await ops.cleanup()


def main() -> int:
    """Run the app as `faststream run` does: uvloop, SIGTERM/SIGINT stop it gracefully."""
    anyio.run(app.run, backend_options={"loop_factory": uvloop.new_event_loop})
    return 0


if __name__ == "__main__":
    sys.exit(main())
