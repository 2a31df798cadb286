"""The broker's management API, read once at start: the work queue as the broker applies it.

An aid, not a dependency: unreachable or failing, it is only warned about; credentials it
refuses stop the worker, since they are the settings' fault.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any
from urllib.parse import quote

import httpx
import structlog

from worker.addresses import vhost
from worker.broker import masked
from worker.queue_compare import Expected, findings, with_live_policies
from worker.topology import Topology, TopologyError

#: One read of the management API at start: a slow API delays the start at most this long.
MANAGEMENT_TIMEOUT_S = 10.0
#: Where the policy lists cannot be read, the queue's own view is used: on 4.x a quorum queue
#: declared just before the start shows its policy and `delivery_limit` only after the
#: management plugin's next statistics pass (4.7 s after a declare on 4.3.6), so it is read
#: again until `delivery_limit` shows, at most this long.
STATS_WAIT_S = 6.0
STATS_POLL_S = 0.25

log = structlog.get_logger("worker.management")
Auth = httpx.Auth | None


def api_url(management_url: str, *parts: str) -> tuple[httpx.URL, httpx.BasicAuth | None]:
    """`<management>/api/<parts>`, each part percent-encoded, without the URL's credentials;
    they come back as basic auth (a URL with them would carry them into logs and redirects)."""
    base = httpx.URL(management_url)
    auth = httpx.BasicAuth(base.username, base.password) if base.username else None
    quoted = "/".join(quote(part, safe="") for part in parts)
    path = f"{base.path.rstrip('/')}/api/{quoted}"
    return base.copy_with(username=None, password=None, path=path), auth


def management_queue_url(
    management_url: str, amqp_url: str, queue: str
) -> tuple[httpx.URL, httpx.BasicAuth | None]:
    """`<management>/api/queues/<vhost>/<queue>` for the vhost of the AMQP URL, and its auth."""
    return api_url(management_url, "queues", vhost(amqp_url), queue)


def _stats_pending(body: Any, expected: Expected) -> bool:
    """Whether a 4.x quorum queue's `delivery_limit` has not been filled in yet."""
    version = expected.version
    return (
        isinstance(body, dict)
        and body.get("type") == "quorum"
        and version is not None
        and version >= (4,)
        and "delivery_limit" not in body
    )


async def _policies(client: httpx.AsyncClient, urls: list[httpx.URL], auth: Auth) -> Any:
    """The vhost's policies and operator policies, or None when either cannot be read."""
    lists = []
    for url in urls:
        response = await client.get(url, auth=auth)
        try:
            body = response.json() if response.status_code == 200 else None
        except ValueError:  # not JSON: a proxy's page, say
            body = None
        if not isinstance(body, list):
            return None
        lists.append(body)
    return lists


async def _queue(
    client: httpx.AsyncClient,
    url: httpx.URL,
    auth: Auth,
    policies: list[httpx.URL],
    expected: Expected,
) -> httpx.Response | dict[str, Any]:
    """The queue with its policies resolved live; else as the API shows it once its
    statistics are in (read again within `STATS_WAIT_S`); a failed response as it came."""
    deadline = time.monotonic() + STATS_WAIT_S
    response = await client.get(url, auth=auth)
    if response.status_code != 200:
        return response
    if (lists := await _policies(client, policies, auth)) is not None:
        return with_live_policies(response.json(), *lists)
    while _stats_pending(response.json(), expected) and time.monotonic() < deadline:
        await asyncio.sleep(STATS_POLL_S)
        response = await client.get(url, auth=auth)
        if response.status_code != 200:
            return response
    return dict(response.json())


async def check_queue_policies(
    management_url: str,
    amqp_url: str,
    topology: Topology,
    transport: httpx.AsyncBaseTransport | None = None,
    expected: Expected | None = None,
) -> list[str]:
    """Read the work queue; raise `TopologyError` on a problem, return the warnings."""
    expected = expected or Expected()
    bare, auth = management_queue_url(management_url, amqp_url, topology.queue)
    policies = [
        api_url(management_url, kind, vhost(amqp_url))[0]
        for kind in ("policies", "operator-policies")
    ]
    shown = masked(management_url)
    try:
        async with httpx.AsyncClient(transport=transport, timeout=MANAGEMENT_TIMEOUT_S) as client:
            found = await _queue(client, bare, auth, policies, expected)
    except httpx.HTTPError as exc:
        log.warning("management_api_unreachable", url=shown, error=repr(exc))
        return []
    if isinstance(found, httpx.Response):
        if found.status_code in (401, 403):
            raise TopologyError(
                f"the management API at {shown} refused rabbitmq.management_url's credentials "
                f"(HTTP {found.status_code}); the user needs the monitoring tag"
            )
        log.warning("management_api_failed", url=shown, status=found.status_code)
        return []
    problems, warnings = findings(found, topology, expected)
    if problems:
        raise TopologyError(
            "the broker's queue disagrees with the settings:\n  " + "\n  ".join(problems)
        )
    return warnings
