"""What every console handler shares: the state, the templates, how a page is rendered."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import jinja2
from aiohttp import web
from pydantic import SecretStr

from worker.console.jobs import Jobs
from worker.console.monitor import Monitor
from worker.console.snapshot import DeadLetters
from worker.guard import bearer_ok, cookie_ok
from worker.settings import Settings


@dataclass
class ConsoleState:
    """What every handler reads: settings, the DLQ snapshot, the actions, the overview."""

    settings: Settings
    dead_letters: DeadLetters
    jobs: Jobs
    monitor: Monitor
    read_only: bool = False

    @property
    def token(self) -> SecretStr | None:
        """The console token, if one is set."""
        return self.settings.console.token


STATE = web.AppKey("state", ConsoleState)
TEMPLATES = web.AppKey("templates", jinja2.Environment)


def _when(ms: int | float | None) -> str:
    if ms is None:
        return "-"
    return datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _number(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def templates() -> jinja2.Environment:
    """The console's templates; autoescape on for every one of them."""
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("worker.console", "templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
    )
    env.filters["when"] = _when
    env.filters["number"] = _number
    return env


def render(request: web.Request, name: str, *, status: int = 200, **context: Any) -> web.Response:
    """A template rendered as an HTML answer, with what every page shows."""
    state = request.app[STATE]
    text = (
        request.app[TEMPLATES]
        .get_template(name)
        .render(
            read_only=state.read_only,
            queue=state.settings.rabbitmq.dead_letter_queue,
            busy=state.dead_letters.lock.locked(),
            **context,
        )
    )
    return web.Response(text=text, status=status, content_type="text/html", charset="utf-8")


def who(request: web.Request) -> str:
    """Who made a request, for the action log: address and how it was let in."""
    token = request.app[STATE].token
    how = "browser"
    if bearer_ok(request.headers, token):
        how = "token"
    elif cookie_ok(request.cookies, token):
        how = "login"
    return f"{request.remote or '?'} ({how})"
