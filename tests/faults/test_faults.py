"""Faults end to end: every run is accounted for in a ledger, and nothing is lost."""

from __future__ import annotations

import asyncio
import codecs
import contextlib
import json
import signal
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

import aio_pika
import pytest

import worker.service as service_module
from tests.faults.ledger import (
    EarlyAcks,
    Ledger,
    Proxy,
    broker_address,
    connection_pids,
    drained,
    tally,
    unacked_in_queue,
    vhost,
    via,
)
from tests.integration.helpers import (
    depth,
    has_rabbitmqctl,
    item,
    publish_items,
    rabbitmqctl,
    start_worker_process,
    wait_until,
    worker_env,
)
from worker.breaker import State
from worker.headers import H_ATTEMPTS, H_DETAIL, H_REASON
from worker.mcp import McpSink
from worker.outcome import Kind, Outcome, Reason
from worker.publisher import Publisher
from worker.service import Service
from worker.settings import Settings
from worker.sink import HttpSink, StoreRequest
from worker.testing import StandIn, StandInConfig
from worker.topology import Topology
from worker.transport import HttpClient, make_client

pytestmark = [pytest.mark.integration, pytest.mark.faults]


# --- 1. SIGKILL -------------------------------------------------------------------------------


async def test_sigkill_in_flight_is_redelivered_to_another_worker(make_settings, connection):
    """SIGKILL mid-flight: a second worker finishes, nothing lost, duplicates ≤ in flight."""
    published = 40
    async with StandIn(StandInConfig(latency_s=0.3)) as sb:
        settings = make_settings(
            pools={"session_buddy_url": sb.url, "max_concurrent_memory_insertions": 5}
        )
        await publish_items(connection, settings, published)
        process = await start_worker_process(worker_env(settings))
        try:
            await wait_until(lambda: sb.stats.stored >= 10 and sb.stats.in_flight == 5)
        finally:
            process.send_signal(signal.SIGKILL)
            await asyncio.wait_for(process.communicate(), 30)
        # Unacked at the kill is at most the prefetch.
        in_flight = settings.prefetch
        async with Service(settings):
            await wait_until(lambda: sb.stats.distinct_keys == published)
            await drained(connection, settings, sb)
        ledger = await tally(connection, settings, sb, published)
    assert process.returncode == -signal.SIGKILL
    assert ledger.lost == 0 and ledger.stored == published
    assert ledger.dead == 0 and ledger.still_queued == 0
    assert ledger.duplicates <= in_flight


# --- 2. Broker closes the worker's connection --------------------------------------------------


async def test_broker_closes_worker_connection_five_times(make_settings, connection, amqp_url):
    """The broker closes the worker's connection 5 times: it reconnects, stores all, loses none."""
    if not has_rabbitmqctl():
        pytest.skip("rabbitmqctl is not on PATH")
    published, closes = 500, 5
    worker_id = f"faults-{uuid.uuid4().hex[:8]}"
    name = f"memory-worker {worker_id}"
    async with StandIn(StandInConfig(latency_s=0.2)) as sb:
        settings = make_settings(
            rabbitmq={"url": via(amqp_url)},
            pools={"session_buddy_url": sb.url, "max_concurrent_memory_insertions": 5},
            worker={"id": worker_id},
        )
        await publish_items(connection, settings, published)
        closed: list[str] = []
        async with Service(settings) as service:
            for _ in range(closes):
                target = sb.stats.distinct_keys + 10
                await wait_until(lambda t=target: sb.stats.distinct_keys >= t)
                pids = [p for p in await connection_pids(name) if p not in closed]
                assert len(pids) == 1, pids
                await rabbitmqctl("close_connection", pids[0], "fault test")
                closed.append(pids[0])
            sb.config.latency_s = 0.0
            await wait_until(lambda: sb.stats.distinct_keys == published)
            await drained(connection, settings, sb)
            assert service.ready
        ledger = await tally(connection, settings, sb, published)
    assert ledger.lost == 0 and ledger.stored == published
    assert ledger.dead == 0 and ledger.still_queued == 0
    assert ledger.duplicates <= closes * settings.concurrency


# --- 3. A TCP proxy that cuts and stalls -------------------------------------------------------


