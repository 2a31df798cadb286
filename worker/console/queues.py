"""Queue depths for the overview: the management API when set, else a passive declare each.

The management API adds unacked counts and rates (publish, ack, dead-lettered: what the DLQ
receives); a passive declare knows only ready messages and consumers. The last minutes of
depths are kept for the overview's graph.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass
from typing import Any

import aiormq
import httpx
from aio_pika.abc import AbstractConnection

from worker.addresses import vhost
from worker.management import api_url
from worker.topology import Topology

#: Samples kept for the graph: ten minutes at the overview's refresh period.
HISTORY = 200
GRAPH_W, GRAPH_H = 480, 120


@dataclass(frozen=True, slots=True)
class QueueRow:
    """One queue's line in the overview; None where the source cannot tell."""

    name: str
    role: str
    ready: int | None
    unacked: int | None
    consumers: int | None
    publish_rate: float | None = None
    ack_rate: float | None = None

    @property
    def depth(self) -> int:
        """Ready and unacked messages together."""
        return (self.ready or 0) + (self.unacked or 0)


def roles(topology: Topology) -> list[tuple[str, str]]:
    """(queue, role) for the work queue, each retry tier and the DLQ, in that order."""
    tiers = [(t.queue, f"retry {t.delay_s:g}s") for t in topology.tiers]
    return [(topology.queue, "work"), *tiers, (topology.dead_letter_queue, "dead letters")]


async def passive(connection: AbstractConnection, topology: Topology) -> list[QueueRow]:
    """Ready messages and consumers of each queue by passive declare (no management API)."""
    rows = []
    for name, role in roles(topology):
        try:
            async with connection.channel() as channel:
                declared = await channel.declare_queue(name, passive=True)
        except aiormq.exceptions.ChannelNotFoundEntity:
            rows.append(QueueRow(name, role, None, None, None))
            continue
        result = declared.declaration_result
        rows.append(QueueRow(name, role, result.message_count, None, result.consumer_count))
    return rows


async def managed(
    client: httpx.AsyncClient, management_url: str, amqp_url: str, topology: Topology
) -> list[QueueRow]:
    """Depths, consumers and rates of each queue from the management API.

    `amqp_url` is one broker address (a cluster's nodes share the vhost): the whole
    comma-separated `rabbitmq.url` would put the other nodes' addresses into the vhost.
    """
    url, auth = api_url(management_url, "queues", vhost(amqp_url))
    response = await client.get(url, auth=auth)
    response.raise_for_status()
    found = {q.get("name"): q for q in response.json() if isinstance(q, dict)}
    return [_row(name, role, found.get(name)) for name, role in roles(topology)]


def _rate(stats: dict[str, Any], key: str) -> float | None:
    details = stats.get(f"{key}_details")
    rate = details.get("rate") if isinstance(details, dict) else None
    return float(rate) if isinstance(rate, int | float) else None


def _row(name: str, role: str, queue: dict[str, Any] | None) -> QueueRow:
    if queue is None:
        return QueueRow(name, role, None, None, None)
    stats = queue.get("message_stats") or {}
    return QueueRow(
        name,
        role,
        queue.get("messages_ready"),
        queue.get("messages_unacknowledged"),
        queue.get("consumers"),
        _rate(stats, "publish"),
        _rate(stats, "ack"),
    )


class History:
    """Depths of the work queue, the retry tiers together and the DLQ, over the last minutes."""

    def __init__(self, size: int = HISTORY) -> None:
        self.samples: deque[tuple[float, int, int, int]] = deque(maxlen=size)

    def add(self, rows: list[QueueRow], at_s: float | None = None) -> None:
        """Record one sample from the overview's rows (work first, DLQ last)."""
        if not rows:
            return
        retry = sum(r.depth for r in rows[1:-1])
        self.samples.append((at_s or time.time(), rows[0].depth, retry, rows[-1].depth))

    def polylines(self, width: int = GRAPH_W, height: int = GRAPH_H) -> dict[str, str]:
        """SVG polyline points per series (work, retry, dlq), scaled to the box."""
        if len(self.samples) < 2:
            return {}
        t0, t1 = self.samples[0][0], self.samples[-1][0]
        top = max(1, *(max(s[1:]) for s in self.samples))
        span = max(t1 - t0, 1e-9)
        lines = {}
        for index, series in enumerate(("work", "retry", "dlq"), start=1):
            points = (
                f"{(s[0] - t0) / span * width:.1f},{height - s[index] / top * height:.1f}"
                for s in self.samples
            )
            lines[series] = " ".join(points)
        return lines

    @property
    def peak(self) -> int:
        """The largest depth in the graph (its top)."""
        return max((max(s[1:]) for s in self.samples), default=0)

    @property
    def span_s(self) -> float:
        """Seconds the graph covers."""
        return self.samples[-1][0] - self.samples[0][0] if len(self.samples) > 1 else 0.0
