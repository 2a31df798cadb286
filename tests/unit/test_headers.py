"""Tests for the `x-mw-*` header helpers: what a retry, dead letter and replay carry."""

from __future__ import annotations

from worker.headers import (
    DETAIL_HEADER_CHARS,
    H_ATTEMPTS,
    H_DETAIL,
    H_FIRST_FAILURE_MS,
    H_LAST_FAILURE_MS,
    H_REASON,
    H_REPLAYED,
    dead_letter_headers,
    failure_headers,
    first_failure,
    previous_attempts,
    replay_headers,
)


def test_failure_headers_are_integer_ms_and_cut_the_detail() -> None:
    """Times are written as integer epoch ms and the detail is cut to its header size."""
    headers = failure_headers(2, 1_700_000_000.25, "x" * 5000, now_s=1_700_000_001.5)
    assert headers == {
        H_ATTEMPTS: 2,
        H_FIRST_FAILURE_MS: 1_700_000_000_250,
        H_LAST_FAILURE_MS: 1_700_000_001_500,
        H_DETAIL: "x" * DETAIL_HEADER_CHARS,
    }


def test_failure_headers_omit_the_first_failure_of_a_copy_parked_without_counting() -> None:
    """No first-failure time is written until the retry budget's clock has started."""
    assert H_FIRST_FAILURE_MS not in failure_headers(0, None, "parked", now_s=1.0)


def test_written_headers_read_back() -> None:
    """What `failure_headers` writes, `previous_attempts` and `first_failure` read back."""
    headers = failure_headers(3, 1_700_000_000.5, "boom", now_s=1_700_000_002.0)
    assert previous_attempts(headers) == 3
    assert first_failure(headers) == 1_700_000_000.5
    assert previous_attempts({}) == 0 and first_failure({}) is None


def test_replay_headers_clear_failure_and_broker_headers_and_count_replays() -> None:
    """A replayed copy keeps the publisher's headers, loses ours and the broker's, counts +1."""
    dead = {
        "trace": "abc",
        "x-death": [{"queue": "q"}],
        "x-delivery-count": 4,
        "x-first-death-reason": "rejected",
        **failure_headers(1, 1.0, "boom", now_s=2.0),
        **dead_letter_headers("schema", "worker-a", "q"),
        H_REPLAYED: 2,
    }
    assert dead[H_REASON] == "schema"
    assert replay_headers(dead) == {"trace": "abc", H_REPLAYED: 3}
    assert replay_headers({}) == {H_REPLAYED: 1}
