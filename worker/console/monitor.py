"""The overview's poller: queue depths and workers every few seconds, in one reaped task."""

from __future__ import annotations

import asyncio
import contextlib
import time
from types import TracebackType
from typing import Self

import httpx
import structlog
from aio_pika.abc import AbstractConnection
from aio_pika.exceptions import CONNECTION_EXCEPTIONS

from worker.addresses import vhost
from worker.console import queues
from worker.console.workers import Workers, advertised
from worker.management import api_url
from worker.settings import Settings
from worker.topology import Topology

log = structlog.get_logger("worker.console")

#: How often the overview's numbers are read; the page refreshes at the same pace.
REFRESH_S = 3.0
#: One management API or /metrics read; a slow one delays only the next refresh.
HTTP_TIMEOUT_S = 2.0


class Monitor:
    """Reads queues and workers every `refresh_s`; the overview shows the last reading."""

    def __init__(
        self, settings: Settings, connection: AbstractConnection, refresh_s: float = REFRESH_S
    ) -> None:
        self._settings = settings
        self._connection = connection
        self._topology = Topology.from_settings(settings)
        self.refresh_s = refresh_s
        self.rows: list[queues.QueueRow] = []
        self.history = queues.History()
        self.workers = Workers()
        self.source = "passive declare"
        self.error: str | None = None
        self.polled_at: float | None = None
        self._stack = contextlib.AsyncExitStack()
        self._client: httpx.AsyncClient | None = None
        self._task: asyncio.Task[None] | None = None

    def __repr__(self) -> str:
        return f"<Monitor source={self.source!r} workers={len(self.workers.views)}>"

    async def __aenter__(self) -> Self:
        self._client = await self._stack.enter_async_context(
            httpx.AsyncClient(timeout=HTTP_TIMEOUT_S)
        )
        try:
            await self.poll()
        except BaseException:
            await self._stack.aclose()
            raise
        self._task = asyncio.create_task(self._loop(), name="console-monitor")
        self._task.add_done_callback(_reap)
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self._stack.aclose()

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.refresh_s)
            await self.poll()

    async def poll(self) -> None:
        """Read the queues and the workers once."""
        client = self._client
        if client is None:
            raise RuntimeError("not open: use `async with Monitor(...)`")
        mq = self._settings.rabbitmq
        management = mq.management_url.get_secret_value() if mq.management_url else None
        # One address: every node of a cluster serves the worker's vhost.
        amqp = mq.urls[0]
        urls = [str(u).rstrip("/") for u in self._settings.console.workers]
        self.error = None
        try:
            if management is not None:
                self.rows = await queues.managed(client, management, amqp, self._topology)
                self.source = "management API"
                urls = sorted({*urls, *await self._advertised(client, management, amqp)})
            else:
                self.rows = await queues.passive(self._connection, self._topology)
            self.history.add(self.rows)
        except (httpx.HTTPError, ValueError, *CONNECTION_EXCEPTIONS) as exc:
            self.error = f"{type(exc).__name__}: {exc}"
        await self.workers.poll(client, urls, time.monotonic())
        self.polled_at = time.time()

    async def _advertised(self, client: httpx.AsyncClient, management: str, amqp: str) -> list[str]:
        url, auth = api_url(management, "connections")
        columns = {"columns": "client_properties,vhost"}
        response = await client.get(url, params=columns, auth=auth)
        response.raise_for_status()
        return advertised(response.json(), self._topology.queue, vhost(amqp))


def _reap(task: asyncio.Task[None]) -> None:
    """Surface a crash of the poller at once, in the log, rather than never."""
    if not task.cancelled() and (exc := task.exception()) is not None:
        log.error("console_monitor_crashed", error=repr(exc))
