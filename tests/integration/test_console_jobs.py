"""The console against a real RabbitMQ: its actions, their log line, how workers are found."""

from __future__ import annotations

import asyncio
import os
from collections import Counter

import pytest
from structlog.testing import capture_logs

from tests.integration.helpers import (
    declared,
    depth,
    has_rabbitmqctl,
    rabbitmqctl,
    rejected_dead_letters,
    wait_until,
)
from worker.broker import OPS_URL_PROPERTY
from worker.console.jobs import Jobs, Selection
from worker.console.snapshot import DeadLetters
from worker.service import Service
from worker.testing import StandIn

pytestmark = pytest.mark.integration


async def test_console_replay_pauses_while_a_breaker_is_open(make_settings, connection):
    """A console replay waits while a watched worker's breaker is open, then finishes."""
    _, topology = await declared(make_settings, connection)
    await rejected_dead_letters(connection, topology, 3)
    breaker = {"open": True}
    letters = DeadLetters(connection, topology.dead_letter_queue)
    await letters.read()
    chosen = Selection(
        "group", Counter(d.fingerprint for d in letters.letters()), "rejected_by_sink"
    )
    async with Jobs(connection, topology, letters, lambda: breaker["open"]) as jobs:
        job = jobs.start("replay", chosen, "test", None)
        await wait_until(lambda: job.state == "paused")
        await asyncio.sleep(0.3)
        assert job.done == 0
        breaker["open"] = False
        await wait_until(lambda: job.finished)
    assert (job.state, job.done) == ("done", 3)
    assert await depth(connection, topology.queue) == 3
    assert letters.letters() == []


async def test_console_purge_removes_the_selection_and_rereads(make_settings, connection):
    """A console purge of a selection removes exactly it; the snapshot is read again."""
    _, topology = await declared(make_settings, connection)
    await rejected_dead_letters(connection, topology, 4)
    letters = DeadLetters(connection, topology.dead_letter_queue)
    await letters.read()
    first = letters.letters()[0]
    chosen = Selection("one", Counter({first.fingerprint: 1}))
    with capture_logs() as logs:
        async with Jobs(connection, topology, letters, lambda: False) as jobs:
            job = jobs.start("purge", chosen, "operator", None)
            await wait_until(lambda: job.finished)
    assert (job.state, job.done) == ("done", 1)
    (line,) = [entry for entry in logs if entry["event"] == "console_action"]
    assert (line["action"], line["who"], line["selected"], line["done"]) == (
        "purge",
        "operator",
        1,
        1,
    )
    assert line["result"] == "done"
    assert len(letters.letters()) == 3 and letters.find(first.fingerprint) is None


async def test_console_replay_can_be_cancelled(make_settings, connection):
    """Cancel stops a paced replay before its next message; the rest stay in the DLQ."""
    _, topology = await declared(make_settings, connection)
    await rejected_dead_letters(connection, topology, 6)
    letters = DeadLetters(connection, topology.dead_letter_queue)
    await letters.read()
    chosen = Selection(
        "group", Counter(d.fingerprint for d in letters.letters()), "rejected_by_sink"
    )
    async with Jobs(connection, topology, letters, lambda: False) as jobs:
        job = jobs.start("replay", chosen, "test", 4.0)
        await wait_until(lambda: job.done >= 1)
        job.cancel_requested = True
        await wait_until(lambda: job.finished)
    assert job.state == "cancelled" and 1 <= job.done < 6
    assert await depth(connection, topology.dead_letter_queue) == 6 - job.done
    assert len(letters.letters()) == 6 - job.done


async def test_worker_advertises_its_ops_url_to_the_broker(make_settings, connection):
    """A running worker's connection carries its ops URL in its client properties."""
    if not has_rabbitmqctl():
        if os.environ.get("CI"):
            pytest.fail("rabbitmqctl is needed to list the connections' client properties")
        pytest.skip("needs rabbitmqctl for the broker under test")
    async with StandIn() as sb:
        settings = make_settings(
            pools={"session_buddy_url": sb.url}, worker={"ops_port": 0, "ops_host": "127.0.0.1"}
        )
        async with Service(settings) as service:
            listed = await rabbitmqctl("list_connections", "client_properties")
    assert OPS_URL_PROPERTY in listed
    assert f"http://127.0.0.1:{service.ops_port}" in listed
