"""Processes whose caller is gone or gave up: killed, retrying until the engine answers.

Owns the background kills the exec paths hand over: a command whose caller
got an error (the engine went away mid-run, say), was cancelled, or was
answered ``timeout`` by the daemon's own clock while the engine hung. Each is
killed with its whole tree as soon as the engine answers, retried with
back-off for up to ``GIVE_UP`` seconds; a process still starting is killed
once it has started. It never makes anyone wait and must not decide *whether*
to kill (the exec paths do).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable

import structlog

from sandboxd.backend.base import Process
from sandboxd.wire.errors import Conflict, NotFound, SandboxdError

log = structlog.get_logger("sandboxd.reaper")

GIVE_UP = 600.0
FIRST_RETRY = 0.25
MAX_RETRY = 5.0


class Reaper:
    def __init__(self) -> None:
        self._tasks: set[asyncio.Task[None]] = set()

    def kill(self, process: Process | Awaitable[Process], why: str) -> None:
        """Kill ``process`` (or the one ``process`` will give) in the background."""
        task = asyncio.get_running_loop().create_task(self._kill(process, why))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    @property
    def pending(self) -> int:
        return len(self._tasks)

    async def _kill(self, process: Process | Awaitable[Process], why: str) -> None:
        try:
            async with asyncio.timeout(GIVE_UP):
                if not isinstance(process, Process):
                    try:
                        process = await process
                    except SandboxdError:
                        return  # it never started
                delay = FIRST_RETRY
                while True:
                    try:
                        killed = await process.kill_tree()
                    except (NotFound, Conflict):
                        return  # the container is gone, and everything in it
                    except SandboxdError as exc:
                        log.info("reap_retry", why=why, error=exc.message, retry_in=delay)
                        await asyncio.sleep(delay)
                        delay = min(delay * 2, MAX_RETRY)
                        continue
                    log.info("reaped", why=why, processes=killed)
                    return
        except TimeoutError:
            log.warning("reap_gave_up", why=why, after=GIVE_UP)

    async def finish(self, within: float) -> None:
        """Give the kills under way up to ``within`` seconds, then cancel the rest."""
        if not self._tasks:
            return
        _, pending = await asyncio.wait(set(self._tasks), timeout=within)
        for task in pending:
            task.cancel()
