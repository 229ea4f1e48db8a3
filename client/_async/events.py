"""Following the daemon's event stream: ``AsyncEventStream``, resumed across trouble.

This module owns the client side of ``events.subscribe`` (SPEC §3 events):
one subscription's ``event`` and ``events.lagged`` notifications, pulled in
order from a channel keyed by the subscription id, turned into ``Event``s,
and the stream kept whole for the consumer. When the daemon cuts the
subscription off (``events.lagged``), when the consumer falls so far behind
that the local buffer (the channel) overflows, or when the connection is
lost, the stream resubscribes with ``since`` = the last seq it yielded, on a
new connection if need be (retrying with backoff until it works or the
consumer stops), and drops anything at or before that seq: the consumer sees
no gap the daemon still retains and no duplicate.

The reconnecting is explicit and owned here, never hidden in the
connection: a stream opens its own connections to the same socket after the
first one is lost and closes them when it ends. It must not touch sockets or
asyncio (``connection`` and ``_compat`` do). Written once for both sides:
``scripts/unasync.py`` derives the blocking module from the asyncio one.
"""

from __future__ import annotations

import contextlib
import logging
import random
from collections.abc import AsyncIterator, Mapping, Sequence
from types import TracebackType
from typing import Any, Self

from sandboxd.wire.errors import ConnectionLost, EngineUnavailable, SandboxdError, ShuttingDown

from ..channels import AsyncChannel
from ..connection import AsyncConnection
from ..deadlines import deadline as _deadline
from ..deadlines import remaining as _remaining
from ..exceptions import ChannelClosed, ChannelOverflow
from ..models import Event, _as_map, _int, _str
from ..protocol import named_params
from ._compat import sleep

__all__ = ["DEFAULT_MAX_BUFFER", "AsyncEventStream"]

log = logging.getLogger("sandboxd_client.events")

DEFAULT_MAX_BUFFER = 10_000
_RETRYABLE = (ConnectionLost, ShuttingDown, EngineUnavailable)
_UNSUBSCRIBE_TIMEOUT = 2.0
_NOTIFICATIONS = ("event", "events.lagged")


