"""The client side of msgpack-RPC without I/O: pending calls, msgids, and message routing.

This module owns what both connections (``connection.AsyncConnection`` and
``connection.BlockingConnection``) do the same way once a message is decoded
by ``sandboxd.wire.codec``: allocating msgids, keeping the table of pending
calls keyed by msgid, resolving them from responses (in any order), routing
notifications to callbacks and to notification channels (per method, or per
method and key such as an exec id or a subscription id), parking a
notification whose channel is full (so the connection stops reading), and
the bookkeeping of a lost connection (every pending call and every channel
fails with ``ConnectionLost`` at once). It must not do any I/O, block, sleep,
or know about asyncio or threads: a connection drives it, under its own lock
where it has one.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from typing import Any, Generic, Protocol, TypeVar

from sandboxd.wire.codec import (
    MAX_MSGID,
    BadMessage,
    Notification,
    Request,
    Response,
    encode_response,
)
from sandboxd.wire.codec import Event as WireEvent
from sandboxd.wire.errors import ConnectionLost, from_wire

from .channels import ChannelBuffer, Item
from .exceptions import copy_lost

__all__ = [
    "NotificationHandler",
    "Router",
    "Slot",
    "named_params",
]

log = logging.getLogger("sandboxd_client")

NotificationHandler = Callable[[list[Any]], Awaitable[None] | None]
"""A notification callback: receives the notification's params array.

Callbacks run inline, in arrival order, while the connection reads (keep them
quick, and never call the connection from one). On the asyncio connection a
coroutine function's coroutine is scheduled as a task: its order relative to
other notifications is then not guaranteed.
"""

OnResult = Callable[[Any], Any]
"""Turns a call's result into what the caller gets, inline, as the response is routed.

