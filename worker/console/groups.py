"""Dead letters grouped by reason, and pages of a group: pure functions over a snapshot."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from worker.dlq_model import DeadLetter, span

#: Rows on one page of a group; a group of thousands is read a page at a time.
PAGE_SIZE = 50
#: Pools named on a group's line; the rest are summed up as "+N more".
TOP_POOLS = 3


@dataclass(frozen=True, slots=True)
class Group:
    """The dead letters of one reason: how many, when, what the sink said most, which pools."""

    reason: str
    count: int
    oldest_ms: int | None
    newest_ms: int | None
    top_detail: str
    top_detail_count: int
    pools: tuple[tuple[str, int], ...]
    fingerprints: tuple[str, ...]

    @property
    def more_pools(self) -> int:
        """Pools beyond the ones named."""
        return max(0, len(self.pools) - TOP_POOLS)


def group_by_reason(letters: tuple[DeadLetter, ...] | list[DeadLetter]) -> list[Group]:
    """One group per reason, largest first (ties by name)."""
    by_reason: dict[str, list[DeadLetter]] = {}
    for letter in letters:
        by_reason.setdefault(letter.reason, []).append(letter)
    groups = [_group(reason, members) for reason, members in by_reason.items()]
    return sorted(groups, key=lambda g: (-g.count, g.reason))


def _group(reason: str, members: list[DeadLetter]) -> Group:
    oldest_ms, newest_ms = span(members)
    details = Counter(" ".join(d.detail.split()) for d in members)
    detail, detail_count = details.most_common(1)[0]
    pools = Counter(d.pool or "-" for d in members)
    return Group(
        reason=reason,
        count=len(members),
        oldest_ms=oldest_ms,
        newest_ms=newest_ms,
        top_detail=detail,
        top_detail_count=detail_count,
        pools=tuple(sorted(pools.items(), key=lambda kv: (-kv[1], kv[0]))),
        fingerprints=tuple(d.fingerprint for d in members),
    )


@dataclass(frozen=True, slots=True)
class Page:
    """One page of a list: its rows, its number (from 1) and how many pages there are."""

    rows: list[DeadLetter]
    number: int
    pages: int
    total: int


def page_of(letters: list[DeadLetter], number: int, size: int = PAGE_SIZE) -> Page:
    """Page `number` (clamped to the pages there are) of `letters`."""
    pages = max(1, -(-len(letters) // size))
    number = min(max(1, number), pages)
    start = (number - 1) * size
    return Page(letters[start : start + size], number, pages, len(letters))
