"""One client connection: identity, framing, flow control, replies in any order.

Owns a ``Connection`` per client: it reads the caller's uid/gid/pid with
SO_PEERCRED (and groups with SO_PEERGROUPS) once, feeds bytes to the codec
and pulls requests one at a time, hands them to the dispatcher, writes
replies in any order (inline replies batched per read), limits in-flight
work, stops reading a client whose replies back up, and reports protocol
errors. It must not know what any method does.
"""

from __future__ import annotations

import asyncio
import itertools
import socket
import struct
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import structlog

from sandboxd.core.records import Caller
from sandboxd.logsetup import RequestLog
from sandboxd.wire.codec import (
    BadMessage,
    Decoder,
    Notification,
    Request,
    encode_notification,
    encode_response,
)
from sandboxd.wire.errors import ShuttingDown

if TYPE_CHECKING:
    from sandboxd.rpc.server import RpcServer

log = structlog.get_logger("sandboxd.server")

REPLY_BATCH = 16  # inline replies written together (fewer syscalls, the client still overlaps)
MAX_IN_FLIGHT = 1024  # per connection; past it we stop reading from that client
MAX_WRITE_BUFFER = 256 * 1024 * 1024  # a client that never reads is cut off here
WRITE_HIGH_WATER = 1024 * 1024  # replies backed up this far: stop reading that client
_ids = itertools.count(1)


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
        self.decoder.feed(data)
        self._pump()

    def _pump(self) -> None:
        """Decode and handle requests until the buffer is empty or the client must wait.

        The limits are checked for every request as it is decoded, so one read
        full of requests cannot start more work than a connection may have.
        """
        replies: list[bytes] = []  # replies of inline calls: one write for the whole read
        decoder = self.decoder
        while not self._must_wait():
            item = decoder.next()
            if item is None:
                break
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
        self._update_reading()

    def _must_wait(self) -> bool:
        """True while this client may not start more work: too many calls in flight,
        or its replies backed up (it is not reading them)."""
        if self.closed:
            return True
        if not self._can_write.is_set():
            return True
        limit = MAX_IN_FLIGHT // 2 if self._reading_paused else MAX_IN_FLIGHT
        return len(self.tasks) >= limit

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
        self._pump()

    def _update_reading(self) -> None:
        """Read from the client only while it may start more work and nothing decoded waits."""
        if self.transport is None or self.closed:
            return
        pause = self._must_wait()
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
            self._pump()  # requests already received may start now
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


