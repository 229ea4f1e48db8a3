"""Following the daemon's event stream: the ``Event`` model and the resuming ``EventStream``.

This module owns the client side of ``events.subscribe`` (SPEC §3 events):
turning ``event`` notifications into ``Event`` objects in seq order, and
keeping the stream whole for the consumer. When the daemon cuts the
subscription off (``events.lagged``), when the consumer falls so far behind
that the local buffer fills, or when the connection is lost, the stream
resubscribes with ``since`` = the last seq it yielded, on a new connection
if need be (retrying with backoff until it works or the consumer stops), and
drops anything at or before that seq: the consumer sees no gap the daemon
still retains and no duplicate.

The reconnecting is explicit and owned here, never hidden in ``aio``: a
stream opens its own ``SandboxClient`` connections to the same socket after
the first one is lost and closes them when it ends. It must not import
aiodocker or the daemon (only ``sandboxd.wire.errors`` and ``sandboxd.wire.codec``
through ``aio``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections import deque
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import TYPE_CHECKING, Any, Self

from sandboxd.wire.errors import ConnectionLost, EngineUnavailable, SandboxdError, ShuttingDown

from .models import _as_map, _extra, _int, _names, _opt_str, _str, _to_dict

if TYPE_CHECKING:
    from .aio import SandboxClient

__all__ = ["Event", "EventStream"]

log = logging.getLogger("sandboxd_client.events")

DEFAULT_MAX_BUFFER = 10_000
_LIVENESS_POLL = 0.25  # seconds between checks that the connection is still there
_RETRYABLE = (ConnectionLost, ShuttingDown, EngineUnavailable)


@dataclass(frozen=True)
class Event:
    """One daemon event (SPEC §3): ``seq`` orders them, ``time`` is RFC 3339 UTC."""

    seq: int
    time: str
    type: str
    sandbox_id: str | None = None
    sandbox_name: str | None = None
    owner_uid: int | None = None
    data: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_wire(cls, data: Any) -> Self:
        m = _as_map(data, "an event")
        owner = m.get("owner_uid")
        payload = m.get("data")
        return cls(
            seq=_int(m.get("seq")),
            time=_str(m.get("time")),
            type=_str(m.get("type")),
            sandbox_id=_opt_str(m.get("sandbox_id")),
            sandbox_name=_opt_str(m.get("sandbox_name")),
            owner_uid=None if owner is None else _int(owner),
            data=dict(payload) if isinstance(payload, Mapping) else {},
            extra=_extra(m, _names(cls)),
        )

    def to_dict(self) -> dict[str, Any]:
        return _to_dict(self, Event)


class EventStream:
    """``async for event in client.events(...)``: the daemon's events, resumed across trouble.

    The first subscription uses the client's own connection; an error
    before it succeeds (the daemon is not running, a bad argument) is
    raised. After that, a lost connection is replaced by a new one to the
    same socket, retried with backoff (up to ``max_backoff`` seconds apart)
    for as long as the consumer keeps iterating. Leaving an ``async for``
    early ends the stream (its subscription and any connection it opened);
    ``aclose()`` or ``async with`` do so at a moment of your choosing.

    ``last_seq`` is the seq of the last event yielded (or the starting
    point); ``reconnects`` and ``resubscribes`` count the repairs made.
    """

    def __init__(
        self,
        client: SandboxClient,
        *,
        types: Sequence[str] | None = None,
        sandbox: str | None = None,
        labels: Mapping[str, str] | None = None,
        since: int | None = None,
        max_buffer: int = DEFAULT_MAX_BUFFER,
        max_backoff: float = 5.0,
    ) -> None:
        if isinstance(types, str):
            raise TypeError("types must be a list of event types, e.g. ['sandbox.*']")
        self._client = client
        self._conn = client
        self._own: SandboxClient | None = None  # a connection this stream opened
        self._args: dict[str, Any] = {
            "types": list(types) if types is not None else None,
            "sandbox": sandbox,
            "labels": dict(labels) if labels is not None else None,
        }
        self.last_seq: int | None = since
        self.subscription: str | None = None
        self.reconnects = 0
        self.resubscribes = 0
        self.max_buffer = max(1, max_buffer)
        self.max_backoff = max_backoff
        self._buffer: deque[tuple[str, Any, Any]] = deque()
        self._wake = asyncio.Event()
        self._overflow = False  # the local buffer filled: resubscribe once it is read
        self._ever_subscribed = False
        self._closed = False
        self._unhook: list[Callable[[], None]] = []

    # -- the iterator protocol ---------------------------------------------

    def __aiter__(self) -> AsyncIterator[Event]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[Event]:
        # A generator, so that leaving ``async for`` early closes the stream.
        try:
            while True:
                try:
                    event = await self.__anext__()
                except StopAsyncIteration:
                    return
                yield event
        finally:
            await self.aclose()

    async def __anext__(self) -> Event:
        while not self._closed:
            if self.subscription is None:
                await self._subscribe()
                continue
            event = self._next_buffered()
            if event is not None:
                return event
            if self.subscription is None:
                continue  # cut off: resubscribe
            if self._overflow:
                await self._restart("the local buffer of %d events filled", self.max_buffer)
                continue
            if self._conn.closed:
                self.subscription = None
                log.warning("sandboxd event stream: connection lost; reconnecting")
                continue
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), _LIVENESS_POLL)
        raise StopAsyncIteration

    async def start(self) -> Self:
        """Subscribe now rather than at the first ``anext``; returns the stream.

        Events that happen after ``start()`` returns are certain to be seen,
        which is what a caller that is about to cause them wants.
        """
        if self.subscription is None and not self._closed:
            await self._subscribe()
        return self

    async def aclose(self) -> None:
        """End the subscription and close any connection this stream opened. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._wake.set()
        sub, self.subscription = self.subscription, None
        self._unhook_all()
        if sub is not None and not self._conn.closed:
            with contextlib.suppress(SandboxdError, TimeoutError):
                async with asyncio.timeout(2.0):
                    await self._conn.call("events.unsubscribe", subscription=sub)
        if self._own is not None:
            await self._own.close()
            self._own = None
        self._buffer.clear()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    # -- internals ----------------------------------------------------------

    def _next_buffered(self) -> Event | None:
        while self._buffer:
            kind, sub, payload = self._buffer.popleft()
            if sub != self.subscription:
                continue  # an earlier subscription's, or another stream's on this client
            if kind == "lagged":
                log.warning("sandboxd event stream: cut off by the daemon at seq %s; "
                            "resubscribing", payload)
                self.subscription = None
                if self.last_seq is None and isinstance(payload, int):
                    self.last_seq = payload - 1
                self.resubscribes += 1
                return None
            try:
                event = Event.from_wire(payload)
            except SandboxdError:
                log.warning("sandboxd event stream: ignoring a malformed event")
                continue
            if self.last_seq is not None and event.seq <= self.last_seq:
                continue  # already yielded
            self.last_seq = event.seq
            return event
        return None

    def _on_event(self, params: list[Any]) -> None:
        if len(params) < 2:
            return
        self._accept("event", params[0], params[1])

    def _on_lagged(self, params: list[Any]) -> None:
        if len(params) < 2:
            return
        info = params[1]
        next_seq = info.get("next_seq") if isinstance(info, Mapping) else None
        self._accept("lagged", params[0], next_seq if isinstance(next_seq, int) else None)

    def _accept(self, kind: str, sub: Any, payload: Any) -> None:
        if isinstance(sub, bytes):
            sub = sub.decode("utf-8", "replace")
        if self.subscription is not None and sub != self.subscription:
            return  # not ours (while subscribing we cannot tell yet: keep it)
        if kind == "event" and len(self._buffer) >= self.max_buffer:
            self._overflow = True
            return
        self._buffer.append((kind, sub, payload))
        self._wake.set()

    def _hook(self, conn: SandboxClient) -> None:
        self._unhook_all()
        self._unhook = [
            conn.on_notification("event", self._on_event),
            conn.on_notification("events.lagged", self._on_lagged),
        ]

    def _unhook_all(self) -> None:
        for remove in self._unhook:
            remove()
        self._unhook = []

    async def _restart(self, why: str, *args: Any) -> None:
        """Drop the current subscription and resubscribe from ``last_seq``."""
        log.warning("sandboxd event stream: " + why + "; resubscribing", *args)
        sub, self.subscription = self.subscription, None
        self._overflow = False
        self._buffer.clear()
        self.resubscribes += 1
        if sub is not None and not self._conn.closed:
            with contextlib.suppress(SandboxdError, TimeoutError):
                async with asyncio.timeout(5.0):
                    await self._conn.call("events.unsubscribe", subscription=sub)

    async def _subscribe(self) -> None:
        delay = 0.05
        while not self._closed:
            if self._conn.closed:
                await self._reconnect()
            if not self._unhook:
                self._hook(self._conn)
            try:
                reply = await self._conn.call(
                    "events.subscribe", **self._args, since=self.last_seq
                )
            except _RETRYABLE as exc:
                if not self._ever_subscribed:
                    raise
                log.warning("sandboxd event stream: cannot subscribe (%s); retrying in %.2gs",
                            exc, delay)
                await asyncio.sleep(delay * (0.75 + random.random() / 2))
                delay = min(delay * 2, self.max_backoff)
                continue
            m = _as_map(reply, "the events.subscribe reply")
            self._ever_subscribed = True
            last = _int(m.get("last_seq"))
            if self.last_seq is not None and last < self.last_seq:
                # The daemon's log is younger than our position (its state was reset):
                # seqs start over, so take what comes from here.
                log.warning("sandboxd event stream: the daemon's last seq %d is behind our "
                            "%d; its event log was reset", last, self.last_seq)
                self.last_seq = last
            elif self.last_seq is None:
                self.last_seq = last  # a later resubscribe resumes right here
            self.subscription = _str(m.get("subscription"))
            return

    async def _reconnect(self) -> None:
        from .aio import SandboxClient

        self._unhook_all()
        if self._own is not None:
            await self._own.close()
            self._own = None
        conn = SandboxClient(
            self._client.path,
            connect_timeout=self._client.connect_timeout,
            max_frame=self._client.max_frame,
        )
        self._own = self._conn = conn
        self.reconnects += 1
        self._buffer.clear()  # a dead connection's leftovers: resubscribing replays them
