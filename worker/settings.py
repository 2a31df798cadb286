"""Settings: committed YAML, local YAML, `MAHAVISHNU_*`, `MEMORY_WORKER_*` env vars, CLI flags.

Later sources win. Every derived value (prefetch, HTTP pool size, retry policy) is computed
here, in one place, so the consumer and the sink can never disagree about them.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from contextvars import ContextVar
from pathlib import Path
from typing import Any

import yaml
from pydantic import (
    Field,
    PrivateAttr,
)
from pydantic import ValidationError as PydanticValidationError
from pydantic_settings import (
    BaseSettings,
    EnvSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    YamlConfigSettingsSource,
)

from worker.provenance import OWN_PREFIX, Sources, describe, scan_env, scan_mapping
from worker.sections import (
    ConsoleSettings,
    LedgerSettings,
    PoolsSettings,
    RabbitMQSettings,
    RetrySettings,
    SinkSettings,
    WorkerSettings,
)

DEFAULT_FILES = (Path("settings/mahavishnu.yaml"), Path("settings/local.yaml"))
CONFIG_ENV = "MEMORY_WORKER_CONFIG"
# load_settings' `config`, for the Settings it builds: pydantic-settings asks the class for sources.
_config: ContextVar[str | None] = ContextVar("_config", default=None)


class Settings(BaseSettings):
    """All of memory-worker's settings."""

    model_config = SettingsConfigDict(
        env_prefix="MAHAVISHNU_",
        env_nested_delimiter="__",
        extra="ignore",
        validate_default=True,
    )

    pools: PoolsSettings = Field(default_factory=PoolsSettings)
    rabbitmq: RabbitMQSettings = Field(default_factory=RabbitMQSettings)
    sink: SinkSettings = Field(default_factory=SinkSettings)
    retry: RetrySettings = Field(default_factory=RetrySettings)
    worker: WorkerSettings = Field(default_factory=WorkerSettings)
    ledger: LedgerSettings = Field(default_factory=LedgerSettings)
    console: ConsoleSettings = Field(default_factory=ConsoleSettings)
    _files: tuple[str, ...] = PrivateAttr(default=())

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        files = _config_files()
        yaml_sources = [
            YamlConfigSettingsSource(settings_cls, yaml_file=f) for f in reversed(files)
        ]
        # The worker's own prefix comes before MAHAVISHNU_, so it wins: Mahavishnu never reads
        # it, and a key its PoolConfig forbids would stop Mahavishnu (see the README).
        own_env = EnvSettingsSource(
            settings_cls, env_prefix=OWN_PREFIX, env_nested_delimiter="__", case_sensitive=False
        )
        return (init_settings, own_env, env_settings, *yaml_sources)

    @property
    def files(self) -> tuple[str, ...]:
        """The settings files this was loaded from, in the order they apply."""
        return self._files

    @property
    def concurrency(self) -> int:
        """The concurrency limit: ACT-008's `max_concurrent_memory_insertions`."""
        return self.pools.max_concurrent_memory_insertions

    @property
    def prefetch(self) -> int:
        """The concurrency limit and a quarter more (at least one): the prefetch when closed.

        It stays there whatever the adaptive limit is (only the breaker pauses consuming or
        probes with 1): a lower limit is enforced by the dispatcher's slots, since changing the
        prefetch would re-subscribe the consumer.

        Every delivered message can start at once, and when a slot frees the next message is
        already here: with prefetch = the limit each slot waits an ack-and-deliver round trip
        to the broker per item (measured at 50 ms, c = 10 and 50: efficiency 0.94 -> 0.96).
        Messages not started yet are never in flight to the sink, so a crash redelivers them
        without a duplicate.
        """
        return self.concurrency + max(1, self.concurrency // 4)


SECRETS = {
    "rabbitmq.url",
    "rabbitmq.management_url",
    "sink.token",
    "ledger.url",
    "console.token",
}


def _config_files() -> list[Path]:
    if explicit := _config.get() or os.environ.get(CONFIG_ENV):
        return [Path(p) for p in explicit.split(os.pathsep) if p]
    return [p for p in DEFAULT_FILES if p.exists()]


class SettingsError(Exception):
    """Invalid settings; the message names every offending field and where its value came from."""


def _stderr(line: str) -> None:
    print(f"memory-worker: warning: {line}", file=sys.stderr)


def load_settings(
    overrides: dict[str, Any] | None = None,
    config: str | None = None,
    warn: Callable[[str], None] = _stderr,
) -> Settings:
    """Load every source (`config`: files, as MEMORY_WORKER_CONFIG); raises `SettingsError`."""
    token = _config.set(config)
    sources = Sources()
    try:
        files = _config_files()
        for path in files:
            if not path.is_file():
                raise SettingsError(f"settings file {path}: not found")
            try:
                data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
            except yaml.YAMLError as exc:
                raise SettingsError(f"settings file {path}: not valid YAML: {exc}") from None
            if not isinstance(data, dict):
                raise SettingsError(f"settings file {path}: not a mapping of sections")
            scan_mapping(sources, Settings, data, str(path))
        scan_env(sources, Settings, os.environ)
        scan_mapping(sources, Settings, overrides or {}, "command line")
        if sources.errors:
            raise SettingsError("invalid settings:\n  " + "\n  ".join(sources.errors))
        for line in sources.warnings:
            warn(line)
        settings = Settings(**(overrides or {}))
        settings._files = tuple(str(p) for p in files)
        return settings
    except PydanticValidationError as exc:
        errors = exc.errors(include_url=False)
        raise SettingsError(describe(errors, sources, SECRETS)) from None
    except (OSError, ValueError, yaml.YAMLError) as exc:  # unreadable or malformed YAML
        raise SettingsError(f"settings files: {exc}") from None
    finally:
        _config.reset(token)
