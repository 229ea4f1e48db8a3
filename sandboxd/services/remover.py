"""Deleting removed sandboxes' containers in the background, durably.

Owns the engine's part of a removal: once a sandbox is gone for its user
(killed, forgotten, its row replaced by a removal row in the state store, its
reply sent), its container is deleted here, retried with back-off while the
engine is away, and the removal row dropped only when the container is gone.
At start-up the rows a previous daemon left are taken up again, so a SIGKILL
between the reply and the deletion still ends with the container deleted. It
must not decide what to remove.
"""

from __future__ import annotations

import asyncio

import structlog

from sandboxd.backend.base import Backend
from sandboxd.store.state import StateStore
from sandboxd.wire.errors import SandboxdError

log = structlog.get_logger("sandboxd.remover")

RETRY_FIRST, RETRY_MAX = 0.5, 10.0


class Remover:
    def __init__(self, backend: Backend, store: StateStore) -> None:
        self.backend = backend
        self.store = store
        self.containers: set[str] = set()  # being deleted: not to be adopted
        self._tasks: set[asyncio.Task[None]] = set()

    def resume(self) -> None:
        """Take up the deletions a previous daemon did not finish."""
        for container, sid in self.store.pending_removals():
            log.info("removal_resumed", container_id=container, sandbox_id=sid)
            self.delete(container)

    def delete(self, container: str) -> None:
        if container in self.containers:
            return
        self.containers.add(container)
        task = asyncio.get_running_loop().create_task(self._delete(container))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _delete(self, container: str) -> None:
        delay = RETRY_FIRST
        while True:
            try:
                await self.backend.remove(container)
                await self.store.end_removal(container)
                self.containers.discard(container)
                return
            except SandboxdError as exc:
                log.info("removal_retry", container_id=container, error=exc.message,
                         retry_in=delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, RETRY_MAX)

    async def flush(self, within: float | None = None) -> None:
        """Wait for the deletions under way (``within`` seconds at most)."""
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=within)

    async def finish(self, within: float) -> None:
        """At shutdown: let the deletions under way finish within ``within`` seconds,
        then stop; what is left is taken up at the next start."""
        await self.flush(within)
        await self.stop()

    async def stop(self) -> None:
        """Stop deleting; what is left is taken up at the next start."""
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
