"""Bounded capture of one output stream: keep the head and the tail, count the rest.

Owns the ``max_output`` rule of SPEC §3: output over the cap keeps its head
and its tail with a marker between, and the writer is never blocked by the
cap (bytes past it are counted and dropped, not refused). Pure: no I/O.
"""

from __future__ import annotations


def _marker(omitted: int) -> bytes:
    return f"\n[... sandboxd: {omitted} bytes omitted ...]\n".encode()


class OutputCapture:
    """Captures up to ``limit`` bytes of a stream (marker included when truncated)."""

    def __init__(self, limit: int) -> None:
        self.limit = max(0, limit)
        self.total = 0
        self._head = bytearray()
        self._tail = bytearray()
        # Room reserved for the marker so head + marker + tail stays within the limit.
        reserve = len(_marker(2**63))
        if self.limit <= reserve + 2:  # too small for a marker: keep the head alone
            self._head_cap, self._tail_cap = self.limit, 0
        else:
            usable = self.limit - reserve
            self._head_cap = usable // 2
            self._tail_cap = usable - self._head_cap

    def append(self, data: bytes) -> None:
        self.total += len(data)
        if self.total <= self.limit:
            # Everything so far fits: keep it whole (split between head and tail later).
            self._head += data
            return
        if len(self._head) > self._head_cap:
            spill = self._head[self._head_cap :]
            del self._head[self._head_cap :]
            self._tail += spill
        room = self._head_cap - len(self._head)
        if room > 0:
            self._head += data[:room]
            data = data[room:]
        self._tail += data
        if len(self._tail) > 2 * self._tail_cap + 65536:
            del self._tail[: len(self._tail) - self._tail_cap]

    @property
    def truncated(self) -> bool:
        return self.total > self.limit

    def result(self) -> bytes:
        if not self.truncated:
            return bytes(self._head)
        if self._tail_cap == 0:
            return bytes(self._head[: self.limit])
        tail = bytes(self._tail[-self._tail_cap :])
        omitted = self.total - len(self._head) - len(tail)
        out = bytes(self._head) + _marker(omitted) + tail
        return out[: self.limit] if len(out) > self.limit else out
