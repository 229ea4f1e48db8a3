"""The server end to end: connections, pipelining, protocol errors, start-up
checks, graceful shutdown, configuration errors, engine failures and ownership.
Real daemon processes, real engine; raw msgpack where the test is about bytes."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import stat
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import msgpack
import pytest
import pytest_asyncio
from conftest import ROOT, Daemon, MakeSandbox, docker, raw_call
from sandboxd_client import EngineError, EngineUnavailable, SandboxClient

SpawnDaemon = Callable[..., Daemon]


class Raw:
    """A raw msgpack-RPC connection: send any bytes, read any messages."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.unpacker = msgpack.Unpacker(raw=False)

    @classmethod
    async def open(cls, path: str) -> Raw:
        return cls(*await asyncio.open_unix_connection(path))

    async def send(self, obj: Any = None, raw: bytes | None = None) -> None:
        self.writer.write(raw if raw is not None else msgpack.packb(obj, use_bin_type=True))
        await self.writer.drain()

    async def recv(self, within: float = 10) -> Any:
        """The next message; None when the daemon closed the connection."""
        async with asyncio.timeout(within):
            while True:
                for obj in self.unpacker:
                    return obj
                data = await self.reader.read(65536)
                if not data:
                    return None
                self.unpacker.feed(data)

    async def close(self) -> None:
        self.writer.close()
        try:
            await self.writer.wait_closed()
        except OSError:
            pass


@pytest_asyncio.fixture
async def raw(daemon: Daemon) -> AsyncIterator[Raw]:
    conn = await Raw.open(daemon.socket)
    yield conn
    await conn.close()


# --- the wire ----------------------------------------------------------------


async def test_ping_with_msgid_zero_and_method_as_bin(raw: Raw) -> None:
    await raw.send([0, 0, "daemon.ping", []])
    assert await raw.recv() == [1, 0, None, "pong"]
    await raw.send([0, 2**32 - 1, b"daemon.ping", []])
    assert await raw.recv() == [1, 2**32 - 1, None, "pong"]


async def test_bad_shapes_get_invalid_request_and_the_connection_lives(raw: Raw) -> None:
    await raw.send([0, 5, "daemon.ping"])  # three elements
    reply = await raw.recv()
    assert reply[:2] == [1, 5] and reply[2][0] == "invalid_request" and reply[3] is None
    await raw.send([0, 6, "daemon.ping", {"not": "an array"}])
    assert (await raw.recv())[2][0] == "invalid_request"
    await raw.send([0, 7, "daemon.ping", [1, 2]])
    assert (await raw.recv())[2][0] == "invalid_params"
    await raw.send([0, 8, "no.such.method", []])
    reply = await raw.recv()
    assert reply[2][0] == "method_not_found" and isinstance(reply[2][1], str)
    # Notifications (unknown) and stray responses get no reply; the next request still works.
    await raw.send([2, "whatever.this.is", [1]])
    await raw.send([1, 99, None, "unsolicited"])
    await raw.send([0, 9, "daemon.ping", []])
    assert await raw.recv() == [1, 9, None, "pong"]


async def test_garbage_bytes_close_only_that_connection(daemon: Daemon, raw: Raw,
                                                        make_sandbox: MakeSandbox) -> None:
    sb = await make_sandbox()
    async with SandboxClient(daemon.socket) as other:
        work = asyncio.create_task(other.exec(sb.id, ["sh", "-c", "sleep 0.3; echo fine"]))
        await raw.send(raw=b"\xc1\xc1 this is not msgpack \x00\xff")
        note = await raw.recv()
        assert note[0] == 2 and note[1] == "protocol.error"
        assert note[2][0][0] == "invalid_request"
        assert await raw.recv() is None  # closed
        result = await work
        assert result.stdout == b"fine\n" and result.exit_code == 0
        assert await other.ping() == "pong"


async def test_not_an_array_is_a_protocol_error(raw: Raw) -> None:
    await raw.send({"method": "daemon.ping"})
    note = await raw.recv()
    assert note[:2] == [2, "protocol.error"] and note[2][0][0] == "invalid_request"
    assert await raw.recv() is None


async def test_frame_over_the_limit_is_too_large(spawn_daemon: SpawnDaemon) -> None:
    d = spawn_daemon(config='max_frame = "64k"\n')
    conn = await Raw.open(d.socket)
    try:
        big = {"id": "x", "cmd": ["cat"], "stdin": b"x" * 100_000}
        await conn.send([0, 42, "sandbox.exec", [big]])
        reply = await conn.recv()
        assert reply[:2] == [1, 42] and reply[2][0] == "too_large"
        assert "65536" in reply[2][1]
    finally:
        await conn.close()
    assert raw_call(d.socket, "daemon.ping") == [1, 1, None, "pong"]


