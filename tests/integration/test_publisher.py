"""The publisher library and `memory-worker publish` against a real RabbitMQ."""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import aio_pika
import pytest
from aio_pika.abc import AbstractRobustConnection
from pydantic import SecretStr

from tests.integration.helpers import (
    depth,
    has_rabbitmqctl,
    item,
    rabbitmqctl,
    take_all,
    worker_env,
)
from worker.broker import BrokerUnavailable
from worker.exitcodes import EXIT_DATAERR, EXIT_FAILED, EXIT_UNAVAILABLE
from worker.keys import item_key
from worker.models import item_from_dict
from worker.publish_sync import BlockingPublisher, publish_items_sync
from worker.publisher import (
    ConnectionLost,
    Publisher,
    PublishResult,
    Refused,
    Unroutable,
    open_publisher,
)
from worker.settings import Settings
from worker.strict_json import DecodeError
from worker.topology import Topology, TopologyError

pytestmark = pytest.mark.integration


async def declared(make_settings: Any, connection: AbstractRobustConnection, **rabbitmq: Any):
    """Settings on fresh names, with the topology declared."""
    settings: Settings = make_settings(rabbitmq=rabbitmq)
    topology = Topology.from_settings(settings)
    await topology.declare(connection)
    return settings, topology


def key_of(data: dict[str, Any]) -> str:
    """The idempotency key the publisher gives an item."""
    return item_key(item_from_dict(data))


async def until(condition: Any, timeout_s: float = 30.0) -> None:
    """Poll an async condition until it holds; fail the test otherwise."""
    deadline = time.monotonic() + timeout_s
    while not await condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout_s} s")
        await asyncio.sleep(0.02)


class Proxy:
    """A loopback TCP proxy to the broker that can hold back the broker's replies, then cut."""

    def __init__(self, host: str, port: int) -> None:
        self._target = (host, port)
        self._flowing = asyncio.Event()
        self._flowing.set()
        self._writers: list[asyncio.StreamWriter] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self._server: asyncio.Server | None = None
        self.port = 0

    async def __aenter__(self) -> Proxy:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.cut()
        assert self._server is not None
        self._server.close()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection(*self._target)
        self._writers += [writer, up_writer]
        for task in (
            asyncio.create_task(self._pump(reader, up_writer, held=False)),
            asyncio.create_task(self._pump(up_reader, writer, held=True)),
        ):
            self._tasks.add(task)

    async def _pump(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, held: bool
    ) -> None:
        while data := await reader.read(65536):
            if held:
                await self._flowing.wait()
            writer.write(data)
            await writer.drain()

    def hold(self) -> None:
        """Stop passing the broker's frames (confirms among them) to the client."""
        self._flowing.clear()

    def cut(self) -> None:
        """Drop every connection at once."""
        for writer in self._writers:
            writer.transport.abort()
        for task in self._tasks:
            task.cancel()


async def test_publish_item_is_persistent_json_with_its_key(make_settings, connection):
    """A published item is persistent application/json; its message id is its idempotency key."""
    _, topology = await declared(make_settings, connection)
    async with Publisher(connection, topology) as publisher:
        key = await publisher.publish_item(item(1))
    [message] = await take_all(connection, topology.queue)
    assert key == key_of(item(1)) == message.message_id
    assert message.delivery_mode == aio_pika.DeliveryMode.PERSISTENT
    assert message.content_type == "application/json"
    assert json.loads(message.body) == item(1)


async def test_invalid_item_is_never_sent(make_settings, connection):
    """An item the worker would reject raises DecodeError and nothing reaches the queue."""
    _, topology = await declared(make_settings, connection)
    async with Publisher(connection, topology, blank_content="dead_letter") as publisher:
        with pytest.raises(DecodeError, match="content is blank"):
            await publisher.publish_item({**item(1), "content": "   "})
        with pytest.raises(DecodeError, match="content"):
            await publisher.publish_item({**item(1), "content": 7})
        with pytest.raises(DecodeError, match="timestamp"):
            bad = {**item(1), "metadata": {**item(1)["metadata"], "timestamp": float("nan")}}
            await publisher.publish_item(bad)
    assert await depth(connection, topology.queue) == 0


async def test_unroutable_publish_is_an_error(make_settings, connection):
    """A publish no queue is bound for raises Unroutable instead of vanishing."""
    _, topology = await declared(make_settings, connection)
    async with Publisher(connection, topology) as publisher:
        with pytest.raises(Unroutable):
            await publisher.publish_raw(b"{}", routing_key="nowhere")
        await publisher.publish_item(item(1))
    assert await depth(connection, topology.queue) == 1


async def test_missing_exchange_is_an_error(make_settings, connection):
    """Opening a publisher on an exchange that does not exist says so, before any publish."""
    settings = make_settings()
    with pytest.raises(TopologyError, match=r"exchange '.*' does not exist: start a worker"):
        async with Publisher(connection, Topology.from_settings(settings)):
            pass


