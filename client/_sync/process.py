# GENERATED FILE: do not edit. Written by scripts/unasync.py from client/_async/process.py;
# edit that file and run `python scripts/unasync.py` (a test fails when they differ).
"""A command streamed from a sandbox: ``BlockingProcess``, in the idiom of ``asyncio.subprocess``.

This module owns the client side of SPEC §3's streaming exec: starting one
(``exec.start``) or following a detached one (``exec.attach``), and the
process object: its ``stdin`` writer (``exec.write`` in chunks of at most
1 MiB, each waiting for its reply, which is the daemon's back-pressure;
``exec.close_stdin``), its ``stdout`` and ``stderr`` readers, the combined
``output()`` iterator in arrival order, ``wait``, ``communicate``, ``kill``,
``resize``, and the buffering rule of its output. It must not touch sockets
or asyncio (``connection`` and ``_compat`` do), nor start tasks or threads.
Written once for both sides: ``scripts/unasync.py`` derives the blocking
module from the asyncio one.

The buffering rule. An exec's ``exec.output`` and ``exec.exit``
notifications go into one channel of the connection, sorted per stream as
the connection reads them, whatever the consumer is doing (reading one
stream, writing stdin, waiting, or calling something else). Each stream
buffers up to ``max_buffer`` unread bytes (default 8 MiB). When the stream
an output chunk belongs to is full, the connection stops reading (the daemon
then slows the command, and every other call on that connection waits)
until that stream is read. So a consumer that reads only stdout is never
stuck by stderr until stderr holds ``max_buffer`` unread bytes; past that it
must read stderr too. Read both (``output()``, ``communicate()``, or one
task or thread per stream), pass ``max_buffer=None`` to buffer without a
bound, or ``close()`` the process to stop following (later output is then
dropped). ``communicate()`` lifts the bound itself: it returns everything
anyway, so writing its input never waits on unread output. The exit comes
after all output and is never refused.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

from sandboxd.wire.errors import Conflict, NotFound

from ..channels import FINAL, BlockingChannel, Item, Lanes
from ..connection import BlockingConnection
from ..deadlines import deadline as make_deadline
from ..deadlines import remaining
from ..exceptions import UnexpectedReply
from ..models import ExecExit, _as_map, _bytes, _int, _str
from ..protocol import named_params

__all__ = [
    "DEFAULT_MAX_BUFFER",
    "STDIN_GONE",
    "STREAMS",
    "WRITE_CHUNK",
    "BlockingProcess",
    "BlockingStreamReader",
    "BlockingStreamWriter",
    "attach_process",
    "start_process",
]

DEFAULT_MAX_BUFFER = 8 * 1024 * 1024
"""Unread bytes buffered per output stream before the connection stops reading."""

WRITE_CHUNK = 1024 * 1024
"""The most bytes one ``exec.write`` carries; bigger writes are split."""

STREAMS = ("stdout", "stderr")

_NOTIFICATIONS = ("exec.output", "exec.exit")
STDIN_GONE = (Conflict, NotFound)
"""What writing to a command that no longer reads its stdin (or exited) gets: not a failure."""


def _stream_of(item: Item) -> str:
    params = item[1]
    return _str(params[1]) if len(params) > 1 else ""


def _size_of(item: Item) -> int:
    params = item[1]
    data = params[2] if len(params) > 2 else b""
    return len(data) if isinstance(data, (bytes, bytearray, str)) else 0


def _is_exit(item: Item) -> bool:
    return item[0] == "exec.exit"


EXEC_LANES = Lanes(lane_of=_stream_of, weigh=_size_of, is_final=_is_exit)
"""An exec's channel: one lane per stream weighed in bytes; ``exec.exit`` is final."""


def _payload(params: list[Any]) -> Mapping[str, Any]:
    value = params[1] if len(params) > 1 else None
    return value if isinstance(value, Mapping) else {}


def _open_channel(
    conn: BlockingConnection, exec_id: str, max_buffer: int | None
) -> BlockingChannel:
    return conn.open_channel(_NOTIFICATIONS, key=exec_id, maxsize=max_buffer, lanes=EXEC_LANES)


