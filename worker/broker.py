"""One way onto the broker: a named connection, the error when none opens, URLs safe to print.

Every connection names itself (`memory-worker [purpose] <worker id>`), so `rabbitmqctl
list_connections client_properties` and the management UI tell the worker from its tools.
`rabbitmq.url` may list a cluster's nodes, separated by commas: they are tried in order at
start, and a robust connection fails over to the next when its node is lost
(`FailoverConnection`); each failover is one `broker_failover` line.
A worker also advertises its ops URL and queue there, so the console finds it (`advertise`).
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Mapping, Sequence
from typing import Any, Literal, overload
from urllib.parse import urlsplit, urlunsplit

import aio_pika
import structlog
from aio_pika.abc import AbstractConnection
from aio_pika.connection import make_url
from aio_pika.exceptions import CONNECTION_EXCEPTIONS
from aio_pika.robust_connection import RobustConnection
from aiormq.exceptions import InvalidFrameError, ProbableAuthenticationError
from yarl import URL

from worker.addresses import unreachable, vhost
from worker.settings import Settings

log = structlog.get_logger("worker.broker")

#: How long a publish waits for the broker's confirm (a retry, a dead letter, a replay, an
#: item); the preflight counts it into the consumer_timeout budget, so both read this one.
CONFIRM_TIMEOUT_S = 30.0
#: The first and the longest pause between connection attempts while waiting for the broker.
FIRST_RETRY_S = 0.5
MAX_RETRY_S = 10.0
#: Client properties a worker's connection carries for `memory-worker console` to find it.
OPS_URL_PROPERTY = "memory_worker_ops_url"
QUEUE_PROPERTY = "memory_worker_queue"

#: Broker addresses and the error each failed with.
Failures = Sequence[tuple[str, BaseException]]


class BrokerUnavailable(Exception):
    """No connection to the broker could be opened (within the startup wait, when waiting)."""

    def __init__(self, url: str, error: BaseException, failures: Failures = ()) -> None:
        #: Each address tried in the last round and why it failed, in the order tried.
        self.failures = tuple(failures) or ((url, error),)
        self.error = error
        if len(self.failures) > 1:
            super().__init__(f"no broker at any address: {describe(self.failures)}")
        else:
            super().__init__(f"no broker at {masked(url)}: {unreachable(error)}")


class BrokerRefused(BrokerUnavailable):
    """The broker answered and refused us (login, vhost): a settings problem, not an outage."""

    def __init__(self, url: str, error: BaseException, why: str) -> None:
        Exception.__init__(self, f"broker at {masked(url)} {why}")
        self.failures = ((url, error),)
        self.error = error


def _refusal(url: str, exc: BaseException) -> BrokerRefused | None:
    """The refusal `exc` stands for, if the broker refused rather than failed to answer."""
    if isinstance(exc, ProbableAuthenticationError):
        user = urlsplit(url).username or "guest"
        return BrokerRefused(url, exc, f"refused the login of user {user!r} (wrong password?)")
    if isinstance(exc, InvalidFrameError) and "Connection.Close" in str(exc):
        # RabbitMQ closes the connection at open when the vhost does not exist, or when the
        # user may not use it; aiormq reports it only as an unexpected frame.
        return BrokerRefused(
            url, exc, f"refused vhost {vhost(url)!r}: it does not exist or the user may not use it"
        )
    return None


def masked(url: str) -> str:
    """`url` safe to log or print: its password, in the userinfo or a query, replaced by `***`.

    A comma-separated list of URLs (a cluster's nodes in `rabbitmq.url`) is masked URL by URL.
    """
    parts = url.split(",")
    if len(parts) > 1 and all("://" in part for part in parts):
        return ",".join(_masked_one(part) for part in parts)
    return _masked_one(url)


def _masked_one(url: str) -> str:
    original = parts = urlsplit(url)
    userinfo, at, host = parts.netloc.rpartition("@")
    if at and ":" in userinfo:
        parts = parts._replace(netloc=f"{userinfo.partition(':')[0]}:***@{host}")
    if "password=" in parts.query:  # redis-py also takes `?password=`
        fields = (field.partition("=") for field in parts.query.split("&"))
        query = "&".join(k + sep + ("***" if k == "password" else v) for k, sep, v in fields)
        parts = parts._replace(query=query)
    return url if parts == original else urlunsplit(parts)


def describe(failures: Failures) -> str:
    """`address: error; ...` with every address masked."""
    return "; ".join(f"{masked(url)}: {unreachable(error)}" for url, error in failures)


def address(connection: AbstractConnection) -> str:
    """The broker address `connection` is on, as `shown`."""
    return shown(str(connection.url)) if isinstance(connection, aio_pika.Connection) else "?"


def shown(url: str) -> str:
    """A broker address for a log line or `check`: password masked, without query options."""
    return masked(str(URL(url).with_query(None)))


class FailoverConnection(RobustConnection):
    """A robust connection over a cluster's addresses: losing its node, it reconnects to the next.

    aio-pika's robust connection reconnects to the one URL it was given. This one moves its URL
    on to the next address whenever its connection closes or an attempt fails, so the
    addresses are tried round-robin, aio-pika's `reconnect_interval` apart, starting with the
    one after the node that was lost; channels, QoS and consumers are restored by aio-pika.
    """

    def __init__(self, urls: Sequence[str], first: int, **kwargs: Any) -> None:
        self._urls = tuple(urls)
        self._index = first
        super().__init__(URL(self._urls[first]), **kwargs)
        self._node: int | None = None  # the address of the last connection that came up
        self._restored = False
        self._error: BaseException | None = None
        self.failovers = 0

    @property
    def node(self) -> str:
        """The address this connection is on (or trying), password masked."""
        return address(self)

    @property
    def up(self) -> bool:
        """Connected, and every channel (the consumer's included) restored on the connection."""
        return self.connected.is_set() and self._restored

    async def _on_connected(self) -> None:
        self._restored = False
        await super()._on_connected()  # restores the channels; raises if one cannot be
        self._restored = True
        if self._node is not None and self._node != self._index:
            self.failovers += 1
            previous = shown(self._urls[self._node])
            error = unreachable(self._error) if self._error is not None else None
            log.warning("broker_failover", url=self.node, previous=previous, error=error)
        self._node, self._error = self._index, None

    async def _on_connection_close(self, closing: asyncio.Future[Any]) -> None:
        self._restored = False
        await super()._on_connection_close(closing)
        if self._close_called or self.is_closed or len(self._urls) == 1:
            return
        if not closing.cancelled():
            self._error = closing.exception() or self._error
        # This node is away (or was never reached): aio-pika's next attempt goes to the next.
        self._index = (self._index + 1) % len(self._urls)
        self.url = URL(self._urls[self._index])


@overload
async def connect(
    settings: Settings,
    purpose: str | None = None,
    *,
    robust: Literal[True] = True,
    wait: bool = False,
    properties: Mapping[str, str] | None = None,
) -> FailoverConnection: ...


@overload
async def connect(
    settings: Settings,
    purpose: str | None = None,
    *,
    robust: bool,
    wait: bool = False,
    properties: Mapping[str, str] | None = None,
) -> AbstractConnection: ...


async def connect(
    settings: Settings,
    purpose: str | None = None,
    *,
    robust: bool = True,
    wait: bool = False,
    properties: Mapping[str, str] | None = None,
) -> AbstractConnection:
    """Open a connection named for `purpose`; raise `BrokerUnavailable` if none opens.

    The addresses in `rabbitmq.url` are tried in order; opening on any but the first logs one
    `broker_failover` line. With `wait`, whole rounds are retried with backoff for up to
    `rabbitmq.startup_wait_s` (a worker starting beside its broker); without, one round (a tool
    a person is waiting on). A robust connection reconnects by itself later, to the next
    address when its node is lost; a plain one ends with its node.
    """
    mq = settings.rabbitmq
    name = " ".join(p for p in ("memory-worker", purpose, settings.worker.id) if p)
    client_properties = {**(properties or {}), "connection_name": name}
    # make_url puts the heartbeat into each URL's query, as connect_robust would.
    urls = [str(make_url(url, heartbeat=mq.heartbeat_s)) for url in mq.urls]
    loop = asyncio.get_running_loop()
    deadline = loop.time() + (mq.startup_wait_s if wait else 0.0)
    delay_s = FIRST_RETRY_S
    while True:
        failures: list[tuple[str, BaseException]] = []
        for index, url in enumerate(mq.urls):
            try:
                connection = await _open(
                    urls, index, robust, mq.connect_timeout_s, client_properties
                )
            except (*CONNECTION_EXCEPTIONS, InvalidFrameError, TimeoutError) as exc:
                if (refused := _refusal(url, exc)) is not None:
                    raise refused from None  # retrying cannot fix a password or a vhost
                failures.append((url, exc))
                continue
            if failures:
                _failed_over(failures, url)
                if isinstance(connection, FailoverConnection):
                    connection.failovers += 1
            return connection
        left_s = deadline - loop.time()
        if left_s <= 0:
            raise BrokerUnavailable(mq.url.get_secret_value(), failures[-1][1], failures)
        pause_s = min(delay_s, left_s)
        error = unreachable(failures[0][1]) if len(failures) == 1 else describe(failures)
        url = masked(mq.url.get_secret_value())
        log.warning("broker_unreachable", url=url, error=error, retry_in_s=round(pause_s, 3))
        await asyncio.sleep(pause_s)
        delay_s = min(delay_s * 2, MAX_RETRY_S)


async def _open(
    urls: Sequence[str], index: int, robust: bool, timeout_s: float, properties: dict[str, Any]
) -> AbstractConnection:
    """One attempt at the address `urls[index]`."""
    if not robust:
        return await aio_pika.connect(urls[index], timeout=timeout_s, client_properties=properties)
    connection = FailoverConnection(urls, index, client_properties=properties)
    try:
        await connection.connect(timeout=timeout_s)
    except BaseException:
        # A failed attempt leaves no robust connection retrying behind our back.
        await connection.close()
        raise
    return connection


def _failed_over(failures: Failures, url: str) -> None:
    """The one line for a connection opened on another address than the first."""
    first, error = failures[0]
    log.warning(
        "broker_failover",
        url=shown(url),
        previous=shown(first),
        error=unreachable(error) if len(failures) == 1 else describe(failures),
    )


def advertise(settings: Settings, ops_port: int | None) -> dict[str, str]:
    """The client properties that make this worker findable: its ops URL and its queue."""
    if ops_port is None:
        return {}
    host = settings.worker.ops_host
    if host in ("", "0.0.0.0", "::"):
        host = _own_address()
    literal = f"[{host}]" if ":" in host else host
    return {
        OPS_URL_PROPERTY: f"http://{literal}:{ops_port}",
        QUEUE_PROPERTY: settings.rabbitmq.queue,
    }


def _own_address() -> str:
    """This machine's address as its own host name resolves, else the host name itself.

    A pod's or a container's name is in its /etc/hosts but often in no DNS others use, so the
    address it maps to is what another machine can reach; one lookup, at start.
    """
    name = socket.gethostname()
    try:
        return socket.gethostbyname(name)
    except OSError:
        return name
