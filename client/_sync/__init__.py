# GENERATED FILE: do not edit. Written by scripts/unasync.py from client/_async/__init__.py;
# edit that file and run `python scripts/unasync.py` (a test fails when they differ).
"""The typed API on one side: the client, its sandbox handle and the event stream.

This package owns the client's typed methods (``Client``), the sandbox
handle (``BlockingSandbox``), the resuming event stream (``BlockingEventStream``),
the streamed process (``BlockingProcess`` with its stdin writer and output
readers) and the chunked file transfers, all on
``connection.BlockingConnection``. The asyncio
modules are written by hand; ``scripts/unasync.py`` derives the blocking
ones from them (every module but the hand-written ``_compat``), so no
module here may use asyncio directly: what differs between the sides goes
through each side's ``_compat``.
"""

from .client import BlockingSandbox, Client
from .events import BlockingEventStream
from .process import BlockingProcess, BlockingStreamReader, BlockingStreamWriter

__all__ = [
    "BlockingEventStream",
    "BlockingProcess",
    "BlockingSandbox",
    "BlockingStreamReader",
    "BlockingStreamWriter",
    "Client",
]
