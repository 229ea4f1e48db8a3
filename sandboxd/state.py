"""Durable daemon state: what Docker labels cannot hold, in SQLite under the state directory.

Owns ``<state_dir>/state.db`` (WAL mode, ``synchronous=FULL``: a write has
reached the disk when ``put`` returns) with one row per sandbox: its record
as JSON (deadline after ``extend``, idle timeout, last activity, paused-by-us,
owner and labels of a claimed pool container). All SQLite work happens on
one dedicated thread, in submission order, so the event loop never waits on
a disk flush. Last-activity updates are written behind (``touch``), batched:
they are the only thing a crash may lose, by at most ``TOUCH_DELAY``. It must
not decide anything: it stores and loads.
"""

from __future__ import annotations

import asyncio
import json
import os
import sqlite3
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, fields
from typing import Any

from .models import SandboxRecord

TOUCH_DELAY = 1.0
_RECORD_FIELDS = {f.name for f in fields(SandboxRecord)}
_TRANSIENT = {"running_execs"}


def record_to_json(record: SandboxRecord) -> str:
    data = {k: v for k, v in asdict(record).items() if k not in _TRANSIENT}
    return json.dumps(data, separators=(",", ":"))


def record_from_json(text: str) -> SandboxRecord:
    data = json.loads(text)
    return SandboxRecord(**{k: v for k, v in data.items() if k in _RECORD_FIELDS})


class StateStore:
    def __init__(self, state_dir: str) -> None:
        self.state_dir = state_dir
        self.path = os.path.join(state_dir, "state.db")
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sandboxd-state")
        self._db: sqlite3.Connection | None = None
        self._dirty: dict[str, SandboxRecord] = {}
        self._flush_handle: asyncio.TimerHandle | None = None

    # on the state thread -------------------------------------------------
    def _open(self) -> None:
        os.makedirs(self.state_dir, mode=0o700, exist_ok=True)
        db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=FULL")
        db.execute(
            "CREATE TABLE IF NOT EXISTS sandboxes (id TEXT PRIMARY KEY, record TEXT NOT NULL)"
        )
        self._db = db

    def _db_or_fail(self) -> sqlite3.Connection:
        if self._db is None:
            raise RuntimeError("the state store is not open")
        return self._db

    def _put_many(self, rows: list[tuple[str, str]]) -> None:
        db = self._db_or_fail()
        with db:
            db.execute("BEGIN")
            db.executemany("INSERT OR REPLACE INTO sandboxes (id, record) VALUES (?, ?)", rows)

    def _delete(self, sid: str) -> None:
        self._db_or_fail().execute("DELETE FROM sandboxes WHERE id = ?", (sid,))

    def _load(self) -> list[str]:
        return [r[0] for r in self._db_or_fail().execute("SELECT record FROM sandboxes")]

    # on the event loop ----------------------------------------------------
    async def _run(self, fn: Any, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    async def open(self) -> list[SandboxRecord]:
        """Open (creating if needed) and return every stored record."""
        await self._run(self._open)
        records = []
        for text in await self._run(self._load):
            try:
                records.append(record_from_json(text))
            except (ValueError, TypeError):
                continue  # a row this version cannot read: leave it, never crash
        return records

    async def put(self, record: SandboxRecord) -> None:
        """Write the record durably (returns once it is on disk)."""
        await self.put_started(record)

    def put_started(self, record: SandboxRecord) -> asyncio.Future[None]:
        """Start writing the record as it is now; await the result to know it is on disk.

        Lets a caller overlap the disk flush with an engine call.
        """
        self._dirty.pop(record.id, None)
        loop = asyncio.get_running_loop()
        row = [(record.id, record_to_json(record))]
        return loop.run_in_executor(self._pool, self._put_many, row)

    async def delete(self, sid: str) -> None:
        self._dirty.pop(sid, None)
        await self._run(self._delete, sid)

    def touch(self, record: SandboxRecord) -> None:
        """Write the record behind, within ``TOUCH_DELAY`` (activity timestamps)."""
        self._dirty[record.id] = record
        if self._flush_handle is None:
            loop = asyncio.get_running_loop()
            self._flush_handle = loop.call_later(TOUCH_DELAY, self._flush_soon)

    def _flush_soon(self) -> None:
        self._flush_handle = None
        rows = [(r.id, record_to_json(r)) for r in self._dirty.values()]
        self._dirty.clear()
        if rows:
            asyncio.get_running_loop().run_in_executor(self._pool, self._put_many, rows)

    async def close(self) -> None:
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush_handle = None
        rows = [(r.id, record_to_json(r)) for r in self._dirty.values()]
        self._dirty.clear()
        if rows and self._db is not None:
            await self._run(self._put_many, rows)
        if self._db is not None:
            await self._run(self._db.close)
            self._db = None
        self._pool.shutdown(wait=True)
