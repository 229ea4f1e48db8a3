"""Keeping the daemon's view and the engine's in step: adoption, drift and engine events.

Owns start-up adoption (every container labelled with this daemon's
instance is taken back with its record, or rebuilt from its labels when no
record survived), the periodic and on-reconnect re-listing that catches
what the engine's event stream dropped, and the translation of engine events
(pause, unpause, die, oom, destroy, start) made behind the daemon's back into
status changes and events with ``cause: "external"``. The ``EngineWatcher``
follows the engine, reconnecting with back-off. It must not create, pause or
remove sandboxes on a caller's behalf.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import structlog

from . import lifecycle
from .engine import Engine
from .errors import SandboxdError
from .models import (
    LABEL_CREATED_AT,
    LABEL_EXPIRES_AT,
    LABEL_ID,
    LABEL_IDLE_TIMEOUT,
    LABEL_INSTANCE,
    LABEL_NAME,
    LABEL_OWNER,
    LABEL_USER_PREFIX,
    SandboxRecord,
)
from .sandboxes import SandboxManager
from .tasks import cancel_and_wait
from .units import parse_time

log = structlog.get_logger("sandboxd.reconcile")

CREATE_GRACE = 30.0  # a container still "created" this long after its create was cut short
RELIST_INTERVAL = 30.0
_ENGINE_STATUS = {
    "running": lifecycle.RUNNING,
    "paused": lifecycle.PAUSED,
    "exited": lifecycle.STOPPED,
    "dead": lifecycle.STOPPED,
    "created": lifecycle.CREATING,
    "restarting": lifecycle.RUNNING,
    "removing": lifecycle.STOPPED,
}
EXTERNAL = {"cause": "external"}
FOLLOWED_ACTIONS = ["pause", "unpause", "die", "oom", "destroy", "start"]


def record_from_container(summary: dict[str, Any]) -> SandboxRecord | None:
    """Rebuild a record from a container's labels (when no state row survived)."""
    labels: dict[str, str] = summary.get("Labels") or {}
    sid = labels.get(LABEL_ID)
    if not sid:
        return None
    try:
        uid, gid = (int(x) for x in labels.get(LABEL_OWNER, "0:0").split(":", 1))
        created = (
            parse_time(labels[LABEL_CREATED_AT]) if LABEL_CREATED_AT in labels else time.time()
        )
        expires = parse_time(labels[LABEL_EXPIRES_AT]) if LABEL_EXPIRES_AT in labels else None
        idle = float(labels[LABEL_IDLE_TIMEOUT]) if LABEL_IDLE_TIMEOUT in labels else None
    except ValueError:
        return None
    host = summary.get("HostConfig") or {}
    return SandboxRecord(
        id=sid,
        name=labels.get(LABEL_NAME) or f"sb-{sid}",
        image=str(summary.get("Image") or ""),
        owner_uid=uid,
        owner_gid=gid,
        created_at=created,
        memory=int(host.get("Memory") or 0),
        cpus=float(host.get("NanoCpus") or 0) / 1e9,
        pids=int(host.get("PidsLimit") or 0),
        network=str(host.get("NetworkMode") or "none"),
        workdir=str((summary.get("Config") or {}).get("WorkingDir") or "/"),
        labels={
            k[len(LABEL_USER_PREFIX) :]: v
            for k, v in labels.items()
            if k.startswith(LABEL_USER_PREFIX)
        },
        status=_ENGINE_STATUS.get(str(summary.get("State")), lifecycle.ERROR),
        expires_at=expires,
        idle_timeout=idle,
        last_activity_at=time.time(),
        container_id=str(summary.get("Id")),
    )


