"""What one client, one uid and all clients together may hold of the daemon.

Owns the ``[limits]`` settings (SPEC §2, §6) with their defaults, and the
accounting the server and its connections share: connections per uid and in
total (with slots kept for root and admins), calls in flight per uid, input
bytes held for messages not yet complete, and returning freed memory to the
system after a large buffer goes away. It decides; it must not read or write
sockets.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import time
from dataclasses import dataclass

MIB = 1024 * 1024


@dataclass
class Limits:
    max_connections: int = 1024  # in total; also keep the daemon's fd limit above this
    max_connections_per_uid: int = 64
    admin_connections: int = 32  # of max_connections, only root and admins may use these
    max_in_flight: int = 256  # calls running at once per connection
    max_in_flight_per_uid: int = 1024
    frame_timeout: float = 30.0  # a message once started must be complete within this
    idle_timeout: float = 900.0  # a connection with nothing going on is closed after this
    max_input: int = 16 * MIB  # bytes of incomplete messages one connection may hold
    max_input_total: int = 256 * MIB  # ... and all connections together
    max_output: int = 64 * MIB  # unread replies a connection may hold before it is cut
    write_timeout: float = 60.0  # a client that reads nothing for this long is cut


class Accounting:
    """Counts per uid and in total; the server owns one, every connection uses it."""

    def __init__(self, limits: Limits) -> None:
        self.limits = limits
        self.connections = 0
        self.by_uid: dict[int, int] = {}
        self.in_flight_by_uid: dict[int, int] = {}
        self.input_total = 0

    def admit(self, uid: int, admin: bool) -> str | None:
        """Take a connection slot for ``uid``, or say why there is none."""
        lim = self.limits
        total_cap = lim.max_connections if admin else lim.max_connections - lim.admin_connections
        if self.connections >= total_cap:
            return (f"The daemon has {self.connections} connections, the most it takes"
                    + ("" if admin else " from users who are not admins") + "; try again later.")
        mine = self.by_uid.get(uid, 0)
        if not admin and mine >= lim.max_connections_per_uid:
            return (f"You have {mine} connections open, the most allowed per user; "
                    "close some first.")
        self.connections += 1
        self.by_uid[uid] = mine + 1
        return None

    def leave(self, uid: int) -> None:
        self.connections -= 1
        left = self.by_uid.get(uid, 0) - 1
        if left > 0:
            self.by_uid[uid] = left
        else:
            self.by_uid.pop(uid, None)

    def uid_busy(self, uid: int) -> bool:
        return self.in_flight_by_uid.get(uid, 0) >= self.limits.max_in_flight_per_uid

    def call_started(self, uid: int) -> None:
        self.in_flight_by_uid[uid] = self.in_flight_by_uid.get(uid, 0) + 1

    def call_ended(self, uid: int) -> bool:
        """Count a finished call; True when the uid was at its limit (others may go on)."""
        count = self.in_flight_by_uid.get(uid, 0)
        if count <= 1:
            self.in_flight_by_uid.pop(uid, None)
        else:
            self.in_flight_by_uid[uid] = count - 1
        return count >= self.limits.max_in_flight_per_uid

    def input_changed(self, delta: int) -> None:
        self.input_total += delta

    @property
    def input_full(self) -> bool:
        return self.input_total >= self.limits.max_input_total


class MemoryTrim:
    """Gives freed heap back to the system after a large buffer is released (glibc only).

    CPython and msgpack allocate large buffers with malloc; after they are freed
    glibc keeps the pages, so the daemon's RSS would stay at its high-water
    mark after an attack. ``malloc_trim(0)`` returns them; it is rate-limited.
    """

    MIN_INTERVAL = 1.0

    def __init__(self) -> None:
        name = ctypes.util.find_library("c")
        lib = ctypes.CDLL(name) if name else None
        self._trim = getattr(lib, "malloc_trim", None)
        self._last = 0.0

    def __call__(self) -> None:
        now = time.monotonic()
        if self._trim is None or now - self._last < self.MIN_INTERVAL:
            return
        self._last = now
        self._trim(0)
