"""The event bus on its own: filters, visibility, seq, persistence, retention, fan-out, lag.

No engine and no daemon: the bus is driven directly with fake connections
(``FakeCtx``), and the durable log lives in a tmp dir.
"""

from __future__ import annotations

import asyncio
import inspect
import os
import re
import sqlite3
import stat
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import msgpack
import pytest
import pytest_asyncio
import structlog

from sandboxd.core.records import Caller
from sandboxd.rpc.delivery import EventSender
from sandboxd.rpc.delivery import subscribe as deliver_to
from sandboxd.rpc.methods.events import build_event_methods
from sandboxd.rpc.params import validate
from sandboxd.services.eventbus import (
    MAX_SUBSCRIPTIONS_PER_CONNECTION,
    EventBus,
    EventFilter,
    Subscription,
    visible,
)
from sandboxd.store.eventlog import EventLogError, StoredEvent
from sandboxd.wire.codec import encode_notification
from sandboxd.wire.errors import InvalidParams, NotFound, QuotaExceeded

pytestmark = pytest.mark.pure  # no Docker Engine: no engine start, no leak check


ADMIN = Caller(uid=0, gid=0, pid=1, admin=True)
ALICE = Caller(uid=1000, gid=1000, pid=2, admin=False)
BOB = Caller(uid=1001, gid=1001, pid=3, admin=False)
TIME_RE = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")


class FakeCtx:
    """A CallContext that records notifications; ``stuck`` makes drain() never return."""

    def __init__(self, caller: Caller = ADMIN, stuck: bool = False) -> None:
        self.caller = caller
        self.log: Any = structlog.get_logger("test")
        self.closed = False
        self.on_close: list[Callable[[], None]] = []
        self.notes: list[tuple[str, list[Any]]] = []
        self.stuck = stuck
        self.drains = 0
        self.holds = 0

    def log_request(self, **fields: Any) -> None:
        pass

    def notify(self, method: str, params: list[Any]) -> None:
        self.notes.append((method, params))

    async def drain(self) -> None:
        self.drains += 1
        if self.stuck:
            await asyncio.Event().wait()

    def hold(self) -> None:
        self.holds += 1

    def release(self) -> None:
        self.holds -= 1

    def close(self) -> None:
        self.closed = True
        for callback in self.on_close:
            callback()

    def events(self, sub: str | None = None) -> list[dict[str, Any]]:
        return [p[1] for m, p in self.notes if m == "event" and (sub is None or p[0] == sub)]

    def seqs(self, sub: str | None = None) -> list[int]:
        return [e["seq"] for e in self.events(sub)]

    def lagged(self) -> list[list[Any]]:
        return [p for m, p in self.notes if m == "events.lagged"]


class FrameCtx(FakeCtx):
    """A connection that also takes pre-encoded frames (``events.FrameSink``)."""

    def __init__(self, caller: Caller = ADMIN, stuck: bool = False) -> None:
        super().__init__(caller, stuck)
        self.frames = 0
        self.unpacker = msgpack.Unpacker(raw=False)

    @property
    def writable(self) -> bool:
        return not self.closed and not (self.stuck and self.frames > 0)

    def send_frame(self, frame: bytes) -> None:
        self.frames += 1
        self.unpacker.feed(frame)
        for msg in self.unpacker:
            assert msg[0] == 2
            self.notes.append((msg[1], msg[2]))


@pytest.fixture(params=["notify", "frames"])
def Ctx(request: pytest.FixtureRequest) -> type[FakeCtx]:
    """Each fan-out test runs with a plain CallContext and with a FrameSink one."""
    return FakeCtx if request.param == "notify" else FrameCtx


@pytest_asyncio.fixture
async def bus(tmp_path: Path) -> AsyncIterator[EventBus]:
    b = EventBus(str(tmp_path / "state"))
    await b.open()
    yield b
    await b.close()


