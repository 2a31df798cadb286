"""Tests for the broker helpers that need no broker: masking, several addresses."""

from __future__ import annotations

import pytest

from worker.broker import masked
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
