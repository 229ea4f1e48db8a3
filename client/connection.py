"""The client's connections to sandboxd: the only module of the client that does socket I/O.

This module owns connecting to the daemon's Unix socket (tried again, within
the connect timeout, while the daemon's listen queue is full; the one-line
reasons a connect fails), writing frames, and reading them: an
``AsyncConnection`` (asyncio: a reader task per connection) and a
``BlockingConnection`` (no event loop, no thread: the calling threads take
turns reading the socket), both on the sans-IO codec
``sandboxd.wire.codec`` and the shared ``protocol.Router`` (pending calls by
msgid, notification routing, connection-loss bookkeeping). Notifications are
pulled from channels (``open_channel``) or pushed to callbacks
(``on_notification``). It must not know any method's meaning, retry or
reconnect behind the caller's back (a lost connection fails every waiter
with ``ConnectionLost`` and stays lost: make a new one), nor import anything
of ``sandboxd`` but ``sandboxd.wire``.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import math
import select
import socket
import threading
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from typing import Any, Self, TypeVar

from sandboxd.wire.codec import Decoder, encode_notification, encode_request
from sandboxd.wire.errors import ConnectionLost

from .channels import DEFAULT_CHANNEL_SIZE, AsyncChannel, BlockingChannel, Lanes, WhenFull
from .exceptions import ConnectFailed, copy_lost
from .paths import default_socket_path
from .protocol import NotificationHandler, OnResult, Router

__all__ = [
    "DEFAULT_CLIENT_MAX_FRAME",
    "AsyncConnection",
    "BlockingConnection",
]

log = logging.getLogger("sandboxd_client")

DEFAULT_CLIENT_MAX_FRAME = 64 * 1024 * 1024
_READ_SIZE = 256 * 1024
_CLOSED_BY_CLIENT = "The client closed its connection to sandboxd."

T = TypeVar("T")


def connect_message(path: str, exc: OSError) -> str:
    """The one sentence that says why connecting to ``path`` failed, and what to do."""
    if exc.errno == errno.ENOENT:
        return (f"sandboxd is not running at {path} (no such socket); start it, or point "
                "--socket / SANDBOXD_SOCKET at its socket.")
    if exc.errno == errno.ECONNREFUSED:
        return (f"sandboxd is not running at {path} (the socket exists but nothing "
                "accepts connections).")
    if exc.errno in (errno.EACCES, errno.EPERM):
        return (f"Permission denied connecting to sandboxd at {path}; the caller must be "
                "in the socket's group.")
    return f"Cannot connect to sandboxd at {path}: {exc.strerror or exc}."


# A Unix socket's connect() fails with EAGAIN at once while the daemon's listen queue is
# full (someone is flooding it with connections): try again, backing off, until the
# connect timeout, as a TCP connect would wait for its SYN to be answered.
_QUEUE_FULL_FIRST_WAIT = 0.005
_QUEUE_FULL_MAX_WAIT = 0.1


def _queue_full_waits(timeout: float) -> Iterator[float]:
    """The pauses between connect attempts while the listen queue is full, ending at
    ``timeout`` seconds from now."""
    deadline = time.monotonic() + timeout
    wait = _QUEUE_FULL_FIRST_WAIT
    while (left := deadline - time.monotonic()) > 0:
        yield min(wait, left)
        wait = min(wait * 2, _QUEUE_FULL_MAX_WAIT)


def _connect_tries(sock: socket.socket, path: str, timeout: float) -> Iterator[float]:
    """Connect ``sock`` to ``path``; while the listen queue is full, yield how long to
    pause before the next try (the caller sleeps its own way), until ``timeout``. The
    last try's error is the one raised."""
    for wait in _queue_full_waits(timeout):
        try:
            sock.connect(path)
            return
        except OSError as exc:
            if exc.errno not in (errno.EAGAIN, errno.EWOULDBLOCK):
                raise
        yield wait
    sock.connect(path)


