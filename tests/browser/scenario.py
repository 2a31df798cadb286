"""The console's scene: a worker and the stand-in, items valid and broken, a console on them.

The browser tests and `make console-screenshots` play it: valid items are stored; then the
stand-in rejects everything for a while, so three items are dead-lettered `rejected_by_sink`
(one with a script in its content); broken bodies are dead-lettered by the worker itself.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass

from aio_pika.abc import AbstractRobustConnection
from pydantic import AnyHttpUrl

from tests.integration.helpers import item
from worker.console.server import ConsoleServer
from worker.publisher import Publisher
from worker.service import Service
from worker.settings import Settings
from worker.testing import StandIn
from worker.topology import Topology

#: Content that would run if the console ever put it in a page unescaped.
SCRIPT = '<script>window.__pwned = 1</script><img src="x" onerror="window.__pwned = 2">'
#: Bodies the worker refuses itself, by the reason it gives.
BROKEN = {
    "invalid_json": [b'{"content": "unterminated', b"not json at all"],
    "schema": [b'{"metadata": {"pool_id": "pool-x"}}'],
    "invalid_encoding": [b"\xff\xfe broken bytes"],
}
VALID, REJECTED = 4, 3
BROKEN_COUNT = sum(len(bodies) for bodies in BROKEN.values())


@dataclass
class Scene:
    """What a test drives: the stand-in, the running worker, the console and the settings."""

    settings: Settings
    standin: StandIn
    service: Service
    console: ConsoleServer
    rejected_keys: list[str]


async def until(condition: Callable[[], bool], timeout_s: float = 30.0) -> None:
    """Poll until `condition()` holds; fail with a clear message otherwise."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout_s} s")
        await asyncio.sleep(0.05)


async def _publish(
    connection: AbstractRobustConnection, settings: Settings, standin: StandIn, service: Service
) -> list[str]:
    topology = Topology.from_settings(settings)
    async with Publisher(connection, topology) as publisher:
        for n in range(VALID):
            await publisher.publish_item(item(n, pool="pool-a"))
        await until(lambda: standin.stats.stored == VALID)
        standin.config.reject = 1.0
        keys = []
        for n in range(REJECTED):
            content = SCRIPT if n == 0 else None
            keys.append(await publisher.publish_item(item(100 + n, "pool-b", content)))
        for bodies in BROKEN.values():
            for body in bodies:
                await publisher.publish_raw(body)
    await until(lambda: service.metrics.counts["dead_letter"] == REJECTED + BROKEN_COUNT)
    return keys


@asynccontextmanager
async def scene(
    make_settings: Callable[..., Settings],
    connection: AbstractRobustConnection,
    *,
    read_only: bool = False,
) -> AsyncIterator[Scene]:
    """Play the scene and serve a console on it; everything stops at the end."""
    async with StandIn() as standin:
        settings = make_settings(
            pools={"session_buddy_url": standin.url},
            worker={"ops_port": 0, "ops_host": "127.0.0.1"},
        )
        async with Service(settings) as service:
            keys = await _publish(connection, settings, standin, service)
            settings.console.workers = [AnyHttpUrl(f"http://127.0.0.1:{service.ops_port}")]
            console = ConsoleServer(settings, "127.0.0.1", 0, read_only=read_only, refresh_s=1.0)
            async with console:
                yield Scene(settings, standin, service, console, keys)
