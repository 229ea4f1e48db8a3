"""A look at the headers of a msgpack frame that has not fully arrived.

Owns one check: whether what an incomplete frame has *declared* so far (the
length of a str, bin or ext, the number of items of an array or map) can
still fit within the frame limit. A frame that declares 4 GiB of bin in its
first bytes is refused at that header, without waiting for, or buffering,
the bytes it announces. The scan is resumable chunk by chunk, skips over
payloads in O(1) and looks at most ``SCAN_LIMIT`` bytes of one frame (past
that, the frame limit itself and the server's input budgets apply). Pure
logic over bytes; it must not decode values or know the message shapes.
"""

from __future__ import annotations

SCAN_LIMIT = 64 * 1024  # bytes of one incomplete frame looked at, at most

_STR, _BIN, _EXT, _ARRAY, _MAP, _FIXED = range(6)


def _classify(b: int) -> tuple[int, int, int]:
    """(kind, size-field bytes, fixed payload bytes) of a msgpack type byte."""
    if b <= 0x7F or b >= 0xE0 or b in (0xC0, 0xC2, 0xC3, 0xC1):
        return _FIXED, 0, 0
    if b <= 0x8F:
        return _MAP, 0, b & 0x0F
    if b <= 0x9F:
        return _ARRAY, 0, b & 0x0F
    if b <= 0xBF:
        return _STR, 0, b & 0x1F
    table = {
        0xC4: (_BIN, 1, 0), 0xC5: (_BIN, 2, 0), 0xC6: (_BIN, 4, 0),
        0xC7: (_EXT, 1, 0), 0xC8: (_EXT, 2, 0), 0xC9: (_EXT, 4, 0),
        0xCA: (_FIXED, 0, 4), 0xCB: (_FIXED, 0, 8),
        0xCC: (_FIXED, 0, 1), 0xCD: (_FIXED, 0, 2), 0xCE: (_FIXED, 0, 4), 0xCF: (_FIXED, 0, 8),
        0xD0: (_FIXED, 0, 1), 0xD1: (_FIXED, 0, 2), 0xD2: (_FIXED, 0, 4), 0xD3: (_FIXED, 0, 8),
        0xD4: (_FIXED, 0, 2), 0xD5: (_FIXED, 0, 3), 0xD6: (_FIXED, 0, 5), 0xD7: (_FIXED, 0, 9),
        0xD8: (_FIXED, 0, 17),
        0xD9: (_STR, 1, 0), 0xDA: (_STR, 2, 0), 0xDB: (_STR, 4, 0),
        0xDC: (_ARRAY, 2, 0), 0xDD: (_ARRAY, 4, 0),
        0xDE: (_MAP, 2, 0), 0xDF: (_MAP, 4, 0),
    }
    return table[b]


# (kind, size-field bytes, fixed payload bytes) for every possible first byte.
_TYPES = [_classify(b) for b in range(256)]


class FrameScan:
    """Scans one incomplete frame's headers, chunk by chunk. Start a new one per frame."""

    def __init__(self, max_frame: int) -> None:
        self.max_frame = max_frame
        self.pos = 0  # bytes of the frame looked at
        self._skip = 0  # payload bytes still to pass over
        self._header = bytearray()  # a header split across chunks
        self._items = [1]  # items still due per open container; the frame is one item
        self.done = False  # the frame's structure is complete, or the scan gave up

    def feed(self, data: memoryview) -> str | None:
        """Look at the next bytes of the frame; a reason when it can no longer fit."""
        i, n = 0, len(data)
        while i < n and not self.done:
            if self.pos >= SCAN_LIMIT:
                self.done = True
                break
            if self._skip:
                step = min(self._skip, n - i)
                self._skip -= step
                self.pos += step
                i += step
                if not self._skip:
                    self._item_done()
                continue
            self._header.append(data[i])
            i += 1
            self.pos += 1
            reason = self._header_step()
            if reason is not None:
                return reason
        return None

    def _header_step(self) -> str | None:
        kind, size_bytes, fixed = _TYPES[self._header[0]]
        if len(self._header) < 1 + size_bytes:
            return None  # the length field has not fully arrived
        length = int.from_bytes(self._header[1 : 1 + size_bytes], "big") if size_bytes else fixed
        self._header.clear()
        room = self.max_frame - self.pos
        if kind in (_STR, _BIN, _EXT):
            payload = length + (1 if kind == _EXT else 0)
            if payload > room:
                name = {_STR: "str", _BIN: "bin", _EXT: "ext"}[kind]
                return f"a {name} of {length} bytes"
            self._skip = payload
            if not payload:
                self._item_done()
        elif kind in (_ARRAY, _MAP):
            count = length * (2 if kind == _MAP else 1)
            if count > room:  # every item takes at least one byte
                name = "an array" if kind == _ARRAY else "a map"
                return f"{name} of {length} items"
            if count:
                self._items.append(count)  # done when its items are
            else:
                self._item_done()
        else:
            self._skip = fixed
            if not fixed:
                self._item_done()
        return None

    def _item_done(self) -> None:
        items = self._items
        while items:
            items[-1] -= 1
            if items[-1]:
                return
            items.pop()
        self.done = True
