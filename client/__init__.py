"""sandboxd_client: the Python client library and the ``sandboxctl`` CLI for sandboxd.

This package root owns the public names: the asyncio ``SandboxClient``, the
blocking ``Client``, their sandbox handles, event streams and streamed
processes, the data models, and the error classes re-exported from ``sandboxd.wire.errors`` (so
``except sandboxd_client.NotFound`` works). It must not define anything
itself, nor import aiodocker or any part of the daemon: from ``sandboxd``
only ``sandboxd.wire`` is allowed.

Layout: ``connection`` (the only socket I/O: ``AsyncConnection`` and
``BlockingConnection``) on ``protocol`` (sans-IO routing) and ``channels``
(notification queues, with per-stream lanes for exec output); the typed API
written once in ``_async`` (``client``, ``events``, ``process`` for streamed
execs, ``files`` for chunked transfers, ``pulls`` for image pulls with
progress) and generated into ``_sync`` by ``scripts/unasync.py``; ``models``,
``paths``, ``exceptions``, ``deadlines``; ``cli`` (``sandboxctl``) with
``relay`` (a process to local fds), ``terminal`` (raw mode, SIGWINCH) and
``transfer`` (``cp``).

    async with SandboxClient() as c:
        sb = await c.create(ttl=60)
        r = await sb.exec(["echo", "hi"])
        proc = await sb.start(["cat"], stdin=True)
        out, err = await proc.communicate(b"hi")
        snap = await sb.snapshot("work")  # its filesystem as an image
        fork = await c.create(image=snap.ref)  # a copy of the sandbox

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

from ._async import (
    AsyncClient,
    AsyncEventStream,
    AsyncProcess,
    AsyncSandbox,
    AsyncStreamReader,
    AsyncStreamWriter,
)
from ._sync import (
    BlockingEventStream,
    BlockingProcess,
    BlockingSandbox,
    BlockingStreamReader,
    BlockingStreamWriter,
    Client,
)
from .exceptions import ConnectFailed, UnexpectedReply
from .models import (
    CallerInfo,
    DaemonInfo,
    EngineInfo,
    EnsureResult,
    Event,
    ExecExit,
    ExecInfo,
    ExecResult,
    FileInfo,
    ImageInfo,
    Limits,
    Owner,
    PoolInfo,
    PullProgress,
    Sandbox,
    Snapshot,
    Stats,
    parse_time,
)
from .paths import default_socket_path
from .protocol import NotificationHandler

SandboxClient = AsyncClient
"""The asyncio client (``AsyncClient``): ``async with SandboxClient() as c: ...``."""
EventStream = AsyncEventStream
"""The asyncio event stream that ``SandboxClient.events()`` returns."""

__all__ = [
    "AsyncClient",
    "AsyncEventStream",
    "AsyncProcess",
    "AsyncSandbox",
    "AsyncStreamReader",
    "AsyncStreamWriter",
    "BlockingEventStream",
    "BlockingProcess",
    "BlockingSandbox",
    "BlockingStreamReader",
    "BlockingStreamWriter",
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
    "EnsureResult",
    "Event",
    "EventStream",
    "ExecExit",
    "ExecInfo",
    "ExecResult",
    "FileInfo",
    "ImageInfo",
    "InternalError",
    "InvalidParams",
    "InvalidRequest",
    "Limits",
    "MethodNotFound",
    "NotFound",
    "NotificationHandler",
    "Owner",
    "PermissionDenied",
    "PoolInfo",
    "PullProgress",
    "QuotaExceeded",
    "Sandbox",
    "SandboxClient",
    "SandboxdError",
    "ShuttingDown",
    "Snapshot",
    "Stats",
    "TooLarge",
    "UnexpectedReply",
    "default_socket_path",
    "parse_time",
]
