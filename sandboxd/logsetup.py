"""Logging: structlog as the one chain for the daemon's and its libraries' logs.

Owns the structlog configuration (JSON lines on stdout when it is not a TTY,
readable console output on a TTY), the batching writer that turns a burst of
log lines into one write, and the bridge that routes stdlib records (aiohttp,
aiodocker, asyncio) through the same processors. It must not decide what is
logged: callers bind their own context.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys
import time
from collections.abc import Callable
from typing import Any, TextIO

import structlog

_LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}


class BatchingWriter:
    """Collects lines and writes them in one go, at most ``FLUSH_DELAY`` later.

    Without a running event loop (start-up, shutdown) each line is written at
    once. A burst of requests costs one write, not one per line.
    """

    FLUSH_DELAY = 0.005
    MAX_PENDING = 256

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream
        self._lines: list[str] = []
        self._scheduled = False

    def write(self, line: str) -> None:
        self._lines.append(line)
        if len(self._lines) >= self.MAX_PENDING:
            self.flush()
            return
        if self._scheduled:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self.flush()
            return
        self._scheduled = True
        loop.call_later(self.FLUSH_DELAY, self.flush)

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
_fast_requests = False
_quoted: dict[str, str] = {}  # method name -> its JSON string
_request_level_on = True
_second: list[Any] = [-1, ""]
STAMP_RESOLUTION = 0.0001  # request lines within 100 µs of each other share a timestamp
_stamp: list[Any] = [0.0, ""]


def _rfc3339(now: float) -> str:
    """RFC 3339 UTC with microseconds; the date part is formatted once a second."""
    sec = int(now)
    if sec != _second[0]:
        _second[0], _second[1] = sec, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(sec))
    return f"{_second[1]}.{int((now - sec) * 1e6):06d}Z"


def fast_timestamp(_: Any, __: str, event: dict[str, Any]) -> dict[str, Any]:
    event["timestamp"] = _rfc3339(time.time())
    return event


def _json_serializer() -> Callable[..., str]:
    try:
        import orjson
    except ImportError:  # pragma: no cover - orjson is a dependency; json still works
        return json.dumps

    def dumps(obj: Any, **_: Any) -> str:
        return orjson.dumps(obj, default=repr).decode()

    return dumps


def configure_logging(level: str = "info", fmt: str = "auto", stream: TextIO | None = None) -> None:
    """Set up structlog once for the process."""
    global _writer, _fast_requests, _request_level_on, _fast_dumps
    stream = stream or sys.stdout
    as_json = fmt == "json" or (fmt == "auto" and not stream.isatty())
    _writer = BatchingWriter(stream)
    _fast_dumps = _json_serializer()
    _request_level_on = _LEVELS[level] <= logging.INFO
    _fast_requests = as_json and _request_level_on
    renderer: Any = (
        structlog.processors.JSONRenderer(serializer=_fast_dumps)
        if as_json
        else structlog.dev.ConsoleRenderer(colors=stream.isatty())
    )
    processors: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        fast_timestamp,
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


_fast_dumps: Callable[..., str] = _json_serializer()


class RequestLog:
    """The one line per request, for one connection's bound context.

    In JSON mode it renders straight to the writer (the same keys and shape
    the processor chain gives: context, fields, event, level, timestamp), as
    this line is written for every call and the chain costs several times
    more; otherwise it goes through structlog like any other line.
    """

    def __init__(self, **context: Any) -> None:
        self._context = context
        self._log = structlog.get_logger("sandboxd.request").bind(**context)
        # '{"conn":1,"uid":0,"pid":5,' : the bound context, rendered once.
        self._prefix = _fast_dumps(context)[:-1] + ("," if context else "")

    def __call__(self, method: str, msgid: int, outcome: str, ms: float) -> None:
        if not _fast_requests or _writer is None:
            if _request_level_on:
                self._log.info("request", method=method, msgid=msgid, outcome=outcome, ms=ms)
            return
        now = time.time()
        if now - _stamp[0] >= STAMP_RESOLUTION:  # a burst of requests shares one stamp
            _stamp[0], _stamp[1] = now, _rfc3339(now)
        # outcome is one of our own codes and ms a float: only the method needs escaping.
        quoted = _quoted.get(method)
        if quoted is None:
            quoted = _fast_dumps(method)
            if len(_quoted) < 256:  # method names come from clients: keep the cache bounded
                _quoted[method] = quoted
        _writer.write(
            f'{self._prefix}"method":{quoted},"msgid":{msgid},'
            f'"outcome":"{outcome}","ms":{ms},"event":"request","level":"info",'
            f'"timestamp":"{_stamp[1]}"}}\n'
        )


class RateLimitedErrors:
    """An event-loop exception handler that logs each kind of error at a bounded rate.

    asyncio reports every failed ``accept()`` (out of descriptors, say) through
    the loop's exception handler; under a flood of connections that is tens of
    thousands of lines a second. The same message is logged at most once per
    ``INTERVAL``, with how many were suppressed since.
    """

    INTERVAL = 10.0
    MAX_KINDS = 256

    def __init__(self) -> None:
        self._log = structlog.get_logger("sandboxd.loop")
        self._last: dict[str, tuple[float, int]] = {}

    def __call__(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        message = str(context.get("message") or "unexpected error")
        exc = context.get("exception")
        kind = f"{message}|{type(exc).__name__ if exc is not None else ''}"
        now = time.monotonic()
        last, suppressed = self._last.get(kind, (0.0, 0))
        if now - last < self.INTERVAL:
            self._last[kind] = (last, suppressed + 1)
            return
        if len(self._last) >= self.MAX_KINDS:
            self._last.clear()
        self._last[kind] = (now, 0)
        self._log.error("loop_error", message=message, suppressed=suppressed,
                        exc_info=exc if isinstance(exc, BaseException) else None)


def flush_logs() -> None:
    if _writer is not None:
        _writer.flush()
