"""The composition root: `Service` builds the worker's parts and starts and stops them in order.

Start order (`_start`): preflight, ops server, sink, broker, ledger, pipeline, consumer, and
last the steering loop. Shutdown order matters and is written once, in `__aexit__`: stop being
ready, cancel the consumer so nothing new arrives, stop the steering loop, let in-flight
inserts finish within the grace period, requeue the rest, then close the channel, the
connection, the sink and the HTTP client.
"""

from __future__ import annotations

import asyncio
from contextlib import AsyncExitStack
from types import TracebackType
from typing import Self

import structlog

from worker.breaker import CircuitBreaker, State
from worker.broker import FailoverConnection, advertise, connect
from worker.consumer import Consumer
from worker.dispatch import Dispatcher
from worker.ledger import open_ledger
from worker.limiter import AdaptiveLimit
from worker.mcp import make_sink
from worker.metrics import Metrics
from worker.ops import OpsServer
from worker.pipeline import Pipeline
from worker.preflight import check_settings, check_sink, prepare_broker
from worker.settings import Settings
from worker.steering import Steering, SteeringCrashed
from worker.topology import Topology
from worker.transport import make_client

log = structlog.get_logger("worker.service")


class Service:
    """The worker: consume, store, settle, until `stop()`; then shut down in order."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.metrics = Metrics(settings.concurrency)
        self.topology = Topology.from_settings(settings)
        self.breaker = CircuitBreaker(
            settings.sink.breaker_failures,
            settings.sink.breaker_open_s,
            settings.sink.breaker_max_open_s,
            on_change=self._breaker_changed,
        )
        self.limit = AdaptiveLimit(
            settings.concurrency,
            enabled=settings.pools.adaptive_concurrency,
            on_change=self._limit_changed,
        )
        self.metrics.limit_gauge.set(self.limit.limit)
        self.ops_port: int | None = None
        self._running = False
        self._stop = asyncio.Event()
        self._failure: BaseException | None = None
        self._stack = AsyncExitStack()
        self._consumer: Consumer | None = None
        self._connection: FailoverConnection | None = None
        self._dispatcher: Dispatcher | None = None
        self._steering: Steering | None = None

    @property
    def ready(self) -> bool:
        """Connected to the broker, consuming, and the sink's breaker is not open."""
        lost = self._consumer is not None and self._consumer.lost
        # Not while a failover is under way: only once the consumer's channel is restored.
        connected = self._connection is not None and self._connection.up
        return self._running and connected and not lost and self.breaker.state is not State.OPEN

    def _broker(self) -> dict[str, object]:
        """The broker node for /readyz: a failover shows as a new node and a count."""
        connection = self._connection
        if connection is None:
            return {"broker": None, "broker_failovers": 0}
        return {"broker": connection.node, "broker_failovers": connection.failovers}

    async def __aenter__(self) -> Self:
        try:
            await self._start()
        except BaseException:
            await self._stack.aclose()
            raise
        return self

    async def _start(self) -> None:
        s = self.settings
        structlog.contextvars.bind_contextvars(worker_id=s.worker.id)
        check_settings(s)
        if s.worker.ops_port >= 0:
            ops = OpsServer(
                self.metrics,
                lambda: self.ready,
                s.worker.ops_host,
                s.worker.ops_port,
                self._broker,
                token=s.console.token,
            )
            await self._stack.enter_async_context(ops)
            self.ops_port = ops.port
        client = await self._stack.enter_async_context(make_client(s))
        sink = make_sink(s, client)
        await self._stack.enter_async_context(sink)
        await check_sink(sink, s.sink.tool)
        advertised = advertise(s, self.ops_port)
        connection = self._connection = await connect(s, wait=True, properties=advertised)
        self._stack.push_async_callback(connection.close)
        await prepare_broker(s, self.topology, connection)
        ledger = await self._stack.enter_async_context(open_ledger(s, self.metrics))
        pipeline = Pipeline(sink, s, self.metrics, self.breaker, self.limit, ledger)
        self._dispatcher = Dispatcher(pipeline, self.limit.limit)
        self._consumer = Consumer(
            connection,
            self.topology,
            self._dispatcher,
            s.prefetch,
            s.worker.id,
            redeclare=s.rabbitmq.declare,
            on_resubscribe=self.metrics.resubscriptions.inc,
            on_cancel=self.metrics.consumer_cancels.inc,
        )
        self._stack.push_async_callback(self._consumer.close)
        await self._consumer.start()
        self._steering = Steering(self._consumer, self.breaker, s.prefetch, self._steering_crashed)
        self._steering.start()
        self._running = True
        log.info(
            "worker_started",
            settings_files=list(s.files),
            broker=connection.node,
            queue=s.rabbitmq.queue,
            concurrency=s.concurrency,
            prefetch=s.prefetch,
            adaptive=s.pools.adaptive_concurrency,
            sink=str(s.pools.session_buddy_url),
            ops_port=self.ops_port,
        )

    def _limit_changed(self, limit: int, why: str) -> None:
        self.metrics.limit_gauge.set(limit)
        if self._dispatcher is not None:
            self._dispatcher.resize(limit)
        unloaded_ms = round((self.limit.unloaded_s or 0.0) * 1000, 1)
        log.debug("concurrency_limit_changed", limit=limit, why=why, unloaded_ms=unloaded_ms)

    def _breaker_changed(self, state: State, detail: str) -> None:
        if self._steering is not None:
            self._steering.wake()
        self.metrics.breaker_state.set(state.value)
        self.metrics.breaker_transitions.labels(state.name.lower()).inc()
        if state is State.OPEN:
            open_s = round(self.breaker.open_remaining_s, 3)
            log.warning("breaker_opened", open_s=open_s, last_failure=detail)
        elif state is State.HALF_OPEN:
            log.info("breaker_half_open", last_failure=detail)
        else:
            log.info("breaker_closed", last_failure=detail)

    def _steering_crashed(self, error: BaseException) -> None:
        # Without steering the consumer would keep taking deliveries while the breaker is
        # open: not ready at once, and stop (`__aexit__` raises `SteeringCrashed`, exit 70).
        self._failure = error
        self._running = False
        self.stop()

    def stop(self) -> None:
        """Ask the worker to shut down; safe to call from a signal handler."""
        self._stop.set()

    async def wait(self) -> None:
        """Run until `stop()` is called."""
        await self._stop.wait()

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._running = False
        if self._consumer is not None:
            await self._consumer.cancel()
        if self._steering is not None:
            await self._steering.stop()
        requeued = 0
        if self._dispatcher is not None:
            requeued = await self._dispatcher.drain(self.settings.worker.grace_s)
        await self._stack.aclose()
        log.info("worker_stopped", requeued=requeued, **self.metrics.get_insertion_metrics())
        failure = self._failure
        if failure is not None and e is None:
            raise SteeringCrashed(f"the steering loop crashed: {failure!r}") from failure
