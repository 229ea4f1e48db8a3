"""Notification channels: bounded queues of notifications that one consumer pulls from.

This module owns the channel itself: its bounded buffer of ``(method,
params)`` items, what happens when it is full (``"block"``: refuse the item,
so the connection parks it and stops reading the socket until the consumer
makes room — back-pressure; ``"overflow"``: drop it and every later one, and
tell the consumer once it has read what was buffered), closing by the
consumer, and failing when the connection is lost (buffered items are still
read first). ``AsyncChannel`` waits with asyncio; ``BlockingChannel`` waits
through its connection, whose caller thread reads the socket meanwhile.
Channels are opened by a connection's ``open_channel``; this module must not
do any I/O itself, nor route messages (``protocol.Router`` does).
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any, Literal, Protocol, TypeVar

from sandboxd.wire.errors import ConnectionLost

from .exceptions import ChannelClosed, ChannelOverflow, copy_lost

__all__ = [
    "DEFAULT_CHANNEL_SIZE",
    "AsyncChannel",
    "BlockingChannel",
    "ChannelBuffer",
    "Item",
    "WhenFull",
]

Item = tuple[str, list[Any]]
"""One notification: its method and its params array."""

WhenFull = Literal["block", "overflow"]

DEFAULT_CHANNEL_SIZE = 1024

T = TypeVar("T")


class ChannelBuffer:
    """The state of one channel, shared by both kinds; no waiting here.

    Producer side (the connection's router): ``offer``, ``fail``, ``attach``.
    Consumer side: ``get_nowait``, ``close``, ``len()``.
    """

    def __init__(self, maxsize: int = DEFAULT_CHANNEL_SIZE, when_full: WhenFull = "block") -> None:
        if maxsize < 1:
            raise ValueError("a channel holds at least one item")
        if when_full not in ("block", "overflow"):
            raise ValueError(f"when_full must be 'block' or 'overflow', not {when_full!r}")
        self.maxsize = maxsize
        self.when_full: WhenFull = when_full
        self.closed = False
        self.overflowed = False
        self._items: deque[Item] = deque()
        self._error: ConnectionLost | None = None
        self._detach: Callable[[], None] | None = None
        self._space_freed: Callable[[], None] | None = None

    def __len__(self) -> int:
        return len(self._items)

    # -- producer side ----------------------------------------------------------

    def attach(self, detach: Callable[[], None], space_freed: Callable[[], None]) -> None:
        """Called by the router that routes to this channel: how to leave it, whom to wake."""
        self._detach, self._space_freed = detach, space_freed

    def offer(self, item: Item) -> bool:
        """Take ``item``; False when full and applying back-pressure (offer it again later)."""
        if self.closed or self._error is not None or self.overflowed:
            return True  # nobody will read it: dropped
        if len(self._items) >= self.maxsize:
            if self.when_full == "block":
                return False
            self.overflowed = True
        else:
            self._items.append(item)
        self._wake_consumer()
        return True

    def fail(self, error: ConnectionLost) -> None:
        """The connection is lost: after the buffered items, ``get`` raises ``error``."""
        if not self.closed and self._error is None:
            self._error = error
            self._wake_consumer()

    # -- consumer side ----------------------------------------------------------

    def ready(self) -> bool:
        """True when ``get_nowait`` would return an item or raise."""
        return bool(self._items) or self.closed or self._error is not None or self.overflowed

    def get_nowait(self) -> Item | None:
        """The next item, or None when none is buffered yet.

        Raises ``ChannelClosed`` after ``close()``, and, once the buffered
        items are read, ``ConnectionLost`` when the connection was lost or
        ``ChannelOverflow`` when items were dropped.
        """
        if self.closed:
            raise ChannelClosed("This notification channel was closed.")
        if self._items:
            item = self._items.popleft()
            if self.when_full == "block" and self._space_freed is not None:
                self._space_freed()
            return item
        if self._error is not None:
            raise copy_lost(self._error)
        if self.overflowed:
            raise ChannelOverflow(
                f"More than {self.maxsize} notifications were waiting to be read; "
                "the later ones were dropped.", {"maxsize": self.maxsize})
        return None

    def close(self) -> None:
        """Stop receiving: drop what is buffered and wake the consumer. Idempotent."""
        if self.closed:
            return
        self.closed = True
        self._items.clear()
        detach, self._detach = self._detach, None
        if detach is not None:
            detach()
        self._wake_consumer()
        if self._space_freed is not None:
            self._space_freed()  # a reader parked on this channel may go on

    def _wake_consumer(self) -> None:
        """Hook: something changed that a waiting consumer must see."""


class AsyncChannel(ChannelBuffer):
    """A channel of an ``AsyncConnection``: ``item = await channel.get()``."""

    def __init__(self, maxsize: int = DEFAULT_CHANNEL_SIZE, when_full: WhenFull = "block") -> None:
        super().__init__(maxsize, when_full)
        self._waiter: asyncio.Future[None] | None = None

    async def get(self, timeout: float | None = None) -> Item:  # noqa: ASYNC109
        """The next item, waiting for it (``TimeoutError`` after ``timeout`` seconds)."""
        async with asyncio.timeout(timeout):
            while (item := self.get_nowait()) is None:
                waiter = asyncio.get_running_loop().create_future()
                self._waiter = waiter
                try:
                    await waiter
                finally:
                    if self._waiter is waiter:
                        self._waiter = None
        return item

    def _wake_consumer(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)


class Wait(Protocol):
    """A blocking connection's wait: until ``ready()``, then ``then()`` under its lock."""

    def __call__(
        self, ready: Callable[[], bool], then: Callable[[], T], timeout: float | None
    ) -> T: ...


class BlockingChannel(ChannelBuffer):
    """A channel of a ``BlockingConnection``: ``item = channel.get()``.

    While waiting, the calling thread may be the one that reads the socket for
    every waiter of the connection. Safe to use from any thread.
    """

    def __init__(
        self,
        maxsize: int,
        when_full: WhenFull,
        *,
        lock: AbstractContextManager[Any],
        wait: Wait,
        notify: Callable[[], None],
    ) -> None:
        super().__init__(maxsize, when_full)
        self._lock = lock
        self._wait = wait
        self._notify = notify

    def get(self, timeout: float | None = None) -> Item:
        """The next item, waiting for it (``TimeoutError`` after ``timeout`` seconds)."""
        return self._wait(self.ready, self._take, timeout)

    def _take(self) -> Item:
        item = ChannelBuffer.get_nowait(self)
        assert item is not None  # only called when ready()
        return item

    def get_nowait(self) -> Item | None:
        with self._lock:
            return super().get_nowait()

    def close(self) -> None:
        with self._lock:
            super().close()

    def _wake_consumer(self) -> None:
        self._notify()
