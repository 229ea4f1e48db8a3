"""The asyncio client: one msgpack-RPC connection to sandboxd over its Unix socket.

This module owns the client side of the connection: connecting, msgid
allocation, matching responses (in any order) to pending calls, dispatching
notifications to registered callbacks, and failing every pending call with
``ConnectionLost`` the moment the connection drops, so that no call ever
waits forever. It also defines the typed methods and the async ``Sandbox``
handle. It must not import aiodocker or any part of ``sandboxd`` other than
``sandboxd.wire.codec`` and ``sandboxd.wire.errors``; it must not retry or reconnect
behind the caller's back (a lost connection is reported, never hidden).
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import errno
import inspect
import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Self

from sandboxd.wire.codec import (
    MAX_MSGID,
    BadMessage,
    Decoder,
    Notification,
    Request,
    Response,
    encode_notification,
    encode_request,
    encode_response,
)
from sandboxd.wire.errors import ConnectionLost, from_wire

from . import models
from .events import EventStream
from .exceptions import ConnectFailed, UnexpectedReply
from .models import DaemonInfo, ExecResult, Stats
from .paths import default_socket_path

__all__ = ["NotificationHandler", "Sandbox", "SandboxClient"]

log = logging.getLogger("sandboxd_client")

NotificationHandler = Callable[[list[Any]], Awaitable[None] | None]
"""A notification callback: receives the notification's params array.

Plain functions run inline, in arrival order, on the reader task (keep them
quick). A coroutine function's coroutine is scheduled as a task: its order
relative to other notifications is then not guaranteed.
"""

DEFAULT_CLIENT_MAX_FRAME = 64 * 1024 * 1024
_READ_SIZE = 256 * 1024


def _params(params: Mapping[str, Any]) -> builtins.list[Any]:
    """Named arguments as the wire's params array: ``[]`` or ``[{...}]``, None omitted."""
    named = {k: v for k, v in params.items() if v is not None}
    return [named] if named else []


def _copy_lost(err: ConnectionLost) -> ConnectionLost:
    """A fresh exception of the same class and content (never re-raise one instance twice)."""
    return type(err)(err.message, err.data)