async def test_proxy_cut_twice_loses_nothing(make_settings, connection, amqp_url):
    """The TCP path is cut twice mid-run: the worker reconnects and every item is stored."""
    published = 300
    async with (
        StandIn(StandInConfig(latency_s=0.1)) as sb,
        Proxy(*broker_address(amqp_url)) as proxy,
    ):
        make_settings()  # first: the fixture cleans up through this one, not the proxy
        settings = make_settings(
            rabbitmq={"url": via(amqp_url, proxy.port)},
            pools={"session_buddy_url": sb.url, "max_concurrent_memory_insertions": 5},
        )
        await publish_items(connection, settings, published)
        async with Service(settings):
            for cut in range(2):
                target = sb.stats.distinct_keys + 20
                await wait_until(lambda t=target: sb.stats.distinct_keys >= t)
                await wait_until(lambda c=cut: proxy.accepted >= c + 1)
                proxy.cut()
            sb.config.latency_s = 0.0
            await wait_until(lambda: sb.stats.distinct_keys == published)
            await drained(connection, settings, sb)
        ledger = await tally(connection, settings, sb, published)
    assert proxy.accepted >= 3  # reconnected after each cut
    assert ledger.lost == 0 and ledger.stored == published
    assert ledger.dead == 0 and ledger.still_queued == 0
    assert ledger.duplicates <= 2 * settings.concurrency


@pytest.mark.parametrize("stall_s", [3, 7])
async def test_proxy_stall_longer_than_heartbeat_recovers(
    make_settings, connection, amqp_url, stall_s
):
    """Forwarding stalls (3 s; 7 s drops the link) with a 2 s heartbeat: recovers, loses none."""
    published = 200
    async with (
        StandIn(StandInConfig(latency_s=0.1)) as sb,
        Proxy(*broker_address(amqp_url)) as proxy,
    ):
        make_settings()  # first: the fixture cleans up through this one, not the proxy
        settings = make_settings(
            rabbitmq={"url": via(amqp_url, proxy.port), "heartbeat_s": 2},
            pools={"session_buddy_url": sb.url, "max_concurrent_memory_insertions": 5},
        )
        await publish_items(connection, settings, published)
        async with Service(settings):
            await wait_until(lambda: sb.stats.distinct_keys >= 20)
            proxy.stall()
            before = sb.stats.distinct_keys
            await asyncio.sleep(stall_s)
            during = sb.stats.distinct_keys - before  # only what was already delivered
            proxy.resume()
            sb.config.latency_s = 0.0
            await wait_until(lambda: sb.stats.distinct_keys == published)
            await drained(connection, settings, sb)
        ledger = await tally(connection, settings, sb, published)
    print(f"stored during the stall: {during}, proxied connections: {proxy.accepted}")
    assert during <= settings.prefetch  # the stall really stopped the flow
    if stall_s >= 7:  # past the heartbeat timeout: the link was dropped and re-established
        assert proxy.accepted >= 2
    assert ledger.lost == 0 and ledger.stored == published
    assert ledger.dead == 0 and ledger.still_queued == 0
    assert ledger.duplicates <= settings.concurrency


# --- 4. Session-Buddy faults -------------------------------------------------------------------


async def test_commit_then_fail_stores_everything_with_counted_duplicates(
    make_settings, connection
):
    """Commit-then-fail at 0.2: every item stored, duplicates counted, no dead letters."""
    published = 100
    async with StandIn(StandInConfig(latency_s=0.01, commit_then_fail=0.2, seed=7)) as sb:
        settings = make_settings(
            pools={"session_buddy_url": sb.url},
            retry={"max_attempts": 100},
            sink={"breaker_failures": 0},
        )
        await publish_items(connection, settings, published)
        async with Service(settings):
            await wait_until(lambda: sb.stats.distinct_keys == published)
            await drained(connection, settings, sb)
        faults = sb.stats.faults.get("commit_then_fail", 0)
        ledger = await tally(connection, settings, sb, published)
    assert faults > 0
    assert ledger.lost == 0 and ledger.stored == published
    assert ledger.dead_lettered == {} and ledger.still_queued == 0
    assert 0 <= ledger.duplicates <= faults


