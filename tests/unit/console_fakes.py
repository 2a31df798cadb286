"""Dead letters and a console state built without a broker, for the console's unit tests."""

from __future__ import annotations

from collections import Counter
from typing import Any

from worker.console.groups import group_by_reason
from worker.console.jobs import Job, JobBusy, Selection
from worker.console.queues import History
from worker.console.snapshot import DeadLetters
from worker.console.state import ConsoleState
from worker.console.workers import Workers
from worker.dlq_model import DeadLetter, Snapshot
from worker.settings import load_settings


def letter(
    n: int,
    reason: str = "rejected_by_sink",
    detail: str = "Memory guard blocked write",
    pool: str | None = "pool-1",
    last_ms: int | None = 1_700_000_000_000,
    body: bytes | None = None,
) -> DeadLetter:
    """One dead letter as `worker.dlq_model.read_letter` would make it."""
    return DeadLetter(
        position=n,
        id=f"sha256:{n:064x}",
        reason=reason,
        detail=detail,
        attempts=1,
        first_failure_ms=None if last_ms is None else last_ms - 1000,
        last_failure_ms=last_ms,
        worker="w-1",
        source_queue="memory.items",
        pool=pool,
        replayed=0,
        content_type="application/json",
        headers={"x-mw-reason": reason, "x-origin": "test"},
        body=body if body is not None else b'{"content": "item %d"}' % n,
        fingerprint=f"{n:064x}",
    )


class FakeJobs:
    """Records the actions started instead of touching a broker."""

    def __init__(self) -> None:
        self.jobs: dict[int, Job] = {}
        self.busy = False

    def start(self, action: str, selection: Selection, who: str, rate: float | None) -> Job:
        """Record the action as a finished job."""
        if self.busy:
            raise JobBusy("busy")
        job = Job(len(self.jobs) + 1, action, selection, who, rate)
        self.jobs[job.id] = job
        return job


class FakeMonitor:
    """An overview that was read once, with no worker."""

    refresh_s = 3.0
    source = "passive declare"
    error = None
    polled_at = 1_700_000_000.0

    def __init__(self) -> None:
        self.rows: list[Any] = []
        self.history = History()
        self.workers = Workers()


def state(
    letters: list[DeadLetter], *, read_only: bool = False, **console: Any
) -> tuple[ConsoleState, FakeJobs]:
    """A console state whose snapshot holds `letters`; its jobs are recorded, not run."""
    settings = load_settings({"console": console} if console else None)
    dead_letters = DeadLetters(None, "memory.items.dlq")  # type: ignore[arg-type]
    dead_letters.snapshot = Snapshot("memory.items.dlq", len(letters), 0, tuple(letters), 0)
    dead_letters.groups = group_by_reason(letters)
    jobs = FakeJobs()
    return ConsoleState(settings, dead_letters, jobs, FakeMonitor(), read_only), jobs  # type: ignore[arg-type]


def fingerprints(*letters: DeadLetter) -> Counter[str]:
    """The selection of exactly these letters."""
    return Counter(d.fingerprint for d in letters)