class AsyncEventStream:
    """``async for event in client.events(...)``: the daemon's events, resumed across trouble.

    Made by ``client.events()``. The first subscription uses the client's own
    connection; an error before it succeeds (the daemon is not running, a bad
    argument) is raised. After that, a lost connection is replaced by a new
    one to the same socket, retried with backoff (up to ``max_backoff``
    seconds apart) for as long as the consumer keeps iterating. Leaving an
    ``async for`` early ends the stream (its subscription and any connection
    it opened); ``aclose()`` or ``async with`` do so at a moment of your
    choosing. ``next_event(timeout)`` waits for one event at most that long.

    ``last_seq`` is the seq of the last event yielded (or the starting
    point); ``reconnects`` and ``resubscribes`` count the repairs made.
    """

    def __init__(
        self,
        conn: AsyncConnection,
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
        self._origin = conn
        self._conn = conn
        self._own: AsyncConnection | None = None  # a connection this stream opened
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
        self._channel: AsyncChannel | None = None
        self._ever_subscribed = False
        self._closed = False

    # -- the iterator protocol ---------------------------------------------------

    def __aiter__(self) -> AsyncIterator[Event]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[Event]:
        # A generator, so that leaving the loop early closes the stream.
        try:
            while (event := await self.next_event()) is not None:
                yield event
        finally:
            await self.aclose()

    async def __anext__(self) -> Event:
        event = await self.next_event()
        if event is None:
            raise StopAsyncIteration
        return event

    async def next_event(self, timeout: float | None = None) -> Event | None:  # noqa: ASYNC109
        """The next event, or None once the stream is closed.

        ``timeout`` (seconds) raises ``TimeoutError`` when no event came by
        then; the stream stays usable.
        """
        deadline = _deadline(timeout)
        while not self._closed:
            channel = self._channel
            if channel is None:
                await self._subscribe(deadline)
                continue
            try:
                method, params = await channel.get(_remaining(deadline))
            except ConnectionLost:
                log.warning("sandboxd event stream: connection lost; reconnecting")
                self._drop()
                continue
            except ChannelOverflow:
                await self._restart("the local buffer of %d events filled", self.max_buffer)
                continue
            except ChannelClosed:
                continue  # closed by aclose()
            event = self._accept(method, params)
            if event is not None:
                return event
        return None

    async def start(self) -> Self:
        """Subscribe now rather than at the first event; returns the stream.

        Events that happen after ``start()`` returns are certain to be seen,
        which is what a caller that is about to cause them wants.
        """
        if self._channel is None and not self._closed:
            await self._subscribe(None)
        return self

    async def aclose(self) -> None:
        """End the subscription and close any connection this stream opened. Idempotent."""
        if self._closed:
            return
        self._closed = True
        sub = self.subscription
        self._drop()
        if sub is not None and not self._conn.closed:
            with contextlib.suppress(SandboxdError, TimeoutError):
                await self._conn.call("events.unsubscribe", named_params({"subscription": sub}),
                                      timeout=_UNSUBSCRIBE_TIMEOUT)
        if self._own is not None:
            await self._own.close()
            self._own = None

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    # -- internals ----------------------------------------------------------------

    def _accept(self, method: str, params: list[Any]) -> Event | None:
        """The event a notification carries, if it is new; handles a cut-off."""
        if len(params) < 2:
            return None
        payload = params[1]
        if method == "events.lagged":
            next_seq = payload.get("next_seq") if isinstance(payload, Mapping) else None
            log.warning("sandboxd event stream: cut off by the daemon at seq %s; "
                        "resubscribing", next_seq)
            if self.last_seq is None and isinstance(next_seq, int):
                self.last_seq = next_seq - 1
            self.resubscribes += 1
            self._drop()
            return None
        try:
            event = Event.from_wire(payload)
        except SandboxdError:
            log.warning("sandboxd event stream: ignoring a malformed event")
            return None
        if self.last_seq is not None and event.seq <= self.last_seq:
            return None  # already yielded
        self.last_seq = event.seq
        return event

    def _drop(self) -> None:
        """Forget the current subscription (its channel is closed)."""
        channel, self._channel = self._channel, None
        self.subscription = None
        if channel is not None:
            channel.close()

    async def _restart(self, why: str, *args: Any) -> None:
        """Drop the current subscription and resubscribe from ``last_seq``."""
        log.warning("sandboxd event stream: " + why + "; resubscribing", *args)
        sub = self.subscription
        self._drop()
        self.resubscribes += 1
        if sub is not None and not self._conn.closed:
            with contextlib.suppress(SandboxdError, TimeoutError):
                await self._conn.call("events.unsubscribe", named_params({"subscription": sub}),
                                      timeout=_UNSUBSCRIBE_TIMEOUT)

    def _open(self, reply: Any) -> tuple[int, str, AsyncChannel]:
        """Run as the subscribe reply is routed: the channel exists before any event comes."""
        m = _as_map(reply, "the events.subscribe reply")
        sub = _str(m.get("subscription"))
        channel = self._conn.open_channel(_NOTIFICATIONS, key=sub, maxsize=self.max_buffer,
                                          when_full="overflow")
        return _int(m.get("last_seq")), sub, channel

    async def _subscribe(self, deadline: float | None) -> None:
        delay = 0.05
        while not self._closed:
            try:
                if self._conn.closed:
                    await self._reconnect()
                params = named_params({**self._args, "since": self.last_seq})
                opened: tuple[int, str, AsyncChannel] = await self._conn.call(
                    "events.subscribe", params, timeout=_remaining(deadline),
                    on_result=self._open)
            except _RETRYABLE as exc:
                if not self._ever_subscribed:
                    raise
                pause = delay * (0.75 + random.random() / 2)
                log.warning("sandboxd event stream: cannot subscribe (%s); retrying in %.2gs",
                            exc, pause)
                left = _remaining(deadline)
                if left is not None and left < pause:
                    await sleep(left)
                    raise TimeoutError("No event came before the deadline.") from None
                await sleep(pause)
                delay = min(delay * 2, self.max_backoff)
                continue
            last, sub, channel = opened
            if self._closed:  # closed meanwhile
                channel.close()
                return
            self._ever_subscribed = True
            if self.last_seq is not None and last < self.last_seq:
                # The daemon's log is younger than our position (its state was reset):
                # seqs start over, so take what comes from here.
                log.warning("sandboxd event stream: the daemon's last seq %d is behind our "
                            "%d; its event log was reset", last, self.last_seq)
                self.last_seq = last
            elif self.last_seq is None:
                self.last_seq = last  # a later resubscribe resumes right here
            self.subscription, self._channel = sub, channel
            return

    async def _reconnect(self) -> None:
        self._drop()
        if self._own is not None:
            await self._own.close()
        self._own = self._conn = self._origin.fresh()
        self.reconnects += 1