class SandboxClient:
    """An asyncio msgpack-RPC client for sandboxd.

    Use as ``async with SandboxClient() as c: ...``. Calls made before
    ``connect()`` connect on first use. Many calls may be in flight at once.
    Once the connection is lost (daemon closed it, an I/O error, a
    ``protocol.error`` notification, or ``close()``), every pending call
    raises ``ConnectionLost`` at once and every later call raises it
    immediately; the client does not reconnect: make a new one.

    Calls have no client-side deadline of their own (an exec may legitimately
    run long); wrap one in ``asyncio.timeout`` to bound it.
    """

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
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._reader_task: asyncio.Task[None] | None = None
        self._pending: dict[int, asyncio.Future[Any]] = {}
        self._handlers: dict[str, builtins.list[NotificationHandler]] = {}
        self._handler_tasks: set[asyncio.Future[Any]] = set()
        self._next_msgid = 0
        self._lost: ConnectionLost | None = None
        self._connect_lock: asyncio.Lock | None = None
        self._write_lock: asyncio.Lock | None = None

    # -- connection ---------------------------------------------------------

    @property
    def connected(self) -> bool:
        """True while the connection is open and usable."""
        return self._writer is not None and self._lost is None

    @property
    def closed(self) -> bool:
        """True once the connection was lost or closed (the client is then unusable)."""
        return self._lost is not None

    async def connect(self) -> Self:
        """Open the connection (idempotent). Raises ``ConnectFailed`` on failure."""
        if self._lost is not None:
            raise _copy_lost(self._lost)
        if self._writer is not None:
            return self
        if self._connect_lock is None:
            self._connect_lock = asyncio.Lock()
        async with self._connect_lock:
            if self._lost is not None:
                raise _copy_lost(self._lost)
            if self._writer is None:
                await self._open()
        return self

    async def _open(self) -> None:
        path = self.path
        if not path:
            raise ConnectFailed(
                "No sandboxd socket path: XDG_RUNTIME_DIR is not set; pass --socket or set "
                "SANDBOXD_SOCKET."
            )
        try:
            async with asyncio.timeout(self.connect_timeout):
                reader, writer = await asyncio.open_unix_connection(path)
        except TimeoutError:
            raise ConnectFailed(
                f"Timed out after {self.connect_timeout:g}s connecting to sandboxd at {path}; "
                "the daemon may be overloaded or stuck.",
                {"path": path},
            ) from None
        except OSError as exc:
            raise ConnectFailed(_connect_message(path, exc),
                                {"path": path, "errno": exc.errno}) from None
        self._reader, self._writer = reader, writer
        self._write_lock = asyncio.Lock()
        self._reader_task = asyncio.create_task(self._read_loop(), name="sandboxd-client-reader")

    async def close(self) -> None:
        """Close the connection; pending calls fail with ``ConnectionLost``. Idempotent."""
        self._abort(ConnectionLost("The client closed its connection to sandboxd."))
        task, self._reader_task = self._reader_task, None
        if task is not None and task is not asyncio.current_task():
            task.cancel()
            await asyncio.wait([task])  # its own outcome is moot; our cancellation still propagates
        for pending_task in builtins.list(self._handler_tasks):
            pending_task.cancel()
        writer, self._writer = self._writer, None
        if writer is not None:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def __aenter__(self) -> Self:
        return await self.connect()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    def _abort(self, reason: ConnectionLost) -> None:
        """Mark the connection lost (first reason wins) and fail every pending call."""
        if self._lost is None:
            self._lost = reason
        pending, self._pending = self._pending, {}
        for fut in pending.values():
            if not fut.done():
                fut.set_exception(_copy_lost(self._lost))
        if self._writer is not None:
            self._writer.close()
        task = self._reader_task
        if task is not None and task is not asyncio.current_task() and not task.done():
            task.cancel()

    # -- reading ------------------------------------------------------------

    async def _read_loop(self) -> None:
        assert self._reader is not None
        reader = self._reader
        decoder = Decoder(max_frame=self.max_frame)
        where = f"sandboxd at {self.path}"
        reason = ConnectionLost(f"{where} closed the connection.")
        try:
            while True:
                data = await reader.read(_READ_SIZE)
                if not data:
                    break
                decoder.feed(data)
                stop = self._handle(list(decoder), where)
                if stop is not None:
                    reason = stop
                    break
        except asyncio.CancelledError:
            reason = ConnectionLost("The client closed its connection to sandboxd.")
            raise
        except OSError as exc:
            reason = ConnectionLost(
                f"The connection to {where} failed: {exc.strerror or exc}.",
                {"errno": exc.errno},
            )
        except Exception as exc:  # a bug here must still release every waiter
            log.exception("sandboxd client reader failed")
            reason = ConnectionLost(
                f"The client's reader failed ({type(exc).__name__}: {exc}).")
        finally:
            self._abort(reason)

    def _handle(self, events: builtins.list[Any], where: str) -> ConnectionLost | None:
        for event in events:
            if isinstance(event, Response):
                fut = self._pending.pop(event.msgid, None)
                if fut is None or fut.done():
                    log.debug("ignoring response to unknown msgid %d", event.msgid)
                elif event.error is not None:
                    fut.set_exception(from_wire(event.error))
                else:
                    fut.set_result(event.result)
            elif isinstance(event, Notification):
                self._dispatch(event)
                if event.method == "protocol.error":
                    err = from_wire(event.params[0] if event.params else None)
                    return ConnectionLost(
                        f"{where} closed the connection: {err.code}: {err.message}",
                        {"code": err.code, "message": err.message, "data": err.data},
                    )
            elif isinstance(event, Request):
                # The SPEC has no daemon-to-client requests; answer so nothing waits.
                self._send_nowait(encode_response(
                    event.msgid,
                    ["method_not_found", f"This client serves no method {event.method!r}.",
                     None],
                    None,
                ))
            elif isinstance(event, BadMessage):
                if event.fatal:
                    return ConnectionLost(
                        f"{where} sent bytes the client cannot read: {event.error.message}",
                        {"code": event.error.code},
                    )
                log.warning("ignoring malformed message from sandboxd: %s", event.error.message)
        return None

    def _dispatch(self, note: Notification) -> None:
        for handler in builtins.list(self._handlers.get(note.method, ())):
            try:
                outcome = handler(note.params)
                if inspect.isawaitable(outcome):
                    task = asyncio.ensure_future(outcome)
                    self._handler_tasks.add(task)
                    task.add_done_callback(self._handler_done)
            except Exception:
                log.exception("notification handler for %r failed", note.method)

    def _handler_done(self, task: asyncio.Future[Any]) -> None:
        self._handler_tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("async notification handler failed", exc_info=task.exception())

    def _send_nowait(self, data: bytes) -> None:
        if self._writer is not None and self._lost is None:
            self._writer.write(data)

    # -- calling ------------------------------------------------------------

    def on_notification(self, method: str, callback: NotificationHandler) -> Callable[[], None]:
        """Call ``callback(params)`` for each notification named ``method``.

        Several callbacks may share a method; each runs. Returns a function
        that unregisters this callback. A callback that raises is logged and
        never breaks the connection.
        """
        self._handlers.setdefault(method, []).append(callback)

        def remove() -> None:
            callbacks = self._handlers.get(method, [])
            if callback in callbacks:
                callbacks.remove(callback)

        return remove

    def _allocate_msgid(self) -> int:
        for _ in range(len(self._pending) + 1):
            msgid = self._next_msgid
            self._next_msgid = 0 if msgid >= MAX_MSGID else msgid + 1
            if msgid not in self._pending:
                return msgid
        raise RuntimeError("no free msgid")  # pragma: no cover - 2**32 calls in flight

    async def call(self, method: str, /, **params: Any) -> Any:
        """Call ``method`` with named arguments and return its result.

        Arguments whose value is None are omitted (the daemon's default then
        applies); params go on the wire as ``[{...}]``, or ``[]`` when none.
        An error reply raises the ``sandboxd.wire.errors`` class of its code.
        """
        return await self.call_raw(method, _params(params))

    async def call_raw(self, method: str, params: builtins.list[Any]) -> Any:
        """Call ``method`` with an explicit params array (for non-SPEC servers/tests)."""
        if self._writer is None or self._lost is not None:
            await self.connect()
        assert self._writer is not None and self._write_lock is not None
        msgid = self._allocate_msgid()
        frame = encode_request(msgid, method, params)
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending[msgid] = fut
        try:
            await self._write(frame)
            return await fut
        finally:
            if self._pending.get(msgid) is fut:
                del self._pending[msgid]

    async def notify(self, method: str, /, **params: Any) -> None:
        """Send a notification (no reply is expected)."""
        if self._writer is None or self._lost is not None:
            await self.connect()
        await self._write(encode_notification(method, _params(params)))

    async def _write(self, frame: bytes) -> None:
        assert self._write_lock is not None
        async with self._write_lock:
            if self._lost is not None or self._writer is None:
                raise _copy_lost(self._lost or ConnectionLost("Not connected to sandboxd."))
            try:
                self._writer.write(frame)
                await self._writer.drain()
            except (OSError, RuntimeError) as exc:
                self._abort(ConnectionLost(
                    f"Sending to sandboxd at {self.path} failed: {exc}."))
                assert self._lost is not None
                raise _copy_lost(self._lost) from None

    # -- typed methods: daemon ----------------------------------------------

    async def ping(self) -> str:
        """``daemon.ping``: returns ``"pong"``."""
        return models._str(await self.call("daemon.ping"))

    async def info(self) -> DaemonInfo:
        """``daemon.info``: version, engine state, counts, and who the caller is."""
        return DaemonInfo.from_wire(await self.call("daemon.info"))

    # -- typed methods: events ----------------------------------------------

    def events(
        self,
        types: Sequence[str] | None = None,
        sandbox: str | None = None,
        labels: Mapping[str, str] | None = None,
        since: int | None = None,
        *,
        max_buffer: int = 10_000,
        max_backoff: float = 5.0,
    ) -> EventStream:
        """Follow the daemon's events: ``async for ev in client.events(["sandbox.*"]): ...``.

        ``types`` match exactly or by prefix (``"sandbox.*"``); ``sandbox`` is an
        id or name; ``labels`` must all match; ``since`` replays retained events
        after that seq first. The stream resubscribes by itself when cut off
        and reconnects (on new connections) when the connection is lost,
        without gaps or duplicates; see ``EventStream``.
        """
        return EventStream(self, types=types, sandbox=sandbox, labels=labels, since=since,
                           max_buffer=max_buffer, max_backoff=max_backoff)

    # -- typed methods: sandboxes -------------------------------------------

    def _bind(self, data: Any) -> Sandbox:
        sb = Sandbox.from_wire(data)
        sb._client = self
        return sb

    async def create(
        self,
        *,
        image: str | None = None,
        name: str | None = None,
        memory: int | str | None = None,
        cpus: float | None = None,
        pids: int | None = None,
        ttl: float | None = None,
        idle_timeout: float | None = None,
        env: Mapping[str, str] | None = None,
        workdir: str | None = None,
        labels: Mapping[str, str] | None = None,
        network: str | None = None,
        readonly_rootfs: bool | None = None,
        user: str | None = None,
        **extra: Any,
    ) -> Sandbox:
        """``sandbox.create``: start a sandbox; returns when it is running.

        Omitted (None) arguments take the daemon's defaults; ``ttl=0`` asks for
        no expiry. ``memory`` is bytes or a string like ``"512m"``. ``extra``
        is passed through unchanged, for arguments newer than this client.
        """
        reply = await self.call(
            "sandbox.create",
            image=image,
            name=name,
            memory=memory,
            cpus=cpus,
            pids=pids,
            ttl=ttl,
            idle_timeout=idle_timeout,
            env=dict(env) if env is not None else None,
            workdir=workdir,
            labels=dict(labels) if labels is not None else None,
            network=network,
            readonly_rootfs=readonly_rootfs,
            user=user,
            **extra,
        )
        return self._bind(reply)

    async def get(self, id: str) -> Sandbox:
        """``sandbox.get``: one sandbox by id or name."""
        return self._bind(await self.call("sandbox.get", id=id))

    async def list(
        self, status: str | None = None, labels: Mapping[str, str] | None = None
    ) -> builtins.list[Sandbox]:
        """``sandbox.list``: the caller's sandboxes, filtered by status and labels (all match)."""
        reply = await self.call(
            "sandbox.list",
            status=status,
            labels=dict(labels) if labels is not None else None,
        )
        if not isinstance(reply, (builtins.list, tuple)):
            raise UnexpectedReply(
                f"Expected a list of sandboxes from sandbox.list, got {type(reply).__name__}.")
        return [self._bind(item) for item in reply]

    async def pause(self, id: str) -> Sandbox:
        """``sandbox.pause``: freeze every process in the sandbox."""
        return self._bind(await self.call("sandbox.pause", id=id))

    async def resume(self, id: str) -> Sandbox:
        """``sandbox.resume``: unfreeze a paused sandbox."""
        return self._bind(await self.call("sandbox.resume", id=id))

    async def extend(self, id: str, ttl: float) -> Sandbox:
        """``sandbox.extend``: the deadline becomes now + ``ttl`` seconds."""
        return self._bind(await self.call("sandbox.extend", id=id, ttl=ttl))

    async def remove(self, id: str) -> None:
        """``sandbox.remove``: stop and remove the sandbox."""
        await self.call("sandbox.remove", id=id)

    async def stats(self, id: str) -> Stats:
        """``sandbox.stats``: a resource sample."""
        return Stats.from_wire(await self.call("sandbox.stats", id=id))

    async def exec(
        self,
        id: str,
        cmd: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        workdir: str | None = None,
        user: str | None = None,
        stdin: bytes | None = None,
        timeout: float | None = None,  # noqa: ASYNC109 - the daemon-side exec deadline
        max_output: int | None = None,
    ) -> ExecResult:
        """``sandbox.exec``: run ``cmd`` (an argv list, never a shell string), buffered.

        ``stdin`` bytes are fed to the process; ``timeout`` (seconds) kills it
        and everything it started; output over ``max_output`` bytes per stream
        is cut in the middle and ``truncated`` is set.
        """
        if isinstance(cmd, (str, bytes)):
            raise TypeError(
                "cmd must be a list of strings (an argv), not a string; "
                "for a shell use ['sh', '-c', command]."
            )
        return ExecResult.from_wire(await self.call(
            "sandbox.exec",
            id=id,
            cmd=[str(c) for c in cmd],
            env=dict(env) if env is not None else None,
            workdir=workdir,
            user=user,
            stdin=bytes(stdin) if stdin is not None else None,
            timeout=timeout,
            max_output=max_output,
        ))


