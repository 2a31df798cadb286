"""The console's pure parts: grouping by reason, pages, worker metrics and their discovery."""

from __future__ import annotations

import socket

import httpx
from prometheus_client import generate_latest

from tests.unit.console_fakes import letter
from worker.broker import OPS_URL_PROPERTY, QUEUE_PROPERTY, advertise
from worker.console.groups import group_by_reason, page_of
from worker.console.queues import History, QueueRow, managed
from worker.console.workers import Workers, advertised, parse_metrics, quantile, view
from worker.metrics import Metrics
from worker.settings import load_settings
from worker.topology import Topology


def test_groups_count_each_reason_largest_first() -> None:
    """Each reason is one group with its count; larger groups come first, ties by name."""
    letters = [letter(0, "schema"), letter(1), letter(2), letter(3, "invalid_json")]
    groups = group_by_reason(letters)
    assert [(g.reason, g.count) for g in groups] == [
        ("rejected_by_sink", 2),
        ("invalid_json", 1),
        ("schema", 1),
    ]


def test_group_spans_oldest_to_newest_failure() -> None:
    """A group's oldest and newest failure are the extremes of its letters' last failures."""
    letters = [letter(0, last_ms=3000), letter(1, last_ms=1000), letter(2, last_ms=None)]
    (group,) = group_by_reason(letters)
    assert (group.oldest_ms, group.newest_ms) == (1000, 3000)


def test_group_names_the_most_common_detail_and_pools() -> None:
    """The most common sink text (whitespace folded) and the pools by count are shown."""
    letters = [
        letter(0, detail="guard  blocked", pool="b"),
        letter(1, detail="guard blocked", pool="a"),
        letter(2, detail="other", pool="a"),
        letter(3, detail="x", pool=None),
    ]
    (group,) = group_by_reason(letters)
    assert (group.top_detail, group.top_detail_count) == ("guard blocked", 2)
    assert group.pools == (("a", 2), ("-", 1), ("b", 1))
    assert sorted(group.fingerprints) == sorted(d.fingerprint for d in letters)


def test_pages_are_clamped_to_those_there_are() -> None:
    """A page number past the end shows the last page; below 1 the first."""
    letters = [letter(n) for n in range(5)]
    last = page_of(letters, 9, size=2)
    assert (last.number, last.pages, [d.position for d in last.rows]) == (3, 3, [4])
    assert page_of(letters, 0, size=2).rows == letters[:2]
    assert page_of([], 1).pages == 1


def test_worker_metrics_are_read_from_the_exposition() -> None:
    """Stored count, in flight, limit, breaker and readiness come from a worker's /metrics."""
    metrics = Metrics(8)
    for _ in range(4):
        metrics.settled("stored", "ack")
    metrics.settled("rejected", "dead_letter", "rejected_by_sink")
    metrics.breaker_state.set(2)
    reading = parse_metrics(generate_latest(metrics.registry).decode(), 10.0)
    assert (reading.stored, reading.limit, reading.breaker, reading.ready) == (4, 8, 2, False)


def test_rates_and_percentiles_come_from_two_readings() -> None:
    """Stores per second and p50/p95 describe what happened between two readings."""
    metrics = Metrics(8)
    metrics.sink_latency.observe(5.0)  # before the first reading: not in the window
    first = parse_metrics(generate_latest(metrics.registry).decode(), 10.0)
    for _ in range(10):
        metrics.settled("stored", "ack")
        metrics.sink_latency.observe(0.02)
    second = parse_metrics(generate_latest(metrics.registry).decode(), 12.0)
    shown = view("http://w:9464", second, first)
    assert shown.stores_per_s == 5.0
    assert shown.p50_ms is not None and 10 < shown.p50_ms <= 25
    assert shown.p95_ms is not None and shown.p95_ms <= 25


def test_quantile_of_an_empty_histogram_is_unknown() -> None:
    """No observation, no percentile."""
    assert quantile(((0.1, 0.0), (float("inf"), 0.0)), 0.5) is None


def test_workers_are_found_by_the_properties_they_advertise() -> None:
    """Only connections that advertise an ops URL for the console's queue are workers."""
    settings = load_settings({"worker": {"ops_host": "127.0.0.1"}})
    mine = advertise(settings, 9464)
    assert mine == {OPS_URL_PROPERTY: "http://127.0.0.1:9464", QUEUE_PROPERTY: "memory.items"}
    connections = [
        {"client_properties": mine},
        {"client_properties": {**mine, QUEUE_PROPERTY: "other.items"}},
        {"client_properties": {"connection_name": "memory-worker dlq-read"}},
        {"client_properties": {**mine, OPS_URL_PROPERTY: "javascript:alert(1)"}},
    ]
    assert advertised(connections, "memory.items") == ["http://127.0.0.1:9464"]
    assert advertise(settings, None) == {}


