"""The event bus: sequence numbers, retention, filters, visibility and subscriptions.

Owns the one ordered stream of daemon events (SPEC §3 events). ``publish``
gives each event the next ``seq``, keeps the last ``retain`` of them in
memory for replay, and commits them to ``store.eventlog`` once per event-loop
turn (one small WAL write, no fsync; the fsyncing checkpoints run on the
bus's own thread, so the loop never waits on a disk flush). An event reaches
subscribers only once committed, so a seq a client has seen is never handed
out again after a crash (should the disk refuse the write, delivery goes on
and the write is retried with the next batch). Each event's wire form is
built once, and encoded once with the wire codec, at publish.

It owns subscriptions: their filters, the one visibility rule
(``visible``), the replay of ``since`` with no gap and no duplicate against
live events, and the bounded per-subscription queue with the cut-off of a
subscriber that cannot keep up: one whose queue holds ``queue_size`` events
while its sender waits for its client to read. A burst the daemon makes
within one loop turn never cuts off a reader that keeps up; its queue may
then briefly hold up to ``max(queue_size, retain)`` events (references to
the retained ones, not copies). Writing events to a connection is a
``Sender``'s job (``rpc.delivery``): the bus wakes it and hands it batches.

It must not know what an event means (the publishers decide that), parse
wire arguments, know about connections, or ever make ``publish`` wait.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import secrets
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Protocol

import structlog

from sandboxd.core.records import Caller
from sandboxd.store.eventlog import EventLog, EventLogError, StoredEvent
from sandboxd.wire.codec import encode
from sandboxd.wire.errors import NotFound, QuotaExceeded, ShuttingDown
from sandboxd.wire.units import format_time

__all__ = ["EventBus", "EventFilter", "Sender", "StoredEvent", "Subscription", "visible"]

log = structlog.get_logger("sandboxd.events")

DEFAULT_RETAIN = 10_000
DEFAULT_QUEUE_SIZE = 1024
MAX_SUBSCRIPTIONS_PER_CONNECTION = 256
CHECKPOINT_EVERY = 256  # commits between two WAL checkpoints (on the writer thread)
SEND_BATCH = 128  # events handed to a sender at once


def visible(caller: Caller, owner_uid: int | None) -> bool:
    """Whether ``caller`` may see an event of ``owner_uid``: the one ownership rule for events.

    Admins see everything; anyone sees events that belong to no user
    (``daemon.*``, ``image.*``); everyone else sees only their own.
    """
    return caller.sees(owner_uid)


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
    """Fill in the wire form once; a value the wire cannot carry raises ``TypeError`` here."""
    event.wire = _wire(event)
    event.packed = encode(event.wire)
    return event


class Sender(Protocol):
    """What writes a subscription's events to its client (``rpc.delivery``)."""

    @property
    def closed(self) -> bool:
        """The client is gone: nothing owed to it needs writing any more."""
        ...

    @property
    def blocked(self) -> bool:
        """Waiting for the client to read what was written (it is behind)."""
        ...

    def wake(self) -> None:
        """Owed events became durable: take them with ``Subscription.take``."""
        ...

    def cut_off(self, next_seq: int, reason: str | None) -> None:
        """The bus ended the subscription (lag, or a failure): tell the client."""
        ...

    def stop(self) -> None:
        """The subscription is over: write nothing more, end any task (never waits)."""
        ...


