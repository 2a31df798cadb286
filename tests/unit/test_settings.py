"""Tests for settings: defaults, env vars, YAML files, precedence, errors, secrets, the CLI."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from worker.cli import check, demo, main, run
from worker.cli.app import build_parser
from worker.cli.common import settings_from_args
from worker.exitcodes import EXIT_CONFIG
from worker.outcome import RetryPolicy
from worker.sections import PoolsSettings
from worker.settings import CONFIG_ENV, SettingsError, load_settings

ROOT = Path(__file__).resolve().parents[2]
CONCURRENCY = "pools.max_concurrent_memory_insertions"
CONCURRENCY_ENV = "MAHAVISHNU_POOLS__MAX_CONCURRENT_MEMORY_INSERTIONS"
PASSWORD = "s3cr3t-Pa55w0rd"
SECRET_URL = f"amqp://memory:{PASSWORD}@broker.internal:5672/prod"


def write(path: Path, text: str) -> Path:
    """Write a YAML file and return its path."""
    path.write_text(text, encoding="utf-8")
    return path


def use_files(monkeypatch: pytest.MonkeyPatch, *paths: Path) -> None:
    """Point MEMORY_WORKER_CONFIG at these files, later ones winning."""
    monkeypatch.setenv(CONFIG_ENV, ":".join(str(p) for p in paths))


def test_defaults() -> None:
    """With no file, env var or flag, the ACT-008 defaults and fixed names apply."""
    s = load_settings()
    assert s.pools.max_concurrent_memory_insertions == 10
    assert s.concurrency == 10
    assert s.pools.enabled is True
    assert str(s.pools.session_buddy_url) == "http://localhost:8678/mcp"
    assert s.rabbitmq.url.get_secret_value() == "amqp://guest:guest@localhost:5672/"
    assert s.rabbitmq.queue == "memory.items"
    assert s.rabbitmq.dead_letter_queue == "memory.items.dlq"
    assert s.sink.kind == "mcp"
    assert s.sink.tool == "store_reflection"
    assert s.retry.policy == RetryPolicy(1.0, 120.0, 600.0, 25)


def test_concurrency_field_declares_act008_bounds() -> None:
    """The concurrency field is declared with default 10 and bounds 1..50."""
    info = PoolsSettings.model_fields["max_concurrent_memory_insertions"]
    bounds = {type(m).__name__: m for m in info.metadata}
    assert info.default == 10
    assert bounds["Ge"].ge == 1
    assert bounds["Le"].le == 50


def test_committed_yaml_matches_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    """The committed settings/mahavishnu.yaml loads and agrees with the model's defaults."""
    use_files(monkeypatch, ROOT / "settings" / "mahavishnu.yaml")
    s = load_settings()
    monkeypatch.delenv(CONFIG_ENV)
    defaults = load_settings()
    assert s.concurrency == defaults.concurrency == 10
    assert s.pools.session_buddy_url == defaults.pools.session_buddy_url
    assert s.rabbitmq.model_dump() == defaults.rabbitmq.model_dump()
    assert s.rabbitmq.url.get_secret_value() == defaults.rabbitmq.url.get_secret_value()
    assert s.sink.model_dump() == defaults.sink.model_dump()
    assert s.retry == defaults.retry
    assert s.console == defaults.console


@pytest.mark.parametrize("value", [1, 10, 25, 50])
def test_concurrency_bounds_accepted(value: int) -> None:
    """Every concurrency from 1 to 50 is accepted."""
    assert (
        load_settings({"pools": {"max_concurrent_memory_insertions": value}}).concurrency == value
    )


@pytest.mark.parametrize(
    ("env", "value", "read", "expected"),
    [
        (CONCURRENCY_ENV, "20", lambda s: s.concurrency, 20),
        ("MAHAVISHNU_POOLS__SESSION_BUDDY_URL", "http://sb:9000/mcp",
         lambda s: str(s.pools.session_buddy_url), "http://sb:9000/mcp"),
        ("MAHAVISHNU_POOLS__ENABLED", "false", lambda s: s.pools.enabled, False),
        ("MAHAVISHNU_RABBITMQ__URL", "amqp://u:p@mq:5673/v",
         lambda s: s.rabbitmq.url.get_secret_value(), "amqp://u:p@mq:5673/v"),
        ("MAHAVISHNU_RABBITMQ__QUEUE", "other.items", lambda s: s.rabbitmq.queue, "other.items"),
        ("MAHAVISHNU_RABBITMQ__DEAD_LETTER_QUEUE", "other.dlq",
         lambda s: s.rabbitmq.dead_letter_queue, "other.dlq"),
        ("MAHAVISHNU_SINK__TIMEOUT_S", "2.5", lambda s: s.sink.timeout_s, 2.5),
        ("MAHAVISHNU_SINK__KIND", "http", lambda s: s.sink.kind, "http"),
        ("MAHAVISHNU_RETRY__MAX_ATTEMPTS", "3", lambda s: s.retry.policy.max_attempts, 3),
        ("MAHAVISHNU_WORKER__GRACE_S", "5", lambda s: s.worker.grace_s, 5.0),
    ],
)  # fmt: skip
def test_env_vars(
    monkeypatch: pytest.MonkeyPatch, env: str, value: str, read: Any, expected: object
) -> None:
    """A MAHAVISHNU_<SECTION>__<FIELD> env var sets that field."""
    monkeypatch.setenv(env, value)
    assert read(load_settings()) == expected


