"""The one boundary where a request becomes a reply.

Owns the method table, argument validation (through ``params``), the
conversion of any exception into the wire's ``[code, message, data]`` (an
unexpected one is logged with its traceback and becomes ``internal``), and
the one log line per request (method, duration, outcome, caller). Handlers
that are plain functions run inline, with no task; coroutines get one. It
must not know about sockets or Docker.
"""

from __future__ import annotations

import inspect
import secrets
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from sandboxd.core.records import Caller
from sandboxd.rpc.params import Field, validate
from sandboxd.wire.codec import Request, encode_response
from sandboxd.wire.errors import InternalError, MethodNotFound, SandboxdError, ShuttingDown


class BoundLog(Protocol):
    def info(self, event: str, **kw: Any) -> Any: ...
    def warning(self, event: str, **kw: Any) -> Any: ...
    def error(self, event: str, **kw: Any) -> Any: ...
    def exception(self, event: str, **kw: Any) -> Any: ...


class CallContext(Protocol):
    """What a handler may know about the call's connection."""

    caller: Caller
    log: BoundLog

    def log_request(self, method: str, msgid: int, outcome: str, ms: float) -> None:
        """Write the one log line of a request."""

    closed: bool  # the connection is gone
    on_close: list[Callable[[], None]]  # run once when the connection closes

    def notify(self, method: str, params: list[Any]) -> None:
        """Queue a notification to the caller (never waits)."""

    async def drain(self) -> None:
        """Wait until the caller has read enough of what was sent (back-pressure)."""

    def hold(self) -> None:
        """Something long-lived (a subscription, a stream) uses the connection: an idle
        connection is not closed while it holds one."""

    def release(self) -> None:
        """The end of what ``hold`` announced."""


Handler = Callable[[CallContext, dict[str, Any]], Any]


@dataclass(frozen=True)
class Method:
    name: str
    handler: Handler
    params: Mapping[str, Field] = field(default_factory=dict)
    cancel_on_disconnect: bool = False  # e.g. a buffered exec: nobody will read its result
    during_shutdown: bool = False  # still answered while the daemon stops

    is_async: bool = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "is_async", inspect.iscoroutinefunction(self.handler))


class Dispatcher:
    def __init__(self, methods: list[Method]) -> None:
        self.methods = {m.name: m for m in methods}
        self.shutting_down = False

    def method(self, name: str) -> Method | None:
        return self.methods.get(name)

    def dispatch(self, ctx: CallContext, req: Request) -> bytes | Awaitable[bytes]:
        """The encoded reply, or an awaitable of it when the handler is a coroutine."""
        started = time.perf_counter()
        method = self.methods.get(req.method)
        try:
            if method is None:
                raise MethodNotFound(
                    f"There is no method {req.method!r}; daemon.info lists the daemon's version.",
                    {"method": req.method},
                )
            if self.shutting_down and not method.during_shutdown:
                raise ShuttingDown("The daemon is stopping and takes no new work; retry shortly.")
            args = validate(method.params, req.params) if method.params or req.params else {}
            if method.is_async:
                return self._finish(ctx, req, method.handler(ctx, args), started)
            result = method.handler(ctx, args)
        except Exception as exc:
            return self._error(ctx, req, exc, started)
        return self._ok(ctx, req, result, started)

    async def _finish(
        self, ctx: CallContext, req: Request, pending: Awaitable[Any], started: float
    ) -> bytes:
        try:
            result = await pending
        except Exception as exc:
            return self._error(ctx, req, exc, started)
        return self._ok(ctx, req, result, started)

    def _ok(self, ctx: CallContext, req: Request, result: Any, started: float) -> bytes:
        ctx.log_request(
            req.method, req.msgid, "ok", round((time.perf_counter() - started) * 1e3, 3)
        )
        return encode_response(req.msgid, None, result)

    def _error(self, ctx: CallContext, req: Request, exc: Exception, started: float) -> bytes:
        ms = round((time.perf_counter() - started) * 1000, 3)
        if not isinstance(exc, SandboxdError):
            ref = secrets.token_hex(4)
            ctx.log.error(
                "request_failed",
                method=req.method,
                msgid=req.msgid,
                outcome="internal",
                ms=ms,
                ref=ref,
                exc_info=exc,
            )
            exc = InternalError(
                f"The daemon hit an internal error (log reference {ref}); this is a bug.",
                {"ref": ref},
            )
        else:
            ctx.log_request(req.method, req.msgid, exc.code, ms)
        return encode_response(req.msgid, exc.to_wire(), None)
