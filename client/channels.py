"""Notification channels: bounded queues of notifications that one consumer pulls from.

This module owns the channel itself: its bounded buffer of ``(method,
params)`` items, what happens when it is full (``"block"``: refuse the item,
so the connection parks it and stops reading the socket until the consumer
makes room — back-pressure; ``"overflow"``: drop it and every later one, and
tell the consumer once it has read what was buffered), closing by the
consumer, and failing when the connection is lost (buffered items are still
read first). ``AsyncChannel`` waits with asyncio; ``BlockingChannel`` waits
through its connection, whose caller thread reads the socket meanwhile.

A channel may sort its items into *lanes* (``Lanes``): each lane is bounded
on its own, by the items' weight (bytes, say) rather than their number, so a
full lane refuses only its own items while the others keep filling; a
consumer takes the next item of one lane or the earliest of all; and a
*final* item (one after which nothing more comes, like an exit) is admitted
whatever the bounds, stays readable by every lane once their earlier items
are read, and detaches the channel from its connection. Without lanes a
channel is one FIFO bounded by its number of items.

Channels are opened by a connection's ``open_channel``; this module must not
do any I/O itself, nor route messages (``protocol.Router`` does).
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any, Literal, Protocol, TypeVar

from sandboxd.wire.errors import ConnectionLost

from .exceptions import ChannelClosed, ChannelOverflow, copy_lost

__all__ = [
    "DEFAULT_CHANNEL_SIZE",
    "FINAL",
    "AsyncChannel",
    "BlockingChannel",
    "ChannelBuffer",
    "Item",
    "Lanes",
    "WhenFull",
]

Item = tuple[str, list[Any]]
"""One notification: its method and its params array."""

WhenFull = Literal["block", "overflow"]

DEFAULT_CHANNEL_SIZE = 1024

FINAL = "\x00final"
"""The lane to ask for when only the final item is wanted (``get(lane=FINAL)``)."""

T = TypeVar("T")


def _one(item: Item) -> int:
    return 1


def _never(item: Item) -> bool:
    return False


def _no_lane(item: Item) -> str:
    return ""


@dataclass(frozen=True)
class Lanes:
    """How a channel sorts items: into which lane, how much each weighs, which one is final.

    ``maxsize`` then bounds each lane's total weight; an item is admitted
    while its lane is under the bound (so one item always fits, however
    heavy). The final item weighs nothing and is always admitted.
    """

    lane_of: Callable[[Item], str] = _no_lane
    weigh: Callable[[Item], int] = _one
    is_final: Callable[[Item], bool] = _never


_ONE_LANE = Lanes()


class ChannelBuffer:
    """The state of one channel, shared by both kinds; no waiting here.

    Producer side (the connection's router): ``offer``, ``fail``, ``attach``.
    Consumer side: ``get_nowait``, ``ready``, ``close``, ``set_maxsize``, ``len()``.
    ``maxsize`` None means unbounded.
    """

    def __init__(
        self,
        maxsize: int | None = DEFAULT_CHANNEL_SIZE,
        when_full: WhenFull = "block",
        lanes: Lanes | None = None,
    ) -> None:
        if maxsize is not None and maxsize < 1:
            raise ValueError("a channel holds at least one item")
        if when_full not in ("block", "overflow"):
            raise ValueError(f"when_full must be 'block' or 'overflow', not {when_full!r}")
        self.maxsize = maxsize
        self.when_full: WhenFull = when_full
        self.lanes = lanes or _ONE_LANE
        self.closed = False
        self.overflowed = False
        self.final: Item | None = None
        self._queues: dict[str, deque[tuple[int, Item]]] = {}
        self._weights: dict[str, int] = {}
        self._count = 0
        self._seq = 0
        self._error: ConnectionLost | None = None
        self._detach: Callable[[], None] | None = None
        self._space_freed: Callable[[], None] | None = None

    def __len__(self) -> int:
        return self._count

    def weight(self, lane: str = "") -> int:
        """The total weight buffered in ``lane`` (its number of items without ``Lanes``)."""
        return self._weights.get(lane, 0)

    # -- producer side ----------------------------------------------------------

    def attach(self, detach: Callable[[], None], space_freed: Callable[[], None]) -> None:
        """Called by the router that routes to this channel: how to leave it, whom to wake."""
        self._detach, self._space_freed = detach, space_freed

    def offer(self, item: Item) -> bool:
        """Take ``item``; False when its lane is full and applying back-pressure (offer it
        again later)."""
        if self.closed or self._error is not None or self.overflowed or self.final is not None:
            return True  # nobody will read it: dropped
        if self.lanes.is_final(item):
            self.final = item
            self._leave_router()  # nothing follows the final item
            self._wake_consumer()
            return True
        lane = self.lanes.lane_of(item)
        if self.maxsize is not None and self._weights.get(lane, 0) >= self.maxsize:
            if self.when_full == "block":
                return False
            self.overflowed = True
        else:
            self._seq += 1
            self._queues.setdefault(lane, deque()).append((self._seq, item))
            self._weights[lane] = self._weights.get(lane, 0) + self.lanes.weigh(item)
            self._count += 1
        self._wake_consumer()
        return True

    def fail(self, error: ConnectionLost) -> None:
        """The connection is lost: after the buffered items, ``get`` raises ``error``."""
        if not self.closed and self._error is None:
            self._error = error
            self._wake_consumer()

    # -- consumer side ----------------------------------------------------------

    def _head(self, lane: str | None) -> str | None:
        """The lane whose first item is next for a consumer of ``lane`` (None: any lane)."""
        if lane is None:
            heads = [(q[0][0], name) for name, q in self._queues.items() if q]
            return min(heads)[1] if heads else None
        if lane != FINAL and self._queues.get(lane):
            return lane
        return None

    def ready(self, lane: str | None = None) -> bool:
        """True when ``get_nowait(lane)`` would return an item or raise."""
        return (self._head(lane) is not None or self.final is not None or self.closed
                or self._error is not None or self.overflowed)

    def get_nowait(self, lane: str | None = None) -> Item | None:
        """The next item (of ``lane``, or the earliest of any), or None when none is buffered.

        Once the final item came, it is returned (again and again) when
        ``lane`` has nothing before it; ``lane=FINAL`` asks for it alone.
        Raises ``ChannelClosed`` after ``close()``, and, once the buffered
        items are read, ``ConnectionLost`` when the connection was lost or
        ``ChannelOverflow`` when items were dropped.
        """
        if self.closed:
            raise ChannelClosed("This notification channel was closed.")
        head = self._head(lane)
        if head is not None:
            _, item = self._queues[head].popleft()
            self._weights[head] -= self.lanes.weigh(item)
            self._count -= 1
            if self.when_full == "block" and self._space_freed is not None:
                self._space_freed()
            return item
        if self.final is not None:
            return self.final
        if self._error is not None:
            raise copy_lost(self._error)
        if self.overflowed:
            raise ChannelOverflow(
                f"More than {self.maxsize} notifications were waiting to be read; "
                "the later ones were dropped.", {"maxsize": self.maxsize})
        return None

    def set_maxsize(self, maxsize: int | None) -> None:
        """Change the bound (None: unbounded); a parked item may then fit."""
        if maxsize is not None and maxsize < 1:
            raise ValueError("a channel holds at least one item")
        self.maxsize = maxsize
        if self._space_freed is not None:
            self._space_freed()

    def close(self) -> None:
        """Stop receiving: drop what is buffered and wake the consumer. Idempotent."""
        if self.closed:
            return
        self.closed = True
        self._queues.clear()
        self._weights.clear()
        self._count = 0
        self._leave_router()
        self._wake_consumer()
        if self._space_freed is not None:
            self._space_freed()  # a reader parked on this channel may go on

    def _leave_router(self) -> None:
        detach, self._detach = self._detach, None
        if detach is not None:
            detach()

    def _wake_consumer(self) -> None:
        """Hook: something changed that a waiting consumer must see."""


class AsyncChannel(ChannelBuffer):
    """A channel of an ``AsyncConnection``: ``item = await channel.get()``.

    Several tasks may wait at once (each for its own lane, say).
    """

    def __init__(
        self,
        maxsize: int | None = DEFAULT_CHANNEL_SIZE,
        when_full: WhenFull = "block",
        lanes: Lanes | None = None,
    ) -> None:
        super().__init__(maxsize, when_full, lanes)
        self._waiters: list[asyncio.Future[None]] = []

    async def get(
        self, timeout: float | None = None, *, lane: str | None = None  # noqa: ASYNC109
    ) -> Item:
        """The next item (of ``lane``), waiting for it (``TimeoutError`` after ``timeout`` s)."""
        async with asyncio.timeout(timeout):
            while (item := self.get_nowait(lane)) is None:
                waiter = asyncio.get_running_loop().create_future()
                self._waiters.append(waiter)
                try:
                    await waiter
                finally:
                    if waiter in self._waiters:
                        self._waiters.remove(waiter)
        return item

    def _wake_consumer(self) -> None:
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            if not waiter.done():
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
        maxsize: int | None,
        when_full: WhenFull,
        *,
        lock: AbstractContextManager[Any],
        wait: Wait,
        notify: Callable[[], None],
        lanes: Lanes | None = None,
    ) -> None:
        super().__init__(maxsize, when_full, lanes)
        self._lock = lock
        self._wait = wait
        self._notify = notify

    def get(self, timeout: float | None = None, *, lane: str | None = None) -> Item:
        """The next item (of ``lane``), waiting for it (``TimeoutError`` after ``timeout`` s)."""
        return self._wait(lambda: self.ready(lane), lambda: self._take(lane), timeout)

    def _take(self, lane: str | None) -> Item:
        item = ChannelBuffer.get_nowait(self, lane)
        assert item is not None  # only called when ready()
        return item

    def get_nowait(self, lane: str | None = None) -> Item | None:
        with self._lock:
            return super().get_nowait(lane)

    def set_maxsize(self, maxsize: int | None) -> None:
        with self._lock:
            super().set_maxsize(maxsize)

    def close(self) -> None:
        with self._lock:
            super().close()

    def _wake_consumer(self) -> None:
        self._notify()
