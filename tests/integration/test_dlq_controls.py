"""Replay's controls against a real RabbitMQ: only the copies shown, a gate, returns."""

from __future__ import annotations

from collections import Counter

import pytest

from tests.integration.helpers import declared, depth, rejected_dead_letters
from worker import dlq, dlq_edit
from worker.dlq_model import Filter
from worker.service import Service
from worker.testing import StandIn, StandInConfig

pytestmark = pytest.mark.integration


async def test_replay_takes_only_the_copies_shown(make_settings, connection):
    """With `only`, a replay takes exactly those fingerprints and leaves the rest in order."""
    _, topology = await declared(make_settings, connection)
    await rejected_dead_letters(connection, topology, 5)
    shown = await dlq.read(connection, topology.dead_letter_queue)
    only = Counter(d.fingerprint for d in shown.letters[1:3])
    report = await dlq_edit.replay(connection, topology, Filter(), only=only)
    assert report.replayed == 2 and report.missing == 0
    left = await dlq.read(connection, topology.dead_letter_queue)
    assert [d.position for d in left.letters] == [0, 1, 2]
    assert [d.fingerprint for d in left.letters] == [
        shown.letters[0].fingerprint,
        *(d.fingerprint for d in shown.letters[3:]),
    ]


async def test_gate_stops_a_replay_between_messages(make_settings, connection):
    """A gate that says stop ends the replay before the next message; the rest stay."""
    _, topology = await declared(make_settings, connection)
    await rejected_dead_letters(connection, topology, 6)
    calls = 0

    async def gate() -> str | None:
        nonlocal calls
        calls += 1
        return "cancelled" if calls > 2 else None

    report = await dlq_edit.replay(connection, topology, Filter(), gate=gate)
    assert (report.replayed, report.error) == (2, "cancelled")
    assert await depth(connection, topology.dead_letter_queue) == 4


async def test_replay_stops_when_what_it_replayed_comes_back(make_settings, connection):
    """Replaying items the sink still refuses stops at the first return, not after all."""
    async with StandIn(StandInConfig(reject=1.0)) as sb:
        settings, topology = await declared(
            make_settings, connection, pools={"session_buddy_url": sb.url}
        )
        await rejected_dead_letters(connection, topology, 40)
        shown = await dlq.read(connection, topology.dead_letter_queue)
        only = Counter(d.fingerprint for d in shown.letters)
        async with Service(settings):
            report = await dlq_edit.replay(
                connection, topology, Filter(), rate_per_s=20, stop_on_return=True, only=only
            )
    assert report.returned >= 1 and "came back" in (report.error or "")
    # The ones it never reached are still there, not "no longer in the DLQ".
    assert report.replayed < 40 and report.missing == 0
