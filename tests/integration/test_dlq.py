"""The dlq tools against a real RabbitMQ: reading leaves the queue as it was; replay and purge."""

from __future__ import annotations

import asyncio
import json
import signal
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any

import aio_pika
import pytest
from aio_pika.abc import AbstractRobustConnection

from tests.integration.helpers import depth, item, publish_items, take_all, worker_env
from worker import dlq, dlq_edit, dlq_model
from worker.cli import dlq_change
from worker.exitcodes import EXIT_FAILED, EXIT_USAGE
from worker.headers import (
    H_ATTEMPTS,
    H_DETAIL,
    H_FIRST_FAILURE_MS,
    H_LAST_FAILURE_MS,
    H_QUEUE,
    H_REASON,
    H_REPLAYED,
    H_WORKER,
)
from worker.models import idempotency_key
from worker.outcome import Reason
from worker.service import Service
from worker.settings import Settings
from worker.testing import StandIn, StandInConfig
from worker.topology import Topology

pytestmark = pytest.mark.integration

REASONS = ("schema", "rejected_by_sink", "retries_exhausted")
QUEUE_TYPES = pytest.mark.parametrize("queue_type", ["quorum", "classic"])


async def declared(make_settings: Any, connection: AbstractRobustConnection, queue_type: str):
    """Settings on fresh names, with the topology declared."""
    settings: Settings = make_settings(rabbitmq={"queue_type": queue_type})
    topology = Topology.from_settings(settings)
    await topology.declare(connection)
    return settings, topology


async def add_dead_letters(
    connection: AbstractRobustConnection, topology: Topology, count: int, start: int = 0
) -> list[str]:
    """Dead letters as the worker writes them: reason, pool and age cycle with n."""
    now_ms = round(time.time() * 1000)
    ids = []
    async with connection.channel(publisher_confirms=True) as channel:
        dlx = await channel.get_exchange(topology.dead_letter_exchange)
        for n in range(start, start + count):
            body = json.dumps(item(n, pool=f"pool-{n % 2}")).encode()
            key = idempotency_key(None, body)
            last_ms = now_ms - (n % 3) * 3_600_000
            headers = {
                "x-origin": "test",
                H_REASON: REASONS[n % 3],
                H_DETAIL: f"failure number {n}",
                H_ATTEMPTS: 1 + n % 4,
                H_FIRST_FAILURE_MS: last_ms - 5000,
                H_LAST_FAILURE_MS: last_ms,
                H_WORKER: "worker-a",
                H_QUEUE: topology.queue,
            }
            message = aio_pika.Message(
                body,
                message_id=key,
                content_type="application/json",
                headers=headers,
                delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            )
            await dlx.publish(message, topology.dead_letter_queue)
            ids.append(key)
    return ids


async def ids_in(connection: AbstractRobustConnection, queue: str) -> list[str]:
    """Remove everything from a queue and return the message ids, in queue order."""
    return [str(m.message_id) for m in await take_all(connection, queue)]


async def until(condition: Callable[[], Awaitable[bool]], timeout_s: float = 30.0) -> None:
    """Poll an async condition until it holds; fail the test otherwise."""
    deadline = time.monotonic() + timeout_s
    while not await condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout_s} s")
        await asyncio.sleep(0.05)


