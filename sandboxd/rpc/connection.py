"""One client connection: identity, framing, flow control, limits, replies in any order.

Owns a ``Connection`` per client: it reads the caller's uid/gid/pid with
SO_PEERCRED (and groups with SO_PEERGROUPS) once and takes a connection slot
(or answers with one clear error and closes), feeds bytes to the codec and
pulls requests one at a time, checking the limits for each request as it is
decoded (calls in flight per connection and per uid, replies the client has
not read), hands them to the dispatcher, writes replies in any order (inline
replies batched per read), stops reading a client that must wait, and
reports protocol errors. It counts the input it holds for incomplete
messages against its own and the server's budgets, and tells the server's
sweeper when a message was started, when it was last active and since when
its client has not read. It must not know what any method does.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import socket
import struct
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import structlog

from sandboxd.core.records import Caller
from sandboxd.logsetup import RequestLog
from sandboxd.rpc.limits import Limits
from sandboxd.wire.codec import (
    BadMessage,
    Decoder,
    Notification,
    Request,
    encode_notification,
    encode_response,
)
from sandboxd.wire.errors import InvalidRequest, QuotaExceeded, SandboxdError, ShuttingDown

if TYPE_CHECKING:
    from sandboxd.rpc.server import RpcServer

log = structlog.get_logger("sandboxd.server")

REPLY_BATCH = 16  # inline replies written together (fewer syscalls, the client still overlaps)
WRITE_HIGH_WATER = 1024 * 1024  # replies backed up this far: stop reading that client
BIG_BUFFER = 1024 * 1024  # a connection that held this much: give memory back when it goes
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


def _discard_input(sock: Any) -> None:
    """Read and drop whatever the peer sent already (the socket is non-blocking)."""
    try:
        fd = sock.fileno()
        while os.read(fd, 65536):
            pass
    except OSError:  # nothing more to read (EAGAIN), or already gone
        pass


class Connection(asyncio.Protocol):
    """One client connection."""

    def __init__(self, server: RpcServer) -> None:
        self.server = server
        self.limits: Limits = server.limits
        self.id = next(_ids)
        self.decoder = Decoder(min(server.max_frame, self.limits.max_input))
        self.transport: asyncio.Transport | None = None
        self.caller = Caller(uid=-1, gid=-1, pid=0, admin=False)
        self.log: Any = log
        self.log_request: Callable[..., None] = RequestLog()
        self.tasks: dict[asyncio.Task[None], bool] = {}  # task -> cancel on disconnect
        self.closed = False
        self.admitted = False
        self._can_write = asyncio.Event()
        self._can_write.set()
        self._reading_paused = False
        self.on_close: list[Callable[[], None]] = []
        self.holds = 0  # subscriptions and streams that keep an idle connection open
        self.input = 0  # bytes held for messages not yet complete (counted by the server)
        self.peak = 0  # the most this connection buffered either way
        self.partial_since: float | None = None  # when the incomplete message started
        self.last_active = time.monotonic()
        self.blocked_since: float | None = None  # since when the client reads nothing
        self.starved = False  # waiting for room in the server's input budget

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
        refusal = self.server.accounting.admit(uid, admin) if uid >= 0 else "unknown peer"
        if refusal is not None:
            self.server.refused(uid, refusal)
            error = QuotaExceeded(refusal, {"limit": "connections"})
            transport.write(encode_notification("protocol.error", [error.to_wire()]))
            _discard_input(sock)  # closing with unread input would reset, losing the error
            transport.close()
            return
        self.admitted = True
        self.log = log.bind(conn=self.id, uid=uid, pid=pid)
        self.log_request = RequestLog(conn=self.id, uid=uid, pid=pid)
        self.server.connections.add(self)

    def data_received(self, data: bytes) -> None:
        if not self.admitted:
            return
        self.last_active = time.monotonic()
        self.decoder.feed(data)
        self._pump()

    def _pump(self) -> None:
        """Decode and handle requests until the buffer is empty or the client must wait.

        The limits are checked for every request as it is decoded, so one read
        full of requests cannot start more work than a connection may have.
        """
        replies: list[bytes] = []  # replies of inline calls: one write for the whole read
        decoder = self.decoder
        # What _must_wait looks at changes only when a call starts a task or a write makes
        # the transport pause us: it is asked again then, not for every inline call.
        while not self._must_wait():
            while True:
                item = decoder.next()
                if item is None:
                    break
                if type(item) is Request:
                    reply = self._handle(item)
                    if reply is None:
                        break  # a task started: in flight grew
                    replies.append(reply)
                    if len(replies) == REPLY_BATCH:  # let the client start on these
                        self.write(b"".join(replies))
                        replies = []
                        break  # the write may have paused us
                elif isinstance(item, Notification):
                    self.log.info("notification_ignored", method=item.method)
                elif isinstance(item, BadMessage):
                    if replies:
                        self.write(b"".join(replies))
                        replies = []
                    self._bad(item)
                    break
                # A Response matches no request of ours: ignored (SPEC §2).
            if item is None:
                break
        if replies:
            self.write(replies[0] if len(replies) == 1 else b"".join(replies))
        self._account_input()
        self._update_reading()

    def _account_input(self) -> None:
        held = self.decoder.buffered if not self.closed else 0
        if held != self.input:
            self.server.input_changed(self, held - self.input)
            self.input = held
            self.peak = max(self.peak, held)
        # The frame deadline runs while the client owes the rest of a message, not while
        # the daemon itself is holding back (its limits paused the reading).
        waiting_for_client = self.decoder.incomplete and not self._must_wait()
        if not waiting_for_client:
            self.partial_since = None
        elif self.partial_since is None:
            self.partial_since = time.monotonic()

    def _must_wait(self) -> bool:
        """True while this client may not start more work: too many calls in flight (its
        own or its uid's), or its replies backed up (it is not reading them)."""
        if self.closed:
            return True
        if not self._can_write.is_set():
            return True
        if self.server.accounting.uid_busy(self.caller.uid):
            self.server.wait_for_uid(self)
            return True
        limit = self.limits.max_in_flight
        if self._reading_paused:
            limit = max(1, limit // 2)
        return len(self.tasks) >= limit

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.admitted:
            return
        self.closed = True
        self._can_write.set()
        self.decoder.release()
        self._account_input()
        self.server.connection_closed(self)
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
        self.blocked_since = time.monotonic()
        self._update_reading()

    def resume_writing(self) -> None:
        self._can_write.set()
        self.blocked_since = None
        self._pump()

    def _update_reading(self) -> None:
        """Read from the client only while it may start more work, nothing decoded waits,
        and the server's input budget has room."""
        if self.transport is None or self.closed:
            return
        pause = self._must_wait() or self.starved
        if pause and not self._reading_paused:
            self._reading_paused = True
            self.transport.pause_reading()
        elif not pause and self._reading_paused:
            self._reading_paused = False
            self.transport.resume_reading()

    def wake(self) -> None:
        """Called by the server when a limit it waited for has room again."""
        if not self.closed:
            self._pump()

    def abort(self, error: SandboxdError) -> None:
        """Close now with one ``protocol.error`` saying why (a limit it broke)."""
        if self.closed or self.transport is None:
            return
        self.log.warning("connection_cut", code=error.code, error=error.message)
        self.transport.write(encode_notification("protocol.error", [error.to_wire()]))
        self.transport.abort()

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

    def hold(self) -> None:
        """Something long-lived (a subscription, a stream) uses this connection."""
        self.holds += 1

    def release(self) -> None:
        self.holds = max(0, self.holds - 1)

    # internals ----------------------------------------------------------
    def write(self, data: bytes) -> None:
        transport = self.transport
        if self.closed or transport is None:
            return
        transport.write(data)
        buffered = transport.get_write_buffer_size()
        if buffered > self.peak:
            self.peak = buffered
        if buffered > self.limits.max_output:
            self.abort(QuotaExceeded(
                f"This connection has {buffered} bytes of replies it has not read, over the "
                f"limit of {self.limits.max_output}; read your replies.",
                {"limit": self.limits.max_output},
            ))

    def _handle(self, req: Request) -> bytes | None:
        """The reply of an inline call, or None when a task will write it."""
        reply = self.server.dispatcher.dispatch(self, req)
        if isinstance(reply, bytes):
            return reply
        method = self.server.dispatcher.method(req.method)
        cancel = bool(method and method.cancel_on_disconnect)
        task = asyncio.get_running_loop().create_task(self._finish(req, reply))
        self.tasks[task] = cancel
        self.server.call_started(self, task)
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
        self.last_active = time.monotonic()
        if self._reading_paused:
            self._pump()  # requests already received may start now
        self.server.call_ended(self, task)

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

    def expire(self, now: float) -> None:
        """The sweeper's check: a message unfinished too long, a client that has read
        nothing too long, or a connection idle too long is closed."""
        lim = self.limits
        if self.partial_since is not None and now - self.partial_since > lim.frame_timeout:
            self.abort(InvalidRequest(
                f"A message was started but not finished within {lim.frame_timeout:g} s.",
                {"limit": "frame_timeout"},
            ))
        elif self.blocked_since is not None and now - self.blocked_since > lim.write_timeout:
            self.abort(QuotaExceeded(
                f"This client read none of its replies for {lim.write_timeout:g} s.",
                {"limit": "write_timeout"},
            ))
        elif (not self.tasks and not self.holds and self.input == 0
              and now - self.last_active > lim.idle_timeout):
            self.abort(InvalidRequest(
                f"This connection was idle for {lim.idle_timeout:g} s.",
                {"limit": "idle_timeout"},
            ))
