"""Event delivery to connections: one sender per subscription, honouring back-pressure.

Owns writing a subscription's events to its connection as ``event``
notifications (SPEC §3 events): pre-encoded frames in batches (each event was
encoded once, at publish, for every subscriber), written directly when the
sender is idle and its client keeps up, otherwise by the sender's own task,
which waits for the client to read what was written before it writes more.
It sends ``events.lagged`` when the bus cuts a subscription off, and when a
sender fails it asks the bus to end the subscription, so the client is told
(and can resubscribe) instead of being dropped in silence. It must not
decide which events a subscriber gets (the bus does).
"""

from __future__ import annotations

import asyncio
import functools
from typing import Any, Protocol, runtime_checkable

from sandboxd.rpc.dispatcher import CallContext
from sandboxd.services.eventbus import EventBus, StoredEvent, Subscription
from sandboxd.wire.codec import encode

# The msgpack of a notification ``[2, "event", [sid, Event]]`` up to ``sid``: fixarray(3),
# 2, fixstr "event", fixarray(2). The test suite checks it against the codec's encoder.
_EVENT_FRAME = b"\x93\x02\xa5event\x92"


@runtime_checkable
class FrameSink(Protocol):
    """What a connection may offer beyond ``CallContext`` for cheap fan-out (optional).

    With it, a batch goes out in one write of pre-encoded frames, and an idle
    subscriber whose connection is not back-pressured is written to directly,
    without waking its task.
    """

    @property
    def writable(self) -> bool:
        """False while ``drain()`` would wait (the client is behind) or the connection is gone."""
        ...

    def send_frame(self, frame: bytes) -> None:
        """Queue bytes that are already msgpack-RPC messages (never waits)."""
        ...


class EventSender:
    """Writes one subscription's events to its connection (a ``services.eventbus.Sender``)."""

    def __init__(self, sub: Subscription, ctx: CallContext) -> None:
        self.sub = sub
        self.ctx = ctx
        self.sink: FrameSink | None = ctx if isinstance(ctx, FrameSink) else None
        self._prefix = _EVENT_FRAME + encode(sub.id)
        self.blocked = False  # waiting for the client to read what was written
        self._must_drain = False  # written to directly; the task must wait for the client
        self._waiter: asyncio.Future[None] | None = None
        self._stopped = False
        self.task: asyncio.Task[None] | None = None
        if not ctx.closed:
            ctx.hold()  # an idle subscriber's connection is not idle
            self.task = asyncio.get_running_loop().create_task(
                self.run(), name=f"events-{sub.id}"
            )

    @property
    def closed(self) -> bool:
        return self.ctx.closed

    def wake(self) -> None:
        """Owed events became durable: write them now if that cannot wait, else wake the task."""
        sink = self.sink
        waiter = self._waiter
        if sink is None or waiter is None or waiter.done() or not sink.writable:
            self._wake_task()
            return
        # The task is parked and the client keeps up: no reason to switch to it.
        while batch := self.sub.take():
            self._send(batch)
            if not sink.writable:
                self._must_drain = True  # let the task wait for the client
                self._wake_task()
                return

    def cut_off(self, next_seq: int, reason: str | None) -> None:
        info: dict[str, Any] = {"next_seq": next_seq}
        if reason is not None:
            info["error"] = reason
        if reason is None:
            self.ctx.log.warning("events_lagged", subscription=self.sub.id, next_seq=next_seq)
        self.ctx.notify("events.lagged", [self.sub.id, info])

    def stop(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        if self.task is not None:
            self.ctx.release()
            if not self.task.done():
                self.task.cancel()

    def _wake_task(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _send(self, batch: list[StoredEvent]) -> None:
        if self.sink is not None:
            prefix = self._prefix
            self.sink.send_frame(b"".join([prefix + event.packed for event in batch]))
        else:
            for event in batch:
                self.ctx.notify("event", [self.sub.id, event.wire])

    async def _drain(self) -> None:
        self.blocked = True
        try:
            await self.ctx.drain()
        finally:
            self.blocked = False

    async def run(self) -> None:
        """Write owed events as they become durable; wait for the client to read them."""
        loop = asyncio.get_running_loop()
        try:
            while not self.ctx.closed and not self._stopped:
                if self._must_drain:
                    self._must_drain = False
                    await self._drain()
                batch = self.sub.take()
                if batch:
                    self._send(batch)
                    await self._drain()
                    continue
                self._waiter = loop.create_future()
                try:
                    await self._waiter
                finally:
                    self._waiter = None
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self.ctx.log.exception("event_sender_failed", subscription=self.sub.id)
            self.sub.bus.fail(self.sub, f"the daemon failed to send events ({type(exc).__name__})")


def subscribe(bus: EventBus, ctx: CallContext, **filters: Any) -> Subscription:
    """Subscribe ``ctx``'s connection: the bus registers, an ``EventSender`` writes."""
    known = bus.knows_owner(ctx)
    sub = bus.subscribe(ctx, ctx.caller, lambda s: EventSender(s, ctx), **filters)
    if not known and bus.knows_owner(ctx):
        ctx.on_close.append(functools.partial(bus.end_owner, ctx))
    return sub
