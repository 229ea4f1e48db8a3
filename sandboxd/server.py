"""The Unix-socket server: connections, framing, flow control and peer identity.

Owns the listening socket (bound fresh or inherited from systemd), refusing
to start over a live daemon, replacing a stale socket file, mode 0660 and
the configured group; one ``Connection`` per client, which reads the
caller's uid/gid/pid with SO_PEERCRED, feeds bytes to the codec, hands
requests to the dispatcher, writes replies in any order, limits in-flight
work, and reports protocol errors. It must not know what any method does.
"""

from __future__ import annotations

import asyncio
import grp
import itertools
import os
import socket
import stat
import struct
from collections.abc import Awaitable, Callable
from typing import Any

import structlog

from .dispatcher import Dispatcher
from .errors import ShuttingDown
from .logsetup import RequestLog
from .models import Caller
from .protocol import (
    BadMessage,
    Decoder,
    Notification,
    Request,
    encode_notification,
    encode_response,
)

log = structlog.get_logger("sandboxd.server")

REPLY_BATCH = 16  # inline replies written together (fewer syscalls, the client still overlaps)
MAX_IN_FLIGHT = 1024  # per connection; past it we stop reading from that client
MAX_WRITE_BUFFER = 256 * 1024 * 1024  # a client that never reads is cut off here
WRITE_HIGH_WATER = 1024 * 1024  # replies backed up this far: stop reading that client
_ids = itertools.count(1)


class StartupError(Exception):
    """The daemon cannot start serving; the message is one line for the operator."""


SO_PEERGROUPS = getattr(socket, "SO_PEERGROUPS", 59)  # Linux >= 4.13


