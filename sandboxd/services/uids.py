"""Each sandbox's own unprivileged uid, from the configured range.

Owns handing out uids (one per sandbox, uid = gid), skipping those in use,
and the order they come back in: a cursor walks the range, so a uid freed by
a removed sandbox is used again only after every other uid of the range has
been (what a uid owned in the kernel, such as pipe-buffer and inotify
budgets, has long been released by then). Why one uid per sandbox and not
one for all: the kernel counts RLIMIT_NPROC, pipe buffers
(``pipe-user-pages-soft``) and inotify instances and watches per uid across
all containers, so sandboxes sharing a uid could exhaust each other's. It
must not call the backend.
"""

from __future__ import annotations

from collections.abc import Iterable

from sandboxd.wire.errors import QuotaExceeded


class UidPool:
    def __init__(self, first: int, last: int, in_use: Iterable[int] = ()) -> None:
        if not 0 < first <= last:
            raise ValueError("the uid range must be first <= last, above 0")
        self.first, self.last = first, last
        self._used: set[int] = set()
        self._next = first
        for uid in in_use:
            self.take(uid)

    def take(self, uid: int) -> None:
        """Mark ``uid`` as in use (a sandbox adopted with it)."""
        if self.first <= uid <= self.last:
            self._used.add(uid)
            if uid >= self._next:
                self._next = uid + 1 if uid < self.last else self.first

    def allocate(self) -> int:
        size = self.last - self.first + 1
        if len(self._used) >= size:
            raise QuotaExceeded(
                f"All {size} sandbox uids ({self.first}-{self.last}) are in use; "
                "remove sandboxes or widen [defaults] uid_min..uid_max.",
                {"limit": size},
            )
        uid = self._next
        while uid in self._used:
            uid = uid + 1 if uid < self.last else self.first
        self._used.add(uid)
        self._next = uid + 1 if uid < self.last else self.first
        return uid

    def release(self, uid: int | None) -> None:
        if uid is not None:
            self._used.discard(uid)
