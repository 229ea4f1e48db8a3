"""A command streamed from a sandbox: ``AsyncProcess``, in the idiom of ``asyncio.subprocess``.

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
bound, or ``aclose()`` the process to stop following (later output is then
dropped). ``communicate()`` lifts the bound itself: it returns everything
anyway, so writing its input never waits on unread output. The exit comes
after all output and is never refused.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from typing import Any

from sandboxd.wire.errors import Conflict, NotFound

from ..channels import FINAL, AsyncChannel, Item, Lanes
from ..connection import AsyncConnection
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
    "AsyncProcess",
    "AsyncStreamReader",
    "AsyncStreamWriter",
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
    conn: AsyncConnection, exec_id: str, max_buffer: int | None
) -> AsyncChannel:
    return conn.open_channel(_NOTIFICATIONS, key=exec_id, maxsize=max_buffer, lanes=EXEC_LANES)


async def start_process(
    conn: AsyncConnection,
    params: dict[str, Any],
    *,
    stdin: bool,
    tty: bool,
    max_buffer: int | None = DEFAULT_MAX_BUFFER,
) -> AsyncProcess:
    """``exec.start`` with ``params``; the process, following its output from the start.

    The output channel is opened as the reply is routed, before any
    notification that follows it.
    """
    opened: list[AsyncChannel] = []

    def on_reply(reply: Any) -> tuple[str, AsyncChannel]:
        exec_id = _str(_as_map(reply, "the exec.start reply").get("exec_id"))
        if not exec_id:
            raise UnexpectedReply("exec.start replied without an exec_id.")
        opened.append(_open_channel(conn, exec_id, max_buffer))
        return exec_id, opened[-1]

    try:
        exec_id, channel = await conn.call("exec.start", named_params(params),
                                           on_result=on_reply)
    except BaseException:
        for channel in opened:  # the reply came but its caller went away: stop following
            channel.close()
        raise
    return AsyncProcess(conn, exec_id, channel, stdin=stdin, tty=tty)


async def attach_process(
    conn: AsyncConnection,
    exec_id: str,
    offset: int = 0,
    *,
    max_buffer: int | None = DEFAULT_MAX_BUFFER,
) -> AsyncProcess:
    """``exec.attach``: follow ``exec_id`` from byte ``offset`` (of both streams together)."""
    channel = _open_channel(conn, exec_id, max_buffer)  # the replay may follow the reply at once
    try:
        reply = await conn.call("exec.attach",
                                named_params({"exec_id": exec_id, "offset": offset}))
        start = _int(_as_map(reply, "the exec.attach reply").get("offset"), offset)
    except BaseException:
        channel.close()
        raise
    return AsyncProcess(conn, exec_id, channel, stdin=None, tty=None, offset=start)


class AsyncProcess:
    """A command in a sandbox, like ``asyncio.subprocess.Process`` (made by ``client.start``).

    ``stdin`` writes (``await proc.stdin.write(data)``,
    ``await proc.stdin.close()``); ``stdout`` and ``stderr`` read
    (``await proc.stdout.read()``, ``async for chunk in proc.stdout``);
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
        conn: AsyncConnection,
        exec_id: str,
        channel: AsyncChannel,
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
        self.stdin = AsyncStreamWriter(self, stdin)
        self.stdout = AsyncStreamReader(self, "stdout")
        self.stderr = AsyncStreamReader(self, "stderr")

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
        """True until ``aclose()``: this connection receives the output."""
        return not self._channel.closed

    # -- output -------------------------------------------------------------------

    async def _next(self, lane: str | None, until: float | None) -> tuple[str, bytes] | None:
        """The next chunk of ``lane`` (None: of any stream), or None at the end."""
        while True:
            method, params = await self._channel.get(remaining(until), lane=lane)
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

    async def output(self) -> AsyncIterator[tuple[str, bytes]]:
        """``async for stream, data in proc.output()``: both streams in arrival order.

        Ends when the command exited and its output was read (the exit is
        then known). With a tty all output is ``"stdout"``.
        """
        while (chunk := await self._next(None, None)) is not None:
            yield chunk

    # -- control ------------------------------------------------------------------

    async def _call(self, method: str, timeout: float | None = None,  # noqa: ASYNC109
                    **params: Any) -> Any:
        return await self._conn.call(method, named_params({"exec_id": self.exec_id, **params}),
                                     timeout=timeout)

    async def wait(self, timeout: float | None = None) -> int:  # noqa: ASYNC109
        """Wait until the command exits; its exit code (``TimeoutError`` after ``timeout`` s).

        Output keeps being buffered meanwhile, up to the bound of the
        buffering rule: when the command may write more than that, read it
        (or use ``communicate()``). After ``aclose()`` this asks the daemon
        (``exec.wait``) instead.
        """
        done = self.exit
        if done is None:
            if self._channel.closed:
                done = self._exited(await self._call("exec.wait", timeout))
            else:
                _, params = await self._channel.get(timeout, lane=FINAL)
                done = self._exited(_payload(params))
        return done.exit_code

    async def communicate(
        self, input: bytes | None = None, timeout: float | None = None  # noqa: ASYNC109
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
                    await self.stdin._write(input, until)
                await self.stdin._close(until)
            except STDIN_GONE:
                pass  # it stopped reading (or exited): like a broken pipe, not an error
        out = await self.stdout._read_all(until)
        err = await self.stderr._read_all(until)
        await self.wait(remaining(until))
        return out, err

    async def write(self, data: bytes | bytearray | memoryview) -> None:
        """Same as ``await proc.stdin.write(data)``."""
        await self.stdin.write(data)

    async def close_stdin(self) -> None:
        """Same as ``await proc.stdin.close()``."""
        await self.stdin.close()

    async def kill(self, signal: int | None = None) -> None:
        """``exec.kill``: send ``signal`` (default 9: the command and everything it started)."""
        await self._call("exec.kill", signal=signal)

    async def send_signal(self, signal: int) -> None:
        """Send ``signal`` to the command (``exec.kill`` with that signal)."""
        await self.kill(signal)

    async def terminate(self) -> None:
        """Send SIGTERM."""
        await self.kill(15)

    async def resize(self, rows: int, cols: int) -> None:
        """``exec.resize``: the tty's new size (for a command started with ``tty=True``)."""
        await self._call("exec.resize", rows=rows, cols=cols)

    async def aclose(self) -> None:
        """Stop following the output on this connection (it is dropped from now on).

        The command is not killed: a command that was not detached still ends
        when its connection closes. ``wait()`` then asks the daemon.
        Idempotent.
        """
        self._channel.close()


class AsyncStreamReader:
    """One output stream of an ``AsyncProcess``: ``proc.stdout`` or ``proc.stderr``.

    ``read(n)`` and ``readline()`` as ``asyncio.StreamReader``'s; iterating
    yields chunks as they arrive. The end of the stream is the command's
    exit (after which its buffered output is still read).
    """

    def __init__(self, proc: AsyncProcess, stream: str) -> None:
        self._proc = proc
        self.stream = stream
        self._pending = b""

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self._proc.exec_id} {self.stream}>"

    async def _chunk(self, until: float | None) -> bytes | None:
        if self._pending:
            data, self._pending = self._pending, b""
            return data
        got = await self._proc._next(self.stream, until)
        return None if got is None else got[1]

    async def _read_all(self, until: float | None) -> bytes:
        parts: list[bytes] = []
        try:
            while (data := await self._chunk(until)) is not None:
                parts.append(data)
        except BaseException:
            self._pending = b"".join(parts)  # a timeout or cancellation loses nothing
            raise
        return b"".join(parts)

    async def read(self, n: int = -1) -> bytes:
        """Up to ``n`` bytes (at least one unless at the end: then b""); ``n < 0``: to the end."""
        if n < 0:
            return await self._read_all(None)
        if n == 0:
            return b""
        data = await self._chunk(None)
        if data is None:
            return b""
        if len(data) > n:
            data, self._pending = data[:n], data[n:]
        return data

    async def readline(self) -> bytes:
        """Up to and including the next b"\\n" (less at the end; b"" once at the end)."""
        parts: list[bytes] = []
        try:
            while (data := await self._chunk(None)) is not None:
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

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self._chunks()

    async def _chunks(self) -> AsyncIterator[bytes]:
        while (data := await self._chunk(None)) is not None:
            yield data


