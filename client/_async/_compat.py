"""What the asyncio side does its own way (hand-written; ``scripts/unasync.py`` skips it).

This module owns the few operations that the typed API in ``_async`` needs
and that are asyncio-specific: sleeping, and what a new client does on
construction. Its blocking twin is ``_sync/_compat.py``, with the same names.
It must not hold API logic: anything else belongs in the shared sources.
"""

from __future__ import annotations

import asyncio

from ..connection import AsyncConnection


async def sleep(seconds: float) -> None:
    """Pause this task for ``seconds``."""
    await asyncio.sleep(seconds)


def connect_on_init(conn: AsyncConnection) -> None:
    """Nothing: an asyncio connection opens in ``connect()``, ``async with`` or its first call."""