class _Base:
    """What both connections share: settings, connect errors, callbacks."""

    _router: Router[Any]

    def __init__(
        self,
        path: str | None = None,
        *,
        connect_timeout: float = 5.0,
        max_frame: int = DEFAULT_CLIENT_MAX_FRAME,
    ) -> None:
        self.path: str | None = path if path else default_socket_path()
        self.connect_timeout = connect_timeout
        self.max_frame = max_frame
        self._where = f"sandboxd at {self.path}"
        self._decoder = Decoder(max_frame=max_frame)

    def fresh(self) -> Self:
        """A new, unconnected connection to the same socket with the same settings."""
        return type(self)(self.path, connect_timeout=self.connect_timeout,
                          max_frame=self.max_frame)

    @property
    def closed(self) -> bool:
        """True once the connection was lost or closed (it is then unusable)."""
        return self._router.lost is not None

    def _check_usable(self) -> str:
        """The socket path to connect to; raises when lost or when there is none."""
        if self._router.lost is not None:
            raise copy_lost(self._router.lost)
        if not self.path:
            raise ConnectFailed(
                "No sandboxd socket path: XDG_RUNTIME_DIR is not set; pass --socket or set "
                "SANDBOXD_SOCKET.")
        return self.path

    def _connect_failed(self, exc: OSError) -> ConnectFailed:
        path = self.path or "?"
        if isinstance(exc, TimeoutError):
            return ConnectFailed(
                f"Timed out after {self.connect_timeout:g}s connecting to sandboxd at {path}; "
                "the daemon may be overloaded or stuck.", {"path": path})
        return ConnectFailed(connect_message(path, exc), {"path": path, "errno": exc.errno})

    def _io_failed(self, exc: OSError) -> ConnectionLost:
        return ConnectionLost(f"The connection to {self._where} failed: {exc.strerror or exc}.",
                              {"errno": exc.errno})


