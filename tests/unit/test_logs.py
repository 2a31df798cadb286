"""Tests for the log stream that survives its reader going away, and the JSON log lines."""

from __future__ import annotations

import io
import json
import logging
import os
import re
import sys
from collections.abc import Iterator
from datetime import UTC, datetime
from types import SimpleNamespace
from typing import Any

import orjson
import pytest
import structlog
from structlog.testing import capture_logs
from structlog.typing import Processor

import worker.logs
from worker.logs import IsoUtcTimeStamper, LibraryRecords, TolerantStream, configure_logging


def test_writes_pass_through_while_the_reader_is_there() -> None:
    """Writes and flushes reach the underlying stream."""
    target = io.BytesIO()
    stream = TolerantStream(target)
    stream.write(b"one\n")
    stream.flush()
    assert target.getvalue() == b"one\n" and not stream.broken


def test_a_broken_pipe_is_remembered_and_never_raised() -> None:
    """Once the reader closed the pipe, writes and flushes are dropped instead of raising."""
    read_fd, write_fd = os.pipe()
    os.close(read_fd)
    with open(write_fd, "wb", buffering=0) as pipe:
        stream = TolerantStream(pipe)
        stream.write(b"lost\n")
        assert stream.broken
        stream.write(b"also lost\n")
        stream.flush()


@pytest.fixture
def json_chain() -> Iterator[list[Processor]]:
    """The JSON configuration's processors; structlog's defaults come back afterwards."""
    configure_logging("json", "info")
    try:
        yield list(structlog.get_config()["processors"])
    finally:
        structlog.reset_defaults()
        structlog.contextvars.clear_contextvars()


def structlog_standard() -> list[Processor]:
    """The chain these processors stand in for, as structlog ships it."""
    return [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.format_exc_info,
        structlog.processors.JSONRenderer(
            serializer=lambda obj, **_: orjson.dumps(obj, default=str)
        ),
    ]


def render(processors: list[Processor], method: str, **event: Any) -> dict[str, Any]:
    """Run a chain over one event and parse the JSON line it produces."""
    result: Any = dict(event)
    for processor in processors:
        result = processor(None, method, result)
    assert isinstance(result, bytes)
    parsed: dict[str, Any] = json.loads(result)
    return parsed


ISO_UTC = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d{6})?Z")


def test_json_lines_are_those_of_structlogs_own_processors(json_chain: list[Processor]) -> None:
    """Same keys in the same order and the same values; the timestamp in the same format."""
    structlog.contextvars.bind_contextvars(worker_id="w-1")
    event = {
        "message_id": "m-1",
        "outcome": "stored",
        "reason": None,
        "latency_s": 0.001234,
        "settled": True,
        "when": datetime(2024, 6, 1, tzinfo=UTC),
        "event": "message_settled",
    }
    try:
        raise ValueError("boom")
    except ValueError:
        for method in ("info", "warning", "exception"):
            extra = {"exc_info": True} if method == "exception" else {}
            before = datetime.now(UTC)
            expected = render(structlog_standard(), method, **event, **extra)
            ours = render(json_chain, method, **event, **extra)
            assert list(ours) == list(expected)
            assert {**ours, "timestamp": None} == {**expected, "timestamp": None}
            assert ISO_UTC.fullmatch(ours["timestamp"])
            assert before <= datetime.fromisoformat(ours["timestamp"]) <= datetime.now(UTC)
    assert ours["worker_id"] == "w-1" and "ValueError: boom" in ours["exception"]


@pytest.mark.parametrize(
    "nanos",
    [
        1_717_243_200_000_000_000,  # a whole second: no fraction, as isoformat writes it
        1_717_243_200_000_000_999,  # under a microsecond: still none
        1_717_243_200_000_001_000,
        1_717_243_200_999_999_999,
        1_709_251_199_999_999_000,  # 2024-02-29T23:59:59.999999
        0,
    ],
)
def test_timestamp_is_isoformat_in_utc_with_a_z(
    nanos: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The cached date plus microseconds reads exactly as datetime.isoformat() would."""
    stamper = IsoUtcTimeStamper()
    for offset in (0, 1_000_000_000, 0):  # the next second, then back: the cache follows
        now = nanos + offset
        monkeypatch.setattr(worker.logs, "time", SimpleNamespace(time_ns=lambda now=now: now))
        expected = datetime.fromtimestamp(now // 10**9, UTC).replace(
            microsecond=now // 1000 % 10**6
        )
        stamped = stamper(None, "info", {})["timestamp"]
        assert stamped == expected.isoformat().replace("+00:00", "Z")
        assert datetime.fromisoformat(stamped) == expected


def test_configured_json_line_on_stderr(capsys: pytest.CaptureFixture[str]) -> None:
    """A JSON-configured logger writes one parseable line with level and timestamp last."""
    configure_logging("json", "info")  # here, so that it picks up the captured stderr
    try:
        structlog.get_logger("test").warning("message_settled", message_id="m-2", latency_s=0.5)
    finally:
        structlog.reset_defaults()
    (line,) = capsys.readouterr().err.splitlines()
    data = json.loads(line)
    assert list(data) == ["message_id", "latency_s", "event", "level", "timestamp"]
    assert data["level"] == "warning"
    assert datetime.fromisoformat(data["timestamp"]).tzinfo == UTC


def test_library_records_become_structured_events() -> None:
    """A library's stdlib warning is one structlog event with its logger name and error repr."""
    handler = LibraryRecords(tracebacks=False)
    try:
        raise ConnectionError("refused")
    except ConnectionError:
        record = logging.getLogger("aiormq.connection").makeRecord(
            "aiormq.connection", logging.ERROR, __file__, 1, "lost: %s", ("x",), sys.exc_info()
        )
    quiet = logging.LogRecord("aiormq.connection", logging.ERROR, __file__, 1,
                              "error when creating transport: x", (), None)  # fmt: skip
    with capture_logs() as logs:
        handler.emit(record)
        handler.emit(quiet)
    assert logs == [
        {
            "event": "lost: x",
            "logger": "aiormq.connection",
            "error": "ConnectionError('refused')",
            "log_level": "error",
        }
    ]
