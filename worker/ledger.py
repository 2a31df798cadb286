"""The optional shared idempotency ledger: Redis keys that make a redelivery harmless anywhere.

Each idempotency key has one Redis key, `<key_prefix><key>`:

- before a store the worker claims it with `SET … <token>:pending NX PX <claim TTL>`. Free: the
  claim is ours, store. `stored`: a duplicate, ack without storing. Any other value: another
  store of the same item is in flight, so this delivery waits (a retry that uses no attempt).
  The claim outlives the per-item timeout by a margin, so a killed worker's claim expires.
- after a confirmed store, `SET … stored PX <ttl>`; after a failed one the claim is deleted,
  only if it is still ours (our token), so a failure never frees someone else's claim.

The ledger can only remove duplicates, never an item: it says "skip" only for `stored`. When
Redis is unreachable, slow or odd, the item is stored as if there were no ledger
(at-least-once, duplicates possible) and Redis is asked again after `RECHECK_S`; one log line
per change of state. A single Redis (not Cluster): a split item's keys go in one script.
In front of it, `RecentKeys` remembers what this process stored, so its own redeliveries are
caught without asking Redis (and without a ledger at all).
"""

from __future__ import annotations

import asyncio
import enum
import secrets
from collections import OrderedDict
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from types import TracebackType
from typing import Protocol, Self

import structlog
from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from worker.broker import masked
from worker.metrics import Metrics
from worker.settings import Settings

log = structlog.get_logger("worker.ledger")
STORED = "stored"
RECHECK_S = 2.0  # while Redis fails, items skip it this long instead of each waiting a timeout
ERRORS = (RedisError, OSError, TimeoutError)

# KEYS[1] the item, KEYS[2..] its parts; ARGV[1] our pending value, ARGV[2] the claim TTL (ms).
# Claimed: the parts' values (a list). Not claimed: the value standing in the way (a string).
CLAIM = """
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then
  if #KEYS == 1 then return {} end
  return redis.call('MGET', unpack(KEYS, 2))
end
return redis.call('GET', KEYS[1])
"""
# Deletes the claim only while it holds our token: an expired claim may be someone else's now.
RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


def client(url: str, timeout_s: float) -> Redis:
    """A Redis client whose every call costs at most `timeout_s`."""
    # No client-side retries: a slow or absent Redis must cost one short timeout, no more.
    return Redis.from_url(
        url,
        decode_responses=True,
        socket_timeout=timeout_s,
        socket_connect_timeout=timeout_s,
        retry=Retry(NoBackoff(), 0),
    )


class Status(enum.Enum):
    """What the ledger says about an idempotency key."""

    MINE = "mine"  # claimed by this store: store it, then mark it stored or release it
    STORED = "stored"  # stored before, by any worker: a duplicate
    ELSEWHERE = "elsewhere"  # another store of it is in flight: try again later
    UNCHECKED = "unchecked"  # no ledger, or Redis did not answer: store as without one


@dataclass(frozen=True, slots=True)
class Claim:
    """The answer to a claim; `token` only when it is ours, `stored_parts` of a split item."""

    status: Status
    key: str = ""
    token: str | None = None
    stored_parts: frozenset[str] = frozenset()


UNCHECKED = Claim(Status.UNCHECKED)


class Ledger(Protocol):
    """What the pipeline asks of a ledger; none of these ever raises for a ledger failure."""

    async def claim(self, key: str, parts: Sequence[str] = ()) -> Claim:
        """Claim `key` for a store, and say which of its `parts` are stored already."""
        ...

    async def mark_stored(self, key: str) -> None:
        """Record that `key` (an item or one part) is stored."""
        ...

    async def release(self, claim: Claim) -> None:
        """Give up a claim after a failed store, if it is still ours."""
        ...


class NoLedger:
    """The ledger when none is configured: every item is stored."""

    async def claim(self, key: str, parts: Sequence[str] = ()) -> Claim:
        """Nothing to ask."""
        return UNCHECKED

    async def mark_stored(self, key: str) -> None:
        """Nothing to record."""

    async def release(self, claim: Claim) -> None:
        """Nothing to release."""


class RecentKeys:
    """A bounded LRU of idempotency keys this process has stored."""

    def __init__(self, size: int) -> None:
        self._size = size
        self._keys: OrderedDict[str, None] = OrderedDict()

    def __contains__(self, key: object) -> bool:
        return key in self._keys

    def add(self, key: str) -> None:
        """Remember a stored key, forgetting the oldest beyond the bound."""
        if self._size <= 0:
            return
        self._keys[key] = None
        self._keys.move_to_end(key)
        if len(self._keys) > self._size:
            self._keys.popitem(last=False)


