"""The console's pages: overview, reason groups, a group's list, one message, a job, login."""

from __future__ import annotations

import json
import time
from typing import Any

from aiohttp import web

from worker.console.groups import page_of
from worker.console.state import STATE, render
from worker.dlq_format import jsonable, pretty_body
from worker.dlq_model import current_ms
from worker.guard import COOKIE, cookie_value
from worker.headers import PREFIX
from worker.outcome import PERMANENT

routes = web.RouteTableDef()


def add_routes(app: web.Application) -> None:
    """Register the pages on `app`."""
    app.router.add_routes(routes)


def _overview_context(request: web.Request) -> dict[str, Any]:
    monitor = request.app[STATE].monitor
    return {
        "monitor": monitor,
        "rows": monitor.rows,
        "workers": monitor.workers.views,
        "lines": monitor.history.polylines(),
        "now_s": time.time(),
    }


@routes.get("/")
async def overview(request: web.Request) -> web.Response:
    """The live overview: queues, a graph of their depths, the workers."""
    return render(request, "overview.html", **_overview_context(request))


@routes.get("/overview")
async def overview_fragment(request: web.Request) -> web.Response:
    """The overview's body alone, which the page fetches every few seconds."""
    return render(request, "_overview.html", **_overview_context(request))


async def _snapshot_context(request: web.Request) -> dict[str, Any]:
    dead_letters = request.app[STATE].dead_letters
    if dead_letters.snapshot is None or "reread" in request.query:
        await dead_letters.read()
    snapshot = dead_letters.snapshot
    return {
        "snapshot": snapshot,
        "read_error": dead_letters.error,
        "now_ms": current_ms(),
        "permanent": PERMANENT,
        "rate": request.app[STATE].settings.console.replay_rate_per_s,
    }


@routes.get("/dlq")
async def groups(request: web.Request) -> web.Response:
    """Dead letters grouped by reason, with the group actions."""
    context = await _snapshot_context(request)
    return render(request, "groups.html", groups=request.app[STATE].dead_letters.groups, **context)


@routes.get("/dlq/reason/{reason}")
async def group(request: web.Request) -> web.Response:
    """One reason's dead letters, a page at a time."""
    reason = request.match_info["reason"]
    context = await _snapshot_context(request)
    dead_letters = request.app[STATE].dead_letters
    summary = next((g for g in dead_letters.groups if g.reason == reason), None)
    try:
        number = int(request.query.get("page", "1"))
    except ValueError:
        number = 1
    page = page_of(dead_letters.letters(reason), number)
    return render(request, "group.html", reason=reason, group=summary, page=page, **context)


@routes.get("/dlq/message/{fingerprint}")
async def message(request: web.Request) -> web.Response:
    """One dead letter: its failure envelope, its other headers and its body."""
    context = await _snapshot_context(request)
    letter = request.app[STATE].dead_letters.find(request.match_info["fingerprint"])
    if letter is None:
        error = "no such dead letter in the snapshot (replayed, purged, or read again since)"
        return render(request, "error.html", status=404, error=error)
    # x-delivery-count on a quorum DLQ counts reads like the console's, not failures.
    other = {
        k: v for k, v in letter.headers.items() if not k.startswith((PREFIX, "x-delivery-count"))
    }
    return render(
        request,
        "message.html",
        letter=letter,
        envelope=letter.envelope(),
        headers=json.dumps(jsonable(other), indent=2, ensure_ascii=False),
        body=pretty_body(letter.body),
        **context,
    )


@routes.get("/jobs/{id}")
async def job(request: web.Request) -> web.Response:
    """A replay or purge: its progress while it runs, its result after."""
    found = request.app[STATE].jobs.jobs.get(_job_id(request))
    if found is None:
        return render(
            request, "error.html", status=404, error="no such action (the console restarted?)"
        )
    return render(request, "job.html", job=found)


@routes.get("/jobs/{id}/progress")
async def job_fragment(request: web.Request) -> web.Response:
    """A job's progress alone, which its page fetches every second."""
    found = request.app[STATE].jobs.jobs.get(_job_id(request))
    if found is None:
        raise web.HTTPNotFound()
    return render(request, "_job.html", job=found)


def _job_id(request: web.Request) -> int:
    try:
        return int(request.match_info["id"])
    except ValueError:
        raise web.HTTPNotFound() from None


@routes.get("/login")
async def login_form(request: web.Request) -> web.Response:
    """The form that trades the token for a cookie."""
    return render(request, "login.html", error=None)


@routes.post("/login")
async def login(request: web.Request) -> web.StreamResponse:
    """Set the login cookie when the typed token is the console's."""
    token = request.app[STATE].token
    if token is None:
        raise web.HTTPSeeOther("/")
    typed = str((await request.post()).get("token", ""))
    if cookie_value(token) != cookie_value(type(token)(typed)):
        return render(request, "login.html", status=403, error="that is not the console's token")
    response = web.HTTPSeeOther("/")
    response.set_cookie(COOKIE, cookie_value(token), httponly=True, samesite="Strict")
    raise response
