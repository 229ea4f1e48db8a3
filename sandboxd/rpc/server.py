"""The Unix-socket server: the listening socket and the set of connections.

Owns binding the listening socket (or using one inherited from systemd),
refusing to start over a live daemon, replacing a stale socket file, mode
0660 and the configured group; accepting clients into ``Connection``s; and
the server's part of an ordered shutdown (stop accepting, let in-flight calls
finish within a grace, cancel the rest, close connections). It must not know
what any method does.
"""

from __future__ import annotations

import asyncio
import grp
import os
import socket
import stat
from collections.abc import Callable

from sandboxd.rpc.connection import Connection
from sandboxd.rpc.dispatcher import Dispatcher


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
        for conn in list(self.connections):
            if conn.transport is not None:
                conn.transport.close()
