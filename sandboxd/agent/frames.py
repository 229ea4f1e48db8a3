"""The daemon side of the agent channel (``PROTOCOL.md``, version 1): a pure frame codec.

Owns: the frame format, an encoder for every daemon -> agent frame (``encode_*``), and an
incremental :class:`Decoder` for the agent -> daemon byte stream that first syncs on the
daemon's ``HELLO`` nonce and then yields typed frames one at a time, raising
:class:`ChannelViolation` on anything malformed. Also the parsers of ``STATE`` records,
``FRESULT`` bodies and file entries.

Must not: do I/O, use asyncio, know about Docker, or track exec state (unknown execs, offsets,
windows, budgets are the daemon's checks). Standard library only.

Decoding cost matters (100+ MB/s of output): an ``OUTPUT`` payload is a ``memoryview`` into
the bytes that were fed, copied only when a frame straddles two ``feed`` calls.
"""

from __future__ import annotations

import os
import struct
import zlib
from collections import deque
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from enum import IntEnum
from typing import Final

PROTOCOL_VERSION: Final = 1
MAGIC: Final = b"SB"
HEADER_LEN: Final = 24
MAX_PAYLOAD: Final = 1 << 20
RING: Final = 1 << 20
SEND_WINDOW: Final = 1 << 20
STDIN_WINDOW: Final = 1 << 20
MAX_EXECS: Final = 128
DRAIN_QUIET_MS: Final = 50
DRAIN_MAX_MS: Final = 2000
PARTIAL_FRAME_MS: Final = 250
NONCE_LEN: Final = 16
PING_MAX: Final = 64
FREAD_MAX: Final = MAX_PAYLOAD - 16
STATE_RECORD_LEN: Final = 48
_U64_MAX: Final = (1 << 64) - 1


class FrameType(IntEnum):
    HELLO = 0x01
    START = 0x02
    STDIN = 0x03
    CLOSE_STDIN = 0x04
    SIGNAL = 0x05
    RESIZE = 0x06
    ACK = 0x07
    RELEASE = 0x08
    PING = 0x09
    REWIND = 0x0A
    FREAD = 0x10
    FWRITE = 0x11
    FSTAT = 0x12
    FLIST = 0x13
    STATE = 0x81
    STARTED = 0x82
    START_FAILED = 0x83
    OUTPUT = 0x84
    EXIT = 0x85
    STDIN_ACK = 0x86
    ERROR = 0x87
    PONG = 0x89
    REWOUND = 0x8A
    FRESULT = 0x90


class ErrorCode(IntEnum):
    BAD_FRAME = 1
    BAD_PAYLOAD = 2
    UNKNOWN_EXEC = 3
    STDIN_OVERFLOW = 4


# START flags
START_TTY: Final = 1
START_STDIN: Final = 2
START_DETACHED: Final = 4
# FWRITE flags
FWRITE_TRUNCATE: Final = 1
FWRITE_PARENTS: Final = 2
# OUTPUT flags: the stream
STDOUT: Final = 1
STDERR: Final = 2
# STATE record flags
REC_DETACHED: Final = 1
REC_TTY: Final = 2
REC_STDIN_OPEN: Final = 4
REC_EXITED: Final = 8
REC_TREE_ALIVE: Final = 16

_HEAD20 = struct.Struct("<2sBBIQI")
_HEADER = struct.Struct("<2sBBIQII")
_U16 = struct.Struct("<H")
_U32 = struct.Struct("<I")
_I32 = struct.Struct("<i")
_U64 = struct.Struct("<Q")
_CODED = struct.Struct("<iI")  # i32 code / errno, u32 message length
_EXIT = struct.Struct("<iBBHQ")
_RECORD = struct.Struct("<QBBBBiQQQQ")
_STATE_HEAD = struct.Struct("<16sIII")
_ENTRY = struct.Struct("<QIqH")


class ChannelViolation(Exception):
    """The agent sent something the protocol does not allow: the channel must be dropped."""


# ---- encoding (daemon -> agent) -----------------------------------------------------------