async def settle(bus: EventBus) -> None:
    """Wait until everything published is committed and every owed event was written."""
    async with asyncio.timeout(10.0):
        while True:
            await asyncio.sleep(0.001)
            if bus.durable_seq != bus.last_seq:
                continue
            subs = [s for s in bus._subs.values() if not sender(s).ctx.stuck]  # type: ignore[attr-defined]
            if all(not s.queue and not s.replay for s in subs):
                await asyncio.sleep(0.002)
                return


def sender(sub: Subscription) -> EventSender:
    """The delivery side of a subscription made with ``deliver_to``."""
    assert isinstance(sub.sender, EventSender)
    return sub.sender


def sandbox_event(bus: EventBus, kind: str, sid: str = "sb1", name: str = "one",
                  owner: int | None = 1000, labels: dict[str, str] | None = None,
                  **data: Any) -> dict[str, Any]:
    return bus.publish(kind, sandbox_id=sid, sandbox_name=name, owner_uid=owner,
                       labels=labels, data=data)


def stored(kind: str, sid: str | None = "sb1", name: str | None = "one",
           labels: dict[str, str] | None = None) -> StoredEvent:
    return StoredEvent(seq=1, time=0.0, type=kind, sandbox_id=sid, sandbox_name=name,
                       owner_uid=1000, labels=labels or {}, data={})


# -- filters and visibility ---------------------------------------------------


def test_type_filter_exact_and_prefix() -> None:
    exact = EventFilter.build(types=["sandbox.created"])
    assert exact.matches(stored("sandbox.created"))
    assert not exact.matches(stored("sandbox.removed"))
    assert not exact.matches(stored("sandbox.created.more"))

    prefix = EventFilter.build(types=["sandbox.*", "exec.exited"])
    assert prefix.matches(stored("sandbox.created"))
    assert prefix.matches(stored("sandbox.removed"))
    assert prefix.matches(stored("exec.exited"))
    assert not prefix.matches(stored("exec.started"))
    assert not prefix.matches(stored("sandboxes.x"))  # the dot is part of the prefix
    assert not prefix.matches(stored("daemon.started"))

    image = EventFilter.build(types=["image.*"])
    assert image.matches(stored("image.pull.progress"))
    assert image.matches(stored("image.pulled"))

    for everything in (EventFilter.build(), EventFilter.build(types=["*"]),
                       EventFilter.build(types=[])):
        assert everything.matches(stored("daemon.started"))
        assert everything.matches(stored("exec.started"))


def test_sandbox_and_label_filters() -> None:
    by_id = EventFilter.build(sandbox="sb1")
    by_name = EventFilter.build(sandbox="one")
    ev = stored("sandbox.created", sid="sb1", name="one")
    other = stored("sandbox.created", sid="sb2", name="two")
    daemon = stored("daemon.started", sid=None, name=None)
    assert by_id.matches(ev) and by_name.matches(ev)
    assert not by_id.matches(other) and not by_name.matches(other)
    assert not by_id.matches(daemon)

    labelled = stored("sandbox.created", labels={"team": "a", "env": "ci"})
    assert EventFilter.build(labels={"team": "a"}).matches(labelled)
    assert EventFilter.build(labels={"team": "a", "env": "ci"}).matches(labelled)
    assert not EventFilter.build(labels={"team": "b"}).matches(labelled)
    assert not EventFilter.build(labels={"team": "a", "x": "y"}).matches(labelled)
    assert not EventFilter.build(labels={"team": "a"}).matches(daemon)

    both = EventFilter.build(types=["sandbox.*"], sandbox="one", labels={"team": "a"})
    assert both.matches(labelled)
    assert not both.matches(stored("exec.started", labels={"team": "a"}))


def test_visibility_rule() -> None:
    assert visible(ADMIN, 1000) and visible(ADMIN, None)
    assert visible(ALICE, 1000)
    assert not visible(ALICE, 1001)
    assert visible(ALICE, None)  # daemon.* and image.* belong to nobody
    assert not visible(BOB, 1000)


