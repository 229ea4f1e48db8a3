"""sandboxctl's streamed commands against a scripted fake daemon (no Docker): exec -i/-t/-d,
attach, ps, cp, and their argument handling.

sandboxctl runs as a real subprocess (its stdin, stdout and stderr are real
pipes, files or a pseudo-terminal), talking to an in-test msgpack-RPC server
that plays a daemon with a few fake commands (``cat`` echoes stdin, ``fail``
exits 7, ``tty`` reports its size and echoes keys until ``q``) and an
in-memory file system. What the daemon really does is checked by
``test_client_streams``; here it is what sandboxctl does with it.
"""

from __future__ import annotations

import asyncio
import fcntl
import json
import os
import select
import struct
import subprocess
import sys
import termios
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from sandboxd_client.cli import cli
from sandboxd_client.transfer import Remote, parse_location
from test_client_unit import SANDBOX, Conn, FakeServer, named

from sandboxd.wire.codec import Request

pytestmark = pytest.mark.pure

SANDBOXCTL = [sys.executable, "-c", "from sandboxd_client.cli import main; main()"]
WITHIN = 20.0
MiB = 1024 * 1024


class Failure(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code, self.message = code, message


class FakeDaemon:
    """The daemon's streamed methods, scripted: a few commands and an in-memory file system."""

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.modes: dict[str, int] = {}
        self.dirs = {"/", "/workspace", "/w"}
        self.execs: dict[str, dict[str, Any]] = {}
        self.calls: list[tuple[str, dict[str, Any]]] = []
        self.count = 0

    async def handle(self, conn: Conn, req: Request) -> None:
        p = named(req)
        self.calls.append((req.method, {k: v for k, v in p.items() if k != "data"}))
        after: list[tuple[str, list[Any]]] = []
        try:
            result = self.dispatch(req.method, p, after)
        except Failure as err:
            conn.respond(req.msgid, [err.code, err.message, None])
            return
        conn.respond(req.msgid, None, result)
        for method, params in after:
            conn.notify(method, params)

    def dispatch(self, method: str, p: dict[str, Any],
                 after: list[tuple[str, list[Any]]]) -> Any:
        def output(exec_id: str, stream: str, data: bytes) -> None:
            after.append(("exec.output", [exec_id, stream, data]))

        def exit_(exec_id: str, code: int) -> None:
            after.append(("exec.exit", [exec_id, {"exit_code": code, "timed_out": False,
                                                   "duration": 0.1}]))

        if method == "sandbox.get":
            return SANDBOX
        if method == "exec.start":
            self.count += 1
            exec_id = f"e{self.count}"
            self.execs[exec_id] = p
            kind = p["cmd"][0]
            if kind == "fail":
                output(exec_id, "stderr", b"oops\n")
                output(exec_id, "stdout", b"partial")
                exit_(exec_id, 7)
            elif kind == "tty":
                output(exec_id, "stdout", f"start {p.get('rows')} {p.get('cols')}\r\n".encode())
            return {"exec_id": exec_id}
        if method == "exec.write":
            e = self.execs[p["exec_id"]]
            output(p["exec_id"], "stdout", p["data"])
            if e["cmd"][0] == "tty" and b"q" in p["data"]:
                exit_(p["exec_id"], 3)
            return None
        if method == "exec.close_stdin":
            exit_(p["exec_id"], 0)
            return None
        if method == "exec.resize":
            output(p["exec_id"], "stdout", f"size {p['rows']} {p['cols']}\r\n".encode())
            return None
        if method == "exec.attach":
            if p["exec_id"] != "d1":
                raise Failure("not_found", f"No exec {p['exec_id']!r}.")
            start = max(p.get("offset", 0), 4)
            output("d1", "stdout", b"0123456789"[start:])
            output("d1", "stderr", b"err")
            exit_("d1", 4)
            return {"offset": start}
        if method == "exec.list":
            return [{"exec_id": "d1", "cmd": ["sleep", "9 s"], "running": True,
                     "exit_code": None, "detached": True, "tty": False,
                     "started_at": "2026-11-26T15:04:05.123Z"},
                    {"exec_id": "e1", "cmd": ["true"], "running": False, "exit_code": 0,
                     "detached": False, "tty": True, "started_at": "2026-11-26T15:04:06.000Z"}]
        if method == "files.write":
            path, data, offset = p["path"], p["data"], p.get("offset", 0)
            old = b"" if p.get("truncate", offset == 0) else self.files.get(path, b"")
            self.files[path] = old[:offset].ljust(offset, b"\0") + data + old[offset + len(data):]
            if "mode" in p:
                self.modes[path] = p["mode"]
            return None
        if method == "files.read":
            if p["path"] not in self.files:
                raise Failure("not_found", f"No file {p['path']!r}.")
            if p.get("length", 0) > MiB:
                raise Failure("too_large", "Chunk too large.")
            return self.files[p["path"]][p.get("offset", 0):p.get("offset", 0) + p["length"]]
        if method == "files.stat":
            path = p["path"].rstrip("/") or "/"
            if path in self.dirs:
                return {"name": os.path.basename(path), "size": 0, "mode": 0o40755,
                        "is_dir": True, "mtime": "2026-11-26T15:04:05.123Z"}
            if path in self.files:
                return {"name": os.path.basename(path), "size": len(self.files[path]),
                        "mode": 0o100000 | self.modes.get(path, 0o640), "is_dir": False,
                        "mtime": "2026-11-26T15:04:05.123Z"}
            raise Failure("not_found", f"No file {path!r}.")
        raise Failure("method_not_found", f"No method {method!r}.")


@pytest.fixture
def fake(tmp_path: Path) -> Iterator[tuple[str, FakeDaemon]]:
    """The fake daemon on its own event-loop thread; its socket path."""
    path = str(tmp_path / "fake.sock")
    daemon = FakeDaemon()
    loop = asyncio.new_event_loop()
    server = FakeServer(path, daemon.handle)
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    asyncio.run_coroutine_threadsafe(server.start(), loop).result(5)
    yield path, daemon
    asyncio.run_coroutine_threadsafe(server.stop(), loop).result(5)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(5)
    loop.close()


def ctl(socket_path: str, *args: str, stdin: Any = None,
        input: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
    env = {k: v for k, v in os.environ.items() if k != "SANDBOXD_SOCKET"}
    return subprocess.run([*SANDBOXCTL, "--socket", socket_path, *args], stdin=stdin,
                          input=input, capture_output=True, timeout=WITHIN, env=env)


def one_line(proc: subprocess.CompletedProcess[bytes]) -> str:
    text = proc.stderr.decode()
    assert text.count("\n") == 1 and "Traceback" not in text, text
    return text


# -- exec -i ------------------------------------------------------------------------------


def test_exec_i_pipes_a_binary_file_through(fake: tuple[str, FakeDaemon],
                                            tmp_path: Path) -> None:
    path, daemon = fake
    data = os.urandom(3 * MiB + 123)
    src = tmp_path / "in.bin"
    src.write_bytes(data)
    with open(src, "rb") as f:
        proc = ctl(path, "exec", "-i", "sb-1", "--", "cat", stdin=f)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == data and proc.stderr == b""
    started = [c for m, c in daemon.calls if m == "exec.start"]
    assert started == [{"id": "sb-1", "cmd": ["cat"], "stdin": True}]
    methods = [m for m, _ in daemon.calls]
    assert methods[-1] == "exec.close_stdin" and methods.count("exec.write") >= 3


def test_exec_i_streams_stderr_and_the_exit_code(fake: tuple[str, FakeDaemon]) -> None:
    path, _ = fake
    proc = ctl(path, "exec", "-i", "sb-1", "fail", input=b"")
    assert proc.returncode == 7
    assert (proc.stdout, proc.stderr) == (b"partial", b"oops\n")


def test_exec_i_from_a_pipe_that_stays_open_until_written(
    fake: tuple[str, FakeDaemon]
) -> None:
    """Input that arrives over time is sent as it comes, and its end closes stdin."""
    path, _ = fake
    env = {k: v for k, v in os.environ.items() if k != "SANDBOXD_SOCKET"}
    with subprocess.Popen([*SANDBOXCTL, "--socket", path, "exec", "-i", "sb-1", "cat"],
                          stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env) as child:
        assert child.stdin is not None and child.stdout is not None
        try:
            child.stdin.write(b"first\n")
            child.stdin.flush()
            assert child.stdout.read(6) == b"first\n"  # echoed before stdin ended
            child.stdin.write(b"second")
            child.stdin.close()
            assert child.stdout.read() == b"second"
            assert child.wait(WITHIN) == 0
        finally:
            if child.poll() is None:
                child.kill()


# -- exec -t: a pseudo-terminal ---------------------------------------------------------------


def _set_size(fd: int, rows: int, cols: int) -> None:
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))


