"""A three-node RabbitMQ 4.3 cluster loses its queue leader, then a worker's node, mid-run.

The cluster is private (`cluster.py`): three 4.3 nodes from `tests/rabbitmq4/prepare.sh`'s
tree, a quorum work queue with a replica on each. Two workers run in this process, A connected
to node 1 and B to node 2; the work queue's leader starts on node 3, where no worker is. The
run's three faults, in order, while a few thousand items flow:

(a) node 3, the queue leader, stops cleanly and comes back: a new leader takes over at once;
(b) node 2, B's node (sometimes the new leader too), is SIGKILLed: B's connection drops with
    stores in flight, their acks are lost, and B fails over to the next node in its
    `rabbitmq.url`; the queue hands the deliveries B held to a consumer once the
    consumer-disconnected timeout (set short by policy here, see `DISCONNECTED_TIMEOUT_MS`)
    has passed;
(c) node 2 comes back and rejoins; both workers go on where they are.

With `FAILOVER = False` each worker is given its own node only: B then keeps retrying node 2
(`/readyz` 503) until (c) brings it back.

Without a prepared 4.3 the test skips; in CI (where `.ci/run` prepares 4.3), or when 4.3 was
asked for, it fails instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
from collections.abc import AsyncIterator, Awaitable, Iterator
from dataclasses import dataclass

import aio_pika
import pytest
from structlog.testing import capture_logs

from tests.faults.broker_node import BrokerNodeError, find_install, selected_version
from tests.faults.cluster import BrokerCluster, ClusterNode, Replicas
from tests.faults.ledger import EarlyAcks, drained, tally, unacked_deliveries, via
from tests.integration.helpers import publish_items, rabbitmqctl_for, wait_until
from worker.broker import shown
from worker.outcome import Reason
from worker.service import Service
from worker.settings import Settings
from worker.testing import StandIn, StandInConfig
from worker.topology import Topology

pytestmark = [pytest.mark.integration, pytest.mark.faults]

#: Each worker's `rabbitmq.url` lists every node, its own first, as a cluster's workers are
#: configured; False gives each worker its own node only (no failover).
FAILOVER = True
#: How long a quorum queue keeps the deliveries of a consumer whose node is gone before it
#: returns them (4.3's default: 60 s, during which they are stuck). A worker's deliveries are
#: worth returning soon: their acks died with the node, and a redelivery costs at most a
#: duplicate. Set by policy (`consumer-disconnected-timeout`), as an operator would.
#: `MW_CLUSTER_DISCONNECTED_TIMEOUT_MS` changes it for a try (60000, the default's stall, needs
#: a GOOD of about 6,000 for the run to outlast the wait).
DISCONNECTED_TIMEOUT_MS = int(os.environ.get("MW_CLUSTER_DISCONNECTED_TIMEOUT_MS", "5000"))
#: Stand-in latency during the faults: 10 stores at once make ~65 items a second, so the run
#: outlasts the three faults; it drops to 0 for the rest.
PACE_S = 0.15
GOOD, BAD = 3_000, 10


@pytest.fixture(scope="module")
def cluster() -> Iterator[BrokerCluster]:
    """Three private 4.3 nodes in one cluster, for this module; removed at the end."""
    try:
        install = find_install("4.3")  # whatever the suite runs on: the cluster is 4.3
    except BrokerNodeError as exc:
        message = f"{exc}: this test starts a private three-node cluster"
        if os.environ.get("CI") or selected_version():
            pytest.fail(message)
        pytest.skip(message)
    with BrokerCluster(install) as nodes, rabbitmqctl_for(nodes.nodes[0].ctl):
        yield nodes


@pytest.fixture(scope="module")
def amqp_url(cluster: BrokerCluster) -> str:
    """Settings, teardown and `connection` use node 1, which the test never stops."""
    return cluster.nodes[0].amqp_url


def worker_url(own: ClusterNode, cluster: BrokerCluster) -> str:
    """A worker's `rabbitmq.url`: its own node, then (with `FAILOVER`) the others."""
    nodes = [own, *(n for n in cluster.nodes if n is not own)] if FAILOVER else [own]
    return ",".join(via(node.amqp_url) for node in nodes)


@contextlib.asynccontextmanager
async def connected(node: ClusterNode) -> AsyncIterator[aio_pika.abc.AbstractRobustConnection]:
    """A connection to one node of the cluster."""
    connection = await aio_pika.connect_robust(node.amqp_url)
    async with connection:
        yield connection


