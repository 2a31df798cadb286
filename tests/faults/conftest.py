"""Fault tests reuse the integration fixtures: a real broker, per-test names, a connection."""

from tests.integration.conftest import (  # noqa: F401
    amqp_url,
    connection,
    ledger_prefix,
    make_settings,
    no_leftover_workers,
    redis_url,
)