def start_process(
    conn: BlockingConnection,
    params: dict[str, Any],
    *,
    stdin: bool,
    tty: bool,
    max_buffer: int | None = DEFAULT_MAX_BUFFER,
) -> BlockingProcess:
    """``exec.start`` with ``params``; the process, following its output from the start.

    The output channel is opened as the reply is routed, before any
    notification that follows it.
    """
    opened: list[BlockingChannel] = []

    def on_reply(reply: Any) -> tuple[str, BlockingChannel]:
        exec_id = _str(_as_map(reply, "the exec.start reply").get("exec_id"))
        if not exec_id:
            raise UnexpectedReply("exec.start replied without an exec_id.")
        opened.append(_open_channel(conn, exec_id, max_buffer))
        return exec_id, opened[-1]

    try:
        exec_id, channel = conn.call("exec.start", named_params(params),
                                           on_result=on_reply)
    except BaseException:
        for channel in opened:  # the reply came but its caller went away: stop following
            channel.close()
        raise
    return BlockingProcess(conn, exec_id, channel, stdin=stdin, tty=tty)


def attach_process(
    conn: BlockingConnection,
    exec_id: str,
    offset: int = 0,
    *,
    max_buffer: int | None = DEFAULT_MAX_BUFFER,
) -> BlockingProcess:
    """``exec.attach``: follow ``exec_id`` from byte ``offset`` (of both streams together)."""
    channel = _open_channel(conn, exec_id, max_buffer)  # the replay may follow the reply at once
    try:
        reply = conn.call("exec.attach",
                                named_params({"exec_id": exec_id, "offset": offset}))
        start = _int(_as_map(reply, "the exec.attach reply").get("offset"), offset)
    except BaseException:
        channel.close()
        raise
    return BlockingProcess(conn, exec_id, channel, stdin=None, tty=None, offset=start)


