"""What runs are made of: the shared bench, a run's spec, and its sink."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from aio_pika.abc import AbstractRobustConnection
from rich.progress import Progress, TaskID

from loadtest.procs import StandInProcess, broker_pid


@dataclass
class Bench:
    """What every run shares: the broker connection, the stand-in, the progress display."""

    connection: AbstractRobustConnection
    standin: StandInProcess
    http: httpx.AsyncClient
    progress: Progress
    logs: Path
    quick: bool
    log_level: str = "info"
    broker: int | None = field(default_factory=broker_pid)
    keep_logs: bool = False
    noisy_retries: int = 0

    def task(self, description: str, total: float) -> TaskID:
        """A new line on the progress display."""
        return self.progress.add_task(description, total=total)

    def done(self, task: TaskID) -> None:
        """Remove a finished line from the progress display."""
        self.progress.remove_task(task)


@dataclass(frozen=True)
class RunSpec:
    """What one run does: workers, concurrency, sink latency, and which phases."""

    label: str
    concurrency: int
    workers: int = 1
    latency_ms: float = 50.0
    sigma: float = 0.0
    items: int = 0
    paced_s: float = 0.0
    paced_load: float = 0.7
    batches: tuple[int, ...] = ()
    batch_reps: int = 1
    max_s: float = 120.0
    profile_s: float = 0.0
    rss_every_s: float = 1.0
    adaptive: bool | None = None  # None: the committed default (on)
    peer: str = ""  # "" is memory-worker; else a key of harness.PEERS
    capacity: int | None = None
    capacity_changes: tuple[tuple[float, int | None], ...] = ()
    stop_after_s: float = 0.0
    watch_limit_s: float = 0.0
    store_latency: bool = False

    @property
    def mean_latency_s(self) -> float:
        """Mean service time of the sink: median × exp(σ²/2) for a log-normal."""
        return self.latency_ms / 1000 * math.exp(self.sigma**2 / 2)

    @property
    def ideal_items_per_s(self) -> float | None:
        """min(W·c, capacity) ÷ mean latency: what perfect concurrency would reach.

        None for a 0 ms sink. `capacity` is the stand-in's cap at the start of the run.
        """
        if self.mean_latency_s <= 0:
            return None
        slots = self.workers * self.concurrency
        if self.capacity is not None:
            slots = min(slots, self.capacity)
        return slots / self.mean_latency_s


@dataclass
class Sink:
    """Where items go and how the runner learns they arrived."""

    url: str
    standin: StandInProcess | None
    pid: int | None

    @property
    def name(self) -> str:
        """`stand-in` or `session-buddy`."""
        return "stand-in" if self.standin is not None else "session-buddy"