def _read_until(fd: int, wanted: bytes, seen: bytearray) -> None:
    deadline = time.monotonic() + WITHIN
    while wanted not in seen:
        left = deadline - time.monotonic()
        assert left > 0, f"{wanted!r} never came; got {bytes(seen)!r}"
        if select.select([fd], [], [], left)[0]:
            try:
                seen += os.read(fd, 65536)
            except OSError:  # EIO: the other side closed
                break
    assert wanted in seen, bytes(seen)


def _spawn_on_pty(args: list[str], rows: int, cols: int) -> tuple[subprocess.Popen[bytes], int,
                                                                    int]:
    master, slave = os.openpty()
    _set_size(slave, rows, cols)
    env = {k: v for k, v in os.environ.items() if k != "SANDBOXD_SOCKET"}
    child = subprocess.Popen(
        args, stdin=slave, stdout=slave, stderr=slave, env=env, start_new_session=True,
        preexec_fn=lambda: fcntl.ioctl(0, termios.TIOCSCTTY, 0))
    return child, master, slave


def test_exec_it_raw_mode_resize_and_exit_code(fake: tuple[str, FakeDaemon]) -> None:
    path, daemon = fake
    child, master, slave = _spawn_on_pty(
        [*SANDBOXCTL, "--socket", path, "exec", "-it", "sb-1", "tty"], 24, 80)
    before = termios.tcgetattr(slave)
    seen = bytearray()
    try:
        _read_until(master, b"start 24 80", seen)  # the initial size came from the terminal
        lflag = termios.tcgetattr(slave)[3]
        assert not lflag & (termios.ICANON | termios.ECHO | termios.ISIG)  # raw
        _set_size(master, 30, 100)  # the window changes: SIGWINCH -> exec.resize
        _read_until(master, b"size 30 100", seen)
        os.write(master, b"\x03hello")  # Ctrl-C is a byte like any other
        _read_until(master, b"\x03hello", seen)
        os.write(master, b"q")
        assert child.wait(WITHIN) == 3
        assert termios.tcgetattr(slave) == before  # restored
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        os.close(master)
        os.close(slave)
    start = [c for m, c in daemon.calls if m == "exec.start"]
    assert start == [{"id": "sb-1", "cmd": ["tty"], "stdin": True, "tty": True, "rows": 24,
                      "cols": 80}]
    assert ("exec.resize", {"exec_id": "e1", "rows": 30, "cols": 100}) in daemon.calls


