"""The pool-manager adapter's bookkeeping, with a publisher that needs no broker."""

from __future__ import annotations

import json
from typing import Any, cast

from worker.pools import collect_and_publish
from worker.publisher import ConnectionLost, Publisher
from worker.testing.items import valid_item
from worker.topology import Tier, Topology

TOPOLOGY = Topology("x", "q", "x.retry", "x.dlx", "q.dlq", "quorum", 20, (Tier(1.0, "q.retry.1s"),))


class FlakyPublisher(Publisher):
    """Confirms every item except those whose content is listed in `lose`."""

    def __init__(self, lose: set[str]) -> None:
        super().__init__(cast(Any, None), TOPOLOGY)
        self.lose = lose
        self.sent: list[str] = []

    async def publish_raw(self, body: bytes, **kwargs: Any) -> None:
        content = json.loads(body)["content"]
        if content in self.lose:
            raise ConnectionLost("connection lost before the confirm")
        self.sent.append(content)


class Pool:
    """A pool handing over a fixed list."""

    def __init__(self, items: list[Any]) -> None:
        self.items = items

    async def collect_memory(self) -> list[Any]:
        """Hand over the items."""
        return self.items


class Manager:
    """Mahavishnu's two attributes the adapter uses."""

    def __init__(self, pools: dict[str, Pool]) -> None:
        self._pools = pools

    async def list_pools(self) -> list[dict[str, Any]]:
        """One dict per pool."""
        return [{"pool_id": pool_id} for pool_id in self._pools]


async def test_unconfirmed_items_come_back_with_their_pool():
    """An item whose publish was not confirmed is returned, with its pool, for a retry."""
    lost = valid_item("b2", pool_id="b")
    manager = Manager(
        {"a": Pool([valid_item("a1", pool_id="a")]), "b": Pool([valid_item("b1"), lost])}
    )
    publisher = FlakyPublisher(lose={"b2"})
    report = await collect_and_publish(manager, publisher)
    assert (report.pools, report.collected, report.published, report.failed) == (2, 3, 2, 1)
    [failure] = report.item_failures
    assert (failure.pool_id, failure.item) == ("b", lost) and "confirm" in failure.error
    assert sorted(publisher.sent) == ["a1", "b1"]


async def test_no_pools_is_an_empty_report():
    """A pool manager with no pools gives zero counts and no failures."""
    report = await collect_and_publish(Manager({}), FlakyPublisher(lose=set()))
    assert report.as_dict() | {"timestamp": 0} == {
        "pools": 0,
        "collected": 0,
        "published": 0,
        "failed": 0,
        "failed_pools": 0,
        "pools_synced": 0,
        "memory_items_synced": 0,
        "timestamp": 0,
    }