async def test_session_forgotten_three_times_loses_nothing(make_settings, connection):
    """Session-Buddy forgets the session 3 times mid-run: nothing lost, no dead letters."""
    published = 300
    async with StandIn(StandInConfig(latency_s=0.05)) as sb:
        settings = make_settings(
            pools={"session_buddy_url": sb.url, "max_concurrent_memory_insertions": 5},
            retry={"max_attempts": 100},
        )
        await publish_items(connection, settings, published)
        async with Service(settings):
            for n in range(3):
                await wait_until(lambda n=n: sb.stats.distinct_keys >= 50 * (n + 1))
                sb.forget_sessions()
            await wait_until(lambda: sb.stats.distinct_keys == published)
            await drained(connection, settings, sb)
        opened = sb.stats.sessions_opened
        ledger = await tally(connection, settings, sb, published)
    assert opened >= 4
    assert ledger.lost == 0 and ledger.stored == published
    assert ledger.dead_lettered == {} and ledger.still_queued == 0


async def test_per_item_timeout_shorter_than_sink_latency(make_settings, connection):
    """Timeouts (0.2 s vs 0.5 s latency) for a while, then recovery: nothing lost or dead."""
    published = 30
    async with StandIn(StandInConfig(latency_s=0.5)) as sb:
        settings = make_settings(
            pools={"session_buddy_url": sb.url, "max_concurrent_memory_insertions": 5},
            sink={"timeout_s": 0.2, "breaker_failures": 0},
            retry={"max_attempts": 200},
        )
        await publish_items(connection, settings, published)
        async with Service(settings) as service:
            await wait_until(lambda: service.metrics.counts["retry"] >= 20)
            sb.config.latency_s = 0.0
            await wait_until(lambda: sb.stats.distinct_keys == published)
            await drained(connection, settings, sb)
        ledger = await tally(connection, settings, sb, published)
    assert ledger.lost == 0 and ledger.stored == published
    assert ledger.dead_lettered == {}


# --- 5. Forged headers -------------------------------------------------------------------------


def _forged_death(queue: str) -> list[dict[str, object]]:
    return [
        {
            "count": 30,
            "reason": "rejected",
            "queue": queue,
            "exchange": "",
            "routing-keys": [queue],
            "time": datetime.now(UTC),
        }
    ]


async def test_forged_headers(make_settings, connection):
    """A forged x-death is ignored (stored); a forged attempts count dead-letters on a failure."""
    async with StandIn() as sb:
        settings = make_settings(pools={"session_buddy_url": sb.url})
        topology = Topology.from_settings(settings)
        await topology.declare(connection)
        async with Publisher(connection, topology) as publisher:
            body, key = publisher.encode(item(1))
            await publisher.publish_raw(
                body, message_id=key, headers={"x-death": _forged_death(topology.queue)}
            )
            body2, key2 = publisher.encode(item(2))
            await publisher.publish_raw(body2, message_id=key2, headers={"x-mw-attempts": 999})
        async with Service(settings):
            await wait_until(lambda: sb.stats.distinct_keys == 2)
            # With a transient failure, a forged 999 exceeds max_attempts at once.
            sb.config.error_503 = 1.0
            async with Publisher(connection, topology) as publisher:
                body3, key3 = publisher.encode(item(3))
                await publisher.publish_raw(body3, message_id=key3, headers={"x-mw-attempts": 999})
            await wait_until(lambda: sb.stats.faults.get("error_503", 0) >= 1)
            sb.config.error_503 = 0.0
            await drained(connection, settings, sb, dead=1)
        stored_keys = {row["source_session_id"] for row in sb.items}
        ledger = await tally(connection, settings, sb, 3)
    assert {key, key2} <= stored_keys
    assert key3 not in stored_keys
    assert ledger.lost == 0 and ledger.stored == 2
    assert ledger.dead_lettered == {Reason.RETRIES_EXHAUSTED: 1}


# --- 6. SIGTERM with a grace period shorter than the inserts ------------------------------------


def _fixed(sb: StandIn, concurrency: int) -> dict[str, Any]:
    """Pool settings for exactly `concurrency` stores at once (no adaptive limit)."""
    return {
        "session_buddy_url": sb.url,
        "max_concurrent_memory_insertions": concurrency,
        "adaptive_concurrency": False,
    }


def _requeued_at_stop(stderr: bytes) -> int | None:
    """The `requeued` count of the worker's `worker_stopped` log line, if it wrote one."""
    for line in stderr.decode(errors="replace").splitlines():
        with contextlib.suppress(ValueError):
            event = json.loads(line)
            if isinstance(event, dict) and event.get("event") == "worker_stopped":
                return int(event["requeued"])
    return None


