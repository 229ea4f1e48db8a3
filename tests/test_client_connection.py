"""Both client connections against scripted peers (no daemon): matching, loss, channels.

A ``Peer`` is a Unix socket the test itself drives (it reads the requests
and writes whatever bytes the test wants, when it wants), so the order of
events on the wire is exact. Covered: responses matched to the right thread,
every waiter failing with ``ConnectionLost`` when the peer goes away, call
timeouts, keyed channels opened by a call's ``on_result`` before the
notifications that follow the reply, back-pressure (a full channel stops the
reading of the socket), overflow, closing, and what callbacks may not do.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import random
import socket
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from sandboxd_client.channels import ChannelBuffer
from sandboxd_client.connection import AsyncConnection, BlockingConnection
from sandboxd_client.exceptions import ChannelClosed, ChannelOverflow, ConnectFailed

from sandboxd.wire.codec import (
    Decoder,
    Request,
    Response,
    encode_notification,
    encode_request,
    encode_response,
)
from sandboxd.wire.errors import ConnectionLost, NotFound

pytestmark = pytest.mark.pure

WITHIN = 5.0


def poll(condition: Callable[[], bool], within: float = WITHIN) -> None:
    """Wait until ``condition()`` is true, checking often; fail after ``within`` seconds."""
    deadline = time.monotonic() + within
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met within the deadline")
        time.sleep(0.005)


async def apoll(condition: Callable[[], bool], within: float = WITHIN) -> None:
    deadline = time.monotonic() + within
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met within the deadline")
        await asyncio.sleep(0.005)


class Peer:
    """A scripted daemon on a Unix socket, driven by blocking calls from the test."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(path)
        self.listener.listen(8)
        self.listener.settimeout(WITHIN)
        self.sock: socket.socket | None = None
        self.decoder = Decoder()
        self.backlog: list[Any] = []

    def accept(self) -> Peer:
        self.sock, _ = self.listener.accept()
        self.sock.settimeout(WITHIN)
        return self

    def messages(self, n: int) -> list[Any]:
        """The next ``n`` messages the client sent."""
        assert self.sock is not None
        while len(self.backlog) < n:
            data = self.sock.recv(65536)
            assert data, "the client closed the connection"
            self.decoder.feed(data)
            self.backlog.extend(self.decoder)
        out, self.backlog = self.backlog[:n], self.backlog[n:]
        return out

    def requests(self, n: int) -> list[Request]:
        reqs = self.messages(n)
        assert all(isinstance(r, Request) for r in reqs), reqs
        return reqs

    def send(self, *frames: bytes) -> None:
        assert self.sock is not None
        self.sock.sendall(b"".join(frames))

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
        self.listener.close()


def respond(req: Request, result: Any = None, error: Any = None) -> bytes:
    return encode_response(req.msgid, error, result)


def note(method: str, *params: Any) -> bytes:
    return encode_notification(method, list(params))


@pytest.fixture
def peer(tmp_path: Path) -> Iterator[Peer]:
    p = Peer(str(tmp_path / "peer.sock"))
    yield p
    p.close()


@pytest.fixture
def blocking(peer: Peer) -> Iterator[BlockingConnection]:
    conn = BlockingConnection(peer.path)
    conn.connect()
    peer.accept()
    yield conn
    conn.close()


@pytest.fixture
def pool() -> Iterator[concurrent.futures.ThreadPoolExecutor]:
    with concurrent.futures.ThreadPoolExecutor(max_workers=16) as executor:
        yield executor


# -- the blocking connection ----------------------------------------------------------------


def test_blocking_responses_reach_the_thread_that_asked(
    blocking: BlockingConnection, peer: Peer, pool: concurrent.futures.ThreadPoolExecutor
) -> None:
    calls = {i: pool.submit(blocking.call, "echo", [{"n": i}]) for i in range(12)}
    reqs = peer.requests(12)
    assert len({r.msgid for r in reqs}) == 12
    random.Random(7).shuffle(reqs)
    for req in reqs:  # one at a time, in a scrambled order, some in one write
        peer.send(respond(req, {"n": req.params[0]["n"]}))
    for i, fut in calls.items():
        assert fut.result(WITHIN) == {"n": i}
    assert blocking._router.pending == {}