def test_exec_it_restores_the_terminal_on_sigterm(fake: tuple[str, FakeDaemon]) -> None:
    path, _ = fake
    child, master, slave = _spawn_on_pty(
        [*SANDBOXCTL, "--socket", path, "exec", "-it", "sb-1", "tty"], 24, 80)
    before = termios.tcgetattr(slave)
    try:
        _read_until(master, b"start 24 80", bytearray())
        child.terminate()
        assert child.wait(WITHIN) == 128 + 15
        assert termios.tcgetattr(slave) == before
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        os.close(master)
        os.close(slave)


def test_exec_t_without_a_terminal_is_a_clear_error(fake: tuple[str, FakeDaemon]) -> None:
    path, daemon = fake
    proc = ctl(path, "exec", "-t", "sb-1", "sh", input=b"")
    assert proc.returncode == 1
    assert "-t needs a terminal on stdin" in one_line(proc)
    assert daemon.calls == []


# -- exec -d, attach, ps ------------------------------------------------------------------------


def test_exec_d_prints_the_exec_id(fake: tuple[str, FakeDaemon]) -> None:
    path, daemon = fake
    proc = ctl(path, "exec", "-d", "sb-1", "sleep", "100")
    assert (proc.returncode, proc.stdout) == (0, b"e1\n")
    proc = ctl(path, "--json", "exec", "-d", "sb-1", "sleep", "100")
    assert json.loads(proc.stdout) == {"exec_id": "e2"}
    assert next(c for m, c in daemon.calls if m == "exec.start") == {
        "id": "sb-1", "cmd": ["sleep", "100"], "detach": True}


