"""Helpers for integration tests: publish, wait, read queues, run the worker as a process."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import aio_pika
from aio_pika.abc import AbstractIncomingMessage, AbstractRobustConnection

from worker.headers import dead_letter_headers
from worker.publisher import Publisher
from worker.settings import Settings
from worker.settings_env import settings_env
from worker.testing.items import valid_item
from worker.topology import Topology


def item(n: int, pool: str = "pool-1", content: str | None = None) -> dict[str, Any]:
    """A valid memory item."""
    return valid_item(
        content if content is not None else f"memory item {n}",
        pool_id=pool,
        pool_type="mahavishnu",
        worker_id=f"w-{n % 3}",
        timestamp=1_764_000_000.0 + n,
    )


async def publish_items(
    connection: AbstractRobustConnection, settings: Settings, count: int, start: int = 0
) -> list[str]:
    """Declare the topology and publish `count` valid items; returns their keys."""
    topology = Topology.from_settings(settings)
    await topology.declare(connection)
    async with Publisher(connection, topology) as publisher:
        return list(
            await asyncio.gather(
                *(publisher.publish_item(item(n)) for n in range(start, start + count))
            )
        )


async def wait_until(condition: Callable[[], bool], timeout_s: float = 30.0) -> None:
    """Poll until `condition()` holds; fail the test with a clear message otherwise."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout_s} s")
        await asyncio.sleep(0.02)


async def depth(connection: AbstractRobustConnection, queue: str) -> int:
    """Messages ready in a queue (not counting unacked ones)."""
    async with connection.channel() as channel:
        declared = await channel.declare_queue(queue, passive=True)
        return declared.declaration_result.message_count or 0


async def take_all(
    connection: AbstractRobustConnection, queue: str
) -> list[AbstractIncomingMessage]:
    """Remove and return every message in a queue."""
    messages = []
    async with connection.channel() as channel:
        declared = await channel.declare_queue(queue, passive=True)
        while (message := await declared.get(no_ack=True, fail=False)) is not None:
            messages.append(message)
    return messages


def worker_env(settings: Settings, **extra: str) -> dict[str, str]:
    """Environment that makes `memory-worker run` use these settings."""
    env = {**os.environ, **settings_env(settings)}
    # Fixed for every worker a test starts, whatever the test's settings say.
    env["MAHAVISHNU_RABBITMQ__STARTUP_WAIT_S"] = "5"
    env["MAHAVISHNU_WORKER__OPS_PORT"] = "-1"
    env["MAHAVISHNU_WORKER__LOG_FORMAT"] = "json"
    env.update(extra)
    return env


#: Runs `rabbitmqctl -q ARGS` on a broker and returns its output, raising when it fails.
Ctl = Callable[..., Awaitable[str]]


async def installed_rabbitmqctl(*args: str) -> str:
    """The machine's `rabbitmqctl -q ARGS`, for its own broker."""
    process = await asyncio.create_subprocess_exec(
        "rabbitmqctl", "-q", *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await asyncio.wait_for(process.communicate(), 30)
    if process.returncode != 0:
        raise AssertionError(f"rabbitmqctl {' '.join(args)} failed: {err.decode()}")
    return out.decode()


# The broker fixture points this at the session's broker when that is not the machine's own
# (a private node, a container), so every rabbitmqctl a test runs reaches the broker it tests.
_CTL: list[Ctl] = []


@contextlib.contextmanager
def rabbitmqctl_for(ctl: Ctl) -> Iterator[None]:
    """While inside, `rabbitmqctl()` runs on another broker (the session's)."""
    _CTL.append(ctl)
    try:
        yield
    finally:
        _CTL.pop()


def has_rabbitmqctl() -> bool:
    """Whether `rabbitmqctl()` can reach the broker under test."""
    return bool(_CTL) or shutil.which("rabbitmqctl") is not None


async def rabbitmqctl(*args: str) -> str:
    """Run `rabbitmqctl -q ARGS` on the broker under test; fail the test if it fails."""
    return await (_CTL[-1] if _CTL else installed_rabbitmqctl)(*args)


SPAWNED: list[asyncio.subprocess.Process] = []


async def start_worker_process(env: dict[str, str]) -> asyncio.subprocess.Process:
    """Start `python -m worker run` as a separate process; killed at test end if still alive."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "worker",
        "run",
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    SPAWNED.append(process)
    return process


def kill_leftover_workers() -> int:
    """SIGKILL worker processes a failed test left running; returns how many."""
    killed = 0
    while SPAWNED:
        process = SPAWNED.pop()
        if process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                process.kill()
                killed += 1
    return killed


def headers(message: AbstractIncomingMessage) -> dict[str, Any]:
    """A message's headers as a plain dict."""
    return dict(message.headers or {})


async def rejected_dead_letters(
    connection: AbstractRobustConnection, topology: Topology, count: int
) -> list[str]:
    """`count` rejected_by_sink dead letters of valid items (ids m-0, m-1, ...), in order."""
    ids = []
    async with connection.channel(publisher_confirms=True) as channel:
        for n in range(count):
            headers = dead_letter_headers("rejected_by_sink", "w-1", topology.queue)
            body = json.dumps(item(n)).encode()
            message = aio_pika.Message(body, message_id=f"m-{n}", headers=headers)
            await channel.default_exchange.publish(message, topology.dead_letter_queue)
            ids.append(f"m-{n}")
    return ids


async def declared(
    make_settings: Any, connection: AbstractRobustConnection, **sections: Any
) -> tuple[Settings, Topology]:
    """Settings on fresh names (`make_settings`), the topology declared."""
    settings: Settings = make_settings(**sections)
    topology = Topology.from_settings(settings)
    await topology.declare(connection)
    return settings, topology