def test_blocking_error_reply_raises_its_class_and_keeps_the_connection(
    blocking: BlockingConnection, peer: Peer, pool: concurrent.futures.ThreadPoolExecutor
) -> None:
    fut = pool.submit(blocking.call, "sandbox.get", [{"id": "x"}])
    [req] = peer.requests(1)
    peer.send(respond(req, error=["not_found", "No sandbox named 'x'.", {"id": "x"}]))
    with pytest.raises(NotFound) as info:
        fut.result(WITHIN)
    assert (info.value.message, info.value.data) == ("No sandbox named 'x'.", {"id": "x"})
    assert blocking.connected


def test_blocking_peer_going_away_fails_every_waiter(
    blocking: BlockingConnection, peer: Peer, pool: concurrent.futures.ThreadPoolExecutor
) -> None:
    channel = blocking.open_channel(["exec.output"], key="e1")
    calls = [pool.submit(blocking.call, "slow", [{"n": i}]) for i in range(6)]
    pulled = pool.submit(channel.get)
    peer.requests(6)
    start = time.monotonic()
    peer.sock.close()  # type: ignore[union-attr]
    for fut in [*calls, pulled]:
        with pytest.raises(ConnectionLost):
            fut.result(WITHIN)
    assert time.monotonic() - start < 2.0
    assert blocking.closed and not blocking.connected
    start = time.monotonic()
    with pytest.raises(ConnectionLost):
        blocking.call("after", [])
    assert time.monotonic() - start < 0.1


def test_blocking_close_from_another_thread_fails_the_waiters(
    blocking: BlockingConnection, peer: Peer, pool: concurrent.futures.ThreadPoolExecutor
) -> None:
    calls = [pool.submit(blocking.call, "never", []) for _ in range(3)]
    peer.requests(3)
    blocking.close()
    for fut in calls:
        with pytest.raises(ConnectionLost) as info:
            fut.result(WITHIN)
        assert "closed" in info.value.message
    blocking.close()  # idempotent


def test_blocking_timeout_leaves_the_connection_usable(
    blocking: BlockingConnection, peer: Peer, pool: concurrent.futures.ThreadPoolExecutor
) -> None:
    with pytest.raises(TimeoutError):
        blocking.call("slow", [], timeout=0.05)
    [late] = peer.requests(1)
    assert blocking._router.pending == {}
    fut = pool.submit(blocking.call, "next", [])
    [req] = peer.requests(1)
    peer.send(respond(late, "late"), respond(req, "mine"))
    assert fut.result(WITHIN) == "mine"


def test_blocking_protocol_error_and_garbage_end_the_connection(
    tmp_path: Path, pool: concurrent.futures.ThreadPoolExecutor
) -> None:
    for bad, expect in [(note("protocol.error", ["too_large", "Frame too big.", None]),
                         "Frame too big."),
                        (b"\xc1", "cannot read")]:
        peer = Peer(str(tmp_path / f"p{len(bad)}.sock"))
        conn = BlockingConnection(peer.path)
        try:
            conn.connect()
            peer.accept()
            fut = pool.submit(conn.call, "m", [])
            peer.requests(1)
            peer.send(bad)
            with pytest.raises(ConnectionLost) as info:
                fut.result(WITHIN)
            assert expect in info.value.message
        finally:
            conn.close()
            peer.close()


