"""The durable event log: ``<state_dir>/events.db``, the events that outlive the process.

Owns the on-disk form of the event stream (SPEC §3 "events"): one SQLite
database in WAL mode with ``synchronous=NORMAL`` (a commit is a write into
the WAL, no fsync: it survives SIGKILL of the daemon; only a power loss may
take the last few), the table of the retained events, the highest sequence
number ever handed out (so pruning can never make ``seq`` go back), and
pruning to the last ``retain`` events.

Appends are cheap enough (tens of microseconds) to run on the event loop,
once per loop turn; what is slow and fsyncs — copying the WAL back into
the database — never happens there: automatic checkpoints are off and
``checkpoint()`` runs on a second connection, from another thread, while
appends go on. ``open``, ``append`` and ``close`` must not run at the same
time as each other (the bus calls them from one thread at a time). It must
not touch the event loop, know about subscribers, or decide what an event
means.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import msgpack

DB_NAME = "events.db"
_SCHEMA_VERSION = 1


class EventLogError(Exception):
    """The event log cannot be opened or written; the message is one line for the operator."""


@dataclass(slots=True)
class StoredEvent:
    """One event as the daemon keeps it: the wire fields plus the labels used for filtering."""

    seq: int
    time: float
    type: str
    sandbox_id: str | None
    sandbox_name: str | None
    owner_uid: int | None
    labels: dict[str, str]
    data: dict[str, Any]
    wire: dict[str, Any] = field(default_factory=dict)  # the SPEC Event, filled in by the bus
    packed: bytes = b""  # ``wire`` encoded once, filled in by the bus


def _pack(value: Any) -> bytes:
    packed: bytes = msgpack.packb(value, use_bin_type=True)
    return packed


def _unpack_map(blob: bytes | None) -> dict[str, Any]:
    if not blob:
        return {}
    value = msgpack.unpackb(blob, raw=False)
    return value if isinstance(value, dict) else {}


class EventLog:
    """The SQLite file behind the bus."""

    def __init__(self, state_dir: str, retain: int) -> None:
        self.state_dir = state_dir
        self.path = os.path.join(state_dir, DB_NAME)
        self.retain = max(0, retain)
        # Rows beyond ``retain`` are deleted every this many seqs, not on every commit
        # (each delete dirties a page): the file holds at most retain + prune_every rows.
        self.prune_every = max(64, self.retain // 100)
        self._db: sqlite3.Connection | None = None
        self._pruned_at = 0
        self._last_seq = 0
        self._ckpt_lock = threading.Lock()
        self._ckpt_db: sqlite3.Connection | None = None

    def open(self) -> tuple[list[StoredEvent], int]:
        """Create or open the log; the retained events (oldest first) and the last seq."""
        try:
            os.makedirs(self.state_dir, mode=0o700, exist_ok=True)
            if not os.path.exists(self.path):
                os.close(os.open(self.path, os.O_CREAT | os.O_WRONLY, 0o600))
            # Opened on one thread, written from another (never at once): allowed.
            db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        except OSError as exc:
            raise EventLogError(
                f"cannot create the event log {self.path}: {exc.strerror or exc}"
            ) from None
        except sqlite3.Error as exc:
            raise EventLogError(f"cannot open the event log {self.path}: {exc}") from None
        try:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            db.execute("PRAGMA wal_autocheckpoint=0")  # checkpoint() does it, off the loop
            db.execute(
                "CREATE TABLE IF NOT EXISTS events ("
                " seq INTEGER PRIMARY KEY,"
                " time REAL NOT NULL,"
                " type TEXT NOT NULL,"
                " sandbox_id TEXT,"
                " sandbox_name TEXT,"
                " owner_uid INTEGER,"
                " labels BLOB,"
                " data BLOB)"
            )
            db.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER)")
            db.execute(
                "INSERT OR IGNORE INTO meta (key, value) VALUES ('schema', ?)", (_SCHEMA_VERSION,)
            )
            row = db.execute("SELECT value FROM meta WHERE key = 'last_seq'").fetchone()
            top = db.execute("SELECT MAX(seq) FROM events").fetchone()
            last_seq = max(int(row[0]) if row else 0, int(top[0]) if top and top[0] else 0)
            rows = db.execute(
                "SELECT seq, time, type, sandbox_id, sandbox_name, owner_uid, labels, data"
                " FROM events WHERE seq > ? ORDER BY seq",
                (last_seq - self.retain,),
            ).fetchall()
            self._db = db
            self._last_seq = last_seq
            self._prune(last_seq)
            self._save_last_seq(last_seq)
        except (sqlite3.Error, ValueError) as exc:
            db.close()
            raise EventLogError(
                f"the event log {self.path} is unreadable ({exc}); move it aside to start "
                "a new one (event sequence numbers would then restart)"
            ) from None
        events = [
            StoredEvent(
                seq=int(seq),
                time=float(ts),
                type=str(kind),
                sandbox_id=sid,
                sandbox_name=name,
                owner_uid=None if owner is None else int(owner),
                labels={str(k): str(v) for k, v in _unpack_map(labels).items()},
                data=_unpack_map(data),
            )
            for seq, ts, kind, sid, name, owner, labels, data in rows
        ]
        return events, last_seq

    def append(self, events: Sequence[StoredEvent]) -> None:
        """Write ``events`` (ascending seq) in one transaction, pruning now and then."""
        if not events:
            return
        db = self._require()
        last_seq = events[-1].seq
        keep_from = last_seq - self.retain
        try:
            db.execute("BEGIN")
            if self.retain:
                db.executemany(
                    "INSERT OR REPLACE INTO events"
                    " (seq, time, type, sandbox_id, sandbox_name, owner_uid, labels, data)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    [
                        (
                            e.seq,
                            e.time,
                            e.type,
                            e.sandbox_id,
                            e.sandbox_name,
                            e.owner_uid,
                            _pack(e.labels) if e.labels else None,
                            _pack(e.data) if e.data else None,
                        )
                        for e in events
                        if e.seq > keep_from
                    ],
                )
            else:
                self._save_last_seq(last_seq)  # no row holds it
            if last_seq - self._pruned_at >= self.prune_every:
                self._prune(last_seq)
            db.execute("COMMIT")
        except sqlite3.Error as exc:
            with contextlib.suppress(sqlite3.Error):
                db.execute("ROLLBACK")
            raise EventLogError(f"cannot write the event log {self.path}: {exc}") from None
        self._last_seq = last_seq

    def checkpoint(self) -> None:
        """Copy the WAL back into the database (fsyncs); from any one thread at a time.

        Passive: it never blocks ``append``, which may run meanwhile.
        """
        with self._ckpt_lock:
            try:
                if self._ckpt_db is None:
                    self._ckpt_db = sqlite3.connect(
                        self.path, isolation_level=None, check_same_thread=False
                    )
                self._ckpt_db.execute("PRAGMA wal_checkpoint(PASSIVE)")
            except sqlite3.Error as exc:
                raise EventLogError(f"cannot checkpoint the event log {self.path}: {exc}") from None

    def close(self) -> None:
        with self._ckpt_lock:
            ckpt, self._ckpt_db = self._ckpt_db, None
            if ckpt is not None:
                ckpt.close()
        db, self._db = self._db, None
        if db is not None:
            with contextlib.suppress(sqlite3.Error):
                self._db = db
                self._prune(self._last_seq)
                self._save_last_seq(self._last_seq)
                self._db = None
                db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            self._db = None
            db.close()

    def _save_last_seq(self, last_seq: int) -> None:
        self._require().execute(
            "INSERT OR REPLACE INTO meta (key, value) VALUES ('last_seq', ?)", (last_seq,)
        )

    def _prune(self, last_seq: int) -> None:
        self._require().execute("DELETE FROM events WHERE seq <= ?", (last_seq - self.retain,))
        self._pruned_at = last_seq

    def _require(self) -> sqlite3.Connection:
        if self._db is None:
            raise EventLogError(f"the event log {self.path} is not open")
        return self._db
