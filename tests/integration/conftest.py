"""Fixtures for integration tests: a real RabbitMQ broker and per-test names."""

from __future__ import annotations

import asyncio
import os
import socket
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any
from urllib.parse import urlparse

import aio_pika
import pytest
from redis.asyncio import Redis

from tests.faults.broker_node import BrokerNode, BrokerNodeError, find_install, selected_version
from tests.integration.helpers import Ctl, kill_leftover_workers, rabbitmqctl_for
from worker.settings import Settings, load_settings
from worker.topology import Topology

URL_ENV = "MEMORY_WORKER_TEST_AMQP_URL"
LOCAL_URL = "amqp://guest:guest@127.0.0.1:5672/"
#: The testcontainers image per $MEMORY_WORKER_TEST_RABBITMQ ("" when it is unset).
IMAGES = {"": "rabbitmq:3.13-management", "4.3": "rabbitmq:4.3-management"}
MANAGEMENT_URL_ENV = "MEMORY_WORKER_TEST_MANAGEMENT_URL"
#: The management API of the session's broker, when the session started one that has it.
_MANAGEMENT_URLS: list[str] = []
REDIS_URL_ENV = "MEMORY_WORKER_TEST_REDIS_URL"
LOCAL_REDIS_URL = "redis://127.0.0.1:6379/0"


def _answers(url: str) -> bool:
    parsed = urlparse(url)
    try:
        with socket.create_connection((parsed.hostname or "127.0.0.1", parsed.port or 5672), 1):
            return True
    except OSError:
        return False


def _docker_answers() -> bool:
    try:
        import docker  # noqa: PLC0415 - optional: only where a Docker engine may answer

        docker.from_env(timeout=2).ping()
        return True
    except Exception:
        return False


@pytest.fixture(scope="session")
def amqp_url() -> Iterator[str]:
    """A broker: $MEMORY_WORKER_TEST_AMQP_URL, else a testcontainer, else localhost:5672.

    With $MEMORY_WORKER_TEST_RABBITMQ=4.3 the testcontainer runs 4.3, and without Docker the
    session starts a private 4.3 node (tests/rabbitmq4/prepare.sh must have prepared it)
    instead of using the machine's broker.
    """
    explicit = os.environ.get(URL_ENV)
    if explicit:
        yield explicit
        return
    try:
        version = selected_version()
    except BrokerNodeError as exc:
        pytest.fail(str(exc))
    if _docker_answers():
        from testcontainers.rabbitmq import RabbitMqContainer  # noqa: PLC0415 - optional, as docker

        with RabbitMqContainer(IMAGES[version]) as container, rabbitmqctl_for(_exec(container)):
            host, port = container.get_container_host_ip(), container.get_exposed_port(5672)
            yield f"amqp://guest:guest@{host}:{port}/"
        return
    if version:
        try:
            install = find_install(version)
        except BrokerNodeError as exc:  # asked for explicitly, so never skipped
            pytest.fail(str(exc))
        with BrokerNode(management=True, install=install) as node, rabbitmqctl_for(node.ctl):
            _MANAGEMENT_URLS.append(node.management_url)
            yield node.amqp_url
        return
    if _answers(LOCAL_URL):
        yield LOCAL_URL
        return
    message = f"no RabbitMQ: set {URL_ENV}, start Docker, or run one on 127.0.0.1:5672"
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


@pytest.fixture(scope="session")
def management_url(amqp_url: str) -> str:
    """The session broker's management API: $MEMORY_WORKER_TEST_MANAGEMENT_URL, else the
    private node's; skipped otherwise (the machine's broker runs without the plugin)."""
    url = session_management_url()
    if url is None:
        pytest.skip(f"the broker has no management API here: set {MANAGEMENT_URL_ENV}")
    return url


def session_management_url() -> str | None:
    """The management API of the session's broker, once `amqp_url` has started it, else None."""
    return os.environ.get(MANAGEMENT_URL_ENV) or next(iter(_MANAGEMENT_URLS), None)


