"""Every sandbox's agent session: opened when it runs, closed when it stops or goes.

Owns the map from sandbox to ``AgentSession``: a sandbox made with the agent
gets a session once it is running (created, adopted at start-up, or started
again), the session's state is mirrored on the record (``Sandbox.agent``:
starting, ready, unavailable), and the session is closed when the sandbox
stops or is removed. A warm-pool member's session is opened by the pool and
passes to the sandbox that claims it. It must not run commands itself (``execs``, ``streams``
and ``files`` use the sessions).
"""

from __future__ import annotations

import asyncio

import structlog

from sandboxd.backend.base import Backend
from sandboxd.core import status
from sandboxd.core.records import SandboxRecord
from sandboxd.services.agent import FAILED, READY, STARTING, UNAVAILABLE, AgentSession
from sandboxd.services.registry import Registry
from sandboxd.services.sandboxes import Publisher

log = structlog.get_logger("sandboxd.agents")

_WIRE = {STARTING: "starting", READY: "ready", UNAVAILABLE: "unavailable", FAILED: "unavailable"}


class AgentHub:
    def __init__(self, backend: Backend, registry: Registry, publish: Publisher) -> None:
        self.backend = backend
        self.registry = registry
        self.publish = publish
        self._sessions: dict[str, AgentSession] = {}
        self._closing: set[asyncio.Task[None]] = set()
        registry.on_forget.append(self.close)

    def session(self, sid: str) -> AgentSession | None:
        return self._sessions.get(sid)

    def open(self, record: SandboxRecord) -> None:
        """Start (or keep) the session of a running sandbox that has the agent."""
        if not record.has_agent or record.container_id is None:
            return
        if record.id in self._sessions or record.status not in (status.RUNNING, status.PAUSED):
            return
        session = AgentSession(self.backend, record.container_id, record.id, self._changed)
        self._sessions[record.id] = session
        record.agent = "starting"
        session.start()

    def open_all(self) -> None:
        for record in self.registry.records():
            self.open(record)

    def open_member(self, sid: str, container_id: str) -> AgentSession:
        """The session of a warm-pool member (no record yet: its claim keeps the session,
        found by the same id)."""
        session = self._sessions.get(sid)
        if session is None:
            session = AgentSession(self.backend, container_id, sid, self._changed)
            self._sessions[sid] = session
            session.start()
        return session

    def close(self, record: SandboxRecord) -> None:
        """The sandbox stopped or is gone: end its session (in the background)."""
        if record.has_agent:
            record.agent = "unavailable"
        self.close_id(record.id)

    def close_id(self, sid: str) -> None:
        session = self._sessions.pop(sid, None)
        if session is not None:
            task = asyncio.get_running_loop().create_task(session.close())
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)

    def follow(self, record: SandboxRecord) -> None:
        """The sandbox's status changed: a stopped one has no agent any more."""
        if record.status == status.STOPPED or record.status == status.ERROR:
            self.close(record)
        else:
            self.open(record)

    def _changed(self, session: AgentSession) -> None:
        record = self.registry.by_id(session.sandbox_id)
        if record is None:
            return
        record.agent = _WIRE[session.state]
        if session.state == FAILED:
            log.warning("agent_failed", sandbox_id=record.id, error=session.error)
            self.publish("sandbox.error", record,
                         {"component": "agent", "error": session.error or "failed"})

    async def close_all(self) -> None:
        for sid in list(self._sessions):
            record = self.registry.by_id(sid)
            session = self._sessions.pop(sid)
            if record is not None:
                record.agent = "unavailable"
            await session.close()
        if self._closing:
            await asyncio.gather(*self._closing, return_exceptions=True)