It runs before any later message is routed, so it may open a channel for
notifications that follow the reply at once (``exec.start``'s exec id,
``events.subscribe``'s subscription). If it raises, the call raises that.
"""


class Slot(Protocol):
    """Where one call's outcome goes: an ``asyncio.Future`` or a blocking slot."""

    def done(self) -> bool: ...

    def set_result(self, result: Any, /) -> None: ...

    def set_exception(self, exception: BaseException, /) -> None: ...


S = TypeVar("S", bound=Slot)


def named_params(params: Mapping[str, Any]) -> list[Any]:
    """Named arguments as the wire's params array: ``[]`` or ``[{...}]``, None values omitted."""
    named = {k: v for k, v in params.items() if v is not None}
    return [named] if named else []


def _key(params: list[Any]) -> str | None:
    """The routing key of a notification: its first param when that is a string."""
    if not params:
        return None
    first = params[0]
    if isinstance(first, str):
        return first
    if isinstance(first, (bytes, bytearray)):
        return bytes(first).decode("utf-8", "replace")
    return None


class _Blocked:
    """A notification not yet handed to every channel it goes to (the first one is full)."""

    __slots__ = ("item", "targets")

    def __init__(self, item: Item, targets: list[ChannelBuffer]) -> None:
        self.item = item
        self.targets = targets


class Router(Generic[S]):
    """The state of one client connection, driven message by message by its owner.

    ``route(msg)`` handles one decoded message. When it hands a notification
    to a channel that is full (and applies back-pressure), it parks it in
    ``blocked``; the owner must then stop routing (and reading) until
    ``retry_blocked()`` returns True, which it should try each time
    ``wake_reader`` is called. ``abort(reason)`` marks the connection lost:
    the first reason wins, and every pending call and channel fails.
    """

    def __init__(
        self,
        where: str,
        *,
        spawn: Callable[[Awaitable[Any]], None] | None = None,
        wake_reader: Callable[[], None] | None = None,
    ) -> None:
        self.where = where
        self.lost: ConnectionLost | None = None
        self.pending: dict[int, tuple[S, OnResult | None]] = {}
        self.next_msgid = 0
        self.blocked: _Blocked | None = None
        self._spawn = spawn
        self._wake_reader = wake_reader
        self._handlers: dict[str, list[NotificationHandler]] = {}
        self._channels: dict[str, list[ChannelBuffer]] = {}
        self._keyed: dict[tuple[str, str], ChannelBuffer] = {}

    # -- calls ----------------------------------------------------------------

    def add_call(self, slot: S, on_result: OnResult | None = None) -> int:
        """Register a pending call; its msgid. Raises ``ConnectionLost`` once lost."""
        if self.lost is not None:
            raise copy_lost(self.lost)
        for _ in range(len(self.pending) + 1):
            msgid = self.next_msgid
            self.next_msgid = 0 if msgid >= MAX_MSGID else msgid + 1
            if msgid not in self.pending:
                self.pending[msgid] = (slot, on_result)
                return msgid
        raise RuntimeError("no free msgid")  # pragma: no cover - 2**32 calls in flight

    def forget(self, msgid: int, slot: S) -> None:
        """Drop a call its caller stopped waiting for (a late response is then ignored)."""
        entry = self.pending.get(msgid)
        if entry is not None and entry[0] is slot:
            del self.pending[msgid]

    # -- notifications ----------------------------------------------------------

    def add_handler(self, method: str, callback: NotificationHandler) -> Callable[[], None]:
        """Call ``callback(params)`` for each ``method`` notification; returns its remover."""
        self._handlers.setdefault(method, []).append(callback)

        def remove() -> None:
            callbacks = self._handlers.get(method, [])
            if callback in callbacks:
                callbacks.remove(callback)

        return remove

    def add_channel(
        self, channel: ChannelBuffer, methods: Sequence[str], key: str | None = None
    ) -> None:
        """Route ``methods`` notifications to ``channel``: all of them, or those keyed ``key``.

        A keyed channel gets the notifications whose first param is ``key``;
        at most one channel per (method, key). Closing the channel removes it.
        """
        if isinstance(methods, str):
            raise TypeError("methods must be a sequence of method names")
        if key is not None:
            taken = [m for m in methods if (m, key) in self._keyed]
            if taken:
                raise ValueError(f"a channel for {taken[0]!r} with key {key!r} is already open")
        if self.lost is not None:
            channel.fail(copy_lost(self.lost))
            return
        for method in methods:
            if key is None:
                self._channels.setdefault(method, []).append(channel)
            else:
                self._keyed[(method, key)] = channel
        channel.attach(lambda: self._remove_channel(channel, methods, key), self._space_freed)

    def _remove_channel(
        self, channel: ChannelBuffer, methods: Iterable[str], key: str | None
    ) -> None:
        for method in methods:
            if key is None:
                listed = self._channels.get(method, [])
                if channel in listed:
                    listed.remove(channel)
                if not listed:
                    self._channels.pop(method, None)
            elif self._keyed.get((method, key)) is channel:
                del self._keyed[(method, key)]

    def _space_freed(self) -> None:
        if self.blocked is not None and self._wake_reader is not None:
            self._wake_reader()

    # -- routing ----------------------------------------------------------------

    def route(self, msg: WireEvent) -> bytes | None:
        """Handle one decoded message; a frame to send back, if any.

        After a message that ends the connection (``protocol.error``, bytes
        that cannot be decoded) ``lost`` is set and every waiter has failed.
        """
        if isinstance(msg, Response):
            self._resolve(msg)
        elif isinstance(msg, Notification):
            self._notify(msg)
            if msg.method == "protocol.error":
                err = from_wire(msg.params[0] if msg.params else None)
                self.abort(ConnectionLost(
                    f"{self.where} closed the connection: {err.code}: {err.message}",
                    {"code": err.code, "message": err.message, "data": err.data},
                ))
        elif isinstance(msg, Request):
            # The SPEC has no daemon-to-client requests; answer so nothing waits.
            return encode_response(
                msg.msgid,
                ["method_not_found", f"This client serves no method {msg.method!r}.", None],
                None,
            )
        elif isinstance(msg, BadMessage):
            if msg.fatal:
                self.abort(ConnectionLost(
                    f"{self.where} sent bytes the client cannot read: {msg.error.message}",
                    {"code": msg.error.code},
                ))
            else:
                log.warning("ignoring malformed message from sandboxd: %s", msg.error.message)
        return None

    def _resolve(self, msg: Response) -> None:
        entry = self.pending.pop(msg.msgid, None)
        if entry is None or entry[0].done():
            log.debug("ignoring response to unknown msgid %d", msg.msgid)
            return
        slot, on_result = entry
        if msg.error is not None:
            slot.set_exception(from_wire(msg.error))
            return
        if on_result is None:
            slot.set_result(msg.result)
            return
        try:
            value = on_result(msg.result)
        except Exception as exc:
            slot.set_exception(exc)
        else:
            slot.set_result(value)

    def _notify(self, msg: Notification) -> None:
        for handler in list(self._handlers.get(msg.method, ())):
            try:
                outcome = handler(msg.params)
                if inspect.isawaitable(outcome):
                    if self._spawn is None:
                        log.error("notification handler for %r returned an awaitable, which a "
                                  "blocking connection cannot run", msg.method)
                        if inspect.iscoroutine(outcome):
                            outcome.close()
                    else:
                        self._spawn(outcome)
            except Exception:
                log.exception("notification handler for %r failed", msg.method)
        targets: list[ChannelBuffer] = []
        key = _key(msg.params)
        if key is not None and (keyed := self._keyed.get((msg.method, key))) is not None:
            targets.append(keyed)
        targets.extend(self._channels.get(msg.method, ()))
        if targets:
            self._deliver(_Blocked((msg.method, msg.params), targets))

    def _deliver(self, pending: _Blocked) -> bool:
        while pending.targets:
            if not pending.targets[0].offer(pending.item):
                self.blocked = pending
                return False
            pending.targets.pop(0)
        self.blocked = None
        return True

    def retry_blocked(self) -> bool:
        """Try again to deliver the parked notification; True once nothing is parked."""
        if self.blocked is None:
            return True
        return self._deliver(self.blocked)

    # -- loss -------------------------------------------------------------------

    def abort(self, reason: ConnectionLost) -> ConnectionLost:
        """Mark the connection lost (first reason wins); fail every call and channel."""
        if self.lost is None:
            self.lost = reason
        lost = self.lost
        pending, self.pending = self.pending, {}
        for slot, _ in pending.values():
            if not slot.done():
                slot.set_exception(copy_lost(lost))
        channels = {id(c): c for cs in self._channels.values() for c in cs}
        channels.update((id(c), c) for c in self._keyed.values())
        self._channels, self._keyed = {}, {}
        self.blocked = None
        for channel in channels.values():
            channel.fail(copy_lost(lost))
        return lost
