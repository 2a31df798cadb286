"""Tests for `memory-worker publish`'s line check, which applies the worker's own rules."""

from __future__ import annotations

import io
import json

from worker.cli.publish import _validate
from worker.settings import load_settings
from worker.testing.items import valid_item


def test_oversized_content_is_refused_before_it_is_sent() -> None:
    """With oversize = dead_letter, long content is an invalid line, as the worker rules."""
    lines = [json.dumps(valid_item("short")), json.dumps(valid_item("x" * 12_000))]
    settings = load_settings({"sink": {"oversize": "dead_letter"}})
    items, bad = _validate(io.BytesIO("\n".join(lines).encode()), settings)
    assert [n for n, _ in items] == [1]
    assert bad == [(2, "too_large: content has 12000 characters; the sink keeps at most 10000")]


def test_oversized_content_passes_when_the_worker_splits_it() -> None:
    """By default (oversize = split) the worker stores long content in parts: publish sends it."""
    settings = load_settings()
    items, bad = _validate(io.BytesIO(json.dumps(valid_item("x" * 12_000)).encode()), settings)
    assert len(items) == 1 and bad == []


def test_blank_content_is_sent_unless_the_worker_would_dead_letter_it() -> None:
    """Blank content passes under summarize and skip; under dead_letter it is an invalid line."""
    line = json.dumps(valid_item("")).encode()
    for rule in ("summarize", "skip"):
        items, bad = _validate(io.BytesIO(line), load_settings({"sink": {"blank_content": rule}}))
        assert len(items) == 1 and bad == []
    settings = load_settings({"sink": {"blank_content": "dead_letter"}})
    items, bad = _validate(io.BytesIO(line), settings)
    assert items == [] and bad == [
        (1, "schema: content is blank (sink.blank_content = dead_letter)")
    ]
