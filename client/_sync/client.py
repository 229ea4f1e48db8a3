# GENERATED FILE: do not edit. Written by scripts/unasync.py from client/_async/client.py;
# edit that file and run `python scripts/unasync.py` (a test fails when they differ).
"""The typed sandboxd API: ``Client`` and the ``BlockingSandbox`` handle it returns.

This module owns one method per SPEC §3 call (``ping``, ``info``, ``create``,
``get``, ``list``, ``pause``, ``resume``, ``extend``, ``remove``, ``stats``,
``snapshot``, ``exec``, ``start``, ``attach``, ``exec_list``, ``events``, the
files calls, and the image calls ``images``, ``ensure_image``,
``remove_image``), the generic ``call``/``notify``/``on_notification``,
turning named arguments into wire params and replies into models, and the
sandbox handle that acts on itself (``sb.exec(...)``). The streamed process
lives in ``process``, the chunked file transfers in ``files`` and the pull
with live progress in ``pulls``: this module only exposes them. It must not
touch sockets, msgids or asyncio (``connection`` and ``_compat`` do), nor
import anything of ``sandboxd`` but ``sandboxd.wire``. Written once for both
sides: ``scripts/unasync.py`` derives the blocking module from the asyncio one.
"""

from __future__ import annotations

import builtins
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Self

from .. import models
from ..connection import DEFAULT_CLIENT_MAX_FRAME, BlockingConnection
from ..exceptions import UnexpectedReply
from ..models import (
    DaemonInfo,
    EnsureResult,
    ExecInfo,
    ExecResult,
    FileInfo,
    ImageInfo,
    Snapshot,
    Stats,
)
from ..protocol import NotificationHandler, named_params
from . import files, pulls
from ._compat import connect_on_init
from .events import DEFAULT_MAX_BUFFER, BlockingEventStream
from .files import Data, Writable
from .process import DEFAULT_MAX_BUFFER as DEFAULT_OUTPUT_BUFFER
from .process import BlockingProcess, attach_process, start_process
from .pulls import ProgressCallback

__all__ = ["BlockingSandbox", "Client"]


def _argv(cmd: Sequence[str]) -> list[str]:
    """``cmd`` as the wire's argv; a plain string is refused (it would be split by nobody)."""
    if isinstance(cmd, (str, bytes)):
        raise TypeError(
            "cmd must be a list of strings (an argv), not a string; "
            "for a shell use ['sh', '-c', command]."
        )
    return [str(c) for c in cmd]