async def test_replies_come_in_completion_order(raw: Raw, make_sandbox: MakeSandbox) -> None:
    sb = await make_sandbox()
    await raw.send([0, 1, "sandbox.exec", [{"id": sb.id, "cmd": ["sleep", "0.5"]}]])
    await raw.send([0, 2, "daemon.ping", []])
    first, second = await raw.recv(), await raw.recv()
    assert first == [1, 2, None, "pong"]
    assert second[1] == 1 and second[3]["exit_code"] == 0


async def test_fifty_requests_in_flight_on_one_connection(client: SandboxClient,
                                                          make_sandbox: MakeSandbox) -> None:
    sb = await make_sandbox()

    async def one(i: int) -> None:
        delay = (50 - i) % 7 / 20
        r = await sb.exec(["sh", "-c", f"sleep {delay}; echo {i}; echo e{i} >&2; exit {i % 5}"])
        assert (r.stdout, r.stderr, r.exit_code) == (f"{i}\n".encode(), f"e{i}\n".encode(), i % 5)

    await asyncio.gather(*(one(i) for i in range(50)))


async def test_two_clients_at_once(daemon: Daemon, make_sandbox: MakeSandbox) -> None:
    async with SandboxClient(daemon.socket) as a, SandboxClient(daemon.socket) as b:
        sa, sb_ = await asyncio.gather(make_sandbox(a), make_sandbox(b))
        ra, rb = await asyncio.gather(sa.exec(["echo", "a"]), sb_.exec(["echo", "b"]))
        assert (ra.stdout, rb.stdout) == (b"a\n", b"b\n")
        ids_a = {s.id for s in await a.list()}
        assert {sa.id, sb_.id} <= ids_a  # same uid: both visible


# --- start-up ----------------------------------------------------------------


def test_socket_mode_is_0660(daemon: Daemon) -> None:
    mode = os.stat(daemon.socket).st_mode
    assert stat.S_ISSOCK(mode) and stat.S_IMODE(mode) == 0o660


def test_refuses_to_start_over_a_live_daemon(daemon: Daemon) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "sandboxd", "serve", "--socket", daemon.socket],
        capture_output=True, text=True, timeout=30, cwd=str(ROOT),
    )
    assert proc.returncode == 1
    assert "already serving" in proc.stderr and "Traceback" not in proc.stderr
    assert raw_call(daemon.socket, "daemon.ping") == [1, 1, None, "pong"]


def test_replaces_a_stale_socket(spawn_daemon: SpawnDaemon, tmp_path: Any) -> None:
    d = spawn_daemon(wait=False)
    d.stop(signal.SIGKILL)  # leaves its socket file behind, nobody listening
    stale = socket.socket(socket.AF_UNIX)
    path = d.socket
    if not os.path.exists(path):
        stale.bind(path)
    stale.close()
    assert os.path.exists(path)
    d.start()
    assert raw_call(path, "daemon.ping") == [1, 1, None, "pong"]


@pytest.mark.parametrize(
    ("config", "needle"),
    [
        ("bogus_key = 1\n", "bogus_key: unknown key"),
        ('[defaults]\nmemory = "12q"\n', "memory"),
        ("[defaults]\npids = \"many\"\n", "pids"),
        ("[policy]\nnetworks = \"none\"\n", "networks"),
        ("this is = not toml [\n", "not valid TOML"),
    ],
)
def test_bad_config_is_one_clear_line(tmp_path: Any, config: str, needle: str) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(config)
    proc = subprocess.run(
        [sys.executable, "-m", "sandboxd", "serve", "--socket", str(tmp_path / "s.sock"),
         "--config", str(path)],
        capture_output=True, text=True, timeout=30, cwd=str(ROOT),
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0] and str(path) in lines[0]


@pytest.mark.parametrize(
    ("sock", "needle"),
    [
        ("/proc/nodir/s.sock", "cannot listen on /proc/nodir/s.sock"),
        ("/dev/null", "/dev/null exists and is not a socket"),
    ],
)
def test_start_up_failure_is_one_line_and_keeps_the_log(tmp_path: Any, sock: str,
                                                        needle: str) -> None:
    """Any start-up failure: one clear line on stderr, a non-zero exit, no traceback,
    and the log lines written before it are on stdout."""
    proc = subprocess.run(
        [sys.executable, "-m", "sandboxd", "serve", "--socket", sock, "--log-format", "json"],
        capture_output=True, text=True, timeout=60, cwd=str(ROOT),
        env={**os.environ, "SANDBOXD_STATE_DIR": str(tmp_path / "state")},
    )
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    logged = [json.loads(line)["event"] for line in proc.stdout.splitlines()]
    assert "event_log_opened" in logged  # written before the failure, not lost with it


