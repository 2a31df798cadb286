"""Loopback ports for servers a test or a load test starts."""

from __future__ import annotations

import socket


def free_port() -> int:
    """A TCP port on loopback that nothing listened on a moment ago (bound, then let go)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])