def new_nonce() -> bytes:
    """A fresh random HELLO nonce."""
    return os.urandom(NONCE_LEN)


def encode_frame(ftype: int, ident: int, payload: bytes = b"", flags: int = 0) -> bytes:
    """One complete frame with both CRCs."""
    if len(payload) > MAX_PAYLOAD:
        raise ValueError(f"payload of {len(payload)} bytes exceeds MAX_PAYLOAD")
    if not 0 <= ident <= _U64_MAX:
        raise ValueError(f"id {ident} is not a u64")
    head = _HEAD20.pack(MAGIC, ftype, flags, len(payload), ident, zlib.crc32(payload))
    return head + _U32.pack(zlib.crc32(head)) + payload


def _exec_id(exec_id: int) -> int:
    if not 0 < exec_id <= _U64_MAX:
        raise ValueError(f"exec id {exec_id} must be a non-zero u64")
    return exec_id


def _text(value: str | bytes, what: str) -> bytes:
    raw = value.encode("utf-8", "surrogateescape") if isinstance(value, str) else bytes(value)
    if b"\0" in raw:
        raise ValueError(f"{what} must not contain NUL")
    return raw


def _abs_path(path: str | bytes) -> bytes:
    return _text(path, "path")


def encode_hello(nonce: bytes) -> bytes:
    if len(nonce) != NONCE_LEN:
        raise ValueError("a HELLO nonce is 16 bytes")
    return encode_frame(FrameType.HELLO, 0, nonce + _U32.pack(PROTOCOL_VERSION))


def encode_start(
    exec_id: int,
    argv: Sequence[str | bytes],
    *,
    env: Mapping[str, str] | Mapping[bytes, bytes] | None = None,
    cwd: str | bytes = b"",
    tty: bool = False,
    stdin: bool = False,
    detached: bool = False,
    timeout_ms: int = 0,
    rows: int = 0,
    cols: int = 0,
) -> bytes:
    """START: run argv; env is laid over the agent's own environment."""
    if not argv:
        raise ValueError("argv must not be empty")
    if not 0 <= timeout_ms <= 0xFFFFFFFF:
        raise ValueError("timeout_ms must fit a u32")
    if not (0 <= rows <= 0xFFFF and 0 <= cols <= 0xFFFF):
        raise ValueError("rows and cols must fit a u16")
    flags = (START_TTY if tty else 0) | (START_STDIN if stdin else 0)
    flags |= START_DETACHED if detached else 0
    args = [_text(a, "an argument") for a in argv]
    entries: list[bytes] = []
    for key, value in (env or {}).items():
        k = _text(key, "an environment key")
        if not k or b"=" in k:
            raise ValueError(f"invalid environment key {k!r}")
        entries.append(k + b"=" + _text(value, "an environment value"))
    cwd_raw = _text(cwd, "cwd")
    parts = [
        struct.pack("<IIHHIII", flags, timeout_ms, rows, cols, len(args), len(entries),
                    len(cwd_raw)),
        cwd_raw,
    ]
    for item in (*args, *entries):
        parts.append(_U32.pack(len(item)))
        parts.append(item)
    return encode_frame(FrameType.START, _exec_id(exec_id), b"".join(parts))


def encode_stdin(exec_id: int, data: bytes) -> bytes:
    return encode_frame(FrameType.STDIN, _exec_id(exec_id), bytes(data))


def encode_close_stdin(exec_id: int) -> bytes:
    return encode_frame(FrameType.CLOSE_STDIN, _exec_id(exec_id))


def encode_signal(exec_id: int, signo: int) -> bytes:
    return encode_frame(FrameType.SIGNAL, _exec_id(exec_id), _U32.pack(signo))


def encode_resize(exec_id: int, rows: int, cols: int) -> bytes:
    return encode_frame(FrameType.RESIZE, _exec_id(exec_id), struct.pack("<HH", rows, cols))


def encode_ack(exec_id: int, offset: int) -> bytes:
    return encode_frame(FrameType.ACK, _exec_id(exec_id), _U64.pack(offset))