async def test_visibility_through_the_bus(Ctx: type[FakeCtx], bus: EventBus) -> None:
    admin, alice, bob = Ctx(ADMIN), Ctx(ALICE), Ctx(BOB)
    for ctx in (admin, alice, bob):
        deliver_to(bus, ctx)
    bus.publish("daemon.started", data={"version": "x"})
    sandbox_event(bus, "sandbox.created", owner=1000)
    sandbox_event(bus, "sandbox.created", sid="sb2", name="two", owner=1001)
    await settle(bus)
    assert admin.seqs() == [1, 2, 3]
    assert alice.seqs() == [1, 2]
    assert bob.seqs() == [1, 3]


async def test_filters_through_the_bus_and_several_subscriptions(
    Ctx: type[FakeCtx], bus: EventBus,
) -> None:
    ctx = Ctx(ADMIN)
    every = deliver_to(bus, ctx).id
    sandboxes = deliver_to(bus, ctx, types=["sandbox.*"]).id
    one = deliver_to(bus, ctx, sandbox="one").id
    team = deliver_to(bus, ctx, labels={"team": "a"}).id
    assert len({every, sandboxes, one, team}) == 4
    bus.publish("daemon.started")
    sandbox_event(bus, "sandbox.created", labels={"team": "a"})
    sandbox_event(bus, "exec.started", labels={"team": "a"}, cmd=["true"])
    sandbox_event(bus, "sandbox.created", sid="sb2", name="two", labels={"team": "b"})
    await settle(bus)
    assert ctx.seqs(every) == [1, 2, 3, 4]
    assert ctx.seqs(sandboxes) == [2, 4]
    assert ctx.seqs(one) == [2, 3]
    assert ctx.seqs(team) == [2, 3]


# -- the event itself and seq ---------------------------------------------------


async def test_wire_event_and_monotonic_seq(Ctx: type[FakeCtx], bus: EventBus) -> None:
    ctx = Ctx(ALICE)
    deliver_to(bus, ctx)
    wire = sandbox_event(bus, "sandbox.extended", labels={"team": "a"}, ttl=60)
    assert set(wire) == {"seq", "time", "type", "sandbox_id", "sandbox_name", "owner_uid",
                         "data"}  # labels are internal
    assert wire["seq"] == 1 and wire["type"] == "sandbox.extended"
    assert wire["sandbox_id"] == "sb1" and wire["sandbox_name"] == "one"
    assert wire["owner_uid"] == 1000 and wire["data"] == {"ttl": 60}
    assert TIME_RE.match(wire["time"])
    daemon = bus.publish("daemon.stopping")
    assert daemon["sandbox_id"] is None and daemon["owner_uid"] is None and daemon["data"] == {}
    seqs = [sandbox_event(bus, "sandbox.extended", ttl=i)["seq"] for i in range(100)]
    assert seqs == list(range(3, 103))
    assert bus.last_seq == 102
    await settle(bus)
    assert ctx.seqs() == list(range(1, 103))
    assert ctx.events()[0] == wire


async def test_publish_is_synchronous_and_never_waits(Ctx: type[FakeCtx], bus: EventBus) -> None:
    assert not inspect.iscoroutinefunction(EventBus.publish)
    stuck = [Ctx(ADMIN, stuck=True) for _ in range(5)]
    for ctx in stuck:
        deliver_to(bus, ctx)
    bus.publish("daemon.tick")
    async with asyncio.timeout(5):
        while True:
            if all(ctx.drains for ctx in stuck):  # each is now waiting for its client
                break
            await asyncio.sleep(0.001)
    # 10,000 events in one synchronous burst, with subscribers that never read:
    # publish returns every time, without a single await in between.
    for i in range(10_000):
        assert isinstance(bus.publish("daemon.tick", data={"i": i}), dict)
    assert bus.last_seq == 10_001
    assert all(len(ctx.lagged()) == 1 for ctx in stuck)
    assert bus.subscription_count == 0


