"""Keeping the daemon's view and the engine's in step: adoption, drift and engine events.

Owns start-up adoption (every container labelled with this daemon's
instance is taken back with its record, or rebuilt from its labels when no
record survived; unclaimed warm-pool containers are handed to the pool),
the periodic and on-reconnect re-listing that catches what the engine's
event stream dropped, and reading engine events (pause,
unpause, die, oom, destroy, start) made behind the daemon's back. What a
change does to a sandbox is the lifecycle service's (``adopt``, ``follow``,
``vanished``); this module only observes and reports. The ``EngineWatcher``
follows the engine, reconnecting with back-off; its re-list loop survives
any failure (logged, retried). It must not create, pause or remove sandboxes
on a caller's behalf, nor write the store or the deadlines itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any

import structlog

from sandboxd.backend.base import Backend, ContainerEvent, ContainerSummary
from sandboxd.core import status
from sandboxd.core.records import (
    LABEL_ID,
    LABEL_INSTANCE,
    LABEL_POOL,
    SandboxRecord,
    record_from_labels,
)
from sandboxd.services.pool import PoolService
from sandboxd.services.sandboxes import SandboxService
from sandboxd.services.tasks import cancel_and_wait
from sandboxd.wire.errors import SandboxdError

log = structlog.get_logger("sandboxd.reconcile")

CREATE_GRACE = 30.0  # a container still "created" this long after its create was cut short
RELIST_INTERVAL = 30.0
RELIST_RETRY = 1.0  # seconds before a failed re-list is tried again


class Reconciler:
    def __init__(
        self,
        sandboxes: SandboxService,
        backend: Backend,
        instance: str,
        create_grace: float = CREATE_GRACE,
        pool: PoolService | None = None,
    ) -> None:
        self.sandboxes = sandboxes
        self.pool = pool
        self.registry = sandboxes.registry
        self.backend = backend
        self.create_grace = create_grace
        self.label = f"{LABEL_INSTANCE}={instance}"
        # Sandboxes whose main process was found dead right after an OOM kill: their death
        # is that OOM. An OOM kill that took only a command's child is not.
        self._oom_deaths: set[str] = set()

    async def reconcile(self) -> None:
        """Compare every record with the engine's containers and settle differences."""
        reg = self.registry
        listed_at = time.monotonic()
        containers = await self.backend.list(self.label)
        found = {c.labels.get(LABEL_ID): c for c in containers}
        for record in reg.records():
            if not reg.holds(record) or reg.busy(record.id):
                continue  # removed meanwhile, or one of our own calls is changing it now
            if reg.changed_since(record.id, listed_at):
                found.pop(record.id, None)
                continue  # we changed it after the list was taken: the list is stale for it
            summary = found.pop(record.id, None)
            if summary is None:
                # Never made (a crash before the engine's create), or removed behind our back.
                cause = "create_interrupted" if record.status == status.CREATING else "external"
                await self.sandboxes.vanished(record, cause)
                continue
            if record.container_id is None:
                record.container_id = summary.id
            await self._follow(record, summary.state, None)
        removing = self.sandboxes.remover.containers
        pooled: dict[str, ContainerSummary] = {}
        for sid, summary in found.items():
            if sid is None or reg.by_id(sid) is not None or summary.id in removing:
                continue  # not a sandbox, known, or being deleted
            if summary.labels.get(LABEL_POOL):
                pooled[sid] = summary  # an unclaimed warm-pool member: the pool's
                continue
            adopted = await self._adopt_unknown(summary.id)
            if adopted is not None:
                log.info("sandbox_adopted_from_labels", sandbox_id=adopted.id)
        if self.pool is not None:
            await self.pool.relisted(pooled, listed_at)

    async def _adopt_unknown(self, container_id: str) -> SandboxRecord | None:
        try:
            info = await self.backend.inspect(container_id)
        except SandboxdError:
            return None
        record = record_from_labels(
            info.labels,
            container_id=info.id,
            image=info.image,
            status=status.from_engine(info.state),
            memory=info.memory,
            cpus=info.cpus,
            pids=info.pids,
            network=info.network,
            workdir=info.workdir,
            user=info.user,
            now=time.time(),
        )
        if record is None:
            return None
        await self.sandboxes.adopt(record, self.create_grace)
        return record

    async def _follow(
        self, record: SandboxRecord, engine_state: str, event: ContainerEvent | None
    ) -> None:
        async def died() -> dict[str, Any]:
            data: dict[str, Any] = {"oom_killed": record.id in self._oom_deaths}
            self._oom_deaths.discard(record.id)
            exit_code = event.exit_code if event is not None else None
            if event is None:
                with contextlib.suppress(SandboxdError):
                    exit_code = (await self.backend.inspect(record.container_id or "")).exit_code
            if exit_code is not None:
                data["exit_code"] = exit_code
            return data

        await self.sandboxes.follow(
            record, engine_state, create_grace=self.create_grace, died=died
        )

    async def on_event(self, event: ContainerEvent) -> None:
        """One engine event for one of our containers."""
        sid = event.labels.get(LABEL_ID)
        record = self.registry.by_id(sid) if sid else None
        if record is None and sid and self.pool is not None and self.pool.holds(sid):
            await self.pool.engine_event(sid, event.action)
            return
        if record is None or self.registry.busy(record.id):
            return  # not ours (any more), or our own call in flight will settle it
        if event.action == "oom":
            # Was it the sandbox's main process? Ask the host now: the engine's "die" may
            # come later, and a command's child being killed leaves the main one alive.
            with contextlib.suppress(SandboxdError):
                if not await self.backend.main_process_alive(record.container_id or ""):
                    self._oom_deaths.add(record.id)
            self.sandboxes.publish("sandbox.oom", record, {"cause": "external"})
        elif event.action == "pause":
            await self._follow(record, "paused", event)
        elif event.action in ("unpause", "start"):
            await self._follow(record, "running", event)
        elif event.action == "die":
            await self._follow(record, "exited", event)
        elif event.action == "destroy":
            await self.sandboxes.vanished(record, "external")