async def cli(settings: Settings, *args: str) -> tuple[int, str, str]:
    """Run `memory-worker` with these settings; returns exit code, stdout, stderr."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "worker",
        *args,
        env=worker_env(settings, COLUMNS="200"),
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await process.communicate()
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


@QUEUE_TYPES
async def test_read_keeps_every_message_in_order(make_settings, connection, queue_type):
    """Two reads see every dead letter in queue order and leave the queue exactly as it was."""
    _, topology = await declared(make_settings, connection, queue_type)
    ids = await add_dead_letters(connection, topology, 40)
    for _ in range(2):
        snapshot = await dlq.read(connection, topology.dead_letter_queue)
        assert [d.id for d in snapshot.letters] == ids
        assert [d.position for d in snapshot.letters] == list(range(40))
        assert snapshot.complete and snapshot.consumers == 0
    assert await ids_in(connection, topology.dead_letter_queue) == ids


@QUEUE_TYPES
async def test_read_killed_midway_loses_nothing(make_settings, connection, queue_type):
    """A reader killed while holding every dead letter gives them all back, in order."""
    settings, topology = await declared(make_settings, connection, queue_type)
    ids = await add_dead_letters(connection, topology, 30)
    script = (
        "import asyncio, sys, aio_pika\n"
        "from worker.dlq import DlqSession\n"
        "async def main():\n"
        "    connection = await aio_pika.connect(sys.argv[1])\n"
        "    async with DlqSession(connection, sys.argv[2]) as session:\n"
        "        print(len([held async for held in session]), flush=True)\n"
        "        await asyncio.sleep(3600)\n"
        "asyncio.run(main())\n"
    )
    url = settings.rabbitmq.url.get_secret_value()
    reader = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        script,
        url,
        topology.dead_letter_queue,
        stdout=asyncio.subprocess.PIPE,
    )
    assert reader.stdout is not None
    assert (await reader.stdout.readline()).strip() == b"30"
    assert await depth(connection, topology.dead_letter_queue) == 0
    reader.send_signal(signal.SIGKILL)
    await reader.wait()
    await until(lambda: _has(connection, topology.dead_letter_queue, 30))
    assert await ids_in(connection, topology.dead_letter_queue) == ids


async def _has(connection: AbstractRobustConnection, queue: str, count: int) -> bool:
    return await depth(connection, queue) >= count


async def test_read_reports_another_consumer_and_shows_what_it_leaves(make_settings, connection):
    """With another consumer holding some dead letters, a read sees the rest and says so."""
    _, topology = await declared(make_settings, connection, "classic")
    ids = await add_dead_letters(connection, topology, 20)
    taken: list[str] = []

    async def hold(message: aio_pika.abc.AbstractIncomingMessage) -> None:
        taken.append(str(message.message_id))

    async with connection.channel() as other:
        await other.set_qos(prefetch_count=5)
        queue = await other.get_queue(topology.dead_letter_queue, ensure=False)
        await queue.consume(hold)
        await until(lambda: _true(len(taken) == 5))
        snapshot = await dlq.read(connection, topology.dead_letter_queue, idle_s=0.5)
    assert snapshot.consumers == 1
    assert [d.id for d in snapshot.letters] == ids[5:]
    assert snapshot.depth == 15
    await until(lambda: _has(connection, topology.dead_letter_queue, 20))
    assert await ids_in(connection, topology.dead_letter_queue) == ids


async def _true(value: bool) -> bool:
    return value


async def test_worker_dead_letters_parse_and_replay_into_the_store(make_settings, connection):
    """Worker-written dead letters show reason, detail, attempts, worker; replayed, they store."""
    async with StandIn(StandInConfig(reject=1.0)) as sb:
        settings = make_settings(pools={"session_buddy_url": sb.url})
        keys = await publish_items(connection, settings, 5)
        async with Service(settings) as service:
            await until(lambda: _true(service.metrics.counts["dead_letter"] == 5))
        snapshot = await dlq.read(connection, settings.rabbitmq.dead_letter_queue)
        assert sorted(d.id for d in snapshot.letters) == sorted(keys)
        for letter in snapshot.letters:
            assert letter.reason == Reason.REJECTED_BY_SINK
            assert "Memory guard blocked write" in letter.detail
            assert letter.attempts == 1 and letter.worker == settings.worker.id
            assert letter.pool == "pool-1" and letter.last_failure_ms is not None
        sb.config.reject = 0.0
        topology = Topology.from_settings(settings)
        report = await dlq_edit.replay(connection, topology, dlq_model.Filter())
        assert report.replayed == 5 and report.error is None
        async with Service(settings):
            await until(lambda: _true(sb.stats.distinct_keys == 5))
    assert {row["source_session_id"] for row in sb.items} == set(keys)
    assert await depth(connection, settings.rabbitmq.dead_letter_queue) == 0


async def test_broker_dead_letter_shows_its_x_death_reason(make_settings, connection):
    """A message the quorum queue dead-lettered at its delivery limit reads as delivery_limit."""
    settings = make_settings(rabbitmq={"delivery_limit": 1})
    topology = Topology.from_settings(settings)
    [key] = await publish_items(connection, settings, 1)
    async with connection.channel() as channel:
        queue = await channel.get_queue(topology.queue, ensure=False)
        got: list[aio_pika.abc.AbstractIncomingMessage] = []
        for attempt in range(2):
            await until(lambda: _got(queue, got))
            # A reject counts toward the limit on every version; a nack no longer does on 4.3.
            await got[attempt].reject(requeue=True)
    await until(lambda: _has(connection, topology.dead_letter_queue, 1))
    [letter] = (await dlq.read(connection, topology.dead_letter_queue)).letters
    assert (letter.id, letter.reason, letter.source_queue) == (
        key,
        "delivery_limit",
        topology.queue,
    )
    assert letter.attempts is None and letter.last_failure_ms is not None


async def _got(queue: aio_pika.abc.AbstractQueue, into: list[Any]) -> bool:
    message = await queue.get(fail=False)
    if message is not None:
        into.append(message)
    return message is not None


async def test_cli_stats_counts_reasons_pools_and_times(make_settings, connection):
    """`dlq stats --json` gives depth, the reason histogram, failure times and pools."""
    settings, topology = await declared(make_settings, connection, "quorum")
    ids = await add_dead_letters(connection, topology, 12)
    code, out, _ = await cli(settings, "dlq", "stats", "--json")
    assert code == 0
    stats = json.loads(out)
    assert stats["depth"] == stats["seen"] == 12
    assert stats["reasons"] == {reason: 4 for reason in REASONS}
    assert stats["oldest_failure"] < stats["newest_failure"]
    assert {p["pool"]: p["count"] for p in stats["pools"]} == {"pool-0": 6, "pool-1": 6}
    code, out, _ = await cli(settings, "dlq", "stats")
    assert code == 0 and "rejected_by_sink" in out and "pool-0" in out
    assert await ids_in(connection, topology.dead_letter_queue) == ids


async def test_cli_list_filters_by_reason_pool_age_and_text(make_settings, connection):
    """`dlq list` filters by reason, pool, age and text, and removes nothing."""
    settings, topology = await declared(make_settings, connection, "quorum")
    ids = await add_dead_letters(connection, topology, 12)

    async def listed(*filters: str) -> list[int]:
        code, out, _ = await cli(settings, "dlq", "list", "--json", *filters)
        assert code == 0
        return [json.loads(line)["position"] for line in out.splitlines()]

    assert await listed() == list(range(12))
    assert await listed("--reason", "schema") == [0, 3, 6, 9]
    assert await listed("--reason", "schema", "--pool", "pool-1") == [3, 9]
    assert await listed("--older-than", "30m") == [n for n in range(12) if n % 3]
    assert await listed("--older-than", "90m", "--newer-than", "3h") == [2, 5, 8, 11]
    assert await listed("--newer-than", "30m") == [0, 3, 6, 9]
    assert await listed("--grep", "FAILURE NUMBER 7") == [7]
    code, out, _ = await cli(settings, "dlq", "list", "--reason", "schema")
    assert code == 0 and "4 of 12 dead letter(s) match" in out
    assert await ids_in(connection, topology.dead_letter_queue) == ids


async def test_cli_show_prints_envelope_and_body(make_settings, connection):
    """`dlq show ID` prints reason, detail, attempts, times, worker and the original body."""
    settings, topology = await declared(make_settings, connection, "quorum")
    ids = await add_dead_letters(connection, topology, 3)
    code, out, _ = await cli(settings, "dlq", "show", ids[1], "--json")
    assert code == 0
    [shown] = json.loads(out)
    assert shown["reason"] == "rejected_by_sink" and shown["detail"] == "failure number 1"
    assert (shown["attempts"], shown["worker"], shown["pool"]) == (2, "worker-a", "pool-1")
    assert shown["first_failure"] < shown["last_failure"]
    assert json.loads(shown["body"]) == item(1, pool="pool-1")
    code, out, _ = await cli(settings, "dlq", "show", ids[1][:20])
    assert code == 0 and "failure number 1" in out and "memory item 1" in out
    code, _, _ = await cli(settings, "dlq", "show", "sha256:nope")
    assert code == EXIT_FAILED
    assert await ids_in(connection, topology.dead_letter_queue) == ids


@QUEUE_TYPES
async def test_cli_replay_resets_counters_and_keeps_the_rest(make_settings, connection, queue_type):
    """Replay sends the chosen letters to the work queue clean; the rest stay in order."""
    settings, topology = await declared(make_settings, connection, queue_type)
    ids = await add_dead_letters(connection, topology, 9)
    code, out, _ = await cli(
        settings, "dlq", "replay", "--reason", "schema", "--pool", "pool-0", "--force"
    )
    assert code == 0 and "replayed 2 of 2" in out
    replayed = await take_all(connection, topology.queue)
    assert [m.message_id for m in replayed] == [ids[0], ids[6]]
    for message, n in zip(replayed, (0, 6), strict=True):
        assert json.loads(message.body) == item(n, pool="pool-0")
        assert message.delivery_mode == aio_pika.DeliveryMode.PERSISTENT
        assert message.content_type == "application/json"
        headers = dict(message.headers or {})
        assert headers.pop(H_REPLAYED) == 1
        assert headers.pop("x-origin") == "test"
        assert not {k for k in headers if k.startswith("x-mw-") or "death" in k}
    rest = [key for n, key in enumerate(ids) if n not in (0, 6)]
    assert await ids_in(connection, topology.dead_letter_queue) == rest


async def test_cli_replay_dry_run_changes_nothing(make_settings, connection):
    """`replay --dry-run` lists what it would replay (ids or their prefixes) and moves nothing."""
    settings, topology = await declared(make_settings, connection, "quorum")
    ids = await add_dead_letters(connection, topology, 6)
    code, out, _ = await cli(settings, "dlq", "replay", "--all", "--dry-run")
    assert code == 0 and "would replay 6 of 6" in out and ids[5][:23] in out
    chosen = ("--id", ids[1][:23], "--id", ids[4])
    code, out, _ = await cli(settings, "dlq", "replay", *chosen, "--dry-run")
    assert code == 0 and "would replay 2 of 6" in out
    assert await depth(connection, topology.queue) == 0
    assert await ids_in(connection, topology.dead_letter_queue) == ids


async def test_cli_replay_and_purge_need_a_selection(make_settings, connection):
    """Replay and purge refuse to act on everything unless --all says so: a usage error, 2."""
    settings, topology = await declared(make_settings, connection, "quorum")
    ids = await add_dead_letters(connection, topology, 2)
    for command in (("replay",), ("purge", "--yes")):
        code, _, err = await cli(settings, "dlq", *command)
        assert code == EXIT_USAGE and "--all" in err
    assert await ids_in(connection, topology.dead_letter_queue) == ids


async def test_cli_replay_of_a_reason_a_retry_cannot_fix_needs_force(make_settings, connection):
    """`replay --reason schema` is refused (exit 2, naming --force); an unknown reason lists
    the real ones; nothing leaves the DLQ."""
    settings, topology = await declared(make_settings, connection, "quorum")
    ids = await add_dead_letters(connection, topology, 2)
    code, _, err = await cli(settings, "dlq", "replay", "--reason", "schema")
    assert code == EXIT_USAGE and "--force" in err and "schema" in err
    code, _, err = await cli(settings, "dlq", "replay", "--reason", "rejected_by_snk")
    assert code == EXIT_USAGE and "rejected_by_sink" in err
    assert await ids_in(connection, topology.dead_letter_queue) == ids


@QUEUE_TYPES
async def test_replay_killed_midway_loses_and_duplicates_nothing(
    make_settings, connection, queue_type
):
    """SIGKILL during a paced replay: every letter is in one queue, at most one in both."""
    settings, topology = await declared(make_settings, connection, queue_type)
    ids = await add_dead_letters(connection, topology, 40)
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        *("-m", "worker", "dlq", "replay", "--all", "--rate", "20"),
        env=worker_env(settings),
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    await until(lambda: _has(connection, topology.queue, 5))
    process.send_signal(signal.SIGKILL)
    await process.wait()
    await until(lambda: _total_at_least(connection, topology, 40))
    work = await ids_in(connection, topology.queue)
    dead = await ids_in(connection, topology.dead_letter_queue)
    assert 5 <= len(work) < 40
    assert work == ids[: len(work)]
    assert dead in (ids[len(work) :], ids[len(work) - 1 :])


async def _total_at_least(
    connection: AbstractRobustConnection, topology: Topology, count: int
) -> bool:
    queues = (topology.queue, topology.dead_letter_queue)
    return sum([await depth(connection, q) for q in queues]) >= count


async def test_replay_stops_when_the_work_queue_is_unroutable(make_settings, connection):
    """With no route to the work queue the replay stops, exits 1 and leaves the DLQ intact."""
    settings, topology = await declared(make_settings, connection, "quorum")
    ids = await add_dead_letters(connection, topology, 4)
    async with connection.channel() as channel:
        queue = await channel.get_queue(topology.queue, ensure=False)
        await queue.unbind(topology.exchange, topology.queue)
    code, out, err = await cli(settings, "dlq", "replay", "--all")
    assert code == EXIT_FAILED and "replayed 0 of 1" in out and "no queue bound" in err
    assert await ids_in(connection, topology.dead_letter_queue) == ids


@QUEUE_TYPES
async def test_purge_of_many_removes_exactly_the_matching(make_settings, connection, queue_type):
    """Purging hundreds removes exactly the matching ones; the others stay, in order."""
    settings, topology = await declared(make_settings, connection, queue_type)
    ids = await add_dead_letters(connection, topology, 600)
    code, out, _ = await cli(settings, "dlq", "purge", "--reason", "rejected_by_sink", "--yes")
    assert code == 0 and "removed 200 dead letter(s)" in out
    assert await ids_in(connection, topology.dead_letter_queue) == [
        key for n, key in enumerate(ids) if n % 3 != 1
    ]


async def test_purge_without_a_terminal_asks_for_yes(make_settings, connection):
    """Without --yes and without a terminal to confirm on, purge removes nothing and exits 1."""
    settings, topology = await declared(make_settings, connection, "quorum")
    ids = await add_dead_letters(connection, topology, 3)
    code, _, err = await cli(settings, "dlq", "purge", "--all")
    assert code == EXIT_FAILED and "--yes" in err
    assert await ids_in(connection, topology.dead_letter_queue) == ids


async def test_purge_removes_what_was_confirmed_not_what_arrived_since(
    make_settings, connection, monkeypatch
):
    """A dead letter arriving while the operator confirms is not purged with the others."""
    settings, topology = await declared(make_settings, connection, "quorum")
    ids = await add_dead_letters(connection, topology, 6)
    late: list[str] = []

    async def confirm(console: Any, question: str) -> bool:
        late.extend(await add_dead_letters(connection, topology, 1, start=6))
        return "6 dead letter" in question

    monkeypatch.setattr(dlq_change, "_confirm", confirm)
    assert await dlq_change.purge(settings, dlq_model.Filter(), yes=False, limit=None) == 0
    assert await ids_in(connection, topology.dead_letter_queue) == late
    assert len(set(ids) | set(late)) == 7


async def test_missing_dead_letter_queue_is_reported(make_settings):
    """Reading a DLQ that does not exist fails with a clear message and exit 1."""
    settings = make_settings()
    code, _, err = await cli(settings, "dlq", "stats")
    assert code == EXIT_FAILED and "does not exist" in err


async def test_each_replay_is_counted(make_settings, connection):
    """A letter replayed, dead-lettered again and replayed again carries a count of 2."""
    _, topology = await declared(make_settings, connection, "quorum")
    [key] = await add_dead_letters(connection, topology, 1)
    for expected in (1, 2):
        assert (await dlq_edit.replay(connection, topology, dlq_model.Filter())).replayed == 1
        [message] = await take_all(connection, topology.queue)
        assert dict(message.headers or {})[H_REPLAYED] == expected
        async with connection.channel(publisher_confirms=True) as channel:
            dlx = await channel.get_exchange(topology.dead_letter_exchange)
            headers = {**dict(message.headers or {}), H_REASON: "schema"}
            copy = aio_pika.Message(message.body, message_id=key, headers=headers)
            await dlx.publish(copy, topology.dead_letter_queue)
    [letter] = (await dlq.read(connection, topology.dead_letter_queue)).letters
    assert (letter.id, letter.replayed) == (key, 2)
