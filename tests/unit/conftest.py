"""Fixtures for every unit test: settings isolated from the machine and the repository."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from worker.settings import CONFIG_ENV


@pytest.fixture(autouse=True)
def isolated_settings(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Hide MAHAVISHNU_* and MEMORY_WORKER_* env vars and the repo's YAML files from `Settings`.

    Every unit test runs with no such variable (MEMORY_WORKER_CONFIG included) and an empty
    working directory, so it sees the defaults plus whatever it sets itself.
    """
    for name in list(os.environ):
        if name.upper().startswith(("MAHAVISHNU_", "MEMORY_WORKER_")) or name == CONFIG_ENV:
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)
