"""What a confirmed publish can end as: the exceptions and the per-item results of a batch."""

from __future__ import annotations

from dataclasses import dataclass

from worker.strict_json import DecodeError


class PublishFailed(Exception):
    """The broker did not confirm a publish."""


class Unroutable(PublishFailed):
    """The broker returned a mandatory publish: no queue is bound for its routing key."""


class Refused(PublishFailed):
    """The broker nacked the publish."""


class ConnectionLost(PublishFailed):
    """The channel or connection closed before the broker confirmed."""


@dataclass(frozen=True, slots=True)
class PublishResult:
    """What happened to one item of a batch: its message id, or why it was not confirmed."""

    index: int
    message_id: str | None
    error: DecodeError | PublishFailed | None = None

    @property
    def ok(self) -> bool:
        """Whether the broker confirmed this item."""
        return self.error is None


class BatchFailed(PublishFailed):
    """Some items of a batch were not confirmed."""

    def __init__(self, failures: list[PublishResult]) -> None:
        self.failures = failures
        shown = ", ".join(f"#{f.index}: {f.error}" for f in failures[:3])
        more = f" and {len(failures) - 3} more" if len(failures) > 3 else ""
        super().__init__(f"{len(failures)} item(s) not confirmed ({shown}{more})")


@dataclass(frozen=True, slots=True)
class BatchResult:
    """Per-item results of `publish_many`, in input order."""

    results: tuple[PublishResult, ...]

    @property
    def published(self) -> int:
        """How many items the broker confirmed."""
        return sum(1 for r in self.results if r.ok)

    @property
    def failures(self) -> list[PublishResult]:
        """The items that were not confirmed."""
        return [r for r in self.results if not r.ok]

    def raise_for_failures(self) -> None:
        """Raise `BatchFailed` naming the failed items, if there are any."""
        failures = self.failures
        if failures:
            raise BatchFailed(failures)