def test_yaml_local_overrides_default(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The later (local) file wins field by field; what it does not set comes from the first."""
    default = write(
        tmp_path / "default.yaml",
        "pools:\n  max_concurrent_memory_insertions: 5\n"
        "rabbitmq:\n  queue: from.default\n  dead_letter_queue: dlq.default\n",
    )
    local = write(
        tmp_path / "local.yaml",
        "pools:\n  max_concurrent_memory_insertions: 7\nrabbitmq:\n  queue: from.local\n",
    )
    use_files(monkeypatch, default, local)
    s = load_settings()
    assert s.concurrency == 7
    assert s.rabbitmq.queue == "from.local"
    assert s.rabbitmq.dead_letter_queue == "dlq.default"


def test_default_files_are_read_from_working_directory(tmp_path: Path) -> None:
    """Without MEMORY_WORKER_CONFIG, settings/mahavishnu.yaml then settings/local.yaml apply."""
    (tmp_path / "settings").mkdir()
    write(
        tmp_path / "settings" / "mahavishnu.yaml", "pools:\n  max_concurrent_memory_insertions: 4\n"
    )
    write(tmp_path / "settings" / "local.yaml", "rabbitmq:\n  queue: local.q\n")
    s = load_settings()
    assert s.concurrency == 4
    assert s.rabbitmq.queue == "local.q"


def test_pools_section_accepts_mahavishnu_keys(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A `pools` section shared with Mahavishnu may carry keys the worker does not know."""
    config = write(
        tmp_path / "m.yaml",
        "pools:\n  enabled: false\n  max_concurrent_memory_insertions: 12\n"
        "  default_pool_type: mahavishnu\n  routing_strategy: least_loaded\n  min_workers: 2\n",
    )
    use_files(monkeypatch, config)
    s = load_settings()
    assert s.pools.enabled is False
    assert s.concurrency == 12


LAYERS = ("default_yaml", "local_yaml", "env", "init")
LAYER_VALUE = {"default_yaml": 2, "local_yaml": 3, "env": 4, "init": 5}


@pytest.mark.parametrize(
    "present",
    [
        (),
        ("default_yaml",),
        ("default_yaml", "local_yaml"),
        ("default_yaml", "local_yaml", "env"),
        ("default_yaml", "local_yaml", "env", "init"),
        ("default_yaml", "env"),
        ("local_yaml", "init"),
        ("default_yaml", "init"),
        ("env", "init"),
        ("local_yaml",),
    ],
    ids=lambda p: "+".join(p) or "none",
)
def test_precedence(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, present: tuple[str, ...]
) -> None:
    """init/CLI beats env beats the local YAML beats the committed YAML beats the model default."""
    files = []
    for layer in ("default_yaml", "local_yaml"):
        value = LAYER_VALUE[layer] if layer in present else None
        body = f"pools:\n  max_concurrent_memory_insertions: {value}\n" if value else "pools: {}\n"
        files.append(write(tmp_path / f"{layer}.yaml", body))
    use_files(monkeypatch, *files)
    if "env" in present:
        monkeypatch.setenv(CONCURRENCY_ENV, str(LAYER_VALUE["env"]))
    overrides = (
        {"pools": {"max_concurrent_memory_insertions": LAYER_VALUE["init"]}}
        if "init" in present
        else None
    )
    winner = max((LAYERS.index(p), LAYER_VALUE[p]) for p in present)[1] if present else 10
    assert load_settings(overrides).concurrency == winner


def test_cli_flags_beat_env_and_yaml(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """CLI flags (--config files, then env, then flags) override everything below them."""
    config = write(
        tmp_path / "c.yaml",
        "pools:\n  max_concurrent_memory_insertions: 3\nrabbitmq:\n  queue: yaml.q\n"
        "  dead_letter_queue: yaml.dlq\n",
    )
    monkeypatch.setenv(CONCURRENCY_ENV, "4")
    monkeypatch.setenv("MAHAVISHNU_RABBITMQ__QUEUE", "env.q")
    args = build_parser().parse_args(
        ["run", "--config", str(config), "--concurrency", "9", "--timeout-s", "1.5"]
    )
    s = settings_from_args(args)
    assert s.concurrency == 9
    assert s.rabbitmq.queue == "env.q"
    assert s.rabbitmq.dead_letter_queue == "yaml.dlq"
    assert s.sink.timeout_s == 1.5
    assert CONFIG_ENV not in os.environ  # --config goes to load_settings, not the environment


@pytest.mark.parametrize(
    ("section", "key", "value", "field", "env"),
    [
        ("pools", "max_concurrent_memory_insertions", 0, CONCURRENCY, CONCURRENCY_ENV),
        ("pools", "max_concurrent_memory_insertions", 51, CONCURRENCY, CONCURRENCY_ENV),
        ("pools", "max_concurrent_memory_insertions", "many", CONCURRENCY, CONCURRENCY_ENV),
        ("pools", "max_concurrent_memory_insertions", -3, CONCURRENCY, CONCURRENCY_ENV),
        ("pools", "session_buddy_url", "not a url", "pools.session_buddy_url",
         "MAHAVISHNU_POOLS__SESSION_BUDDY_URL"),
        ("rabbitmq", "queue_type", "stream", "rabbitmq.queue_type",
         "MAHAVISHNU_RABBITMQ__QUEUE_TYPE"),
        ("rabbitmq", "url", "http://guest:guest@localhost/", "rabbitmq.url",
         "MAHAVISHNU_RABBITMQ__URL"),
        ("rabbitmq", "queue", "", "rabbitmq.queue", "MAHAVISHNU_RABBITMQ__QUEUE"),
        ("sink", "kind", "grpc", "sink.kind", "MAHAVISHNU_SINK__KIND"),
        ("sink", "timeout_s", 0, "sink.timeout_s", "MAHAVISHNU_SINK__TIMEOUT_S"),
        ("retry", "max_attempts", 0, "retry.max_attempts", "MAHAVISHNU_RETRY__MAX_ATTEMPTS"),
        ("worker", "grace_s", -1, "worker.grace_s", "MAHAVISHNU_WORKER__GRACE_S"),
    ],
)  # fmt: skip
@pytest.mark.parametrize("source", ["init", "env", "yaml"])
def test_invalid_value_names_field_and_env_var(
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    source: str,
    section: str,
    key: str,
    value: object,
    field: str,
    env: str,
) -> None:
    """An invalid value from any source raises SettingsError naming the field and its env var."""
    overrides = None
    if source == "init":
        overrides = {section: {key: value}}
    elif source == "env":
        monkeypatch.setenv(f"MAHAVISHNU_{section.upper()}__{key.upper()}", str(value))
    else:
        shown = f"'{value}'" if isinstance(value, str) else value
        use_files(monkeypatch, write(tmp_path / "bad.yaml", f"{section}:\n  {key}: {shown}\n"))
    with pytest.raises(SettingsError) as caught:
        load_settings(overrides)
    assert field in str(caught.value)
    assert env in str(caught.value)


def test_missing_config_file_is_a_settings_error(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A MEMORY_WORKER_CONFIG file that does not exist is a SettingsError naming it."""
    use_files(monkeypatch, tmp_path / "nowhere.yaml")
    with pytest.raises(SettingsError, match=r"nowhere\.yaml"):
        load_settings()


def test_config_argument_replaces_env_files(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """`load_settings(config=...)` reads its files instead of MEMORY_WORKER_CONFIG's, that once."""
    use_files(monkeypatch, write(tmp_path / "env.yaml", "pools:\n  adaptive_concurrency: false\n"))
    given = write(tmp_path / "given.yaml", "pools:\n  max_concurrent_memory_insertions: 7\n")
    s = load_settings(config=str(given))
    assert (s.concurrency, s.pools.adaptive_concurrency) == (7, True)
    s = load_settings()
    assert (s.concurrency, s.pools.adaptive_concurrency) == (10, False)
    with pytest.raises(SettingsError, match=r"absent\.yaml"):
        load_settings(config=f"{given}:{tmp_path / 'absent.yaml'}")


@pytest.mark.parametrize(
    "text",
    ["pools: [unclosed\n", "pools:\n  max_concurrent_memory_insertions: 3\n bad: indent\n"],
    ids=["unclosed-flow", "bad-indent"],
)
def test_malformed_yaml_is_a_settings_error(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, text: str
) -> None:
    """A YAML file that does not parse is a SettingsError, not a stray yaml exception."""
    use_files(monkeypatch, write(tmp_path / "broken.yaml", text))
    with pytest.raises(SettingsError):
        load_settings()


def test_password_not_in_repr(monkeypatch: pytest.MonkeyPatch) -> None:
    """Neither repr nor str of the settings shows the broker password or the sink token."""
    monkeypatch.setenv("MAHAVISHNU_RABBITMQ__URL", SECRET_URL)
    monkeypatch.setenv("MAHAVISHNU_SINK__TOKEN", "tok-" + PASSWORD)
    s = load_settings()
    assert s.rabbitmq.url.get_secret_value() == SECRET_URL
    for text in (repr(s), str(s), repr(s.rabbitmq), s.model_dump_json()):
        assert PASSWORD not in text


@pytest.mark.parametrize("source", ["init", "env", "yaml"])
def test_password_not_in_settings_error(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, source: str
) -> None:
    """A SettingsError for some other field never shows the broker password."""
    bad = {"pools": {"max_concurrent_memory_insertions": 0}, "rabbitmq": {"url": SECRET_URL}}
    overrides = None
    if source == "init":
        overrides = bad
    elif source == "env":
        monkeypatch.setenv("MAHAVISHNU_RABBITMQ__URL", SECRET_URL)
        monkeypatch.setenv(CONCURRENCY_ENV, "0")
    else:
        text = f"pools:\n  max_concurrent_memory_insertions: 0\nrabbitmq:\n  url: {SECRET_URL}\n"
        use_files(monkeypatch, write(tmp_path / "s.yaml", text))
    with pytest.raises(SettingsError) as caught:
        load_settings(overrides)
    assert CONCURRENCY in str(caught.value)
    assert PASSWORD not in str(caught.value)
    assert PASSWORD not in repr(caught.value)


@pytest.mark.parametrize(("value", "prefetch"), [(1, 2), (7, 8), (10, 12), (50, 62)])
def test_prefetch_is_the_concurrency_and_a_quarter(value: int, prefetch: int) -> None:
    """Prefetch is derived from the concurrency limit: a quarter more, at least one more."""
    s = load_settings({"pools": {"max_concurrent_memory_insertions": value}})
    assert s.concurrency == value and s.prefetch == prefetch


@pytest.fixture
def no_commands(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make any attempt to run a subcommand (and so to connect anywhere) fail the test."""

    def refuse(*args: object, **kwargs: object) -> int:
        raise AssertionError("the CLI tried to run a command despite invalid settings")

    for module, command in ((run, "cmd_run"), (check, "cmd_check"), (demo, "cmd_demo")):
        monkeypatch.setattr(module, command, refuse)
        monkeypatch.setattr(module, "run_async", refuse)


@pytest.mark.parametrize("value", ["0", "51", "-1"])
@pytest.mark.usefixtures("no_commands")
def test_cli_rejects_bad_concurrency(capsys: pytest.CaptureFixture[str], value: str) -> None:
    """`run --concurrency N` outside 1..50 exits 78 naming the field, without connecting."""
    assert main(["run", "--concurrency", value]) == EXIT_CONFIG == 78
    err = capsys.readouterr().err
    assert CONCURRENCY in err
    assert CONCURRENCY_ENV in err


@pytest.mark.usefixtures("no_commands")
def test_cli_rejects_bad_env_and_hides_password(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A bad env var also exits 78; the message names the field but not the broker password."""
    monkeypatch.setenv(CONCURRENCY_ENV, "51")
    code = main(["check", "--rabbitmq-url", SECRET_URL])
    captured = capsys.readouterr()
    assert code == EXIT_CONFIG
    assert CONCURRENCY in captured.err
    assert PASSWORD not in captured.err + captured.out


@pytest.mark.usefixtures("no_commands")
def test_cli_missing_config_file(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`--config` naming a missing file exits 78 and names the file."""
    code = main(["run", "--config", str(tmp_path / "absent.yaml")])
    assert code == EXIT_CONFIG
    assert "absent.yaml" in capsys.readouterr().err


@pytest.mark.usefixtures("no_commands")
def test_cli_malformed_yaml_exits_config(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A settings file that is not valid YAML exits 78 with a message, not a traceback."""
    broken = write(tmp_path / "broken.yaml", "pools: [unclosed\n")
    assert main(["run", "--config", str(broken)]) == EXIT_CONFIG
    assert "broken.yaml" in capsys.readouterr().err
