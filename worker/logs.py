"""structlog setup: JSON lines when not on a terminal, readable columns on one."""

from __future__ import annotations

import logging
import sys
from typing import Any, BinaryIO, Literal, TextIO, cast

import orjson
import structlog


def _orjson(obj: Any, **_: Any) -> bytes:
    # One line per message outcome is on the hot path; orjson is ~10x the stdlib encoder.
    return orjson.dumps(obj, default=str)


class TolerantStream:
    """A log stream that stops writing once its reader is gone, instead of raising.

    A worker whose log pipe broke must still settle, drain and stop on SIGTERM; a log call
    that raised would abort exactly those paths.
    """

    def __init__(self, stream: Any) -> None:
        self._stream = stream
        self.broken = False

    def write(self, data: Any) -> None:
        """Write, unless the reader is gone."""
        if not self.broken:
            try:
                self._stream.write(data)
            except (BrokenPipeError, ConnectionResetError):
                self.broken = True

    def flush(self) -> None:
        """Flush, unless the reader is gone."""
        if not self.broken:
            try:
                self._stream.flush()
            except (BrokenPipeError, ConnectionResetError):
                self.broken = True


def configure_logging(
    fmt: Literal["auto", "json", "console"] = "auto", level: str = "info"
) -> None:
    """Configure structlog once for the process; call it from the CLI, never at import."""
    as_json = fmt == "json" or (fmt == "auto" and not sys.stderr.isatty())
    processors: list[structlog.typing.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.format_exc_info,
    ]
    factory: Any
    if as_json:
        processors.append(structlog.processors.JSONRenderer(serializer=_orjson))
        # structlog's loggers only call write() and flush().
        factory = structlog.BytesLoggerFactory(cast(BinaryIO, TolerantStream(sys.stderr.buffer)))
    else:
        processors.append(structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty()))
        factory = structlog.PrintLoggerFactory(cast(TextIO, TolerantStream(sys.stderr)))
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level.upper())),
        logger_factory=factory,
        cache_logger_on_first_use=True,
    )
