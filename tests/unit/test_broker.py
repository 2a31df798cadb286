"""Tests for the broker helpers that need no broker: masking URLs."""

from __future__ import annotations

import pytest

from worker.broker import masked


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