class RedisLedger:
    """The ledger in Redis; an async context manager that owns its client."""

    def __init__(
        self,
        url: str,
        metrics: Metrics,
        *,
        key_prefix: str,
        ttl_s: float,
        claim_ttl_s: float,
        timeout_s: float,
        worker_id: str,
    ) -> None:
        self._redis = client(url, timeout_s)
        self._claim = self._redis.register_script(CLAIM)
        self._release = self._redis.register_script(RELEASE)
        self._where = masked(url)
        self._metrics = metrics
        self._prefix = key_prefix
        self._ttl_ms = round(ttl_s * 1000)
        self._claim_ttl_ms = round(claim_ttl_s * 1000)
        self._timeout_s = timeout_s
        self._worker_id = worker_id
        self._skip_until: float | None = None  # set while Redis is failing

    @classmethod
    def from_settings(cls, url: str, settings: Settings, metrics: Metrics) -> RedisLedger:
        """A ledger whose claims outlast the per-item timeout by `ledger.claim_margin_s`."""
        ledger = settings.ledger
        return cls(
            url,
            metrics,
            key_prefix=ledger.key_prefix,
            ttl_s=ledger.ttl_s,
            claim_ttl_s=settings.sink.timeout_s + ledger.claim_margin_s,
            timeout_s=ledger.timeout_s,
            worker_id=settings.worker.id,
        )

    async def __aenter__(self) -> Self:
        try:
            async with asyncio.timeout(self._timeout_s):
                await self._redis.ping()
        except ERRORS as exc:
            self._failed("ping", exc)
        else:
            log.info("ledger_connected", redis=self._where)
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self._redis.aclose()

    async def claim(self, key: str, parts: Sequence[str] = ()) -> Claim:
        """Claim `key` for a store, and say which of its `parts` are stored already."""
        if self._skipping():
            return UNCHECKED
        token = f"{self._worker_id}:{secrets.token_hex(8)}:pending"
        keys = [self._prefix + k for k in (key, *parts)]
        try:
            async with asyncio.timeout(self._timeout_s):
                answer = await self._claim(keys=keys, args=[token, self._claim_ttl_ms])
        except ERRORS as exc:
            self._failed("claim", exc)
            return UNCHECKED
        self._recovered()
        if isinstance(answer, list):
            done = frozenset(p for p, value in zip(parts, answer, strict=True) if value == STORED)
            return Claim(Status.MINE, key, token, done)
        if answer == STORED:
            self._metrics.ledger_duplicates.inc()
            return Claim(Status.STORED, key)
        self._metrics.ledger_deferred.inc()
        return Claim(Status.ELSEWHERE, key)

    async def mark_stored(self, key: str) -> None:
        """Record that `key` (an item or one part) is stored."""
        if self._skipping():
            return
        try:
            async with asyncio.timeout(self._timeout_s):
                await self._redis.set(self._prefix + key, STORED, px=self._ttl_ms)
        except ERRORS as exc:
            self._failed("mark_stored", exc)
        else:
            self._recovered()

    async def release(self, claim: Claim) -> None:
        """Give up a claim after a failed store, if it is still ours."""
        if claim.token is None or self._skipping():
            return  # an unreleased claim expires after its TTL
        try:
            async with asyncio.timeout(self._timeout_s):
                await self._release(keys=[self._prefix + claim.key], args=[claim.token])
        except ERRORS as exc:
            self._failed("release", exc)
        else:
            self._recovered()

    def _skipping(self) -> bool:
        until = self._skip_until
        return until is not None and asyncio.get_running_loop().time() < until

    def _failed(self, op: str, exc: BaseException) -> None:
        self._metrics.ledger_errors.labels(op).inc()
        if self._skip_until is None:
            log.warning("ledger_unavailable", redis=self._where, op=op, error=repr(exc))
        self._skip_until = asyncio.get_running_loop().time() + RECHECK_S

    def _recovered(self) -> None:
        if self._skip_until is not None:
            self._skip_until = None
            log.info("ledger_available", redis=self._where)


@asynccontextmanager
async def open_ledger(settings: Settings, metrics: Metrics) -> AsyncIterator[Ledger]:
    """The ledger the settings name: Redis when `ledger.url` is set, else none."""
    url = settings.ledger.url
    if url is None:
        yield NoLedger()
        return
    async with RedisLedger.from_settings(url.get_secret_value(), settings, metrics) as ledger:
        yield ledger


async def ping(url: str, timeout_s: float) -> str | None:
    """Reach Redis once: None when it answers, else what failed (for `memory-worker check`)."""
    redis = client(url, timeout_s)
    try:
        async with asyncio.timeout(timeout_s):
            await redis.ping()
    except ERRORS as exc:
        return repr(exc)
    finally:
        await redis.aclose()
    return None