class Reconciler:
    def __init__(
        self,
        manager: SandboxManager,
        engine: Engine,
        instance: str,
        create_grace: float = CREATE_GRACE,
    ) -> None:
        self.manager = manager
        self.engine = engine
        self.create_grace = create_grace
        self.label = f"{LABEL_INSTANCE}={instance}"
        self._oom: set[str] = set()  # sandboxes whose OOM event came before their death

    async def reconcile(self) -> None:
        """Compare every record with the engine's containers and settle differences."""
        m = self.manager
        listed_at = time.monotonic()
        containers = await self.engine.list_labelled(self.label)
        found = {c.get("Labels", {}).get(LABEL_ID): c for c in containers}
        for record in m.records():
            if m.by_id(record.id) is not record or m.busy(record.id):
                continue  # removed meanwhile, or one of our own calls is changing it now
            if m.changed_since(record.id, listed_at):
                found.pop(record.id, None)
                continue  # we changed it after the list was taken: the list is stale for it
            summary = found.pop(record.id, None)
            if summary is None:
                # Never made (a crash before the engine's create), or removed behind our back.
                cause = "create_interrupted" if record.status == lifecycle.CREATING else "external"
                await m.forget_vanished(record, cause)
                continue
            if record.container_id is None:
                record.container_id = str(summary.get("Id"))
            await self._settle(record, str(summary.get("State")), None)
        for sid, summary in found.items():
            if sid is None or m.by_id(sid) is not None:
                continue
            adopted = await self._adopt_unknown(summary)
            if adopted is not None:
                log.info("sandbox_adopted_from_labels", sandbox_id=adopted.id)

    async def _adopt_unknown(self, summary: dict[str, Any]) -> SandboxRecord | None:
        try:
            detail = await self.engine.inspect(str(summary.get("Id")))
        except SandboxdError:
            return None
        merged = {
            **summary,
            "HostConfig": detail.get("HostConfig"),
            "Config": detail.get("Config"),
            "Image": (detail.get("Config") or {}).get("Image") or summary.get("Image"),
        }
        record = record_from_container(merged)
        if record is None:
            return None
        self.manager.register(record)
        await self.manager.store.put(record)
        if record.status == lifecycle.CREATING:  # created, never started: a create cut short
            self.manager.scheduler.set(record.id, record.created_at + self.create_grace)
        return record

    async def _settle(
        self, record: SandboxRecord, engine_state: str, event: dict[str, Any] | None
    ) -> None:
        """Bring ``record`` to the engine's state, publishing what changed."""
        m = self.manager
        new = _ENGINE_STATUS.get(engine_state, lifecycle.ERROR)
        old = record.status
        if old == lifecycle.CREATING:
            if new == lifecycle.CREATING:
                # Created but never started: a create cut short. Remove it after a grace.
                m.scheduler.set(record.id, record.created_at + self.create_grace)
                return
            if new == lifecycle.RUNNING:
                record.status = lifecycle.RUNNING  # started, but the reply never got written
                await m.store.put(record)
                m.register(record)
                return
        if new == old:
            return
        record.status = new
        m.mark_changed(record, processes_changed=lifecycle.STOPPED in (old, new))
        await m.store.put(record)
        if new == lifecycle.PAUSED:
            m.publish("sandbox.paused", record, dict(EXTERNAL))
        elif new == lifecycle.RUNNING and old == lifecycle.PAUSED:
            m.publish("sandbox.resumed", record, dict(EXTERNAL))
        elif new == lifecycle.STOPPED:
            data: dict[str, Any] = dict(EXTERNAL)
            oom = record.id in self._oom
            if event is not None:
                attrs = (event.get("Actor") or {}).get("Attributes") or {}
                if "exitCode" in attrs:
                    data["exit_code"] = int(attrs["exitCode"])
            else:
                try:
                    state = (await self.engine.inspect(record.container_id or "")).get(
                        "State"
                    ) or {}
                    data["exit_code"] = state.get("ExitCode")
                    oom = oom or bool(state.get("OOMKilled"))
                except SandboxdError:
                    pass
            data["oom_killed"] = oom
            self._oom.discard(record.id)
            m.publish("sandbox.died", record, data)

    async def on_event(self, event: dict[str, Any]) -> None:
        """One engine event for one of our containers."""
        action = str(event.get("Action") or event.get("status") or "")
        attrs = (event.get("Actor") or {}).get("Attributes") or {}
        sid = attrs.get(LABEL_ID)
        m = self.manager
        record = m.by_id(sid) if sid else None
        if record is None or m.busy(record.id):
            return  # not ours (any more), or our own call in flight will settle it
        if action == "oom":
            self._oom.add(record.id)
            m.publish("sandbox.oom", record, dict(EXTERNAL))
        elif action == "pause":
            await self._settle(record, "paused", event)
        elif action == "unpause" or action == "start":
            await self._settle(record, "running", event)
        elif action == "die":
            await self._settle(record, "exited", event)
        elif action == "destroy":
            await m.forget_vanished(record, "external")


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
        log.info("engine_synced", sandboxes=r.manager.count())
        relist = asyncio.get_running_loop().create_task(self._relist_forever())
        try:
            async for event in r.engine.events(r.label, FOLLOWED_ACTIONS, since=since):
                try:
                    await r.on_event(event)
                except SandboxdError as exc:
                    log.warning("engine_event_failed", error=exc.message)
        finally:
            relist.cancel()

    async def _relist_forever(self) -> None:
        while True:
            await asyncio.sleep(self.relist_interval)
            try:
                await self.reconciler.reconcile()
            except SandboxdError as exc:
                log.warning("relist_failed", error=exc.message)

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
