"""Disk: each sandbox within its ``disk`` limit, and the host's disk above its floor.

Owns the periodic look at disk use. Where the engine's storage has no quota
of its own (``measured``), each running sandbox's writes are measured (RLIMIT_FSIZE
already stops any single file at the limit) and a sandbox over its limit and
still growing is frozen, with ``sandbox.paused {cause: "disk_limit"}``; once
resumed it may delete files, and is frozen again only if it grows. For the
host: while the engine's data root has less free space than the floor,
creates are refused and every sandbox that wrote since the last look is
frozen (``daemon.disk_low``, ``sandbox.paused {cause: "host_disk_low"}``);
those are resumed when the space is back (``daemon.disk_ok``). Measuring
costs a walk of the sandbox's writable layer, so a sandbox with many files
is measured less often (never more than ``COST_SHARE`` of the time); a sandbox
near its limit is measured sooner, by when it would reach it at its last rate
or at ``ASSUMED_RATE`` (``next_look``), so a writer up to that rate, or a
steady faster one, is frozen close to its limit rather than a whole
``check_interval`` of writing past it. It must not remove anything.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any

import structlog

from sandboxd.backend.base import Backend
from sandboxd.core import status
from sandboxd.core.records import SandboxRecord
from sandboxd.core.settings import DiskSettings
from sandboxd.services.registry import Registry
from sandboxd.services.sandboxes import SandboxService
from sandboxd.services.tasks import cancel_and_wait
from sandboxd.wire.errors import QuotaExceeded, SandboxdError

log = structlog.get_logger("sandboxd.disk")

COST_SHARE = 20  # a measurement that took t seconds waits at least 20 t before the next
RECOVERED = 1.1  # free space back above floor x this ends the low-space state
MIN_INTERVAL = 0.02  # the soonest a sandbox racing towards its limit is looked at again
ASSUMED_RATE = 64 * 1024 * 1024  # bytes/s any sandbox might write from one look to the next
SLACK = 1024 * 1024  # over the limit by less: the engine's own files (hostname, hosts) and
# directory blocks, which a file stopped at the limit by RLIMIT_FSIZE does not include
LIMIT = "disk_limit"
HOST_LOW = "host_disk_low"


def soonest(interval: float) -> float:
    """The shortest pause between looks: ``MIN_INTERVAL``, or the interval if shorter."""
    return min(interval, MIN_INTERVAL)


def next_look(
    interval: float, cost: float, used: int, grew_by: int, elapsed: float, limit: int | None
) -> float:
    """Seconds until a sandbox is measured again.

    ``check_interval`` at most, but sooner as it nears its limit: at half the
    time it takes to reach the limit at its last rate (``grew_by`` bytes in
    ``elapsed`` seconds), or at ``ASSUMED_RATE`` when that is faster (a sandbox
    may start writing at any moment); never sooner than ``MIN_INTERVAL`` (or the
    interval, if that is shorter), and never more often than ``COST_SHARE``
    times what one measurement costs.
    """
    delay = interval
    if limit and used <= limit + SLACK:
        rate = grew_by / elapsed if grew_by > 0 and elapsed > 0 else 0.0
        to_limit = (limit + SLACK - used) / max(rate, ASSUMED_RATE)
        delay = max(soonest(interval), min(interval, to_limit / 2))
    return max(delay, COST_SHARE * cost)


class DiskGuard:
    def __init__(
        self, backend: Backend, sandboxes: SandboxService, settings: DiskSettings
    ) -> None:
        self.backend = backend
        self.sandboxes = sandboxes
        self.registry: Registry = sandboxes.registry
        self.settings = settings
        self.enforcement: str | None = None
        self.low = False
        self.free: tuple[int, int] | None = None
        self._used: dict[str, tuple[int, float]] = {}  # sandbox id -> (bytes, when) last look
        self._next: dict[str, float] = {}  # sandbox id -> when to look again
        self._frozen_for_host: set[str] = set()
        self._task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()  # a sandbox started running: look at it soon
        sandboxes.admission.append(self.check_create)
        self.registry.on_status.append(self._status_changed)

    def _status_changed(self, record: SandboxRecord) -> None:
        if record.status == status.RUNNING and record.id not in self._used:
            self._wake.set()

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="disk-guard")

    async def stop(self) -> None:
        await cancel_and_wait(self._task)

    def info(self) -> dict[str, Any]:
        """``daemon.info``'s ``disk``."""
        free, total = self.free or (None, None)
        return {
            "enforcement": self.enforcement,
            "free_bytes": free,
            "total_bytes": total,
            "floor_bytes": self.settings.floor,
            "low": self.low,
        }

    def check_create(self) -> None:
        if self.low:
            free = self.free[0] if self.free else 0
            raise QuotaExceeded(
                f"The host's disk is nearly full ({free} bytes free, below the floor of "
                f"{self.settings.floor}); no sandbox can be created until space is freed.",
                {"limit": "disk_floor", "free_bytes": free},
            )

    async def _run(self) -> None:
        while True:
            try:
                await self.check()
            except asyncio.CancelledError:
                raise
            except SandboxdError as exc:
                log.warning("disk_check_failed", error=exc.message)
            except Exception:
                log.exception("disk_check_failed")
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self._until_due())
            if self._wake.is_set():  # a new sandbox: give it a moment to start writing
                await asyncio.sleep(soonest(self.settings.check_interval))

    def _until_due(self) -> float:
        """Seconds until the next look: the interval, or sooner when a sandbox is due (a
        new one wakes the loop through ``_wake``)."""
        interval = self.settings.check_interval
        if not self._next:
            return interval
        due = min(self._next.values()) - time.monotonic()
        return max(soonest(interval), min(interval, due))

    async def check(self) -> None:
        """One look: the host's free space, then every running sandbox that is due."""
        if self.enforcement is None:
            self.enforcement = await self.backend.disk_enforcement()
        await self._check_host()
        measure_all = self.enforcement == "measured" or self.low
        now = time.monotonic()
        for record in self.registry.records():
            if record.status != status.RUNNING or record.container_id is None:
                continue
            if not measure_all or self._next.get(record.id, 0.0) > now:
                continue
            await self._check_sandbox(record)
        for sid in list(self._used):
            if self.registry.by_id(sid) is None:
                self._used.pop(sid, None)
                self._next.pop(sid, None)

    async def _check_host(self) -> None:
        self.free = self.backend.free_space()
        if self.free is None:
            return
        free = self.free[0]
        if not self.low and free < self.settings.floor:
            self.low = True
            log.warning("host_disk_low", free_bytes=free, floor_bytes=self.settings.floor)
            self.sandboxes.publish("daemon.disk_low", None,
                                   {"free_bytes": free, "floor_bytes": self.settings.floor})
        elif self.low and free >= self.settings.floor * RECOVERED:
            self.low = False
            log.info("host_disk_ok", free_bytes=free)
            self.sandboxes.publish("daemon.disk_ok", None, {"free_bytes": free})
            for sid in list(self._frozen_for_host):
                self._frozen_for_host.discard(sid)
                record = self.registry.by_id(sid)
                if record is not None and record.status == status.PAUSED:
                    try:
                        await self.sandboxes.thaw(record, {"cause": HOST_LOW})
                    except SandboxdError as exc:
                        log.warning("disk_thaw_failed", sandbox_id=sid, error=exc.message)

    async def _check_sandbox(self, record: SandboxRecord) -> None:
        started = time.monotonic()
        try:
            used = await self.backend.disk_usage(record.container_id or "")
        except SandboxdError:
            return  # gone or the engine is away: the next look will tell
        now = time.monotonic()
        last = self._used.get(record.id)
        self._used[record.id] = (used, now)
        limit = record.disk if self.enforcement == "measured" else None
        if last is None:  # the first look: its growth since it was created
            grew_by, elapsed = used, max(0.01, time.time() - record.created_at)
        else:
            grew_by, elapsed = used - last[0], now - last[1]
        self._next[record.id] = now + next_look(
            self.settings.check_interval, now - started, used, grew_by, elapsed, limit
        )
        if last is not None and used <= last[0]:
            return  # not growing
        if self.enforcement == "measured" and record.disk and used > record.disk + SLACK:
            await self._freeze(record, {"cause": LIMIT, "used_bytes": used,
                                        "limit_bytes": record.disk})
        elif self.low and last is not None:
            self._frozen_for_host.add(record.id)
            await self._freeze(record, {"cause": HOST_LOW, "used_bytes": used})

    async def _freeze(self, record: SandboxRecord, data: dict[str, Any]) -> None:
        if record.status != status.RUNNING:
            return
        log.warning("sandbox_frozen_for_disk", sandbox_id=record.id, **data)
        try:
            await self.sandboxes.freeze(record, data)
        except SandboxdError as exc:
            log.warning("disk_freeze_failed", sandbox_id=record.id, error=exc.message)