class AsyncStreamWriter:
    """The stdin of an ``AsyncProcess``: ``await proc.stdin.write(data)``, ``.close()``.

    ``enabled`` says whether the command was started with ``stdin=True``
    (None when unknown: an attached process). Each ``write`` returns once the
    daemon has handed the bytes on; larger ones go in 1 MiB pieces, in order.
    Writes must not overlap (await one before starting the next).
    """

    def __init__(self, proc: AsyncProcess, enabled: bool | None) -> None:
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

    async def _write(self, data: bytes | bytearray | memoryview, until: float | None) -> None:
        self._check()
        view = memoryview(data).cast("B")
        for start in range(0, len(view), WRITE_CHUNK):
            await self._proc._call("exec.write", remaining(until),
                                   data=bytes(view[start:start + WRITE_CHUNK]))

    async def _close(self, until: float | None) -> None:
        if self.closed or self.enabled is False:
            self.closed = True
            return
        await self._proc._call("exec.close_stdin", remaining(until))
        self.closed = True

    async def write(self, data: bytes | bytearray | memoryview) -> None:
        """Send ``data`` to the command's stdin; returns once the daemon handed it on."""
        await self._write(data, None)

    async def close(self) -> None:
        """Close the command's stdin (it sees end of file). Idempotent."""
        await self._close(None)