class BlockingProcess:
    """A command in a sandbox, like ``asyncio.subprocess.Process`` (made by ``client.start``).

    ``stdin`` writes (``proc.stdin.write(data)``,
    ``proc.stdin.close()``); ``stdout`` and ``stderr`` read
    (``proc.stdout.read()``, ``for chunk in proc.stdout``);
    ``output()`` yields ``(stream, data)`` of both in arrival order. Use
    either the readers or ``output()`` for a given stretch of output: they
    take from the same buffers. ``returncode``, ``timed_out`` and
    ``duration`` are None until the exit is seen (by reading to the end,
    ``wait()`` or ``communicate()``). ``offset`` is where the output began:
    0 for a started command, the byte the replay really starts at for an
    attached one. See the module's buffering rule.
    """

    def __init__(
        self,
        conn: BlockingConnection,
        exec_id: str,
        channel: BlockingChannel,
        *,
        stdin: bool | None,
        tty: bool | None,
        offset: int = 0,
    ) -> None:
        self._conn = conn
        self._channel = channel
        self.exec_id = exec_id
        self.tty = tty
        self.offset = offset
        self.exit: ExecExit | None = None
        self.stdin = BlockingStreamWriter(self, stdin)
        self.stdout = BlockingStreamReader(self, "stdout")
        self.stderr = BlockingStreamReader(self, "stderr")

    def __repr__(self) -> str:
        state = "running" if self.exit is None else f"returncode={self.exit.exit_code}"
        return f"<{type(self).__name__} {self.exec_id} {state}>"

    @property
    def returncode(self) -> int | None:
        """The exit code once the exit was seen (137 after a kill), else None."""
        return None if self.exit is None else self.exit.exit_code

    @property
    def timed_out(self) -> bool | None:
        """Whether the daemon killed it at its ``timeout``, once the exit was seen."""
        return None if self.exit is None else self.exit.timed_out

    @property
    def duration(self) -> float | None:
        """How long it ran (seconds), once the exit was seen."""
        return None if self.exit is None else self.exit.duration

    @property
    def following(self) -> bool:
        """True until ``close()``: this connection receives the output."""
        return not self._channel.closed

    # -- output -------------------------------------------------------------------

    def _next(self, lane: str | None, until: float | None) -> tuple[str, bytes] | None:
        """The next chunk of ``lane`` (None: of any stream), or None at the end."""
        while True:
            method, params = self._channel.get(remaining(until), lane=lane)
            if method == "exec.exit":
                self._exited(_payload(params))
                return None
            data = _bytes(params[2]) if len(params) > 2 else b""
            if data:
                return _stream_of((method, params)), data

    def _exited(self, payload: Any) -> ExecExit:
        if self.exit is None:
            self.exit = ExecExit.from_wire(payload if isinstance(payload, Mapping) else {})
        return self.exit

    def _drained(self, stream: str) -> bool:
        return self._channel.final is not None and self._channel.weight(stream) == 0

    def output(self) -> Iterator[tuple[str, bytes]]:
        """``for stream, data in proc.output()``: both streams in arrival order.

        Ends when the command exited and its output was read (the exit is
        then known). With a tty all output is ``"stdout"``.
        """
        while (chunk := self._next(None, None)) is not None:
            yield chunk

    # -- control ------------------------------------------------------------------

    def _call(self, method: str, timeout: float | None = None,
                    **params: Any) -> Any:
        return self._conn.call(method, named_params({"exec_id": self.exec_id, **params}),
                                     timeout=timeout)

    def wait(self, timeout: float | None = None) -> int:
        """Wait until the command exits; its exit code (``TimeoutError`` after ``timeout`` s).

        Output keeps being buffered meanwhile, up to the bound of the
        buffering rule: when the command may write more than that, read it
        (or use ``communicate()``). After ``close()`` this asks the daemon
        (``exec.wait``) instead.
        """
        done = self.exit
        if done is None:
            if self._channel.closed:
                done = self._exited(self._call("exec.wait", timeout))
            else:
                _, params = self._channel.get(timeout, lane=FINAL)
                done = self._exited(_payload(params))
        return done.exit_code

    def communicate(
        self, input: bytes | None = None, timeout: float | None = None
    ) -> tuple[bytes, bytes]:
        """Send ``input`` (then close stdin), read all output, wait: ``(stdout, stderr)``.

        As ``asyncio``'s: stdin is closed when ``input`` is given or the
        command was started with ``stdin=True``; a command that stops
        reading its stdin early is not an error. The output is buffered
        without a bound from here on (it is all returned anyway), so this
        never waits on unread output. ``timeout`` bounds the whole of it:
        ``TimeoutError`` then loses no output, and ``communicate()`` again
        (without ``input``: stdin may be closed already) goes on.
        """
        until = make_deadline(timeout)
        self._channel.set_maxsize(None)
        if input is not None or self.stdin.enabled:
            try:
                if input is not None:
                    self.stdin._write(input, until)
                self.stdin._close(until)
            except STDIN_GONE:
                pass  # it stopped reading (or exited): like a broken pipe, not an error
        out = self.stdout._read_all(until)
        err = self.stderr._read_all(until)
        self.wait(remaining(until))
        return out, err

    def write(self, data: bytes | bytearray | memoryview) -> None:
        """Same as ``proc.stdin.write(data)``."""
        self.stdin.write(data)

    def close_stdin(self) -> None:
        """Same as ``proc.stdin.close()``."""
        self.stdin.close()

    def kill(self, signal: int | None = None) -> None:
        """``exec.kill``: send ``signal`` (default 9: the command and everything it started)."""
        self._call("exec.kill", signal=signal)

    def send_signal(self, signal: int) -> None:
        """Send ``signal`` to the command (``exec.kill`` with that signal)."""
        self.kill(signal)

    def terminate(self) -> None:
        """Send SIGTERM."""
        self.kill(15)

    def resize(self, rows: int, cols: int) -> None:
        """``exec.resize``: the tty's new size (for a command started with ``tty=True``)."""
        self._call("exec.resize", rows=rows, cols=cols)

    def close(self) -> None:
        """Stop following the output on this connection (it is dropped from now on).

        The command is not killed: a command that was not detached still ends
        when its connection closes. ``wait()`` then asks the daemon.
        Idempotent.
        """
        self._channel.close()