async def test_events_are_delivered_only_once_committed(bus: EventBus) -> None:
    """A seq a client has seen is on disk: a crash can never hand it out again."""
    checked: list[tuple[int, int]] = []

    class Watching(FakeCtx):
        def notify(self, method: str, params: list[Any]) -> None:
            checked.append((params[1]["seq"], bus.durable_seq))
            super().notify(method, params)

    ctx = Watching(ADMIN)
    deliver_to(bus, ctx)
    await asyncio.sleep(0.01)
    for _ in range(20):
        for _ in range(50):
            bus.publish("daemon.tick")
        assert bus.durable_seq < bus.last_seq  # nothing is committed inside publish
        await asyncio.sleep(0)
    await settle(bus)
    assert ctx.seqs() == list(range(1, 1001))
    assert all(seq <= durable for seq, durable in checked)


def test_unencodable_data_is_refused_without_using_a_seq(tmp_path: Path) -> None:
    async def main() -> None:
        b = EventBus(str(tmp_path))
        await b.open()
        with pytest.raises(TypeError):
            b.publish("daemon.tick", data={"x": object()})
        assert b.publish("daemon.tick")["seq"] == 1
        await b.close()

    asyncio.run(main())


# -- subscribe / unsubscribe ------------------------------------------------------


async def test_unsubscribe_and_connection_close(Ctx: type[FakeCtx], bus: EventBus) -> None:
    a, b = Ctx(ADMIN), Ctx(ADMIN)
    sa1 = deliver_to(bus, a)
    sa2 = deliver_to(bus, a)
    sb = deliver_to(bus, b)
    with pytest.raises(NotFound):
        bus.unsubscribe(a, "sub-nope")
    with pytest.raises(NotFound):
        bus.unsubscribe(a, sb.id)  # another connection's subscription
    bus.unsubscribe(a, sa1.id)
    with pytest.raises(NotFound):
        bus.unsubscribe(a, sa1.id)
    bus.publish("daemon.tick")
    await settle(bus)
    assert a.seqs(sa1.id) == [] and a.seqs(sa2.id) == [1] and b.seqs() == [1]
    a.close()
    assert bus.subscription_count == 1
    await asyncio.sleep(0)
    assert sender(sa2).task is not None and sender(sa2).task.done()
    bus.publish("daemon.tick")
    await settle(bus)
    assert a.seqs() == [1] and b.seqs() == [1, 2]


async def test_subscription_limit_per_connection(bus: EventBus) -> None:
    ctx = FakeCtx(ADMIN)
    for _ in range(MAX_SUBSCRIPTIONS_PER_CONNECTION):
        deliver_to(bus, ctx)
    with pytest.raises(QuotaExceeded):
        deliver_to(bus, ctx)
    ctx.close()
    assert bus.subscription_count == 0


async def test_event_methods(bus: EventBus) -> None:
    methods = {m.name: m for m in build_event_methods(bus)}
    assert set(methods) == {"events.subscribe", "events.unsubscribe"}
    sub_m, unsub_m = methods["events.subscribe"], methods["events.unsubscribe"]
    assert not sub_m.is_async  # inline: snapshot and registration in one step
    ctx = FakeCtx(ALICE)
    bus.publish("daemon.started")
    args = validate(sub_m.params, [{"types": ["sandbox.*", "daemon.started"], "since": 0,
                                     "sandbox": "one", "labels": {"a": "b"}}])
    reply = sub_m.handler(ctx, args)
    assert set(reply) == {"subscription", "last_seq"} and reply["last_seq"] == 1
    assert validate(sub_m.params, []) == {}
    for bad in ({"types": "sandbox.*"}, {"types": [""]}, {"types": ["sand*"]},
                {"types": [".*"]}, {"since": -1}, {"since": "3"}, {"labels": {"a": 1}},
                {"bogus": 1}):
        with pytest.raises(InvalidParams):
            validate(sub_m.params, [bad])
    unsub_m.handler(ctx, validate(unsub_m.params, [{"subscription": reply["subscription"]}]))
    with pytest.raises(NotFound):
        unsub_m.handler(ctx, validate(unsub_m.params, [{"subscription": "nope"}]))
    with pytest.raises(InvalidParams):
        validate(unsub_m.params, [])


