"""Attacks on the socket from one local user, and the limits that hold against them.

Each test starts a daemon with small limits and attacks it as a real client
would (raw sockets, from a non-admin uid where it matters): holding
connections, one write full of requests, messages that declare more than
they will ever send, half messages, one byte a second, and never reading.
After each attack the daemon still answers root, its engine connections
stayed bounded, and its memory is back near where it started.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import msgpack
import pytest
from conftest import Daemon, call_on, raw_call, reachable, run_as

SpawnDaemon = Callable[..., Daemon]
USER = 65534

LIMITS = """
[limits]
max_connections = 48
max_connections_per_uid = 8
admin_connections = 8
max_in_flight = 64
frame_timeout = 2
idle_timeout = 3
write_timeout = 2
max_input_total = "48m"
"""


def rss(pid: int) -> int:
    """Resident memory of a process, bytes."""
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def sockets_of(pid: int) -> int:
    count = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):
            if os.readlink(f"/proc/{pid}/fd/{fd}").startswith("socket:"):
                count += 1
    return count


def connect(path: str, timeout: float = 10) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    sock.connect(path)
    return sock


def read_until_closed(sock: socket.socket, within: float) -> list[Any]:
    """Every message until the daemon closes the connection (fails after ``within``)."""
    sock.settimeout(within)
    unpacker = msgpack.Unpacker(raw=False)
    out: list[Any] = []
    while True:
        data = sock.recv(1 << 16)
        if not data:
            return out
        unpacker.feed(data)
        out.extend(unpacker)


def root_pings(d: Daemon) -> bool:
    return bool(raw_call(d.socket, "daemon.ping", timeout=5) == [1, 1, None, "pong"])


@pytest.fixture
def limited(spawn_daemon: SpawnDaemon) -> Iterator[Daemon]:
    yield reachable(spawn_daemon(config=LIMITS))


def _hold_connections(path: str, count: int) -> dict[str, Any]:
    """As another user: open ``count`` connections; a refused one is told so at once (read
    before sending anything), an admitted one answers a ping. Report both."""
    held: list[socket.socket] = []
    refused: list[Any] = []
    answered: list[Any] = []
    for _ in range(count):
        sock = connect(path, timeout=5)
        try:
            refused.append(read_until_closed(sock, 0.3))
            sock.close()
            continue
        except TimeoutError:
            pass  # nothing said: admitted
        held.append(sock)
        answered.append(call_on(sock, [0, 1, "daemon.ping", []], 5))
    for sock in held:
        sock.close()
    return {"held": len(held), "refused": refused, "answered": answered}


def test_one_user_cannot_take_every_connection(limited: Daemon) -> None:
    d = limited
    assert d.proc is not None
    report = run_as(USER, _hold_connections, d.socket, 200)
    assert report["held"] == 8  # max_connections_per_uid
    assert report["answered"] == [[1, 1, None, "pong"]] * 8
    assert len(report["refused"]) == 192
    first = report["refused"][0]
    assert first[0][:2] == [2, "protocol.error"] and first[0][2][0][0] == "quota_exceeded"
    assert "most allowed per user" in first[0][2][0][1]
    assert root_pings(d)
    refusal_lines = [e for e in d.log_events() if e.get("event") == "connections_refused"]
    assert 1 <= len(refusal_lines) <= 2  # bounded, not one line per refused connection


def test_the_last_slots_are_kept_for_root(limited: Daemon) -> None:
    d = limited
    held: list[socket.socket] = []
    try:
        # Take every slot a non-admin may use (48 - 8 kept for admins).
        for _ in range(40):
            held.append(connect(d.socket))
        assert call_on(held[0], [0, 1, "daemon.ping", []], 5) == [1, 1, None, "pong"]
        report = run_as(USER, _hold_connections, d.socket, 3)
        assert report["held"] == 0  # the rest are kept for root and admins
        assert "not admins" in report["refused"][0][0][2][0][1]
        assert root_pings(d)
    finally:
        for sock in held:
            sock.close()


def _burst(path: str, count: int) -> list[int]:
    sock = connect(path, timeout=60)
    frames = b"".join(msgpack.packb([0, i, "daemon.info", []]) for i in range(count))
    sock.sendall(frames)
    unpacker = msgpack.Unpacker(raw=False)
    ids: list[int] = []
    while len(ids) < count:
        data = sock.recv(1 << 16)
        assert data, f"closed after {len(ids)} replies"
        unpacker.feed(data)
        ids.extend(msg[1] for msg in unpacker)
    sock.close()
    return ids


def test_one_write_of_thousands_of_calls_keeps_engine_connections_bounded(
    spawn_daemon: SpawnDaemon,
) -> None:
    d = spawn_daemon(config="engine_concurrency = 8\n" + LIMITS)
    assert d.proc is not None
    baseline = sockets_of(d.proc.pid)
    peak = baseline
    result: list[list[int]] = []
    worker = threading.Thread(target=lambda: result.append(_burst(d.socket, 1000)))
    worker.start()
    while worker.is_alive():
        peak = max(peak, sockets_of(d.proc.pid))
        time.sleep(0.002)
    worker.join()
    assert sorted(result[0]) == list(range(1000))
    # The client's own connection, plus at most engine_concurrency calls to the engine.
    assert peak - baseline <= 1 + 8, (baseline, peak)
    assert root_pings(d)


def _declare_huge(path: str, count: int) -> list[Any]:
    replies = []
    for i in range(count):
        sock = connect(path)
        # A request whose one argument declares 2 GiB of bin, then some of it.
        head = b"\x94\x00" + msgpack.packb(i) + b"\xabfiles.write\x91\x81\xa4data\xc6"
        sock.sendall(head + (2**31).to_bytes(4, "big") + b"x" * 65536)
        replies.append(read_until_closed(sock, 10))
        sock.close()
    return replies


def test_a_declared_huge_argument_is_refused_at_its_header(limited: Daemon) -> None:
    d = limited
    assert d.proc is not None
    before = rss(d.proc.pid)
    replies = run_as(USER, _declare_huge, d.socket, 60)
    for i, msgs in enumerate(replies):
        assert msgs[0][:2] == [1, i] and msgs[0][2][0] == "too_large", msgs
        assert "declares a bin of 2147483648 bytes" in msgs[0][2][1]
    assert rss(d.proc.pid) < before + 32 * 1024 * 1024
    assert root_pings(d)


def _hold_partial(path: str, count: int, size: int) -> dict[str, Any]:
    socks = []
    for i in range(count):
        sock = connect(path)
        sock.setblocking(False)
        head = b"\x94\x00" + msgpack.packb(i) + b"\xabfiles.write\x91\x81\xa4data\xc6"
        data = head + size.to_bytes(4, "big") + b"y" * (size - 1)  # one byte short
        sent = 0
        deadline = time.monotonic() + 2
        while sent < len(data) and time.monotonic() < deadline:
            try:
                sent += sock.send(data[sent : sent + (1 << 20)])
            except BlockingIOError:
                time.sleep(0.01)  # the daemon stopped reading us: its budget is full
        socks.append((sock, sent))
    total = sum(sent for _, sent in socks)
    for sock, _ in socks:
        sock.close()
    return {"sent": total}


def test_partial_input_is_bounded_per_connection_and_in_total(limited: Daemon) -> None:
    d = limited
    assert d.proc is not None
    before = rss(d.proc.pid)
    peak_box: list[int] = []
    done = threading.Event()

    def watch() -> None:
        peak = 0
        while not done.is_set():
            peak = max(peak, rss(d.proc.pid))  # type: ignore[union-attr]
            time.sleep(0.01)
        peak_box.append(peak)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        for _ in range(2):  # 8 connections per uid: two rounds of 8 x 15 MiB
            run_as(USER, _hold_partial, d.socket, 8, 15 * 1024 * 1024)
    finally:
        done.set()
        watcher.join()
    # max_input_total is 48 MiB: what is held never grows much past it.
    assert peak_box[0] - before < 48 * 1024 * 1024 + 40 * 1024 * 1024, (before, peak_box)
    deadline = time.monotonic() + 10
    while rss(d.proc.pid) > before + 16 * 1024 * 1024:
        assert time.monotonic() < deadline, f"RSS stayed at {rss(d.proc.pid)} (was {before})"
        time.sleep(0.1)
    assert root_pings(d)


def test_half_a_message_then_silence_is_closed(limited: Daemon) -> None:
    d = limited
    sock = connect(d.socket)
    started = time.monotonic()
    sock.sendall(msgpack.packb([0, 1, "daemon.ping", []])[:3])
    msgs = read_until_closed(sock, 10)
    took = time.monotonic() - started
    assert 1.5 < took < 5, took
    assert msgs and msgs[0][:2] == [2, "protocol.error"]
    assert "not finished within 2 s" in msgs[0][2][0][1]
    sock.close()


def test_one_byte_a_second_is_closed(limited: Daemon) -> None:
    d = limited
    sock = connect(d.socket)
    frame = msgpack.packb([0, 1, "daemon.ping", [{"pad": "x" * 50}]])
    started = time.monotonic()
    closed = False
    for byte in frame:
        try:
            sock.sendall(bytes([byte]))
        except OSError:
            closed = True
            break
        sock.settimeout(0.5)
        try:
            if sock.recv(65536) == b"":
                closed = True
                break
        except TimeoutError:
            pass
        except OSError:
            closed = True
            break
    assert closed and time.monotonic() - started < 6
    sock.close()


def test_an_idle_connection_is_closed_but_a_subscriber_is_not(limited: Daemon) -> None:
    d = limited
    idle = connect(d.socket)
    subscriber = connect(d.socket)
    reply = call_on(subscriber, [0, 1, "events.subscribe", [{"types": ["nothing.*"]}]], 5)
    assert reply[2] is None
    started = time.monotonic()
    msgs = read_until_closed(idle, 10)
    assert 2.5 < time.monotonic() - started < 6
    assert "idle" in msgs[0][2][0][1]
    assert call_on(subscriber, [0, 2, "daemon.ping", []], 5) == [1, 2, None, "pong"]
    idle.close()
    subscriber.close()


def test_a_client_that_never_reads_is_cut_and_its_memory_returned(limited: Daemon) -> None:
    d = limited
    assert d.proc is not None
    before = rss(d.proc.pid)
    sock = connect(d.socket)
    sock.setblocking(False)
    request = msgpack.packb([0, 1, "daemon.ping", []])
    burst = request * 4096
    stalled_since = None
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:  # send until the daemon has stopped reading us
        try:
            sock.send(burst)
            stalled_since = None
        except BlockingIOError:
            stalled_since = stalled_since or time.monotonic()
            if time.monotonic() - stalled_since > 0.5:
                break
            time.sleep(0.01)
    peak = rss(d.proc.pid)
    assert peak - before < 16 * 1024 * 1024, (before, peak)  # replies held are bounded
    # It reads nothing for write_timeout (2 s): cut.
    deadline = time.monotonic() + 10
    while True:
        try:
            sock.send(request)
        except (BrokenPipeError, ConnectionResetError):
            break
        except BlockingIOError:
            pass
        assert time.monotonic() < deadline, "the non-reading client was never cut"
        time.sleep(0.1)
    sock.close()
    deadline = time.monotonic() + 10
    while rss(d.proc.pid) > before + 8 * 1024 * 1024:
        assert time.monotonic() < deadline, f"RSS stayed at {rss(d.proc.pid)} (was {before})"
        time.sleep(0.1)
    assert root_pings(d)
