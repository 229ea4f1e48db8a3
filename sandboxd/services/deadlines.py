"""Sandbox deadlines: ttl, idle timeout and the create grace, on the one scheduler.

Owns when each sandbox is next due (its ttl deadline, or its last activity
plus its idle timeout), recording activity (SPEC §3: an exec starting,
running or written to, a files call, extend, resume), and deciding whether a
sandbox whose time came is really due (``expiry_reason``: an extend or a
running command that came in between wins). What happens when one is due is
the lifecycle service's callback. It must not call the backend or publish.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable

from sandboxd.core.records import SandboxRecord
from sandboxd.services.registry import Registry
from sandboxd.services.scheduler import DeadlineScheduler


def next_deadline(record: SandboxRecord) -> float | None:
    candidates = []
    if record.expires_at is not None:
        candidates.append(record.expires_at)
    if record.idle_timeout is not None:
        candidates.append(record.last_activity_at + record.idle_timeout)
    return min(candidates) if candidates else None


class Deadlines:
    def __init__(self, registry: Registry, on_due: Callable[[str], Awaitable[None]]) -> None:
        self.registry = registry
        self.scheduler = DeadlineScheduler(on_due)

    def start(self) -> None:
        self.scheduler.start()

    async def stop(self) -> None:
        await self.scheduler.stop()

    def rearm(self, record: SandboxRecord) -> None:
        self.scheduler.set(record.id, next_deadline(record))

    def disarm(self, sid: str) -> None:
        self.scheduler.set(sid, None)

    def at(self, sid: str, when: float) -> None:
        """Be called back for ``sid`` at ``when`` (the create grace, a retry)."""
        self.scheduler.set(sid, when)

    def touch(self, record: SandboxRecord) -> None:
        """Record activity: the idle clock starts again (written behind)."""
        record.last_activity_at = time.time()
        self.registry.store.touch(record)
        if record.idle_timeout is not None:
            self.rearm(record)

    def expiry_reason(self, record: SandboxRecord) -> str | None:
        """Why the sandbox is due now ("ttl" or "idle"), or None when it is not."""
        now = time.time() + 0.001
        if record.expires_at is not None and record.expires_at <= now:
            return "ttl"
        if record.idle_timeout is not None:
            if self.registry.active(record.id):
                self.touch(record)  # a running command is activity
                return None
            if record.last_activity_at + record.idle_timeout <= now:
                return "idle"
        return None
