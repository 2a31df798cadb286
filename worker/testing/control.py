"""The stand-in's control routes, so a process that did not start it can still steer it."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import orjson
from aiohttp import web

import worker.testing.protocol as p
from worker.testing.config import StandInConfig, StandInStats


class Control:
    """GET /_standin/stats and POST /_standin/{config,forget-sessions,reset,hold,release,stats}."""

    def __init__(
        self,
        config: Callable[[], StandInConfig],
        stats: Callable[[], StandInStats],
        outage: Callable[[float], None],
        reseed: Callable[[], None],
        actions: dict[str, Callable[[], None]],
    ) -> None:
        self._config = config
        self._stats = stats
        self._outage = outage
        self._reseed = reseed
        self._actions = {**actions, "stats": _nothing}

    async def handle(self, request: web.Request) -> web.Response:
        """Out-of-process control: stats, a JSON config patch, and the no-argument actions."""
        action = request.match_info.get("action", "stats")
        if action == "config":
            return await self._patch(request)
        if (run := self._actions.get(action)) is None:
            return p.json_answer(404, {"error": f"unknown action; one of {sorted(self._actions)}"})
        run()
        return p.json_answer(200, dataclasses.asdict(self._stats()))

    async def _patch(self, request: web.Request) -> web.Response:
        try:
            patch = orjson.loads(await request.read())
        except orjson.JSONDecodeError:
            patch = None
        known = {f.name for f in dataclasses.fields(StandInConfig)} | {"outage_s"}
        if not isinstance(patch, dict) or not set(patch) <= known:
            return p.json_answer(
                400, {"error": f"expected an object with keys among {sorted(known)}"}
            )
        config = self._config()
        for name, value in patch.items():
            if name == "outage_s":  # a relative deadline, as the client cannot read our clock
                self._outage(float(value))
            else:
                setattr(config, name, value)
        if "seed" in patch:
            self._reseed()
        return p.json_answer(200, dataclasses.asdict(config))


def _nothing() -> None:
    """The `stats` action: only the answer, which every action returns."""