def test_workers_of_the_same_queue_in_another_vhost_are_not_the_consoles() -> None:
    """A worker advertising the console's queue name in another vhost is not one of its own."""
    props = {OPS_URL_PROPERTY: "http://10.0.0.1:9464", QUEUE_PROPERTY: "memory.items"}
    staging = {OPS_URL_PROPERTY: "http://10.0.0.2:9464", QUEUE_PROPERTY: "memory.items"}
    connections = [
        {"client_properties": props, "vhost": "prod"},
        {"client_properties": staging, "vhost": "staging"},
    ]
    assert advertised(connections, "memory.items", "prod") == ["http://10.0.0.1:9464"]


def test_a_worker_on_every_address_advertises_one_others_can_reach(monkeypatch) -> None:
    """Bound to 0.0.0.0, a worker advertises the address its host name resolves to."""
    monkeypatch.setattr(socket, "gethostname", lambda: "pod-7")
    monkeypatch.setattr(socket, "gethostbyname", lambda name: "10.0.0.7")
    settings = load_settings({"worker": {"ops_host": "0.0.0.0"}})
    assert advertise(settings, 9464)[OPS_URL_PROPERTY] == "http://10.0.0.7:9464"

    def unresolvable(name: str) -> str:
        raise OSError(name)

    monkeypatch.setattr(socket, "gethostbyname", unresolvable)
    assert advertise(settings, 9464)[OPS_URL_PROPERTY] == "http://pod-7:9464"


def test_history_draws_each_series_inside_the_box() -> None:
    """The graph's points span the box's width and stay within its height."""
    history = History()
    rows = [QueueRow("q", "work", 4, 0, 1), QueueRow("r", "retry 1s", 2, 0, 0)]
    rows.append(QueueRow("d", "dead letters", 8, None, 0))
    history.add(rows, at_s=100.0)
    history.add([QueueRow("q", "work", 0, 0, 1), rows[1], rows[2]], at_s=160.0)
    lines = history.polylines(width=100, height=50)
    assert lines["work"] == "0.0,25.0 100.0,50.0"
    assert lines["dlq"] == "0.0,0.0 100.0,0.0"
    assert (history.peak, history.span_s) == (8, 60.0)


async def test_management_api_gives_depths_consumers_and_rates() -> None:
    """Each queue's ready, unacked, consumers and rates come from GET /api/queues/<vhost>."""
    seen: list[httpx.Request] = []

    def answer(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        queues = [
            {
                "name": "memory.items",
                "messages_ready": 5,
                "messages_unacknowledged": 2,
                "consumers": 3,
                "message_stats": {"publish_details": {"rate": 12.5}, "ack_details": {"rate": 11}},
            },
            {"name": "memory.items.dlq", "messages_ready": 9, "consumers": 0},
            {"name": "someone.else", "messages_ready": 1},
        ]
        return httpx.Response(200, json=queues)

    settings = load_settings({"retry": {"tiers_s": [1]}})
    async with httpx.AsyncClient(transport=httpx.MockTransport(answer)) as client:
        rows = await managed(
            client,
            "http://mon:pw@rabbit:15672/",
            "amqp://u:p@rabbit/prod",
            Topology.from_settings(settings),
        )
    assert [(r.role, r.ready, r.unacked, r.consumers) for r in rows] == [
        ("work", 5, 2, 3),
        ("retry 1s", None, None, None),
        ("dead letters", 9, None, 0),
    ]
    assert (rows[0].publish_rate, rows[0].ack_rate) == (12.5, 11.0)
    assert str(seen[0].url) == "http://rabbit:15672/api/queues/prod"
    assert seen[0].headers["Authorization"].startswith("Basic ")


async def test_workers_poll_tells_an_open_breaker_and_a_silent_worker() -> None:
    """A worker whose breaker is open makes `breaker_open` true; one that fails says why."""
    metrics = Metrics(4)
    metrics.breaker_state.set(2)
    exposition = generate_latest(metrics.registry)

    def answer(request: httpx.Request) -> httpx.Response:
        if request.url.host == "down":
            return httpx.Response(503)
        return httpx.Response(200, content=exposition)

    workers = Workers()
    async with httpx.AsyncClient(transport=httpx.MockTransport(answer)) as client:
        await workers.poll(client, ["http://up:9464", "http://down:9464"], 1.0)
    up, down = workers.views
    assert (up.breaker, up.limit, up.error) == ("open", 4, None)
    assert down.error == "HTTPStatusError" and workers.breaker_open
