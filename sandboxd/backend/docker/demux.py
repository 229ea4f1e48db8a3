"""Docker's multiplexed exec stream, demultiplexed across arbitrary chunk boundaries.

Owns the 8-byte frame header format (``[stream, 0, 0, 0, size:uint32be]``) and
turns raw chunks into ``(stream, bytes)`` pieces, however the engine's frames
were split or joined by the transport. Pure: no I/O, no asyncio. It must not
decode or trim the bytes it passes on.
"""

from __future__ import annotations

STDIN = 0
STDOUT = 1
STDERR = 2
HEADER_SIZE = 8


class DemuxError(ValueError):
    """The bytes are not a multiplexed stream (bad stream id in a header)."""


class Demuxer:
    """Incremental demultiplexer. A frame's payload may come out in several pieces."""

    def __init__(self) -> None:
        self._header = bytearray()
        self._stream = STDOUT
        self._remaining = 0  # payload bytes of the current frame not yet seen

    @property
    def mid_frame(self) -> bool:
        """True when the stream ended inside a header or a payload."""
        return bool(self._header) or self._remaining > 0

    def feed(self, data: bytes) -> list[tuple[int, bytes]]:
        return [(stream, bytes(piece)) for stream, piece in self.feed_views(data)]

    def feed_views(self, data: bytes) -> list[tuple[int, memoryview]]:
        """As ``feed``, but each piece is a view into ``data`` (no copy)."""
        out: list[tuple[int, memoryview]] = []
        view = memoryview(data)
        pos = 0
        end = len(view)
        while pos < end:
            if self._remaining:
                take = min(self._remaining, end - pos)
                out.append((self._stream, view[pos : pos + take]))
                pos += take
                self._remaining -= take
                continue
            need = HEADER_SIZE - len(self._header)
            piece = view[pos : pos + need]
            self._header += piece
            pos += len(piece)
            if len(self._header) < HEADER_SIZE:
                break
            stream = self._header[0]
            if stream not in (STDIN, STDOUT, STDERR):
                raise DemuxError(f"bad stream id {stream} in an exec stream header")
            self._stream = STDOUT if stream == STDIN else stream
            self._remaining = int.from_bytes(self._header[4:8], "big")
            self._header.clear()
        return out