async def test_broker_refusal_is_an_error(make_settings, connection):
    """A nack (a full queue that rejects publishes) raises Refused."""
    _, topology = await declared(make_settings, connection)
    full = f"{topology.queue}.full"
    async with connection.channel() as channel:
        queue = await channel.declare_queue(
            full, arguments={"x-max-length": 1, "x-overflow": "reject-publish"}
        )
        await queue.bind(topology.exchange, full)
        try:
            async with Publisher(connection, topology) as publisher:
                await publisher.publish_raw(b"{}", routing_key=full)
                with pytest.raises(Refused):
                    await publisher.publish_raw(b"{}", routing_key=full)
        finally:
            await channel.queue_delete(full)


async def test_publish_many_bounds_outstanding_confirms(make_settings, connection):
    """publish_many keeps at most N confirms pending and reports every item in input order."""
    _, topology = await declared(make_settings, connection)
    items = [item(n) for n in range(300)]
    items[7] = {"content": "no metadata"}
    in_flight = peak = 0
    async with Publisher(connection, topology) as publisher:
        original = publisher.publish_raw

        async def counting(body: bytes, **kwargs: Any) -> None:
            nonlocal in_flight, peak
            in_flight += 1
            peak = max(peak, in_flight)
            try:
                await original(body, **kwargs)
            finally:
                in_flight -= 1

        publisher.publish_raw = counting  # type: ignore[method-assign]
        batch = await publisher.publish_many(items, max_outstanding=16)
    assert peak == 16
    assert [r.index for r in batch.results] == list(range(300))
    assert batch.published == 299
    [failed] = batch.failures
    assert failed.index == 7 and isinstance(failed.error, DecodeError)
    queued = {m.message_id for m in await take_all(connection, topology.queue)}
    assert queued == {r.message_id for r in batch.results if r.ok}


async def test_connection_cut_mid_batch_reports_every_unconfirmed_item(
    make_settings, connection, amqp_url
):
    """Cut mid-batch: confirmed items are all queued; every other item is reported failed."""
    _, topology = await declared(make_settings, connection)
    broker = urlparse(amqp_url)
    results: list[PublishResult] = []
    first_confirmed = asyncio.Event()
    async with Proxy(broker.hostname or "127.0.0.1", broker.port or 5672) as proxy:
        url = f"amqp://guest:guest@127.0.0.1:{proxy.port}/"
        via_proxy = await aio_pika.connect(url)

        def on_result(result: PublishResult) -> None:
            results.append(result)
            if len(results) == 100:
                first_confirmed.set()

        async def items() -> AsyncIterator[dict[str, Any]]:
            for n in range(100):
                yield item(n)
            await first_confirmed.wait()
            proxy.hold()
            for n in range(100, 200):
                yield item(n)
            # The broker has all 200, but the last 100 confirms are stuck in the proxy.
            await until(lambda: _depth_is(connection, topology.queue, 200))
            proxy.cut()
            for n in range(200, 250):
                yield item(n)

        async with Publisher(via_proxy, topology, confirm_timeout_s=10) as publisher:
            batch = await publisher.publish_many(items(), max_outstanding=150, on_result=on_result)
    assert len(batch.results) == 250
    assert [r.ok for r in batch.results] == [True] * 100 + [False] * 150
    assert all(isinstance(r.error, ConnectionLost) for r in batch.failures)
    queued = {m.message_id for m in await take_all(connection, topology.queue)}
    assert {r.message_id for r in batch.results if r.ok} <= queued


async def _depth_is(connection: AbstractRobustConnection, queue: str, count: int) -> bool:
    return await depth(connection, queue) == count


async def test_broker_closing_the_connection_fails_or_confirms_each_item(make_settings, connection):
    """When the broker closes the publisher's connection, each item is confirmed or failed."""
    if not has_rabbitmqctl():
        # A Docker-only developer has no rabbitmqctl; CI machines always do, so there it fails.
        if os.environ.get("CI"):
            pytest.fail("rabbitmqctl is needed to close the publisher's connection")
        pytest.skip("needs rabbitmqctl for the broker under test")
    settings, topology = await declared(make_settings, connection)
    name = f"memory-worker publisher {settings.worker.id}"
    closed = asyncio.Event()
    async with open_publisher(settings, robust=False) as publisher:
        assert publisher._channel is not None
        publisher._channel.close_callbacks.add(lambda *_: closed.set())

        async def items() -> AsyncIterator[dict[str, Any]]:
            for n in range(50):
                yield item(n)
            await _close_connection(name)
            await closed.wait()
            for n in range(50, 80):
                yield item(n)

        batch = await publisher.publish_many(items(), max_outstanding=10)
    assert len(batch.results) == 80 and batch.published >= 40
    assert all(not r.ok for r in batch.results[50:])
    assert all(isinstance(r.error, ConnectionLost) for r in batch.failures)
    queued = {m.message_id for m in await take_all(connection, topology.queue)}
    assert {r.message_id for r in batch.results if r.ok} <= queued


