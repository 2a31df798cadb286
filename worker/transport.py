"""The sinks' HTTP transport: one request in, one whole `Reply` out, on aiohttp.

`HttpClient` is the seam: the sinks depend on it, unit tests pass a fake, the worker passes
`AiohttpClient`. When no answer arrives, `request` raises, and only this:

    TransportError          refused, reset, truncated, unusable URL: no answer
     └── TransportTimeout   no answer in time, a sign the sink is overloaded
"""

from __future__ import annotations

import email.utils
import math
import time
from collections.abc import Mapping
from types import TracebackType
from typing import NamedTuple, Protocol, Self

import aiohttp

from worker.settings import Settings

USER_AGENT = "memory-worker"
#: How long an idle connection stays in the pool (httpx's default, which this replaced).
KEEPALIVE_S = 5.0


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


class AiohttpClient:
    """`HttpClient` on one aiohttp session: a bounded keep-alive pool, static headers, timeouts."""

    def __init__(
        self, pool_size: int, timeout: aiohttp.ClientTimeout, headers: Mapping[str, str]
    ) -> None:
        self.pool_size = pool_size
        self.timeout = timeout
        self.headers = dict(headers)
        self._session: aiohttp.ClientSession | None = None

    def __repr__(self) -> str:
        return f"<AiohttpClient pool_size={self.pool_size} open={self._session is not None}>"

    async def __aenter__(self) -> Self:
        # The session binds to the running loop, so it is made here, not in __init__.
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=self.pool_size, keepalive_timeout=KEEPALIVE_S),
            timeout=self.timeout,
            headers=self.headers,
            # The MCP session lives in a header; a cookie jar would only cost CPU per request.
            cookie_jar=aiohttp.DummyCookieJar(),
        )
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        session, self._session = self._session, None
        if session is not None:
            await session.close()

    async def request(
        self, method: str, url: str, headers: Mapping[str, str], body: bytes | None = None
    ) -> Reply:
        """Send one request and read the whole answer; a redirect is returned, not followed."""
        session = self._session
        if session is None:
            raise RuntimeError("use `async with` to open the client first")
        try:
            async with session.request(
                method, url, headers=headers, data=body, allow_redirects=False
            ) as response:
                return Reply(response.status, response.headers, await response.read())
        # aiohttp's socket timeouts are ClientErrors too: catch timeouts first.
        except TimeoutError as exc:
            raise TransportTimeout(type(exc).__name__) from exc
        except aiohttp.ClientError as exc:
            raise TransportError(f"{type(exc).__name__}: {exc}") from exc


def make_client(settings: Settings) -> AiohttpClient:
    """The sinks' client: a pool that fits the concurrency limit, the bearer token if set."""
    sink = settings.sink
    headers = {"user-agent": USER_AGENT}
    if sink.token is not None:
        headers["authorization"] = f"Bearer {sink.token.get_secret_value()}"
    timeout = aiohttp.ClientTimeout(total=sink.timeout_s, connect=sink.connect_timeout_s)
    # One connection per concurrent store, and spare ones so opening a session never waits.
    return AiohttpClient(settings.concurrency + 2, timeout, headers)
