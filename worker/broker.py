"""One way onto the broker: a named connection, the error when none opens, URLs safe to print."""

from __future__ import annotations

from urllib.parse import urlsplit, urlunsplit

#: How long a publish waits for the broker's confirm (a retry, a dead letter, a replay, an
#: item); the preflight counts it into the consumer_timeout budget, so both read this one.
CONFIRM_TIMEOUT_S = 30.0


def masked(url: str) -> str:
    """`url` safe to log or print: its password, in the userinfo or a query, replaced by `***`."""
    original = parts = urlsplit(url)
    userinfo, at, host = parts.netloc.rpartition("@")
    if at and ":" in userinfo:
        parts = parts._replace(netloc=f"{userinfo.partition(':')[0]}:***@{host}")
    if "password=" in parts.query:  # redis-py also takes `?password=`
        fields = (field.partition("=") for field in parts.query.split("&"))
        query = "&".join(k + sep + ("***" if k == "password" else v) for k, sep, v in fields)
        parts = parts._replace(query=query)
    return url if parts == original else urlunsplit(parts)
