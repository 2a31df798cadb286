"""The shared ledger against a real Redis, and a worker whose Redis is down or silent."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import pytest
from redis.asyncio import Redis
from structlog.testing import capture_logs

import worker.ledger
from tests.integration.helpers import publish_items, wait_until
from worker.ledger import STORED, RedisLedger, Status
from worker.metrics import Metrics
from worker.service import Service
from worker.testing import StandIn, free_port

pytestmark = pytest.mark.integration


def ledger(url: str, prefix: str, claim_ttl_s: float = 30.0, timeout_s: float = 0.5) -> RedisLedger:
    """A ledger on its own key prefix, with a fresh metrics registry."""
    return RedisLedger(
        url,
        Metrics(1),
        key_prefix=prefix,
        ttl_s=600.0,
        claim_ttl_s=claim_ttl_s,
        timeout_s=timeout_s,
        worker_id="test",
    )


def counted(metrics: Metrics, name: str) -> float:
    """A ledger counter's value; for errors, the sum over every operation."""
    get = metrics.registry.get_sample_value
    if name == "ledger_errors":
        ops = ("ping", "claim", "mark_stored", "release")
        return sum(get("memory_worker_ledger_errors_total", {"op": op}) or 0.0 for op in ops)
    return get(f"memory_worker_{name}_total") or 0.0


def errors(led: RedisLedger) -> float:
    """Ledger errors this ledger counted so far."""
    return counted(led._metrics, "ledger_errors")