async def publish_run(connection, settings: Settings) -> None:
    """GOOD valid items with BAD broken bodies spread among them, so some meet the faults."""
    topology = Topology.from_settings(settings)
    chunk = GOOD // BAD
    async with connection.channel(publisher_confirms=True) as channel:
        exchange = await channel.get_exchange(topology.exchange, ensure=False)
        for n in range(BAD):
            await publish_items(connection, settings, chunk, start=n * chunk)
            broken = aio_pika.Message(
                b'{"content": "cut short %d", "meta' % n,
                content_type="application/json",
                message_id=f"bad-{n}",
                delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            )
            await exchange.publish(broken, topology.queue, mandatory=True)


@dataclass
class Phase:
    """One stretch of the run: what the stand-in saw during it."""

    name: str
    started_s: float
    stored_before: int
    duplicates_before: int
    seconds: float = 0.0
    stored: int = 0
    duplicates: int = 0
    longest_gap_s: float = 0.0  # the longest time between two store calls ending


class Timeline:
    """Stores, duplicates and the longest pause in stores, per phase of the run."""

    def __init__(self, sb: StandIn) -> None:
        self._sb = sb
        self.phases: list[Phase] = []
        self._task: asyncio.Task[None] | None = None

    def phase(self, name: str) -> None:
        """End the current phase and start one called `name`."""
        stats, now = self._sb.stats, asyncio.get_running_loop().time()
        self._close(now)
        self.phases.append(Phase(name, now, stats.stored, stats.duplicates))

    def _close(self, now: float) -> None:
        if self.phases:
            last, stats = self.phases[-1], self._sb.stats
            last.seconds = now - last.started_s
            last.stored = stats.stored - last.stored_before
            last.duplicates = stats.duplicates - last.duplicates_before

    async def _watch(self) -> None:
        # A pause counts where the next store ends it: the quiet after the last store is none.
        loop = asyncio.get_running_loop()
        seen, since = self._sb.stats.stored, loop.time()
        while True:
            await asyncio.sleep(0.02)
            stored, now = self._sb.stats.stored, loop.time()
            if stored != seen:
                phase = self.phases[-1]
                phase.longest_gap_s = max(phase.longest_gap_s, now - since)
                seen, since = stored, now

    async def __aenter__(self) -> Timeline:
        self.phase("before the faults")
        self._task = asyncio.create_task(self._watch())
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        self._close(asyncio.get_running_loop().time())

    def __str__(self) -> str:
        rows = [
            f"  {p.name:<44} {p.seconds:5.1f} s  {p.stored:5d} stores  "
            f"{p.duplicates:2d} duplicates  longest pause {p.longest_gap_s:4.2f} s"
            for p in self.phases
        ]
        return "\n".join(["cluster run, by phase:", *rows])


async def online_replicas(cluster: BrokerCluster, queue: str, count: int) -> None:
    """Wait until `count` of the queue's replicas are online."""
    for _ in range(120):
        if len((await cluster.replicas(queue)).online) >= count:
            return
        await asyncio.sleep(0.5)
    raise AssertionError(f"{queue}: {count} replicas never online: {await cluster.replicas(queue)}")


async def consumers_on(cluster: BrokerCluster, queue: str) -> int:
    """Consumers the cluster has on `queue`."""
    raw = await cluster.nodes[0].ctl("list_consumers", "--no-table-headers", "queue_name")
    return sum(line.strip() == queue for line in raw.splitlines())


async def declare_led_by(node: ClusterNode, settings: Settings) -> None:
    """Set the test's policy, then declare the topology through `node`, which leads the queue."""
    queue = settings.rabbitmq.queue
    definition = {
        "consumer-disconnected-timeout": DISCONNECTED_TIMEOUT_MS,
        # The leader on the declaring node, so that (a) takes no worker's node with it.
        "queue-leader-locator": "client-local",
    }
    # It covers the work, retry and dead-letter queues, and goes away with the cluster.
    pattern = "^" + re.escape(queue)
    await node.ctl("set_policy", f"{queue}-cluster", pattern, json.dumps(definition))
    async with connected(node) as connection:
        await Topology.from_settings(settings).declare(connection)


@dataclass
class Seen:
    """What the run saw besides the ledger: leaders, readiness, what was left at the end."""

    moved: Replicas  # just after node 3, the first leader, stopped
    leader_at_kill: str
    returned_after_s: float | None  # from the kill until B's deliveries were stored again
    end: Replicas
    ready_without_leader: bool
    a_ready_while_down: bool
    b_ready_while_down: bool
    b_stores_while_down: int  # once its stores in flight at the kill had ended
    ready_at_end: bool
    consumers: int
    unacked: int
    took_s: dict[str, float]  # how long each node operation took


