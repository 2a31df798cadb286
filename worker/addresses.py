"""Broker addresses: the nodes listed in `rabbitmq.url`, split and checked one by one."""

from __future__ import annotations

import errno
import socket
from urllib.parse import unquote, urlsplit


def split_urls(text: str) -> tuple[str, ...]:
    """The addresses in a comma-separated `rabbitmq.url` (a cluster's nodes), blanks trimmed."""
    return tuple(part.strip() for part in text.split(","))


def url_problems(urls: tuple[str, ...]) -> list[str]:
    """What is wrong with a list of broker addresses, each named by its position and host."""

    def named(n: int, url: str, problem: str) -> str:
        return f"address {n} of {len(urls)}{_where(url)} {problem}" if len(urls) > 1 else problem

    problems = [
        named(n, url, problem)
        for n, url in enumerate(urls, start=1)
        if (problem := _amqp_problem(url))
    ]
    if problems:
        return problems
    # The worker's queues live in one vhost, which every node of a cluster serves.
    vhosts = [vhost(url) for url in urls]
    return [
        named(n, url, f"names vhost {vhost!r}, address 1 {vhosts[0]!r}: one cluster, one vhost")
        for n, (url, vhost) in enumerate(zip(urls, vhosts, strict=True), start=1)
        if vhost != vhosts[0]
    ]


def _amqp_problem(url: str) -> str | None:
    """What is wrong with one broker address, or None."""
    if not url:
        return "is empty (a comma too many?)"
    if not url.startswith(("amqp://", "amqps://")):
        return "must start with amqp:// or amqps://"
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - parsing the port is the check
    except ValueError:
        return "has an invalid host or port (a comma in a password must be written %2C)"
    if not parts.hostname:
        return "names no host"
    return None


def vhost(url: str) -> str:
    """The vhost an AMQP address names ("/" when it names none)."""
    path = urlsplit(url).path
    return unquote(path[1:]) if len(path) > 1 else "/"


def _where(url: str) -> str:
    """` (host:port)` of an address, for an error message: never its credentials."""
    try:
        parts = urlsplit(url)
        host, port = parts.hostname, parts.port
    except ValueError:
        return ""
    return f" ({host}{f':{port}' if port else ''})" if host else ""


def unreachable(error: BaseException) -> str:
    """Why an address did not answer, in words: not aiormq's `<AMQPConnectionError: (111, ...)>`."""
    code = error.errno if isinstance(error, OSError) else None
    if code is None and len(error.args) == 2 and isinstance(error.args[0], int):
        code = error.args[0]  # aiormq's AMQPConnectionError(errno, text)
    if code == errno.ECONNREFUSED:
        return "connection refused"
    if code in (socket.EAI_NONAME, socket.EAI_AGAIN):
        return "host not found"
    if isinstance(error, TimeoutError):
        return "no answer in time"
    text = error.args[1] if code is not None and len(error.args) == 2 else str(error)
    return str(text) or type(error).__name__