async def test_sigterm_with_grace_shorter_than_inserts_requeues_then_all_stored(
    make_settings, connection
):
    """SIGTERM, 1 s grace, inserts held: exit 0, the 5 in flight and the one waiting for a slot
    requeued, a 2nd worker stores."""
    published, concurrency = 20, 5
    async with StandIn() as sb:
        settings = make_settings(pools=_fixed(sb, concurrency), worker={"grace_s": 1})
        await publish_items(connection, settings, published)
        sb.hold()
        async with EarlyAcks(sb, settings) as early:
            env = worker_env(
                settings,
                MAHAVISHNU_POOLS__ADAPTIVE_CONCURRENCY="false",
                MAHAVISHNU_WORKER__ID=settings.worker.id,  # what EarlyAcks looks for
            )
            process = await start_worker_process(env)
            await wait_until(lambda: sb.held == concurrency)
            assert await early.sample() == (concurrency, settings.prefetch)
            process.send_signal(signal.SIGTERM)
            _, stderr = await asyncio.wait_for(process.communicate(), 30)
            back_in_queue = await depth(connection, settings.rabbitmq.queue)
            # The stand-in commits the abandoned inserts now, as a server that did not notice
            # the client leave would: each is a duplicate once the second worker stores it.
            sb.release()
            async with Service(settings):
                await wait_until(lambda: sb.stats.distinct_keys == published)
                await drained(connection, settings, sb)
        ledger = await tally(connection, settings, sb, published, early)
    assert process.returncode == 0, stderr.decode()[-2000:]
    assert _requeued_at_stop(stderr) == settings.prefetch
    assert back_in_queue == published  # nothing finished, nothing dead-lettered
    assert ledger.lost == 0 and ledger.stored == published
    assert ledger.dead_lettered == {} and ledger.still_queued == 0
    assert ledger.duplicates <= concurrency and ledger.early_acks == 0


# --- 7. No early ack ----------------------------------------------------------------------------


