"""Who may change things over HTTP: the console's and the ops port's guard, in one place.

A browser says where a request comes from in `Sec-Fetch-Site`, and a page on another site
cannot forge it: a changing request that says anything but `same-origin` is refused, whatever
cookie it carries. A request without the header (curl, a script) is no browser's, so it must
bring the token as `Authorization: Bearer`. Reading needs the token too where one is set, as
a bearer token or the cookie the login form sets.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Mapping

from pydantic import SecretStr

COOKIE = "memory_worker_console"
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


def _secret(token: SecretStr | None) -> str | None:
    return None if token is None else token.get_secret_value()


def bearer_ok(headers: Mapping[str, str], token: SecretStr | None) -> bool:
    """Whether the request carries the token as `Authorization: Bearer <token>`."""
    secret = _secret(token)
    scheme, _, given = headers.get("Authorization", "").partition(" ")
    if secret is None or scheme.lower() != "bearer":
        return False
    return hmac.compare_digest(given.strip().encode(), secret.encode())


def cookie_value(token: SecretStr) -> str:
    """What the login cookie holds: a digest of the token, never the token itself."""
    secret = token.get_secret_value().encode()
    return hmac.new(secret, b"memory-worker console login", hashlib.sha256).hexdigest()


def cookie_ok(cookies: Mapping[str, str], token: SecretStr | None) -> bool:
    """Whether the request carries the login cookie for this token."""
    given = cookies.get(COOKIE)
    if token is None or given is None:
        return False
    return hmac.compare_digest(given.encode(), cookie_value(token).encode())


def may_read(
    headers: Mapping[str, str], cookies: Mapping[str, str], token: SecretStr | None
) -> bool:
    """Whether a request may see anything: always without a token, else with it."""
    return token is None or bearer_ok(headers, token) or cookie_ok(cookies, token)


def change_refusal(method: str, headers: Mapping[str, str], token: SecretStr | None) -> str | None:
    """Why a request that changes something is refused, or None when it may go on."""
    if method.upper() in SAFE_METHODS:
        return None
    site = headers.get("Sec-Fetch-Site")
    if site is not None and site != "same-origin":
        return f"a {site} request may not change anything"
    if site is None and not bearer_ok(headers, token):
        return "a request from outside a browser needs the console token as a bearer token"
    return None
