"""One way onto the broker: a named connection, the error when none opens, URLs safe to print.

Every connection names itself (`memory-worker [purpose] <worker id>`), so `rabbitmqctl
list_connections client_properties` and the management UI tell the worker from its tools.
A worker also advertises its ops URL and queue there, so the console finds it (`advertise`).
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Mapping
from typing import Literal, overload
from urllib.parse import unquote, urlsplit, urlunsplit

import aio_pika
import structlog
from aio_pika.abc import AbstractConnection, AbstractRobustConnection
from aio_pika.exceptions import CONNECTION_EXCEPTIONS
from aiormq.exceptions import InvalidFrameError, ProbableAuthenticationError

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


class BrokerUnavailable(Exception):
    """No connection to the broker could be opened (within the startup wait, when waiting)."""

    def __init__(self, url: str, error: BaseException) -> None:
        super().__init__(f"no broker at {masked(url)}: {error!r}")
        self.error = error


class BrokerRefused(BrokerUnavailable):
    """The broker answered and refused us (login, vhost): a settings problem, not an outage."""

    def __init__(self, url: str, error: BaseException, why: str) -> None:
        Exception.__init__(self, f"broker at {masked(url)} {why}")
        self.error = error


def _refusal(url: str, exc: BaseException) -> BrokerRefused | None:
    """The refusal `exc` stands for, if the broker refused rather than failed to answer."""
    if isinstance(exc, ProbableAuthenticationError):
        user = urlsplit(url).username or "guest"
        return BrokerRefused(url, exc, f"refused the login of user {user!r} (wrong password?)")
    if isinstance(exc, InvalidFrameError) and "Connection.Close" in str(exc):
        # RabbitMQ closes the connection at open when the vhost does not exist, or when the
        # user may not use it; aiormq reports it only as an unexpected frame.
        vhost = unquote(urlsplit(url).path[1:]) or "/"
        return BrokerRefused(
            url, exc, f"refused vhost {vhost!r}: it does not exist or the user may not use it"
        )
    return None


def masked(url: str) -> str:
    """`url` safe to log or print: its password, in the userinfo or a query, replaced by `***`."""
    original = parts = urlsplit(url)
    userinfo, at, host = parts.netloc.rpartition("@")
    if at and ":" in userinfo:
        parts = parts._replace(netloc=f"{userinfo.partition(':')[0]}:***@{host}")
    if "password=" in parts.query:  # redis-py also takes `?password=`
        fields = (field.partition("=") for field in parts.query.split("&"))
        query = "&".join(k + sep + ("***" if k == "password" else v) for k, sep, v in fields)
        parts = parts._replace(query=query)
    return url if parts == original else urlunsplit(parts)


@overload
async def connect(
    settings: Settings,
    purpose: str | None = None,
    *,
    robust: Literal[True] = True,
    wait: bool = False,
    properties: Mapping[str, str] | None = None,
) -> AbstractRobustConnection: ...


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

    With `wait`, retry with backoff for up to `rabbitmq.startup_wait_s` (a worker starting
    beside its broker); without, give up after one attempt (a tool a person is waiting on).
    A robust connection reconnects by itself later; a plain one ends with the broker.
    """
    mq = settings.rabbitmq
    url = mq.url.get_secret_value()
    name = " ".join(p for p in ("memory-worker", purpose, settings.worker.id) if p)
    opener = aio_pika.connect_robust if robust else aio_pika.connect
    loop = asyncio.get_running_loop()
    deadline = loop.time() + (mq.startup_wait_s if wait else 0.0)
    delay_s = FIRST_RETRY_S
    while True:
        try:
            return await opener(
                url,
                timeout=mq.connect_timeout_s,
                heartbeat=mq.heartbeat_s,
                client_properties={**(properties or {}), "connection_name": name},
            )
        except (*CONNECTION_EXCEPTIONS, InvalidFrameError, TimeoutError) as exc:
            if (refused := _refusal(url, exc)) is not None:
                raise refused from None  # retrying cannot fix a password or a vhost
            left_s = deadline - loop.time()
            if left_s <= 0:
                raise BrokerUnavailable(url, exc) from None
            pause_s = min(delay_s, left_s)
            log.warning("broker_unreachable", url=masked(url), error=repr(exc), retry_in_s=pause_s)
            await asyncio.sleep(pause_s)
            delay_s = min(delay_s * 2, MAX_RETRY_S)


def advertise(settings: Settings, ops_port: int | None) -> dict[str, str]:
    """The client properties that make this worker findable: its ops URL and its queue."""
    if ops_port is None:
        return {}
    host = settings.worker.ops_host
    if host in ("", "0.0.0.0", "::"):
        host = _own_address()
    shown = f"[{host}]" if ":" in host else host
    return {OPS_URL_PROPERTY: f"http://{shown}:{ops_port}", QUEUE_PROPERTY: settings.rabbitmq.queue}


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
