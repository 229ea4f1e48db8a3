"""The msgpack-RPC codec: bytes in, messages out, and messages to bytes.

This module owns the wire format of SPEC §2: pull-style incremental decoding
of a stream of concatenated msgpack objects split anywhere across reads (one
message at a time, so a reader can stop in the middle of what it received),
the frame size limit, the three message shapes, and their encoding. It performs no I/O and
knows nothing of asyncio, sockets, sandboxes or Docker: the daemon's server
and the client both sit on it, and it is tested with bytes alone.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import msgpack

from sandboxd.wire.errors import InvalidRequest, SandboxdError, TooLarge
from sandboxd.wire.framescan import FrameScan

REQUEST = 0
RESPONSE = 1
NOTIFICATION = 2

DEFAULT_MAX_FRAME = 16 * 1024 * 1024
MAX_MSGID = 2**32 - 1


@dataclass(frozen=True, slots=True)
class Request:
    msgid: int
    method: str
    params: list[Any]


@dataclass(frozen=True, slots=True)
class Response:
    msgid: int
    error: Any
    result: Any


@dataclass(frozen=True, slots=True)
class Notification:
    method: str
    params: list[Any]


@dataclass(frozen=True, slots=True)
class BadMessage:
    """Something the peer sent that is not a valid message.

    ``msgid`` is set when one could be read, so the peer can be answered with
    an error response. ``fatal`` means the byte stream cannot be trusted any
    further: the connection must be closed after reporting.
    """

    error: SandboxdError
    msgid: int | None
    fatal: bool


Message = Request | Response | Notification
Event = Request | Response | Notification | BadMessage


def _text(value: Any) -> str | None:
    """A method name as str, accepting msgpack bin too (SPEC: be liberal)."""
    if isinstance(value, str):
        return value if value.isascii() or _is_utf8(value) else None
    if isinstance(value, (bytes, bytearray)):
        try:
            return bytes(value).decode("utf-8")
        except UnicodeDecodeError:
            return None
    return None


def _is_utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # decoded from invalid UTF-8 with escapes
        return False
    return True


def _msgid(value: Any) -> int | None:
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= MAX_MSGID:
        return value
    return None


def parse_message(obj: Any) -> Message | BadMessage:
    """Classify one decoded msgpack object as a message, or explain why it is not."""
    # The common case first, with exact type checks (bool is not an int here).
    if (
        type(obj) is list
        and len(obj) == 4
        and obj[0] == REQUEST
        and type(obj[0]) is int
        and type(obj[1]) is int
        and 0 <= obj[1] <= MAX_MSGID
        and type(obj[2]) is str
        and obj[2].isascii()
        and type(obj[3]) is list
    ):
        return Request(obj[1], obj[2], obj[3])
    if not isinstance(obj, list) or not obj:
        return BadMessage(
            InvalidRequest(
                "A message must be a msgpack array: [0, msgid, method, params], "
                "[1, msgid, error, result] or [2, method, params]."
            ),
            None,
            fatal=True,
        )
    kind = obj[0]
    if kind == REQUEST and not isinstance(kind, bool):
        msgid = _msgid(obj[1]) if len(obj) > 1 else None
        if len(obj) != 4 or msgid is None:
            return BadMessage(
                InvalidRequest(
                    "A request must be [0, msgid, method, params] with msgid "
                    "an unsigned 32-bit integer."
                ),
                msgid,
                fatal=msgid is None,
            )
        method = _text(obj[2])
        if method is None:
            return BadMessage(InvalidRequest("The method name must be a string."), msgid, False)
        if not isinstance(obj[3], list):
            return BadMessage(
                InvalidRequest("Request params must be an array: [] or [{name: value, ...}]."),
                msgid,
                False,
            )
        return Request(msgid, method, obj[3])
    if kind == RESPONSE and not isinstance(kind, bool):
        msgid = _msgid(obj[1]) if len(obj) > 1 else None
        if len(obj) != 4 or msgid is None:
            return BadMessage(
                InvalidRequest("A response must be [1, msgid, error, result]."), None, True
            )
        return Response(msgid, obj[2], obj[3])
    if kind == NOTIFICATION and not isinstance(kind, bool):
        method = _text(obj[1]) if len(obj) > 1 else None
        if len(obj) != 3 or method is None or not isinstance(obj[2], list):
            return BadMessage(
                InvalidRequest("A notification must be [2, method, params]."), None, True
            )
        return Notification(method, obj[2])
    return BadMessage(
        InvalidRequest("The first element of a message must be 0, 1 or 2."), None, True
    )


def _peek_msgid(prefix: bytes) -> int | None:
    """Read the msgid at the head of a (possibly incomplete) request frame."""
    peek = msgpack.Unpacker(max_buffer_size=len(prefix) + 1)
    try:
        peek.feed(prefix)
        if peek.read_array_header() != 4 or peek.unpack() != REQUEST:
            return None
        return _msgid(peek.unpack())
    except Exception:
        return None


class Decoder:
    """Pull-style incremental decoder: ``feed(bytes)``, then ``next()`` one message at a time.

    ``next()`` returns the next complete message, or None when more bytes are
    needed. A caller may stop pulling at any moment (for example when it has
    too much work in flight) and resume later: bytes not yet decoded stay
    here, never turned into messages behind its back. A frame (one top-level
    msgpack object) larger than ``max_frame`` bytes is reported as
    ``too_large`` without buffering more than ``max_frame`` bytes of it. After
    a fatal ``BadMessage`` the decoder returns nothing more.
    """

    def __init__(self, max_frame: int = DEFAULT_MAX_FRAME) -> None:
        self.max_frame = max_frame
        # Liberal decoding keeps the stream in step: a map with non-string keys or a
        # string that is not UTF-8 is one bad request (answered, by msgid), not a reason
        # to drop the connection. Such values are refused later by the argument checks.
        self._unpacker = msgpack.Unpacker(
            raw=False,
            max_buffer_size=max_frame,
            strict_map_key=False,
            unicode_errors="surrogateescape",
        )
        self._backlog: deque[memoryview] = deque()  # received, not yet given to the unpacker
        self._backlog_size = 0
        self._fed = 0  # bytes given to the unpacker so far
        self._done = 0  # stream offset where the last decoded frame ended
        self._head = b""  # first bytes of the incomplete frame, to read a msgid on overflow
        self._head_at = -1  # stream offset where that frame starts
        self._last: memoryview = memoryview(b"")  # the chunk fed last, and where it starts
        self._last_at = 0
        self._scan_at = -1  # where the frame being scanned starts
        self._scanner = FrameScan(max_frame)
        self.broken = False

    @property
    def buffered(self) -> int:
        """Bytes received and not yet decoded into messages."""
        return self._fed - self._done + self._backlog_size

    @property
    def incomplete(self) -> bool:
        """True when everything received is decoded but the start of a next message:
        the decoder waits for the sender to finish it."""
        return not self._backlog and self._fed > self._done and not self.broken

    def release(self) -> None:
        """Drop every byte held (the connection is gone); the decoder is unusable after."""
        self.broken = True
        self._backlog.clear()
        self._backlog_size = 0
        self._last = memoryview(b"")
        self._unpacker = msgpack.Unpacker()  # the old one's buffer is freed now, not at GC
        self._fed = self._done = 0

    def feed(self, data: bytes) -> None:
        """Add received bytes (nothing is decoded until ``next()``)."""
        if data and not self.broken:
            self._backlog.append(memoryview(data))
            self._backlog_size += len(data)

    def next(self) -> Event | None:
        """The next message, a ``BadMessage``, or None when more bytes are needed."""
        if self.broken:
            return None
        unpacker = self._unpacker
        while True:
            try:
                obj = unpacker.unpack()
            except msgpack.OutOfData:
                self._note_head()
                doomed = self._scan()
                if doomed is not None:
                    return doomed
                if not self._backlog:
                    return None
                overflow = self._feed_more()
                if overflow is not None:
                    return overflow
                continue
            except Exception as exc:  # FormatError, StackError, bad UTF-8, bad map key ...
                self.broken = True
                return self._undecodable(exc)
            self._done = unpacker.tell()
            msg = parse_message(obj)
            if type(msg) is BadMessage and msg.fatal:
                self.broken = True
            return msg

    def __iter__(self) -> Iterator[Event]:
        """Every message decodable from what was fed so far."""
        while (msg := self.next()) is not None:
            yield msg

    def _feed_more(self) -> BadMessage | None:
        """Move backlog into the unpacker, up to what one frame may hold."""
        room = self.max_frame - (self._fed - self._done)
        if room <= 0:
            return self._overflow()
        chunk = self._backlog.popleft()
        if len(chunk) > room:
            self._backlog.appendleft(chunk[room:])
            chunk = chunk[:room]
        self._backlog_size -= len(chunk)
        chunk_at = self._fed
        self._unpacker.feed(chunk)
        self._fed += len(chunk)
        self._remember_head(chunk, chunk_at)
        return None

    def _note_head(self) -> None:
        """The frame at ``_done`` is incomplete: keep its first bytes (for its msgid)."""
        start = self._done
        if start != self._head_at:
            self._head_at = start
            self._head = bytes(self._last[max(0, start - self._last_at) :][:32])

    def _scan(self) -> BadMessage | None:
        """Refuse the incomplete frame now if what it declared cannot fit the limit."""
        if self._done != self._scan_at:
            self._scan_at = self._done
            self._scanner = FrameScan(self.max_frame)
        scanner = self._scanner
        if scanner.done:
            return None
        start = self._scan_at + scanner.pos - self._last_at
        if start < 0 or start >= len(self._last):
            return None
        reason = scanner.feed(self._last[start:])
        if reason is None:
            return None
        return self._overflow(reason)

    def _remember_head(self, chunk: memoryview, chunk_at: int) -> None:
        self._last, self._last_at = chunk, chunk_at
        if len(self._head) < 32 and self._head_at == self._done:
            self._head += bytes(chunk[: 32 - len(self._head)])

    def _undecodable(self, exc: Exception) -> BadMessage:
        if isinstance(exc, ValueError) and "exceeds max_" in str(exc):
            return self._overflow()
        return BadMessage(
            InvalidRequest(
                f"The bytes received are not valid msgpack ({type(exc).__name__}: {exc})."
            ),
            None,
            True,
        )

    def _overflow(self, declared: str | None = None) -> BadMessage:
        self.broken = True
        self._backlog.clear()
        self._backlog_size = 0
        what = (
            f"A message declares {declared}, more than fits the limit of {self.max_frame} bytes"
            if declared
            else f"A message is larger than the limit of {self.max_frame} bytes"
        )
        return BadMessage(
            TooLarge(
                f"{what}; send smaller payloads (for example, write a file in pieces).",
                {"limit": self.max_frame},
            ),
            _peek_msgid(self._head),
            fatal=True,
        )


_local = threading.local()


def _pack(obj: Any) -> bytes:
    # One Packer per thread: Packer is not thread-safe (the blocking client runs its own).
    packer = getattr(_local, "packer", None)
    if packer is None:
        packer = _local.packer = msgpack.Packer(use_bin_type=True)
    data: bytes = packer.pack(obj)
    return data


def encode(obj: Any) -> bytes:
    """Encode any wire value (str as str, bytes as bin)."""
    return _pack(obj)


def encode_request(msgid: int, method: str, params: list[Any]) -> bytes:
    return _pack([REQUEST, msgid, method, params])


def encode_response(msgid: int, error: Any, result: Any) -> bytes:
    return _pack([RESPONSE, msgid, error, result])


def encode_notification(method: str, params: list[Any]) -> bytes:
    return _pack([NOTIFICATION, method, params])