async def timed(operation: Awaitable[object]) -> float:
    """Seconds `operation` took."""
    loop = asyncio.get_running_loop()
    started = loop.time()
    await operation
    return loop.time() - started


def late_settlements(service: Service) -> int:
    """Acks and other settlements the worker dropped because their channel had closed."""
    value = service.metrics.registry.get_sample_value("memory_worker_late_settlements_total")
    return int(value or 0)


def node_of(cluster: BrokerCluster, url: str) -> str:
    """The label ("node N") of the node whose URL a log line shows."""
    return next((f"node {n.index}" for n in cluster.nodes if f":{n.port}/" in url), url)


async def first_duplicate(sb: StandIn, before: int, since: float) -> float | None:
    """Seconds from `since` until a store beyond `before` duplicates; None if none within
    the consumer-disconnected timeout and 10 s more.

    The deliveries B held when its node died come back to A, or to B on its new node, whose
    cache of recently stored keys acks them unstored; those A gets that B had already stored
    are stored again, so the first duplicate dates their return.
    """
    loop = asyncio.get_running_loop()
    deadline = since + DISCONNECTED_TIMEOUT_MS / 1000 + 10
    while sb.stats.duplicates <= before:
        if loop.time() > deadline:
            return None
        await asyncio.sleep(0.02)
    return loop.time() - since


async def three_faults(
    cluster: BrokerCluster,
    connection: aio_pika.abc.AbstractRobustConnection,
    queue: str,
    sb: StandIn,
    workers: tuple[Service, Service],
    early: EarlyAcks,
    timeline: Timeline,
) -> Seen:
    """(a) stop the leader, node 3, and restart it; (b) SIGKILL B's node, 2; (c) restart it;
    then let the run finish at full speed and drain."""
    _, n2, n3 = cluster.nodes
    worker_a, worker_b = workers
    await wait_until(lambda: sb.stats.distinct_keys >= 200, 60)

    took_s = {}
    timeline.phase("(a) leader (node 3) stopped")
    took_s["node 3 stop"] = await timed(asyncio.to_thread(n3.halt))
    at_stop = sb.stats.distinct_keys
    await wait_until(lambda: sb.stats.distinct_keys >= at_stop + 100, 60)
    moved = await cluster.replicas(queue)
    ready_without_leader = worker_a.ready and worker_b.ready
    timeline.phase("(a) node 3 restarting")
    took_s["node 3 boot"] = await timed(n3.restart())
    await online_replicas(cluster, queue, 3)

    timeline.phase("(b) B's node (node 2) SIGKILLed")
    leader_at_kill = (await cluster.replicas(queue)).leader
    # B's stores outlive its channel, and its new connection appears later: samples in
    # between would read either as early acks.
    async with early.paused():
        duplicates, killed_at = sb.stats.duplicates, asyncio.get_running_loop().time()
        await asyncio.to_thread(n2.kill)
        at_kill = sb.stats.distinct_keys
        await wait_until(lambda: sb.stats.distinct_keys >= at_kill + 100, 60)
        a_ready_while_down, b_ready_while_down = worker_a.ready, worker_b.ready
        b_stored = worker_b.metrics.total_items_inserted
        returned_after_s = await first_duplicate(sb, duplicates, killed_at)
        b_stores_while_down = worker_b.metrics.total_items_inserted - b_stored
        timeline.phase("(c) node 2 restarting")
        took_s["node 2 boot"] = await timed(n2.restart())
        await wait_until(lambda: worker_b.ready, 60)
        b_before = worker_b.metrics.total_items_inserted
        await wait_until(lambda: worker_b.metrics.total_items_inserted >= b_before + 20)

    timeline.phase("after the faults, at full speed")
    assert sb.stats.distinct_keys < GOOD, "the run ended before the faults did"
    sb.config.latency_s = 0.0
    await wait_until(lambda: sb.stats.distinct_keys == GOOD, 120)
    await drained(connection, worker_a.settings, sb, dead=BAD, timeout_s=60)
    names = [f"memory-worker {w.settings.worker.id}" for w in workers]
    return Seen(
        moved=moved,
        leader_at_kill=leader_at_kill,
        returned_after_s=returned_after_s,
        end=await cluster.replicas(queue),
        ready_without_leader=ready_without_leader,
        a_ready_while_down=a_ready_while_down,
        b_ready_while_down=b_ready_while_down,
        b_stores_while_down=b_stores_while_down,
        ready_at_end=worker_a.ready and worker_b.ready,
        consumers=await consumers_on(cluster, queue),
        unacked=await unacked_deliveries(*names),
        took_s=took_s,
    )


