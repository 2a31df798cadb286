"""The settings sections memory-worker owns (and ACT-008's `pools`), one model each.

Each section but `pools` forbids unknown keys; `worker.provenance` turns those, and the
typos of `pools` keys, into errors that name the key, where it came from and what was meant.
"""

from __future__ import annotations

import os
import socket
from typing import Literal

from pydantic import AnyHttpUrl, BaseModel, ConfigDict, Field, SecretStr, field_validator

from worker.addresses import split_urls, url_problems
from worker.outcome import RetryPolicy

#: Pool, worker, what happened and what it said: a worker whose status changes is stored again.
BlankContent = Literal["summarize", "dead_letter", "skip"]
DEFAULT_KEY_FIELDS = ("pool_id", "worker_id", "status", "exit_code", "content")


class PoolsSettings(BaseModel):
    """ACT-008's `pools` section; shared with Mahavishnu, so unknown keys are ignored."""

    model_config = ConfigDict(extra="ignore")

    enabled: bool = True
    max_concurrent_memory_insertions: int = Field(
        default=10,
        ge=1,
        le=50,
        description="Maximum concurrent memory insertions to Session-Buddy (1-50)",
    )
    adaptive_concurrency: bool = Field(
        default=True,
        description="Move the limit within [1, max] by the sink's latency and overload; "
        "false = always the max",
    )
    session_buddy_url: AnyHttpUrl = AnyHttpUrl("http://localhost:8678/mcp")


