"""Each sandbox's own unprivileged uid, from the configured range.

Owns handing out uids (one per sandbox, uid = gid; a fork may share its
snapshot's with sandboxes of the same owner), skipping those in use,
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
        self._used: dict[int, tuple[int | None, int]] = {}  # uid -> (owner uid, sandboxes)
        self._next = first
        for uid in in_use:
            self.take(uid)

    def take(self, uid: int, owner: int | None = None) -> None:
        """Mark ``uid`` as in use by a sandbox of ``owner`` (adopted with it)."""
        if self.first <= uid <= self.last:
            held = self._used.get(uid)
            self._used[uid] = (owner, held[1] + 1 if held and held[0] == owner else 1)
            if uid >= self._next:
                self._next = uid + 1 if uid < self.last else self.first

    def allocate(self, prefer: int | None = None, owner: int | None = None) -> int:
        """A uid for a new sandbox of ``owner``. ``prefer`` (a fork's snapshot uid, so the
        fork can change the files it inherited) when it is free, or held only by sandboxes
        of the same owner (they then share it and its per-uid kernel budgets: one user's
        sandboxes among themselves); else the next free one in turn."""
        if prefer is not None and self.first <= prefer <= self.last:
            held = self._used.get(prefer)
            if held is None or (owner is not None and held[0] == owner):
                self._used[prefer] = (owner, held[1] + 1 if held else 1)
                return prefer
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
        self._used[uid] = (owner, 1)
        self._next = uid + 1 if uid < self.last else self.first
        return uid

    def hand_over(self, uid: int | None, owner: int) -> None:
        """A warm-pool member's uid now belongs to the sandbox of ``owner`` that claimed it."""
        held = self._used.get(uid) if uid is not None else None
        if uid is not None and held is not None:
            self._used[uid] = (owner, held[1])

    def release(self, uid: int | None) -> None:
        held = self._used.get(uid) if uid is not None else None
        if uid is None or held is None:
            return
        if held[1] > 1:
            self._used[uid] = (held[0], held[1] - 1)
        else:
            del self._used[uid]