async def _close_connection(client_name: str) -> None:
    """Close only the broker connection whose client calls itself `client_name`."""
    listing = await rabbitmqctl("list_connections", "pid", "client_properties")
    [line] = [row for row in listing.splitlines() if client_name in row]
    await rabbitmqctl("close_connection", line.split("\t")[0], "test closes it")


async def test_blocking_publisher_works_from_code_that_is_not_async(make_settings, connection):
    """BlockingPublisher and publish_items_sync publish with confirms from plain threads."""
    settings, topology = await declared(make_settings, connection)

    def sync_code() -> tuple[str, int]:
        with BlockingPublisher(settings) as publisher:
            key = publisher.publish_item(item(0))
            batch = publisher.publish_many([item(1), item(2)])
        return key, batch.published + publish_items_sync([item(3)], settings).published

    key, published = await asyncio.to_thread(sync_code)
    assert key == key_of(item(0)) and published == 3
    assert await depth(connection, topology.queue) == 4


async def test_unreachable_broker_is_a_clear_error(make_settings):
    """Opening a publisher on a closed port raises BrokerUnavailable naming host and port."""
    settings = unreachable(make_settings())
    with pytest.raises(BrokerUnavailable, match=r"127\.0\.0\.1:1\b"):
        async with open_publisher(settings):
            pass


def unreachable(settings: Settings) -> Settings:
    """The same settings pointing at a port where no broker listens."""
    url = SecretStr("amqp://guest:guest@127.0.0.1:1/")
    return settings.model_copy(
        update={"rabbitmq": settings.rabbitmq.model_copy(update={"url": url})}
    )


def write_lines(path: Path, lines: list[str]) -> Path:
    """A JSONL file with these lines."""
    path.write_text("".join(line + "\n" for line in lines))
    return path


async def publish_cli(
    settings: Settings, *args: str, stdin: bytes | None = None
) -> tuple[int, str, str]:
    """Run `memory-worker publish`; returns exit code, stdout, stderr."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        *("-m", "worker", "publish", *args),
        env=worker_env(settings),
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await process.communicate(stdin or b"")
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


async def test_cli_publishes_a_valid_file(make_settings, connection, tmp_path):
    """`publish FILE` publishes every line with confirms and exits 0."""
    settings, topology = await declared(make_settings, connection)
    path = write_lines(tmp_path / "items.jsonl", [json.dumps(item(n)) for n in range(25)] + [""])
    code, out, _ = await publish_cli(settings, str(path))
    assert code == 0 and "published 25 of 25 item(s), 0 not confirmed" in out
    queued = [m.message_id for m in await take_all(connection, topology.queue)]
    assert sorted(queued) == sorted(key_of(item(n)) for n in range(25))


async def test_cli_bad_lines_block_the_whole_file(make_settings, connection, tmp_path):
    """Bad lines are reported with line number and reason, and nothing is published."""
    settings, topology = await declared(make_settings, connection)
    lines = [json.dumps(item(0)), '{"content": "cut', json.dumps(item(2)), '{"content": "x"}']
    code, out, err = await publish_cli(settings, str(write_lines(tmp_path / "a.jsonl", lines)))
    assert code == EXIT_DATAERR and out == ""
    assert "line 2: invalid_json" in err and "line 4: schema: metadata" in err
    assert "nothing published: 2 invalid line(s)" in err
    assert await depth(connection, topology.queue) == 0


async def test_cli_skip_invalid_publishes_the_valid_lines(make_settings, connection):
    """With --skip-invalid and items on stdin, the valid lines are published and counted."""
    settings, topology = await declared(make_settings, connection)
    stdin = "\n".join([json.dumps(item(0)), "NaN", json.dumps(item(1))]).encode()
    code, out, err = await publish_cli(settings, "--skip-invalid", stdin=stdin)
    assert code == 0 and "line 2: invalid_json" in err
    assert "published 2 of 2 item(s), 0 not confirmed, 1 invalid line(s) skipped" in out
    assert await depth(connection, topology.queue) == 2


async def test_cli_exit_code_says_not_everything_was_confirmed(make_settings, connection):
    """With no route to the work queue, publish reports each item and exits 1."""
    settings, topology = await declared(make_settings, connection)
    async with connection.channel() as channel:
        queue = await channel.get_queue(topology.queue, ensure=False)
        await queue.unbind(topology.exchange, topology.queue)
    stdin = "\n".join(json.dumps(item(n)) for n in range(3)).encode()
    code, out, err = await publish_cli(settings, stdin=stdin)
    assert code == EXIT_FAILED and "published 0 of 3 item(s), 3 not confirmed" in out
    assert "line 3: not confirmed: no queue bound" in err


async def test_cli_without_a_broker_exits_69(make_settings):
    """No broker answering: exit 69 with the address in the message."""
    settings = unreachable(make_settings())
    code, _, err = await publish_cli(settings, stdin=json.dumps(item(0)).encode())
    assert code == EXIT_UNAVAILABLE and "127.0.0.1:1" in err
