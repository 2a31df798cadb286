"""The console as one resource: broker connection, poller, actions and the HTTP site."""

from __future__ import annotations

import ipaddress
from contextlib import AsyncExitStack
from types import TracebackType
from typing import Self

from aiohttp import web
from pydantic import SecretStr

from worker.broker import connect
from worker.console.app import build_app
from worker.console.jobs import Jobs
from worker.console.monitor import REFRESH_S, Monitor
from worker.console.snapshot import DeadLetters
from worker.console.state import ConsoleState
from worker.settings import Settings
from worker.topology import Topology


def is_loopback(host: str) -> bool:
    """Whether `host` names only this machine (127.0.0.0/8, ::1, localhost)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def bind_refusal(host: str, token: SecretStr | None, insecure: bool) -> str | None:
    """Why the console must not listen on `host`, or None when it may."""
    if is_loopback(host) or token is not None or insecure:
        return None
    return (
        f"refusing to serve the console on {host} without a token: anyone who reaches it could "
        "replay and purge dead letters. Set console.token (MAHAVISHNU_CONSOLE__TOKEN), or pass "
        "--insecure if something in front of it already authenticates."
    )


class ConsoleServer:
    """Serves the console on `host:port` while inside; `url` says where."""

    def __init__(
        self,
        settings: Settings,
        host: str,
        port: int,
        *,
        read_only: bool = False,
        refresh_s: float = REFRESH_S,
    ) -> None:
        self._settings = settings
        self._host = host
        self._port = port
        self._read_only = read_only
        self._refresh_s = refresh_s
        self._stack = AsyncExitStack()
        self.state: ConsoleState | None = None
        self.port: int | None = None

    def __repr__(self) -> str:
        return f"<ConsoleServer {self._host}:{self.port} read_only={self._read_only}>"

    @property
    def url(self) -> str:
        """The console's address, e.g. http://127.0.0.1:9470."""
        host = f"[{self._host}]" if ":" in self._host else self._host
        return f"http://{host}:{self.port}"

    async def __aenter__(self) -> Self:
        try:
            await self._start()
        except BaseException:
            await self._stack.aclose()
            raise
        return self

    async def _start(self) -> None:
        s, stack = self._settings, self._stack
        connection = await connect(s, "console", robust=True)
        stack.push_async_callback(connection.close)
        monitor = await stack.enter_async_context(Monitor(s, connection, self._refresh_s))
        dead_letters = DeadLetters(connection, s.rabbitmq.dead_letter_queue)
        topology = Topology.from_settings(s)
        breaker_open = lambda: monitor.workers.breaker_open  # noqa: E731 - read at each call
        jobs = await stack.enter_async_context(
            Jobs(connection, topology, dead_letters, breaker_open)
        )
        self.state = ConsoleState(s, dead_letters, jobs, monitor, self._read_only)
        runner = web.AppRunner(build_app(self.state), access_log=None, handle_signals=False)
        await runner.setup()
        # Closed first (pushed last): no request is served by parts already closed.
        stack.push_async_callback(runner.cleanup)
        await web.TCPSite(runner, self._host, self._port).start()
        self.port = runner.addresses[0][1]

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self._stack.aclose()