class RabbitMQSettings(BaseModel):
    """Broker connection and the names of everything the worker declares."""

    model_config = ConfigDict(extra="forbid")

    url: SecretStr = SecretStr("amqp://guest:guest@localhost:5672/")
    exchange: str = Field(default="memory", min_length=1)
    queue: str = Field(default="memory.items", min_length=1)
    dead_letter_queue: str = Field(default="memory.items.dlq", min_length=1)
    queue_type: Literal["quorum", "classic"] = "quorum"
    delivery_limit: int = Field(default=20, ge=1, le=1000)
    declare: bool = True
    heartbeat_s: int = Field(default=30, ge=0, le=600)
    connect_timeout_s: float = Field(default=10.0, gt=0, le=300)
    startup_wait_s: float = Field(default=60.0, ge=0, le=86_400)
    consumer_timeout_s: float = Field(
        default=1800.0,
        gt=0,
        le=7 * 86_400,
        description="Asked for on the worker's consumer; else the broker's consumer_timeout",
    )
    #: 4.3+ quorum queues: the consumer-disconnected-timeout the preflight expects; null: none.
    consumer_disconnected_timeout_s: float | None = Field(default=15.0, ge=0, le=86_400)
    management_url: SecretStr | None = Field(
        default=None,
        description="RabbitMQ management API, e.g. http://user:pass@host:15672, to check policies",
    )

    @field_validator("url")
    @classmethod
    def _amqp_urls(cls, value: SecretStr) -> SecretStr:
        if problems := url_problems(split_urls(value.get_secret_value())):
            raise ValueError("; ".join(problems))
        return value

    @property
    def urls(self) -> tuple[str, ...]:
        """The broker addresses in `url`, in the order they are tried (secrets: never log them)."""
        return split_urls(self.url.get_secret_value())

    @field_validator("management_url")
    @classmethod
    def _http_scheme(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and not value.get_secret_value().startswith(("http://", "https://")):
            raise ValueError("must start with http:// or https://")
        return value

    @property
    def dead_letter_exchange(self) -> str:
        """Exchange that routes dead letters, ours and the broker's, to the DLQ."""
        return f"{self.exchange}.dlx"

    @property
    def retry_exchange(self) -> str:
        """Exchange that routes a retry to the wait queue of its delay tier."""
        return f"{self.exchange}.retry"


class SinkSettings(BaseModel):
    """Where items are stored and how an item maps onto the store call."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["mcp", "http"] = "mcp"
    token: SecretStr | None = None
    tool: str = Field(default="store_reflection", min_length=1)
    timeout_s: float = Field(default=30.0, gt=0, le=3600, description="Per-item timeout")
    connect_timeout_s: float = Field(default=5.0, gt=0, le=120)
    max_content_chars: int = Field(default=10_000, ge=1)
    oversize: Literal["dead_letter", "split"] = Field(
        default="split",
        description="Content over max_content_chars: stored as linked parts, or dead-lettered",
    )
    blank_content: BlankContent = Field(
        default="summarize",
        description="Blank content: a text generated from the metadata, a dead letter, or "
        "acked unstored (counted as skipped)",
    )
    tag_fields: list[str] = Field(
        default_factory=lambda: ["type", "pool_id", "pool_type", "worker_id", "status", "exit_code"]
    )
    static_tags: list[str] = Field(default_factory=list)
    project_field: str | None = "pool_id"
    project: str | None = None
    breaker_failures: int = Field(
        default=5,
        ge=0,
        le=10_000,
        description="Consecutive failures that open the breaker; 0 = off",
    )
    breaker_open_s: float = Field(default=5.0, gt=0, le=3600)
    breaker_max_open_s: float = Field(default=60.0, gt=0, le=86_400)
    retry_after_max_s: float = Field(
        default=60.0,
        ge=0,
        le=3600,
        description="Longest pause of all stores that a Retry-After from the sink can ask for",
    )

    @field_validator("token")
    @classmethod
    def _header_safe(cls, value: SecretStr | None) -> SecretStr | None:
        # It goes into an HTTP header: Latin-1, no line breaks, or every store would fail.
        if value is not None:
            text = value.get_secret_value()
            if any(c in text for c in "\r\n") or not text.isprintable():
                raise ValueError("must be printable, without line breaks")
            try:
                text.encode("latin-1")
            except UnicodeEncodeError:
                raise ValueError("must be Latin-1 (it is sent in an HTTP header)") from None
        return value


class RetrySettings(BaseModel):
    """Backoff for transient failures; waits happen in broker-side delay queues."""

    model_config = ConfigDict(extra="forbid")

    base_s: float = Field(default=1.0, gt=0, le=3600)
    cap_s: float = Field(default=120.0, gt=0, le=86_400)
    budget_s: float = Field(default=600.0, ge=0, le=7 * 86_400)
    max_attempts: int = Field(default=25, ge=1, le=1000)
    tiers_s: list[float] = Field(
        default_factory=lambda: [1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0]
    )

    @field_validator("tiers_s")
    @classmethod
    def _sorted_positive(cls, value: list[float]) -> list[float]:
        if not value or any(t <= 0 for t in value):
            raise ValueError("needs at least one delay, all > 0")
        return sorted(set(value))

    @property
    def policy(self) -> RetryPolicy:
        """The pure retry policy used by `classify`."""
        return RetryPolicy(self.base_s, self.cap_s, self.budget_s, self.max_attempts)


class WorkerSettings(BaseModel):
    """Process-level behaviour: identity, shutdown, ops port, logs, input limits."""

    model_config = ConfigDict(extra="forbid")

    id: str = Field(default_factory=lambda: f"{socket.gethostname()}-{os.getpid()}")
    grace_s: float = Field(default=25.0, ge=0, le=3600)
    ops_host: str = "127.0.0.1"
    ops_port: int = Field(default=9464, ge=-1, le=65535)
    log_format: Literal["auto", "json", "console"] = "auto"
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    max_body_bytes: int = Field(default=1_048_576, ge=1024, le=128 * 1024 * 1024)
    max_json_depth: int = Field(default=32, ge=2, le=1000)
    dedupe_cache_size: int = Field(default=100_000, ge=0)
    key_fields: list[str] = Field(
        default_factory=lambda: list(DEFAULT_KEY_FIELDS),
        min_length=1,
        description="What the idempotency key of an item without a message id is made of: "
        "`content` and metadata keys (never the collection time)",
    )
    key_source: Literal["message_id", "fields"] = Field(
        default="message_id",
        description="The key: the message id when there is one, else key_fields; or always "
        "key_fields (producers whose client sets a random message id: aio-pika, oneiric)",
    )


class LedgerSettings(BaseModel):
    """The optional shared idempotency ledger in Redis; off while `url` is unset."""

    model_config = ConfigDict(extra="forbid")

    url: SecretStr | None = Field(
        default=None,
        description="Redis, e.g. redis://:password@host:6379/0; unset = no shared ledger",
    )
    key_prefix: str = Field(default="mw:", min_length=1, max_length=200)
    ttl_s: float = Field(
        default=86_400.0,
        gt=0,
        le=90 * 86_400,
        description="How long a stored key is remembered",
    )
    claim_margin_s: float = Field(
        default=10.0,
        gt=0,
        le=3600,
        description="A claim lasts sink.timeout_s plus this, so a killed worker's claim expires",
    )
    timeout_s: float = Field(
        default=0.25,
        gt=0,
        le=10,
        description="Per Redis call; past it the item is stored without the ledger",
    )

    @field_validator("url")
    @classmethod
    def _redis_scheme(cls, value: SecretStr | None) -> SecretStr | None:
        schemes = ("redis://", "rediss://", "unix://")
        if value is not None and not value.get_secret_value().startswith(schemes):
            raise ValueError("must start with redis://, rediss:// or unix://")
        return value


class ConsoleSettings(BaseModel):
    """`memory-worker console`: where it listens, its token, the workers it watches."""

    model_config = ConfigDict(extra="forbid")

    host: str = Field(default="127.0.0.1", min_length=1)
    port: int = Field(default=9470, ge=0, le=65535)
    token: SecretStr | None = Field(
        default=None,
        description="Bearer token (or login) for the console and the ops port's POSTs; "
        "required to bind another address than loopback",
    )
    workers: list[AnyHttpUrl] = Field(
        default_factory=list,
        description="Ops URLs of workers (http://host:9464) where no management API lists them",
    )
    replay_rate_per_s: float = Field(default=50.0, gt=0, le=10_000)
