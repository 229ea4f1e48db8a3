"""What the daemon reports about the engine behind it (``daemon.info``'s ``engine``).

Owns asking the backend for its version within a short bound, so that an
unreachable or hung engine makes ``daemon.info`` say so instead of waiting,
and keeping the answer for a moment: ``daemon.info`` is cheap to poll (a
client watching a pool fill does), and many callers at once share one
question to the engine. A kept answer is used only while the engine's event
stream agrees with it, so an engine that went or came back is seen at once. It must not retry.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

from sandboxd.backend.base import Backend
from sandboxd.wire.errors import SandboxdError

ENGINE_INFO_TIMEOUT = 2.0
KEEP_REACHABLE = 5.0  # seconds an answer from the engine is reused
KEEP_UNREACHABLE = 1.0  # ... and its silence


class EngineInfo:
    def __init__(self, backend: Backend, following: Callable[[], bool]) -> None:
        self.backend = backend
        self.following = following  # the engine's event stream is up (reconcile's view)
        self._answer: dict[str, Any] | None = None
        self._until = 0.0
        self._asking: asyncio.Task[dict[str, Any]] | None = None

    async def __call__(self) -> dict[str, Any]:
        """``{version, api_version, reachable}``; ``reachable`` False when the engine did
        not answer."""
        answer = self._answer
        if answer is not None and time.monotonic() < self._until \
                and answer["reachable"] == self.following():
            return answer  # kept only while the event stream agrees with it
        if self._asking is None or self._asking.done():
            self._asking = asyncio.get_running_loop().create_task(self._ask())
        return await asyncio.shield(self._asking)

    async def _ask(self) -> dict[str, Any]:
        try:
            async with asyncio.timeout(ENGINE_INFO_TIMEOUT):
                version = await self.backend.version()
        except (SandboxdError, TimeoutError):
            answer: dict[str, Any] = {"version": None, "reachable": False}
            keep = KEEP_UNREACHABLE
        else:
            answer = {**version, "reachable": True}
            keep = KEEP_REACHABLE
        self._answer, self._until = answer, time.monotonic() + keep
        return answer
