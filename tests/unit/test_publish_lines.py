"""Tests for `memory-worker publish`'s line check, which applies the worker's own rules."""

from __future__ import annotations

import io
import json

from worker.cli.publish import _validate
from worker.settings import load_settings
from worker.testing.items import valid_item


def test_oversized_content_is_refused_before_it_is_sent() -> None:
    """Content over sink.max_content_chars is an invalid line (too_large), as the worker rules."""
    lines = [json.dumps(valid_item("short")), json.dumps(valid_item("x" * 12_000))]
    items, bad = _validate(io.BytesIO("\n".join(lines).encode()), load_settings())
    assert [n for n, _ in items] == [1]
    assert bad == [(2, "too_large: content has 12000 characters; the sink keeps at most 10000")]


def test_oversized_content_passes_when_the_worker_splits_it() -> None:
    """With sink.oversize = split the worker stores long content in parts, so publish sends it."""
    settings = load_settings({"sink": {"oversize": "split"}})
    items, bad = _validate(io.BytesIO(json.dumps(valid_item("x" * 12_000)).encode()), settings)
    assert len(items) == 1 and bad == []