@contextlib.asynccontextmanager
async def silent_server() -> AsyncIterator[int]:
    """A loopback server that accepts connections and never answers; yields its port."""
    held: list[asyncio.StreamWriter] = []

    async def accept(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)

    server = await asyncio.start_server(accept, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        for writer in held:
            writer.transport.abort()
        server.close()


async def test_claim_is_exclusive_until_stored(redis_url, ledger_prefix):
    """One claim wins; a second is told the store is elsewhere; once stored, every claim says so."""
    async with ledger(redis_url, ledger_prefix) as a, ledger(redis_url, ledger_prefix) as b:
        mine = await a.claim("k")
        assert mine.status is Status.MINE and mine.token is not None
        assert (await b.claim("k")).status is Status.ELSEWHERE
        assert (await a.claim("k")).status is Status.ELSEWHERE  # a second delivery to a, too
        await a.mark_stored("k")
        assert (await b.claim("k")).status is Status.STORED
        assert counted(b._metrics, "ledger_duplicates") == 1
        assert counted(b._metrics, "ledger_deferred") == 1
    async with Redis.from_url(redis_url, decode_responses=True) as client:
        assert await client.get(f"{ledger_prefix}k") == STORED
        assert 0 < await client.pttl(f"{ledger_prefix}k") <= 600_000


async def test_release_frees_only_our_own_claim(redis_url, ledger_prefix):
    """A failed store's release frees its claim, but not a claim someone took after it expired."""
    async with ledger(redis_url, ledger_prefix) as a, ledger(redis_url, ledger_prefix) as b:
        first = await a.claim("k")
        await a.release(first)
        second = await b.claim("k")
        assert second.status is Status.MINE
        await a.release(first)  # stale: the claim is b's now
        assert (await a.claim("k")).status is Status.ELSEWHERE
        await b.release(second)
        assert (await a.claim("k")).status is Status.MINE


async def test_claim_of_a_killed_worker_expires(redis_url, ledger_prefix):
    """A claim nobody marks or releases expires after its TTL, and the item can be claimed."""
    async with ledger(redis_url, ledger_prefix, claim_ttl_s=0.3) as a:
        assert (await a.claim("k")).status is Status.MINE
        for _ in range(200):
            status = (await a.claim("k")).status
            if status is Status.MINE:
                break
            assert status is Status.ELSEWHERE
            await asyncio.sleep(0.05)
        else:
            raise AssertionError("the claim never expired")


async def test_split_item_claim_reports_parts_stored_before(redis_url, ledger_prefix):
    """Claiming a split item says which of its parts some worker stored already."""
    parts = ["k#1/3", "k#2/3", "k#3/3"]
    async with ledger(redis_url, ledger_prefix) as a:
        first = await a.claim("k", parts)
        assert first.status is Status.MINE and first.stored_parts == frozenset()
        await a.mark_stored(parts[0])
        await a.mark_stored(parts[2])
        await a.release(first)
        again = await a.claim("k", parts)
        assert again.status is Status.MINE
        assert again.stored_parts == {parts[0], parts[2]}


async def test_unreachable_redis_is_skipped_logged_once_then_recovered(
    redis_url, ledger_prefix, monkeypatch
):
    """Redis refusing: claims are unchecked, one warning; once it answers, one info line."""
    monkeypatch.setattr(worker.ledger, "RECHECK_S", 0.0)  # look again at every call
    port = free_port()
    host, redis_port = "127.0.0.1", int(redis_url.rsplit(":", 1)[1].split("/")[0])
    with capture_logs() as logs:
        async with ledger(f"redis://127.0.0.1:{port}/0", ledger_prefix) as down:
            for _ in range(3):
                assert (await down.claim("k")).status is Status.UNCHECKED
            await down.mark_stored("k")
            assert errors(down) == 5  # ping, three claims, one mark
            forward = await asyncio.start_server(
                lambda r, w: _pipe(r, w, host, redis_port), "127.0.0.1", port
            )
            try:
                assert (await down.claim("k")).status is Status.MINE
            finally:
                forward.close()
    events = [e["event"] for e in logs if e["event"].startswith("ledger_")]
    assert events == ["ledger_unavailable", "ledger_available"]


async def _pipe(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, host: str, port: int
) -> None:
    """Forward one connection to Redis, both ways, until either side closes."""
    up_reader, up_writer = await asyncio.open_connection(host, port)

    async def copy(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError):
            while data := await src.read(65536):
                dst.write(data)
                await dst.drain()
        dst.close()

    await asyncio.gather(copy(reader, up_writer), copy(up_reader, writer))


async def test_silent_redis_costs_one_timeout_then_is_skipped(ledger_prefix):
    """Redis that accepts but never answers: the claim times out as unchecked, later ones skip."""
    async with (
        silent_server() as port,
        ledger(f"redis://127.0.0.1:{port}/0", ledger_prefix, timeout_s=0.2) as slow,
    ):
        assert errors(slow) == 1  # the ping at start
        assert (await slow.claim("k")).status is Status.UNCHECKED
        assert errors(slow) == 1  # skipped for RECHECK_S without asking


@pytest.mark.parametrize("redis", ["refused", "silent"])
async def test_worker_with_redis_down_stores_everything(make_settings, connection, redis):
    """With the ledger's Redis refusing or silent, every item is still stored, none dead."""
    published = 50
    async with StandIn() as sb, silent_server() as silent_port:
        port = free_port() if redis == "refused" else silent_port
        settings = make_settings(
            pools={"session_buddy_url": sb.url},
            ledger={"url": f"redis://127.0.0.1:{port}/0", "timeout_s": 0.2},
        )
        await publish_items(connection, settings, published)
        async with Service(settings) as service:
            await wait_until(lambda: sb.stats.distinct_keys == published)
            await wait_until(lambda: service.metrics.counts["ack"] == published)
        assert sb.stats.duplicates == 0
        assert service.metrics.counts == {"ack": published, "outcome:stored": published}
        assert counted(service.metrics, "ledger_errors") >= 1


async def test_worker_with_ledger_acks_items_stored_elsewhere(
    make_settings, connection, redis_url, ledger_prefix
):
    """Items the ledger says stored are acked without a store; the rest are stored and marked."""
    async with StandIn() as sb:
        settings = make_settings(
            pools={"session_buddy_url": sb.url},
            ledger={"url": redis_url, "key_prefix": ledger_prefix},
        )
        keys = await publish_items(connection, settings, 20)
        async with Redis.from_url(redis_url, decode_responses=True) as client:
            for key in keys[:5]:
                await client.set(f"{ledger_prefix}{key}", STORED)
            async with Service(settings) as service:
                await wait_until(lambda: service.metrics.counts["ack"] == 20)
            values = await client.mget([f"{ledger_prefix}{k}" for k in keys])
        assert sb.stats.distinct_keys == 15 and sb.stats.duplicates == 0
        assert counted(service.metrics, "ledger_duplicates") == 5
        assert service.metrics.counts["outcome:duplicate"] == 5
        assert values == [STORED] * 20