def encode_release(exec_id: int) -> bytes:
    return encode_frame(FrameType.RELEASE, _exec_id(exec_id))


def encode_ping(ident: int, data: bytes = b"") -> bytes:
    if len(data) > PING_MAX:
        raise ValueError("a PING carries at most 64 bytes")
    return encode_frame(FrameType.PING, ident, bytes(data))


def encode_rewind(exec_id: int, offset: int) -> bytes:
    return encode_frame(FrameType.REWIND, _exec_id(exec_id), _U64.pack(offset))


def encode_fread(request_id: int, path: str | bytes, offset: int = 0,
                 length: int = FREAD_MAX) -> bytes:
    return encode_frame(FrameType.FREAD, request_id,
                        struct.pack("<QI", offset, length) + _abs_path(path))


def encode_fwrite(request_id: int, path: str | bytes, data: bytes, *, offset: int = 0,
                  mode: int = 0, truncate: bool = False, parents: bool = False) -> bytes:
    raw = _abs_path(path)
    flags = (FWRITE_TRUNCATE if truncate else 0) | (FWRITE_PARENTS if parents else 0)
    head = struct.pack("<QIII", offset, mode, flags, len(raw))
    return encode_frame(FrameType.FWRITE, request_id, head + raw + bytes(data))


def encode_fstat(request_id: int, path: str | bytes) -> bytes:
    return encode_frame(FrameType.FSTAT, request_id, _abs_path(path))


def encode_flist(request_id: int, path: str | bytes) -> bytes:
    return encode_frame(FrameType.FLIST, request_id, _abs_path(path))


# ---- decoded frames (agent -> daemon) -----------------------------------------------------


@dataclass(frozen=True, slots=True)
class ExecRecord:
    """One exec as STATE reports it."""

    exec_id: int
    detached: bool
    tty: bool
    stdin_open: bool
    exited: bool
    tree_alive: bool
    timed_out: bool
    signaled: bool
    exit_code: int
    start_offset: int
    end_offset: int
    acked: int
    stdin_consumed: int


@dataclass(frozen=True, slots=True)
class State:
    nonce: bytes
    protocol_version: int
    agent_version: int
    execs: tuple[ExecRecord, ...]


@dataclass(frozen=True, slots=True)
class Started:
    exec_id: int
    pid: int


@dataclass(frozen=True, slots=True)
class StartFailed:
    exec_id: int
    errno: int
    message: str


@dataclass(frozen=True, slots=True)
class Output:
    """Output bytes of one stream: ``data`` is a view into the fed bytes (copy to keep)."""

    exec_id: int
    stream: int  # STDOUT or STDERR
    offset: int
    data: memoryview

    @property
    def end(self) -> int:
        return self.offset + len(self.data)


@dataclass(frozen=True, slots=True)
class Exit:
    exec_id: int
    exit_code: int
    signaled: bool
    timed_out: bool
    end_offset: int


@dataclass(frozen=True, slots=True)
class StdinAck:
    exec_id: int
    consumed: int


@dataclass(frozen=True, slots=True)
class Error:
    ident: int
    code: int
    message: str


@dataclass(frozen=True, slots=True)
class Pong:
    ident: int
    data: bytes


@dataclass(frozen=True, slots=True)
class Rewound:
    exec_id: int
    offset: int


@dataclass(frozen=True, slots=True)
class FResult:
    """The answer to a file request; parse ``body`` with the parser of the request's kind."""

    request_id: int
    errno: int
    body: bytes


AgentFrame = (
    State | Started | StartFailed | Output | Exit | StdinAck | Error | Pong | Rewound | FResult
)


@dataclass(frozen=True, slots=True)
class FileEntry:
    name: bytes  # the last path component, raw
    size: int
    mode: int  # st_mode, type bits included
    mtime_ns: int

    @property
    def is_dir(self) -> bool:
        return (self.mode & 0o170000) == 0o040000


# ---- payload parsers ----------------------------------------------------------------------


def _need(cond: bool, what: str) -> None:
    if not cond:
        raise ChannelViolation(what)


