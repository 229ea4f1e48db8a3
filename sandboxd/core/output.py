"""Bounded capture of one output stream: keep the head and the tail, count the rest.

Owns the ``max_output`` rule of SPEC §3: output over the cap keeps its head
and its tail with a marker between, and the writer is never blocked by the
cap (bytes past it are counted and dropped, not refused). Chunks are kept as
they come and joined once at the end. Pure: no I/O.
"""

from __future__ import annotations

from collections import deque


def _marker(omitted: int) -> bytes:
    return f"\n[... sandboxd: {omitted} bytes omitted ...]\n".encode()


class OutputCapture:
    """Captures up to ``limit`` bytes of a stream (marker included when truncated)."""

    def __init__(self, limit: int) -> None:
        self.limit = max(0, limit)
        self.total = 0
        self._head: list[bytes | memoryview] = []  # the first bytes, up to _head_cap once cut
        self._tail: deque[bytes | memoryview] = deque()  # the latest, at least _tail_cap
        self._tail_size = 0
        # Room reserved for the marker so head + marker + tail stays within the limit.
        reserve = len(_marker(2**63))
        if self.limit <= reserve + 2:  # too small for a marker: keep the head alone
            self._head_cap, self._tail_cap = self.limit, 0
        else:
            usable = self.limit - reserve
            self._head_cap = usable // 2
            self._tail_cap = usable - self._head_cap

    def append(self, data: bytes | memoryview) -> None:
        if not data:
            return
        before = self.total
        self.total += len(data)
        if before <= self.limit:
            # While everything fits, all of it goes to the head; once past the limit the
            # head keeps its first _head_cap bytes and the rest moves to the tail.
            self._head.append(data)
            if self.total <= self.limit:
                return
            joined = b"".join(self._head)
            self._head = [joined[: self._head_cap]]
            data = joined[self._head_cap :]
            if not data:
                return
        self._tail.append(data)
        self._tail_size += len(data)
        while self._tail and self._tail_size - len(self._tail[0]) >= self._tail_cap:
            self._tail_size -= len(self._tail.popleft())

    @property
    def truncated(self) -> bool:
        return self.total > self.limit

    def result(self) -> bytes:
        head = b"".join(self._head)
        if not self.truncated:
            return head
        if self._tail_cap == 0:
            return head[: self.limit]
        tail = b"".join(self._tail)[-self._tail_cap :]
        omitted = self.total - len(head) - len(tail)
        out = head + _marker(omitted) + tail
        return out[: self.limit] if len(out) > self.limit else out
