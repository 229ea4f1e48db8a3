"""Events end to end: a real daemon, real sandboxes, raw and library subscribers.

Lifecycle events in order, the types filter, ``since`` across a daemon
restart (and ``client.events()`` riding through it), a subscriber that never
reads while ~10,000 events flow, and ``sandboxctl events``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import msgpack
import pytest
from conftest import ROOT, Daemon, MakeSandbox, raw_call
from sandboxd_client import Event, SandboxClient

SpawnDaemon = Callable[..., Daemon]
TIME_RE = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")
EVENT_KEYS = {"seq", "time", "type", "sandbox_id", "sandbox_name", "owner_uid", "data"}


class Raw:
    """A blocking raw msgpack-RPC connection (usable from a thread)."""

    def __init__(self, path: str, timeout: float = 30.0) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(path)
        self.unpacker = msgpack.Unpacker(raw=False)
        self.msgid = 0

    def send(self, method: str, args: dict[str, Any] | None = None) -> int:
        self.msgid += 1
        self.sock.sendall(msgpack.packb([0, self.msgid, method, [args] if args else []],
                                        use_bin_type=True))
        return self.msgid

    def recv(self) -> Any:
        """The next message; None when the daemon closed the connection."""
        while True:
            for obj in self.unpacker:
                return obj
            data = self.sock.recv(1 << 20)
            if not data:
                return None
            self.unpacker.feed(data)

    def call(self, method: str, args: dict[str, Any] | None = None) -> Any:
        msgid = self.send(method, args)
        while True:
            msg = self.recv()
            assert msg is not None, "the daemon closed the connection"
            if msg[0] == 1 and msg[1] == msgid:
                assert msg[2] is None, msg[2]
                return msg[3]

    def close(self) -> None:
        self.sock.close()


async def collect(stream: Any, until: Callable[[Event], bool], limit: float = 30) -> list[Event]:
    """Events from ``stream`` up to and including the first for which ``until`` is true."""
    out: list[Event] = []
    async with asyncio.timeout(limit):
        while True:
            ev = await anext(stream)
            out.append(ev)
            if until(ev):
                return out


async def test_lifecycle_events_in_order(client: SandboxClient, make_sandbox: MakeSandbox) -> None:
    wire: list[list[Any]] = []
    async with SandboxClient(client.path) as watcher:
        raw_sub = await watcher.call("events.subscribe")
        assert set(raw_sub) == {"subscription", "last_seq"}
        watcher.on_notification("event", wire.append)
        stream = await client.events().start()
        async with stream:
            sb = await make_sandbox()
            await sb.pause()
            await sb.resume()
            await sb.extend(120)
            result = await sb.exec(["sh", "-c", "exit 3"])
            assert result.exit_code == 3
            await sb.remove()
            events = await collect(stream, lambda e: e.type == "sandbox.removed"
                                   and e.sandbox_id == sb.id)
    mine = [e for e in events if e.sandbox_id == sb.id]
    assert [e.type for e in mine] == [
        "sandbox.created", "sandbox.paused", "sandbox.resumed", "sandbox.extended",
        "exec.started", "exec.exited", "sandbox.removed",
    ]
    seqs = [e.seq for e in events]
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs)))  # admin: every event, no gap
    assert seqs[0] == raw_sub["last_seq"] + 1 or seqs[0] > raw_sub["last_seq"]
    assert all(e.sandbox_name == sb.name and e.owner_uid == os.getuid() for e in mine)
    assert all(TIME_RE.match(e.time) for e in mine)
    assert mine[3].data["ttl"] == 120
    assert mine[5].data["exit_code"] == 3

    # The raw wire form (checked on a second connection, which saw the same events).
    notes = [p for p in wire if p[0] == raw_sub["subscription"]]
    by_seq = {p[1]["seq"]: p[1] for p in notes}
    for ev in mine:
        assert set(by_seq[ev.seq]) == EVENT_KEYS
        assert by_seq[ev.seq]["type"] == ev.type


async def test_types_filter_with_prefix(client: SandboxClient, make_sandbox: MakeSandbox) -> None:
    stream = client.events(types=["sandbox.*"])
    only_exec = client.events(types=["exec.exited"])
    async with stream, only_exec:
        await anext_after_subscribe(stream, only_exec)
        sb = await make_sandbox()
        await sb.exec(["true"])
        await sb.remove()
        events = await collect(stream, lambda e: e.type == "sandbox.removed"
                               and e.sandbox_id == sb.id)
        exited = await collect(only_exec, lambda e: e.sandbox_id == sb.id)
    assert all(e.type.startswith("sandbox.") for e in events)
    assert [e.type for e in events if e.sandbox_id == sb.id] == [
        "sandbox.created", "sandbox.removed"]
    assert [e.type for e in exited] == ["exec.exited"]


async def anext_after_subscribe(*streams: Any) -> None:
    """Make sure each stream is subscribed (without consuming an event)."""
    for stream in streams:
        await stream.start()


async def test_sandbox_and_label_filters(client: SandboxClient, make_sandbox: MakeSandbox) -> None:
    by_label = client.events(labels={"evtest": "yes"})
    async with by_label:
        await anext_after_subscribe(by_label)
        plain = await make_sandbox()
        tagged = await make_sandbox(labels={"evtest": "yes"})
        by_name = client.events(sandbox=tagged.name, since=0)
        async with by_name:
            await plain.remove()
            await tagged.remove()
            named = await collect(by_name, lambda e: e.type == "sandbox.removed")
        labelled = await collect(by_label, lambda e: e.type == "sandbox.removed")
    assert {e.sandbox_id for e in named} == {tagged.id}
    assert [e.type for e in named] == ["sandbox.created", "sandbox.removed"]
    assert {e.sandbox_id for e in labelled} == {tagged.id}


async def test_unsubscribe_and_errors(client: SandboxClient) -> None:
    from sandboxd_client import InvalidParams, NotFound

    sub = await client.call("events.subscribe", types=["daemon.*"])
    assert await client.call("events.unsubscribe", subscription=sub["subscription"]) is None
    with pytest.raises(NotFound):
        await client.call("events.unsubscribe", subscription=sub["subscription"])
    with pytest.raises(InvalidParams):
        await client.call("events.subscribe", types="sandbox.*")
    with pytest.raises(InvalidParams):
        await client.call("events.subscribe", since=-1)


async def test_since_replays_across_a_daemon_restart(spawn_daemon: SpawnDaemon) -> None:
    d = spawn_daemon()
    async with SandboxClient(d.socket) as follower:
        stream = await follower.events().start()
        async with stream:
            async with SandboxClient(d.socket) as c:
                sb = await c.create(ttl=120)
                await sb.extend(60)
                await sb.remove()
            before = await collect(stream, lambda e: e.type == "sandbox.removed")
            seen = before[-1].seq

            assert d.stop(signal.SIGTERM) == 0
            d.start()
            async with SandboxClient(d.socket) as c:
                first = await c.call("events.subscribe", since=seen)
                assert first["last_seq"] > seen  # daemon.stopping, daemon.started at least
                sb2 = await c.create(ttl=120)
                await sb2.remove()
            # The stream reconnects by itself and continues where it was.
            after = await collect(stream, lambda e: e.type == "sandbox.removed"
                                  and e.sandbox_id == sb2.id)
            assert stream.reconnects >= 1

    seqs = [e.seq for e in before + after]
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs)))  # no gap, no duplicate
    types = [e.type for e in after]
    assert types[:2] == ["daemon.stopping", "daemon.started"]
    assert [t for t in types if t.startswith("sandbox.")] == ["sandbox.created",
                                                               "sandbox.removed"]

    # A fresh subscriber asking since=seen gets the same events, replayed from disk.
    raw = Raw(d.socket)
    try:
        reply = raw.call("events.subscribe", {"since": seen})
        replayed: list[dict[str, Any]] = []
        while len(replayed) < len(after):
            msg = raw.recv()
            assert msg is not None
            if msg[0] == 2 and msg[1] == "event":
                replayed.append(msg[2][1])
        assert [e["seq"] for e in replayed] == [e.seq for e in after]
        assert reply["last_seq"] >= after[-1].seq
    finally:
        raw.close()


async def test_slow_subscribers_never_slow_the_daemon(spawn_daemon: SpawnDaemon) -> None:
    """~10,000 events: a never-reading connection is cut off, the others get every one."""
    n = 10_000
    d = spawn_daemon(config="[events]\nqueue_size = 64\n")
    async with SandboxClient(d.socket) as c:
        sb = await c.create(ttl=600)
        try:
            await _flood(d, c, sb.id, n)
        finally:
            await sb.remove()


async def _flood(d: Daemon, c: SandboxClient, sid: str, n: int) -> None:
    filt = {"types": ["sandbox.extended"], "sandbox": sid}
    stuck = Raw(d.socket)
    stuck_sub = stuck.call("events.subscribe", filt)["subscription"]  # then never reads

    fast_got: list[dict[str, Any]] = []
    fast_ready = threading.Event()

    def fast_reader() -> None:
        raw = Raw(d.socket, timeout=60)
        try:
            sub = raw.call("events.subscribe", filt)["subscription"]
            fast_ready.set()
            while len(fast_got) < n:
                msg = raw.recv()
                if msg is None:
                    return
                if msg[0] == 2 and msg[1] == "event" and msg[2][0] == sub:
                    fast_got.append(msg[2][1])
                elif msg[0] == 2:
                    fast_got.append({"unexpected": msg})
                    return
        finally:
            raw.close()

    pongs: list[Any] = []
    driven = threading.Event()

    def driver() -> None:
        raw = Raw(d.socket, timeout=120)
        try:
            batch = 1000
            for start in range(0, n, batch):
                frames = b"".join(
                    msgpack.packb([0, i, "sandbox.extend", [{"id": sid, "ttl": 300 + i}]],
                                  use_bin_type=True)
                    for i in range(start, start + batch))
                raw.sock.sendall(frames)
                replies = 0
                while replies < batch:
                    msg = raw.recv()
                    assert msg is not None and msg[2] is None, msg
                    replies += 1
                # Meanwhile the daemon answers anyone else at once.
                pongs.append(raw_call(d.socket, "daemon.ping", timeout=10)[3])
        finally:
            raw.close()
            driven.set()

    fast = threading.Thread(target=fast_reader, daemon=True)
    fast.start()
    assert await asyncio.to_thread(fast_ready.wait, 10)

    got: list[int] = []
    stream = c.events(**filt)
    async with stream:
        await stream.start()
        drive = threading.Thread(target=driver, daemon=True)
        drive.start()
        async with asyncio.timeout(180):
            async for ev in stream:
                got.append(int(ev.data["ttl"]) - 300)
                if len(got) == 1:
                    # Block this whole event loop (the stream's reader too) until the flood
                    # is over: the daemon must cut this subscriber off, not wait for it.
                    assert driven.wait(120)
                if len(got) == n:
                    break
    assert got == list(range(n))  # resumed after the cut-off: no gap, no duplicate
    assert stream.resubscribes >= 1

    drive.join(10)
    fast.join(60)
    assert pongs == ["pong"] * (n // 1000)
    assert len(fast_got) == n
    assert [e.get("data", {}).get("ttl") for e in fast_got] == [300 + i for i in range(n)]
    seqs = [e["seq"] for e in fast_got]
    assert seqs == list(range(seqs[0], seqs[0] + n))

    # The never-reading connection: a prefix of the events, then its cut-off notice.
    stuck_events: list[int] = []
    lagged: list[Any] = []
    stuck.sock.settimeout(10)
    while not lagged:
        msg = stuck.recv()
        assert msg is not None
        assert msg[0] == 2 and msg[2][0] == stuck_sub
        if msg[1] == "event":
            stuck_events.append(msg[2][1]["seq"])
        else:
            assert msg[1] == "events.lagged"
            lagged.append(msg[2][1])
    assert 0 < len(stuck_events) < n
    assert stuck_events == seqs[: len(stuck_events)]
    assert lagged == [{"next_seq": stuck_events[-1] + 1}]
    stuck.close()


async def test_sandboxctl_events_follows_until_ctrl_c(
    daemon: Daemon, client: SandboxClient, make_sandbox: MakeSandbox
) -> None:
    # faulthandler: a follower that does not exit is made to print its threads' stacks.
    env = {**os.environ, "SANDBOXD_SOCKET": daemon.socket, "PYTHONFAULTHANDLER": "1"}
    start = (await client.call("events.subscribe"))["last_seq"]
    procs = {
        fmt: subprocess.Popen(  # noqa: ASYNC220 - started once, read from a thread
            [sys.executable, "-m", "sandboxd_client.cli", "events", "--type", "sandbox.*",
             "--since", str(start), *(["--json"] if fmt == "json" else [])],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT,
            # As in a terminal: a test run started in the background (``cmd &`` in a
            # script) inherits SIGINT ignored, and Python then keeps it ignored.
            preexec_fn=_sigint_default)
        for fmt in ("json", "text")
    }
    try:
        sb = await make_sandbox()
        await sb.extend(90)
        await sb.remove()
        async with asyncio.timeout(40):
            lines = {fmt: await asyncio.to_thread(_read_until, p, sb.id, "sandbox.removed")
                     for fmt, p in procs.items()}
    finally:
        for p in procs.values():
            p.send_signal(signal.SIGINT)
        errs, hung = {}, {}
        for fmt, p in procs.items():
            try:
                errs[fmt] = p.communicate(timeout=30)[1]
            except subprocess.TimeoutExpired:
                p.send_signal(signal.SIGABRT)  # its stacks go to stderr
                hung[fmt] = p.communicate()[1]
        assert not hung, f"sandboxctl events did not exit on Ctrl-C: {hung}"
    for fmt, p in procs.items():
        assert p.returncode == 0, errs[fmt]
        assert "Traceback" not in errs[fmt]
    parsed = [json.loads(line) for line in lines["json"]]
    assert [e["type"] for e in parsed if e["sandbox_id"] == sb.id] == [
        "sandbox.created", "sandbox.extended", "sandbox.removed"]
    assert all(e["seq"] > start for e in parsed)
    text = [line for line in lines["text"] if sb.id in line]
    assert len(text) == 3
    seq, when, kind, who, *rest = text[1].split(" ")
    assert int(seq) > start and TIME_RE.match(when) and kind == "sandbox.extended"
    assert who.startswith(sb.id) and "ttl=90" in rest


def _sigint_default() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _read_until(proc: subprocess.Popen[str], sid: str, kind: str) -> list[str]:
    assert proc.stdout is not None
    lines: list[str] = []
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line.rstrip("\n"))
        if sid in line and kind in line:
            return lines
    raise AssertionError(f"no {kind} for {sid} in {lines}")


def _other_user(path: str, uid: int, go: int, out: int) -> None:
    """In a forked child: become ``uid`` (no exec: the interpreter lives under 0700 /root),
    subscribe, wait for ``go``, make and remove a sandbox, report every event seen."""
    os.setgroups([])
    os.setgid(0)  # the socket is mode 0660, group root: reachable, yet not an admin
    os.setuid(uid)
    raw = Raw(path, timeout=60)
    notes: list[Any] = []

    def call(method: str, args: dict[str, Any] | None = None) -> Any:
        msgid = raw.send(method, args)
        while True:
            msg = raw.recv()
            assert msg is not None
            if msg[0] == 1 and msg[1] == msgid:
                if msg[2] is not None:
                    raise RuntimeError(f"{method}: {msg[2]}")
                return msg[3]
            notes.append(msg)

    call("events.subscribe")
    os.write(out, b"ready\n")
    os.read(go, 1)  # the admin made (and removed) a sandbox meanwhile
    sb = call("sandbox.create", {"ttl": 120})
    call("sandbox.remove", {"id": sb["id"]})
    while not any(n[1] == "event" and n[2][1]["type"] == "sandbox.removed" for n in notes):
        notes.append(raw.recv())
    report = {"id": sb["id"], "events": [n[2][1] for n in notes if n[1] == "event"]}
    os.write(out, json.dumps(report).encode() + b"\n")


async def test_a_non_admin_sees_only_its_own_events(spawn_daemon: SpawnDaemon) -> None:
    d = spawn_daemon()
    os.chmod(d.workdir, 0o711)  # let another uid reach the socket
    go_r, go_w = os.pipe()
    out_r, out_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        status = 1
        try:
            _other_user(d.socket, 65534, go_r, out_w)
            status = 0
        except BaseException as exc:
            os.write(out_w, f"error {exc!r}\n".encode())
        finally:
            os._exit(status)
    os.close(go_r)
    os.close(out_w)
    reader = os.fdopen(out_r)
    line = ""
    try:
        ready = await asyncio.wait_for(asyncio.to_thread(reader.readline), 30)
        assert ready.strip() == "ready", ready
        async with SandboxClient(d.socket) as admin:
            mine = await admin.create(ttl=120)
            await mine.remove()
        os.write(go_w, b"g")
        line = await asyncio.wait_for(asyncio.to_thread(reader.readline), 60)
    finally:
        os.close(go_w)
        reader.close()
        if not line:  # the child is stuck or failed: do not wait for it forever
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        _, status = await asyncio.to_thread(os.waitpid, pid, 0)
    assert status == 0, line
    result = json.loads(line)
    seen = result["events"]
    assert all(e["owner_uid"] in (65534, None) for e in seen), seen
    assert mine.id not in {e["sandbox_id"] for e in seen}
    assert [e["type"] for e in seen if e["sandbox_id"] == result["id"]] == [
        "sandbox.created", "sandbox.removed"]


async def test_daemon_started_and_stopping_reach_a_live_subscriber(
    spawn_daemon: SpawnDaemon,
) -> None:
    d = spawn_daemon()
    reader, writer = await asyncio.open_unix_connection(d.socket)
    try:
        subscribe = [0, 1, "events.subscribe", [{"types": ["daemon.*"], "since": 0}]]
        writer.write(msgpack.packb(subscribe))
        await writer.drain()
        unpacker = msgpack.Unpacker(raw=False)
        seen: list[str] = []
        assert d.proc is not None
        async with asyncio.timeout(20):
            while "daemon.stopping" not in seen:
                data = await reader.read(65536)
                assert data, f"connection closed before daemon.stopping; saw {seen}"
                unpacker.feed(data)
                for msg in unpacker:
                    if msg[0] == 1:
                        assert msg[2] is None
                        d.proc.send_signal(signal.SIGTERM)  # subscribed: now stop the daemon
                    elif msg[0] == 2 and msg[1] == "event":
                        seen.append(msg[2][1]["type"])
        assert seen == ["daemon.started", "daemon.stopping"]
        assert await asyncio.to_thread(d.proc.wait, 30) == 0
    finally:
        writer.close()
