"""The event loop's busy clock: how long the process ran, how long its loop waited for a core."""

from __future__ import annotations

import os
import time
import weakref
from collections.abc import Callable


def loop_busy_clock() -> Callable[[], tuple[float, float]]:
    """A clock of seconds this process ran, and seconds the calling thread waited for a core.

    CPU time is exact at any moment; the wait comes from Linux's schedstat (counted at each
    switch, so only a window of a few scheduler ticks reads it well). Off Linux, it reads 0.
    Call it from the event loop's thread: the one that does the worker's work.
    """
    cpu_s = time.process_time
    try:
        fd = os.open("/proc/thread-self/schedstat", os.O_RDONLY)
    except OSError:
        return lambda: (cpu_s(), 0.0)

    def busy_s() -> tuple[float, float]:
        return cpu_s(), int(os.pread(fd, 128, 0).split()[1]) / 1e9

    weakref.finalize(busy_s, os.close, fd)
    return busy_s