# --- shutdown ----------------------------------------------------------------


async def test_sigterm_finishes_in_flight_calls_and_leaves_sandboxes(
    spawn_daemon: SpawnDaemon,
) -> None:
    d = spawn_daemon()
    async with SandboxClient(d.socket) as c:
        sb = await c.create(ttl=300)
    try:
        conn = await Raw.open(d.socket)
        slow = {"id": sb.id, "cmd": ["sh", "-c", "sleep 1; echo done"]}
        await conn.send([0, 1, "sandbox.exec", [slow]])
        await asyncio.sleep(0.2)  # let the exec start before the signal
        assert d.proc is not None
        d.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 10
        while not any(e.get("event") == "daemon_stopping" for e in d.log_events()):
            assert time.monotonic() < deadline, "daemon never logged daemon_stopping"
            await asyncio.sleep(0.02)
        await conn.send([0, 2, "sandbox.create", []])
        replies = {}
        for _ in range(2):
            msg = await conn.recv()
            replies[msg[1]] = msg
        assert replies[2][2][0] == "shutting_down"
        assert replies[1][2] is None and replies[1][3]["stdout"] == b"done\n"
        await conn.close()
        assert await asyncio.to_thread(d.proc.wait, 30) == 0
        assert not await asyncio.to_thread(os.path.exists, d.socket)
        state = json.loads(docker("inspect", sb.container_id or ""))[0]["State"]
        assert state["Running"] is True  # sandboxes outlive the daemon
    finally:
        docker("rm", "-f", sb.container_id or "", check=False)


async def test_cleanup_on_exit_removes_sandboxes(spawn_daemon: SpawnDaemon) -> None:
    d = spawn_daemon(args=["--cleanup-on-exit"])
    async with SandboxClient(d.socket) as c:
        sb = await c.create(ttl=300)
    try:
        assert d.stop() == 0
        assert not docker("ps", "-aq", "--filter", f"id={sb.container_id}").strip()
    finally:
        docker("rm", "-f", sb.container_id or "", check=False)


# --- the engine ----------------------------------------------------------------


async def test_engine_unavailable_keeps_the_daemon_up(spawn_daemon: SpawnDaemon) -> None:
    d = spawn_daemon(env={"DOCKER_HOST": "unix:///nonexistent/docker.sock"})
    async with SandboxClient(d.socket) as c:
        with pytest.raises(EngineUnavailable, match="cannot be reached"):
            await c.create(ttl=30)
        info = await c.info()
        assert info.engine.reachable is False
        assert await c.ping() == "pong"


async def test_engine_refusal_is_engine_error(spawn_daemon: SpawnDaemon) -> None:
    # The policy lets the user through; the engine (runc) finds no such user at start.
    d = spawn_daemon(config='[policy]\nusers = ["no-such-user"]\n')
    async with SandboxClient(d.socket) as client:
        with pytest.raises(EngineError) as info:
            await client.create(ttl=30, user="no-such-user")
    assert info.value.data and "no-such-user" in info.value.data["engine_message"]


# --- ownership ---------------------------------------------------------------------


def as_user(uid: int, gid: int, work: Callable[[], Any], groups: tuple[int, ...] = ()) -> Any:
    """Run ``work`` in a forked child with another uid/gid; its JSON-able result."""
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: drop privileges, do the work, report, exit
        code = 1
        try:
            os.close(read_fd)
            os.setgroups(list(groups))
            os.setgid(gid)
            os.setuid(uid)
            os.write(write_fd, json.dumps(work()).encode())
            code = 0
        finally:
            os._exit(code)
    os.close(write_fd)
    with os.fdopen(read_fd, "rb") as fh:
        data = fh.read()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, "the child failed"
    return json.loads(data)


async def test_non_admin_sees_only_its_own_sandboxes(spawn_daemon: SpawnDaemon) -> None:
    d = spawn_daemon(config='socket_group = "nogroup"\n')
    os.chmod(d.workdir, 0o755)
    async with SandboxClient(d.socket) as root:
        mine = await root.create(ttl=120)
        theirs = None
        try:

            def as_nobody() -> dict[str, Any]:
                call = lambda m, **kw: raw_call(d.socket, m, [kw] if kw else [])  # noqa: E731
                info = call("daemon.info")[3]
                created = call("sandbox.create", ttl=120)[3]
                return {
                    "caller": info["caller"],
                    "sb": created["id"],
                    "seen": [s["id"] for s in call("sandbox.list")[3]],
                    "get_other": call("sandbox.get", id=mine.id)[2],
                    "remove_other": call("sandbox.remove", id=mine.id)[2],
                    "exec_other": call("sandbox.exec", id=mine.name, cmd=["true"])[2],
                }

            out = await asyncio.to_thread(as_user, 65534, 65534, as_nobody)
            theirs = out["sb"]
            assert out["caller"]["admin"] is False and out["caller"]["uid"] == 65534
            for key in ("get_other", "remove_other", "exec_other"):
                assert out[key][0] == "not_found", key
            assert out["seen"] == [theirs]
            seen_by_root = await root.get(theirs)  # root is an admin: sees everything
            assert seen_by_root.owner.uid == 65534
            assert (await root.get(mine.id)).status == "running"  # untouched
        finally:
            await root.remove(mine.id)
            if theirs:
                await root.remove(theirs)


