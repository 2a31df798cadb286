"""The console's actions against a real RabbitMQ: the breaker pause, the re-read after."""

from __future__ import annotations

import asyncio
from collections import Counter

import pytest

from tests.integration.helpers import declared, depth, rejected_dead_letters, wait_until
from worker.console.jobs import Jobs, Selection
from worker.console.snapshot import DeadLetters

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
    async with Jobs(connection, topology, letters, lambda: False) as jobs:
        job = jobs.start("purge", chosen, "test", None)
        await wait_until(lambda: job.finished)
    assert (job.state, job.done) == ("done", 1)
    assert len(letters.letters()) == 3 and letters.find(first.fingerprint) is None
