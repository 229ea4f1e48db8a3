"""Logging: structlog as the one chain for the daemon's and its libraries' logs.

Owns the structlog configuration (JSON lines on stdout when it is not a TTY,
readable console output on a TTY), the batching writer that turns a burst of
log lines into one write, and the bridge that routes stdlib records (aiohttp,
aiodocker, asyncio) through the same processors. It must not decide what is
logged: callers bind their own context.
"""

from __future__ import annotations

import asyncio
import logging
import sys
from typing import Any, TextIO

import structlog

_LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}


class BatchingWriter:
    """Collects lines and writes them once per event-loop turn (or at once without a loop)."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream
        self._lines: list[str] = []
        self._scheduled = False

    def write(self, line: str) -> None:
        self._lines.append(line)
        if self._scheduled:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self.flush()
            return
        self._scheduled = True
        loop.call_soon(self.flush)

    def flush(self) -> None:
        self._scheduled = False
        if not self._lines:
            return
        text = "".join(self._lines)
        self._lines.clear()
        try:
            self._stream.write(text)
            self._stream.flush()
        except (OSError, ValueError):
            pass  # stdout gone (closed pipe): logging must never take the daemon down


class _LineLogger:
    """A structlog logger whose every method writes one rendered line."""

    def __init__(self, writer: BatchingWriter) -> None:
        self._writer = writer

    def msg(self, message: str) -> None:
        self._writer.write(message + "\n")

    log = debug = info = warning = warn = error = critical = exception = fatal = msg


class _StdlibBridge(logging.Handler):
    """Routes stdlib log records (aiohttp, aiodocker, asyncio) into structlog."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            log = structlog.get_logger(record.name)
            kw: dict[str, Any] = {"logger": record.name}
            if record.exc_info:
                kw["exc_info"] = record.exc_info
            method = getattr(log, record.levelname.lower(), log.warning)
            method(record.getMessage(), **kw)
        except Exception:  # pragma: no cover - never let logging raise
            self.handleError(record)


_writer: BatchingWriter | None = None


def configure_logging(level: str = "info", fmt: str = "auto", stream: TextIO | None = None) -> None:
    """Set up structlog once for the process."""
    global _writer
    stream = stream or sys.stdout
    as_json = fmt == "json" or (fmt == "auto" and not stream.isatty())
    _writer = BatchingWriter(stream)
    renderer: Any = (
        structlog.processors.JSONRenderer()
        if as_json
        else structlog.dev.ConsoleRenderer(colors=stream.isatty())
    )
    processors: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    if as_json:
        processors += [structlog.processors.dict_tracebacks]
    processors.append(renderer)
    writer = _writer
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS[level]),
        logger_factory=lambda *args: _LineLogger(writer),
        cache_logger_on_first_use=True,
    )
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    root.addHandler(_StdlibBridge())
    root.setLevel(logging.WARNING if _LEVELS[level] < logging.WARNING else _LEVELS[level])


def flush_logs() -> None:
    if _writer is not None:
        _writer.flush()
