"""The overview's poller against a fake management API and a fake worker on loopback."""

from __future__ import annotations

from aiohttp import web
from aiohttp.test_utils import TestServer
from prometheus_client import generate_latest

from worker.broker import OPS_URL_PROPERTY, QUEUE_PROPERTY
from worker.console.monitor import Monitor
from worker.metrics import Metrics
from worker.settings import load_settings


def fake_broker(metrics: Metrics) -> web.Application:
    """GET /api/queues/<vhost>, /api/connections and a worker's /w/metrics."""

    async def queues(request: web.Request) -> web.Response:
        assert request.match_info["vhost"] in ("%2F", "/")
        return web.json_response([{"name": "memory.items", "messages_ready": 7, "consumers": 1}])

    async def connections(request: web.Request) -> web.Response:
        base = f"http://{request.host}/w"
        props = {OPS_URL_PROPERTY: base, QUEUE_PROPERTY: "memory.items"}
        return web.json_response([{"client_properties": props}, {"client_properties": {}}])

    async def worker_metrics(_: web.Request) -> web.Response:
        return web.Response(body=generate_latest(metrics.registry), content_type="text/plain")

    app = web.Application()
    app.router.add_get("/api/queues/{vhost}", queues)
    app.router.add_get("/api/connections", connections)
    app.router.add_get("/w/metrics", worker_metrics)
    return app


async def test_management_api_feeds_queues_and_finds_workers() -> None:
    """With management_url set, depths come from the API and workers from its connections."""
    metrics = Metrics(6)
    async with TestServer(fake_broker(metrics), host="127.0.0.1") as server:
        port = server.port
        url = f"http://mon:pw@127.0.0.1:{port}/"
        settings = load_settings({"rabbitmq": {"management_url": url}})
        async with Monitor(settings, None, refresh_s=60) as monitor:  # type: ignore[arg-type]
            metrics.settled("stored", "ack")
            await monitor.poll()
    assert monitor.source == "management API" and monitor.error is None
    assert (monitor.rows[0].ready, monitor.rows[0].consumers) == (7, 1)
    (worker,) = monitor.workers.views
    assert worker.url == f"http://127.0.0.1:{port}/w" and worker.limit == 6
    assert worker.stores_per_s is not None and worker.stores_per_s > 0
    assert len(monitor.history.samples) == 2


async def test_a_cluster_url_reads_the_queues_of_its_vhost() -> None:
    """With several nodes in rabbitmq.url the queues are read in their vhost, not a mangled one."""
    asked: list[str] = []

    async def queues(request: web.Request) -> web.Response:
        asked.append(request.match_info["vhost"])
        return web.json_response([{"name": "memory.items", "messages_ready": 2, "consumers": 0}])

    async def connections(_: web.Request) -> web.Response:
        return web.json_response([])

    app = web.Application()
    app.router.add_get("/api/queues/{vhost}", queues)
    app.router.add_get("/api/connections", connections)
    async with TestServer(app, host="127.0.0.1") as server:
        nodes = "amqp://g:g@10.0.0.1:5672/prod,amqp://g:g@10.0.0.2:5672/prod"
        settings = load_settings(
            {"rabbitmq": {"url": nodes, "management_url": f"http://127.0.0.1:{server.port}/"}}
        )
        async with Monitor(settings, None, refresh_s=60) as monitor:  # type: ignore[arg-type]
            pass
    assert asked == ["prod"] and monitor.error is None
    assert monitor.rows[0].ready == 2
