"""Run a coroutine to completion on uvloop when it is installed, else on asyncio's loop."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


def run(main: Coroutine[Any, Any, T]) -> T:
    """Run `main` on a fresh event loop (uvloop when installed) and return its result."""
    try:
        import uvloop  # noqa: PLC0415 - optional (not on Windows): looked for when a loop is made
    except ImportError:
        return asyncio.run(main)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(main)