@pytest.mark.timeout(400)
async def test_cluster_loses_its_leader_and_a_workers_node_and_nothing_is_lost(
    cluster, make_settings, connection
):
    """Leader stopped, B's node SIGKILLed (B fails over) and brought back, 3,000 items on 3
    nodes: none lost, no early acks, duplicates within B's prefetch, dead letters = bad input."""
    n1, n2, n3 = cluster.nodes
    async with StandIn(StandInConfig(latency_s=PACE_S)) as sb:
        pools = {"session_buddy_url": sb.url, "max_concurrent_memory_insertions": 5}
        make_settings()  # first: the fixture deletes the queues through it, on node 1
        a, b = (
            make_settings(
                pools=pools,
                worker={"id": f"cluster-{name}"},
                rabbitmq={"url": worker_url(node, cluster)},
            )
            for name, node in (("a", n1), ("b", n2))
        )
        queue = a.rabbitmq.queue
        await declare_led_by(n3, a)
        start = await cluster.replicas(queue)
        assert start.leader == n3.name and len(start.members) == 3, start
        await publish_run(connection, a)
        # Captured, not printed: the ledger would be lost in a line per item.
        with capture_logs() as logs:
            async with (
                Service(a) as worker_a,
                Service(b) as worker_b,
                EarlyAcks(sb, a, b, interval_s=1.0) as early,
                Timeline(sb) as timeline,
            ):
                workers = (worker_a, worker_b)
                seen = await three_faults(cluster, connection, queue, sb, workers, early, timeline)
                late = [late_settlements(worker) for worker in workers]
                cached = [worker.metrics.counts["outcome:duplicate"] for worker in workers]
        ledger = await tally(connection, a, sb, GOOD + BAD, early)
    name = cluster.label
    took = ", ".join(f"{what} {s:.1f} s" for what, s in seen.took_s.items())
    print(f"cluster of 3 formed in {cluster.formed_in_s:.1f} s; {took}")
    print(timeline)
    print(
        f"queue leader: {name(start.leader)}, then {name(seen.moved.leader)} once node 3 "
        f"stopped; {name(seen.leader_at_kill)} when node 2 was killed; {name(seen.end.leader)} "
        f"at the end, {len(seen.end.online)} replicas online, {seen.consumers} consumers"
    )
    returned = "none" if seen.returned_after_s is None else f"{seen.returned_after_s:.1f} s"
    print(f"first of B's deliveries stored again by A after the kill: {returned}")
    print(f"late settlements (dropped with their channel): A {late[0]}, B {late[1]}")
    print(f"redeliveries acked unstored from a worker's recent keys: A {cached[0]}, B {cached[1]}")
    failovers = [e for e in logs if e["event"] == "broker_failover"]
    moves = [f"{node_of(cluster, e['previous'])} → {node_of(cluster, e['url'])}" for e in failovers]
    print(
        f"B while node 2 was down: ready {seen.b_ready_while_down}, "
        f"{seen.b_stores_while_down} stores; failovers: {moves or 'none'}"
    )
    print(f"cluster ledger: {ledger}")
    assert seen.moved.leader in (n1.name, n2.name) and n3.name not in seen.moved.online
    assert seen.ready_without_leader and seen.a_ready_while_down and seen.ready_at_end
    # With failover B consumes on another node while its own is down; without, it waits.
    assert seen.b_ready_while_down == FAILOVER
    assert (seen.b_stores_while_down > 0) == FAILOVER
    assert [e["previous"] for e in failovers] == ([shown(n2.amqp_url)] if FAILOVER else [])
    assert len(seen.end.online) == 3 and seen.consumers == 2 and seen.unacked == 0
    assert ledger.lost == 0 and ledger.stored == GOOD and ledger.still_queued == 0
    assert ledger.dead_lettered == {Reason.INVALID_JSON: BAD}
    assert ledger.early_acks == 0
    # A leader change loses no delivery; the kill returns what B held, at most its prefetch.
    assert ledger.duplicates <= b.prefetch
    assert late[0] == 0 and late[1] <= b.prefetch  # only B lost a channel, with what it held
