"""The Unix-socket server: the listening socket and the set of connections.

Owns binding the listening socket (or using one inherited from systemd),
refusing to start over a live daemon, replacing a stale socket file, mode
0660 and the configured group; accepting clients into ``Connection``s under
the shared limits; and the server's part of an ordered shutdown (stop accepting, let in-flight calls
finish within a grace, cancel the rest, close connections). It must not know
what any method does.
"""

from __future__ import annotations

import asyncio
import grp
import os
import socket
import stat
import time
from collections.abc import Callable

import structlog

from sandboxd.rpc.connection import BIG_BUFFER, Connection
from sandboxd.rpc.dispatcher import Dispatcher
from sandboxd.rpc.limits import Accounting, Limits, MemoryTrim

log = structlog.get_logger("sandboxd.server")


class StartupError(Exception):
    """The daemon cannot start serving; the message is one line for the operator."""


def bind_unix_socket(path: str, group: str | None) -> socket.socket:
    """Bind a fresh listening socket at ``path``, mode 0660, refusing a live daemon.

    Every failure is a ``StartupError`` with one line naming the path.
    """
    try:
        return _bind(path, group)
    except OSError as exc:
        raise StartupError(f"cannot listen on {path}: {exc.strerror or exc}") from None


def _bind(path: str, group: str | None) -> socket.socket:
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


class RpcServer:
    """Accepts clients into ``Connection``s and keeps the limits they share.

    Owns the per-uid and total accounting (``limits.Accounting``), waking
    connections that waited for their uid's calls or for the input budget,
    the once-a-second sweep that closes connections past a deadline, the
    rate-limited log of refused connections, and giving memory back after a
    connection that held a large buffer is gone.
    """

    SWEEP_INTERVAL = 1.0
    REFUSAL_LOG_INTERVAL = 10.0

    def __init__(
        self,
        dispatcher: Dispatcher,
        *,
        max_frame: int,
        is_admin: Callable[[int, int, frozenset[int]], bool],
        limits: Limits | None = None,
    ) -> None:
        self.dispatcher = dispatcher
        self.max_frame = max_frame
        self.is_admin = is_admin
        self.limits = limits or Limits()
        self.accounting = Accounting(self.limits)
        self.connections: set[Connection] = set()
        self.tasks: set[asyncio.Task[None]] = set()
        self._server: asyncio.AbstractServer | None = None
        self._idle = asyncio.Event()
        self._uid_waiters: dict[int, set[Connection]] = {}
        self._starved: list[Connection] = []
        self._sweeper: asyncio.Task[None] | None = None
        self._trim = MemoryTrim()
        self._trim_handle: asyncio.TimerHandle | None = None
        self._refusals = 0
        self._refusal_logged = 0.0

    async def start(self, sock: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        sock.setblocking(False)
        self._server = await loop.create_unix_server(lambda: Connection(self), sock=sock)
        self._sweeper = loop.create_task(self._sweep_forever(), name="rpc-sweeper")

    def stop_accepting(self) -> None:
        if self._server is not None:
            self._server.close()

    def in_flight(self) -> int:
        return len(self.tasks)

    # -- what connections report ----------------------------------------------

    def refused(self, uid: int, why: str) -> None:
        """A connection over a limit was turned away; logged at a bounded rate."""
        self._refusals += 1
        now = time.monotonic()
        if now - self._refusal_logged >= self.REFUSAL_LOG_INTERVAL:
            log.warning("connections_refused", count=self._refusals, last_uid=uid, reason=why)
            self._refusals = 0
            self._refusal_logged = now

    def call_started(self, conn: Connection, task: asyncio.Task[None]) -> None:
        self.tasks.add(task)
        self.accounting.call_started(conn.caller.uid)

    def call_ended(self, conn: Connection, task: asyncio.Task[None]) -> None:
        self.tasks.discard(task)
        if self.accounting.call_ended(conn.caller.uid):
            for waiter in self._uid_waiters.pop(conn.caller.uid, set()):
                waiter.wake()
        if not self.tasks:
            self._idle.set()

    def wait_for_uid(self, conn: Connection) -> None:
        self._uid_waiters.setdefault(conn.caller.uid, set()).add(conn)

    def input_changed(self, conn: Connection, delta: int) -> None:
        accounting = self.accounting
        accounting.input_changed(delta)
        if delta > 0 and accounting.input_full and not conn.starved:
            conn.starved = True  # read nothing more from it until the budget has room
            self._starved.append(conn)
        elif delta < 0 and self._starved and not accounting.input_full:
            starved, self._starved = self._starved, []
            for waiter in starved:
                waiter.starved = False
                waiter.wake()

    def connection_closed(self, conn: Connection) -> None:
        self.connections.discard(conn)
        self.accounting.leave(conn.caller.uid)
        waiting = self._uid_waiters.get(conn.caller.uid)
        if waiting is not None:
            waiting.discard(conn)
        if conn.starved:
            self._starved.remove(conn)
        if conn.peak >= BIG_BUFFER:
            self._trim_soon()

    def _trim_soon(self) -> None:
        if self._trim_handle is None:
            loop = asyncio.get_running_loop()
            self._trim_handle = loop.call_later(MemoryTrim.MIN_INTERVAL, self._do_trim)

    def _do_trim(self) -> None:
        self._trim_handle = None
        self._trim()

    async def _sweep_forever(self) -> None:
        while True:
            await asyncio.sleep(self.SWEEP_INTERVAL)
            now = time.monotonic()
            for conn in list(self.connections):
                conn.expire(now)

    # -- shutdown ------------------------------------------------------------

    async def drain(self, grace: float, cleanup: float) -> int:
        """Let in-flight calls finish for up to ``grace`` seconds, then cancel the rest and
        give their clean-up up to ``cleanup`` seconds; how many were cancelled."""
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
            _, pending = await asyncio.wait(leftover, timeout=cleanup)
            for task in pending:  # a clean-up stuck on the engine: cut it short
                task.cancel()
        return len(leftover)

    def close_connections(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
        if self._trim_handle is not None:
            self._trim_handle.cancel()
            self._trim_handle = None
        for conn in list(self.connections):
            if conn.transport is not None:
                conn.transport.close()