def test_attach_replays_from_an_offset_and_says_when_it_starts_later(
    fake: tuple[str, FakeDaemon]
) -> None:
    path, daemon = fake
    proc = ctl(path, "attach", "d1", "--offset", "6")
    assert (proc.returncode, proc.stdout, proc.stderr) == (4, b"6789", b"err")
    assert ("exec.attach", {"exec_id": "d1", "offset": 6}) in daemon.calls
    proc = ctl(path, "attach", "d1")  # asks for 0; the fake kept only from byte 4
    assert proc.returncode == 4 and proc.stdout == b"456789"
    assert proc.stderr.startswith(b"sandboxctl: output before byte 4 was dropped")
    proc = ctl(path, "attach", "--json", "d1", "--offset", "8")
    lines = [json.loads(line) for line in proc.stdout.splitlines()]
    assert lines == [{"offset": 8}, {"stream": "stdout", "data": "89", "data_b64": "ODk="},
                     {"stream": "stderr", "data": "err", "data_b64": "ZXJy"},
                     {"exit_code": 4, "timed_out": False, "duration": 0.1}]
    proc = ctl(path, "attach", "nope")
    assert proc.returncode == 1 and "not_found" in one_line(proc)


def test_ps_table_and_json(fake: tuple[str, FakeDaemon]) -> None:
    path, _ = fake
    proc = ctl(path, "ps", "sb-1")
    assert proc.returncode == 0, proc.stderr
    header, first, second = proc.stdout.decode().splitlines()
    assert header.split() == ["EXEC_ID", "STATUS", "DETACHED", "TTY", "STARTED", "COMMAND"]
    assert first.split()[:3] == ["d1", "running", "yes"] and first.endswith("sleep '9 s'")
    assert second.split()[:4] == ["e1", "exited(0)", "no", "yes"]
    listed = json.loads(ctl(path, "ps", "--json", "sb-1").stdout)
    assert [e["exec_id"] for e in listed] == ["d1", "e1"] and listed[0]["exit_code"] is None


# -- cp -----------------------------------------------------------------------------------------


def test_cp_both_ways_with_a_file_and_stdio(fake: tuple[str, FakeDaemon],
                                            tmp_path: Path) -> None:
    path, daemon = fake
    data = os.urandom(2 * MiB + 5)
    src = tmp_path / "src.bin"
    src.write_bytes(data)
    src.chmod(0o751)
    assert ctl(path, "cp", str(src), "sb-1:/w/a.bin").returncode == 0
    assert daemon.files["/w/a.bin"] == data and daemon.modes["/w/a.bin"] == 0o751
    writes = [c for m, c in daemon.calls if m == "files.write"]
    assert [w.get("offset") for w in writes] == [None, MiB, 2 * MiB]
    # Into a directory: the file keeps its name. A relative path is relative to the workdir.
    assert ctl(path, "cp", str(src), "sb-1:/w").returncode == 0
    assert daemon.files["/w/src.bin"] == data
    assert ctl(path, "cp", "-", "sb-1:rel.bin", input=data[:1000]).returncode == 0
    assert daemon.files["/workspace/rel.bin"] == data[:1000]
    # Out again: to a file, into a directory, to stdout.
    out = tmp_path / "out.bin"
    proc = ctl(path, "--json", "cp", "sb-1:/w/a.bin", str(out))
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == {"source": "sb-1:/w/a.bin", "destination": str(out),
                                       "bytes": len(data)}
    assert out.read_bytes() == data and out.stat().st_mode & 0o777 == 0o751
    assert ctl(path, "cp", "sb-1:/w/a.bin", str(tmp_path)).returncode == 0
    assert (tmp_path / "a.bin").read_bytes() == data
    proc = ctl(path, "cp", "sb-1:rel.bin", "-")
    assert proc.returncode == 0 and proc.stdout == data[:1000]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".sandboxctl-")] == []


