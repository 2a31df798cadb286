"""Tests for the log stream that survives its reader going away."""

from __future__ import annotations

import io
import os

from worker.logs import TolerantStream


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