async def wait_for_value(
    read: Callable[[], Awaitable[int]], expected: int, timeout_s: float = 30.0
) -> None:
    """Poll an async reading until it equals `expected`; fail naming the last value otherwise."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    while (value := await read()) != expected:
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"read {value}, expected {expected} within {timeout_s} s")
        await asyncio.sleep(0.5)


async def test_unacked_equals_held_stores_and_nothing_is_acked_early(make_settings, connection):
    """While the sink holds N stores, the broker counts every prefetched delivery unacked
    (the N held and the ones waiting for a slot) and nothing is stored."""
    published, concurrency = 30, 6
    async with StandIn() as sb:
        settings = make_settings(pools=_fixed(sb, concurrency))
        prefetch = settings.prefetch
        assert prefetch > concurrency
        await publish_items(connection, settings, published)
        sb.hold()
        async with Service(settings), EarlyAcks(sb, settings) as early:
            await wait_until(lambda: sb.held == concurrency)
            for _ in range(3):
                waiting, unacked = await early.sample()
                assert (waiting, unacked) == (concurrency, prefetch)
                assert sb.stats.stored == 0
            assert await depth(connection, settings.rabbitmq.queue) == published - prefetch
            # The queue's own count agrees once a quorum queue refreshes its figures.
            queue, host = settings.rabbitmq.queue, vhost(settings.rabbitmq.url.get_secret_value())
            await wait_for_value(lambda: unacked_in_queue(queue, host), prefetch, timeout_s=15)
            assert sb.stats.stored == 0 and sb.held == concurrency
            sb.release()
            await wait_until(lambda: sb.stats.distinct_keys == published)
            await drained(connection, settings, sb)
        ledger = await tally(connection, settings, sb, published, early)
    assert early.exact >= 3
    assert ledger.lost == 0 and ledger.stored == published and ledger.duplicates == 0
    assert ledger.dead_lettered == {} and ledger.early_acks == 0


async def test_the_probe_catches_a_consumer_that_acks_before_storing(
    make_settings, connection, amqp_url
):
    """The probe is not vacuous: a consumer that acks, then stores, shows as N early acks."""
    n = 4
    async with StandIn() as sb:
        settings = make_settings(pools=_fixed(sb, n))
        await publish_items(connection, settings, n)
        sb.hold()
        name = f"memory-worker {settings.worker.id}"  # the name EarlyAcks watches
        eager = await aio_pika.connect(amqp_url, client_properties={"connection_name": name})
        async with eager, make_client(settings) as client:
            sink = McpSink(client, sb.url, settings.sink)
            channel = await eager.channel()
            queue = await channel.declare_queue(settings.rabbitmq.queue, passive=True)
            stores = []
            for _ in range(n):
                message = await queue.get()
                await message.ack()  # the bug this probe exists to catch: ack, then store
                request = StoreRequest(
                    json.loads(message.body)["content"], {}, str(message.message_id)
                )
                stores.append(asyncio.create_task(sink.store(request)))
            await wait_until(lambda: sb.held == n)
            early = EarlyAcks(sb, settings)
            sampled = await early.sample()
            sb.release()
            outcomes = await asyncio.gather(*stores)
            await sink.close()
    print(early)
    assert sampled == (n, 0)
    assert early.early_acks == n
    assert all(outcome.kind is Kind.STORED for outcome in outcomes)


# --- 8. Poison items that make the worker's own code raise --------------------------------------


class PoisonSink:
    """The real sink, except that content with "poison" in it raises, as a bug in our code would."""

    def __init__(self, inner: McpSink | HttpSink) -> None:
        self._inner = inner
        self.raised = 0

    async def __aenter__(self) -> PoisonSink:
        await self._inner.__aenter__()
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self._inner.__aexit__(*exc)

    async def store(self, request: StoreRequest) -> Outcome:
        """Raise for poison, else store through the real sink."""
        if "poison" in request.content:
            self.raised += 1
            raise RuntimeError(f"cannot handle {request.content!r}")
        return await self._inner.store(request)


async def test_items_that_crash_the_worker_are_dead_lettered_once(
    make_settings, connection, monkeypatch
):
    """Items whose store raises: dead-lettered on their 1st attempt, breaker shut, rest stored."""
    good, poison = 40, 6  # more crashes in a row than breaker_failures
    sinks: list[PoisonSink] = []
    real_make_sink = service_module.make_sink

    def poisoned_sink(settings: Settings, client: HttpClient) -> PoisonSink:
        sinks.append(PoisonSink(real_make_sink(settings, client)))
        return sinks[-1]

    async with StandIn(StandInConfig(latency_s=0.01)) as sb:
        settings = make_settings(
            pools={"session_buddy_url": sb.url, "max_concurrent_memory_insertions": 5},
            retry={"max_attempts": 3},
            sink={"breaker_failures": 5},
        )
        topology = Topology.from_settings(settings)
        await topology.declare(connection)
        async with Publisher(connection, topology) as publisher:
            for n in range(poison):
                await publisher.publish_item(item(n, content=f"poison pill {n}"))
            for n in range(poison, poison + good):
                await publisher.publish_item(item(n))
        # The composition root builds the sink; wrap the real one it builds.
        monkeypatch.setattr(service_module, "make_sink", poisoned_sink)
        async with Service(settings) as service, EarlyAcks(sb, settings) as early:
            await wait_until(lambda: sb.stats.distinct_keys == good)
            await drained(connection, settings, sb, dead=poison)
            opened = service.metrics.registry.get_sample_value(
                "memory_worker_breaker_transitions_total", {"state": "open"}
            )
            assert service.breaker.state is State.CLOSED and service.ready
        ledger = await tally(connection, settings, sb, good + poison, early)
    assert not opened, "crashes are the item's fault and must not open the breaker"
    assert sinks[0].raised == poison  # one attempt each: no retry loop
    for message in ledger.letters:
        assert message.headers[H_REASON] == Reason.INTERNAL_ERROR
        assert message.headers[H_ATTEMPTS] == 1
        assert str(message.headers[H_DETAIL]).startswith("RuntimeError: cannot handle 'poison")
    assert ledger.dead_lettered == {Reason.INTERNAL_ERROR: poison}
    assert ledger.lost == 0 and ledger.stored == good and ledger.still_queued == 0
    assert ledger.duplicates == 0 and ledger.early_acks == 0


# --- 9. Bad input, one row per way a body can be broken -----------------------------------------

MAX_BODY = 65_536
_META = b'"metadata": {"type": "t", "pool_id": "p", "pool_type": "m", "worker_id": "w", '
_META += b'"status": "completed", "timestamp": 1764000000}'


def _body(content: bytes) -> bytes:
    """A body whose metadata is valid, with `content` as the raw JSON of the content field."""
    return b'{"content": ' + content + b", " + _META + b"}"


BAD_INPUT_TABLE: list[tuple[str, bytes, str | None, Reason]] = [
    ("truncated", _body(b'"a whole item"')[:-20], "application/json", Reason.INVALID_JSON),
    ("empty body", b"", "application/json", Reason.INVALID_JSON),
    ("invalid utf-8", _body(b'"caf\xe9"'), "application/json", Reason.INVALID_ENCODING),
    ("utf-8 bom", codecs.BOM_UTF8 + _body(b'"x"'), "application/json", Reason.INVALID_ENCODING),
    ("utf-16 bom", _body(b'"x"').decode().encode("utf-16"), None, Reason.INVALID_ENCODING),
    ("utf-16 no bom", _body(b'"x"').decode().encode("utf-16-le"), None, Reason.INVALID_ENCODING),
    ("nan", _body(b"NaN"), "application/json", Reason.INVALID_JSON),
    ("infinity", _body(b"1e999"), "application/json", Reason.INVALID_JSON),
    ("deep nesting", _body(b"[" * 40 + b"]" * 40), "application/json", Reason.INVALID_JSON),
    ("5000 digits", _body(b"9" * 5000), "application/json", Reason.INVALID_JSON),
    ("lone surrogate", _body(b'"\\ud800"'), "application/json", Reason.INVALID_ENCODING),
    ("duplicate key", b'{"content": "a", ' + _body(b'"b"')[1:], None, Reason.INVALID_JSON),
    ("content number", _body(b"42"), "application/json", Reason.SCHEMA),
    ("metadata list", b'{"content": "x", "metadata": []}', "application/json", Reason.SCHEMA),
    ("timestamp bool", _body(b'"x"').replace(b"1764000000", b"true"), None, Reason.SCHEMA),
    ("top-level array", b'[{"content": "x"}]', "application/json", Reason.SCHEMA),
    ("missing content", b"{" + _META + b"}", "application/json", Reason.SCHEMA),
    ("empty content", _body(b'""'), "application/json", Reason.SCHEMA),
    ("blank content", _body(b'" \\n\\t "'), "application/json", Reason.SCHEMA),
    ("unknown field", _body(b'"x"')[:-1] + b', "extra": 1}', None, Reason.SCHEMA),
    ("oversize body", _body(b'"' + b"x" * MAX_BODY + b'"'), None, Reason.TOO_LARGE),
    ("oversize content", _body(b'"' + b"x" * 12_000 + b'"'), None, Reason.TOO_LARGE),
    ("text/plain", _body(b'"x"'), "text/plain", Reason.WRONG_CONTENT_TYPE),
    (
        "utf-16 charset",
        _body(b'"x"'),
        "application/json; charset=utf-16",
        Reason.WRONG_CONTENT_TYPE,
    ),
    ("forged x-death", _body(b'"a whole item"')[:-20], "application/json", Reason.INVALID_JSON),
]


async def _publish_foreign(
    connection, topology: Topology, name: str, body: bytes, content_type: str | None
) -> None:
    """Publish bytes as a foreign producer would: straight to the work exchange, confirmed."""
    headers: dict[str, Any] = {}
    if name == "forged x-death":
        headers["x-death"] = _forged_death(topology.queue)
    message = aio_pika.Message(
        body,
        content_type=content_type,
        message_id=name,
        headers=headers,
        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
    )
    async with connection.channel(publisher_confirms=True) as channel:
        exchange = await channel.get_exchange(topology.exchange, ensure=False)
        await exchange.publish(message, topology.queue, mandatory=True)


async def test_bad_input_table_is_dead_lettered_with_reasons_by_one_worker(
    make_settings, connection
):
    """Every broken body is dead-lettered with its reason, the sink never sees it, good items go."""
    good = 20
    async with StandIn() as sb:
        # Blank and long content are refused only when set to be: by default they are stored
        # as a summary and in parts (tests/integration/test_mahavishnu.py).
        settings = make_settings(
            pools={"session_buddy_url": sb.url},
            worker={"max_body_bytes": MAX_BODY},
            sink={"blank_content": "dead_letter", "oversize": "dead_letter"},
        )
        topology = Topology.from_settings(settings)
        await topology.declare(connection)
        keys = await publish_items(connection, settings, good // 2)
        for name, body, content_type, _ in BAD_INPUT_TABLE:
            await _publish_foreign(connection, topology, name, body, content_type)
        keys += await publish_items(connection, settings, good // 2, start=good // 2)
        async with Service(settings) as service, EarlyAcks(sb, settings) as early:
            await wait_until(lambda: sb.stats.distinct_keys == good)
            await drained(connection, settings, sb, dead=len(BAD_INPUT_TABLE))
            assert service.ready
        calls = sb.stats.calls
        stored_keys = {row["source_session_id"] for row in sb.items}
        ledger = await tally(connection, settings, sb, good + len(BAD_INPUT_TABLE), early)
    dead = {m.message_id: m for m in ledger.letters}
    assert calls == good  # one store call per good item; none for a broken one
    assert stored_keys == set(keys)
    for name, body, _, reason in BAD_INPUT_TABLE:
        message = dead[name]
        print(f"{name:>16}: {message.headers[H_REASON]:<18} {message.headers[H_DETAIL]}")
        assert (message.headers[H_REASON], message.headers[H_ATTEMPTS]) == (reason, 1), name
        assert message.body == body, name
    assert len(dead) == len(BAD_INPUT_TABLE)
    assert ledger.lost == 0 and ledger.stored == good and ledger.still_queued == 0
    assert ledger.duplicates == 0 and ledger.early_acks == 0


# --- 10. Systemic sink faults: bad credentials, an outage, slower than the per-item timeout ------


async def _through_systemic_fault(
    make_settings, connection, sb: StandIn, start_fault, end_fault, **sections: dict[str, Any]
) -> tuple[Ledger, float]:
    """Run 100 items through a fault that `end_fault` ends after 2 s; the ledger and opens."""
    published = 100
    settings = make_settings(
        pools={"session_buddy_url": sb.url, "max_concurrent_memory_insertions": 5},
        retry={"max_attempts": 3},  # without the breaker, these faults would dead-letter most
        sink={"breaker_open_s": 0.3, **sections.pop("sink", {})},
        **sections,
    )
    await publish_items(connection, settings, published)
    start_fault()
    asyncio.get_running_loop().call_later(2.0, end_fault)
    async with Service(settings) as service, EarlyAcks(sb, settings) as early:
        await wait_until(lambda: sb.stats.distinct_keys == published, timeout_s=40)
        await drained(connection, settings, sb)
        opened = service.metrics.registry.get_sample_value(
            "memory_worker_breaker_transitions_total", {"state": "open"}
        )
        assert service.breaker.state is State.CLOSED and service.ready
    ledger = await tally(connection, settings, sb, published, early)
    print(f"breaker opened {opened or 0:g} times; stand-in faults {sb.stats.faults}")
    assert ledger.lost == 0 and ledger.stored == published
    assert ledger.dead_lettered == {} and ledger.still_queued == 0
    return ledger, opened or 0.0


async def test_401_for_everything_then_credentials_work(make_settings, connection):
    """401 to every request for 2 s: the breaker pauses the worker; all stored, none dead."""
    async with StandIn(StandInConfig(latency_s=0.005)) as sb:
        ledger, opened = await _through_systemic_fault(
            make_settings,
            connection,
            sb,
            lambda: setattr(sb.config, "status_for_all", 401),
            lambda: setattr(sb.config, "status_for_all", None),
        )
    assert opened >= 1 and ledger.early_acks == 0


async def test_session_buddy_outage(make_settings, connection):
    """Session-Buddy answers 503 to everything for 2 s: paused, then all stored, none dead."""
    async with StandIn(StandInConfig(latency_s=0.005)) as sb:
        ledger, opened = await _through_systemic_fault(
            make_settings, connection, sb, lambda: sb.outage(2.0), lambda: None
        )
    assert opened >= 1 and ledger.early_acks == 0


async def test_slower_than_the_per_item_timeout_for_a_while(make_settings, connection):
    """1 s stores against a 0.3 s timeout for 2 s: the breaker opens; all stored, none dead."""
    async with StandIn(StandInConfig(latency_s=0.005)) as sb:
        ledger, opened = await _through_systemic_fault(
            make_settings,
            connection,
            sb,
            lambda: setattr(sb.config, "latency_s", 1.0),
            lambda: setattr(sb.config, "latency_s", 0.005),
            sink={"timeout_s": 0.3},
        )
    # A timed-out store may still commit at the stand-in: that is a duplicate, not an early ack.
    assert opened >= 1 and ledger.early_acks == 0
