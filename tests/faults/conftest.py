"""Fault tests reuse the integration fixtures: a real broker, per-test names, a connection."""

from tests.integration.conftest import amqp_url, connection, make_settings  # noqa: F401
