"""Tests for the worker's own env prefix, MEMORY_WORKER_, beside ACT-008's MAHAVISHNU_."""

from __future__ import annotations

import pytest

from worker.settings import SettingsError, load_settings

OWN = "MEMORY_WORKER_POOLS__MAX_CONCURRENT_MEMORY_INSERTIONS"
ACT008 = "MAHAVISHNU_POOLS__MAX_CONCURRENT_MEMORY_INSERTIONS"


def load(warnings: list[str] | None = None) -> object:
    """Load settings, collecting warning lines."""
    return load_settings(warn=(warnings if warnings is not None else []).append)


def test_own_prefix_sets_a_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    """MEMORY_WORKER_POOLS__MAX_CONCURRENT_MEMORY_INSERTIONS sets the concurrency."""
    monkeypatch.setenv(OWN, "7")
    assert load_settings().concurrency == 7


def test_own_prefix_wins_over_mahavishnu(monkeypatch: pytest.MonkeyPatch) -> None:
    """Given both, the MEMORY_WORKER_ value wins; other keys of either prefix still apply."""
    monkeypatch.setenv(OWN, "7")
    monkeypatch.setenv(ACT008, "3")
    monkeypatch.setenv("MAHAVISHNU_SINK__TIMEOUT_S", "12")
    monkeypatch.setenv("MEMORY_WORKER_SINK__TOOL", "other_tool")
    settings = load_settings()
    assert settings.concurrency == 7
    assert settings.sink.timeout_s == 12 and settings.sink.tool == "other_tool"


def test_act008_names_keep_working(monkeypatch: pytest.MonkeyPatch) -> None:
    """MAHAVISHNU_POOLS__MAX_CONCURRENT_MEMORY_INSERTIONS alone still sets the concurrency."""
    monkeypatch.setenv(ACT008, "4")
    assert load_settings().concurrency == 4


def test_invalid_value_names_the_own_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    """A bad value given with MEMORY_WORKER_ is reported with that variable as its origin."""
    monkeypatch.setenv(ACT008, "3")
    monkeypatch.setenv(OWN, "99")
    with pytest.raises(SettingsError, match=f"= '99' \\(env {OWN}\\)"):
        load_settings()


@pytest.mark.parametrize(
    ("var", "meant"),
    [
        (
            "MEMORY_WORKER_POOLS__MAX_CONCURENT_MEMORY_INSERTIONS",
            "max_concurrent_memory_insertions",
        ),
        ("MEMORY_WORKER_SINK__TIMEOUT", "timeout_s"),
        ("MEMORY_WORKER_RABBITMQ_URL", "MEMORY_WORKER_RABBITMQ__URL"),
    ],
)
def test_own_prefix_typos_are_errors(monkeypatch: pytest.MonkeyPatch, var: str, meant: str) -> None:
    """A name close to a setting under MEMORY_WORKER_ stops the load, naming what was meant."""
    monkeypatch.setenv(var, "1")
    with pytest.raises(SettingsError, match=meant):
        load_settings()


def test_not_settings_under_own_prefix_pass(monkeypatch: pytest.MonkeyPatch) -> None:
    """MEMORY_WORKER_TEST_* (the tests' broker and Redis) are not settings and not warned about."""
    monkeypatch.setenv("MEMORY_WORKER_TEST_AMQP_URL", "amqp://x")
    warnings: list[str] = []
    load(warnings)
    assert warnings == []


def test_mahavishnu_keys_pass_under_its_prefix_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """Mahavishnu 0.36's keys are silent under MAHAVISHNU_; under ours they are a warning."""
    monkeypatch.setenv("MAHAVISHNU_POOLS__MEMORY_AGGREGATION_ENABLED", "false")
    monkeypatch.setenv("MAHAVISHNU_POOLS__MEMORY_SYNC_INTERVAL", "60")
    monkeypatch.setenv("MAHAVISHNU_OBSERVABILITY__ENABLED", "true")
    warnings: list[str] = []
    load(warnings)
    assert warnings == []
    monkeypatch.setenv("MEMORY_WORKER_POOLS__MEMORY_SYNC_INTERVAL", "60")
    load(warnings)
    assert warnings == [
        "MEMORY_WORKER_POOLS__MEMORY_SYNC_INTERVAL (env): a Mahavishnu setting; ignored"
        " (Mahavishnu reads it as MAHAVISHNU_POOLS__MEMORY_SYNC_INTERVAL)"
    ]