class BlockingStreamReader:
    """One output stream of an ``BlockingProcess``: ``proc.stdout`` or ``proc.stderr``.

    ``read(n)`` and ``readline()`` as ``asyncio.StreamReader``'s; iterating
    yields chunks as they arrive. The end of the stream is the command's
    exit (after which its buffered output is still read).
    """

    def __init__(self, proc: BlockingProcess, stream: str) -> None:
        self._proc = proc
        self.stream = stream
        self._pending = b""

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self._proc.exec_id} {self.stream}>"

    def _chunk(self, until: float | None) -> bytes | None:
        if self._pending:
            data, self._pending = self._pending, b""
            return data
        got = self._proc._next(self.stream, until)
        return None if got is None else got[1]

    def _read_all(self, until: float | None) -> bytes:
        parts: list[bytes] = []
        try:
            while (data := self._chunk(until)) is not None:
                parts.append(data)
        except BaseException:
            self._pending = b"".join(parts)  # a timeout or cancellation loses nothing
            raise
        return b"".join(parts)

    def read(self, n: int = -1) -> bytes:
        """Up to ``n`` bytes (at least one unless at the end: then b""); ``n < 0``: to the end."""
        if n < 0:
            return self._read_all(None)
        if n == 0:
            return b""
        data = self._chunk(None)
        if data is None:
            return b""
        if len(data) > n:
            data, self._pending = data[:n], data[n:]
        return data

    def readline(self) -> bytes:
        """Up to and including the next b"\\n" (less at the end; b"" once at the end)."""
        parts: list[bytes] = []
        try:
            while (data := self._chunk(None)) is not None:
                cut = data.find(b"\n") + 1
                if cut:
                    data, self._pending = data[:cut], data[cut:]
                    parts.append(data)
                    break
                parts.append(data)
        except BaseException:
            self._pending = b"".join(parts)  # a cancellation loses nothing
            raise
        return b"".join(parts)

    def at_eof(self) -> bool:
        """True when the command exited and everything of this stream was read."""
        return not self._pending and self._proc._drained(self.stream)

    def __iter__(self) -> Iterator[bytes]:
        return self._chunks()

    def _chunks(self) -> Iterator[bytes]:
        while (data := self._chunk(None)) is not None:
            yield data


class BlockingStreamWriter:
    """The stdin of an ``BlockingProcess``: ``proc.stdin.write(data)``, ``.close()``.

    ``enabled`` says whether the command was started with ``stdin=True``
    (None when unknown: an attached process). Each ``write`` returns once the
    daemon has handed the bytes on; larger ones go in 1 MiB pieces, in order.
    Writes must not overlap (one before starting the next).
    """

    def __init__(self, proc: BlockingProcess, enabled: bool | None) -> None:
        self._proc = proc
        self.enabled = enabled
        self.closed = False

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self._proc.exec_id} closed={self.closed}>"

    def _check(self) -> None:
        if self.enabled is False:
            raise ValueError(f"exec {self._proc.exec_id} was started without stdin=True; "
                             "it has no stdin to write to.")
        if self.closed:
            raise ValueError(f"the stdin of exec {self._proc.exec_id} is closed.")

    def _write(self, data: bytes | bytearray | memoryview, until: float | None) -> None:
        self._check()
        view = memoryview(data).cast("B")
        for start in range(0, len(view), WRITE_CHUNK):
            self._proc._call("exec.write", remaining(until),
                                   data=bytes(view[start:start + WRITE_CHUNK]))

    def _close(self, until: float | None) -> None:
        if self.closed or self.enabled is False:
            self.closed = True
            return
        self._proc._call("exec.close_stdin", remaining(until))
        self.closed = True

    def write(self, data: bytes | bytearray | memoryview) -> None:
        """Send ``data`` to the command's stdin; returns once the daemon handed it on."""
        self._write(data, None)

    def close(self) -> None:
        """Close the command's stdin (it sees end of file). Idempotent."""
        self._close(None)

