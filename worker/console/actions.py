"""The console's changing requests: replay, purge, cancel. The guard has let them in."""

from __future__ import annotations

from collections import Counter
from typing import Any, TypeAlias

import structlog
from aiohttp import web
from multidict import MultiDictProxy

from worker.console.jobs import JobBusy, Selection
from worker.console.state import STATE, render, who
from worker.outcome import PERMANENT

log = structlog.get_logger("worker.console")
routes = web.RouteTableDef()
#: A posted form, as aiohttp parses it.
Form: TypeAlias = "MultiDictProxy[Any]"
ACTIONS = ("replay", "purge")


def add_routes(app: web.Application) -> None:
    """Register the actions on `app`."""
    app.router.add_routes(routes)


class Refused(Exception):
    """An action the form does not allow; the message says why."""


def selection(request: web.Request, form: Form) -> Selection:
    """What the form chose, among the dead letters of the snapshot the operator was shown."""
    dead_letters = request.app[STATE].dead_letters
    scope = str(form.get("scope", ""))
    if scope == "group":
        reason = str(form.get("reason", ""))
        chosen = Counter(d.fingerprint for d in dead_letters.letters(reason))
        if not chosen:
            raise Refused(f"no dead letter of reason {reason!r} in the snapshot")
        return Selection(scope, chosen, reason)
    if scope not in ("one", "selected"):
        raise Refused("choose one message, a selection or a reason group")
    shown = {d.fingerprint for d in dead_letters.letters()}
    chosen = Counter(str(fp) for fp in form.getall("fp", []) if str(fp) in shown)
    if not chosen:
        raise Refused("nothing selected (or none of it is in the snapshot any more)")
    return Selection(scope, chosen)


def _rate(request: web.Request, form: Form) -> float:
    default = request.app[STATE].settings.console.replay_rate_per_s
    try:
        rate = float(str(form.get("rate", "") or default))
    except ValueError:
        raise Refused("the rate is a number of messages a second") from None
    if not rate > 0:
        raise Refused("the rate must be above 0")
    return rate


def _check(
    request: web.Request,
    action: str,
    form: Form,
    chosen: Selection,
) -> None:
    if action == "purge" and str(form.get("confirm", "")).strip() != str(chosen.count):
        raise Refused(f"to purge, type the number of dead letters chosen: {chosen.count}")
    if action == "replay" and not form.get("force"):
        dead_letters = request.app[STATE].dead_letters
        reasons = {d.reason for d in dead_letters.letters() if d.fingerprint in chosen.fingerprints}
        if hopeless := sorted(reasons & PERMANENT):
            raise Refused(
                f"replaying {', '.join(hopeless)} cannot succeed: the worker refuses such a "
                "message again. Fix the items and publish them anew."
            )


@routes.post("/actions/{action}")
async def act(request: web.Request) -> web.StreamResponse:
    """Start a replay or purge of the chosen dead letters; its page shows the progress."""
    action = request.match_info["action"]
    if action not in ACTIONS:
        raise web.HTTPNotFound()
    form = await request.post()
    try:
        chosen = selection(request, form)
        _check(request, action, form, chosen)
        rate = _rate(request, form) if action == "replay" else None
        job = request.app[STATE].jobs.start(action, chosen, who(request), rate)
    except (Refused, JobBusy) as exc:
        status = 409 if isinstance(exc, JobBusy) else 400
        log.warning("console_action_refused", action=action, who=who(request), why=str(exc))
        return render(request, "error.html", status=status, error=str(exc))
    raise web.HTTPSeeOther(f"/jobs/{job.id}")


@routes.post("/jobs/{id}/cancel")
async def cancel(request: web.Request) -> web.StreamResponse:
    """Ask a running replay to stop before its next message."""
    try:
        job = request.app[STATE].jobs.jobs[int(request.match_info["id"])]
    except (KeyError, ValueError):
        raise web.HTTPNotFound() from None
    job.cancel_requested = True
    raise web.HTTPSeeOther(f"/jobs/{job.id}")
