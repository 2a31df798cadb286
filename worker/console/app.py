"""The console's aiohttp application: state, templates, the guard every request passes.

The guard, in order: reading needs the token where one is set (bearer or login cookie);
under `--read-only` every changing request is answered 405; a changing request must come
from the console's own page or carry the token (`worker.guard`), else 403. Every answer
carries a content security policy that runs only the console's own script, so an item's
content, escaped by the templates anyway, could not run even if it were not.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from importlib.resources import files
from pathlib import Path

import structlog
from aiohttp import web

from worker.console import actions, pages
from worker.console.state import STATE, TEMPLATES, ConsoleState, render, templates
from worker.guard import change_refusal, may_read

log = structlog.get_logger("worker.console")

PACKAGE = files("worker.console")
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; "
    "img-src 'self'; connect-src 'self'; form-action 'self'; frame-ancestors 'none'; "
    "base-uri 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}
#: Paths a visitor without the token may open: the login form and what it is drawn with.
OPEN_PATHS = ("/login", "/static/")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def guard(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Refuse what the request may not do; add the security headers to every answer."""
    try:
        response = await _guarded(request, handler)
    except web.HTTPException as exc:
        exc.headers.update(SECURITY_HEADERS)
        raise
    response.headers.update(SECURITY_HEADERS)
    return response


async def _guarded(request: web.Request, handler: Handler) -> web.StreamResponse:
    state = request.app[STATE]
    changing = request.method not in ("GET", "HEAD", "OPTIONS")
    if not request.path.startswith(OPEN_PATHS) and not may_read(
        request.headers, request.cookies, state.token
    ):
        if changing:
            return render(request, "error.html", status=403, error="log in first")
        raise web.HTTPSeeOther("/login")
    if changing and state.read_only and request.path != "/login":
        return _refused(request, 405, "the console is read-only")
    refusal = change_refusal(request.method, request.headers, state.token) if changing else None
    if refusal is not None:
        return _refused(request, 403, refusal)
    return await handler(request)


def _refused(request: web.Request, status: int, why: str) -> web.Response:
    """A refused change, logged as an action that did not happen."""
    # Only the address: a refused request was let in by no route, so `who` would mislabel it.
    remote = request.remote or "?"
    log.warning("console_action_refused", path=request.path, who=remote, status=status, why=why)
    return render(request, "error.html", status=status, error=why)


def build_app(state: ConsoleState) -> web.Application:
    """The application with its routes; `state`'s parts are opened and closed by the caller."""
    app = web.Application(middlewares=[guard])
    app[STATE] = state
    app[TEMPLATES] = templates()
    pages.add_routes(app)
    actions.add_routes(app)
    app.router.add_static("/static", Path(str(PACKAGE.joinpath("static"))))
    return app