# -- replay -----------------------------------------------------------------------


async def test_since_replays_then_goes_live_without_gap_or_duplicate(
    Ctx: type[FakeCtx], bus: EventBus,
) -> None:
    for i in range(50):
        bus.publish("daemon.tick", data={"i": i})
    ctx = Ctx(ADMIN)
    sub = deliver_to(bus, ctx, since=20)
    for i in range(50, 80):
        bus.publish("daemon.tick", data={"i": i})
    await settle(bus)
    assert ctx.seqs(sub.id) == list(range(21, 81))

    later = Ctx(ADMIN)
    deliver_to(bus, later, since=80)
    nothing = Ctx(ADMIN)
    deliver_to(bus, nothing, since=10_000)  # ahead of the log: live only
    bus.publish("daemon.tick")
    await settle(bus)
    assert later.seqs() == [81] and nothing.seqs() == [81]


async def test_since_with_filter_and_visibility(Ctx: type[FakeCtx], bus: EventBus) -> None:
    sandbox_event(bus, "sandbox.created", owner=1000)
    sandbox_event(bus, "sandbox.created", sid="sb2", name="two", owner=1001)
    sandbox_event(bus, "exec.started", owner=1000)
    bus.publish("daemon.stopping")
    alice = Ctx(ALICE)
    deliver_to(bus, alice, since=0, types=["sandbox.*", "daemon.*"])
    await settle(bus)
    assert alice.seqs() == [1, 4]


async def test_many_events_published_during_replay_keep_order(
    Ctx: type[FakeCtx], tmp_path: Path,
) -> None:
    b = EventBus(str(tmp_path), retain=5000, queue_size=100_000)
    await b.open()
    try:
        for i in range(5000):
            b.publish("daemon.tick", data={"i": i})
        ctx = Ctx(ADMIN)
        deliver_to(b, ctx, since=0)
        for _ in range(10):
            for _ in range(100):
                b.publish("daemon.tick")
            await asyncio.sleep(0)
        await settle(b)
        assert ctx.seqs() == list(range(1, 6001))
    finally:
        await b.close()


# -- persistence and retention ----------------------------------------------------


async def test_persistence_across_close_and_open(tmp_path: Path) -> None:
    state = tmp_path / "new" / "state"
    b = EventBus(str(state))
    await b.open()
    assert b.last_seq == 0
    assert stat.S_IMODE(os.stat(state).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(state / "events.db").st_mode) == 0o600
    for i in range(5):
        sandbox_event(b, "sandbox.extended", labels={"team": "a"}, ttl=i)
    await b.close()

    b2 = EventBus(str(state))
    await b2.open()
    try:
        assert b2.last_seq == 5
        assert b2.publish("daemon.started")["seq"] == 6
        ctx = FakeCtx(ADMIN)
        bus_sub = deliver_to(b2, ctx, since=2)
        labelled = FakeCtx(ADMIN)
        deliver_to(b2, labelled, since=0, labels={"team": "a"})  # labels survive the restart
        b2.publish("daemon.tick")
        await settle(b2)
        assert ctx.seqs(bus_sub.id) == [3, 4, 5, 6, 7]
        assert [e["data"] for e in ctx.events()[:3]] == [{"ttl": 2}, {"ttl": 3}, {"ttl": 4}]
        assert ctx.events()[0]["sandbox_name"] == "one"
        assert labelled.seqs() == [1, 2, 3, 4, 5]
    finally:
        await b2.close()


