"""Tests for the broker helpers that need no broker: masking, several addresses, failover."""

from __future__ import annotations

import asyncio
import socket
from types import SimpleNamespace
from typing import Any

import pytest
from aiormq.exceptions import AMQPConnectionError
from structlog.testing import capture_logs

from worker import broker
from worker.broker import BrokerUnavailable, FailoverConnection, connect, masked
from worker.settings import SettingsError, load_settings

NODES = ("amqp://u:s3cret@node1:5672/", "amqp://u:s3cret@node2:5672/", "amqp://u:s3cret@node3/")


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("amqp://guest:guest@127.0.0.1:5672/", "amqp://guest:***@127.0.0.1:5672/"),
        ("amqp://g:p%40ss@mq/%2f", "amqp://g:***@mq/%2f"),
        ("redis://:secret@cache:6379/0", "redis://:***@cache:6379/0"),
        ("redis://cache:6379/0?password=secret&db=1", "redis://cache:6379/0?password=***&db=1"),
        ("http://m:pw@mq:15672", "http://m:***@mq:15672"),
        ("amqp://user@mq/vhost", "amqp://user@mq/vhost"),
        ("amqp://mq:5672/odd@vhost", "amqp://mq:5672/odd@vhost"),
        ("unix:///run/redis.sock", "unix:///run/redis.sock"),
        ("amqp://a:x@n1/,amqp://b:y@n2:5673/", "amqp://a:***@n1/,amqp://b:***@n2:5673/"),
        ("redis://:pa,ss@cache:6379/0", "redis://:***@cache:6379/0"),
    ],
)
def test_masked_hides_any_password_and_keeps_the_rest(url: str, shown: str) -> None:
    """A password in the userinfo or a `password=` query becomes `***`; nothing else changes."""
    assert masked(url) == shown


def test_several_addresses_are_read_in_order_from_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """MAHAVISHNU_RABBITMQ__URL with comma-separated nodes gives them in order, blanks trimmed."""
    monkeypatch.setenv("MAHAVISHNU_RABBITMQ__URL", f"{NODES[0]}, {NODES[1]} ,{NODES[2]}")
    assert load_settings().rabbitmq.urls == NODES


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        (f"{NODES[0]},http://u:s3cret@node2/", "address 2 of 2 (node2) must start with amqp://"),
        (f"{NODES[0]},,{NODES[1]}", "address 2 of 3 is empty"),
        (f"{NODES[0]},amqp://u:s3cret@node2:56x2/", "address 2 of 2 has an invalid host or port"),
        (f"{NODES[0]},amqp:///", "address 2 of 2 names no host"),
        (f"{NODES[0]},amqp://u:s3cret@node2/other", "address 2 of 2 (node2) names vhost 'other'"),
    ],
)
def test_a_bad_address_is_named_by_its_position_and_source(
    monkeypatch: pytest.MonkeyPatch, value: str, problem: str
) -> None:
    """An invalid address of several names its position and the variable; no password shown."""
    monkeypatch.setenv("MAHAVISHNU_RABBITMQ__URL", value)
    with pytest.raises(SettingsError) as caught:
        load_settings()
    text = str(caught.value)
    assert "rabbitmq.url" in text and "env MAHAVISHNU_RABBITMQ__URL" in text
    assert problem in text
    assert "s3cret" not in text


def _settings(*urls: str) -> Any:
    return load_settings({"rabbitmq": {"url": ",".join(urls)}, "worker": {"id": "w1"}})


