"""Fixtures for the browser tests: the broker fixtures, and headless Chromium via Playwright.

Chromium is Debian's, unpacked by tests/browser/prepare.sh; without it the tests skip, except
in CI (CI set), where they fail: .ci/run prepares it.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from tests.integration.conftest import amqp_url, connection, make_settings, no_leftover_workers

__all__ = ["amqp_url", "browser", "connection", "make_settings", "no_leftover_workers"]

CHROMIUM_ENV = "MEMORY_WORKER_CHROMIUM_DIR"


def chromium_path() -> Path:
    """Where tests/browser/prepare.sh leaves its Chromium wrapper."""
    default = Path.home() / ".cache" / "memory-worker" / "chromium"
    return Path(os.environ.get(CHROMIUM_ENV) or default) / "chromium"


@pytest.fixture
async def browser() -> AsyncIterator[Any]:
    """A headless Chromium, closed at teardown."""
    path = chromium_path()
    try:
        from playwright.async_api import async_playwright  # noqa: PLC0415 - a dev dependency
    except ImportError:
        path = Path("/nonexistent")
    if not path.exists():
        message = f"no Chromium at {path}: run tests/browser/prepare.sh"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    async with async_playwright() as playwright:
        launched = await playwright.chromium.launch(
            executable_path=str(path), args=["--no-sandbox", "--disable-gpu"]
        )
        try:
            yield launched
        finally:
            await launched.close()
