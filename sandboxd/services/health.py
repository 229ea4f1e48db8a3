"""What the daemon reports about the engine behind it (``daemon.info``'s ``engine``).

Owns asking the backend for its version within a short bound, so that an
unreachable or hung engine makes ``daemon.info`` say so instead of waiting.
It must not cache or retry.
"""

from __future__ import annotations

import asyncio
from typing import Any

from sandboxd.backend.base import Backend
from sandboxd.wire.errors import SandboxdError

ENGINE_INFO_TIMEOUT = 2.0


async def engine_info(backend: Backend) -> dict[str, Any]:
    """``{version, api_version, reachable}``; ``reachable`` False when it did not answer."""
    try:
        async with asyncio.timeout(ENGINE_INFO_TIMEOUT):
            version = await backend.version()
    except (SandboxdError, TimeoutError):
        return {"version": None, "reachable": False}
    return {**version, "reachable": True}