async def test_retain_bound_in_memory_and_on_disk(tmp_path: Path) -> None:
    b = EventBus(str(tmp_path), retain=100)
    await b.open()
    for i in range(250):
        b.publish("daemon.tick", data={"i": i})
    ctx = FakeCtx(ADMIN)
    deliver_to(b, ctx, since=5)  # older than retained: replay from the oldest retained
    await settle(b)
    assert ctx.seqs() == list(range(151, 251))
    await b.close()
    with sqlite3.connect(tmp_path / "events.db") as db:
        rows = db.execute("SELECT COUNT(*), MIN(seq), MAX(seq) FROM events").fetchone()
    assert rows == (100, 151, 250)

    smaller = EventBus(str(tmp_path), retain=10)  # retain lowered by configuration
    await smaller.open()
    ctx2 = FakeCtx(ADMIN)
    deliver_to(smaller, ctx2, since=0)
    await settle(smaller)
    assert ctx2.seqs() == list(range(241, 251))
    assert smaller.publish("daemon.tick")["seq"] == 251
    await smaller.close()

    none = EventBus(str(tmp_path), retain=0)  # nothing kept, yet seq never goes back
    await none.open()
    assert none.last_seq == 251
    assert none.publish("daemon.tick")["seq"] == 252
    await none.close()
    again = EventBus(str(tmp_path), retain=0)
    await again.open()
    assert again.last_seq == 252
    await again.close()


