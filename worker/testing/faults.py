"""The stand-in's seeded draws: service time, which fault (if any), and its concurrency cap."""

from __future__ import annotations

import asyncio
import math
import random

from worker.testing.config import StandInConfig

FAULTS = ("reset", "error_503", "error_429", "commit_then_fail", "reject")


class Faults:
    """Random draws from the knobs; reseed() makes a sequence repeat."""

    def __init__(self, seed: int | None) -> None:
        self._sem: asyncio.Semaphore | None = None
        self._sem_size: int | None = None
        self.reseed(seed)

    def reseed(self, seed: int | None) -> None:
        """Restart both generators from `seed` (None: unseeded)."""
        self._rng = random.Random(seed)
        # Latency has its own generator so a fault sequence does not shift with latency knobs.
        self._latency_rng = random.Random(None if seed is None else seed + 1)

    def semaphore(self, limit: int | None) -> asyncio.Semaphore | None:
        """The semaphore for `limit` calls at once (None: no cap), new when the limit changed."""
        if limit != self._sem_size:
            self._sem_size = limit
            self._sem = None if limit is None else asyncio.Semaphore(limit)
        return self._sem

    async def delay(self, cfg: StandInConfig) -> None:
        """Sleep one service time: the median, log-normally spread by `latency_sigma`."""
        if cfg.latency_s > 0:
            delay = cfg.latency_s
            if cfg.latency_sigma > 0:
                delay = self._latency_rng.lognormvariate(math.log(delay), cfg.latency_sigma)
            await asyncio.sleep(delay)

    def draw(self, cfg: StandInConfig) -> str | None:
        """One uniform draw against the stacked fault probabilities (exact while they sum ≤ 1)."""
        if not (cfg.reset or cfg.error_503 or cfg.error_429 or cfg.commit_then_fail or cfg.reject):
            return None
        draw = self._rng.random()
        for name in FAULTS:
            p: float = getattr(cfg, name)
            if draw < p:
                return name
            draw -= p
        return None