async def test_bad_bodies_with_a_readable_msgid_are_answered_not_dropped(raw: Raw) -> None:
    # A map with a non-string key, and a str that is not UTF-8: one bad request each.
    await raw.send([0, 5, "sandbox.get", [{1: 2}]])
    reply = await raw.recv()
    assert reply[:2] == [1, 5] and reply[2][0] == "invalid_params"
    bad_str = b"\x94\x00\x06\xabsandbox.get\x91\x81\xa2id\xa2\xff\xfe"  # {"id": <bad utf-8>}
    await raw.send(raw=bad_str)
    reply = await raw.recv()
    assert reply[:2] == [1, 6] and reply[2][0] == "invalid_params"
    await raw.send(raw=b"\x94\x00\x07\xa2\xff\xfe\x90")  # method name not UTF-8
    reply = await raw.recv()
    assert reply[:2] == [1, 7] and reply[2][0] == "invalid_request"
    await raw.send([0, 8, "daemon.ping", []])
    assert await raw.recv() == [1, 8, None, "pong"]


async def test_a_call_cut_off_by_shutdown_still_gets_its_one_reply(
    spawn_daemon: SpawnDaemon,
) -> None:
    d = spawn_daemon(config="shutdown_grace = 0.5\n")
    async with SandboxClient(d.socket) as c:
        sb = await c.create(ttl=300)
    try:
        conn = await Raw.open(d.socket)
        await conn.send([0, 1, "sandbox.exec", [{"id": sb.id, "cmd": ["sleep", "30"]}]])
        await asyncio.sleep(0.3)  # let the exec start before the signal
        assert d.proc is not None
        d.proc.send_signal(signal.SIGTERM)
        reply = await conn.recv(within=20)
        assert reply[:2] == [1, 1] and reply[2][0] == "shutting_down"
        await conn.close()
        assert await asyncio.to_thread(d.proc.wait, 30) == 0
    finally:
        docker("rm", "-f", sb.container_id or "", check=False)


async def test_admin_group_members_see_everything(spawn_daemon: SpawnDaemon) -> None:
    """Membership of the admin group counts through supplementary groups too."""
    d = spawn_daemon(config='socket_group = "nogroup"\nadmin_group = "adm"\n')
    os.chmod(d.workdir, 0o755)
    adm = 4  # Debian's "adm" group

    def info() -> dict[str, Any]:
        result: dict[str, Any] = raw_call(d.socket, "daemon.info")[3]["caller"]
        return result

    member = await asyncio.to_thread(as_user, 65534, 65534, info, (adm,))
    outsider = await asyncio.to_thread(as_user, 65534, 65534, info)
    assert member["admin"] is True and member["uid"] == 65534
    assert outsider["admin"] is False


async def test_a_second_sigterm_exits_at_once(spawn_daemon: SpawnDaemon) -> None:
    """While the daemon waits out its grace for an in-flight call, a second signal ends it."""
    d = spawn_daemon(config="shutdown_grace = 60\n")
    async with SandboxClient(d.socket) as c:
        sb = await c.create(ttl=300)
    try:
        conn = await Raw.open(d.socket)
        await conn.send([0, 1, "sandbox.exec", [{"id": sb.id, "cmd": ["sleep", "60"]}]])
        await asyncio.sleep(0.3)  # let the exec start before the signal
        assert d.proc is not None
        d.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 10
        while not any(e.get("event") == "daemon_stopping" for e in d.log_events()):
            assert time.monotonic() < deadline, "daemon never logged daemon_stopping"
            await asyncio.sleep(0.02)
        started = time.monotonic()
        d.proc.send_signal(signal.SIGTERM)
        code = await asyncio.to_thread(d.proc.wait, 30)
        assert time.monotonic() - started < 5.0
        assert code == 128 + signal.SIGTERM
        assert any(e.get("event") == "second_signal" for e in d.log_events())
        await conn.close()
    finally:
        docker("rm", "-f", sb.container_id or "", check=False)
