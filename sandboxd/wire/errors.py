"""Error types shared by the daemon and the client, each carrying its wire code.

This module owns the mapping between exception classes and the SPEC §2 error
codes, in both directions (``to_wire`` and ``from_wire``). It must not import
anything beyond the standard library: the client imports it.
"""

from __future__ import annotations

from typing import Any, ClassVar


class SandboxdError(Exception):
    """Base of every error that crosses the wire: code, one-sentence message, data."""

    code: ClassVar[str] = "internal"

    def __init__(self, message: str, data: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.data = data

    def to_wire(self) -> list[Any]:
        """The ``[code, message, data]`` array a response carries."""
        return [self.code, self.message, self.data]

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.message!r}, data={self.data!r})"


class InvalidRequest(SandboxdError):
    """Not a well-formed msgpack-RPC message."""

    code = "invalid_request"


class TooLarge(SandboxdError):
    """A frame, argument or payload is over a configured limit."""

    code = "too_large"


class MethodNotFound(SandboxdError):
    """No such method."""

    code = "method_not_found"


class InvalidParams(SandboxdError):
    """A missing, unknown or ill-typed argument, or a bad value."""

    code = "invalid_params"


class NotFound(SandboxdError):
    """No such sandbox, exec, subscription or file (or it belongs to another user)."""

    code = "not_found"


class Conflict(SandboxdError):
    """The sandbox is in the wrong state for this, or a name is taken."""

    code = "conflict"


class PermissionDenied(SandboxdError):
    """The policy forbids it."""

    code = "permission_denied"


class QuotaExceeded(SandboxdError):
    """The caller's limit on sandboxes or resources is reached."""

    code = "quota_exceeded"


class DeadlineExceeded(SandboxdError):
    """An operation's own deadline passed (wire code ``timeout``)."""

    code = "timeout"


class EngineUnavailable(SandboxdError):
    """The Docker Engine cannot be reached."""

    code = "engine_unavailable"


class EngineError(SandboxdError):
    """The Docker Engine refused; ``data.engine_message`` carries its text."""

    code = "engine_error"


class ShuttingDown(SandboxdError):
    """The daemon is stopping and takes no new work."""

    code = "shutting_down"


class InternalError(SandboxdError):
    """A bug in the daemon; the details are in its log, never on the wire."""

    code = "internal"


class ConnectionLost(SandboxdError):
    """Client side only: the connection to the daemon closed before a reply came."""

    code = "connection_lost"


ERRORS_BY_CODE: dict[str, type[SandboxdError]] = {
    cls.code: cls
    for cls in (
        InvalidRequest,
        TooLarge,
        MethodNotFound,
        InvalidParams,
        NotFound,
        Conflict,
        PermissionDenied,
        QuotaExceeded,
        DeadlineExceeded,
        EngineUnavailable,
        EngineError,
        ShuttingDown,
        InternalError,
        ConnectionLost,
    )
}


def from_wire(error: Any) -> SandboxdError:
    """Turn a response's ``error`` field back into the matching exception.

    Tolerant of other servers' shapes: a bare string or a ``[type, message]``
    pair becomes an error too, never a crash.
    """
    if isinstance(error, (list, tuple)) and len(error) >= 2:
        code = error[0].decode("utf-8", "replace") if isinstance(error[0], bytes) else str(error[0])
        message = str(error[1])
        data = error[2] if len(error) > 2 and isinstance(error[2], dict) else None
    else:
        code, message, data = "internal", str(error), None
    cls = ERRORS_BY_CODE.get(code)
    if cls is None:
        err = SandboxdError(message, data)
        err.code = code  # type: ignore[misc]
        return err
    return cls(message, data)
