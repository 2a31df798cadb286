"""Test doubles shared by the unit tests: a controllable sink, a recording delivery."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from worker.outcome import Outcome
from worker.pipeline import Verdict
from worker.sink import StoreRequest

JSON = "application/json"


class FakeSink:
    """A sink whose answers and timing the test controls; records calls and peak concurrency.

    `results` maps a request's content to an Outcome or an exception to raise; `gates` maps
    content to an event the call waits for (`gate` applies to every other call).
    """

    def __init__(self, default: Outcome | None = None) -> None:
        self.default = default or Outcome.stored()
        self.results: dict[str, Outcome | BaseException] = {}
        self.gates: dict[str, asyncio.Event] = {}
        self.gate: asyncio.Event | None = None
        self.requests: list[StoreRequest] = []
        self.finished: list[str] = []
        self.active = 0
        self.peak = 0

    async def store(self, request: StoreRequest) -> Outcome:
        """Record the call, wait for its gate if any, then answer."""
        self.requests.append(request)
        self.active += 1
        self.peak = max(self.peak, self.active)
        try:
            gate = self.gates.get(request.content, self.gate)
            if gate is not None:
                await gate.wait()
            else:
                await asyncio.sleep(0)
            result = self.results.get(request.content, self.default)
            if isinstance(result, BaseException):
                raise result
            self.finished.append(request.content)
            return result
        finally:
            self.active -= 1


class Clock:
    """A clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@dataclass
class FakeDelivery:
    """A delivery that records every settle call instead of talking to a broker."""

    body: bytes
    content_type: str | None = JSON
    message_id: str | None = None
    headers: Mapping[str, Any] = field(default_factory=dict)
    settle_result: bool = True
    verdicts: list[Verdict] = field(default_factory=list)
    settled_event: asyncio.Event = field(default_factory=asyncio.Event)

    async def settle(self, verdict: Verdict) -> bool:
        """Record the verdict."""
        self.verdicts.append(verdict)
        self.settled_event.set()
        return self.settle_result

    @property
    def verdict(self) -> Verdict:
        """The one verdict; fails if the delivery was settled zero or several times."""
        assert len(self.verdicts) == 1, f"settled {len(self.verdicts)} times"
        return self.verdicts[0]


async def until(predicate: Any, rounds: int = 10_000) -> None:
    """Yield to the loop until `predicate()` holds (bounded by rounds, not by time)."""
    for _ in range(rounds):
        if predicate():
            return
        await asyncio.sleep(0)
    raise AssertionError("condition never became true")
