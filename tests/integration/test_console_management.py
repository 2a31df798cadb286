"""The console on a real RabbitMQ management API: queue numbers, workers found, dead letters.

The machine's broker has no management plugin, so unless the session's broker has one
(MEMORY_WORKER_TEST_RABBITMQ=4.3 starts a private node with it), this module starts a private
4.3 node of its own with the plugin. Without a prepared 4.3 it skips; in CI (where `.ci/run`
prepares 4.3), or when 4.3 was asked for, it fails instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from html.parser import HTMLParser
from urllib.parse import quote

import aiohttp
import pytest

from tests.integration.conftest import broker_with_management
from tests.integration.helpers import (
    has_rabbitmqctl,
    item,
    rabbitmqctl,
    wait_until,
)
from worker.console.server import ConsoleServer
from worker.publisher import Publisher
from worker.service import Service
from worker.testing import StandIn
from worker.topology import Topology

pytestmark = pytest.mark.integration

#: Bodies the worker dead-letters itself, by the reason it gives.
BROKEN = {
    "invalid_json": [b'{"content": "unterminated', b"not json at all"],
    "schema": [b'{"metadata": {"pool_id": "pool-x"}}'],
}
VALID, REJECTED, LATER = 4, 3, 30
DEAD = REJECTED + sum(len(bodies) for bodies in BROKEN.values())
LIMIT = 3
#: The management API fills a queue's counts and rates at its statistics pass, every 5 s by
#: default, so what the console shows is polled for at most this long.
STATS_WAIT_S = 45.0
#: The management URL of the broker this module's tests run on (set by `amqp_url`).
_API: list[str] = []


@pytest.fixture(scope="module")
def amqp_url(amqp_url: str) -> Iterator[str]:
    """The session's broker where it has a management API, else a private 4.3 node with one."""
    yield from broker_with_management(amqp_url, _API, "the console's management API tests")


@pytest.fixture
def management_url(amqp_url: str) -> str:
    """The management API of this module's broker."""
    return _API[-1]


class Tables(HTMLParser):
    """The text of each cell of each `<table id=...>` in a page, row by row."""

    def __init__(self, page: str) -> None:
        super().__init__()
        self.tables: dict[str, list[list[str]]] = {}
        self._table: list[list[str]] | None = None
        self._cell: list[str] | None = None
        self.feed(page)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "table":
            self._table = self.tables.setdefault(dict(attrs).get("id") or "", [])
        elif tag == "tr" and self._table is not None:
            self._table.append([])
        elif tag in ("td", "th") and self._table:
            self._cell = []

    def handle_endtag(self, tag: str) -> None:
        if tag in ("td", "th") and self._cell is not None and self._table:
            self._table[-1].append(" ".join("".join(self._cell).split()))
            self._cell = None
        elif tag == "table":
            self._table = None

    def handle_data(self, data: str) -> None:
        if self._cell is not None:
            self._cell.append(data)


def number(cell: str) -> float | None:
    """A cell's number as the console formats it ("1,234.5"), None for "-"."""
    return None if cell == "-" else float(cell.replace(",", ""))


async def publish(publisher: Publisher, first: int, count: int, pool: str = "pool-a") -> None:
    """`count` valid items, numbered from `first`."""
    for n in range(first, first + count):
        await publisher.publish_item(item(n, pool=pool))


class Seen:
    """What the overview showed: its last tables, and the highest stores/s of one worker."""

    def __init__(self, ops_url: str) -> None:
        self.ops_url = ops_url
        self.source = False
        self.queues: dict[str, list[str]] = {}
        self.workers: list[list[str]] = []
        self.stores_per_s = 0.0

    def read(self, page: str) -> None:
        """Take one overview fragment in."""
        tables = Tables(page).tables
        self.source = "From the management API" in page
        # queue, role, ready, unacked, consumers, publish/s, ack/s; by role
        self.queues = {row[1]: row for row in tables.get("queues", [])[1:]}
        self.workers = tables.get("workers", [])[1:]
        if self.worker is not None:
            self.stores_per_s = max(self.stores_per_s, number(self.worker[3]) or 0.0)

    @property
    def worker(self) -> list[str] | None:
        """The worker's row once found and read: ops URL, breaker, ready, stores/s, p50 ms,
        p95 ms, in flight / limit."""
        rows = [row for row in self.workers if row[0] == self.ops_url and len(row) == 7]
        return rows[0] if rows else None

    def consumers(self, role: str) -> str | None:
        """The consumers cell of a queue, by role, once shown."""
        row = self.queues.get(role)
        return row[4] if row else None

    def rated(self) -> bool:
        """Whether the worker has been read twice (it has a rate, if only 0.0)."""
        return self.worker is not None and self.worker[3] != "-"

    def complete(self) -> bool:
        """Whether every number the test checks has been shown at least once."""
        work, dlq = self.queues.get("work"), self.queues.get("dead letters")
        return (
            self.source
            and work is not None
            and dlq is not None
            and self.consumers("work") == "1"
            and "-" not in (work[3], work[5], work[6], dlq[5])
            and dlq[2] == str(DEAD)
            and self.stores_per_s > 0
        )