def test_blocking_callbacks_run_inline_and_may_not_wait_on_the_connection(
    blocking: BlockingConnection, peer: Peer, pool: concurrent.futures.ThreadPoolExecutor
) -> None:
    seen: list[Any] = []
    refused: list[BaseException] = []

    def callback(params: list[Any]) -> None:
        seen.append(params)
        try:
            blocking.call("from.callback", [])
        except RuntimeError as exc:
            refused.append(exc)

    remove = blocking.on_notification("tick", callback)
    fut = pool.submit(blocking.call, "m", [])
    [req] = peer.requests(1)
    peer.send(note("tick", 1), note("other", 2), respond(req, "ok"))
    assert fut.result(WITHIN) == "ok"
    assert seen == [[1]] and len(refused) == 1
    remove()
    fut = pool.submit(blocking.call, "m", [])
    [req] = peer.requests(1)
    peer.send(note("tick", 3), respond(req, "ok"))
    assert fut.result(WITHIN) == "ok"
    assert seen == [[1]]


def test_blocking_connection_starts_no_thread(blocking: BlockingConnection, peer: Peer) -> None:
    before = threading.enumerate()

    def serve() -> None:
        for _ in range(5):
            [req] = peer.requests(1)
            peer.send(respond(req, "pong"))

    server = threading.Thread(target=serve, daemon=True)
    server.start()
    for _ in range(5):
        assert blocking.call("daemon.ping", [], timeout=WITHIN) == "pong"
    server.join(WITHIN)
    assert threading.enumerate() == before
    with pytest.raises(RuntimeError):
        asyncio.get_running_loop()  # and no event loop runs in this thread


def test_blocking_back_pressure_stops_reading_until_the_consumer_reads(
    blocking: BlockingConnection, peer: Peer, pool: concurrent.futures.ThreadPoolExecutor
) -> None:
    channel = blocking.open_channel(["exec.output"], key="e1", maxsize=1)
    fut = pool.submit(blocking.call, "m", [])
    [req] = peer.requests(1)
    peer.send(*(note("exec.output", "e1", "stdout", bytes([i])) for i in range(3)),
              respond(req, "done"))
    poll(lambda: blocking._router.blocked is not None)
    assert not fut.done()  # the reply is behind the notification that does not fit
    got = [channel.get(timeout=WITHIN) for _ in range(3)]
    assert [p[2] for _, p in got] == [b"\x00", b"\x01", b"\x02"]
    assert fut.result(WITHIN) == "done"


def test_blocking_closing_a_full_channel_lets_reading_go_on(
    blocking: BlockingConnection, peer: Peer, pool: concurrent.futures.ThreadPoolExecutor
) -> None:
    channel = blocking.open_channel(["exec.output"], key="e1", maxsize=1)
    waiter = pool.submit(channel.get)
    fut = pool.submit(blocking.call, "m", [])
    [req] = peer.requests(1)
    peer.send(*(note("exec.output", "e1", "stdout", b"x") for _ in range(3)),
              respond(req, "done"))
    assert waiter.result(WITHIN)[0] == "exec.output"
    poll(lambda: blocking._router.blocked is not None)
    channel.close()
    assert fut.result(WITHIN) == "done"
    with pytest.raises(ChannelClosed):
        channel.get(timeout=0)


def test_blocking_on_result_opens_a_keyed_channel_before_the_next_message(
    blocking: BlockingConnection, peer: Peer, pool: concurrent.futures.ThreadPoolExecutor
) -> None:
    def opened(reply: Any) -> Any:
        return blocking.open_channel(["exec.output", "exec.exit"], key=reply["exec_id"])

    fut = pool.submit(blocking.call, "exec.start", [], on_result=opened)
    [req] = peer.requests(1)
    peer.send(respond(req, {"exec_id": "e7"}),  # the reply, and at once its output
              note("exec.output", "e7", "stdout", b"a"),
              note("exec.output", "e8", "stdout", b"not ours"),
              note("exec.output", b"e7", "stderr", b"b"),
              note("exec.exit", "e7", {"exit_code": 0}))
    channel = fut.result(WITHIN)
    items = [channel.get(timeout=WITHIN) for _ in range(3)]
    assert items == [("exec.output", ["e7", "stdout", b"a"]),
                     ("exec.output", [b"e7", "stderr", b"b"]),
                     ("exec.exit", ["e7", {"exit_code": 0}])]
    assert channel.get_nowait() is None
    with pytest.raises(ValueError):
        blocking.open_channel(["exec.exit"], key="e7")
    channel.close()
    blocking.open_channel(["exec.exit"], key="e7").close()  # the key is free again


