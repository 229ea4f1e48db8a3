"""Durable daemon state: what Docker labels cannot hold, in SQLite under the state directory.

Owns ``<state_dir>/state.db`` with one row per sandbox: its record as JSON
(deadline after ``extend``, idle timeout, last activity, paused-by-us, owner
and labels), one row per container whose sandbox was removed but whose
deletion by the engine has not finished yet, and one row per unclaimed
warm-pool member (written before its container is made; a claim moves it to
the sandboxes table in one commit). Writes are committed before
``put``/``delete`` return, in WAL mode with ``synchronous=NORMAL``: a committed
change survives the daemon being killed at any moment (SIGKILL, OOM, a
crash) and dockerd restarting, because it is in the kernel's page cache the
moment the commit returns. Only
a host crash or power loss can lose the last commits, and those also end
every container (no restart policy), so the rows they would describe are
dropped at the next start anyway; FULL would add an fsync to every pause,
resume and extend for no state that can outlive its container. Commits take
tens of microseconds and run inline on the event loop. Last-activity updates
are written behind (``touch``), batched: they are the only thing a crash may
lose, by at most ``TOUCH_DELAY``; a write-behind that fails is kept and
retried, never dropped. It must not decide anything: it stores and loads.
"""

from __future__ import annotations

import asyncio
import json
import os
import sqlite3
from dataclasses import fields

import orjson
import structlog

from sandboxd.core.records import SandboxRecord

log = structlog.get_logger("sandboxd.store")

TOUCH_DELAY = 1.0
_RECORD_FIELDS = tuple(f.name for f in fields(SandboxRecord))


def record_to_json(record: SandboxRecord) -> str:
    # A flat record: no deep copy (asdict) needed; orjson copies what it encodes.
    return orjson.dumps({name: getattr(record, name) for name in _RECORD_FIELDS}).decode()


def record_from_json(text: str) -> SandboxRecord:
    data = json.loads(text)
    return SandboxRecord(**{k: v for k, v in data.items() if k in _RECORD_FIELDS})