def _exact(payload: memoryview, size: int, name: str) -> None:
    _need(len(payload) == size, f"{name} payload is {len(payload)} bytes, not {size}")


def _nonzero(ident: int, name: str) -> int:
    _need(ident != 0, f"{name} for exec id 0")
    return ident


def _coded(payload: memoryview, name: str) -> tuple[int, str]:
    _need(len(payload) >= _CODED.size, f"{name} payload too short")
    code, length = _CODED.unpack_from(payload)
    _need(len(payload) == _CODED.size + length, f"{name} message length does not match")
    return code, bytes(payload[_CODED.size:]).decode("utf-8", "replace")


def parse_state(payload: bytes | memoryview) -> State:
    """A STATE payload (raises ChannelViolation when malformed)."""
    view = memoryview(payload)
    _need(len(view) >= _STATE_HEAD.size, "STATE payload too short")
    nonce, version, agent_version, count = _STATE_HEAD.unpack_from(view)
    _need(count <= MAX_EXECS, f"STATE lists {count} execs, over MAX_EXECS")
    _need(len(view) == _STATE_HEAD.size + count * STATE_RECORD_LEN,
          "STATE length does not match its record count")
    records = []
    for i in range(count):
        (exec_id, flags, timed_out, signaled, zero, exit_code, start, end, acked,
         consumed) = _RECORD.unpack_from(view, _STATE_HEAD.size + i * STATE_RECORD_LEN)
        _need(exec_id != 0, "STATE record with exec id 0")
        _need(flags < 32 and timed_out <= 1 and signaled <= 1 and zero == 0,
              "STATE record with unknown flags")
        _need(start <= end and acked <= end, "STATE record offsets out of order")
        records.append(ExecRecord(
            exec_id=exec_id, detached=bool(flags & REC_DETACHED), tty=bool(flags & REC_TTY),
            stdin_open=bool(flags & REC_STDIN_OPEN), exited=bool(flags & REC_EXITED),
            tree_alive=bool(flags & REC_TREE_ALIVE), timed_out=bool(timed_out),
            signaled=bool(signaled), exit_code=exit_code, start_offset=start, end_offset=end,
            acked=acked, stdin_consumed=consumed))
    return State(bytes(nonce), version, agent_version, tuple(records))


def parse_fread_body(body: bytes) -> tuple[int, bytes]:
    """The body of a successful FREAD's FRESULT: (file size, data)."""
    if len(body) < 8:
        raise ChannelViolation("FREAD result too short")
    return _U64.unpack_from(body)[0], body[8:]


def _entry_at(body: bytes | memoryview, at: int) -> tuple[FileEntry, int]:
    _need(len(body) - at >= _ENTRY.size, "file entry too short")
    size, mode, mtime_ns, name_len = _ENTRY.unpack_from(body, at)
    end = at + _ENTRY.size + name_len
    _need(end <= len(body), "file entry name exceeds the payload")
    name = bytes(body[at + _ENTRY.size:end])
    _need(name_len > 0 and b"\0" not in name, "file entry with an empty or NUL name")
    return FileEntry(name, size, mode, mtime_ns), end


def parse_entry(body: bytes) -> FileEntry:
    """The body of a successful FSTAT's FRESULT: one entry."""
    entry, end = _entry_at(body, 0)
    _need(end == len(body), "trailing bytes after a file entry")
    return entry


def parse_entries(body: bytes) -> list[FileEntry]:
    """The body of a successful FLIST's FRESULT: u32 count, then the entries."""
    _need(len(body) >= 4, "FLIST result too short")
    (count,) = _U32.unpack_from(body)
    entries = []
    at = 4
    for _ in range(count):
        entry, at = _entry_at(body, at)
        entries.append(entry)
    _need(at == len(body), "trailing bytes after the file entries")
    return entries


