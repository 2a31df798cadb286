"""What is sent for an item: blank content becomes a summary of its metadata, long content parts.

Mahavishnu's own workers report no output, so most of its items have blank content and the
memory is in the metadata; Session-Buddy refuses blank content. `sink.blank_content` says what
to do: write a short text from the metadata (`summarize`), dead-letter, or ack and count (`skip`).
The worker and the publisher both decide through `blank_refusal` and `content_for`.
"""

from __future__ import annotations

from worker.models import MemoryItem, MemoryMetadata, too_large
from worker.outcome import Outcome, Reason
from worker.sections import SinkSettings
from worker.sink import StoreRequest

#: Tag on every generated text, so a search can tell it from what a worker wrote.
SUMMARY_TAG = "summary:generated"
BLANK_DETAIL = "content is blank (sink.blank_content = dead_letter)"
SKIPPED_DETAIL = "content is blank (sink.blank_content = skip)"
_MAX_ERROR = 500


def is_blank(content: str) -> bool:
    """Whether content has no visible character."""
    return not content.strip()


def summarize(metadata: MemoryMetadata) -> str:
    """One sentence from the metadata: pool, worker, status, exit code, duration, error."""
    parts = [
        f"Worker {metadata.worker_id} of {metadata.pool_type} pool {metadata.pool_id} "
        f"finished with status {metadata.status}"
    ]
    if metadata.exit_code is not None:
        parts.append(f"exit code {metadata.exit_code}")
    if metadata.duration_seconds is not None:
        parts.append(f"after {round(metadata.duration_seconds, 2)} s")
    text = ", ".join(parts) + "."
    if metadata.error:
        error = " ".join(metadata.error.split())
        text += f" Error: {error[:_MAX_ERROR]}"
    return text + " (No output; generated from metadata.)"


def blank_refusal(item: MemoryItem, sink: SinkSettings) -> str | None:
    """Why the worker would dead-letter this item for blank content, or None."""
    if sink.blank_content == "dead_letter" and is_blank(item.content):
        return BLANK_DETAIL
    return None


def content_for(item: MemoryItem, sink: SinkSettings) -> tuple[str, tuple[str, ...]] | Outcome:
    """The text to store and its extra tags, or the outcome when blank content is not stored."""
    if not is_blank(item.content):
        return item.content, ()
    if sink.blank_content == "dead_letter":
        return Outcome.invalid(Reason.SCHEMA, BLANK_DETAIL)
    if sink.blank_content == "skip":
        return Outcome.skipped(SKIPPED_DETAIL)
    return summarize(item.metadata), (SUMMARY_TAG,)


def requests_for(item: MemoryItem, key: str, sink: SinkSettings) -> list[StoreRequest] | Outcome:
    """The store calls for one item: one, or linked parts of an oversize item when `split`."""
    prepared = content_for(item, sink)
    if isinstance(prepared, Outcome):
        return prepared
    content, tags = prepared
    metadata = item.metadata.model_dump(mode="json", exclude_none=True)
    passed = metadata.get("tags")
    if isinstance(passed, list) and all(isinstance(t, str) for t in passed):
        tags = (*tags, *passed)  # an outbox row's own tags (worker.mahavishnu)
    limit = sink.max_content_chars
    if len(content) <= limit:
        return [StoreRequest(content, metadata, key, tags)]
    if sink.oversize == "dead_letter":
        # `memory-worker publish` refuses the same items by the same rule before sending.
        return Outcome.invalid(Reason.TOO_LARGE, too_large(content, limit) or "")
    chunks = [content[i : i + limit] for i in range(0, len(content), limit)]
    total = len(chunks)
    return [
        StoreRequest(
            chunk, metadata, f"{key}#{n}/{total}", (f"part:{n}/{total}", f"of:{key}", *tags)
        )
        for n, chunk in enumerate(chunks, 1)
    ]
