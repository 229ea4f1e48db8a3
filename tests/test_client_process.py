"""The streamed exec process and the chunked files API against scripted peers (no daemon).

The peers of ``test_client_connection`` play the daemon, so the order of
messages on the wire is exact. Covered: output routed per stream and in
arrival order, stdin split into 1 MiB writes sent one at a time, the
buffering rule (a stream under its bound never stops the others; over it,
the connection stops reading until that stream is read), the exit and
``wait``, ``kill``/``resize`` arguments, ``attach`` keeping a replay that
comes with its reply, ``communicate`` (no deadlock on unread output, a
command that stops reading stdin), closing, the blocking twin with one
thread per stream, and files moved in pieces with the right offsets.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import io
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from sandboxd_client import (
    AsyncClient,
    AsyncProcess,
    BlockingProcess,
    Client,
    ExecExit,
    ExecInfo,
    FileInfo,
    UnexpectedReply,
)
from sandboxd_client.channels import FINAL, ChannelBuffer, Lanes
from sandboxd_client.exceptions import ChannelClosed
from test_client_connection import WITHIN, AsyncPeer, Peer, apoll, note, poll, respond

from sandboxd.wire.codec import Request
from sandboxd.wire.errors import ConnectionLost, InvalidParams

pytestmark = pytest.mark.pure

MiB = 1024 * 1024


def out(exec_id: str, stream: str, data: bytes) -> bytes:
    return note("exec.output", exec_id, stream, data)


def exit_(exec_id: str, code: int, timed_out: bool = False) -> bytes:
    return note("exec.exit", exec_id, {"exit_code": code, "timed_out": timed_out,
                                        "duration": 0.5})


def args(req: Request) -> dict[str, Any]:
    return dict(req.params[0]) if req.params else {}


@pytest.fixture
async def apeer(tmp_path: Path) -> AsyncIterator[AsyncPeer]:
    p = AsyncPeer(str(tmp_path / "apeer.sock"))
    await p.start()
    yield p
    await p.stop()


@pytest.fixture
async def client(apeer: AsyncPeer) -> AsyncIterator[AsyncClient]:
    c = AsyncClient(apeer.path)
    await c.connect()
    await apeer.accept()
    yield c
    await c.close()


async def started(client: AsyncClient, apeer: AsyncPeer, *extra: bytes, exec_id: str = "e1",
                  **kwargs: Any) -> tuple[AsyncProcess, dict[str, Any]]:
    """``client.start(...)`` answered by the peer, with ``extra`` frames right after the reply."""
    task = asyncio.create_task(client.start("sb-1", kwargs.pop("cmd", ["cat"]), **kwargs))
    [req] = await apeer.requests(1)
    assert req.method == "exec.start"
    apeer.send(respond(req, {"exec_id": exec_id}), *extra)
    return await asyncio.wait_for(task, WITHIN), args(req)


# -- channels with lanes ------------------------------------------------------------------


def test_lanes_bound_each_lane_by_weight_and_keep_the_final_item() -> None:
    lanes = Lanes(lane_of=lambda item: item[1][0], weigh=lambda item: len(item[1][1]),
                  is_final=lambda item: item[0] == "end")
    ch = ChannelBuffer(4, "block", lanes)
    assert ch.offer(("o", ["a", b"123"])) and ch.offer(("o", ["b", b"1"]))
    assert ch.offer(("o", ["a", b"45678"]))  # under the bound when offered: admitted
    assert not ch.offer(("o", ["a", b"9"]))  # lane a is full now ...
    assert ch.offer(("o", ["b", b"2"]))  # ... lane b is not
    assert ch.weight("a") == 8 and len(ch) == 4
    assert ch.get_nowait("b") == ("o", ["b", b"1"])
    assert ch.get_nowait() == ("o", ["a", b"123"])  # the earliest of any lane
    assert ch.get_nowait(FINAL) is None
    assert ch.offer(("end", [0])) and ch.final == ("end", [0])
    assert ch.offer(("o", ["b", b"late"]))  # after the final item: dropped
    assert ch.get_nowait(FINAL) == ("end", [0])
    assert ch.get_nowait("b") == ("o", ["b", b"2"])
    assert ch.get_nowait("b") == ("end", [0]) == ch.get_nowait("b")  # sticky
    assert ch.get_nowait("a") == ("o", ["a", b"45678"])
    assert ch.get_nowait() == ("end", [0])
    ch.set_maxsize(None)
    with pytest.raises(ValueError):
        ch.set_maxsize(0)


# -- the asyncio process ------------------------------------------------------------------


async def test_output_in_arrival_order_then_the_exit(client: AsyncClient,
                                                     apeer: AsyncPeer) -> None:
    proc, sent = await started(
        client, apeer, out("e1", "stdout", b"a"), out("e1", "stderr", b"b"),
        out("e1", "stdout", b""), out("e1", "stdout", b"c"), out("e2", "stdout", b"other"),
        exit_("e1", 3), cmd=["sh", "-c", "x"], env={"A": "1"}, timeout=5)
    assert sent == {"id": "sb-1", "cmd": ["sh", "-c", "x"], "env": {"A": "1"}, "timeout": 5}
    assert proc.exec_id == "e1" and proc.returncode is None and proc.offset == 0
    got = [chunk async for chunk in proc.output()]
    assert got == [("stdout", b"a"), ("stderr", b"b"), ("stdout", b"c")]
    assert (proc.returncode, proc.timed_out, proc.duration) == (3, False, 0.5)
    assert proc.exit == ExecExit(3, False, 0.5)
    assert await proc.wait() == 3
    assert [chunk async for chunk in proc.output()] == []  # the end stays the end
    assert await proc.stdout.read() == b"" and proc.stdout.at_eof()
    assert "returncode=3" in repr(proc)


async def test_readers_take_their_own_stream(client: AsyncClient, apeer: AsyncPeer) -> None:
    proc, _ = await started(
        client, apeer, out("e1", "stderr", b"E1"), out("e1", "stdout", b"line1\nli"),
        out("e1", "stdout", b"ne2\nrest"), out("e1", "stderr", b"E2"), exit_("e1", 0))
    assert await proc.stdout.read(3) == b"lin"
    assert await proc.stdout.readline() == b"e1\n"
    assert await proc.stdout.readline() == b"line2\n"
    assert not proc.stdout.at_eof()
    assert [c async for c in proc.stdout] == [b"rest"]
    assert proc.stdout.at_eof() and not proc.stderr.at_eof()
    assert await proc.stderr.read() == b"E1E2"
    assert await proc.stdout.readline() == b"" and await proc.stderr.read(5) == b""


async def test_stdin_goes_in_1_mib_writes_one_at_a_time(client: AsyncClient,
                                                        apeer: AsyncPeer) -> None:
    proc, sent = await started(client, apeer, stdin=True)
    assert sent["stdin"] is True
    data = bytes(range(256)) * (10 * MiB // 256 // 4)  # 2.5 MiB
    writing = asyncio.create_task(proc.stdin.write(data))
    received = b""
    for expect in (MiB, MiB, len(data) - 2 * MiB):
        [req] = await apeer.requests(1)
        assert req.method == "exec.write" and args(req)["exec_id"] == "e1"
        assert len(args(req)["data"]) == expect
        received += args(req)["data"]
        with pytest.raises(TimeoutError):  # the next piece waits for this one's reply
            await asyncio.wait_for(apeer.requests(1), 0.05)
        assert not writing.done()
        apeer.send(respond(req, None))
    await asyncio.wait_for(writing, WITHIN)
    assert received == data
    closing = asyncio.create_task(proc.close_stdin())
    [req] = await apeer.requests(1)
    assert (req.method, args(req)) == ("exec.close_stdin", {"exec_id": "e1"})
    apeer.send(respond(req, None))
    await asyncio.wait_for(closing, WITHIN)
    await proc.stdin.close()  # idempotent: nothing sent
    with pytest.raises(ValueError, match="closed"):
        await proc.write(b"more")


async def test_stdin_not_asked_for_is_a_local_error(client: AsyncClient,
                                                    apeer: AsyncPeer) -> None:
    proc, sent = await started(client, apeer)
    assert "stdin" not in sent and proc.stdin.enabled is False
    with pytest.raises(ValueError, match="without stdin=True"):
        await proc.stdin.write(b"x")
    await proc.stdin.close()  # nothing to close: no call


async def test_a_stream_under_its_bound_never_stops_the_other(
    client: AsyncClient, apeer: AsyncPeer
) -> None:
    """Reading only stdout while stderr fills (below ``max_buffer``) goes on, and so do calls."""
    proc, _ = await started(client, apeer, max_buffer=1000)
    apeer.send(*(out("e1", "stderr", b"e" * 100) for _ in range(9)), out("e1", "stdout", b"o"))
    assert await asyncio.wait_for(proc.stdout.read(1), WITHIN) == b"o"
    ping = asyncio.create_task(client.ping())
    [req] = await apeer.requests(1)
    apeer.send(respond(req, "pong"))
    assert await asyncio.wait_for(ping, WITHIN) == "pong"  # the connection still reads
    assert proc._channel.weight("stderr") == 900


async def test_a_full_stream_stops_the_connection_until_it_is_read(
    client: AsyncClient, apeer: AsyncPeer
) -> None:
    proc, _ = await started(client, apeer, max_buffer=1000)
    apeer.send(*(out("e1", "stderr", b"e" * 500) for _ in range(3)), out("e1", "stdout", b"o"))
    await apoll(lambda: client._conn._router.blocked is not None)
    reading = asyncio.create_task(proc.stdout.read())
    ping = asyncio.create_task(client.ping())
    [req] = await apeer.requests(1)
    apeer.send(respond(req, "pong"), exit_("e1", 0))
    await asyncio.sleep(0.05)
    assert not reading.done() and not ping.done()  # behind the third stderr chunk
    assert len(await proc.stderr.read(10_000)) == 500  # room again: reading resumes
    assert await asyncio.wait_for(ping, WITHIN) == "pong"
    assert await asyncio.wait_for(reading, WITHIN) == b"o"
    assert len(await proc.stderr.read()) == 1000


async def test_wait_while_output_is_unread_then_read_it(client: AsyncClient,
                                                        apeer: AsyncPeer) -> None:
    proc, _ = await started(client, apeer, out("e1", "stdout", b"x" * 1000),
                            out("e1", "stderr", b"y"), exit_("e1", 137))
    assert await asyncio.wait_for(proc.wait(), WITHIN) == 137
    assert await proc.stdout.read() == b"x" * 1000 and await proc.stderr.read() == b"y"
    with pytest.raises(TimeoutError):  # a wait that cannot end in time says so
        proc2, _ = await started(client, apeer, exec_id="e2")
        await proc2.wait(timeout=0.05)


async def test_kill_resize_and_signals(client: AsyncClient, apeer: AsyncPeer) -> None:
    proc, _ = await started(client, apeer, tty=True, rows=24, cols=80)
    calls = [proc.kill(), proc.kill(2), proc.terminate(), proc.resize(30, 100)]
    for call, expect in zip(calls, [
        ("exec.kill", {"exec_id": "e1"}), ("exec.kill", {"exec_id": "e1", "signal": 2}),
        ("exec.kill", {"exec_id": "e1", "signal": 15}),
        ("exec.resize", {"exec_id": "e1", "rows": 30, "cols": 100}),
    ], strict=True):
        task = asyncio.create_task(call)
        [req] = await apeer.requests(1)
        assert (req.method, args(req)) == expect
        apeer.send(respond(req, None))
        await asyncio.wait_for(task, WITHIN)


async def test_attach_keeps_a_replay_sent_with_the_reply(client: AsyncClient,
                                                         apeer: AsyncPeer) -> None:
    task = asyncio.create_task(client.attach("e9", offset=5))
    [req] = await apeer.requests(1)
    assert (req.method, args(req)) == ("exec.attach", {"exec_id": "e9", "offset": 5})
    # A replay that overtakes the reply is kept too: the channel opened before the request.
    apeer.send(out("e9", "stdout", b"early"), respond(req, {"offset": 12}),
               out("e9", "stderr", b"late"), exit_("e9", 1))
    proc = await asyncio.wait_for(task, WITHIN)
    assert proc.offset == 12 and proc.stdin.enabled is None
    assert await proc.communicate() == (b"early", b"late")
    assert proc.returncode == 1


async def test_attach_failure_leaves_no_channel(client: AsyncClient, apeer: AsyncPeer) -> None:
    task = asyncio.create_task(client.attach("nope"))
    [req] = await apeer.requests(1)
    apeer.send(respond(req, error=["not_found", "No exec 'nope'.", None]))
    with pytest.raises(Exception, match="No exec"):
        await asyncio.wait_for(task, WITHIN)
    assert client._conn._router._keyed == {}


async def test_communicate_never_waits_on_unread_output(client: AsyncClient,
                                                        apeer: AsyncPeer) -> None:
    """The peer answers each write only after more output than ``max_buffer`` was sent."""
    proc, _ = await started(client, apeer, stdin=True, max_buffer=1000)
    data = b"z" * (2 * MiB + 10)
    talk = asyncio.create_task(proc.communicate(data))
    echoed = b""
    while True:
        [req] = await apeer.requests(1)
        if req.method == "exec.close_stdin":
            apeer.send(respond(req, None), out("e1", "stderr", b"bye"), exit_("e1", 0))
            break
        chunk = args(req)["data"]
        apeer.send(*(out("e1", "stdout", chunk[i:i + 100]) for i in range(0, len(chunk), 100)),
                   respond(req, None))
        echoed += chunk
    assert await asyncio.wait_for(talk, WITHIN) == (data, b"bye")
    assert echoed == data and proc.returncode == 0


async def test_communicate_when_the_command_stops_reading_stdin(
    client: AsyncClient, apeer: AsyncPeer
) -> None:
    proc, _ = await started(client, apeer, stdin=True)
    talk = asyncio.create_task(proc.communicate(b"x" * (3 * MiB)))
    [req] = await apeer.requests(1)
    apeer.send(out("e1", "stdout", b"head"), exit_("e1", 0),
               respond(req, error=["conflict", "The exec has exited.", None]))
    assert await asyncio.wait_for(talk, WITHIN) == (b"head", b"")
    # Other errors are not swallowed.
    proc, _ = await started(client, apeer, stdin=True, exec_id="e2")
    talk = asyncio.create_task(proc.communicate(b"x"))
    [req] = await apeer.requests(1)
    apeer.send(respond(req, error=["invalid_params", "Bad data.", None]))
    with pytest.raises(InvalidParams):
        await asyncio.wait_for(talk, WITHIN)


async def test_a_timed_out_communicate_loses_no_output(client: AsyncClient,
                                                      apeer: AsyncPeer) -> None:
    proc, _ = await started(client, apeer, out("e1", "stdout", b"one"),
                            out("e1", "stderr", b"e"))
    with pytest.raises(TimeoutError):
        await proc.communicate(timeout=0.05)
    apeer.send(out("e1", "stdout", b"two"), exit_("e1", 0))
    assert await asyncio.wait_for(proc.communicate(), WITHIN) == (b"onetwo", b"e")
    proc, _ = await started(client, apeer, out("e2", "stdout", b"par"), exec_id="e2")
    reading = asyncio.create_task(proc.stdout.readline())
    await apoll(lambda: proc._channel.weight("stdout") == 0)
    reading.cancel()
    with pytest.raises(asyncio.CancelledError):
        await reading
    apeer.send(out("e2", "stdout", b"tial\n"), exit_("e2", 0))
    assert await asyncio.wait_for(proc.stdout.readline(), WITHIN) == b"partial\n"


async def test_aclose_stops_following_and_wait_asks_the_daemon(
    client: AsyncClient, apeer: AsyncPeer
) -> None:
    proc, _ = await started(client, apeer, max_buffer=10)
    await proc.aclose()
    assert not proc.following
    apeer.send(*(out("e1", "stdout", b"dropped!!") for _ in range(5)))  # never blocks
    waiting = asyncio.create_task(proc.wait())
    [req] = await apeer.requests(1)
    assert (req.method, args(req)) == ("exec.wait", {"exec_id": "e1"})
    apeer.send(respond(req, {"exit_code": 4, "timed_out": True, "duration": 1}))
    assert await asyncio.wait_for(waiting, WITHIN) == 4 and proc.timed_out is True
    with pytest.raises(ChannelClosed):
        await proc.stdout.read()


async def test_the_exit_frees_the_routing_key(client: AsyncClient, apeer: AsyncPeer) -> None:
    proc, _ = await started(client, apeer, exit_("e1", 0))
    await asyncio.wait_for(proc.wait(), WITHIN)
    assert client._conn._router._keyed == {}
    task = asyncio.create_task(client.attach("e1"))  # the same exec may be followed again
    [req] = await apeer.requests(1)
    apeer.send(respond(req, {"offset": 0}))
    await asyncio.wait_for(task, WITHIN)


async def test_a_lost_connection_ends_reads_after_buffered_output(
    client: AsyncClient, apeer: AsyncPeer
) -> None:
    proc, _ = await started(client, apeer, out("e1", "stdout", b"last"))
    await apoll(lambda: proc._channel.weight("stdout") == 4)
    await apeer.stop()
    with pytest.raises(ConnectionLost):
        await asyncio.wait_for(proc.wait(), WITHIN)
    assert await proc.stdout.read(10) == b"last"
    with pytest.raises(ConnectionLost):
        await proc.stdout.read()


async def test_bad_start_replies_and_argv(client: AsyncClient, apeer: AsyncPeer) -> None:
    with pytest.raises(TypeError):
        await client.start("sb-1", "echo hi")
    task = asyncio.create_task(client.start("sb-1", ["true"]))
    [req] = await apeer.requests(1)
    apeer.send(respond(req, {"no": "id"}))
    with pytest.raises(UnexpectedReply):
        await asyncio.wait_for(task, WITHIN)
    assert client._conn._router._keyed == {}


async def test_exec_list_and_files_metadata(client: AsyncClient, apeer: AsyncPeer) -> None:
    task = asyncio.create_task(client.exec_list("sb-1"))
    [req] = await apeer.requests(1)
    assert (req.method, args(req)) == ("exec.list", {"id": "sb-1"})
    apeer.send(respond(req, [{"exec_id": "e1", "cmd": ["sleep", "9"], "running": False,
                              "exit_code": 0, "detached": True, "tty": False,
                              "started_at": "2026-11-26T15:04:05.123Z", "new": 1}]))
    [info] = await asyncio.wait_for(task, WITHIN)
    assert info == ExecInfo("e1", ["sleep", "9"], False, 0, True, False,
                            "2026-11-26T15:04:05.123Z", {"new": 1})
    task = asyncio.create_task(client.stat("sb-1", "/a"))
    [req] = await apeer.requests(1)
    apeer.send(respond(req, {"name": "a", "size": 3, "mode": 0o100644, "is_dir": False,
                             "mtime": "2026-11-26T15:04:05.123Z"}))
    assert await asyncio.wait_for(task, WITHIN) == FileInfo(
        "a", 3, 0o100644, False, "2026-11-26T15:04:05.123Z")
    task = asyncio.create_task(client.listdir("sb-1", "/"))
    [req] = await apeer.requests(1)
    assert (req.method, args(req)) == ("files.list", {"id": "sb-1", "path": "/"})
    apeer.send(respond(req, [{"name": "d", "size": 0, "mode": 0o40755, "is_dir": True,
                              "mtime": 1.5}]))
    [entry] = await asyncio.wait_for(task, WITHIN)
    assert entry.is_dir and entry.mtime == 1.5


# -- files ------------------------------------------------------------------------------


class Trickle(io.RawIOBase):
    """A pipe-like source that returns at most 100 KiB per read."""

    def __init__(self, data: bytes) -> None:
        self.data = memoryview(data)

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        n = min(size if size >= 0 else len(self.data), 100 * 1024)
        piece, self.data = bytes(self.data[:n]), self.data[n:]
        return piece


@pytest.mark.parametrize("kind", ["bytes", "file", "trickle", "empty"])
async def test_write_file_goes_in_pieces_at_their_offsets(
    client: AsyncClient, apeer: AsyncPeer, kind: str
) -> None:
    data = b"" if kind == "empty" else bytes(range(256)) * (10 * MiB // 256 // 4)
    source: Any = {"bytes": data, "empty": data, "file": io.BytesIO(data),
                   "trickle": Trickle(data)}[kind]
    task = asyncio.create_task(client.write_file("sb-1", "/w/f", source, mode=0o755))
    got, calls = b"", []
    while True:
        [req] = await apeer.requests(1)
        a = args(req)
        calls.append({k: v for k, v in a.items() if k != "data"})
        got += a["data"]
        apeer.send(respond(req, None))
        if len(a["data"]) < MiB:
            break
    assert await asyncio.wait_for(task, WITHIN) == len(data) == len(got)
    assert got == data
    base = {"id": "sb-1", "path": "/w/f"}
    expect = [{**base, "mode": 0o755}] + [{**base, "offset": i * MiB}
                                          for i in range(1, len(calls))]
    assert calls == expect
    assert len(calls) == (1 if kind == "empty" else 3)


@pytest.mark.parametrize("size", [0, 2 * MiB, 2 * MiB + 7])
async def test_read_file_into_reads_until_a_short_piece(
    client: AsyncClient, apeer: AsyncPeer, size: int
) -> None:
    content = bytes(range(256)) * (size // 256) + b"x" * (size % 256)
    sink = io.BytesIO()
    task = asyncio.create_task(client.read_file_into("sb-1", "/r", sink))
    offsets = []
    while True:
        [req] = await apeer.requests(1)
        a = args(req)
        assert (req.method, a["id"], a["path"], a["length"]) == ("files.read", "sb-1", "/r", MiB)
        offsets.append(a["offset"])
        piece = content[a["offset"]:a["offset"] + a["length"]]
        apeer.send(respond(req, piece))
        if len(piece) < MiB:
            break
    assert await asyncio.wait_for(task, WITHIN) == size
    assert sink.getvalue() == content
    assert offsets == list(range(0, size + 1, MiB))


# -- the blocking twin --------------------------------------------------------------------


@pytest.fixture
def peer(tmp_path: Path) -> Iterator[Peer]:
    p = Peer(str(tmp_path / "peer.sock"))
    yield p
    p.close()


@pytest.fixture
def bclient(peer: Peer) -> Iterator[Client]:
    c = Client(peer.path)
    peer.accept()
    yield c
    c.close()


@pytest.fixture
def pool() -> Iterator[concurrent.futures.ThreadPoolExecutor]:
    with concurrent.futures.ThreadPoolExecutor(max_workers=8) as executor:
        yield executor


def bstarted(bclient: Client, peer: Peer, pool: concurrent.futures.ThreadPoolExecutor,
             **kwargs: Any) -> BlockingProcess:
    fut = pool.submit(bclient.start, "sb-1", ["cat"], **kwargs)
    [req] = peer.requests(1)
    peer.send(respond(req, {"exec_id": "b1"}))
    return fut.result(WITHIN)


def test_blocking_process_one_thread_per_stream(
    bclient: Client, peer: Peer, pool: concurrent.futures.ThreadPoolExecutor
) -> None:
    proc = bstarted(bclient, peer, pool, max_buffer=100)
    assert isinstance(proc, BlockingProcess)
    outs = pool.submit(proc.stdout.read)
    errs = pool.submit(lambda: b"".join(proc.stderr))
    frames = []
    for i in range(50):  # far over max_buffer on both streams, interleaved
        frames += [out("b1", "stdout", bytes([i]) * 60), out("b1", "stderr", bytes([i]) * 70)]
    peer.send(*frames, exit_("b1", 2))
    assert outs.result(WITHIN) == b"".join(bytes([i]) * 60 for i in range(50))
    assert errs.result(WITHIN) == b"".join(bytes([i]) * 70 for i in range(50))
    assert proc.wait(timeout=WITHIN) == 2


def test_blocking_write_and_read_from_two_threads(
    bclient: Client, peer: Peer, pool: concurrent.futures.ThreadPoolExecutor
) -> None:
    """A writer thread and a reader thread share the connection (what the CLI does)."""
    proc = bstarted(bclient, peer, pool, stdin=True, max_buffer=1000)
    data = b"q" * (3 * MiB)
    writer = pool.submit(lambda: (proc.stdin.write(data), proc.stdin.close()))
    reader = pool.submit(lambda: [c for _, c in proc.output()])

    def serve() -> None:
        while True:
            [req] = peer.requests(1)
            if req.method == "exec.close_stdin":
                peer.send(respond(req, None), exit_("b1", 0))
                return
            chunk = args(req)["data"]
            peer.send(*(out("b1", "stdout", chunk[i:i + 4096])
                        for i in range(0, len(chunk), 4096)), respond(req, None))

    server = pool.submit(serve)
    server.result(WITHIN)
    writer.result(WITHIN)
    assert b"".join(reader.result(WITHIN)) == data
    assert proc.returncode == 0


def test_blocking_communicate(
    bclient: Client, peer: Peer, pool: concurrent.futures.ThreadPoolExecutor
) -> None:
    proc = bstarted(bclient, peer, pool, stdin=True, max_buffer=10)
    talk = pool.submit(proc.communicate, b"abc")
    [req] = peer.requests(1)
    assert req.method == "exec.write"
    peer.send(*(out("b1", "stdout", b"0123456789") for _ in range(10)), respond(req, None))
    [req] = peer.requests(1)
    assert req.method == "exec.close_stdin"
    peer.send(respond(req, None), exit_("b1", 5))
    assert talk.result(WITHIN) == (b"0123456789" * 10, b"")
    assert proc.returncode == 5
    poll(lambda: bclient._conn._router._keyed == {})
