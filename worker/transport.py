"""The sinks' HTTP transport: one request in, one whole `Reply` out, over HTTP/1.1 keep-alive.

`HttpClient` is the seam: the sinks depend on it, unit tests pass a fake, the worker passes
`Http1Client` (asyncio protocols and llhttp's parser through httptools, the parser uvicorn
uses). When no answer arrives, `request` raises, and only this:

    TransportError          refused, reset, truncated, unusable URL: no answer
     └── TransportTimeout   no answer in time, a sign the sink is overloaded
"""

from __future__ import annotations

import asyncio
import email.utils
import math
import socket
import ssl
import time
import urllib.parse
from collections.abc import Mapping
from types import TracebackType
from typing import NamedTuple, Protocol, Self

import httptools

from worker.settings import Settings

USER_AGENT = "memory-worker"
#: How long an idle connection stays in the pool: less than servers' usual 5 s, so a server
#: rarely closes one just as a request goes out on it.
KEEPALIVE_S = 4.0


class Reply(NamedTuple):
    """One HTTP answer, read whole; look headers up by lower-case name."""

    status: int
    headers: Mapping[str, str]
    body: bytes

    @property
    def text(self) -> str:
        """The body as UTF-8, bad bytes replaced."""
        return self.body.decode("utf-8", "replace")

    @property
    def retry_after_s(self) -> float | None:
        """Seconds from a Retry-After header (delta or HTTP date), or None."""
        value = self.headers.get("retry-after")
        if not value:
            return None
        try:
            seconds = float(value)
        except ValueError:
            try:
                parsed = email.utils.parsedate_to_datetime(value)
            except (TypeError, ValueError):
                return None  # neither delta-seconds nor an HTTP date: ignore it
            return max(0.0, parsed.timestamp() - time.time())
        return max(0.0, seconds) if math.isfinite(seconds) else None


class TransportError(Exception):
    """No HTTP answer: refused, reset, truncated, or an unusable URL."""


class TransportTimeout(TransportError):
    """No HTTP answer in time."""


class HttpClient(Protocol):
    """Sends one request and reads the whole answer; raises `TransportError` if there is none."""

    async def request(
        self, method: str, url: str, headers: Mapping[str, str], body: bytes | None = None
    ) -> Reply:
        """Send one request."""
        ...


