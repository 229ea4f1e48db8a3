"""The sandbox lifecycle: create, pause, resume, extend, remove, expire, stats, and adoption.

Owns the steps of every lifecycle call on a sandbox, in order and under the
sandbox's lock: quotas checked, the record written before the engine is
asked (so a crash is found at start-up), the backend called, the new status
recorded through the registry, the deadline re-armed, the event published.
It also applies what the reconciler learns from the engine (``adopt``,
``follow``, ``vanished``), so a status changes in one place whoever saw the
change. It must not parse wire messages or import a concrete backend.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from typing import Any

import structlog

from sandboxd.backend.base import Backend, ContainerSpec, ImageInfo
from sandboxd.core import quotas, status
from sandboxd.core.policy import CreateSpec
from sandboxd.core.records import LABEL_SNAPSHOT_UID, Caller, SandboxRecord, container_name
from sandboxd.core.settings import Defaults, Policy, Quota
from sandboxd.services.deadlines import Deadlines
from sandboxd.services.registry import Registry
from sandboxd.services.remover import Remover
from sandboxd.services.uids import UidPool
from sandboxd.wire.errors import (
    Conflict,
    EngineUnavailable,
    InternalError,
    NotFound,
    PermissionDenied,
    SandboxdError,
)

log = structlog.get_logger("sandboxd.sandboxes")

EXPIRE_RETRY = 5.0  # seconds before an expiry whose removal failed is tried again

Publisher = Callable[[str, SandboxRecord | None, dict[str, Any]], None]


def _no_publish(kind: str, record: SandboxRecord | None, data: dict[str, Any]) -> None:
    return None


def _int_label(labels: dict[str, str], key: str) -> int | None:
    try:
        return int(labels[key]) if key in labels else None
    except ValueError:
        return None


class SandboxService:
    def __init__(
        self,
        backend: Backend,
        registry: Registry,
        *,
        instance: str,
        defaults: Defaults,
        policy: Policy,
        quota: Quota,
        publish: Publisher = _no_publish,
        agent: str | None = None,
    ) -> None:
        self.backend = backend
        self.agent = agent  # the agent binary on the host; None: sandboxes run without it
        self.registry = registry
        self.store = registry.store
        self.instance = instance
        self.policy = policy
        self.quota = quota
        self.publish = publish
        self.deadlines = Deadlines(registry, self._on_deadline)
        self.remover = Remover(backend, registry.store)
        self.uids = UidPool(defaults.uid_min, defaults.uid_max)
        self.admission: list[Callable[[], None]] = []  # checks run before any create
        # Looks at the image a caller asked for (another user's snapshot is not_found);
        # the image when it had to be looked at. Set by the daemon (the image service).
        self.check_image: Callable[[Caller, str], Awaitable[ImageInfo | None]] | None = None
        # Hands out a warm-pool member made for this spec (None: a miss). Set by the
        # daemon when pools are configured.
        self.claim_warm: Callable[[Caller, CreateSpec], Awaitable[SandboxRecord | None]] \
            | None = None

    # -- start-up ------------------------------------------------------------

    async def load(self) -> int:
        """Take back every sandbox recorded in the state directory; how many."""
        records = await self.store.open()
        self.remover.resume()
        for record in records:
            self.registry.register(record)
            self.deadlines.rearm(record)
            if record.uid is not None:
                self.uids.take(record.uid, record.owner_uid)
        return len(records)

    # -- lifecycle -----------------------------------------------------------

    async def create(self, caller: Caller, spec: CreateSpec) -> SandboxRecord:
        quotas.check_create(self.quota, self.registry.owned_by(caller.uid), spec.memory)
        for check in self.admission:
            check()
        image = await self.check_image(caller, spec.image) if self.check_image else None
        if self.claim_warm is not None:
            claimed = await self.claim_warm(caller, spec)
            if claimed is not None:
                return claimed
        prefer_uid = _int_label(image.labels, LABEL_SNAPSHOT_UID) if image else None
        sid = self.registry.new_id()
        now = time.time()
        record = SandboxRecord(
            id=sid,
            name=spec.name or f"sb-{sid}",
            image=spec.image,
            owner_uid=caller.uid,
            owner_gid=caller.gid,
            created_at=now,
            memory=spec.memory,
            cpus=spec.cpus,
            pids=spec.pids,
            network=spec.network,
            workdir=spec.workdir,
            labels=dict(spec.labels),
            expires_at=(now + spec.ttl) if spec.ttl else None,
            idle_timeout=spec.idle_timeout,
            last_activity_at=now,
            user=spec.user,
            disk=spec.disk,
            has_agent=self.agent is not None,
            env=dict(spec.env),
        )
        # Reserve the id and name before the first await: concurrent creates see them.
        self.registry.reserve(record)
        if spec.user is None:
            try:
                record.uid = self.uids.allocate(prefer_uid, caller.uid)
            except SandboxdError:
                self.registry.forget(record)
                raise
        async with self.registry.lock(sid):
            try:
                await self.store.put(record)  # a crash from here on is found at start-up
                record.container_id = await self._create_container(record, spec, image)
                await self.backend.start(record.container_id)
                record.last_activity_at = time.time()
                await self.registry.set_status(record, status.after("start"))
            except BaseException as exc:
                await asyncio.shield(self._discard_failed(record))
                if isinstance(exc, NotFound):
                    raise NotFound(
                        f"Image {spec.image!r} is not on this host; build or pull it first.",
                        {"image": spec.image, **(exc.data or {})},
                    ) from None
                raise
            self.deadlines.rearm(record)
        log.info("sandbox_created", sandbox_id=sid, name=record.name, image=spec.image,
                 owner=caller.uid)
        self.publish("sandbox.created", record, {"image": spec.image})
        return record

    async def take_over(self, record: SandboxRecord, *, update_limits: bool) -> None:
        """Make a claimed warm-pool member ``record``'s sandbox: its name reserved (a taken
        one is refused before anything changes), its limits updated when they differ from
        the pool's, the claim committed, its deadline armed."""
        self.registry.reserve(record)
        self.uids.hand_over(record.uid, record.owner_uid)
        try:
            async with self.registry.lock(record.id):
                if update_limits:
                    await self.backend.update_limits(
                        self._cid(record), record.memory, record.cpus, record.pids)
                await self.store.claim_member(record)
        except BaseException:
            self.registry.forget(record)
            raise
        self.deadlines.rearm(record)
        log.info("sandbox_created", sandbox_id=record.id, name=record.name,
                 image=record.image, owner=record.owner_uid, pool=record.pool)
        self.publish("sandbox.created", record, {"image": record.image, "pool": record.pool})

    def container_spec(self, record: SandboxRecord, spec: CreateSpec,
                        image: ImageInfo | None = None) -> ContainerSpec:
        env = dict(spec.env)
        if record.uid is not None:
            env.setdefault("HOME", spec.workdir)  # its uid has no entry in /etc/passwd
        return ContainerSpec(
            name=container_name(record.id),
            image=spec.image,
            labels=record.container_labels(self.instance, image.labels if image else None),
            hostname=f"sandbox-{record.id[:8]}",
            env=env,
            workdir=spec.workdir,
            user=record.run_as,
            memory=spec.memory,
            cpus=spec.cpus,
            pids=spec.pids,
            network=spec.network,
            readonly_rootfs=spec.readonly_rootfs,
            cap_add=tuple(spec.cap_add),
            disk=spec.disk,
            runtime=spec.runtime,
            workdir_owner=record.uid,
            agent=self.agent,
        )

    async def _create_container(self, record: SandboxRecord, spec: CreateSpec,
                                image: ImageInfo | None) -> str:
        """Create the container; a retry after a lost reply finds it by its name."""
        name = container_name(record.id)
        try:
            return await self.backend.create(self.container_spec(record, spec, image))
        except Conflict:
            existing = await self.backend.inspect(name)  # same id, same name: ours
            return existing.id

    async def _discard_failed(self, record: SandboxRecord) -> None:
        """Undo a failed create: the container (found by its name, in case the create's
        reply was lost) and then the record. When the engine cannot be asked and no
        container is known, the record goes (a container made after all is adopted by
        the next re-list); when a container is known but cannot be removed, the
        sandbox stays listed with status ``error`` so it can be removed later."""
        try:
            await self.backend.remove(record.container_id or container_name(record.id))
        except EngineUnavailable:
            if record.container_id is not None:
                await self._keep_as_error(record, "the engine went away during the create")
                return
        except SandboxdError as exc:
            await self._keep_as_error(record, exc.message)
            return
        self._forget(record)
        await self.store.delete(record.id)

    async def _keep_as_error(self, record: SandboxRecord, why: str) -> None:
        log.warning("create_cleanup_failed", sandbox_id=record.id, error=why)
        with contextlib.suppress(Exception):
            await self.registry.set_status(record, status.after("fail"))
        self.publish("sandbox.error", record, {"error": why})

    def _forget(self, record: SandboxRecord) -> None:
        self.registry.forget(record)
        self.deadlines.disarm(record.id)
        self.uids.release(record.uid)
        if record.container_id is not None:
            self.backend.forget(record.container_id)

    async def pause(self, caller: Caller, ref: str) -> SandboxRecord:
        record = self.registry.lookup(caller, ref)
        await self.freeze(record, {})
        return record

    async def resume(self, caller: Caller, ref: str) -> SandboxRecord:
        record = self.registry.lookup(caller, ref)
        await self.thaw(record, {})
        return record

    async def freeze(self, record: SandboxRecord, data: dict[str, Any]) -> None:
        """Pause the sandbox (for its caller, or for the daemon with ``data.cause``)."""
        async with self.registry.lock(record.id):
            status.check("pause", record.status, record.name)
            await self.backend.pause(self._cid(record))
            await self.registry.set_status(record, status.after("pause"))
        self.publish("sandbox.paused", record, data)

    async def thaw(self, record: SandboxRecord, data: dict[str, Any]) -> None:
        async with self.registry.lock(record.id):
            status.check("resume", record.status, record.name)
            await self.backend.resume(self._cid(record))
            record.last_activity_at = time.time()
            await self.registry.set_status(record, status.after("resume"))
            self.deadlines.rearm(record)
        self.publish("sandbox.resumed", record, data)

    async def extend(self, caller: Caller, ref: str, ttl: float) -> SandboxRecord:
        record = self.registry.lookup(caller, ref)
        status.check("extend", record.status, record.name)
        max_ttl = self.policy.max_ttl
        if max_ttl is not None and (ttl == 0 or ttl > max_ttl):
            raise PermissionDenied(
                f"ttl {ttl:g} is over the policy's maximum of {max_ttl:g} seconds.",
                {"policy": "max_ttl"},
            )
        async with self.registry.lock(record.id):  # ordered with a removal or expiry
            if not self.registry.holds(record):
                raise NotFound(f"No sandbox with id or name {ref!r}.", {"id": ref})
            now = time.time()
            record.expires_at = now + ttl if ttl else None
            record.last_activity_at = now
            await self.store.put(record)
            self.deadlines.rearm(record)
        self.publish("sandbox.extended", record, {"ttl": ttl})
        return record

    async def remove(self, caller: Caller, ref: str) -> None:
        record = self.registry.lookup(caller, ref)
        await self._remove(record, cause="requested")

    async def _remove(
        self,
        record: SandboxRecord,
        cause: str,
        recheck: Callable[[SandboxRecord], str | None] | None = None,
    ) -> None:
        """Remove the container and forget the sandbox. ``recheck`` (for expiry) is asked
        again once the sandbox's lock is held: an extend that came in between wins."""
        reason = None
        async with self.registry.lock(record.id):
            if not self.registry.holds(record):
                return  # removed meanwhile
            if recheck is not None:
                reason = recheck(record)
                if reason is None:
                    self.deadlines.rearm(record)
                    return
            # Gone for its user at once: killed, its row turned into a removal row, then
            # forgotten; the engine deletes the container in the background (durably).
            container = record.container_id or container_name(record.id)
            if not await self.backend.kill_now(container):
                await self.backend.remove(container)  # could not kill here: the slow way
            await self.store.begin_removal(record.id, container)
            self._forget(record)
            self.remover.delete(container)  # no await since the forget: never adopted
        if reason is not None:
            log.info("sandbox_expired", sandbox_id=record.id, reason=reason)
            self.publish("sandbox.expired", record, {"reason": reason})
        log.info("sandbox_removed", sandbox_id=record.id, cause=cause)
        self.publish("sandbox.removed", record, {"cause": cause})

    async def remove_all(self, on_progress: Callable[[int], None] | None = None) -> None:
        """Remove every sandbox (``cleanup_on_exit``); ``on_progress(left)`` after each."""
        records = self.registry.records()
        for done, record in enumerate(records, start=1):
            try:
                await self._remove(record, cause="daemon_exit")
                await self.remover.flush()
            except SandboxdError as exc:
                log.warning("cleanup_remove_failed", sandbox_id=record.id, error=exc.message)
            if on_progress is not None:
                on_progress(len(records) - done)

    async def _on_deadline(self, sid: str) -> None:
        record = self.registry.by_id(sid)
        if record is None:
            return
        if record.status == status.CREATING:
            if not self.registry.busy(sid):  # a create that a crash interrupted
                await self._remove(record, cause="create_interrupted")
            return
        if self.deadlines.expiry_reason(record) is None:
            self.deadlines.rearm(record)
            return
        try:
            await self._remove(record, cause="expired", recheck=self.deadlines.expiry_reason)
        except SandboxdError as exc:
            log.warning("expire_remove_failed", sandbox_id=sid, error=exc.message)
            self.deadlines.at(sid, time.time() + EXPIRE_RETRY)

    def _cid(self, record: SandboxRecord) -> str:
        if record.container_id is None:
            raise InternalError("sandbox has no container id")
        return record.container_id

    async def stats(self, caller: Caller, ref: str) -> dict[str, Any]:
        record = self.registry.lookup(caller, ref)
        status.check("stats", record.status, record.name)
        return await self.backend.stats(self._cid(record))

    # -- what the engine reports (the reconciler) ------------------------------

    async def adopt(self, record: SandboxRecord, create_grace: float) -> None:
        """Take in a sandbox found on the engine with no record of ours."""
        self.registry.register(record)
        if record.uid is not None:
            self.uids.take(record.uid, record.owner_uid)
        await self.store.put(record)
        if record.status == status.CREATING:  # created, never started: a create cut short
            self.deadlines.at(record.id, record.created_at + create_grace)
        else:
            self.deadlines.rearm(record)

    async def follow(
        self,
        record: SandboxRecord,
        engine_state: str,
        *,
        create_grace: float,
        died: Callable[[], Awaitable[dict[str, Any]]] | None = None,
    ) -> None:
        """Bring ``record`` to the engine's state, publishing what changed behind our back.

        ``died`` gives the data of a ``sandbox.died`` event (exit code, oom) when needed.
        """
        change = status.follow(record.status, engine_state)
        if change.await_grace:
            self.deadlines.at(record.id, record.created_at + create_grace)
            return
        if not change.changed:
            return
        await self.registry.set_status(record, change.status)
        if change.processes_changed and record.container_id is not None:
            self.backend.forget(record.container_id)
        if change.event is None:
            self.deadlines.rearm(record)  # a create whose reply was lost: now running
            return
        data: dict[str, Any] = {"cause": "external"}
        if change.event == "sandbox.died" and died is not None:
            data.update(await died())
        self.publish(change.event, record, data)

    async def vanished(self, record: SandboxRecord, cause: str) -> None:
        """The container is gone (removed behind our back, or while we were down)."""
        self._forget(record)
        await self.store.delete(record.id)
        log.info("sandbox_vanished", sandbox_id=record.id, cause=cause)
        self.publish("sandbox.removed", record, {"cause": cause})

