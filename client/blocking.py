"""A synchronous client for scripts: the asyncio client run on a private loop thread.

This module owns ``Client``, a blocking facade over ``aio.SandboxClient``
whose event loop runs in a daemon thread, and the blocking ``Sandbox``
handle. Every method submits a coroutine to that loop and waits for it; the
wire logic (msgids, matching, connection loss) stays in ``aio`` and must not
be duplicated here. It must not import aiodocker or the daemon, and must not
touch the caller's own event loop (it works inside and outside one).
"""

from __future__ import annotations

import asyncio
import builtins
import concurrent.futures
import threading
from collections.abc import Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Self, TypeVar

from sandboxd.wire.errors import ConnectionLost

from . import aio, models
from .aio import DEFAULT_CLIENT_MAX_FRAME, NotificationHandler
from .models import DaemonInfo, ExecResult, Stats

__all__ = ["Client", "Sandbox"]

T = TypeVar("T")

_CLOSE_GRACE = 5.0


class Client:
    """A blocking sandboxd client: ``with Client() as c: c.create(ttl=60).exec([...])``.

    Connects on construction (raising ``ConnectFailed`` if the daemon cannot
    be reached). Safe to share between threads. ``close()`` is idempotent.
    Notification callbacks run on the client's loop thread: they must not call
    this client's blocking methods (that raises ``RuntimeError`` rather than
    deadlocking).
    """

    def __init__(
        self,
        path: str | None = None,
        *,
        connect_timeout: float = 5.0,
        max_frame: int = DEFAULT_CLIENT_MAX_FRAME,
    ) -> None:
        self._closed = False
        self._close_lock = threading.Lock()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._run_loop, name="sandboxd-client-loop", daemon=True
        )
        self._thread.start()
        self._aio = aio.SandboxClient(path, connect_timeout=connect_timeout, max_frame=max_frame)
        self.path = self._aio.path
        try:
            self._run(self._aio.connect())
        except BaseException:
            self.close()
            raise

    def _run_loop(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.run_forever()

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        if threading.current_thread() is self._thread:
            coro.close()
            raise RuntimeError(
                "A blocking sandboxd Client method was called from its own loop thread "
                "(a notification callback); use the aio client there instead."
            )
        if self._closed:
            coro.close()
            raise ConnectionLost("The client is closed.")
        fut = asyncio.run_coroutine_threadsafe(coro, self._loop)
        try:
            return fut.result()
        except BaseException:
            fut.cancel()
            raise

    @property
    def closed(self) -> bool:
        return self._closed or self._aio.closed

    def close(self) -> None:
        """Close the connection and stop the loop thread. Safe to call more than once."""
        with self._close_lock:
            if self._closed:
                return
            self._closed = True
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            fut = asyncio.run_coroutine_threadsafe(self._aio.close(), self._loop)
            try:
                fut.result(timeout=_CLOSE_GRACE)
            except (concurrent.futures.TimeoutError, Exception):
                fut.cancel()
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=_CLOSE_GRACE)
        if not self._thread.is_alive() and not self._loop.is_closed():
            self._loop.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- generic --------------------------------------------------------------

    def call(self, method: str, /, **params: Any) -> Any:
        """Call ``method`` with named arguments (None values omitted); see ``aio``."""
        return self._run(self._aio.call(method, **params))

    def on_notification(
        self, method: str, callback: NotificationHandler
    ) -> Callable[[], None]:
        """Register ``callback(params)`` for ``method``; it runs on the loop thread.

        Returns a function that unregisters it.
        """
        return self._aio.on_notification(method, callback)

    # -- typed ----------------------------------------------------------------

    def _wrap(self, sb: models.Sandbox) -> Sandbox:
        return Sandbox(**sb.data_fields(), _client=self)

    def ping(self) -> str:
        return self._run(self._aio.ping())

    def info(self) -> DaemonInfo:
        return self._run(self._aio.info())

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
    ) -> Sandbox:
        return self._wrap(self._run(self._aio.create(
            image=image, name=name, memory=memory, cpus=cpus, pids=pids, ttl=ttl,
            idle_timeout=idle_timeout, env=env, workdir=workdir, labels=labels,
            network=network, readonly_rootfs=readonly_rootfs, user=user, **extra,
        )))

    def get(self, id: str) -> Sandbox:
        return self._wrap(self._run(self._aio.get(id)))

    def list(
        self, status: str | None = None, labels: Mapping[str, str] | None = None
    ) -> builtins.list[Sandbox]:
        return [self._wrap(sb) for sb in self._run(self._aio.list(status, labels))]

    def pause(self, id: str) -> Sandbox:
        return self._wrap(self._run(self._aio.pause(id)))

    def resume(self, id: str) -> Sandbox:
        return self._wrap(self._run(self._aio.resume(id)))

    def extend(self, id: str, ttl: float) -> Sandbox:
        return self._wrap(self._run(self._aio.extend(id, ttl)))

    def remove(self, id: str) -> None:
        self._run(self._aio.remove(id))

    def stats(self, id: str) -> Stats:
        return self._run(self._aio.stats(id))

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
        return self._run(self._aio.exec(
            id, cmd, env=env, workdir=workdir, user=user, stdin=stdin,
            timeout=timeout, max_output=max_output,
        ))


@dataclass(eq=True)
class Sandbox(models.Sandbox):
    """A sandbox's data plus the blocking client that fetched it (not compared or shown).

    ``pause``, ``resume``, ``extend`` and ``refresh`` update this object in
    place and return it.
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
        return self._c().exec(
            self.id, cmd, env=env, workdir=workdir, user=user, stdin=stdin,
            timeout=timeout, max_output=max_output,
        )

    def refresh(self) -> Self:
        self._update_from(self._c().get(self.id))
        return self

    def pause(self) -> Self:
        self._update_from(self._c().pause(self.id))
        return self

    def resume(self) -> Self:
        self._update_from(self._c().resume(self.id))
        return self

    def extend(self, ttl: float) -> Self:
        self._update_from(self._c().extend(self.id, ttl))
        return self

    def remove(self) -> None:
        self._c().remove(self.id)

    def stats(self) -> Stats:
        return self._c().stats(self.id)