def _decode(ftype: int, ident: int, flags: int, payload: memoryview) -> AgentFrame:
    if ftype == FrameType.OUTPUT:
        _need(flags in (STDOUT, STDERR), f"OUTPUT with stream flags {flags}")
        _need(len(payload) > 8, "OUTPUT without data")
        return Output(_nonzero(ident, "OUTPUT"), flags, _U64.unpack_from(payload)[0],
                      payload[8:])
    _need(flags == 0, f"frame type {ftype:#x} with flags {flags}")
    if ftype == FrameType.STATE:
        _need(ident == 0, "STATE with a non-zero id")
        return parse_state(payload)
    if ftype == FrameType.STDIN_ACK:
        _exact(payload, 8, "STDIN_ACK")
        return StdinAck(_nonzero(ident, "STDIN_ACK"), _U64.unpack_from(payload)[0])
    if ftype == FrameType.EXIT:
        _exact(payload, _EXIT.size, "EXIT")
        code, signaled, timed_out, zero, end = _EXIT.unpack_from(payload)
        _need(signaled <= 1 and timed_out <= 1 and zero == 0, "EXIT with unknown flags")
        return Exit(_nonzero(ident, "EXIT"), code, bool(signaled), bool(timed_out), end)
    if ftype == FrameType.STARTED:
        _exact(payload, 4, "STARTED")
        (pid,) = _I32.unpack_from(payload)
        _need(pid > 0, f"STARTED with pid {pid}")
        return Started(_nonzero(ident, "STARTED"), pid)
    if ftype == FrameType.START_FAILED:
        err, msg = _coded(payload, "START_FAILED")
        return StartFailed(_nonzero(ident, "START_FAILED"), err, msg)
    if ftype == FrameType.ERROR:
        code, msg = _coded(payload, "ERROR")
        return Error(ident, code, msg)
    if ftype == FrameType.PONG:
        _need(len(payload) <= PING_MAX, "PONG over 64 bytes")
        return Pong(ident, bytes(payload))
    if ftype == FrameType.REWOUND:
        _exact(payload, 8, "REWOUND")
        return Rewound(_nonzero(ident, "REWOUND"), _U64.unpack_from(payload)[0])
    if ftype == FrameType.FRESULT:
        _need(len(payload) >= 4, "FRESULT payload too short")
        (err,) = _I32.unpack_from(payload)
        _need(err >= 0, f"FRESULT with errno {err}")
        _need(err == 0 or len(payload) == 4, "failed FRESULT with a body")
        return FResult(ident, err, bytes(payload[4:]))
    raise ChannelViolation(f"unknown frame type {ftype:#x}")


_AGENT_TYPES: Final = frozenset({
    FrameType.STATE, FrameType.STARTED, FrameType.START_FAILED, FrameType.OUTPUT,
    FrameType.EXIT, FrameType.STDIN_ACK, FrameType.ERROR, FrameType.PONG, FrameType.REWOUND,
    FrameType.FRESULT,
})
_STATE_MARK: Final = MAGIC + bytes([FrameType.STATE])


# ---- decoding ------------------------------------------------------------------------------