# -- the asyncio connection -----------------------------------------------------------------


class AsyncPeer:
    """A scripted daemon for the asyncio connection (one client, driven by the test)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.server: asyncio.Server | None = None
        self.connected: asyncio.Queue[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = (
            asyncio.Queue())
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.decoder = Decoder()
        self.backlog: list[Any] = []

    async def start(self) -> None:
        async def accepted(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            await self.connected.put((r, w))

        self.server = await asyncio.start_unix_server(accepted, self.path)

    async def accept(self) -> None:
        async with asyncio.timeout(WITHIN):
            self.reader, self.writer = await self.connected.get()

    async def requests(self, n: int) -> list[Request]:
        assert self.reader is not None
        async with asyncio.timeout(WITHIN):
            while len(self.backlog) < n:
                data = await self.reader.read(65536)
                assert data
                self.decoder.feed(data)
                self.backlog.extend(self.decoder)
        out, self.backlog = self.backlog[:n], self.backlog[n:]
        return out

    def send(self, *frames: bytes) -> None:
        assert self.writer is not None
        self.writer.write(b"".join(frames))

    async def stop(self) -> None:
        if self.writer is not None:
            self.writer.transport.abort()
        if self.server is not None:
            self.server.close()


@pytest.fixture
async def apeer(tmp_path: Path) -> AsyncIterator[AsyncPeer]:
    p = AsyncPeer(str(tmp_path / "apeer.sock"))
    await p.start()
    yield p
    await p.stop()


@pytest.fixture
async def aconn(apeer: AsyncPeer) -> AsyncIterator[AsyncConnection]:
    conn = AsyncConnection(apeer.path)
    await conn.connect()
    await apeer.accept()
    yield conn
    await conn.close()


async def test_async_back_pressure_stops_reading_the_socket(
    aconn: AsyncConnection, apeer: AsyncPeer
) -> None:
    n, size = 300, 64 * 1024
    channel = aconn.open_channel(["exec.output"], key="e1", maxsize=1)
    call = asyncio.create_task(aconn.call("m", []))
    [req] = await apeer.requests(1)
    apeer.send(*(note("exec.output", "e1", "stdout", i.to_bytes(4, "big") * (size // 4))
                 for i in range(n)), respond(req, "done"))
    assert apeer.writer is not None
    transport = apeer.writer.transport
    await apoll(lambda: aconn._router.blocked is not None)
    # The reader now waits for room: the bytes stay on the sending side, not in the client.
    for _ in range(20):
        await asyncio.sleep(0)
    assert not call.done()
    assert transport.get_write_buffer_size() > n * size // 2
    assert aconn._decoder.buffered < 2 * 1024 * 1024
    assert aconn._reader is not None and len(aconn._reader._buffer) < 1024 * 1024  # type: ignore[attr-defined]
    for i in range(n):
        _, params = await channel.get(timeout=WITHIN)
        assert params[2][:4] == i.to_bytes(4, "big")
    assert await asyncio.wait_for(call, WITHIN) == "done"


async def test_async_overflow_channel_drops_and_says_so(
    aconn: AsyncConnection, apeer: AsyncPeer
) -> None:
    channel = aconn.open_channel(["event", "events.lagged"], key="s1", maxsize=2,
                                 when_full="overflow")
    call = asyncio.create_task(aconn.call("m", []))
    [req] = await apeer.requests(1)
    apeer.send(*(note("event", "s1", {"seq": i}) for i in range(5)), respond(req, "done"))
    assert await asyncio.wait_for(call, WITHIN) == "done"  # never blocked
    assert [(await channel.get(timeout=WITHIN))[1][1]["seq"] for _ in range(2)] == [0, 1]
    with pytest.raises(ChannelOverflow):
        await channel.get(timeout=WITHIN)
    assert channel.overflowed and len(channel) == 0


async def test_async_lost_connection_fails_channels_after_their_items(
    aconn: AsyncConnection, apeer: AsyncPeer
) -> None:
    channel = aconn.open_channel(["exec.output"], key="e1")
    waiting = aconn.open_channel(["exec.exit"])
    getter = asyncio.create_task(waiting.get())
    call = asyncio.create_task(aconn.call("m", []))
    await apeer.requests(1)
    apeer.send(note("exec.output", "e1", "stdout", b"last words"))
    await apeer.stop()
    with pytest.raises(ConnectionLost):
        await asyncio.wait_for(call, WITHIN)
    with pytest.raises(ConnectionLost):
        await asyncio.wait_for(getter, WITHIN)
    assert (await channel.get(timeout=WITHIN))[1][2] == b"last words"
    with pytest.raises(ConnectionLost):
        await channel.get(timeout=WITHIN)
    late = aconn.open_channel(["exec.output"], key="e2")  # opened after the loss
    with pytest.raises(ConnectionLost):
        await late.get(timeout=WITHIN)


async def test_async_close_wakes_a_getter_and_unparks_the_reader(
    aconn: AsyncConnection, apeer: AsyncPeer
) -> None:
    idle = aconn.open_channel(["nothing"])
    getter = asyncio.create_task(idle.get())
    await asyncio.sleep(0)
    idle.close()
    with pytest.raises(ChannelClosed):
        await asyncio.wait_for(getter, WITHIN)
    full = aconn.open_channel(["exec.output"], key="e1", maxsize=1)
    call = asyncio.create_task(aconn.call("m", []))
    [req] = await apeer.requests(1)
    apeer.send(*(note("exec.output", "e1", "stdout", b"x") for _ in range(3)),
               respond(req, "done"))
    await apoll(lambda: aconn._router.blocked is not None)
    full.close()
    assert await asyncio.wait_for(call, WITHIN) == "done"


async def test_async_on_result_opens_a_keyed_channel_before_the_next_message(
    aconn: AsyncConnection, apeer: AsyncPeer
) -> None:
    def opened(reply: Any) -> Any:
        return aconn.open_channel(["exec.output", "exec.exit"], key=reply["exec_id"])

    call = asyncio.create_task(aconn.call("exec.start", [], on_result=opened))
    [req] = await apeer.requests(1)
    apeer.send(respond(req, {"exec_id": "e7"}), note("exec.output", "e7", "stdout", b"a"),
               note("exec.exit", "e7", {"exit_code": 3}))
    channel = await asyncio.wait_for(call, WITHIN)
    assert await channel.get(timeout=WITHIN) == ("exec.output", ["e7", "stdout", b"a"])
    assert await channel.get(timeout=WITHIN) == ("exec.exit", ["e7", {"exit_code": 3}])
    with pytest.raises(TimeoutError):
        await channel.get(timeout=0.01)


async def test_async_on_result_that_raises_fails_the_call(
    aconn: AsyncConnection, apeer: AsyncPeer
) -> None:
    def broken(reply: Any) -> Any:
        raise KeyError("exec_id")

    call = asyncio.create_task(aconn.call("exec.start", [], on_result=broken))
    [req] = await apeer.requests(1)
    apeer.send(respond(req, {}))
    with pytest.raises(KeyError):
        await asyncio.wait_for(call, WITHIN)
    assert aconn.connected


def test_channel_buffer_rules() -> None:
    with pytest.raises(ValueError):
        ChannelBuffer(0)
    with pytest.raises(ValueError):
        ChannelBuffer(1, "drop")  # type: ignore[arg-type]
    ch = ChannelBuffer(2)
    assert ch.offer(("m", [1])) and ch.offer(("m", [2]))
    assert not ch.offer(("m", [3]))  # full: the router must park it
    assert ch.get_nowait() == ("m", [1])
    assert ch.offer(("m", [3]))
    ch.fail(ConnectionLost("gone"))
    assert [ch.get_nowait(), ch.get_nowait()] == [("m", [2]), ("m", [3])]
    for _ in range(2):  # raised again and again, a fresh exception each time
        with pytest.raises(ConnectionLost):
            ch.get_nowait()
    ch.close()
    with pytest.raises(ChannelClosed):
        ch.get_nowait()
    ch.close()  # idempotent


def test_unmatched_and_daemon_requests_are_handled(
    blocking: BlockingConnection, peer: Peer, pool: concurrent.futures.ThreadPoolExecutor
) -> None:
    fut = pool.submit(blocking.call, "m", [])
    [req] = peer.requests(1)
    peer.send(encode_request(9, "client.method", []),
              encode_response(req.msgid + 100, None, "stray"), respond(req, "mine"))
    assert fut.result(WITHIN) == "mine"
    [answer] = peer.messages(1)
    assert isinstance(answer, Response)
    assert answer.msgid == 9 and answer.error[0] == "method_not_found"


# -- connecting while the daemon's listen queue is full ---------------------------------------

class FullQueue:
    """A listener whose queue (one slot) is taken by a connection nobody accepts yet:
    connect() fails with EAGAIN until ``free()`` accepts it."""

    def __init__(self, path: str) -> None:
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(path)
        self.listener.listen(0)
        self.filler = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.filler.connect(path)
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        probe.setblocking(False)
        with pytest.raises(BlockingIOError), probe:
            probe.connect(path)  # the queue really is full
        self.accepted: list[socket.socket] = []

    def free_later(self, delay: float) -> threading.Thread:
        """Accept every queued connection after ``delay`` (the daemon catching up)."""
        def run() -> None:
            time.sleep(delay)
            self.listener.settimeout(WITHIN)
            for _ in range(2):  # the filler, then the client
                self.accepted.append(self.listener.accept()[0])
        thread = threading.Thread(target=run)
        thread.start()
        return thread

    def close(self) -> None:
        for sock in [*self.accepted, self.filler, self.listener]:
            sock.close()


@pytest.fixture
def full_queue(tmp_path: Path) -> Iterator[tuple[str, FullQueue]]:
    path = str(tmp_path / "full.sock")
    queue = FullQueue(path)
    yield path, queue
    queue.close()


def test_blocking_connect_waits_while_the_listen_queue_is_full(
    full_queue: tuple[str, FullQueue],
) -> None:
    path, queue = full_queue
    thread = queue.free_later(0.3)
    conn = BlockingConnection(path, connect_timeout=WITHIN)
    try:
        conn.connect()  # EAGAIN at first: retried, not reported
        thread.join()
        assert conn.connected and len(queue.accepted) == 2
        conn.notify("hello", [])
        assert queue.accepted[1].recv(100) == encode_notification("hello", [])
    finally:
        conn.close()
        thread.join()


def test_blocking_connect_to_a_queue_that_stays_full_fails_at_its_timeout(
    full_queue: tuple[str, FullQueue],
) -> None:
    path, _ = full_queue
    conn = BlockingConnection(path, connect_timeout=0.3)
    started = time.monotonic()
    with pytest.raises(ConnectFailed, match="Resource temporarily unavailable"):
        conn.connect()
    assert 0.25 < time.monotonic() - started < 2


async def test_async_connect_waits_while_the_listen_queue_is_full(
    full_queue: tuple[str, FullQueue],
) -> None:
    path, queue = full_queue
    thread = queue.free_later(0.3)
    conn = AsyncConnection(path, connect_timeout=WITHIN)
    try:
        await conn.connect()
        await asyncio.to_thread(thread.join)
        assert conn.connected and len(queue.accepted) == 2
        await conn.notify("hello", [])
        queue.accepted[1].settimeout(WITHIN)
        assert queue.accepted[1].recv(100) == encode_notification("hello", [])
    finally:
        await conn.close()
        thread.join()


async def test_async_connect_to_a_queue_that_stays_full_fails_at_its_timeout(
    full_queue: tuple[str, FullQueue],
) -> None:
    path, _ = full_queue
    conn = AsyncConnection(path, connect_timeout=0.3)
    started = time.monotonic()
    with pytest.raises(ConnectFailed):
        await conn.connect()
    assert 0.25 < time.monotonic() - started < 2