async def test_connect_tries_addresses_in_order_and_logs_one_failover(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The first address down: the second is opened, with one masked `broker_failover` line."""
    tried: list[int] = []
    opened = object()

    async def attempt(urls: Any, index: int, *args: Any) -> object:
        tried.append(index)
        if index == 0:
            raise ConnectionRefusedError("node1 is down")
        return opened

    monkeypatch.setattr(broker, "_open", attempt)
    with capture_logs() as logs:
        assert await connect(_settings(*NODES)) is opened
    assert tried == [0, 1]
    [line] = [e for e in logs if e["event"] == "broker_failover"]
    assert line["url"] == "amqp://u:***@node2:5672/"
    assert line["previous"] == "amqp://u:***@node1:5672/"
    assert "node1 is down" in line["error"]
    assert "s3cret" not in repr(logs)


async def test_no_address_answering_names_each_one_masked(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every address down: BrokerUnavailable says why each failed, passwords masked."""

    async def attempt(urls: Any, index: int, *args: Any) -> object:
        raise ConnectionRefusedError(f"node{index + 1} is down")

    monkeypatch.setattr(broker, "_open", attempt)
    with pytest.raises(BrokerUnavailable) as caught:
        await connect(_settings(*NODES[:2]), robust=False)
    assert [url for url, _ in caught.value.failures] == list(NODES[:2])
    text = str(caught.value)
    assert "amqp://u:***@node1:5672/: node1 is down" in text
    assert "amqp://u:***@node2:5672/: node2 is down" in text
    assert "s3cret" not in text


def _failed(error: BaseException) -> asyncio.Future[Any]:
    future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
    future.set_exception(error)
    return future


async def test_a_lost_node_moves_the_connection_to_the_next_address_round_robin() -> None:
    """Each close or failed attempt moves to the next address, wrapping to the first."""
    connection = FailoverConnection(NODES, 1)
    seen = [connection.node]
    for _ in range(3):
        await connection._on_connection_close(_failed(ConnectionResetError("gone")))
        seen.append(connection.node)
    assert seen == [
        "amqp://u:***@node2:5672/",
        "amqp://u:***@node3/",
        "amqp://u:***@node1:5672/",
        "amqp://u:***@node2:5672/",
    ]
    await connection.close()
    await connection._on_connection_close(_failed(ConnectionResetError("closed by us")))
    assert connection.node == "amqp://u:***@node2:5672/"  # a close of ours moves nothing


async def test_one_failover_line_when_the_connection_comes_up_on_another_node() -> None:
    """Back on another node: one `broker_failover` line and a count; on the same node: none."""
    connection = FailoverConnection(NODES, 0)
    connection.transport = SimpleNamespace()  # what _on_connected checks is there
    with capture_logs() as logs:
        await connection._on_connected()
        assert connection.up
        await connection._on_connection_close(_failed(ConnectionResetError("node1 died")))
        assert not connection.up
        await connection._on_connected()
        await connection._on_connection_close(_failed(ConnectionResetError("blip")))
        await connection._on_connection_close(_failed(ConnectionResetError("node3 down")))
        await connection._on_connection_close(_failed(ConnectionResetError("node1 down")))
        await connection._on_connected()  # node2 again: a reconnect, not a failover
    lines = [e for e in logs if e["event"] == "broker_failover"]
    assert [(e["previous"], e["url"]) for e in lines] == [
        ("amqp://u:***@node1:5672/", "amqp://u:***@node2:5672/")
    ]
    assert "node1 died" in lines[0]["error"]
    assert connection.failovers == 1 and connection.up
    connection.transport = None
    await connection.close()


@pytest.mark.parametrize(
    ("error", "why"),
    [
        (AMQPConnectionError(111, "Connect call failed ('127.0.0.1', 5699)"), "connection refused"),
        (ConnectionRefusedError(111, "Connection refused"), "connection refused"),
        (AMQPConnectionError(-2, "Name or service not known"), "host not found"),
        (socket.gaierror(-3, "Temporary failure in name resolution"), "host not found"),
        (AMQPConnectionError(113, "No route to host"), "No route to host"),
        (TimeoutError(), "no answer in time"),
        (AMQPConnectionError("Server connection unexpectedly closed"), "Server connection"),
    ],
)
def test_no_broker_says_why_in_words(error: BaseException, why: str) -> None:
    """The message `run` and the tools end with names the cause, not aiormq's repr."""
    text = str(BrokerUnavailable("amqp://u:s3cret@mq:5672/", error))
    assert text.startswith(f"no broker at amqp://u:***@mq:5672/: {why}")
    assert "<" not in text and "Errno" not in text