class _Connection(asyncio.Protocol):
    """One keep-alive HTTP/1.1 connection: one request at a time, the answer parsed by llhttp."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._parser = httptools.HttpResponseParser(self)
        self._transport: asyncio.Transport | None = None
        self._answer: asyncio.Future[Reply] | None = None
        self._headers: dict[str, str] = {}
        self._body: list[bytes] = []
        self._head = False
        self._complete = True
        self.reusable = True
        self.idle_since = 0.0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        self.reusable = False
        answer = self._answer
        if answer is not None and not answer.done():
            eof_framed = "content-length" not in self._headers and (
                self._headers.get("transfer-encoding", "").lower() != "chunked"
            )
            if self._headers and not self._complete and eof_framed and exc is None:
                self._finish()  # an answer without a length ends when the connection does
            else:
                answer.set_exception(TransportError(f"connection closed: {exc!r}"))

    def data_received(self, data: bytes) -> None:
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self.close()
            if self._answer is not None and not self._answer.done():
                self._answer.set_exception(TransportError(f"malformed answer: {exc}"))

    # httptools callbacks
    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers[name.decode("latin-1").lower()] = value.decode("latin-1")

    def on_headers_complete(self) -> None:
        if self._head:
            # A HEAD answer has no body whatever its length says; the parser cannot be told,
            # so the connection is not reused.
            self.reusable = False
            self._finish()

    def on_body(self, body: bytes) -> None:
        self._body.append(body)

    def on_message_complete(self) -> None:
        self._complete = True
        if not self._parser.should_keep_alive():
            self.reusable = False
        self._finish()

    def _finish(self) -> None:
        answer = self._answer
        if answer is not None and not answer.done():
            status = self._parser.get_status_code()
            answer.set_result(Reply(status, self._headers, b"".join(self._body)))

    def send(self, data: bytes, head: bool) -> asyncio.Future[Reply]:
        """Write one request; the future holds its answer."""
        assert self._transport is not None
        self._answer = self._loop.create_future()
        self._headers, self._body, self._head, self._complete = {}, [], head, False
        self._transport.write(data)
        return self._answer

    def close(self) -> None:
        """Drop the connection."""
        self.reusable = False
        if self._transport is not None:
            self._transport.close()


class Http1Client:
    """`HttpClient` for one origin: HTTP/1.1 keep-alive connections, a bounded pool, timeouts.

    The store path makes one small request per item; aiohttp's client costs about 100 µs of
    CPU per request here, this one about 20 (figures in the README). A request that fails or
    is cancelled after it was written closes its connection: its answer may still arrive.
    """

    def __init__(
        self,
        pool_size: int,
        timeout_s: float,
        connect_timeout_s: float,
        headers: Mapping[str, str],
    ) -> None:
        self.pool_size = pool_size
        self.timeout_s = timeout_s
        self.connect_timeout_s = connect_timeout_s
        self.headers = dict(headers)
        self._static = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
        self._opened = False
        self._idle: list[_Connection] = []
        self._slots = asyncio.Semaphore(pool_size)
        self._open: set[_Connection] = set()
        self._origins: dict[str, tuple[str, int, ssl.SSLContext | None, str]] = {}

    def __repr__(self) -> str:
        return f"<Http1Client pool_size={self.pool_size} open={len(self._open)}>"

    async def __aenter__(self) -> Self:
        self._opened = True
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._opened = False
        for conn in list(self._open):
            conn.close()
        self._open.clear()
        self._idle.clear()

    def _origin(self, url: str) -> tuple[str, int, ssl.SSLContext | None, str]:
        found = self._origins.get(url)
        if found is None:
            parts = urllib.parse.urlsplit(url)
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise TransportError(f"unusable URL: {url!r}")
            tls = ssl.create_default_context() if parts.scheme == "https" else None
            port = parts.port or (443 if tls else 80)
            target = parts.path or "/"
            if parts.query:
                target += "?" + parts.query
            host = parts.hostname if ":" not in parts.hostname else f"[{parts.hostname}]"
            request_line = f" {target} HTTP/1.1\r\nhost: {host}:{port}\r\n"
            found = self._origins[url] = (parts.hostname, port, tls, request_line)
        return found

    async def request(
        self, method: str, url: str, headers: Mapping[str, str], body: bytes | None = None
    ) -> Reply:
        """Send one request and read the whole answer; a redirect is returned, not followed."""
        if not self._opened:
            raise RuntimeError("use `async with` to open the client first")
        host, port, tls, request_line = self._origin(url)
        head = [method, request_line, self._static]
        for name, value in headers.items():
            if "\r" in value or "\n" in value:
                raise TransportError(f"header {name!r} holds a line break")
            head.append(f"{name}: {value}\r\n")
        head.append(f"content-length: {len(body) if body else 0}\r\n\r\n")
        data = "".join(head).encode("latin-1") + (body or b"")
        async with self._slots:
            conn = await self._connection(host, port, tls)
            answer = conn.send(data, method == "HEAD")
            # A timer on the answer rather than asyncio.timeout: the same bound, a third of
            # the cost per store (no cancel scope; an expiry is the answer's exception).
            timer = asyncio.get_running_loop().call_later(self.timeout_s, _expire, answer)
            try:
                return await answer
            except BaseException:
                conn.close()
                raise
            finally:
                timer.cancel()
                self._release(conn)

    async def _connection(self, host: str, port: int, tls: ssl.SSLContext | None) -> _Connection:
        now = time.monotonic()
        while self._idle:
            conn = self._idle.pop()
            if conn.reusable and now - conn.idle_since < KEEPALIVE_S:
                return conn
            self._forget(conn)
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self.connect_timeout_s):
                _, conn = await loop.create_connection(
                    lambda: _Connection(loop), host, port, ssl=tls
                )
        except TimeoutError:
            raise TransportTimeout("connect timed out") from None
        except ConnectionRefusedError as exc:
            raise TransportError(f"connection refused by {host}:{port}") from exc
        except socket.gaierror as exc:
            raise TransportError(f"host {host!r} not found: {exc.strerror}") from exc
        except OSError as exc:
            raise TransportError(f"cannot connect to {host}:{port}: {exc.strerror or exc}") from exc
        self._open.add(conn)
        return conn

    def _release(self, conn: _Connection) -> None:
        if conn.reusable:
            conn.idle_since = time.monotonic()
            self._idle.append(conn)
        else:
            self._forget(conn)

    def _forget(self, conn: _Connection) -> None:
        conn.close()
        self._open.discard(conn)


def _expire(answer: asyncio.Future[Reply]) -> None:
    if not answer.done():
        answer.set_exception(TransportTimeout("no answer in time"))


def make_client(settings: Settings) -> Http1Client:
    """The sinks' client: a pool that fits the concurrency limit, the bearer token if set."""
    sink = settings.sink
    headers = {"user-agent": USER_AGENT}
    if sink.token is not None:
        headers["authorization"] = f"Bearer {sink.token.get_secret_value()}"
    # One connection per concurrent store, and spare ones so opening a session never waits.
    return Http1Client(settings.concurrency + 2, sink.timeout_s, sink.connect_timeout_s, headers)
