"""The registry of sandboxes: every record by id and name, who may see it, and its status.

Owns the in-memory set of sandbox records, their lookup by id or name with
the one ownership rule (a sandbox of another user is ``not_found``; a name
is unique per owner and resolves within the caller's own sandboxes, SPEC §5), listing
with filters, the per-sandbox lock that orders lifecycle calls, the count of
activities holding a sandbox busy (running commands), the note of when the
daemon last changed a sandbox's status, and ``set_status``: the one place a
known sandbox's status is assigned, always with ``core.status`` deciding what
it becomes and the state store written before anyone is answered. It must not
call the backend or publish events.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import Callable

from sandboxd.core.records import Caller, SandboxRecord
from sandboxd.store.state import StateStore
from sandboxd.wire.errors import Conflict, NotFound


class Registry:
    def __init__(self, store: StateStore) -> None:
        self.store = store
        self._by_id: dict[str, SandboxRecord] = {}
        self._by_name: dict[tuple[int, str], str] = {}  # (owner uid, name) -> sandbox id
        self._locks: dict[str, asyncio.Lock] = {}
        self._changed: dict[str, float] = {}  # sandbox id -> when we last changed its status
        self._active: dict[str, int] = {}  # sandbox id -> activities running (commands)
        self.on_forget: list[Callable[[SandboxRecord], None]] = []
        self.on_status: list[Callable[[SandboxRecord], None]] = []  # after each change

    # -- reading -----------------------------------------------------------

    def count(self) -> int:
        return len(self._by_id)

    def records(self) -> list[SandboxRecord]:
        return list(self._by_id.values())

    def by_id(self, sid: str) -> SandboxRecord | None:
        return self._by_id.get(sid)

    def holds(self, record: SandboxRecord) -> bool:
        """True while ``record`` is still the registered record of its id."""
        return self._by_id.get(record.id) is record

    def owned_by(self, uid: int) -> list[SandboxRecord]:
        return [r for r in self._by_id.values() if r.owner_uid == uid]

    def lookup(self, caller: Caller, ref: str) -> SandboxRecord:
        record = self._by_id.get(ref)
        if record is None:
            sid = self._by_name.get((caller.uid, ref))
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

    # -- membership ----------------------------------------------------------

    def new_id(self) -> str:
        while True:
            sid = secrets.token_hex(6)
            if sid not in self._by_id:
                return sid

    def reserve(self, record: SandboxRecord) -> None:
        """Add a sandbox being created; its id and name are taken from now on."""
        key = (record.owner_uid, record.name)
        if key in self._by_name:
            raise Conflict(
                f"The name {record.name!r} is already taken by one of your sandboxes; "
                "choose another.",
                {"name": record.name},
            )
        self._by_id[record.id] = record
        self._by_name[key] = record.id

    def register(self, record: SandboxRecord) -> None:
        """Add a known sandbox (adopted at start-up or from the engine)."""
        self._by_id[record.id] = record
        self._by_name.setdefault((record.owner_uid, record.name), record.id)

    def forget(self, record: SandboxRecord) -> None:
        """Drop the sandbox; ``on_forget`` hooks end what still runs in it."""
        self._by_id.pop(record.id, None)
        key = (record.owner_uid, record.name)
        if self._by_name.get(key) == record.id:
            del self._by_name[key]
        self._locks.pop(record.id, None)
        self._changed.pop(record.id, None)
        self._active.pop(record.id, None)
        for hook in self.on_forget:
            hook(record)

    # -- ordering, activity, status -----------------------------------------

    def lock(self, sid: str) -> asyncio.Lock:
        lock = self._locks.get(sid)
        if lock is None:
            lock = self._locks[sid] = asyncio.Lock()
        return lock

    def busy(self, sid: str) -> bool:
        """True while a lifecycle call of ours holds the sandbox (it settles the state)."""
        lock = self._locks.get(sid)
        return lock is not None and lock.locked()

    def hold(self, sid: str) -> None:
        """An activity (a running command) starts in the sandbox."""
        self._active[sid] = self._active.get(sid, 0) + 1

    def release(self, sid: str) -> None:
        left = self._active.get(sid, 0) - 1
        if left > 0:
            self._active[sid] = left
        else:
            self._active.pop(sid, None)

    def active(self, sid: str) -> bool:
        return self._active.get(sid, 0) > 0

    def changed_since(self, sid: str, moment: float) -> bool:
        """True when this daemon changed the sandbox's status at or after ``moment``."""
        return self._changed.get(sid, -1.0) >= moment

    async def set_status(self, record: SandboxRecord, status: str) -> None:
        """Record a new status durably (before any reply) and note that we changed it."""
        record.status = status
        self._changed[record.id] = time.monotonic()
        await self.store.put(record)
        for hook in self.on_status:
            hook(record)
