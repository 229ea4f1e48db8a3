"""The event bus: sequence numbers, retention, filters, visibility and fan-out (SPEC §3 events).

Owns the one ordered stream of daemon events: ``publish`` gives each event
the next ``seq``, keeps the last ``retain`` of them in memory for replay and
hands them to ``eventlog`` (batched once per event-loop turn, written on the
bus's own writer thread, so the event loop never waits on the disk). It owns
subscriptions: their filters, the one visibility rule (``visible``), the
replay of ``since`` with no gap and no duplicate against live events, the
bounded per-subscription queue, the per-subscription sender task that
writes ``event`` notifications and honours the connection's back-pressure,
and the ``events.lagged`` cut-off of a subscriber that cannot keep up: one
whose queue holds ``queue_size`` events while its connection is not
draining (the client is not reading). A burst of events the daemon makes in
one loop turn never cuts off a reader that keeps up; its queue may then
briefly hold up to ``max(queue_size, retain)`` events (references to the
retained ones, not copies).

An event reaches a subscriber only once it is committed to the log, so a
seq a client has seen is never handed out again after a crash.

It must not know what an event means (the publishers decide that), parse
wire arguments (``eventmethods`` does), or ever make ``publish`` wait.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import secrets
import time
from collections import deque
from collections.abc import Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import msgpack
import structlog

from .dispatcher import CallContext
from .errors import NotFound, QuotaExceeded, ShuttingDown
from .eventlog import EventLog, StoredEvent
from .models import Caller
from .units import format_time

log = structlog.get_logger("sandboxd.events")

DEFAULT_RETAIN = 10_000
DEFAULT_QUEUE_SIZE = 1024
MAX_SUBSCRIPTIONS_PER_CONNECTION = 256
SEND_BATCH = 128  # events written per turn before the sender checks back-pressure


def visible(caller: Caller, owner_uid: int | None) -> bool:
    """Whether ``caller`` may see an event of ``owner_uid``: the one ownership rule for events.

    Admins see everything; anyone sees events that belong to no user
    (``daemon.*``, ``image.*``); everyone else sees only their own.
    """
    return caller.admin or owner_uid is None or owner_uid == caller.uid


@dataclass(frozen=True, slots=True)
class EventFilter:
    """What a subscription asked for; every given part must match."""

    exact: frozenset[str] = frozenset()
    prefixes: tuple[str, ...] = ()
    any_type: bool = True
    sandbox: str | None = None
    labels: tuple[tuple[str, str], ...] = ()

    @classmethod
    def build(
        cls,
        types: Iterable[str] | None = None,
        sandbox: str | None = None,
        labels: Mapping[str, str] | None = None,
    ) -> EventFilter:
        """``types`` entries match exactly, or by prefix when they end in ``.*``; ``*`` is all."""
        exact: set[str] = set()
        prefixes: list[str] = []
        any_type = types is None
        for pattern in types or ():
            if pattern == "*":
                any_type = True
            elif pattern.endswith(".*"):
                prefixes.append(pattern[:-1])  # keep the dot: "sandbox.*" -> "sandbox."
            else:
                exact.add(pattern)
        if types is not None and not exact and not prefixes:
            any_type = True  # an empty list filters nothing out
        return cls(
            exact=frozenset(exact),
            prefixes=tuple(prefixes),
            any_type=any_type,
            sandbox=sandbox,
            labels=tuple(sorted((labels or {}).items())),
        )

    def matches(self, event: StoredEvent) -> bool:
        if not self.any_type and event.type not in self.exact:
            if not event.type.startswith(self.prefixes):
                return False
        if self.sandbox is not None and self.sandbox not in (event.sandbox_id, event.sandbox_name):
            return False
        for key, value in self.labels:
            if event.labels.get(key) != value:
                return False
        return True


def _wire(event: StoredEvent) -> dict[str, Any]:
    return {
        "seq": event.seq,
        "time": format_time(event.time),
        "type": event.type,
        "sandbox_id": event.sandbox_id,
        "sandbox_name": event.sandbox_name,
        "owner_uid": event.owner_uid,
        "data": event.data,
    }


def _seal(event: StoredEvent) -> StoredEvent:
    """Fill in the wire form once; a value msgpack cannot carry raises ``TypeError`` here."""
    event.wire = _wire(event)
    event.packed = msgpack.packb(event.wire, use_bin_type=True)
    return event


class Subscription:
    """One ``events.subscribe`` on one connection: its filter, queue and sender task."""

    def __init__(
        self,
        bus: EventBus,
        sid: str,
        ctx: CallContext,
        event_filter: EventFilter,
        replay: deque[StoredEvent],
    ) -> None:
        self.bus = bus
        self.id = sid
        self.ctx = ctx
        self.caller = ctx.caller
        self.filter = event_filter
        self.replay = replay  # retained events owed from ``since``, sent before ``queue``
        self.queue: deque[StoredEvent] = deque()  # live events not yet written
        self.sent = 0
        self.blocked = False  # waiting for the client to read what was written
        self._waiter: asyncio.Future[None] | None = None
        self.task: asyncio.Task[None] | None = None

    def wants(self, event: StoredEvent) -> bool:
        return visible(self.caller, event.owner_uid) and self.filter.matches(event)

    @property
    def next_seq(self) -> int | None:
        """The first seq this subscriber has not been sent, if one is owed."""
        if self.replay:
            return self.replay[0].seq
        if self.queue:
            return self.queue[0].seq
        return None

    def wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _take(self, durable: int) -> list[StoredEvent]:
        batch: list[StoredEvent] = []
        for source in (self.replay, self.queue):
            while source and len(batch) < SEND_BATCH and source[0].seq <= durable:
                batch.append(source.popleft())
            if source:
                break  # never skip ahead of an event still owed
        return batch

    async def run(self) -> None:
        """Write owed events as they become durable; wait for the client to read them."""
        loop = asyncio.get_running_loop()
        ctx = self.ctx
        try:
            while not ctx.closed:
                batch = self._take(self.bus.durable_seq)
                if not batch:
                    if self.replay or self.queue:
                        self.bus.mark_ready(self)  # owed events wait for their commit
                    self._waiter = loop.create_future()
                    try:
                        await self._waiter
                    finally:
                        self._waiter = None
                    continue
                for event in batch:
                    ctx.notify("event", [self.id, event.wire])
                self.sent += len(batch)
                self.blocked = True
                try:
                    await ctx.drain()
                finally:
                    self.blocked = False
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("event_sender_failed", subscription=self.id)
            self.bus.drop(self)


class EventBus:
    """The daemon's event stream. Create, ``await open()``, publish, ``await close()``."""

    def __init__(
        self,
        state_dir: str,
        retain: int = DEFAULT_RETAIN,
        queue_size: int = DEFAULT_QUEUE_SIZE,
    ) -> None:
        self.retain = max(0, retain)
        self.queue_size = max(1, queue_size)
        # A burst the daemon makes within one loop turn may outgrow queue_size for a
        # subscriber that keeps up (its sender has had no turn yet); only up to this.
        self._hard_cap = max(self.queue_size, self.retain)
        self._log = EventLog(state_dir, self.retain)
        self._retained: deque[StoredEvent] = deque(maxlen=self.retain)
        self._last_seq = 0
        self._durable_seq = 0
        self._pending: list[StoredEvent] = []
        self._flush_scheduled = False
        self._writing = False
        self._idle: asyncio.Event | None = None
        self._subs: dict[str, Subscription] = {}
        self._by_ctx: dict[CallContext, dict[str, Subscription]] = {}
        self._ready: dict[Subscription, None] = {}  # owed events not yet durable when checked
        self._loop: asyncio.AbstractEventLoop | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._state = "new"  # new -> open -> closed
        self._ids = itertools.count(1)
        self._id_salt = secrets.token_hex(3)

    # -- life --------------------------------------------------------------

    async def open(self) -> None:
        """Open the log and load the retained events and the last seq (raises ``EventLogError``)."""
        if self._state != "new":
            raise RuntimeError("EventBus.open() may be called once")
        self._loop = asyncio.get_running_loop()
        self._idle = asyncio.Event()
        self._idle.set()
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="sandboxd-eventlog")
        try:
            events, last_seq = await self._loop.run_in_executor(self._executor, self._log.open)
        except BaseException:
            self._executor.shutdown(wait=False)
            self._executor = None
            raise
        for event in events:
            self._retained.append(_seal(event))
        self._last_seq = self._durable_seq = last_seq
        self._state = "open"
        log.info("event_log_opened", path=self._log.path, last_seq=last_seq,
                 retained=len(self._retained))

    async def close(self) -> None:
        """Commit what is pending, end every subscription and close the log. Idempotent."""
        if self._state != "open":
            self._state = "closed"
            return
        await self._wait_written()
        self._state = "closed"
        tasks = [sub.task for sub in self._subs.values() if sub.task is not None]
        for sub in list(self._subs.values()):
            self._remove(sub)
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        assert self._loop is not None and self._executor is not None
        with contextlib.suppress(Exception):
            await self._loop.run_in_executor(self._executor, self._log.close)
        self._executor.shutdown(wait=True)

    @property
    def last_seq(self) -> int:
        """The seq of the newest event (0 before the first ever)."""
        return self._last_seq

    @property
    def durable_seq(self) -> int:
        """The newest seq committed to the log: nothing newer is delivered yet."""
        return self._durable_seq

    @property
    def subscription_count(self) -> int:
        return len(self._subs)

    # -- publishing ---------------------------------------------------------

    def publish(
        self,
        type: str,
        *,
        sandbox_id: str | None = None,
        sandbox_name: str | None = None,
        owner_uid: int | None = None,
        labels: dict[str, str] | None = None,
        data: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """Record one event and queue it for every matching subscriber; never waits.

        Returns the wire Event. ``labels`` serve the labels filter only. After
        ``close()`` the event is logged as dropped and returned with seq 0.
        """
        if self._state == "new":
            raise RuntimeError("EventBus.publish() before open()")
        event = _seal(StoredEvent(
            seq=self._last_seq + 1,
            time=time.time(),
            type=type,
            sandbox_id=sandbox_id,
            sandbox_name=sandbox_name,
            owner_uid=owner_uid,
            labels=dict(labels) if labels else {},
            data=dict(data) if data else {},
        ))
        if self._state == "closed":
            log.warning("event_after_close", type=type, sandbox_id=sandbox_id)
            return {**event.wire, "seq": 0}
        self._last_seq = event.seq
        self._retained.append(event)
        self._pending.append(event)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            assert self._loop is not None
            self._loop.call_soon(self._flush)
        queue_size, hard_cap = self.queue_size, self._hard_cap
        for sub in list(self._subs.values()):
            if sub.wants(event):
                backlog = len(sub.queue)
                if backlog >= queue_size and (sub.blocked or backlog >= hard_cap):
                    self._lagged(sub)
                else:
                    sub.queue.append(event)
                    self._ready[sub] = None
        return event.wire

    def _flush(self) -> None:
        self._flush_scheduled = False
        if self._writing or not self._pending or self._executor is None:
            return
        assert self._loop is not None and self._idle is not None
        batch, self._pending = self._pending, []
        self._writing = True
        self._idle.clear()
        future = self._loop.run_in_executor(self._executor, self._log.append, batch)
        future.add_done_callback(functools.partial(self._written, batch))

    def _written(self, batch: list[StoredEvent], future: asyncio.Future[None]) -> None:
        self._writing = False
        if not future.cancelled() and (exc := future.exception()) is not None:
            # Delivery goes on: a full disk must not stop the stream, only its replay later.
            log.error("event_log_write_failed", events=len(batch), first_seq=batch[0].seq,
                      error=str(exc))
        self._durable_seq = max(self._durable_seq, batch[-1].seq)
        ready, self._ready = self._ready, {}
        for sub in ready:
            sub.wake()
        if self._pending:
            self._flush()  # what came in meanwhile: the next group commit
        elif self._idle is not None:
            self._idle.set()

    async def _wait_written(self) -> None:
        while self._pending or self._writing:
            if not self._writing:
                self._flush()
            assert self._idle is not None
            await self._idle.wait()

    # -- subscriptions -------------------------------------------------------

    def subscribe(
        self,
        ctx: CallContext,
        *,
        types: Iterable[str] | None = None,
        sandbox: str | None = None,
        labels: Mapping[str, str] | None = None,
        since: int | None = None,
    ) -> Subscription:
        """Start delivering to ``ctx``: retained events after ``since`` first, then live ones.

        Synchronous: the replay snapshot and the registration for live events
        happen with nothing in between, so there is no gap and no duplicate.
        """
        if self._state != "open":
            raise ShuttingDown("The daemon is stopping and takes no new subscriptions.")
        mine = self._by_ctx.get(ctx)
        if mine is not None and len(mine) >= MAX_SUBSCRIPTIONS_PER_CONNECTION:
            raise QuotaExceeded(
                f"This connection already has {len(mine)} subscriptions, the most allowed; "
                "unsubscribe some or use one with a wider filter.",
                {"limit": MAX_SUBSCRIPTIONS_PER_CONNECTION},
            )
        sid = f"sub-{self._id_salt}-{next(self._ids)}"
        sub = Subscription(self, sid, ctx, EventFilter.build(types, sandbox, labels), deque())
        if since is not None and since < self._last_seq and self._retained:
            skip = max(0, since + 1 - self._retained[0].seq)
            sub.replay.extend(
                e for e in itertools.islice(self._retained, skip, None) if sub.wants(e)
            )
        if ctx.closed:
            return sub  # the connection is already gone: nothing to deliver, nothing to keep
        if mine is None:
            mine = self._by_ctx[ctx] = {}
            ctx.on_close.append(functools.partial(self._connection_closed, ctx))
        mine[sid] = sub
        self._subs[sid] = sub
        assert self._loop is not None
        sub.task = self._loop.create_task(sub.run(), name=f"events-{sid}")
        if sub.replay:
            self._ready[sub] = None
        return sub

    def unsubscribe(self, ctx: CallContext, subscription: str) -> None:
        """End a subscription of this connection; ``NotFound`` for any other."""
        sub = self._by_ctx.get(ctx, {}).get(subscription)
        if sub is None:
            raise NotFound(
                f"No subscription {subscription!r} on this connection.",
                {"subscription": subscription},
            )
        self._remove(sub)

    def drop(self, sub: Subscription) -> None:
        """Forget a subscription whose sender failed."""
        self._remove(sub, cancel=False)

    def mark_ready(self, sub: Subscription) -> None:
        if sub.id in self._subs:
            self._ready[sub] = None

    def _lagged(self, sub: Subscription) -> None:
        next_seq = sub.next_seq
        assert next_seq is not None  # the queue is full
        sub.ctx.log.warning("events_lagged", subscription=sub.id, next_seq=next_seq,
                            sent=sub.sent)
        self._remove(sub)
        sub.ctx.notify("events.lagged", [sub.id, {"next_seq": next_seq}])

    def _connection_closed(self, ctx: CallContext) -> None:
        for sub in list(self._by_ctx.get(ctx, {}).values()):
            self._remove(sub)
        self._by_ctx.pop(ctx, None)

    def _remove(self, sub: Subscription, cancel: bool = True) -> None:
        self._subs.pop(sub.id, None)
        self._ready.pop(sub, None)
        mine = self._by_ctx.get(sub.ctx)
        if mine is not None:
            mine.pop(sub.id, None)
        sub.replay.clear()
        sub.queue.clear()
        if cancel and sub.task is not None and not sub.task.done():
            sub.task.cancel()