class AsyncConnection(_Base):
    """One asyncio msgpack-RPC connection: many calls in flight, notifications by channel.

    A reader task decodes one message at a time and routes it; when a
    ``"block"`` channel is full it stops reading (the kernel's socket buffer
    then pushes back on the daemon) until the consumer makes room.
    """

    def __init__(
        self,
        path: str | None = None,
        *,
        connect_timeout: float = 5.0,
        max_frame: int = DEFAULT_CLIENT_MAX_FRAME,
    ) -> None:
        super().__init__(path, connect_timeout=connect_timeout, max_frame=max_frame)
        self._router: Router[asyncio.Future[Any]] = Router(
            self._where, spawn=self._spawn, wake_reader=self._wake_reader)
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._reader_task: asyncio.Task[None] | None = None
        self._handler_tasks: set[asyncio.Future[Any]] = set()
        self._connect_lock: asyncio.Lock | None = None
        self._write_lock = asyncio.Lock()
        self._room = asyncio.Event()

    @property
    def connected(self) -> bool:
        """True while the connection is open and usable."""
        return self._writer is not None and self._router.lost is None

    async def connect(self) -> None:
        """Open the connection (idempotent). Raises ``ConnectFailed`` on failure."""
        self._check_usable()
        if self._writer is not None:
            return
        if self._connect_lock is None:
            self._connect_lock = asyncio.Lock()
        async with self._connect_lock:
            path = self._check_usable()
            if self._writer is not None:
                return
            try:
                async with asyncio.timeout(self.connect_timeout):
                    sock = await self._open_socket(path)
                    reader, writer = await asyncio.open_unix_connection(sock=sock)
            except OSError as exc:  # TimeoutError included
                raise self._connect_failed(exc) from None
            self._reader, self._writer = reader, writer
            self._reader_task = asyncio.create_task(self._read_loop(),
                                                    name="sandboxd-client-reader")

    async def _open_socket(self, path: str) -> socket.socket:
        """A connected socket, retried while the daemon's listen queue is full (asyncio's
        own connect would take that EAGAIN for a connect in progress)."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.setblocking(False)
        try:
            for wait in _connect_tries(sock, path, self.connect_timeout):
                await asyncio.sleep(wait)
            return sock
        except BaseException:
            sock.close()
            raise

    async def close(self) -> None:
        """Close the connection; pending calls and channels fail. Idempotent."""
        self._abort(ConnectionLost(_CLOSED_BY_CLIENT))
        task, self._reader_task = self._reader_task, None
        if task is not None and task is not asyncio.current_task():
            task.cancel()
            await asyncio.wait([task])  # its own outcome is moot; our cancellation propagates
        for pending_task in list(self._handler_tasks):
            pending_task.cancel()
        writer, self._writer = self._writer, None
        if writer is not None:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    # -- calling ----------------------------------------------------------------

    async def call(
        self,
        method: str,
        params: list[Any],
        *,
        timeout: float | None = None,  # noqa: ASYNC109 - this call's own deadline
        on_result: OnResult | None = None,
    ) -> Any:
        """Send a request and wait for its response's result (an error reply raises).

        ``timeout`` bounds the wait (``TimeoutError``; a late reply is then
        ignored). ``on_result`` maps the result as it is routed (see
        ``protocol.OnResult``).
        """
        if self._writer is None or self._router.lost is not None:
            await self.connect()
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        msgid = self._router.add_call(fut, on_result)
        try:
            if timeout is None:  # the common case, without a timer
                await self._write(encode_request(msgid, method, params))
                return await fut
            async with asyncio.timeout(timeout):
                await self._write(encode_request(msgid, method, params))
                return await fut
        finally:
            self._router.forget(msgid, fut)

    async def notify(self, method: str, params: list[Any]) -> None:
        """Send a notification (no reply is expected)."""
        if self._writer is None or self._router.lost is not None:
            await self.connect()
        await self._write(encode_notification(method, params))

    async def _write(self, frame: bytes) -> None:
        async with self._write_lock:
            writer = self._writer
            if self._router.lost is not None or writer is None:
                raise copy_lost(self._router.lost or ConnectionLost("Not connected to sandboxd."))
            try:
                writer.write(frame)
                await writer.drain()
            except (OSError, RuntimeError) as exc:
                lost = self._abort(ConnectionLost(f"Sending to {self._where} failed: {exc}."))
                raise copy_lost(lost) from None

    # -- notifications ----------------------------------------------------------

    def on_notification(self, method: str, callback: NotificationHandler) -> Callable[[], None]:
        """Call ``callback(params)`` for each ``method`` notification; returns its remover."""
        return self._router.add_handler(method, callback)

    def open_channel(
        self,
        methods: Sequence[str],
        key: str | None = None,
        *,
        maxsize: int | None = DEFAULT_CHANNEL_SIZE,
        when_full: WhenFull = "block",
        lanes: Lanes | None = None,
    ) -> AsyncChannel:
        """A channel of the ``methods`` notifications (whose first param is ``key``, if given).

        ``maxsize`` bounds it (None: unbounded), per lane when ``lanes`` sorts
        its items (see ``channels.Lanes``).
        """
        channel = AsyncChannel(maxsize, when_full, lanes)
        self._router.add_channel(channel, methods, key)
        return channel

    def _spawn(self, awaitable: Awaitable[Any]) -> None:
        task = asyncio.ensure_future(awaitable)
        self._handler_tasks.add(task)
        task.add_done_callback(self._handler_done)

    def _handler_done(self, task: asyncio.Future[Any]) -> None:
        self._handler_tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("async notification handler failed", exc_info=task.exception())

    # -- reading ----------------------------------------------------------------

    def _wake_reader(self) -> None:
        self._room.set()

    async def _read_loop(self) -> None:
        assert self._reader is not None
        reader, router, decoder = self._reader, self._router, self._decoder
        reason = ConnectionLost(f"{self._where} closed the connection.")
        try:
            while router.lost is None:
                data = await reader.read(_READ_SIZE)
                if not data:
                    break
                decoder.feed(data)
                while router.lost is None and (msg := decoder.next()) is not None:
                    frame = router.route(msg)
                    if frame is not None and self._writer is not None:
                        self._writer.write(frame)
                    while router.blocked is not None:  # back-pressure: stop reading
                        self._room.clear()
                        if router.retry_blocked():
                            break
                        await self._room.wait()
        except asyncio.CancelledError:
            reason = ConnectionLost(_CLOSED_BY_CLIENT)
            raise
        except OSError as exc:
            reason = self._io_failed(exc)
        except Exception as exc:  # a bug here must still release every waiter
            log.exception("sandboxd client reader failed")
            reason = ConnectionLost(f"The client's reader failed ({type(exc).__name__}: {exc}).")
        finally:
            self._abort(reason)

    def _abort(self, reason: ConnectionLost) -> ConnectionLost:
        lost = self._router.abort(reason)
        if self._writer is not None:
            self._writer.close()
        task = self._reader_task
        if task is not None and task is not asyncio.current_task() and not task.done():
            task.cancel()
        return lost


class _Slot:
    """A blocking call's outcome, set by the router under the connection's lock."""

    __slots__ = ("_done", "_error", "_result")

    def __init__(self) -> None:
        self._done = False
        self._result: Any = None
        self._error: BaseException | None = None

    def done(self) -> bool:
        return self._done

    def set_result(self, result: Any, /) -> None:
        self._result, self._done = result, True

    def set_exception(self, exception: BaseException, /) -> None:
        self._error, self._done = exception, True

    def result(self) -> Any:
        if self._error is not None:
            raise self._error
        return self._result


class BlockingConnection(_Base):
    """One blocking msgpack-RPC connection, safe to share between threads.

    There is no background thread and no event loop: a thread that waits (for
    its response, or for a channel's next item) reads the socket itself when
    no other thread is doing so, routes everything it decodes — responses to
    other threads' slots, notifications to channels — and wakes them through
    one condition variable; the others wait on it. When a ``"block"`` channel
    is full, nobody reads until its consumer makes room.
    """

    def __init__(
        self,
        path: str | None = None,
        *,
        connect_timeout: float = 5.0,
        max_frame: int = DEFAULT_CLIENT_MAX_FRAME,
    ) -> None:
        super().__init__(path, connect_timeout=connect_timeout, max_frame=max_frame)
        self._cond = threading.Condition(threading.RLock())
        self._router: Router[_Slot] = Router(self._where, wake_reader=self._cond.notify_all)
        self._sock: socket.socket | None = None
        self._poll: select.poll | None = None
        self._connect_lock = threading.Lock()
        self._send_lock = threading.Lock()
        self._reading = False  # a thread is in poll/recv (without the lock)
        self._routing_thread: int | None = None
        self._outbox: list[bytes] = []  # replies to daemon requests, sent after routing

    @property
    def connected(self) -> bool:
        """True while the connection is open and usable."""
        return self._sock is not None and self._router.lost is None

    def connect(self) -> None:
        """Open the connection (idempotent). Raises ``ConnectFailed`` on failure."""
        self._check_usable()
        if self._sock is not None:
            return
        with self._connect_lock:
            path = self._check_usable()
            if self._sock is not None:
                return
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.settimeout(self.connect_timeout)
                for wait in _connect_tries(sock, path, self.connect_timeout):
                    time.sleep(wait)
                sock.settimeout(None)
            except OSError as exc:  # TimeoutError included
                sock.close()
                raise self._connect_failed(exc) from None
            poll = select.poll()
            poll.register(sock, select.POLLIN)
            with self._cond:
                self._sock, self._poll = sock, poll

    def close(self) -> None:
        """Close the connection; pending calls and channels fail. Idempotent."""
        with self._cond:
            self._abort(ConnectionLost(_CLOSED_BY_CLIENT))  # shuts the socket down
        with self._send_lock, self._cond:  # a sender or a reader wakes from the shutdown
            while self._reading:
                self._cond.wait()
            sock, self._sock, self._poll = self._sock, None, None
        if sock is not None:
            sock.close()

    # -- calling ----------------------------------------------------------------

    def call(
        self,
        method: str,
        params: list[Any],
        *,
        timeout: float | None = None,
        on_result: OnResult | None = None,
    ) -> Any:
        """Send a request and wait for its response's result (an error reply raises).

        ``timeout`` bounds the wait (``TimeoutError``; a late reply is then
        ignored). ``on_result`` maps the result as it is routed (see
        ``protocol.OnResult``).
        """
        if self._sock is None or self._router.lost is not None:
            self.connect()
        slot = _Slot()
        with self._cond:
            self._refuse_reentry()
            msgid = self._router.add_call(slot, on_result)
        try:
            self._send(encode_request(msgid, method, params))
            return self._wait(slot.done, slot.result, timeout)
        finally:
            with self._cond:
                self._router.forget(msgid, slot)

    def notify(self, method: str, params: list[Any]) -> None:
        """Send a notification (no reply is expected)."""
        if self._sock is None or self._router.lost is not None:
            self.connect()
        self._send(encode_notification(method, params))

    def _send(self, frame: bytes) -> None:
        failure: OSError | None = None
        with self._send_lock:
            lost, sock = self._router.lost, self._sock
            if lost is not None or sock is None:
                raise copy_lost(lost or ConnectionLost("Not connected to sandboxd."))
            try:
                sock.sendall(frame)
            except OSError as exc:
                failure = exc
        if failure is not None:
            with self._cond:
                lost = self._abort(
                    ConnectionLost(f"Sending to {self._where} failed: {failure}."))
            raise copy_lost(lost) from None

    def _refuse_reentry(self) -> None:
        if self._routing_thread == threading.get_ident():
            raise RuntimeError(
                "A blocking sandboxd connection was used from one of its own notification "
                "callbacks; callbacks must not wait on their connection (use a channel).")

    # -- notifications ----------------------------------------------------------

    def on_notification(self, method: str, callback: NotificationHandler) -> Callable[[], None]:
        """Call ``callback(params)`` for each ``method`` notification; returns its remover.

        Callbacks run on whichever thread is reading, under the connection's
        lock: keep them quick, and never wait on this connection in one.
        """
        with self._cond:
            remove = self._router.add_handler(method, callback)

        def remove_locked() -> None:
            with self._cond:
                remove()

        return remove_locked

    def open_channel(
        self,
        methods: Sequence[str],
        key: str | None = None,
        *,
        maxsize: int | None = DEFAULT_CHANNEL_SIZE,
        when_full: WhenFull = "block",
        lanes: Lanes | None = None,
    ) -> BlockingChannel:
        """A channel of the ``methods`` notifications (whose first param is ``key``, if given).

        ``maxsize`` bounds it (None: unbounded), per lane when ``lanes`` sorts
        its items (see ``channels.Lanes``).
        """
        channel = BlockingChannel(maxsize, when_full, lock=self._cond, wait=self._wait,
                                  notify=self._cond.notify_all, lanes=lanes)
        with self._cond:
            self._router.add_channel(channel, methods, key)
        return channel

    # -- waiting and reading ------------------------------------------------------

    def _wait(self, ready: Callable[[], bool], then: Callable[[], T], timeout: float | None) -> T:
        """Until ``ready()``, reading the socket when no other thread is; then ``then()``.

        Both run under the lock. Raises ``TimeoutError`` after ``timeout``
        seconds, and ``ConnectionLost`` when the connection is lost first
        (unless ``ready()`` says the outcome is already there).
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            with self._cond:
                self._refuse_reentry()
                while True:
                    if ready():
                        return then()
                    if self._pump():
                        continue
                    lost = self._router.lost
                    if lost is not None:
                        raise copy_lost(lost)
                    if self._sock is None:
                        raise ConnectionLost("Not connected to sandboxd; connect() first.")
                    remaining = None if deadline is None else deadline - time.monotonic()
                    if remaining is not None and remaining <= 0:
                        raise TimeoutError(f"No answer from {self._where} within {timeout:g}s.")
                    if self._reading or self._router.blocked is not None:
                        self._cond.wait(remaining)
                    else:
                        self._read(remaining)
        finally:
            if self._outbox:
                self._flush_outbox()

    def _pump(self) -> bool:
        """Route what was received and can be routed now; True if anything was."""
        router = self._router
        if router.lost is not None:
            return False
        progressed = False
        if router.blocked is not None:
            if not router.retry_blocked():
                return False
            progressed = True
        self._routing_thread = threading.get_ident()
        try:
            while router.blocked is None and router.lost is None:
                msg = self._decoder.next()
                if msg is None:
                    break
                progressed = True
                frame = router.route(msg)
                if frame is not None:
                    self._outbox.append(frame)
        finally:
            self._routing_thread = None
        if router.lost is not None:
            self._abort(router.lost)
        if progressed:
            self._cond.notify_all()
        return progressed

    def _read(self, timeout: float | None) -> None:
        """Read once from the socket, without the lock (the caller holds it once)."""
        sock, poll = self._sock, self._poll
        assert sock is not None and poll is not None
        data: bytes | OSError | None = None
        self._reading = True
        self._cond.release()
        try:
            try:
                ms = None if timeout is None else max(0, math.ceil(timeout * 1000))
                if poll.poll(ms):
                    data = sock.recv(_READ_SIZE)
            except OSError as exc:
                data = exc
        finally:
            self._cond.acquire()
            self._reading = False
            self._cond.notify_all()  # another waiter may take over the reading
        if self._router.lost is not None or data is None:
            return
        if isinstance(data, OSError):
            self._abort(self._io_failed(data))
        elif not data:
            self._abort(ConnectionLost(f"{self._where} closed the connection."))
        else:
            self._decoder.feed(data)

    def _flush_outbox(self) -> None:
        with self._cond:
            frames, self._outbox = self._outbox, []
        if frames:
            with contextlib.suppress(ConnectionLost):
                self._send(b"".join(frames))

    def _abort(self, reason: ConnectionLost) -> ConnectionLost:
        """Mark the connection lost and shut the socket down (the lock is held)."""
        lost = self._router.abort(reason)
        self._cond.notify_all()
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.shutdown(socket.SHUT_RDWR)
        return lost