def test_cp_errors(fake: tuple[str, FakeDaemon], tmp_path: Path) -> None:
    path, _ = fake
    for args in (["a", "b"], ["sb-1:/x", "sb-1:/y"]):
        assert ctl(path, "cp", *args).returncode == 2
    proc = ctl(path, "cp", str(tmp_path / "missing"), "sb-1:/w/x")
    assert proc.returncode == 1 and "local_error" in one_line(proc)
    proc = ctl(path, "cp", "sb-1:/w/missing", str(tmp_path / "x"))
    assert proc.returncode == 1 and "not_found" in one_line(proc)
    assert not (tmp_path / "x").exists()
    proc = ctl(path, "cp", "sb-1:/w", str(tmp_path / "x"))
    assert proc.returncode == 1 and "is_a_directory" in one_line(proc)
    proc = ctl(path, "cp", "-", "sb-1:/w", input=b"x")
    assert proc.returncode == 1 and "is_a_directory" in one_line(proc)
    assert ctl(path, "cp", "--json", "sb-1:/w/missing", "-").returncode == 2


def test_new_commands_take_socket_and_json_after_their_name(
    fake: tuple[str, FakeDaemon], tmp_path: Path
) -> None:
    path, _ = fake
    env = {"SANDBOXD_SOCKET": None}
    runner = CliRunner()
    res = runner.invoke(cli, ["ps", "sb-1", "--socket", path, "--json"], env=env)
    assert res.exit_code == 0 and json.loads(res.stdout)[0]["exec_id"] == "d1"
    res = runner.invoke(cli, ["--json", "ps", "--socket", path, "--no-json", "sb-1"], env=env)
    assert res.stdout.startswith("EXEC_ID")
    res = runner.invoke(cli, ["attach", "d1", "--json", "--socket", path], env=env)
    assert res.exit_code == 4 and json.loads(res.stdout.splitlines()[0]) == {"offset": 4}
    res = runner.invoke(cli, ["exec", "-d", "--socket", path, "--json", "sb-1", "sleep", "1"],
                        env=env)
    assert res.exit_code == 0 and json.loads(res.stdout) == {"exec_id": "e1"}
    (tmp_path / "f").write_bytes(b"x")
    res = runner.invoke(cli, ["cp", str(tmp_path / "f"), "sb-1:/w/f", "--socket", path,
                              "--json"], env=env)
    assert res.exit_code == 0 and json.loads(res.stdout)["bytes"] == 1


def test_locations() -> None:
    assert parse_location("sb:/a/b") == Remote("sb", "/a/b")
    assert parse_location("name:rel/x") == Remote("name", "rel/x")
    for local in ("-", "./a:b", "/abs/x", "a/b:c", "sb:", ":x", "plain"):
        assert parse_location(local) == local


# -- argument handling (in-process) -------------------------------------------------------------


@pytest.mark.parametrize("args", [
    ["exec", "-d", "-i", "sb-1", "cat"],
    ["exec", "-i", "--max-output", "10", "sb-1", "cat"],
    ["exec", "-i", "--stdin", "sb-1", "cat"],
    ["exec", "--json", "-i", "sb-1", "cat"],
    ["--json", "exec", "-t", "sb-1", "cat"],
    ["attach", "d1", "--offset", "-1"],
])
def test_streamed_usage_errors_exit_2(args: list[str], fake: tuple[str, FakeDaemon]) -> None:
    path, daemon = fake
    res = CliRunner().invoke(cli, [*args, "--socket", path], env={"SANDBOXD_SOCKET": None})
    assert res.exit_code == 2, res.output
    assert daemon.calls == []


def test_exec_options_between_id_and_dashes_and_flag_clusters(
    fake: tuple[str, FakeDaemon]
) -> None:
    path, daemon = fake
    proc = ctl(path, "exec", "sb-1", "-d", "--env", "A=1", "--", "sleep", "-it")
    assert proc.returncode == 0, proc.stderr
    proc = ctl(path, "exec", "-di", "sb-1", "x")  # a cluster is parsed like its flags
    assert proc.returncode == 2
    starts = [c for m, c in daemon.calls if m == "exec.start"]
    assert starts == [{"id": "sb-1", "cmd": ["sleep", "-it"], "env": {"A": "1"},
                       "detach": True}]