def broker_with_management(amqp_url: str, apis: list[str], purpose: str) -> Iterator[str]:
    """Body of a module's `amqp_url`: the session's broker where it has a management API, else
    a private 4.3 node with one (the machine's broker has none); its API URL is on `apis`
    meanwhile. Without 4.3 prepared: skipped locally, failed in CI or when 4.3 was asked for."""
    if (api := session_management_url()) is not None:
        apis.append(api)
        yield amqp_url
        apis.remove(api)
        return
    from tests.faults.broker_node import (  # noqa: PLC0415 - only these modules start a node
        BrokerNode,
        BrokerNodeError,
        find_install,
        selected_version,
    )
    from tests.integration.helpers import rabbitmqctl_for  # noqa: PLC0415

    try:
        install = find_install("4.3")
    except BrokerNodeError as exc:
        message = f"{exc}: {purpose} start a private node"
        if os.environ.get("CI") or selected_version():
            pytest.fail(message)
        pytest.skip(message)
    with BrokerNode(management=True, install=install) as node, rabbitmqctl_for(node.ctl):
        apis.append(node.management_url)
        yield node.amqp_url
        apis.remove(node.management_url)


def _exec(container: Any) -> Ctl:
    """`rabbitmqctl -q ARGS` run inside a testcontainer."""

    async def ctl(*args: str) -> str:
        result = await asyncio.to_thread(container.exec, ["rabbitmqctl", "-q", *args])
        output = result.output.decode(errors="replace")
        if result.exit_code != 0:
            raise AssertionError(f"rabbitmqctl {' '.join(args)} failed: {output}")
        return output

    return ctl


@pytest.fixture(autouse=True)
def no_leftover_workers() -> Iterator[None]:
    """A worker process a failing test left behind is killed, not left consuming."""
    yield
    kill_leftover_workers()


@pytest.fixture
def make_settings(amqp_url: str) -> Iterator[Any]:
    """Build Settings on unique per-test names; their queues are deleted at teardown."""
    prefix = f"t-{uuid.uuid4().hex[:10]}"
    made: list[Settings] = []

    def build(**sections: dict[str, Any]) -> Settings:
        base: dict[str, dict[str, Any]] = {
            # A fixed limit, so tests can count in-flight stores; adaptation's own tests and
            # the outage test turn it back on.
            "pools": {"adaptive_concurrency": False},
            "rabbitmq": {
                "url": amqp_url,
                "exchange": prefix,
                "queue": f"{prefix}.items",
                "dead_letter_queue": f"{prefix}.items.dlq",
                "startup_wait_s": 5,
            },
            "retry": {"tiers_s": [0.2, 0.5], "base_s": 0.1, "cap_s": 0.5},
            "worker": {"ops_port": -1, "grace_s": 5, "log_format": "json"},
        }
        for name, values in sections.items():
            base.setdefault(name, {}).update(values)
        settings = load_settings(base)
        made.append(settings)
        return settings

    yield build
    # A worker a failing test left behind would redeclare what is deleted next.
    kill_leftover_workers()
    if made:
        asyncio.run(_delete(amqp_url, made[0]))


async def _delete(amqp_url: str, settings: Settings) -> None:
    # On the fixture's broker: a test's rabbitmq.url may list other nodes, or a dead one first.
    connection = await aio_pika.connect(amqp_url)
    async with connection:
        await Topology.from_settings(settings).delete(connection)


@pytest.fixture
async def connection(amqp_url: str) -> AsyncIterator[aio_pika.abc.AbstractRobustConnection]:
    """A plain connection for publishing and inspecting queues in tests."""
    conn = await aio_pika.connect_robust(amqp_url)
    async with conn:
        yield conn


@pytest.fixture(scope="session")
def redis_url() -> str:
    """Redis for the shared ledger: $MEMORY_WORKER_TEST_REDIS_URL, else 127.0.0.1:6379."""
    url = os.environ.get(REDIS_URL_ENV, LOCAL_REDIS_URL)
    if not _answers(url):
        message = f"no Redis at {url}: set {REDIS_URL_ENV} or run one on 127.0.0.1:6379"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return url


@pytest.fixture
async def ledger_prefix(redis_url: str) -> AsyncIterator[str]:
    """A key prefix of this test's own; its keys are deleted at teardown."""
    prefix = f"mw-test-{uuid.uuid4().hex[:10]}:"
    yield prefix
    async with Redis.from_url(redis_url) as client:
        keys = [key async for key in client.scan_iter(match=f"{prefix}*")]
        if keys:
            await client.delete(*keys)
