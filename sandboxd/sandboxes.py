"""The sandbox manager: every sandbox's record, lifecycle and ownership.

Owns the set of sandboxes, their names, the owner check (a sandbox of
another user is ``not_found``), quotas, the per-sandbox lock that orders
lifecycle calls, the ttl/idle deadlines (through the one scheduler), and the
glue from a validated call to the engine. It must not parse wire messages
or import aiodocker (the engine adapter does that).
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import structlog

from . import cgroupstats, lifecycle
from .config import Config
from .containerspec import container_config
from .engine import Engine
from .enginestats import summarize as summarize_engine_stats
from .errors import (
    Conflict,
    EngineUnavailable,
    InternalError,
    NotFound,
    PermissionDenied,
    QuotaExceeded,
    SandboxdError,
)
from .execs import BufferedExec, ExecRequest
from .models import Caller, SandboxRecord, container_name
from .policy import CreateSpec, check_env
from .scheduler import DeadlineScheduler
from .state import StateStore
from .units import parse_time

log = structlog.get_logger("sandboxd.sandboxes")

STATS_WINDOW = 0.05  # seconds between two samples when no previous one is fresh
STATS_FRESH = 30.0


EVENT_CMD_BYTES = 512  # an event carries at most this much of a command line


def _summary(cmd: list[str]) -> list[str]:
    """The start of an argv, bounded, for an event (events are kept and sent to many)."""
    out: list[str] = []
    room = EVENT_CMD_BYTES
    for arg in cmd:
        if room <= 0:
            out.append("...")
            break
        out.append(arg[:room])
        room -= len(arg) + 1
    return out


@dataclass
class _StatsState:
    reader: cgroupstats.CgroupReader | None
    started_ns: int | None
    previous: cgroupstats.Sample | None = None
    engine_previous: tuple[float, dict[str, Any]] | None = None


Publisher = Callable[[str, SandboxRecord | None, dict[str, Any]], None]


def _no_publish(kind: str, record: SandboxRecord | None, data: dict[str, Any]) -> None:
    return None


class SandboxManager:
    def __init__(
        self,
        engine: Engine,
        config: Config,
        store: StateStore,
        publish: Publisher = _no_publish,
    ) -> None:
        self.engine = engine
        self.config = config
        self.store = store
        self.publish = publish
        self._by_id: dict[str, SandboxRecord] = {}
        self._by_name: dict[str, str] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._stats: dict[str, _StatsState] = {}
        self._execs: dict[str, set[BufferedExec]] = {}  # running buffered execs per sandbox
        self._execs_by_uid: dict[int, int] = {}
        self._changed: dict[str, float] = {}  # sandbox id -> when we last changed its status
        self.scheduler = DeadlineScheduler(self._on_deadline)

    # registry -------------------------------------------------------------
    def count(self) -> int:
        return len(self._by_id)

    def records(self) -> list[SandboxRecord]:
        return list(self._by_id.values())

    def by_id(self, sid: str) -> SandboxRecord | None:
        return self._by_id.get(sid)

    def changed_since(self, sid: str, moment: float) -> bool:
        """True when this daemon changed the sandbox's status at or after ``moment``."""
        return self._changed.get(sid, -1.0) >= moment

    def mark_changed(self, record: SandboxRecord, processes_changed: bool = False) -> None:
        self._changed[record.id] = time.monotonic()
        if processes_changed:  # died or restarted: its PID 1 (and so its stats source) changed
            self._stats.pop(record.id, None)

    def busy(self, sid: str) -> bool:
        """True while a lifecycle call of ours holds the sandbox (it settles the state)."""
        lock = self._locks.get(sid)
        return lock is not None and lock.locked()

    async def load(self) -> int:
        """Take back every sandbox recorded in the state directory; how many."""
        records = await self.store.open()
        for record in records:
            self.register(record)
        return len(records)

    def register(self, record: SandboxRecord) -> None:
        """Add a known sandbox (adopted at start-up) and arm its deadline."""
        self._by_id[record.id] = record
        self._by_name.setdefault(record.name, record.id)
        self._rearm(record)

    async def forget_vanished(self, record: SandboxRecord, cause: str) -> None:
        """The container is gone (removed behind our back, or while we were down)."""
        self._forget(record)
        await self.store.delete(record.id)
        log.info("sandbox_vanished", sandbox_id=record.id, cause=cause)
        self.publish("sandbox.removed", record, {"cause": cause})

    def lookup(self, caller: Caller, ref: str) -> SandboxRecord:
        record = self._by_id.get(ref)
        if record is None:
            sid = self._by_name.get(ref)
            record = self._by_id.get(sid) if sid else None
        if record is None or not caller.sees(record.owner_uid):
            raise NotFound(f"No sandbox with id or name {ref!r}.", {"id": ref})
        return record

    def list(
        self, caller: Caller, status: str | None, labels: dict[str, str] | None
    ) -> list[SandboxRecord]:
        out = []
        for record in self._by_id.values():
            if not caller.sees(record.owner_uid):
                continue
            if status is not None and record.status != status:
                continue
            if labels and any(record.labels.get(k) != v for k, v in labels.items()):
                continue
            out.append(record)
        out.sort(key=lambda r: r.created_at)
        return out

    def _lock(self, sid: str) -> asyncio.Lock:
        lock = self._locks.get(sid)
        if lock is None:
            lock = self._locks[sid] = asyncio.Lock()
        return lock

    # deadlines ----------------------------------------------------------
    def _next_deadline(self, record: SandboxRecord) -> float | None:
        candidates = []
        if record.expires_at is not None:
            candidates.append(record.expires_at)
        if record.idle_timeout is not None:
            candidates.append(record.last_activity_at + record.idle_timeout)
        return min(candidates) if candidates else None

    def _rearm(self, record: SandboxRecord) -> None:
        self.scheduler.set(record.id, self._next_deadline(record))

    def touch(self, record: SandboxRecord) -> None:
        """Record activity (SPEC §3: exec, files, extend, resume)."""
        record.last_activity_at = time.time()
        self.store.touch(record)
        if record.idle_timeout is not None:
            self._rearm(record)

    async def _on_deadline(self, sid: str) -> None:
        record = self._by_id.get(sid)
        if record is None:
            return
        if record.status == lifecycle.CREATING:
            if not self.busy(sid):  # a create that a crash interrupted
                await self._remove(record, cause="create_interrupted")
            return
        if self._expiry_reason(record) is None:
            self._rearm(record)
            return
        try:
            await self._remove(record, cause="expired", recheck=self._expiry_reason)
        except SandboxdError as exc:
            log.warning("expire_remove_failed", sandbox_id=sid, error=exc.message)
            self.scheduler.set(sid, time.time() + 5.0)  # try again shortly

    def _expiry_reason(self, record: SandboxRecord) -> str | None:
        """Why the sandbox is due now ("ttl" or "idle"), or None when it is not."""
        now = time.time() + 0.001
        if record.expires_at is not None and record.expires_at <= now:
            return "ttl"
        if record.idle_timeout is not None:
            if self._execs.get(record.id):
                self.touch(record)  # a running exec is activity
                return None
            if record.last_activity_at + record.idle_timeout <= now:
                return "idle"
        return None

    # lifecycle ----------------------------------------------------------
    def _check_quota(self, caller: Caller, spec: CreateSpec) -> None:
        quota = self.config.quota
        mine = [r for r in self._by_id.values() if r.owner_uid == caller.uid]
        if quota.max_sandboxes is not None and len(mine) >= quota.max_sandboxes:
            raise QuotaExceeded(
                f"You already have {len(mine)} sandboxes, the most allowed per user; "
                "remove one first.",
                {"limit": quota.max_sandboxes, "used": len(mine)},
            )
        if quota.max_memory is not None:
            used = sum(r.memory for r in mine)
            if used + spec.memory > quota.max_memory:
                raise QuotaExceeded(
                    f"This sandbox's memory would bring your total to {used + spec.memory} bytes, "
                    f"over your limit of {quota.max_memory}.",
                    {"limit": quota.max_memory, "used": used},
                )

    def _new_id(self) -> str:
        while True:
            sid = secrets.token_hex(6)
            if sid not in self._by_id and sid not in self._by_name:
                return sid

    async def create(self, caller: Caller, spec: CreateSpec) -> SandboxRecord:
        self._check_quota(caller, spec)
        sid = self._new_id()
        name = spec.name or f"sb-{sid}"
        if name in self._by_name:
            raise Conflict(
                f"The name {name!r} is already taken by another sandbox.", {"name": name}
            )
        now = time.time()
        record = SandboxRecord(
            id=sid,
            name=name,
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
        )
        # Reserve the id and name before the first await: concurrent creates see them.
        self._by_id[sid] = record
        self._by_name[name] = sid
        async with self._lock(sid):
            try:
                await self.store.put(record)  # a crash from here on is found at start-up
                record.container_id = await self._create_container(record, spec)
                await self.engine.start(record.container_id)
                record.status = lifecycle.RUNNING
                record.last_activity_at = time.time()
                self.mark_changed(record)
                await self.store.put(record)
            except BaseException as exc:
                await asyncio.shield(self._discard_failed(record))
                if isinstance(exc, NotFound):
                    raise NotFound(
                        f"Image {spec.image!r} is not on this host; build or pull it first.",
                        {"image": spec.image, **(exc.data or {})},
                    ) from None
                raise
            self._rearm(record)
        log.info("sandbox_created", sandbox_id=sid, name=name, image=spec.image, owner=caller.uid)
        self.publish("sandbox.created", record, {"image": spec.image})
        return record

    async def _create_container(self, record: SandboxRecord, spec: CreateSpec) -> str:
        """Create the container; a retry after a lost reply finds it by its name."""
        name = container_name(record.id)
        try:
            return await self.engine.create_container(
                name, container_config(record, spec, self.config)
            )
        except Conflict:
            existing = await self.engine.inspect(name)  # same id, same name: ours
            return str(existing["Id"])

    async def _discard_failed(self, record: SandboxRecord) -> None:
        """Undo a failed create: the container (found by its name, in case the create's
        reply was lost) and then the record. When the engine cannot be asked and no
        container is known, the record goes (a container made after all is adopted by
        the next re-list); when a container is known but cannot be removed, the
        sandbox stays listed with status ``error`` so it can be removed later."""
        try:
            await self.engine.remove(record.container_id or container_name(record.id))
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
        record.status = lifecycle.ERROR
        self.publish("sandbox.error", record, {"error": why})
        with contextlib.suppress(Exception):
            await self.store.put(record)

    def _forget(self, record: SandboxRecord) -> None:
        self._by_id.pop(record.id, None)
        if self._by_name.get(record.name) == record.id:
            del self._by_name[record.name]
        self._locks.pop(record.id, None)
        self._stats.pop(record.id, None)
        self._changed.pop(record.id, None)
        for runner in self._execs.pop(record.id, ()):
            runner.abort(f"Sandbox '{record.name}' was removed while the command was running.")
        self.scheduler.set(record.id, None)

    async def pause(self, caller: Caller, ref: str) -> SandboxRecord:
        record = self.lookup(caller, ref)
        async with self._lock(record.id):
            lifecycle.check("pause", record.status, record.name)
            await self._change_status(record, lifecycle.PAUSED, self.engine.pause)
        self.publish("sandbox.paused", record, {})
        return record

    async def resume(self, caller: Caller, ref: str) -> SandboxRecord:
        record = self.lookup(caller, ref)
        async with self._lock(record.id):
            lifecycle.check("resume", record.status, record.name)
            record.last_activity_at = time.time()
            await self._change_status(record, lifecycle.RUNNING, self.engine.unpause)
            self._rearm(record)
        self.publish("sandbox.resumed", record, {})
        return record

    async def _change_status(
        self, record: SandboxRecord, status: str, engine_call: Callable[[str], Awaitable[None]]
    ) -> None:
        """Ask the engine, then record the new status durably (before the reply)."""
        await engine_call(self._cid(record))
        record.status = status
        self.mark_changed(record)
        await self.store.put(record)

    async def extend(self, caller: Caller, ref: str, ttl: float) -> SandboxRecord:
        record = self.lookup(caller, ref)
        lifecycle.check("extend", record.status, record.name)
        max_ttl = self.config.policy.max_ttl
        if max_ttl is not None and (ttl == 0 or ttl > max_ttl):
            raise PermissionDenied(
                f"ttl {ttl:g} is over the policy's maximum of {max_ttl:g} seconds.",
                {"policy": "max_ttl"},
            )
        async with self._lock(record.id):  # ordered with a removal or expiry in progress
            if self._by_id.get(record.id) is not record:
                raise NotFound(f"No sandbox with id or name {ref!r}.", {"id": ref})
            now = time.time()
            record.expires_at = now + ttl if ttl else None
            record.last_activity_at = now
            await self.store.put(record)
            self._rearm(record)
        self.publish("sandbox.extended", record, {"ttl": ttl})
        return record

    async def remove(self, caller: Caller, ref: str) -> None:
        record = self.lookup(caller, ref)
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
        async with self._lock(record.id):
            if self._by_id.get(record.id) is not record:
                return  # removed meanwhile
            if recheck is not None:
                reason = recheck(record)
                if reason is None:
                    self._rearm(record)
                    return
            await self.engine.remove(record.container_id or container_name(record.id))
            self._forget(record)
            await self.store.delete(record.id)
        if reason is not None:
            log.info("sandbox_expired", sandbox_id=record.id, reason=reason)
            self.publish("sandbox.expired", record, {"reason": reason})
        log.info("sandbox_removed", sandbox_id=record.id, cause=cause)
        self.publish("sandbox.removed", record, {"cause": cause})

    async def remove_all(self) -> None:
        for record in list(self._by_id.values()):
            try:
                await self._remove(record, cause="daemon_exit")
            except SandboxdError as exc:
                log.warning("cleanup_remove_failed", sandbox_id=record.id, error=exc.message)

    def _cid(self, record: SandboxRecord) -> str:
        if record.container_id is None:
            raise InternalError("sandbox has no container id")
        return record.container_id

    # stats and exec -----------------------------------------------------
    async def stats(self, caller: Caller, ref: str) -> dict[str, Any]:
        record = self.lookup(caller, ref)
        lifecycle.check("stats", record.status, record.name)
        cid = self._cid(record)
        state = self._stats.get(record.id)
        if state is None:
            state = self._stats[record.id] = await self._stats_source(cid)
        if state.reader is not None:
            try:
                sample = state.reader.sample()
            except OSError:
                state.reader = None  # the container's process changed: use the engine
            else:
                previous, state.previous = state.previous, sample
                return cgroupstats.summarize(sample, previous, state.started_ns)
        return await self._engine_stats(cid, state)

    async def _stats_source(self, cid: str) -> _StatsState:
        info = await self.engine.inspect(cid)
        st = info.get("State") or {}
        started_ns = None
        if st.get("StartedAt"):
            try:
                age = time.time() - parse_time(st["StartedAt"][:26].rstrip("Z") + "Z")
                started_ns = time.monotonic_ns() - int(age * 1e9)
            except ValueError:
                pass
        reader = None
        pid = int(st.get("Pid") or 0)
        if pid > 0:
            try:
                reader = cgroupstats.CgroupReader(pid)
            except (OSError, ValueError):
                log.info("stats_from_engine", container_id=cid)
        return _StatsState(reader=reader, started_ns=started_ns)

    async def _engine_stats(self, cid: str, state: _StatsState) -> dict[str, Any]:
        now = time.monotonic()
        previous = state.engine_previous
        if previous is None or now - previous[0] > STATS_FRESH:
            first = await self.engine.stats_once(cid)
            await asyncio.sleep(STATS_WINDOW)
            previous = (now, first)
        sample = await self.engine.stats_once(cid)
        state.engine_previous = (time.monotonic(), sample)
        return summarize_engine_stats(sample, previous[1])

    async def exec(self, caller: Caller, ref: str, args: dict[str, Any]) -> dict[str, Any]:
        record = self.lookup(caller, ref)
        lifecycle.check("exec", record.status, record.name)
        policy_cap = self.config.policy.max_output
        forced_user = self.config.policy.user
        if forced_user is not None and args.get("user", forced_user) != forced_user:
            raise PermissionDenied(
                f"Commands run as user {forced_user!r} by policy.", {"policy": "user"}
            )
        request = ExecRequest(
            cmd=args["cmd"],
            env=check_env(args.get("env", {})),
            workdir=args.get("workdir"),
            user=args.get("user"),
            stdin=args.get("stdin"),
            timeout=args.get("timeout", self.config.defaults.exec_timeout),
            max_output=min(args.get("max_output", self.config.defaults.max_output), policy_cap),
        )
        running_mine = self._execs_by_uid.get(caller.uid, 0)
        if running_mine >= self.config.quota.max_execs:
            raise QuotaExceeded(
                f"You already have {running_mine} commands running, the most allowed at once; "
                "wait for one to finish.",
                {"limit": self.config.quota.max_execs, "used": running_mine},
            )
        runner = BufferedExec(self.engine, self._cid(record), request)
        self._execs_by_uid[caller.uid] = running_mine + 1
        running = self._execs.setdefault(record.id, set())
        running.add(runner)
        self.touch(record)
        self.publish("exec.started", record, {"cmd": _summary(request.cmd)})
        try:
            result = await runner.run()
        finally:
            self._execs_by_uid[caller.uid] -= 1
            running.discard(runner)
            if record.id in self._by_id:
                self.touch(record)
        self.publish(
            "exec.exited",
            record,
            {"exit_code": result["exit_code"], "timed_out": result["timed_out"]},
        )
        return result
