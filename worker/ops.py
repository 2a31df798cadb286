"""The ops HTTP port: Prometheus `/metrics`, ACT-008's metrics as JSON, health and readiness.

Its one changing request, `POST /insertion-metrics/reset`, passes the console's guard
(`worker.guard`): not from another site's page, and from curl only with `console.token`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from types import TracebackType
from typing import Self

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import SecretStr

from worker.guard import change_refusal
from worker.metrics import Metrics


class OpsServer:
    """Serves `/metrics`, `/insertion-metrics`, `/healthz` and `/readyz` on its own port."""

    def __init__(
        self,
        metrics: Metrics,
        ready: Callable[[], bool],
        host: str,
        port: int,
        about: Callable[[], Mapping[str, object]] | None = None,
        token: SecretStr | None = None,
    ) -> None:
        self._metrics = metrics
        self._token = token
        self._ready = ready
        # What /readyz says besides ready or not: the broker node the worker is on.
        self._about = about
        # Readiness as a metric too, so an alert sees a worker that runs but does not consume.
        metrics.ready_gauge.set_function(lambda: 1.0 if ready() else 0.0)
        self._host = host
        self._port = port
        self._runner: web.AppRunner | None = None
        self.port: int | None = None

    async def __aenter__(self) -> Self:
        app = web.Application()
        app.router.add_get("/metrics", self._prometheus)
        app.router.add_get("/insertion-metrics", self._insertion)
        app.router.add_post("/insertion-metrics/reset", self._reset)
        app.router.add_get("/healthz", self._health)
        app.router.add_get("/readyz", self._readiness)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self._host, self._port)
        await site.start()
        server = site._server
        sockets = getattr(server, "sockets", None) or []
        self.port = sockets[0].getsockname()[1] if sockets else self._port
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def _prometheus(self, request: web.Request) -> web.Response:
        body = generate_latest(self._metrics.registry)
        return web.Response(body=body, headers={"content-type": CONTENT_TYPE_LATEST})

    async def _insertion(self, request: web.Request) -> web.Response:
        return web.json_response(self._metrics.get_insertion_metrics())

    async def _reset(self, request: web.Request) -> web.Response:
        # The console's guard: a page on another site must not zero the counters.
        refusal = change_refusal(request.method, request.headers, self._token)
        if refusal is not None:
            return web.json_response({"error": refusal}, status=403)
        self._metrics.reset_metrics()
        return web.json_response(self._metrics.get_insertion_metrics())

    async def _health(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def _readiness(self, request: web.Request) -> web.Response:
        ready = self._ready()
        about = self._about() if self._about is not None else {}
        return web.json_response({"ready": ready, **about}, status=200 if ready else 503)
