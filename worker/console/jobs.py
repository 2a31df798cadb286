"""The console's actions: replay or purge a selection in the background, one at a time.

Both call `worker.dlq_edit`, as `memory-worker dlq` does, restricted to the fingerprints the
operator was shown. A replay is paced, can be cancelled, waits while a watched worker's
breaker is open, and stops by itself once a message it replayed is dead-lettered again.
Each action ends in one `console_action` log line: who, what, how many, the result.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from types import TracebackType
from typing import Self

import structlog
from aio_pika.abc import AbstractConnection

from worker import dlq_edit
from worker.console.snapshot import DeadLetters
from worker.dlq_model import Filter
from worker.topology import Topology

log = structlog.get_logger("worker.console")

#: How often a paused replay looks at the breaker again.
PAUSE_POLL_S = 0.5
#: Finished jobs kept for their pages; older ones are forgotten.
KEEP_JOBS = 50


@dataclass(frozen=True, slots=True)
class Selection:
    """What an action applies to: the exact copies shown, and their reason for a group."""

    scope: str  # one, selected or group
    fingerprints: Counter[str]
    reason: str | None = None

    @property
    def count(self) -> int:
        """How many dead letters were chosen."""
        return sum(self.fingerprints.values())

    @property
    def filter(self) -> Filter:
        """The filter the selection's copies meet (a group's reason; else every one)."""
        return Filter(reasons=frozenset({self.reason})) if self.reason else Filter()


@dataclass
class Job:
    """One replay or purge, as its page shows it while it runs and after."""

    id: int
    action: str
    selection: Selection
    who: str
    rate_per_s: float | None = None
    state: str = "running"  # running, paused, then done, stopped, cancelled or failed
    done: int = 0
    message: str = ""
    cancel_requested: bool = False
    started_s: float = field(default_factory=time.time)
    finished_s: float | None = None

    @property
    def finished(self) -> bool:
        """Whether the job has ended."""
        return self.finished_s is not None

    @property
    def total(self) -> int:
        """How many dead letters the job acts on."""
        return self.selection.count


class JobBusy(Exception):
    """Another action holds the DLQ."""


class Jobs:
    """Runs actions in background tasks, each reaped; `async with` cancels any still running."""

    def __init__(
        self,
        connection: AbstractConnection,
        topology: Topology,
        dead_letters: DeadLetters,
        breaker_open: Callable[[], bool],
    ) -> None:
        self._connection = connection
        self._topology = topology
        self._dead_letters = dead_letters
        self._breaker_open = breaker_open
        self._ids = itertools.count(1)
        self.jobs: dict[int, Job] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    def __repr__(self) -> str:
        return f"<Jobs running={len(self._tasks)} kept={len(self.jobs)}>"

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError):
                await task

    def start(self, action: str, selection: Selection, who: str, rate_per_s: float | None) -> Job:
        """Start a replay or purge of `selection`; `JobBusy` while another one runs."""
        if self._tasks or self._dead_letters.lock.locked():
            raise JobBusy("another action or a read holds the DLQ; try again when it ends")
        job = Job(next(self._ids), action, selection, who, rate_per_s)
        self.jobs[job.id] = job
        for old in sorted(self.jobs)[:-KEEP_JOBS]:
            del self.jobs[old]
        task = asyncio.create_task(self._run(job), name=f"console-{action}-{job.id}")
        self._tasks.add(task)
        task.add_done_callback(self._reap)
        return job

    def _reap(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and (exc := task.exception()) is not None:
            log.error("console_job_crashed", task=task.get_name(), error=repr(exc))

    async def _run(self, job: Job) -> None:
        async with self._dead_letters.lock:
            try:
                if job.action == "replay":
                    await self._replay(job)
                else:
                    await self._purge(job)
                # The page then shows what is left, the replayed or removed ones gone.
                await self._dead_letters.read_held()
            except asyncio.CancelledError:
                job.state, job.message = "cancelled", "the console stopped"
                raise
            except Exception as exc:
                job.state, job.message = "failed", repr(exc)
                raise
            finally:
                job.finished_s = time.time()
                _log(job)

    async def _replay(self, job: Job) -> None:
        report = dlq_edit.ReplayReport()

        async def gate() -> str | None:
            job.done = report.replayed
            while not job.cancel_requested:
                if not self._breaker_open():
                    job.state = "running"
                    return None
                job.state = "paused"
                await asyncio.sleep(PAUSE_POLL_S)
            return "cancelled"

        await dlq_edit.replay(
            self._connection,
            self._topology,
            job.selection.filter,
            rate_per_s=job.rate_per_s,
            only=job.selection.fingerprints,
            gate=gate,
            stop_on_return=True,
            report=report,
        )
        job.done = report.replayed
        cancelled = report.error == "cancelled"
        job.state = "cancelled" if cancelled else "stopped" if report.error else "done"
        job.message = f"replayed {report.replayed} of {job.total}"
        if report.missing:
            job.message += f"; {report.missing} were no longer in the DLQ"
        if report.error and not cancelled:
            job.message += f"; {report.error}"

    async def _purge(self, job: Job) -> None:
        report = dlq_edit.PurgeReport()
        await dlq_edit.purge(
            self._connection,
            self._topology.dead_letter_queue,
            job.selection.filter,
            only=job.selection.fingerprints,
            report=report,
            on_progress=lambda seen, total: setattr(job, "done", len(report.removed)),
        )
        job.done = len(report.removed)
        job.state = "stopped" if report.error else "done"
        job.message = f"removed {job.done} of {job.total}"
        if report.missing:
            job.message += f"; {report.missing} were no longer in the DLQ"
        if report.error:
            job.message += f"; {report.error}"


def _log(job: Job) -> None:
    """The action's one log line."""
    log.info(
        "console_action",
        action=job.action,
        who=job.who,
        scope=job.selection.scope,
        reason=job.selection.reason,
        selected=job.total,
        done=job.done,
        result=job.state,
        detail=job.message,
        rate_per_s=job.rate_per_s,
        duration_s=round((job.finished_s or time.time()) - job.started_s, 3),
    )