def _connect_message(path: str, exc: OSError) -> str:
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


@dataclass(eq=True)
class Sandbox(models.Sandbox):
    """A sandbox's data plus the client that fetched it, so it can act on itself.

    The client reference is neither compared nor shown. Methods that return a
    new state (``pause``, ``resume``, ``extend``, ``refresh``) update this
    object in place and return it.
    """

    _client: SandboxClient | None = field(default=None, compare=False, repr=False)

    def _c(self) -> SandboxClient:
        if self._client is None:
            raise RuntimeError("This Sandbox is not bound to a client.")
        return self._client

    async def exec(
        self,
        cmd: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        workdir: str | None = None,
        user: str | None = None,
        stdin: bytes | None = None,
        timeout: float | None = None,  # noqa: ASYNC109 - the daemon-side exec deadline
        max_output: int | None = None,
    ) -> ExecResult:
        """Run ``cmd`` in this sandbox (see ``SandboxClient.exec``)."""
        return await self._c().exec(
            self.id, cmd, env=env, workdir=workdir, user=user, stdin=stdin,
            timeout=timeout, max_output=max_output,
        )

    async def refresh(self) -> Self:
        """Re-read this sandbox's state from the daemon."""
        self._update_from(await self._c().get(self.id))
        return self

    async def pause(self) -> Self:
        self._update_from(await self._c().pause(self.id))
        return self

    async def resume(self) -> Self:
        self._update_from(await self._c().resume(self.id))
        return self

    async def extend(self, ttl: float) -> Self:
        self._update_from(await self._c().extend(self.id, ttl))
        return self

    async def remove(self) -> None:
        await self._c().remove(self.id)

    async def stats(self) -> Stats:
        return await self._c().stats(self.id)

