"""The stand-in's knobs, its counters, and the hook that sees each store."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from aiohttp import web


@dataclass
class StandInConfig:
    """Knobs of the stand-in: all off by default, read per request so they can change live."""

    latency_s: float = 0.0
    latency_sigma: float = 0.0
    error_503: float = 0.0
    error_429: float = 0.0
    retry_after_s: float = 1.0
    reset: float = 0.0
    commit_then_fail: float = 0.0
    reject: float = 0.0
    status_for_all: int | None = None
    outage_until: float = 0.0
    max_concurrency: int | None = None
    conflict_on_duplicate: bool = False
    seed: int | None = None
    max_items: int = 100_000


@dataclass
class StandInStats:
    """Counters since start or the last reset()."""

    calls: int = 0
    stored: int = 0
    distinct_keys: int = 0
    duplicates: int = 0
    rejected: int = 0
    faults: dict[str, int] = field(default_factory=dict)
    sessions_opened: int = 0
    in_flight: int = 0
    peak_in_flight: int = 0
    truncated: int = 0
    held: int = 0
    # Store calls in flight whose client is still connected, i.e. still waiting for the answer.
    waiting: int = 0


@dataclass(frozen=True, slots=True)
class StoreCall:
    """One valid store about to be recorded, as `on_store` sees it."""

    key: str | None  # source_session_id (MCP) or Idempotency-Key (plain JSON), if sent
    content: str
    received: float  # time.monotonic() when the call reached the stand-in


#: Called for each valid store before it is recorded; it may wait (a slow or held sink), and
#: returning a response answers with it instead of storing (nothing is recorded then).
OnStore = Callable[[StoreCall], Awaitable[web.StreamResponse | None]]