class EngineWatcher:
    """Follows the engine's event stream; re-lists on every (re)connect and periodically."""

    def __init__(self, reconciler: Reconciler, relist_interval: float = RELIST_INTERVAL) -> None:
        self.reconciler = reconciler
        self.relist_interval = relist_interval
        self.reachable = False
        self.synced = asyncio.Event()  # set after the first successful re-list
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        await cancel_and_wait(self._task)
        self._task = None

    async def _follow(self) -> None:
        r = self.reconciler
        since = time.time() - 1.0
        await r.reconcile()
        self.reachable = True
        self.synced.set()
        log.info("engine_synced", sandboxes=r.registry.count())
        relist = asyncio.get_running_loop().create_task(self.relist_forever())
        try:
            async for event in r.backend.watch(r.label, since=since):
                try:
                    await r.on_event(event)
                except SandboxdError as exc:
                    log.warning("engine_event_failed", error=exc.message)
        finally:
            await cancel_and_wait(relist)

    async def relist_forever(self) -> None:
        """Re-list every ``relist_interval``; a failure of any kind is logged and retried."""
        delay = self.relist_interval
        while True:
            await asyncio.sleep(delay)
            try:
                await self.reconciler.reconcile()
            except asyncio.CancelledError:
                raise
            except SandboxdError as exc:
                log.warning("relist_failed", error=exc.message)
                delay = min(RELIST_RETRY, self.relist_interval)
            except Exception:
                log.exception("relist_failed")
                delay = min(RELIST_RETRY, self.relist_interval)
            else:
                delay = self.relist_interval

    async def _run(self) -> None:
        backoff = 0.1
        while True:
            try:
                await self._follow()
                log.warning("engine_event_stream_ended")
            except asyncio.CancelledError:
                raise
            except SandboxdError as exc:
                if self.reachable or backoff == 0.1:
                    log.warning("engine_unreachable", error=exc.message)
            except Exception:
                log.exception("engine_watch_failed")
            else:
                backoff = 0.1
            self.reachable = False
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 2.0)
