"""Where each setting came from, and keys that nothing reads: a typo stops the worker, named.

memory-worker shares the `MAHAVISHNU_` prefix and the `pools` section with Mahavishnu, whose
settings have many sections of their own, so an unknown key is not always a mistake:

- a key of Mahavishnu 0.36.0 (its top-level sections, its `PoolConfig` fields) passes silently;
- a key close to one of ours (`max_concurent_…`, `MAHAVISHNU_RABBITMQ_URL` for
  `MAHAVISHNU_RABBITMQ__URL`) is an error with the name it most likely meant;
- anything else is one warning line, since it may belong to a newer Mahavishnu.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel

ENV_PREFIX = "MAHAVISHNU_"
#: The worker's own prefix: Mahavishnu never reads it, so it cannot break Mahavishnu. It wins.
OWN_PREFIX = "MEMORY_WORKER_"
#: `MEMORY_WORKER_*` variables that are not settings: the settings file list, the tests' broker.
OWN_NOT_SETTINGS = ("CONFIG", "TEST_")
CLOSE = 0.85  # difflib ratio: one or two characters off in a name of ten or more

MAHAVISHNU_TOP = frozenset(
    [
        "server_name",
        "debug",
        "log_level",
        "eventbridge",
        "repos_path",
        "allowed_repo_paths",
        "max_concurrent_workflows",
        "pool_workers_per_instance",
        "retry_max_attempts",
        "auth_enabled",
        "shell_enabled",
        "jot",
        "cross_project_auth_secret",
        "terminal",
        "openhands",
        "a2a",
        "prefect",
        "pools",
        "pi_pool",
        "changepoint",
        "otel_storage",
        "otel_ingester",
        "worktree_storage",
        "worktree_cache",
        "idempotency",
        "webhook_intake",
        "concurrency_limits",
        "markdown_board",
        "opensearch",
        "dlq",
        "auth",
        "subscription_auth",
        "session_buddy_polling",
        "qc",
        "session",
        "resilience",
        "observability",
        "monitoring",
        "workers",
        "worker_registry",
        "adapters",
        "llm",
        "agno",
        "hatchet",
        "oneiric_mcp",
        "adapter_registry",
        "goal_teams",
        "bifrost",
        "engines",
        "health",
        "integrations",
        "mcp_state",
        "unified_validation_enabled",
        "learning",
        "capability_enabled",
        "capability_scopes",
        "merge_driver_default",
        "merge_driver_required",
        "overlay",
    ]
)
MAHAVISHNU_POOLS = frozenset(
    [
        "enabled",
        "default_type",
        "routing_strategy",
        "min_workers",
        "max_workers",
        "memory_aggregation_enabled",
        "memory_sync_interval",
        "queueing_enabled",
        "queueing_warmup_min_observations",
        "queueing_warmup_min_seconds",
        "session_buddy_url",
        "akosha_url",
        "auto_spawn",
        "auto_spawn_type",
        "auto_spawn_min_workers",
        "auto_spawn_max_workers",
    ]
)

#: Mahavishnu 0.36.0's own variables that are no settings field (pools/memory_aggregator.py):
#: docs/mahavishnu.md names them for its outbox, so the same environment may well hold them.
MAHAVISHNU_ENV_ONLY = frozenset(["OUTBOX_ENABLED", "OUTBOX_DRAIN"])


@dataclass
class Sources:
    """The winning source of every setting given, and what was wrong with the names."""

    origin: dict[tuple[str, ...], str] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def of(self, loc: Iterable[object]) -> str | None:
        """Where the value at `loc` (or its nearest parent given) came from."""
        path = tuple(str(p) for p in loc)
        while path:
            if path in self.origin:
                return self.origin[path]
            path = path[:-1]
        return None


def _fields(model: type[BaseModel]) -> dict[str, type[BaseModel] | None]:
    """Field names of a settings model, with the model of each nested section."""
    out: dict[str, type[BaseModel] | None] = {}
    for name, info in model.model_fields.items():
        kind = info.annotation
        out[name] = kind if isinstance(kind, type) and issubclass(kind, BaseModel) else None
    return out


def _close(name: str, candidates: Iterable[str]) -> str | None:
    found = difflib.get_close_matches(name, list(candidates), n=1, cutoff=CLOSE)
    return found[0] if found else None


def _check_key(
    sources: Sources, section: str | None, key: str, known: Iterable[str], where: str
) -> bool:
    """Whether `key` is ours; records an error or a warning when it is not."""
    known = list(known)
    if key in known:
        return True
    shared = MAHAVISHNU_POOLS if section == "pools" else MAHAVISHNU_TOP if section is None else ()
    dotted = f"{section}.{key}" if section else key
    if key in shared:
        return False
    if (guess := _close(key, known)) is not None:
        meant = f"{section}.{guess}" if section else guess
        sources.errors.append(f"{dotted} ({where}): unknown setting; did you mean {meant}?")
    elif section is not None and section != "pools":
        sources.errors.append(f"{dotted} ({where}): unknown setting of {section}")
    else:
        sources.warnings.append(f"{dotted} ({where}): not a memory-worker setting; ignored")
    return False


def scan_mapping(
    sources: Sources, model: type[BaseModel], data: Mapping[str, Any], where: str
) -> None:
    """Record the origin of every key in a settings mapping (a YAML file, overrides)."""
    sections = _fields(model)
    for top, value in data.items():
        if not _check_key(sources, None, str(top), sections, where):
            continue
        sources.origin[(str(top),)] = where
        section_model = sections[str(top)]
        if section_model is None or not isinstance(value, Mapping):
            continue
        for key in value:
            if _check_key(sources, str(top), str(key), _fields(section_model), where):
                sources.origin[(str(top), str(key))] = where


def scan_env(sources: Sources, model: type[BaseModel], environ: Mapping[str, str]) -> None:
    """Record the origin of every `MAHAVISHNU_*` and `MEMORY_WORKER_*` variable; judge names.

    `MEMORY_WORKER_*` is scanned last, so where both give a setting its origin is the one that
    wins. Mahavishnu's own keys pass silently only under its prefix: under ours nothing reads them.
    """
    sections = _fields(model)
    ours = {
        f"{s}__{k}".upper(): (s, k)
        for s, m in sections.items()
        if m is not None
        for k in _fields(m)
    }
    for prefix in (ENV_PREFIX, OWN_PREFIX):
        for var in environ:
            if var.upper().startswith(prefix):
                _scan_var(sources, sections, ours, var, prefix)


def _scan_var(
    sources: Sources,
    sections: Mapping[str, type[BaseModel] | None],
    ours: Mapping[str, tuple[str, str]],
    var: str,
    prefix: str,
) -> None:
    """Record one variable's origin, or an error or warning about its name."""
    rest = var[len(prefix) :].upper()
    where = f"env {var}"
    if rest in ours:
        sources.origin[ours[rest]] = where
        return
    mahavishnu = prefix == ENV_PREFIX
    if not mahavishnu and rest.startswith(OWN_NOT_SETTINGS):
        return
    section, _, key = rest.lower().partition("__")
    section_model = sections.get(section)
    if key and section_model is not None and (section != "pools" or not mahavishnu):
        if section == "pools" and key in MAHAVISHNU_POOLS:
            read_as = f"Mahavishnu reads it as {ENV_PREFIX}{rest}"
            sources.warnings.append(f"{var} (env): a Mahavishnu setting; ignored ({read_as})")
            return
        model_fields = _fields(section_model)
        _check_key(sources, section, key.partition("__")[0], model_fields, where)
        return
    if mahavishnu and (
        (section == "pools" and key in MAHAVISHNU_POOLS) or rest in MAHAVISHNU_ENV_ONLY
    ):
        return
    if mahavishnu and section in MAHAVISHNU_TOP and section != "pools":
        return
    if (guess := _close(rest, ours)) is not None:
        sources.errors.append(f"{var} (env): unknown setting; did you mean {prefix}{guess}?")
    else:
        sources.warnings.append(f"{var} (env): not a memory-worker setting; ignored")


def describe(errors: Iterable[Mapping[str, Any]], sources: Sources, secret: set[str]) -> str:
    """One line per invalid value: its field, where it came from, the value (secrets masked)."""
    lines = []
    for err in errors:
        loc = tuple(str(p) for p in err["loc"])
        dotted = ".".join(loc)
        suffix = "__".join(p.upper() for p in loc)
        env = ENV_PREFIX + suffix
        origin = sources.of(loc)
        from_env = origin in (f"env {env}", f"env {OWN_PREFIX}{suffix}")
        where = origin if from_env else f"{origin or 'default'}; env {env}"
        shown = ""
        if "input" in err and loc in sources.origin:
            value = "****" if dotted in secret else repr(err["input"])
            shown = f" = {value[:80]}"
        lines.append(f"{dotted}{shown} ({where}): {err['msg']}")
    return "invalid settings:\n  " + "\n  ".join(lines)
