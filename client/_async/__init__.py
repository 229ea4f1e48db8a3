"""The typed API on one side: the client, its sandbox handle and the event stream.

This package owns the client's typed methods (``AsyncClient``), the sandbox
handle (``AsyncSandbox``), the resuming event stream (``AsyncEventStream``),
the streamed process (``AsyncProcess`` with its stdin writer and output
readers) and the chunked file transfers, all on
``connection.AsyncConnection``. The asyncio
modules are written by hand; ``scripts/unasync.py`` derives the blocking
ones from them (every module but the hand-written ``_compat``), so no
module here may use asyncio directly: what differs between the sides goes
through each side's ``_compat``.
"""

from .client import AsyncClient, AsyncSandbox
from .events import AsyncEventStream
from .process import AsyncProcess, AsyncStreamReader, AsyncStreamWriter

__all__ = [
    "AsyncClient",
    "AsyncEventStream",
    "AsyncProcess",
    "AsyncSandbox",
    "AsyncStreamReader",
    "AsyncStreamWriter",
]
