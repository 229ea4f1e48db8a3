"""Warm pools: sandboxes made before anyone asks, handed out in a few milliseconds.

Owns each ``[[pool]]``'s members: made in the background (at most
``REFILL_CONCURRENCY`` at once for all pools, so refills never crowd out
callers), each with its own uid and a ready agent; recorded in the state
store before their container exists; health-checked (the agent answers a
PING) before one is handed out; taken by exactly one claim (a synchronous pop:
never twice); replaced after each claim or loss; adopted after a restart
(a member row and a running container) and otherwise deleted: a pool
container without its row is never handed out, since nothing proves it was
never used. Members count against no quota and are not sandboxes until
claimed; what a claim does to one (owner, name, labels, deadlines) is the
lifecycle service's. It must not decide what a caller may ask for (the policy
resolves that before) nor touch a claimed sandbox.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import structlog

from sandboxd.backend.base import Backend, ContainerSummary, ImageInfo
from sandboxd.core import status
from sandboxd.core.policy import CreateSpec
from sandboxd.core.records import Caller, SandboxRecord, container_name
from sandboxd.core.settings import PoolSettings
from sandboxd.services.agent import AgentSession
from sandboxd.services.agents import AgentHub
from sandboxd.services.sandboxes import SandboxService
from sandboxd.services.tasks import cancel_and_wait
from sandboxd.wire.errors import Conflict, SandboxdError

log = structlog.get_logger("sandboxd.pool")

REFILL_CONCURRENCY = 2  # members being made at once, all pools together
READY_WAIT = 30.0  # seconds a new member's agent has to answer its first HELLO
HEALTH_PING = 1.0  # seconds a member's agent has to answer the PING before a claim
RETRY_FIRST, RETRY_MAX = 1.0, 60.0  # back-off after a member could not be made
REFILL_DELAY = 0.2  # seconds between a claim and the start of its replacement
# What a claim must match exactly; memory, cpus and pids may differ (the engine's update
# changes them on the running container).
EXACT = ("image", "network", "user", "disk", "workdir", "readonly_rootfs", "runtime",
         "cap_add")


@dataclass
class Member:
    record: SandboxRecord  # pool set; id, uid, container and limits as made
    pool: Pool
    made_at: float = field(default_factory=time.monotonic)
    session: AgentSession | None = None


class Pool:
    """One ``[[pool]]``: its resolved spec, its ready members and its counters."""

    def __init__(self, settings: PoolSettings, spec: CreateSpec) -> None:
        self.name = settings.name or "pool"
        self.size = settings.size
        self.spec = spec
        self.ready: deque[Member] = deque()
        self.starting = 0  # members being made or adopted
        self.claims = 0
        self.misses = 0
        self.failures = 0  # in a row; reset by a member made
        self.retry_at = 0.0

    def matches(self, spec: CreateSpec) -> bool:
        return all(getattr(spec, key) == getattr(self.spec, key) for key in EXACT)

    def exact(self, spec: CreateSpec) -> bool:
        """Whether a claim needs no change of limits."""
        return (spec.memory, spec.cpus, spec.pids) == \
            (self.spec.memory, self.spec.cpus, self.spec.pids)

    def info(self) -> dict[str, Any]:
        return {"image": self.spec.image, "size": self.size, "ready": len(self.ready),
                "starting": self.starting, "claims": self.claims, "misses": self.misses}


class PoolService:
    def __init__(
        self,
        backend: Backend,
        sandboxes: SandboxService,
        agents: AgentHub,
        pools: list[tuple[PoolSettings, CreateSpec]],
    ) -> None:
        self.backend = backend
        self.sandboxes = sandboxes
        self.store = sandboxes.store
        self.agents = agents
        self.pools = [Pool(settings, spec) for settings, spec in pools]
        self.members: dict[str, Member] = {}  # every member known, ready or not
        self._by_name = {pool.name: pool for pool in self.pools}
        self._slots = asyncio.Semaphore(REFILL_CONCURRENCY)
        self._kick = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._work: set[asyncio.Task[None]] = set()
        self._adopting: list[Member] = []  # loaded at start, settled by the first re-list

    # -- start-up and shutdown ---------------------------------------------------

    def load(self) -> int:
        """Take the members a previous daemon recorded (before the first re-list)."""
        for record in self.store.members():
            if record.uid is not None:
                self.sandboxes.uids.take(record.uid)
            pool = self._by_name.get(record.pool or "")
            if pool is None or not _made_for(record, pool.spec):
                self._spawn(self._delete(record, "its pool is no longer configured as it was"))
                continue
            member = Member(record, pool)
            self.members[record.id] = member
            self._adopting.append(member)
            pool.starting += 1
        return len(self._adopting)

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._refill_loop(), name="pool")
        self._kick.set()

    async def stop(self) -> None:
        await cancel_and_wait(self._task)
        self._task = None
        for task in list(self._work):
            task.cancel()
        if self._work:
            await asyncio.gather(*self._work, return_exceptions=True)

    async def remove_all(self) -> None:
        """Delete every member (``cleanup_on_exit``)."""
        await self.stop()
        for member in list(self.members.values()):
            await self._discard(member, "the daemon is cleaning up")

    # -- claims ------------------------------------------------------------------

    async def take(self, spec: CreateSpec) -> Member | None:
        """A healthy member for ``spec``, now its caller's alone; None: no pool has one
        (a miss, counted once on the first pool that fits)."""
        fitting = [pool for pool in self.pools if pool.matches(spec)]
        if not fitting:
            return None
        fitting.sort(key=lambda pool: not pool.exact(spec))  # no update needed: first
        for pool in fitting:
            while pool.ready:
                member = pool.ready.popleft()  # from here no other claim can have it
                # Refill a moment later: making a container takes the host's CPUs, which
                # the claimed sandbox's first commands need now.
                asyncio.get_running_loop().call_later(REFILL_DELAY, self._kick.set)
                session = member.session
                if session is not None and await session.ping(HEALTH_PING):
                    pool.claims += 1
                    del self.members[member.record.id]
                    return member
                log.warning("pool_member_unhealthy", pool=pool.name,
                            sandbox_id=member.record.id)
                self._spawn(self._discard(member, "its agent did not answer"))
        fitting[0].misses += 1
        return None

    async def claim(self, caller: Caller, spec: CreateSpec) -> SandboxRecord | None:
        """``sandbox.create`` from a pool: the caller's new sandbox, or None (a miss: the
        caller makes one cold)."""
        member = await self.take(spec)
        if member is None:
            return None
        record = claim_record(member, caller, spec, time.time())
        try:
            await self.sandboxes.take_over(record, update_limits=not member.pool.exact(spec))
        except Conflict as exc:
            if exc.data and "name" in exc.data:  # refused before anything changed
                self.members[record.id] = member
                member.pool.ready.appendleft(member)
                raise
            self._lost(member, exc.message)
            raise
        except BaseException as exc:
            self._lost(member, f"its claim failed: {exc!r}")
            raise
        return record

    def _lost(self, member: Member, why: str) -> None:
        """A claim failed after the member could have been changed: delete it."""
        self.members[member.record.id] = member
        self._spawn(self._discard(member, why))

    # -- what the engine reports (the reconciler) -----------------------------------

    def holds(self, sid: str) -> bool:
        return sid in self.members

    async def relisted(self, pool_containers: dict[str, ContainerSummary],
                       listed_at: float) -> None:
        """The engine's pool containers (by sandbox id) with no sandbox record, as listed
        at ``listed_at``: members follow them, the rest are deleted."""
        for sid, summary in pool_containers.items():
            member = self.members.get(sid)
            if member is None:
                if summary.id not in self.sandboxes.remover.containers:
                    log.warning("pool_container_unknown", container_id=summary.id[:12])
                    self.sandboxes.remover.delete(summary.id)
                continue
            if member.record.container_id is None:
                member.record.container_id = summary.id
            if member in self._adopting:
                self._adopting.remove(member)
                if summary.state == "running":
                    self._spawn(self._adopt(member))
                else:
                    member.pool.starting -= 1
                    await self._discard(member, f"found {summary.state} at start-up", False)
            elif summary.state != "running" and member.made_at < listed_at \
                    and member.session is not None:
                await self._remove_ready(member, f"its container is {summary.state}")
        for member in list(self.members.values()):
            if member.record.id in pool_containers or member.made_at >= listed_at:
                continue
            if member in self._adopting:
                self._adopting.remove(member)
                member.pool.starting -= 1
                await self._discard(member, "its container is gone", False)
            elif member.session is not None:
                await self._remove_ready(member, "its container is gone")

    async def engine_event(self, sid: str, action: str) -> None:
        member = self.members.get(sid)
        if member is None or member.session is None:
            return  # not a member, or one still being made (its maker sees the failure)
        if action in ("die", "destroy", "pause", "oom"):
            await self._remove_ready(member, f"engine event {action}")

    async def _remove_ready(self, member: Member, why: str) -> None:
        with contextlib.suppress(ValueError):
            member.pool.ready.remove(member)
        self._kick.set()
        await self._discard(member, why)

    # -- daemon.info -------------------------------------------------------------------

    def info(self) -> dict[str, Any]:
        return {pool.name: pool.info() for pool in self.pools}

    # -- making members -----------------------------------------------------------------

    def _spawn(self, work: Any) -> None:
        task = asyncio.get_running_loop().create_task(work)
        self._work.add(task)
        task.add_done_callback(self._work.discard)

    async def _refill_loop(self) -> None:
        while True:
            await self._kick.wait()
            self._kick.clear()
            now = time.monotonic()
            wake_at: float | None = None
            for pool in self.pools:
                if pool.retry_at > now:
                    wake_at = min(wake_at or pool.retry_at, pool.retry_at)
                    continue
                for _ in range(pool.size - len(pool.ready) - pool.starting):
                    pool.starting += 1
                    self._spawn(self._make(pool))
            if wake_at is not None:
                asyncio.get_running_loop().call_later(wake_at - now, self._kick.set)

    async def _make(self, pool: Pool) -> None:
        member: Member | None = None
        try:
            async with self._slots:
                for check in self.sandboxes.admission:  # e.g. the host's disk floor
                    check()
                member = await self._new_member(pool)
                await self._bring_up(member)
        except asyncio.CancelledError:
            pool.starting -= 1  # a member half made is settled at the next start
            raise
        except Exception as exc:
            pool.starting -= 1
            pool.failures += 1
            delay = min(RETRY_FIRST * 2 ** (pool.failures - 1), RETRY_MAX)
            pool.retry_at = time.monotonic() + delay
            error = exc.message if isinstance(exc, SandboxdError) else repr(exc)
            log.warning("pool_member_failed", pool=pool.name, error=error, retry_in=delay)
            if member is not None:
                await self._discard(member, "it could not be made")
            self._kick.set()
            return
        pool.starting -= 1
        pool.failures = 0
        pool.ready.append(member)
        log.info("pool_member_ready", pool=pool.name, sandbox_id=member.record.id,
                 ready=len(pool.ready))

    async def _new_member(self, pool: Pool) -> Member:
        spec = pool.spec
        sandboxes = self.sandboxes
        while (sid := sandboxes.registry.new_id()) in self.members:
            pass
        now = time.time()
        record = SandboxRecord(
            id=sid, name=f"pool-{sid}", image=spec.image, owner_uid=0, owner_gid=0,
            created_at=now, memory=spec.memory, cpus=spec.cpus, pids=spec.pids,
            network=spec.network, workdir=spec.workdir, user=spec.user, disk=spec.disk,
            has_agent=True, pool=pool.name, last_activity_at=now,
        )
        if spec.user is None:
            record.uid = sandboxes.uids.allocate()
        member = Member(record, pool)
        self.members[sid] = member
        await self.store.put_member(record)  # before the container: a crash finds it
        image: ImageInfo | None = None
        with contextlib.suppress(SandboxdError):
            image = await self.backend.image(spec.image)  # its labels, to blank stale ones
        container = sandboxes.container_spec(record, spec, image)
        record.container_id = await self.backend.create(container)
        await self.store.put_member(record)
        return member

    async def _bring_up(self, member: Member) -> None:
        record = member.record
        assert record.container_id is not None
        await self.backend.start(record.container_id)
        record.status = status.RUNNING
        await self._wait_agent(member)

    async def _adopt(self, member: Member) -> None:
        try:
            await self._wait_agent(member)
        except Exception as exc:
            member.pool.starting -= 1
            await self._discard(member, f"adoption failed: {exc}")
            return
        member.pool.starting -= 1
        member.pool.ready.append(member)
        log.info("pool_member_adopted", pool=member.pool.name, sandbox_id=member.record.id)

    async def _wait_agent(self, member: Member) -> None:
        record = member.record
        assert record.container_id is not None
        session = self.agents.open_member(record.id, record.container_id)
        if not await session.wait_ready(READY_WAIT):
            raise SandboxdError(f"its agent did not become ready ({session.error})")
        record.agent = "ready"
        member.session = session

    # -- removing members -----------------------------------------------------------

    async def _discard(self, member: Member, why: str, log_it: bool = True) -> None:
        """Delete a member: out of the pool for good, its container deleted durably."""
        record = member.record
        if self.members.get(record.id) is not member:
            return  # claimed or discarded already
        del self.members[record.id]
        await self._delete(record, why, log_it)

    async def _delete(self, record: SandboxRecord, why: str, log_it: bool = True) -> None:
        if log_it:
            log.info("pool_member_removed", pool=record.pool, sandbox_id=record.id, why=why)
        self.agents.close_id(record.id)
        container = record.container_id or container_name(record.id)
        with contextlib.suppress(SandboxdError):
            await self.backend.kill_now(container)
        try:
            await self.store.begin_member_removal(record.id, container)
        finally:
            self.sandboxes.uids.release(record.uid)
            self.backend.forget(container)
            self.sandboxes.remover.delete(container)



def _made_for(record: SandboxRecord, spec: CreateSpec) -> bool:
    """Whether a member recorded earlier was made with this pool spec."""
    return (record.image, record.memory, record.cpus, record.pids, record.network,
            record.workdir, record.user, record.disk) == \
        (spec.image, spec.memory, spec.cpus, spec.pids, spec.network, spec.workdir,
         spec.user, spec.disk)


def claim_record(member: Member, caller: Caller, spec: CreateSpec, now: float) -> SandboxRecord:
    """The sandbox a claimed member becomes: its container, id and uid; everything its
    caller asked for."""
    base = member.record
    return SandboxRecord(
        id=base.id, name=spec.name or f"sb-{base.id}", image=spec.image,
        owner_uid=caller.uid, owner_gid=caller.gid,
        created_at=now, memory=spec.memory, cpus=spec.cpus, pids=spec.pids,
        network=spec.network, workdir=spec.workdir, labels=dict(spec.labels),
        status=status.RUNNING, expires_at=(now + spec.ttl) if spec.ttl else None,
        idle_timeout=spec.idle_timeout, last_activity_at=now, container_id=base.container_id,
        uid=base.uid, user=spec.user, disk=spec.disk, has_agent=True, agent="ready",
        env=dict(spec.env), pool=base.pool,
    )

