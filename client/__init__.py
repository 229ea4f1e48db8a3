"""sandboxd_client: the Python client library and the ``sandboxctl`` CLI for sandboxd.

This package root owns the public names: the asyncio ``SandboxClient``, the
blocking ``Client``, the data models, and the error classes re-exported from
``sandboxd.wire.errors`` (so ``except sandboxd_client.NotFound`` works). It must
not import aiodocker or any part of the daemon: from ``sandboxd`` only
``sandboxd.wire.codec``, ``sandboxd.wire.errors`` and the package root are allowed.

    async with SandboxClient() as c:
        sb = await c.create(ttl=60)
        r = await sb.exec(["echo", "hi"])

    with Client() as c:
        print(c.create(ttl=60).exec(["echo", "hi"]).stdout)
"""

from sandboxd.wire.errors import (
    Conflict,
    ConnectionLost,
    DeadlineExceeded,
    EngineError,
    EngineUnavailable,
    InternalError,
    InvalidParams,
    InvalidRequest,
    MethodNotFound,
    NotFound,
    PermissionDenied,
    QuotaExceeded,
    SandboxdError,
    ShuttingDown,
    TooLarge,
)

from .aio import NotificationHandler, SandboxClient
from .aio import Sandbox as AsyncSandbox
from .blocking import Client
from .blocking import Sandbox as BlockingSandbox
from .events import Event, EventStream
from .exceptions import ConnectFailed, UnexpectedReply
from .models import (
    CallerInfo,
    DaemonInfo,
    EngineInfo,
    ExecResult,
    Limits,
    Owner,
    Sandbox,
    Stats,
    parse_time,
)
from .paths import default_socket_path

__all__ = [
    "AsyncSandbox",
    "BlockingSandbox",
    "CallerInfo",
    "Client",
    "Conflict",
    "ConnectFailed",
    "ConnectionLost",
    "DaemonInfo",
    "DeadlineExceeded",
    "EngineError",
    "EngineInfo",
    "EngineUnavailable",
    "Event",
    "EventStream",
    "ExecResult",
    "InternalError",
    "InvalidParams",
    "InvalidRequest",
    "Limits",
    "MethodNotFound",
    "NotFound",
    "NotificationHandler",
    "Owner",
    "PermissionDenied",
    "QuotaExceeded",
    "Sandbox",
    "SandboxClient",
    "SandboxdError",
    "ShuttingDown",
    "Stats",
    "TooLarge",
    "UnexpectedReply",
    "default_socket_path",
    "parse_time",
]