class Subscription:
    """One ``events.subscribe``: its filter, replay and queue; a ``Sender`` writes them."""

    def __init__(
        self,
        bus: EventBus,
        sid: str,
        owner: object,
        caller: Caller,
        event_filter: EventFilter,
    ) -> None:
        self.bus = bus
        self.id = sid
        self.owner = owner  # what the subscription belongs to (its connection)
        self.caller = caller
        self.filter = event_filter
        self.replay: deque[StoredEvent] = deque()  # retained events owed from ``since``
        self.queue: deque[StoredEvent] = deque()  # live events not yet handed to the sender
        self.sent = 0
        self.sender: Sender | None = None

    def wants(self, event: StoredEvent) -> bool:
        return visible(self.caller, event.owner_uid) and self.filter.matches(event)

    @property
    def next_seq(self) -> int | None:
        """The first seq this subscriber has not been handed, if one is owed."""
        if self.replay:
            return self.replay[0].seq
        if self.queue:
            return self.queue[0].seq
        return None

    @property
    def owed(self) -> bool:
        return bool(self.replay or self.queue)

    def take(self) -> list[StoredEvent]:
        """The next batch of owed events that are durable, in order (may be empty).

        When events are owed but not durable yet, the bus wakes the sender again
        once they are.
        """
        durable = self.bus.durable_seq
        batch: list[StoredEvent] = []
        for source in (self.replay, self.queue):
            while source and len(batch) < SEND_BATCH and source[0].seq <= durable:
                batch.append(source.popleft())
            if source:
                break  # never skip ahead of an event still owed
        self.sent += len(batch)
        if not batch and self.owed:
            self.bus.mark_ready(self)
        return batch


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
        self._commits = 0  # since the last checkpoint
        self._write_failing = False
        self._log_closed = False
        self._checkpointing = False
        self._subs: dict[str, Subscription] = {}
        self._by_owner: dict[object, dict[str, Subscription]] = {}
        self._ready: dict[Subscription, None] = {}  # owed events not yet durable when checked
        self._loop: asyncio.AbstractEventLoop | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._state = "new"  # new -> open -> closed

    # -- life --------------------------------------------------------------

    async def open(self) -> None:
        """Open the log and load the retained events and the last seq (raises ``EventLogError``)."""
        if self._state != "new":
            raise RuntimeError("EventBus.open() may be called once")
        self._loop = asyncio.get_running_loop()
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
        log.info(
            "event_log_opened", path=self._log.path, last_seq=last_seq, retained=len(self._retained)
        )

    async def deliver_pending(self, within: float) -> None:
        """Commit now and give subscribers up to ``within`` seconds to send what they owe
        (the daemon calls this before closing connections, so ``daemon.stopping`` arrives)."""
        if self._state != "open":
            return
        self._flush()
        for _ in range(max(1, int(within / 0.005))):  # senders have no "caught up" signal
            if not any(
                sub.owed and sub.sender is not None and not sub.sender.closed
                for sub in self._subs.values()
            ):
                return
            await asyncio.sleep(0.005)

    async def close(self) -> None:
        """Commit what is pending, end every subscription and close the log. Idempotent."""
        if self._state != "open":
            self._state = "closed"
            return
        self._flush()
        self._state = "closed"
        for sub in list(self._subs.values()):
            self._remove(sub)
        assert self._loop is not None and self._executor is not None
        # The executor runs one thing at a time: this waits for any checkpoint first.
        self._log_closed = True
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
        event = _seal(
            StoredEvent(
                seq=self._last_seq + 1,
                time=time.time(),
                type=type,
                sandbox_id=sandbox_id,
                sandbox_name=sandbox_name,
                owner_uid=owner_uid,
                labels=dict(labels) if labels else {},
                data=dict(data) if data else {},
            )
        )
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
                blocked = sub.sender is not None and sub.sender.blocked
                if backlog >= queue_size and (blocked or backlog >= hard_cap):
                    self._lagged(sub)
                else:
                    sub.queue.append(event)
                    self._ready[sub] = None
        return event.wire

    def _flush(self) -> None:
        """Commit this loop turn's events, then let their subscribers' senders go."""
        self._flush_scheduled = False
        if not self._pending or self._log_closed:
            return
        batch, self._pending = self._pending, []
        try:
            self._log.append(batch)
        except EventLogError as exc:
            # Delivery goes on (a full disk must not stop the stream); the batch is kept,
            # up to ``retain`` events, and written with the next one.
            if not self._write_failing:
                log.error(
                    "event_log_write_failed",
                    events=len(batch),
                    first_seq=batch[0].seq,
                    error=str(exc),
                )
            self._write_failing = True
            self._pending = batch[-self.retain :] if self.retain else []
        else:
            if self._write_failing:
                log.info("event_log_write_recovered", last_seq=batch[-1].seq)
            self._write_failing = False
        self._durable_seq = batch[-1].seq
        self._commits += 1
        if self._commits >= CHECKPOINT_EVERY and not self._checkpointing:
            self._checkpoint()
        ready, self._ready = self._ready, {}
        for sub in ready:
            if sub.sender is not None:
                sub.sender.wake()

    def _checkpoint(self) -> None:
        assert self._loop is not None and self._executor is not None
        self._commits = 0
        self._checkpointing = True
        future = self._loop.run_in_executor(self._executor, self._log.checkpoint)
        future.add_done_callback(self._checkpointed)

    def _checkpointed(self, future: asyncio.Future[None]) -> None:
        self._checkpointing = False
        if not future.cancelled() and (exc := future.exception()) is not None:
            log.warning("event_log_checkpoint_failed", error=str(exc))

    # -- subscriptions -------------------------------------------------------

    def subscribe(
        self,
        owner: object,
        caller: Caller,
        make_sender: Callable[[Subscription], Sender],
        *,
        types: Iterable[str] | None = None,
        sandbox: str | None = None,
        labels: Mapping[str, str] | None = None,
        since: int | None = None,
    ) -> Subscription:
        """Start delivering to ``owner``: retained events after ``since`` first, then live ones.

        Synchronous: the replay snapshot and the registration for live events
        happen with nothing in between, so there is no gap and no duplicate.
        ``make_sender`` builds what writes the subscription's events.
        """
        if self._state != "open":
            raise ShuttingDown("The daemon is stopping and takes no new subscriptions.")
        mine = self._by_owner.get(owner)
        if mine is not None and len(mine) >= MAX_SUBSCRIPTIONS_PER_CONNECTION:
            raise QuotaExceeded(
                f"This connection already has {len(mine)} subscriptions, the most allowed; "
                "unsubscribe some or use one with a wider filter.",
                {"limit": MAX_SUBSCRIPTIONS_PER_CONNECTION},
            )
        sid = f"sub-{secrets.token_hex(8)}"
        sub = Subscription(self, sid, owner, caller, EventFilter.build(types, sandbox, labels))
        if since is not None and since < self._last_seq and self._retained:
            skip = max(0, since + 1 - self._retained[0].seq)
            sub.replay.extend(
                e for e in itertools.islice(self._retained, skip, None) if sub.wants(e)
            )
        sub.sender = make_sender(sub)
        if sub.sender.closed:
            return sub  # the client is already gone: nothing to deliver, nothing to keep
        self._by_owner.setdefault(owner, {})[sid] = sub
        self._subs[sid] = sub
        if sub.replay:
            self._ready[sub] = None
        return sub

    def knows_owner(self, owner: object) -> bool:
        """True once ``owner`` subscribed, until ``end_owner``."""
        return owner in self._by_owner

    def last_seq_for(self, caller: Caller) -> int:
        """The seq of the newest event ``caller`` may see (0 when none is retained)."""
        for event in reversed(self._retained):
            if visible(caller, event.owner_uid):
                return event.seq
        return 0

    def unsubscribe(self, owner: object, subscription: str) -> None:
        """End a subscription of ``owner``; ``NotFound`` for any other."""
        sub = self._by_owner.get(owner, {}).get(subscription)
        if sub is None:
            raise NotFound(
                f"No subscription {subscription!r} on this connection.",
                {"subscription": subscription},
            )
        self._remove(sub)

    def end_owner(self, owner: object) -> None:
        """``owner`` is gone (its connection closed): end all its subscriptions."""
        for sub in list(self._by_owner.get(owner, {}).values()):
            self._remove(sub)
        self._by_owner.pop(owner, None)

    def fail(self, sub: Subscription, reason: str) -> None:
        """The subscription's sender failed: end it and tell the client where to resume."""
        if sub.id not in self._subs:
            return
        next_seq = sub.next_seq or self._last_seq + 1
        log.error("event_sender_failed", subscription=sub.id, next_seq=next_seq, error=reason)
        self._end(sub, next_seq, reason)

    def mark_ready(self, sub: Subscription) -> None:
        if sub.id in self._subs:
            self._ready[sub] = None

    def _lagged(self, sub: Subscription) -> None:
        next_seq = sub.next_seq
        assert next_seq is not None  # the queue is full
        log.warning("events_lagged", subscription=sub.id, next_seq=next_seq, sent=sub.sent)
        self._end(sub, next_seq, None)

    def _end(self, sub: Subscription, next_seq: int, reason: str | None) -> None:
        sender = sub.sender
        self._remove(sub)
        if sender is not None:
            sender.cut_off(next_seq, reason)

    def _remove(self, sub: Subscription) -> None:
        self._subs.pop(sub.id, None)
        self._ready.pop(sub, None)
        mine = self._by_owner.get(sub.owner)
        if mine is not None:
            mine.pop(sub.id, None)
        sub.replay.clear()
        sub.queue.clear()
        if sub.sender is not None:
            sub.sender.stop()