class Decoder:
    """Incremental agent -> daemon decoder.

    ``feed`` the bytes the agent wrote (engine headers already removed), then call ``next``
    until it returns None. Before the STATE frame carrying the awaited HELLO nonce, bytes are
    discarded (``discarded`` counts them); from that STATE on every frame must be valid, else
    ChannelViolation is raised (and again on every later call).
    """

    def __init__(self, nonce: bytes) -> None:
        if len(nonce) != NONCE_LEN:
            raise ValueError("a HELLO nonce is 16 bytes")
        self._nonce = nonce
        self._synced = False
        self._chunks: deque[memoryview] = deque()
        self._avail = 0
        self._broken: ChannelViolation | None = None
        self.discarded = 0

    @property
    def synced(self) -> bool:
        """Whether the STATE with the awaited nonce has been found."""
        return self._synced

    def expect(self, nonce: bytes) -> None:
        """Await another nonce (the daemon resent HELLO); only before syncing."""
        if self._synced:
            raise RuntimeError("the decoder is already in step")
        if len(nonce) != NONCE_LEN:
            raise ValueError("a HELLO nonce is 16 bytes")
        self._nonce = nonce

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        """Add received bytes. bytes, and memoryview slices of bytes (e.g. the payloads of the
        engine's stream frames), are kept without copying; anything else is copied."""
        if not data:
            return
        if isinstance(data, memoryview) and isinstance(data.obj, bytes) and data.contiguous:
            view = data.cast("B") if data.format != "B" else data
        else:
            view = memoryview(data if isinstance(data, bytes) else bytes(data))
        self._chunks.append(view)
        self._avail += len(view)

    def __iter__(self) -> Iterator[AgentFrame]:
        while (frame := self.next()) is not None:
            yield frame

    def next(self) -> AgentFrame | None:
        """The next complete frame, or None when more bytes are needed."""
        if self._broken is not None:
            raise self._broken
        try:
            if not self._synced and not self._sync():
                return None
            return self._next_frame()
        except ChannelViolation as exc:
            self._broken = exc
            self._chunks.clear()
            self._avail = 0
            raise

    # -- internals --

    def _drop(self, n: int) -> None:
        self._avail -= n
        while n:
            head = self._chunks[0]
            if len(head) <= n:
                n -= len(head)
                self._chunks.popleft()
            else:
                self._chunks[0] = head[n:]
                n = 0

    def _take(self, n: int) -> memoryview:
        """Consume n (<= available) bytes as one view; copies (once) only across chunks."""
        head = self._chunks[0]
        if len(head) >= n:
            self._drop(n)
            return head[:n]
        parts = []
        need = n
        while need:
            chunk = self._chunks[0]
            part = min(len(chunk), need)
            parts.append(chunk[:part])
            need -= part
            self._drop(part)
        return memoryview(b"".join(parts))

    def _peek(self, n: int) -> memoryview:
        head = self._chunks[0]
        if len(head) >= n:
            return head[:n]
        view = self._take(n)  # join the first chunks into one, then put it back in front
        self._chunks.appendleft(view)
        self._avail += n
        return view

    def _sync(self) -> bool:
        """Discard up to the STATE frame with the awaited nonce; True once found."""
        if self._avail == 0:
            return False
        raw = bytes(self._take(self._avail))
        at = 0
        while True:
            j = raw.find(_STATE_MARK, at)
            if j < 0:
                keep = max(at, len(raw) - 2)  # a magic may be cut at the end
                break
            if len(raw) - j < HEADER_LEN + NONCE_LEN:
                keep = j
                break
            _, _, _, length, ident, _, hcrc = _HEADER.unpack_from(raw, j)
            if (zlib.crc32(raw[j:j + 20]) == hcrc and ident == 0
                    and _STATE_HEAD.size <= length <= MAX_PAYLOAD
                    and raw[j + HEADER_LEN:j + HEADER_LEN + NONCE_LEN] == self._nonce):
                self.discarded += j
                self._chunks.appendleft(memoryview(raw)[j:])
                self._avail += len(raw) - j
                self._synced = True
                return True
            at = j + 1
        self.discarded += keep
        if keep < len(raw):
            self._chunks.appendleft(memoryview(raw)[keep:])
            self._avail += len(raw) - keep
        return False

    def _next_frame(self) -> AgentFrame | None:
        if self._avail < HEADER_LEN:
            return None
        head = self._peek(HEADER_LEN)
        magic, ftype, flags, length, ident, _, hcrc = _HEADER.unpack_from(head)
        if magic != MAGIC:
            raise ChannelViolation(f"bad magic {bytes(magic)!r}")
        if zlib.crc32(head[:20]) != hcrc:
            raise ChannelViolation("header CRC mismatch")
        if ftype not in _AGENT_TYPES:
            raise ChannelViolation(f"unknown frame type {ftype:#x}")
        if length > MAX_PAYLOAD:
            raise ChannelViolation(f"payload length {length} exceeds MAX_PAYLOAD")
        if self._avail < HEADER_LEN + length:
            return None
        frame = self._take(HEADER_LEN + length)
        return _decode(ftype, ident, flags, frame[HEADER_LEN:])