async def watch(http: aiohttp.ClientSession, seen: Seen, shown: Callable[[], bool]) -> None:
    """Read the overview fragment into `seen` until `shown()` (or time is up)."""
    deadline = time.monotonic() + STATS_WAIT_S
    while time.monotonic() < deadline:
        async with http.get("/overview") as response:
            assert response.status == 200
            seen.read(await response.text())
        if shown():
            return
        await asyncio.sleep(0.2)


# A private node's boot (when the session's broker has no management API) counts in this time.
@pytest.mark.timeout(300)
async def test_console_reads_queues_and_workers_from_the_management_api(
    make_settings, connection, management_url
):
    """The console shows the API's unacked and rates, the advertised worker's /metrics, the DLQ."""
    async with StandIn() as sb:
        settings = make_settings(
            pools={"session_buddy_url": sb.url, "max_concurrent_memory_insertions": LIMIT},
            rabbitmq={"management_url": management_url},
            worker={"ops_port": 0, "ops_host": "127.0.0.1"},
        )
        topology = Topology.from_settings(settings)
        async with Service(settings) as service, Publisher(connection, topology) as publisher:
            await publish(publisher, 0, VALID)
            await wait_until(lambda: sb.stats.stored == VALID)
            sb.config.reject = 1.0
            await publish(publisher, 100, REJECTED, pool="pool-b")
            for bodies in BROKEN.values():
                for body in bodies:
                    await publisher.publish_raw(body)
            await wait_until(lambda: service.metrics.counts["dead_letter"] == DEAD)
            sb.config.reject, sb.config.latency_s = 0.0, 0.25
            async with (
                ConsoleServer(settings, "127.0.0.1", 0, read_only=True, refresh_s=0.5) as console,
                aiohttp.ClientSession(console.url) as http,
            ):
                seen = Seen(f"http://127.0.0.1:{service.ops_port}")
                # The API lists a new connection only at its next statistics pass, so the
                # worker is found seconds after its start; it has a rate from its second read.
                await watch(http, seen, seen.rated)
                # Stores while the console watches, so a worker's rate is over a live window.
                await publish(publisher, 200, LATER)
                await watch(http, seen, seen.complete)
                await wait_until(lambda: sb.stats.stored == VALID + LATER)
                async with http.get("/dlq") as response:
                    groups = Tables(await response.text()).tables["groups"]
    work, dlq = seen.queues["work"], seen.queues["dead letters"]
    assert seen.source, "the overview never said it read the management API"
    # Unacked and rates: the passive declare the console falls back on has neither.
    assert work[4] == "1" and number(work[3]) is not None, work
    assert number(work[5]) is not None and number(work[6]) is not None, work
    assert number(dlq[2]) == DEAD and number(dlq[5]) is not None, dlq
    assert seen.stores_per_s > 0 and seen.worker is not None, seen.workers
    assert [row[0] for row in seen.workers] == [seen.ops_url], seen.workers
    assert seen.worker[1:3] == ["closed", "yes"], seen.worker
    # The stand-in's 250 ms stores: the latency comes from the worker's histogram.
    assert (number(seen.worker[4]) or 0) >= 100, seen.worker
    assert seen.worker[6].endswith(f"/ {LIMIT}"), seen.worker
    counts = {row[0]: int(row[1]) for row in groups[1:]}
    assert counts == {"rejected_by_sink": REJECTED, "invalid_json": 2, "schema": 1}, groups


@contextlib.asynccontextmanager
async def vhost(name: str) -> AsyncIterator[None]:
    """A vhost guest may use, deleted with everything in it at the end."""
    await rabbitmqctl("add_vhost", name)
    try:
        await rabbitmqctl("set_permissions", "-p", name, "guest", ".*", ".*", ".*")
        yield
    finally:
        await rabbitmqctl("delete_vhost", name)


@pytest.mark.timeout(300)
async def test_console_reads_its_own_vhost_and_only_its_workers(
    make_settings, amqp_url, management_url
):
    """In a vhost named with a slash the console reads its queues, not another vhost's worker."""
    if not has_rabbitmqctl():
        if os.environ.get("CI"):
            pytest.fail("rabbitmqctl is needed to add a vhost")
        pytest.skip("needs rabbitmqctl for the broker under test")
    name = f"mw-test/{uuid.uuid4().hex[:8]}"
    ops = {"ops_port": 0, "ops_host": "127.0.0.1"}
    async with StandIn() as sb, vhost(name):
        settings = make_settings(
            pools={"session_buddy_url": sb.url},
            rabbitmq={"url": amqp_url + quote(name, safe=""), "management_url": management_url},
            worker=ops,
        )
        # The same queue names in the default vhost, consumed by a worker of their own.
        elsewhere = make_settings(pools={"session_buddy_url": sb.url}, worker=ops)
        async with (
            Service(settings) as service,
            Service(elsewhere),
            ConsoleServer(settings, "127.0.0.1", 0, read_only=True, refresh_s=0.5) as console,
            aiohttp.ClientSession(console.url) as http,
        ):
            seen = Seen(f"http://127.0.0.1:{service.ops_port}")
            await watch(http, seen, lambda: seen.rated() and seen.consumers("work") == "1")
    assert seen.source and seen.consumers("work") == "1", seen.queues
    assert [row[0] for row in seen.workers] == [seen.ops_url], seen.workers
