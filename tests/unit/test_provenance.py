"""Tests for unknown setting names and where each value came from."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.fixtures.mahavishnu_0_36 import POOL_CONFIG_FIELDS, SETTINGS_FIELDS
from worker.settings import SettingsError, load_settings

CONCURRENCY_ENV = "MAHAVISHNU_POOLS__MAX_CONCURRENT_MEMORY_INSERTIONS"


def load_with(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, yaml: str = "", **env: str
) -> tuple[str, list[str]]:
    """Load settings from one YAML file and env vars; the error text (or "") and warnings."""
    path = tmp_path / "local.yaml"
    path.write_text(yaml, encoding="utf-8")
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    warnings: list[str] = []
    try:
        load_settings(config=str(path), warn=warnings.append)
    except SettingsError as exc:
        return str(exc), warnings
    return "", warnings


@pytest.mark.parametrize(
    ("env", "meant"),
    [
        ("MAHAVISHNU_POOLS__MAX_CONCURENT_MEMORY_INSERTIONS", CONCURRENCY_ENV),
        ("MAHAVISHNU_RABBITMQ_URL", "MAHAVISHNU_RABBITMQ__URL"),
        ("MAHAVISHNU_SINK__TIEMOUT_S", "sink.timeout_s"),
        ("MAHAVISHNU_LEDGR__URL", "MAHAVISHNU_LEDGER__URL"),
    ],
)
def test_env_typo_is_an_error_with_a_did_you_mean(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, env: str, meant: str
) -> None:
    """A misspelt env var close to one of ours stops loading, naming it and what it meant."""
    error, _ = load_with(monkeypatch, tmp_path, **{env: "20"})
    assert env in error and f"did you mean {meant}?" in error


def test_yaml_typos_are_errors_naming_the_file(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Misspelt keys in a settings file are errors, each naming the file and the right key."""
    yaml = "pools:\n  max_concurent_memory_insertions: 20\nrabitmq:\n  url: amqp://x/\n"
    error, _ = load_with(monkeypatch, tmp_path, yaml)
    assert "pools.max_concurent_memory_insertions (" in error and "local.yaml" in error
    assert "did you mean pools.max_concurrent_memory_insertions?" in error
    assert "rabitmq (" in error and "did you mean rabbitmq?" in error


def test_mahavishnus_own_keys_pass_silently(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Mahavishnu's pools keys and sections, in a file or the env, are neither errors nor warned."""
    yaml = "pools:\n  min_workers: 2\n  routing_strategy: round_robin\nworkers: {}\nllm: {}\n"
    error, warnings = load_with(
        monkeypatch,
        tmp_path,
        yaml,
        MAHAVISHNU_LOG_LEVEL="DEBUG",
        MAHAVISHNU_POOLS__MEMORY_SYNC_INTERVAL="30",
        MAHAVISHNU_DLQ__MAX_SIZE="10",
    )
    assert error == "" and warnings == []


def test_every_key_of_mahavishnu_0_36_passes_silently(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Each of 0.36.0's top-level fields and PoolConfig fields, in a file and under its prefix."""
    yaml = "".join(f"{name}: {{}}\n" for name in SETTINGS_FIELDS if name != "pools")
    url = "http://sb:8678/mcp"  # session_buddy_url is one of ours too: a valid value
    value = {name: url if name.endswith("_url") else "1" for name in POOL_CONFIG_FIELDS}
    yaml += "pools:\n" + "".join(f"  {name}: {value[name]}\n" for name in POOL_CONFIG_FIELDS)
    env = {f"MAHAVISHNU_{name.upper()}": "1" for name in SETTINGS_FIELDS if name != "pools"}
    env |= {
        f"MAHAVISHNU_{name.upper()}__ENABLED": "1" for name in SETTINGS_FIELDS if name != "pools"
    }
    env |= {f"MAHAVISHNU_POOLS__{name.upper()}": value[name] for name in POOL_CONFIG_FIELDS}
    env |= {"MAHAVISHNU_OUTBOX_ENABLED": "true", "MAHAVISHNU_OUTBOX_DRAIN": "false"}  # no fields
    error, warnings = load_with(monkeypatch, tmp_path, yaml, **env)
    assert error == "" and warnings == []


def test_other_unknown_keys_get_one_warning_each(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A name far from ours and not Mahavishnu's is one warning line, and loading goes on."""
    error, warnings = load_with(
        monkeypatch, tmp_path, "frobnicate: 1\n", MAHAVISHNU_SOMETHING_ELSE="1"
    )
    assert error == ""
    assert len(warnings) == 2
    assert any("frobnicate" in w and "local.yaml" in w for w in warnings)
    assert any("MAHAVISHNU_SOMETHING_ELSE" in w for w in warnings)


def test_bad_value_echoes_it_and_says_where_it_came_from(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """An invalid value is echoed with its source; a secret is masked."""
    error, _ = load_with(
        monkeypatch,
        tmp_path,
        "pools:\n  max_concurrent_memory_insertions: 70\n",
        MAHAVISHNU_RABBITMQ__URL="http://user:hunter2@host/",
    )
    assert "pools.max_concurrent_memory_insertions = 70 (" in error
    assert "local.yaml; env " + CONCURRENCY_ENV in error
    assert "rabbitmq.url = **** (env MAHAVISHNU_RABBITMQ__URL)" in error
    assert "hunter2" not in error


def test_files_loaded_are_recorded(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The settings remember which files they were loaded from, in order."""
    first, second = tmp_path / "a.yaml", tmp_path / "b.yaml"
    first.write_text("pools:\n  max_concurrent_memory_insertions: 3\n", encoding="utf-8")
    second.write_text("pools:\n  max_concurrent_memory_insertions: 4\n", encoding="utf-8")
    settings = load_settings(config=f"{first}:{second}")
    assert settings.files == (str(first), str(second))
    assert settings.concurrency == 4


@pytest.mark.parametrize("token", ["tök€n", "line\nbreak"])
def test_a_token_that_cannot_be_a_header_is_refused_at_load(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, token: str
) -> None:
    """sink.token goes into an HTTP header: non-Latin-1 or a line break fails at load, masked."""
    error, _ = load_with(monkeypatch, tmp_path, MAHAVISHNU_SINK__TOKEN=token)
    assert "sink.token = **** (env MAHAVISHNU_SINK__TOKEN)" in error
    assert token not in error