class Client:
    """A sandboxd client: ``with Client() as c: sb = c.create(ttl=60)``.

    ``path`` is the daemon's socket (None: ``$SANDBOXD_SOCKET`` or the
    default socket). Many calls may be in flight at once on its one
    connection. Once the connection is lost (the daemon closed it, an I/O
    error, a ``protocol.error`` notification, or ``close()``), every pending
    call raises ``ConnectionLost`` at once and every later call raises it
    immediately; the client does not reconnect: make a new one.

    Calls have no client-side deadline of their own (an exec may legitimately
    run long): the daemon's own deadlines (``exec(timeout=...)``) bound them.
    """

    def __init__(
        self,
        path: str | None = None,
        *,
        connect_timeout: float = 5.0,
        max_frame: int = DEFAULT_CLIENT_MAX_FRAME,
    ) -> None:
        self._conn = BlockingConnection(
            path, connect_timeout=connect_timeout, max_frame=max_frame)
        connect_on_init(self._conn)

    # -- connection ---------------------------------------------------------------

    @property
    def path(self) -> str | None:
        """The daemon's socket path."""
        return self._conn.path

    @property
    def connect_timeout(self) -> float:
        return self._conn.connect_timeout

    @property
    def max_frame(self) -> int:
        return self._conn.max_frame

    @property
    def connected(self) -> bool:
        """True while the connection is open and usable."""
        return self._conn.connected

    @property
    def closed(self) -> bool:
        """True once the connection was lost or closed (the client is then unusable)."""
        return self._conn.closed

    def connect(self) -> Self:
        """Open the connection (idempotent). Raises ``ConnectFailed`` on failure."""
        self._conn.connect()
        return self

    def close(self) -> None:
        """Close the connection; pending calls fail with ``ConnectionLost``. Idempotent."""
        self._conn.close()

    def __enter__(self) -> Self:
        return self.connect()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- generic ------------------------------------------------------------------

    def call(self, method: str, /, **params: Any) -> Any:
        """Call ``method`` with named arguments and return its result.

        Arguments whose value is None are omitted (the daemon's default then
        applies); params go on the wire as ``[{...}]``, or ``[]`` when none.
        An error reply raises the ``sandboxd.wire.errors`` class of its code.
        """
        return self._conn.call(method, named_params(params))

    def call_raw(self, method: str, params: builtins.list[Any]) -> Any:
        """Call ``method`` with an explicit params array (for non-SPEC servers and tests)."""
        return self._conn.call(method, params)

    def notify(self, method: str, /, **params: Any) -> None:
        """Send a notification (no reply is expected)."""
        self._conn.notify(method, named_params(params))

    def on_notification(self, method: str, callback: NotificationHandler) -> Callable[[], None]:
        """Call ``callback(params)`` for each notification named ``method``.

        Several callbacks may share a method; each runs, inline, in arrival
        order, while the connection reads: keep them quick and never call the
        client from one. Returns a function that unregisters this callback. A
        callback that raises is logged and never breaks the connection.
        """
        return self._conn.on_notification(method, callback)

    # -- daemon -------------------------------------------------------------------

    def ping(self) -> str:
        """``daemon.ping``: returns ``"pong"``."""
        return models._str(self.call("daemon.ping"))

    def info(self) -> DaemonInfo:
        """``daemon.info``: version, engine state, counts, and who the caller is."""
        return DaemonInfo.from_wire(self.call("daemon.info"))

    # -- events -------------------------------------------------------------------

    def events(
        self,
        types: Sequence[str] | None = None,
        sandbox: str | None = None,
        labels: Mapping[str, str] | None = None,
        since: int | None = None,
        *,
        max_buffer: int = DEFAULT_MAX_BUFFER,
        max_backoff: float = 5.0,
    ) -> BlockingEventStream:
        """Follow the daemon's events: ``for ev in client.events(["sandbox.*"]): ...``.

        ``types`` match exactly or by prefix (``"sandbox.*"``); ``sandbox`` is an
        id or name; ``labels`` must all match; ``since`` replays retained events
        after that seq first. The stream resubscribes by itself when cut off
        and reconnects (on new connections) when the connection is lost,
        without gaps or duplicates; see ``BlockingEventStream``.
        """
        return BlockingEventStream(
            self._conn, types=types, sandbox=sandbox, labels=labels, since=since,
            max_buffer=max_buffer, max_backoff=max_backoff)

    # -- images -------------------------------------------------------------------

    def images(self) -> builtins.list[ImageInfo]:
        """``image.list``: the images you may use and your snapshots, one entry per reference."""
        reply = self.call("image.list")
        if not isinstance(reply, (builtins.list, tuple)):
            raise UnexpectedReply(
                f"Expected a list of images from image.list, got {type(reply).__name__}.")
        return [ImageInfo.from_wire(item) for item in reply]

    def ensure_image(
        self, ref: str, on_progress: ProgressCallback | None = None
    ) -> EnsureResult:
        """``image.ensure``: make sure image ``ref`` is present, pulling it when missing.

        The result's ``pulled`` says whether it had to be pulled (by this call
        or one it joined). ``on_progress(progress)`` is called with each
        ``PullProgress`` of the pull as it comes, while the call waits; every
        one has been delivered when this returns. It runs while the
        connection reads: keep it quick and never call the client from it; an
        exception it raises is raised here once the reply came.
        """
        return pulls.ensure_image(self._conn, ref, on_progress)

    def remove_image(self, ref: str) -> None:
        """``image.remove``: remove one of your snapshots (``NotFound`` for anything else).

        An admin may remove anyone's snapshot; other images are never removed
        through sandboxd (``PermissionDenied`` for an admin). A snapshot that a
        sandbox still runs from is a ``Conflict``.
        """
        self.call("image.remove", ref=ref)

    # -- sandboxes ----------------------------------------------------------------

    def _bind(self, data: Any) -> BlockingSandbox:
        sb = BlockingSandbox.from_wire(data)
        sb._client = self
        return sb

    def create(
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
    ) -> BlockingSandbox:
        """``sandbox.create``: start a sandbox; returns when it is running.

        Omitted (None) arguments take the daemon's defaults; ``ttl=0`` asks for
        no expiry. ``memory`` is bytes or a string like ``"512m"``. ``extra``
        is passed through unchanged, for arguments newer than this client.
        """
        reply = self.call(
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

    def get(self, id: str) -> BlockingSandbox:
        """``sandbox.get``: one sandbox by id or name."""
        return self._bind(self.call("sandbox.get", id=id))

    def list(
        self, status: str | None = None, labels: Mapping[str, str] | None = None
    ) -> builtins.list[BlockingSandbox]:
        """``sandbox.list``: the caller's sandboxes, filtered by status and labels (all match)."""
        reply = self.call(
            "sandbox.list",
            status=status,
            labels=dict(labels) if labels is not None else None,
        )
        if not isinstance(reply, (builtins.list, tuple)):
            raise UnexpectedReply(
                f"Expected a list of sandboxes from sandbox.list, got {type(reply).__name__}.")
        return [self._bind(item) for item in reply]

    def pause(self, id: str) -> BlockingSandbox:
        """``sandbox.pause``: freeze every process in the sandbox."""
        return self._bind(self.call("sandbox.pause", id=id))

    def resume(self, id: str) -> BlockingSandbox:
        """``sandbox.resume``: unfreeze a paused sandbox."""
        return self._bind(self.call("sandbox.resume", id=id))

    def extend(self, id: str, ttl: float) -> BlockingSandbox:
        """``sandbox.extend``: the deadline becomes now + ``ttl`` seconds."""
        return self._bind(self.call("sandbox.extend", id=id, ttl=ttl))

    def remove(self, id: str) -> None:
        """``sandbox.remove``: stop and remove the sandbox."""
        self.call("sandbox.remove", id=id)

    def stats(self, id: str) -> Stats:
        """``sandbox.stats``: a resource sample."""
        return Stats.from_wire(self.call("sandbox.stats", id=id))

    def snapshot(self, id: str, ref: str | None = None) -> Snapshot:
        """``sandbox.snapshot``: commit sandbox ``id``'s filesystem as a local image.

        The image is ``sandboxd-snapshot/u<uid>/<name>:<tag>``; ``ref`` gives
        the ``name`` or ``name:tag`` (a lowercase Docker name; by default the
        sandbox's name and a timestamp tag). ``create(image=snap.ref)`` starts
        a copy of the sandbox (a fork); ``remove_image(snap.ref)`` drops it.
        """
        return Snapshot.from_wire(self.call("sandbox.snapshot", id=id, ref=ref))

    def exec(
        self,
        id: str,
        cmd: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        workdir: str | None = None,
        user: str | None = None,
        stdin: bytes | None = None,
        timeout: float | None = None,
        max_output: int | None = None,
    ) -> ExecResult:
        """``sandbox.exec``: run ``cmd`` (an argv list, never a shell string), buffered.

        ``stdin`` bytes are fed to the process; ``timeout`` (seconds) kills it
        and everything it started; output over ``max_output`` bytes per stream
        is cut in the middle and ``truncated`` is set.
        """
        return ExecResult.from_wire(self.call(
            "sandbox.exec",
            id=id,
            cmd=_argv(cmd),
            env=dict(env) if env is not None else None,
            workdir=workdir,
            user=user,
            stdin=bytes(stdin) if stdin is not None else None,
            timeout=timeout,
            max_output=max_output,
        ))

    # -- streamed exec ------------------------------------------------------------

    def start(
        self,
        id: str,
        cmd: Sequence[str],
        *,
        stdin: bool = False,
        tty: bool = False,
        detach: bool = False,
        env: Mapping[str, str] | None = None,
        workdir: str | None = None,
        user: str | None = None,
        timeout: float | None = None,
        rows: int | None = None,
        cols: int | None = None,
        max_buffer: int | None = DEFAULT_OUTPUT_BUFFER,
    ) -> BlockingProcess:
        """``exec.start``: run ``cmd`` in sandbox ``id`` and stream it; the process at once.

        ``stdin=True`` opens its stdin for ``proc.stdin.write``; ``tty=True``
        gives it a terminal of ``rows`` x ``cols`` (all output is then
        stdout); ``detach=True`` lets it outlive this connection (follow it
        again with ``attach``); ``timeout`` (seconds) kills it and everything
        it started. ``max_buffer`` bounds the unread output buffered per
        stream (None: no bound); see the buffering rule in ``process``.
        """
        return start_process(self._conn, {
            "id": id,
            "cmd": _argv(cmd),
            "env": dict(env) if env is not None else None,
            "workdir": workdir,
            "user": user,
            "stdin": stdin or None,
            "tty": tty or None,
            "detach": detach or None,
            "timeout": timeout,
            "rows": rows,
            "cols": cols,
        }, stdin=stdin, tty=tty, max_buffer=max_buffer)

    def attach(
        self, exec_id: str, offset: int = 0, *, max_buffer: int | None = DEFAULT_OUTPUT_BUFFER
    ) -> BlockingProcess:
        """``exec.attach``: follow exec ``exec_id`` (a detached one) on this connection.

        Its output is replayed from byte ``offset`` (stdout and stderr counted
        together); ``proc.offset`` says where the replay really starts (later
        when older output was dropped). A new attach, from any connection,
        takes the exec over.
        """
        return attach_process(self._conn, exec_id, offset, max_buffer=max_buffer)

    def exec_list(self, id: str) -> builtins.list[ExecInfo]:
        """``exec.list``: the streamed execs of sandbox ``id``."""
        reply = self.call("exec.list", id=id)
        if not isinstance(reply, (builtins.list, tuple)):
            raise UnexpectedReply(
                f"Expected a list of execs from exec.list, got {type(reply).__name__}.")
        return [ExecInfo.from_wire(item) for item in reply]

    # -- files --------------------------------------------------------------------

    def write_file(self, id: str, path: str, data: Data, *, mode: int | None = None) -> int:
        """Write ``data`` (bytes, or a binary file read to its end) to ``path``; bytes written.

        ``path`` is absolute in the sandbox; parents are created; the file is
        replaced. It goes in pieces of at most 1 MiB.
        """
        return files.write_file(self._conn, id, path, data, mode)

    def read_file(self, id: str, path: str) -> bytes:
        """The contents of ``path`` (read in pieces of 1 MiB). ``NotFound`` if absent."""
        return files.read_file(self._conn, id, path)

    def read_file_into(self, id: str, path: str, file: Writable) -> int:
        """Copy ``path`` into the binary ``file`` piece by piece (never whole in memory)."""
        return files.read_file_into(self._conn, id, path, file)

    def stat(self, id: str, path: str) -> FileInfo:
        """``files.stat``: name, size, mode, is_dir, mtime of ``path``."""
        return files.stat(self._conn, id, path)

    def listdir(self, id: str, path: str) -> builtins.list[FileInfo]:
        """``files.list``: the entries of the directory ``path``."""
        return files.listdir(self._conn, id, path)


@dataclass(eq=True)
class BlockingSandbox(models.Sandbox):
    """A sandbox's data plus the client that fetched it, so it can act on itself.

    The client reference is neither compared nor shown. Methods that return a
    new state (``pause``, ``resume``, ``extend``, ``refresh``) update this
    object in place and return it.
    """

    _client: Client | None = field(default=None, compare=False, repr=False)

    def _c(self) -> Client:
        if self._client is None:
            raise RuntimeError("This Sandbox is not bound to a client.")
        return self._client

    def exec(
        self,
        cmd: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        workdir: str | None = None,
        user: str | None = None,
        stdin: bytes | None = None,
        timeout: float | None = None,
        max_output: int | None = None,
    ) -> ExecResult:
        """Run ``cmd`` in this sandbox (see ``Client.exec``)."""
        return self._c().exec(
            self.id, cmd, env=env, workdir=workdir, user=user, stdin=stdin,
            timeout=timeout, max_output=max_output,
        )

    def start(
        self,
        cmd: Sequence[str],
        *,
        stdin: bool = False,
        tty: bool = False,
        detach: bool = False,
        env: Mapping[str, str] | None = None,
        workdir: str | None = None,
        user: str | None = None,
        timeout: float | None = None,
        rows: int | None = None,
        cols: int | None = None,
        max_buffer: int | None = DEFAULT_OUTPUT_BUFFER,
    ) -> BlockingProcess:
        """Run ``cmd`` in this sandbox, streamed (see ``Client.start``)."""
        return self._c().start(
            self.id, cmd, stdin=stdin, tty=tty, detach=detach, env=env, workdir=workdir,
            user=user, timeout=timeout, rows=rows, cols=cols, max_buffer=max_buffer,
        )

    def exec_list(self) -> builtins.list[ExecInfo]:
        """The streamed execs of this sandbox."""
        return self._c().exec_list(self.id)

    def write_file(self, path: str, data: Data, *, mode: int | None = None) -> int:
        """Write ``data`` (bytes or a binary file) to ``path`` here; bytes written."""
        return self._c().write_file(self.id, path, data, mode=mode)

    def read_file(self, path: str) -> bytes:
        """The contents of ``path`` here."""
        return self._c().read_file(self.id, path)

    def read_file_into(self, path: str, file: Writable) -> int:
        """Copy ``path`` here into the binary ``file``, piece by piece; bytes copied."""
        return self._c().read_file_into(self.id, path, file)

    def stat(self, path: str) -> FileInfo:
        """What ``path`` is here."""
        return self._c().stat(self.id, path)

    def listdir(self, path: str) -> builtins.list[FileInfo]:
        """The entries of the directory ``path`` here."""
        return self._c().listdir(self.id, path)

    def refresh(self) -> Self:
        """Re-read this sandbox's state from the daemon."""
        self._update_from(self._c().get(self.id))
        return self

    def pause(self) -> Self:
        """Freeze every process in this sandbox."""
        self._update_from(self._c().pause(self.id))
        return self

    def resume(self) -> Self:
        """Unfreeze this sandbox."""
        self._update_from(self._c().resume(self.id))
        return self

    def extend(self, ttl: float) -> Self:
        """Its deadline becomes now + ``ttl`` seconds."""
        self._update_from(self._c().extend(self.id, ttl))
        return self

    def remove(self) -> None:
        """Stop and remove this sandbox."""
        self._c().remove(self.id)

    def stats(self) -> Stats:
        """A resource sample of this sandbox."""
        return self._c().stats(self.id)

    def snapshot(self, ref: str | None = None) -> Snapshot:
        """Commit this sandbox's filesystem as an image (see ``Client.snapshot``)."""
        return self._c().snapshot(self.id, ref)
