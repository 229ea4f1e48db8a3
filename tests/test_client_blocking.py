"""The blocking ``Client`` against the real daemon: the typed API, errors, events, threads, loss.

Every sandbox made here is removed in a ``finally`` (or by a fixture), and
every wait polls with a deadline.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import signal
import threading
import time
from collections.abc import Callable, Iterator

import pytest
from conftest import Daemon
from sandboxd_client import (
    BlockingEventStream,
    BlockingSandbox,
    Client,
    Conflict,
    ConnectionLost,
    DaemonInfo,
    Event,
    ExecResult,
    InvalidParams,
    NotFound,
    Stats,
)

SpawnDaemon = Callable[..., Daemon]
WITHIN = 30.0


@pytest.fixture
def client(daemon: Daemon) -> Iterator[Client]:
    with Client(daemon.socket) as c:
        yield c


@pytest.fixture
def sandbox(client: Client) -> Iterator[BlockingSandbox]:
    sb = client.create(ttl=300, labels={"suite": "blocking"})
    try:
        yield sb
    finally:
        with contextlib.suppress(NotFound):
            client.remove(sb.id)


def until(stream: BlockingEventStream, done: Callable[[Event], bool],
          within: float = WITHIN) -> list[Event]:
    """Events from ``stream`` up to and including the first ``done`` one, within a deadline."""
    deadline = time.monotonic() + within
    out: list[Event] = []
    while True:
        ev = stream.next_event(timeout=max(0.0, deadline - time.monotonic()))
        assert ev is not None, "the stream closed"
        out.append(ev)
        if done(ev):
            return out


def test_typed_api(client: Client) -> None:
    assert client.ping() == "pong"
    info = client.info()
    assert isinstance(info, DaemonInfo) and info.engine.reachable
    sb = client.create(ttl=120, memory="256m", labels={"suite": "blocking-api"}, env={"A": "1"})
    try:
        assert isinstance(sb, BlockingSandbox) and sb.status == "running"
        assert sb.limits.memory_bytes == 256 * 1024**2
        assert client.get(sb.id) == sb and client.get(sb.name).id == sb.id
        assert [s.id for s in client.list(labels={"suite": "blocking-api"})] == [sb.id]

        r = sb.exec(["sh", "-c", "printf 'o\\000ut'; printf err >&2; echo $A >&2; exit 3"])
        assert isinstance(r, ExecResult)
        assert (r.exit_code, r.stdout, r.stderr, r.timed_out) == (3, b"o\x00ut", b"err1\n",
                                                                  False)
        payload = bytes(range(256)) * 64
        assert client.exec(sb.id, ["cat"], stdin=payload).stdout == payload
        assert sb.exec(["true"]).ok

        assert sb.pause() is sb and sb.status == "paused"
        assert client.list(status="paused", labels={"suite": "blocking-api"})[0].id == sb.id
        assert sb.resume().status == "running"
        before = sb.expires_at
        assert sb.extend(600).expires_at != before
        stats = sb.stats()
        assert isinstance(stats, Stats) and stats.memory_limit_bytes == 256 * 1024**2
        assert sb.refresh().status == "running"
        sb.remove()
        with pytest.raises(NotFound):
            client.get(sb.id)
    finally:
        with contextlib.suppress(NotFound):
            client.remove(sb.id)


def test_error_replies_raise_their_class(client: Client, sandbox: BlockingSandbox) -> None:
    with pytest.raises(NotFound) as missing:
        client.get("no-such-sandbox")
    assert missing.value.code == "not_found"
    with pytest.raises(InvalidParams):
        client.create(memory="12q")
    sandbox.pause()
    with pytest.raises(Conflict):
        sandbox.pause()
    with pytest.raises(Conflict):
        sandbox.exec(["true"])
    sandbox.resume()
    with pytest.raises(TypeError):
        sandbox.exec("echo hi")  # type: ignore[arg-type]
    assert client.connected and client.ping() == "pong"  # errors never break the connection


def test_events_through_the_blocking_stream(client: Client) -> None:
    with client.events(types=["sandbox.*"]).start() as stream:
        assert stream.subscription is not None
        sb = client.create(ttl=120)
        try:
            sb.extend(90)
        finally:
            sb.remove()
        seen = until(stream, lambda e: e.type == "sandbox.removed" and e.sandbox_id == sb.id)
    assert stream.subscription is None  # closed with the block
    mine = [e for e in seen if e.sandbox_id == sb.id]
    assert [e.type for e in mine] == ["sandbox.created", "sandbox.extended", "sandbox.removed"]
    assert all(e.type.startswith("sandbox.") for e in seen)
    assert mine[1].data["ttl"] == 90

    # Replayed with ``since``: a plain ``for`` loop, left early, closes its stream.
    replay = client.events(sandbox=sb.id, since=mine[0].seq - 1)
    got = []
    for ev in replay:
        got.append(ev.type)
        if ev.type == "sandbox.removed":
            break
    assert got == ["sandbox.created", "sandbox.extended", "sandbox.removed"]
    assert replay.next_event(timeout=1) is None  # closed by leaving the loop
    assert client.ping() == "pong"


def test_threads_share_one_client(client: Client, sandbox: BlockingSandbox) -> None:
    threads, calls = 8, 20
    start = threading.Barrier(threads)
    before = threading.active_count()

    def work(t: int) -> list[str]:
        start.wait(WITHIN)
        out = []
        for i in range(calls):
            if i % 4 == 3:
                assert client.ping() == "pong"
                out.append(f"{t}-{i}")
                continue
            r = sandbox.exec(["echo", f"{t}-{i}"])
            assert r.exit_code == 0 and r.stderr == b""
            out.append(r.stdout.decode().strip())
        return out

    with concurrent.futures.ThreadPoolExecutor(max_workers=threads) as pool:
        results = list(pool.map(work, range(threads), timeout=120))
    for t, answers in enumerate(results):
        assert answers == [f"{t}-{i}" for i in range(calls)]  # each answer to its own caller
    assert threading.active_count() == before  # the client started no thread of its own
    assert client._conn._router.pending == {}


def test_a_daemon_that_dies_fails_every_pending_call(spawn_daemon: SpawnDaemon) -> None:
    d = spawn_daemon()
    c = Client(d.socket)
    sb = c.create(ttl=300)
    try:
        with concurrent.futures.ThreadPoolExecutor(max_workers=3) as pool:
            pending = [pool.submit(sb.exec, ["sleep", "60"]) for _ in range(3)]
            deadline = time.monotonic() + WITHIN
            while len(c._conn._router.pending) < 3:  # all three sent and waiting
                assert time.monotonic() < deadline, "the execs were not sent"
                assert not any(f.done() for f in pending), [f.exception() for f in pending]
                time.sleep(0.01)
            killed = time.monotonic()
            d.stop(signal.SIGKILL)
            for fut in pending:
                with pytest.raises(ConnectionLost):
                    fut.result(timeout=10)
            assert time.monotonic() - killed < 5
        assert c.closed
        started = time.monotonic()
        with pytest.raises(ConnectionLost):
            c.ping()
        assert time.monotonic() - started < 0.1
    finally:
        c.close()
        if d.proc is not None and d.proc.poll() is not None:
            d.start()  # adopts the sandbox, so that it can be removed
        with Client(d.socket) as cleanup, contextlib.suppress(NotFound):
            cleanup.remove(sb.id)


def test_blocking_stream_rides_through_a_daemon_restart(spawn_daemon: SpawnDaemon) -> None:
    d = spawn_daemon()
    with Client(d.socket) as c, c.events(types=["sandbox.*", "daemon.*"],
                                         max_backoff=0.2).start() as stream:
        sb = c.create(ttl=120)
        sb.remove()
        before = until(stream, lambda e: e.type == "sandbox.removed")
        assert d.stop(signal.SIGTERM) == 0
        d.start()
        with Client(d.socket) as other:
            sb2 = other.create(ttl=120)
            other.remove(sb2.id)
        after = until(stream, lambda e: e.type == "sandbox.removed" and e.sandbox_id == sb2.id)
        assert stream.reconnects >= 1
    seqs = [e.seq for e in before + after]
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs)))  # no gap, no duplicate
    assert [e.type for e in after][:2] == ["daemon.stopping", "daemon.started"]