def test_seq_survives_sigkill(tmp_path: Path) -> None:
    """Every event a subscriber saw is on disk when the process is SIGKILLed."""
    script = f"""
import asyncio, os, signal, sys
sys.path.insert(0, {str(Path(__file__).resolve().parent.parent)!r})
from sandboxd.services.eventbus import EventBus
from sandboxd.rpc.delivery import subscribe as deliver_to

class Ctx:
    from sandboxd.core.records import Caller
    caller = Caller(0, 0, 0, True)
    closed = False
    def __init__(self): self.on_close = []; self.seen = 0
    import structlog
    log = structlog.get_logger("test")
    def notify(self, method, params): self.seen = params[1]["seq"]
    async def drain(self): pass
    def hold(self): pass
    def release(self): pass

async def main():
    bus = EventBus({str(tmp_path)!r})
    await bus.open()
    ctx = Ctx()
    deliver_to(bus, ctx)
    for i in range(3000):
        bus.publish("daemon.tick", data={{"i": i}})
        if i % 100 == 0:
            await asyncio.sleep(0.002)
    while ctx.seen < 2000:
        await asyncio.sleep(0.001)
    print("SEEN", ctx.seen, flush=True)
    os.kill(os.getpid(), signal.SIGKILL)

asyncio.run(main())
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == -9, proc.stderr
    seen = int(proc.stdout.split("SEEN ")[1].split()[0])

    async def reopen() -> int:
        b = EventBus(str(tmp_path))
        await b.open()
        last = b.last_seq
        nxt = b.publish("daemon.started")["seq"]
        await b.close()
        assert nxt == last + 1
        return last

    assert asyncio.run(reopen()) >= seen


def test_unreadable_log_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "events.db").write_bytes(b"this is not a database" * 100)

    async def main() -> None:
        b = EventBus(str(tmp_path))
        with pytest.raises(EventLogError, match=r"events\.db"):
            await b.open()

    asyncio.run(main())


def test_publish_before_open_and_after_close(tmp_path: Path) -> None:
    async def main() -> None:
        b = EventBus(str(tmp_path))
        with pytest.raises(RuntimeError):
            b.publish("daemon.tick")
        await b.open()
        assert b.publish("daemon.tick")["seq"] == 1
        await b.close()
        assert b.publish("daemon.tick")["seq"] == 0  # dropped, not recorded
        await b.close()  # idempotent
        b2 = EventBus(str(tmp_path))
        await b2.open()
        assert b2.last_seq == 1
        await b2.close()

    asyncio.run(main())


# -- slow subscribers -----------------------------------------------------------


async def test_slow_subscriber_is_cut_off_while_another_gets_everything(
    Ctx: type[FakeCtx], bus: EventBus,
) -> None:
    slow, fast = Ctx(ADMIN, stuck=True), Ctx(ADMIN)
    slow_sub = deliver_to(bus, slow)
    fast_sub = deliver_to(bus, fast)
    total = 10_000
    for start in range(0, total, 250):
        for i in range(start, start + 250):
            bus.publish("daemon.tick", data={"i": i})
        await settle(bus)
    assert fast.seqs(fast_sub.id) == list(range(1, total + 1))
    assert [e["data"]["i"] for e in fast.events()] == list(range(total))

    got = slow.seqs(slow_sub.id)
    assert got == list(range(1, len(got) + 1))  # a prefix, in order
    assert 0 < len(got) < total
    assert slow.lagged() == [[slow_sub.id, {"next_seq": len(got) + 1}]]
    assert slow.notes[-1][0] == "events.lagged"  # nothing after the cut-off
    assert bus.subscription_count == 1
    assert sender(slow_sub).task is not None and sender(slow_sub).task.done()


async def test_lag_during_replay_names_the_first_missed_replayed_seq(
    Ctx: type[FakeCtx], tmp_path: Path,
) -> None:
    b = EventBus(str(tmp_path), queue_size=10)
    await b.open()
    try:
        for _ in range(3000):
            b.publish("daemon.tick")
        await settle(b)
        slow = Ctx(ADMIN, stuck=True)
        sub = deliver_to(b, slow, since=0)
        await asyncio.sleep(0.01)  # the sender writes one batch, then waits forever
        got = slow.seqs()
        assert got == list(range(1, len(got) + 1)) and 0 < len(got) < 3000
        for _ in range(11):
            b.publish("daemon.tick")
        assert slow.lagged() == [[sub.id, {"next_seq": len(got) + 1}]]
    finally:
        await b.close()


async def test_close_ends_subscriptions_and_commits(Ctx: type[FakeCtx], tmp_path: Path) -> None:
    b = EventBus(str(tmp_path))
    await b.open()
    stuck = Ctx(ADMIN, stuck=True)
    sub = deliver_to(b, stuck)
    for _ in range(10):
        b.publish("daemon.tick")
    await b.close()
    assert sender(sub).task is not None and sender(sub).task.done()
    assert b.subscription_count == 0
    b2 = EventBus(str(tmp_path))
    await b2.open()
    assert b2.last_seq == 10
    await b2.close()


async def test_a_burst_in_one_turn_does_not_cut_off_a_reader_that_keeps_up(Ctx: type[FakeCtx],
    tmp_path: Path,
) -> None:

    b = EventBus(str(tmp_path), queue_size=100)
    await b.open()
    try:
        fast, slow = Ctx(ADMIN), Ctx(ADMIN, stuck=True)
        deliver_to(b, fast)
        slow_sub = deliver_to(b, slow)
        b.publish("daemon.tick")
        await settle(b)
        assert slow.drains == 1  # written one batch, now waiting for its client
        for _ in range(5000):  # one loop turn: no sender can run meanwhile
            b.publish("daemon.tick")
        assert slow.lagged() == [[slow_sub.id, {"next_seq": 2}]]
        await settle(b)
        assert fast.seqs() == list(range(1, 5002))
        for _ in range(20_000):  # beyond max(queue_size, retain): even a reader is cut off
            b.publish("daemon.tick")
        assert len(fast.lagged()) == 1
    finally:
        await b.close()


async def test_pre_encoded_frames_are_exactly_the_protocol_encoding(bus: EventBus) -> None:
    raw: list[bytes] = []

    class Capture(FrameCtx):
        def send_frame(self, frame: bytes) -> None:
            raw.append(frame)
            super().send_frame(frame)

    ctx = Capture(ADMIN)
    sub = deliver_to(bus, ctx)
    wire = sandbox_event(bus, "sandbox.extended", ttl=1.5, note="é", blob=b"\x00\xff")
    await settle(bus)
    assert raw == [encode_notification("event", [sub.id, wire])]
    assert ctx.events() == [wire]


async def test_direct_writes_stop_when_the_client_falls_behind(tmp_path: Path) -> None:
    """A writable, idle subscriber is written to directly; once not, its task takes over."""
    b = EventBus(str(tmp_path), queue_size=10)
    await b.open()
    try:
        ctx = FrameCtx(ADMIN, stuck=True)  # writable until the first frame
        sub = deliver_to(b, ctx)
        await asyncio.sleep(0.01)
        b.publish("daemon.tick")
        await settle(b)
        assert ctx.seqs() == [1] and ctx.frames == 1
        await asyncio.sleep(0.01)
        assert sender(sub).blocked  # the task now waits for the client to read
        for _ in range(11):
            b.publish("daemon.tick")
        assert ctx.lagged() == [[sub.id, {"next_seq": 2}]]
    finally:
        await b.close()


async def test_a_failed_write_keeps_delivering_and_is_retried(tmp_path: Path) -> None:
    b = EventBus(str(tmp_path))
    await b.open()
    ctx = FakeCtx(ADMIN)
    deliver_to(b, ctx)
    real_append = b._log.append
    failures = [True, True]

    def flaky(events: Any) -> None:
        if failures:
            failures.pop()
            raise EventLogError("disk full")
        real_append(events)

    b._log.append = flaky  # type: ignore[method-assign]
    for _ in range(3):
        b.publish("daemon.tick")
        await settle(b)
    assert ctx.seqs() == [1, 2, 3]  # the stream went on
    b._log.append = real_append  # type: ignore[method-assign]
    await b.close()
    again = EventBus(str(tmp_path))
    await again.open()
    replay = FakeCtx(ADMIN)
    deliver_to(again, replay, since=0)
    await settle(again)
    assert replay.seqs() == [1, 2, 3]  # written with the first batch that succeeded
    await again.close()


# -- the client's view ------------------------------------------------------------


def test_client_event_model_and_cli_line() -> None:
    from sandboxd_client import Event
    from sandboxd_client.cli import event_line

    ev = Event.from_wire({"seq": 7, "time": "2026-11-26T15:04:05.123Z",
                          "type": b"sandbox.extended", "sandbox_id": "abc",
                          "sandbox_name": "web", "owner_uid": 1000,
                          "data": {"ttl": 90.0, "cmd": ["sh", "-c", "x y"], "why": "a b"},
                          "future": 1})
    assert (ev.seq, ev.type, ev.sandbox_id, ev.owner_uid) == (7, "sandbox.extended", "abc", 1000)
    assert ev.extra == {"future": 1}
    assert ev.to_dict()["data"]["ttl"] == 90.0
    assert event_line(ev) == ('7 2026-11-26T15:04:05.123Z sandbox.extended abc(web) ttl=90 '
                              'cmd=["sh","-c","x y"] why="a b"')
    daemon = Event.from_wire({"seq": 1, "time": "t", "type": "daemon.started",
                              "sandbox_id": None, "sandbox_name": None, "owner_uid": None,
                              "data": {}})
    assert event_line(daemon) == "1 t daemon.started -"
    assert daemon.owner_uid is None and daemon.sandbox_id is None


async def test_a_failed_sender_ends_the_subscription_with_a_notification(bus: EventBus) -> None:
    """A sender that fails is not dropped in silence: the client gets events.lagged with
    where to resume and why, and the bus forgets the subscription."""

    class Failing(FakeCtx):
        async def drain(self) -> None:
            raise RuntimeError("the connection broke in an unforeseen way")

    ctx = Failing(ADMIN)
    sub = deliver_to(bus, ctx)
    bus.publish("daemon.tick")
    bus.publish("daemon.tick")
    await settle(bus)
    [[sid, info]] = ctx.lagged()
    assert sid == sub.id and info["next_seq"] >= 1 and "failed" in info["error"]
    assert ctx.seqs(sub.id) == list(range(1, info["next_seq"]))  # nothing lost before it
    assert bus.subscription_count == 0
    assert sender(sub).task is not None and sender(sub).task.done()
