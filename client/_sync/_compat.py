"""What the blocking side does its own way (hand-written; ``scripts/unasync.py`` keeps it).

This module owns the blocking versions of the operations listed in
``_async/_compat.py``, with the same names: sleeping, and connecting as soon
as a blocking client is made (so ``Client(path)`` raises ``ConnectFailed``
at once). It must not hold API logic, and must not use asyncio or threads.
"""

from __future__ import annotations

import time

from ..connection import BlockingConnection


def sleep(seconds: float) -> None:
    """Pause this thread for ``seconds``."""
    time.sleep(seconds)


def connect_on_init(conn: BlockingConnection) -> None:
    """Connect now: a blocking client is usable (or has failed) once constructed."""
    conn.connect()