def peer_groups(sock: socket.socket, pid: int) -> frozenset[int]:
    """The peer's supplementary groups, as the kernel recorded them at connect time."""
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, SO_PEERGROUPS, 4 * 4096)
        return frozenset(struct.unpack(f"{len(raw) // 4}I", raw[: len(raw) // 4 * 4]))
    except OSError:
        pass
    try:  # an older kernel: the process's current groups (it could have exited since)
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith("Groups:"):
                    return frozenset(int(g) for g in line.split()[1:])
    except (OSError, ValueError):
        pass
    return frozenset()


def peer_credentials(sock: socket.socket) -> tuple[int, int, int]:
    """(pid, uid, gid) of the peer of a Unix stream socket."""
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, gid = struct.unpack("3i", raw)
    return pid, uid, gid


def bind_unix_socket(path: str, group: str | None) -> socket.socket:
    """Bind a fresh listening socket at ``path``, mode 0660, refusing a live daemon."""
    if os.path.lexists(path):
        mode = os.lstat(path).st_mode
        if not stat.S_ISSOCK(mode):
            raise StartupError(
                f"{path} exists and is not a socket; remove it or choose another --socket"
            )
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        probe.settimeout(1.0)
        try:
            probe.connect(path)
        except (ConnectionRefusedError, FileNotFoundError):
            os.unlink(path)  # stale: nobody listens
        except OSError as exc:
            raise StartupError(f"cannot check the existing socket {path}: {exc.strerror}") from None
        else:
            raise StartupError(f"another sandboxd is already serving on {path}")
        finally:
            probe.close()
    parent = os.path.dirname(path) or "."
    os.makedirs(parent, mode=0o755, exist_ok=True)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old_umask = os.umask(0o117)
    try:
        sock.bind(path)
    except OSError as exc:
        sock.close()
        raise StartupError(f"cannot listen on {path}: {exc.strerror}") from None
    finally:
        os.umask(old_umask)
    # The umask above made it 0660; no chmod by path (a path can be swapped for a link).
    if group is not None:
        try:
            gid = grp.getgrnam(group).gr_gid
        except KeyError:
            sock.close()
            os.unlink(path)
            raise StartupError(f"socket_group: no group named {group!r}") from None
        os.chown(path, -1, gid, follow_symlinks=False)
    sock.listen(512)
    sock.setblocking(False)
    return sock


class Connection(asyncio.Protocol):
    """One client connection."""

    def __init__(self, server: RpcServer) -> None:
        self.server = server
        self.id = next(_ids)
        self.decoder = Decoder(server.max_frame)
        self.transport: asyncio.Transport | None = None
        self.caller = Caller(uid=-1, gid=-1, pid=0, admin=False)
        self.log: Any = log
        self.log_request: Callable[..., None] = RequestLog()
        self.tasks: dict[asyncio.Task[None], bool] = {}  # task -> cancel on disconnect
        self.closed = False
        self._can_write = asyncio.Event()
        self._can_write.set()
        self._reading_paused = False
        self.on_close: list[Callable[[], None]] = []

    # asyncio.Protocol ----------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        transport.set_write_buffer_limits(high=WRITE_HIGH_WATER)
        sock = transport.get_extra_info("socket")
        try:
            pid, uid, gid = peer_credentials(sock)
        except OSError:
            pid, uid, gid = 0, -1, -1
        admin = uid >= 0 and self.server.is_admin(uid, gid, peer_groups(sock, pid))
        self.caller = Caller(uid=uid, gid=gid, pid=pid, admin=admin)
        self.log = log.bind(conn=self.id, uid=uid, pid=pid)
        self.log_request = RequestLog(conn=self.id, uid=uid, pid=pid)
        self.server.connections.add(self)

    def data_received(self, data: bytes) -> None:
        replies: list[bytes] = []  # replies of inline calls: one write for the whole read
        for item in self.decoder.feed(data):
            if type(item) is Request:
                reply = self._handle(item)
                if reply is not None:
                    replies.append(reply)
                    if len(replies) == REPLY_BATCH:  # let the client start on these
                        self.write(b"".join(replies))
                        replies = []
            elif isinstance(item, Notification):
                self.log.info("notification_ignored", method=item.method)
            elif isinstance(item, BadMessage):
                if replies:
                    self.write(b"".join(replies))
                    replies = []
                self._bad(item)
            # A Response matches no request of ours: ignored (SPEC §2).
        if replies:
            self.write(replies[0] if len(replies) == 1 else b"".join(replies))

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._can_write.set()
        self.server.connections.discard(self)
        for task, cancel in list(self.tasks.items()):
            if cancel:
                task.cancel()
        for callback in self.on_close:
            try:
                callback()
            except Exception:
                self.log.exception("close_callback_failed")

    def pause_writing(self) -> None:
        # The client is not reading its replies: stop reading its requests too, so it
        # cannot make the daemon buffer without bound (its own calls wait, no one else's).
        self._can_write.clear()
        self._update_reading()

    def resume_writing(self) -> None:
        self._can_write.set()
        self._update_reading()

    def _update_reading(self) -> None:
        """Read from the client unless its replies back up or too many calls run."""
        if self.transport is None or self.closed:
            return
        busy = len(self.tasks) >= MAX_IN_FLIGHT or (
            self._reading_paused and len(self.tasks) >= MAX_IN_FLIGHT // 2
        )
        pause = busy or not self._can_write.is_set()
        if pause and not self._reading_paused:
            self._reading_paused = True
            self.transport.pause_reading()
        elif not pause and self._reading_paused:
            self._reading_paused = False
            self.transport.resume_reading()

    # CallContext ------------------------------------------------------
    def notify(self, method: str, params: list[Any]) -> None:
        self.write(encode_notification(method, params))

    async def drain(self) -> None:
        """Wait until the client has read enough of what we sent (back-pressure)."""
        await self._can_write.wait()

    def send_frame(self, frame: bytes) -> None:
        """Queue bytes that are already msgpack-RPC messages (never waits)."""
        self.write(frame)

    @property
    def writable(self) -> bool:
        """False while drain() would wait, or once the connection is gone."""
        return not self.closed and self._can_write.is_set()

    # internals ----------------------------------------------------------
    def write(self, data: bytes) -> None:
        if self.closed or self.transport is None:
            return
        self.transport.write(data)
        if self.transport.get_write_buffer_size() > MAX_WRITE_BUFFER:
            self.log.warning("client_not_reading", buffered=self.transport.get_write_buffer_size())
            self.transport.abort()

    def _handle(self, req: Request) -> bytes | None:
        """The reply of an inline call, or None when a task will write it."""
        reply = self.server.dispatcher.dispatch(self, req)
        if isinstance(reply, bytes):
            return reply
        method = self.server.dispatcher.method(req.method)
        cancel = bool(method and method.cancel_on_disconnect)
        task = asyncio.get_running_loop().create_task(self._finish(req, reply))
        self.tasks[task] = cancel
        self.server.tasks.add(task)
        task.add_done_callback(self._task_done)
        if len(self.tasks) >= MAX_IN_FLIGHT:
            self._update_reading()
        return None

    async def _finish(self, req: Request, reply: Awaitable[bytes]) -> None:
        try:
            self.write(await reply)
        except asyncio.CancelledError:
            if self.server.dispatcher.shutting_down:
                # Cut off at the end of the shutdown grace: still exactly one reply.
                error = ShuttingDown(
                    "The daemon stopped before this call finished; its outcome is unknown, "
                    "check the sandbox's state when the daemon is back."
                )
                self.write(encode_response(req.msgid, error.to_wire(), None))
            raise

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self.tasks.pop(task, None)
        self.server.tasks.discard(task)
        if self._reading_paused:
            self._update_reading()
        self.server.task_finished()

    def _bad(self, bad: BadMessage) -> None:
        self.log.warning(
            "protocol_error",
            code=bad.error.code,
            error=bad.error.message,
            msgid=bad.msgid,
            fatal=bad.fatal,
        )
        if bad.msgid is not None:
            self.write(encode_response(bad.msgid, bad.error.to_wire(), None))
        elif bad.fatal:
            self.write(encode_notification("protocol.error", [bad.error.to_wire()]))
        if bad.fatal and self.transport is not None:
            self.transport.close()


class RpcServer:
    def __init__(
        self,
        dispatcher: Dispatcher,
        *,
        max_frame: int,
        is_admin: Callable[[int, int, frozenset[int]], bool],
    ) -> None:
        self.dispatcher = dispatcher
        self.max_frame = max_frame
        self.is_admin = is_admin
        self.connections: set[Connection] = set()
        self.tasks: set[asyncio.Task[None]] = set()
        self._server: asyncio.AbstractServer | None = None
        self._idle = asyncio.Event()

    async def start(self, sock: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        sock.setblocking(False)
        self._server = await loop.create_unix_server(lambda: Connection(self), sock=sock)

    def stop_accepting(self) -> None:
        if self._server is not None:
            self._server.close()

    def in_flight(self) -> int:
        return len(self.tasks)

    def task_finished(self) -> None:
        if self.in_flight() == 0:
            self._idle.set()

    async def drain(self, grace: float) -> int:
        """Let in-flight calls finish for up to ``grace`` seconds; cancel the rest."""
        self.dispatcher.shutting_down = True
        if self.in_flight():
            self._idle.clear()
            try:
                await asyncio.wait_for(self._idle.wait(), timeout=grace)
            except TimeoutError:
                pass
        leftover = list(self.tasks)
        for task in leftover:
            task.cancel()
        if leftover:
            await asyncio.gather(*leftover, return_exceptions=True)
        return len(leftover)

    def close_connections(self) -> None:
        for conn in list(self.connections):
            if conn.transport is not None:
                conn.transport.close()
