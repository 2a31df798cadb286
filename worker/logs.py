"""structlog setup: JSON lines when not on a terminal, readable columns on one."""

from __future__ import annotations

import logging
import sys
import time
from datetime import UTC, datetime
from typing import Any, BinaryIO, Literal, TextIO, cast

import orjson
import structlog
from structlog.typing import EventDict, WrappedLogger

# One line per message outcome is on the hot path: each processor below gives the same keys
# and values as structlog's own (TimeStamper(fmt="iso", utc=True), format_exc_info,
# JSONRenderer) for less CPU.


class IsoUtcTimeStamper:
    """`TimeStamper(fmt="iso", utc=True)`'s timestamp, with the date formatted once a second.

    Like `datetime.now(UTC).isoformat()`, microseconds are truncated and left out when zero.
    """

    def __init__(self) -> None:
        self._second = (-1, "")  # one tuple, so a reader on another thread never sees half

    def __call__(self, logger: WrappedLogger, name: str, event_dict: EventDict) -> EventDict:
        """Add `timestamp`, e.g. "2024-06-01T12:00:00.123456Z"."""
        second, nanos = divmod(time.time_ns(), 1_000_000_000)
        cached, prefix = self._second
        if cached != second:
            prefix = datetime.fromtimestamp(second, UTC).isoformat().removesuffix("+00:00")
            self._second = (second, prefix)
        micros = nanos // 1000
        event_dict["timestamp"] = f"{prefix}.{micros:06d}Z" if micros else f"{prefix}Z"
        return event_dict


def format_exc_info_if_any(logger: WrappedLogger, name: str, event_dict: EventDict) -> EventDict:
    """`format_exc_info`, skipped for the events (nearly all) that carry no `exc_info`."""
    if "exc_info" in event_dict:
        return structlog.processors.format_exc_info(logger, name, event_dict)
    return event_dict


def render_json(logger: WrappedLogger, name: str, event_dict: EventDict) -> bytes:
    """The event as one JSON object; orjson is ~10x the stdlib encoder."""
    return orjson.dumps(event_dict, default=str)


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


# Said again by our own events (`broker_unreachable`), with the URL and the next retry.
REDUNDANT = ("error when creating transport",)


class LibraryRecords(logging.Handler):
    """Records of the libraries (aiormq, aio-pika, ...) as our events: one line format on stderr.

    Without it Python's last-resort handler prints their warnings as bare text, tracebacks
    included, between our JSON lines. An exception is kept as its repr; the traceback only at
    debug level.
    """

    def __init__(self, tracebacks: bool) -> None:
        super().__init__()
        self._tracebacks = tracebacks

    def emit(self, record: logging.LogRecord) -> None:
        """Log the record through structlog, under the library's logger name."""
        if not self._tracebacks and record.getMessage().startswith(REDUNDANT):
            return
        try:
            fields: dict[str, Any] = {"logger": record.name}
            if record.exc_info and record.exc_info[1] is not None:
                fields["error"] = repr(record.exc_info[1])
                if self._tracebacks:
                    fields["exc_info"] = record.exc_info
            log = structlog.get_logger(record.name)
            level = record.levelname.lower() if record.levelno < logging.CRITICAL else "critical"
            getattr(log, level, log.warning)(record.getMessage(), **fields)
        except Exception:  # a log record must never break the code that logged it
            self.handleError(record)


def configure_logging(
    fmt: Literal["auto", "json", "console"] = "auto", level: str = "info"
) -> None:
    """Configure structlog once for the process; call it from the CLI, never at import."""
    as_json = fmt == "json" or (fmt == "auto" and not sys.stderr.isatty())
    processors: list[structlog.typing.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        IsoUtcTimeStamper(),
        format_exc_info_if_any,
    ]
    factory: Any
    if as_json:
        processors.append(render_json)
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
    debug = level.lower() == "debug"
    root = logging.getLogger()
    root.handlers[:] = [LibraryRecords(tracebacks=debug)]
    # The libraries' info is chatter (each reconnect attempt); their warnings matter.
    root.setLevel(logging.DEBUG if debug else logging.WARNING)