class StateStore:
    def __init__(self, state_dir: str) -> None:
        self.state_dir = state_dir
        self.path = os.path.join(state_dir, "state.db")
        self._db: sqlite3.Connection | None = None
        self._dirty: dict[str, SandboxRecord] = {}
        self._flush_handle: asyncio.TimerHandle | None = None

    def _conn(self) -> sqlite3.Connection:
        if self._db is None:
            raise RuntimeError("the state store is not open")
        return self._db

    def _put_rows(self, rows: list[tuple[str, str]]) -> None:
        db = self._conn()
        with db:
            db.execute("BEGIN")
            db.executemany("INSERT OR REPLACE INTO sandboxes (id, record) VALUES (?, ?)", rows)

    async def open(self) -> list[SandboxRecord]:
        """Open (creating if needed) and return every stored record."""
        os.makedirs(self.state_dir, mode=0o700, exist_ok=True)
        db = sqlite3.connect(self.path, isolation_level=None)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")
        db.execute(
            "CREATE TABLE IF NOT EXISTS sandboxes (id TEXT PRIMARY KEY, record TEXT NOT NULL)"
        )
        db.execute(
            "CREATE TABLE IF NOT EXISTS removals (container TEXT PRIMARY KEY, sandbox TEXT)"
        )
        db.execute(
            "CREATE TABLE IF NOT EXISTS pool_members (id TEXT PRIMARY KEY, record TEXT NOT NULL)"
        )
        self._db = db
        records = []
        for (text,) in db.execute("SELECT record FROM sandboxes"):
            try:
                records.append(record_from_json(text))
            except (ValueError, TypeError):
                continue  # a row this version cannot read: leave it, never crash
        return records

    async def put(self, record: SandboxRecord) -> None:
        """Commit the record as it is now."""
        self._dirty.pop(record.id, None)
        self._put_rows([(record.id, record_to_json(record))])

    async def delete(self, sid: str) -> None:
        self._dirty.pop(sid, None)
        self._conn().execute("DELETE FROM sandboxes WHERE id = ?", (sid,))

    async def begin_removal(self, sid: str, container: str) -> None:
        """The sandbox is gone for its user; its container is still to be deleted. One
        commit: a crash from here on still deletes the container at the next start."""
        self._dirty.pop(sid, None)
        db = self._conn()
        with db:
            db.execute("BEGIN")
            db.execute("DELETE FROM sandboxes WHERE id = ?", (sid,))
            db.execute("INSERT OR REPLACE INTO removals (container, sandbox) VALUES (?, ?)",
                       (container, sid))

    async def end_removal(self, container: str) -> None:
        self._conn().execute("DELETE FROM removals WHERE container = ?", (container,))

    def pending_removals(self) -> list[tuple[str, str]]:
        """(container, sandbox id) of every container still to be deleted."""
        rows = self._conn().execute("SELECT container, sandbox FROM removals").fetchall()
        return [(str(c), str(s)) for c, s in rows]

    # -- warm-pool members: a row before the container, gone in the claim's commit ------

    async def put_member(self, record: SandboxRecord) -> None:
        self._conn().execute("INSERT OR REPLACE INTO pool_members (id, record) VALUES (?, ?)",
                             (record.id, record_to_json(record)))

    def members(self) -> list[SandboxRecord]:
        """Every warm-pool member recorded (unclaimed)."""
        out = []
        for (text,) in self._conn().execute("SELECT record FROM pool_members"):
            try:
                out.append(record_from_json(text))
            except (ValueError, TypeError):
                continue
        return out

    async def claim_member(self, record: SandboxRecord) -> None:
        """One commit: the member is gone from the pool and is this caller's sandbox."""
        self._dirty.pop(record.id, None)
        db = self._conn()
        with db:
            db.execute("BEGIN")
            db.execute("DELETE FROM pool_members WHERE id = ?", (record.id,))
            db.execute("INSERT OR REPLACE INTO sandboxes (id, record) VALUES (?, ?)",
                       (record.id, record_to_json(record)))

    async def begin_member_removal(self, sid: str, container: str | None) -> None:
        """One commit: the member leaves the pool; its container (if made) is to be deleted."""
        db = self._conn()
        with db:
            db.execute("BEGIN")
            db.execute("DELETE FROM pool_members WHERE id = ?", (sid,))
            if container is not None:
                db.execute(
                    "INSERT OR REPLACE INTO removals (container, sandbox) VALUES (?, ?)",
                    (container, sid),
                )

    def touch(self, record: SandboxRecord) -> None:
        """Write the record behind, within ``TOUCH_DELAY`` (activity timestamps)."""
        self._dirty[record.id] = record
        if self._flush_handle is None:
            self._schedule_flush()

    def _flush_dirty(self) -> None:
        """Write the records touched since the last flush; on failure keep them and retry."""
        self._flush_handle = None
        if not self._dirty or self._db is None:
            return
        batch = dict(self._dirty)
        try:
            self._put_rows([(r.id, record_to_json(r)) for r in batch.values()])
        except (sqlite3.Error, OSError) as exc:
            log.warning("activity_write_failed", records=len(batch), error=str(exc))
            self._schedule_flush()  # the records stay dirty: retried, never dropped
            return
        for sid, record in batch.items():
            if self._dirty.get(sid) is record:
                del self._dirty[sid]

    def _schedule_flush(self) -> None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return  # no loop (closing): close() flushes what is left
        self._flush_handle = loop.call_later(TOUCH_DELAY, self._flush_dirty)

    async def close(self) -> None:
        if self._flush_handle is not None:
            self._flush_handle.cancel()
        self._flush_dirty()
        if self._db is not None:
            self._db.close()
            self._db = None
