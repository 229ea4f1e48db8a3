"""Streaming exec, PTYs and files against the real daemon: the client API and sandboxctl.

Every byte value through stdout, stdout and stderr kept in order, stdin far
larger than a pipe buffer, kill, exit codes and timeouts, a tty resized
(what ``stty size`` says), detach then attach from offset 0 on a new
connection, files moved in pieces; and sandboxctl's ``exec -it`` through a
real pseudo-terminal, ``exec -i`` with a binary file, ``cp`` both ways with
a 20 MiB file and ``-``. Each sandbox is removed by its fixture; every wait
polls with a deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import io
import os
import select
import struct
import subprocess
import sys
import termios
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import Daemon, MakeSandbox
from sandboxd_client import (
    AsyncProcess,
    Client,
    FileInfo,
    NotFound,
    SandboxClient,
)

WITHIN = 60.0
MiB = 1024 * 1024
SANDBOXCTL = [sys.executable, "-c", "from sandboxd_client.cli import main; main()"]


async def read_until(proc: AsyncProcess, wanted: bytes, seen: bytearray) -> None:
    """Read ``proc``'s stdout into ``seen`` until ``wanted`` is in it (within the deadline)."""
    async with asyncio.timeout(WITHIN):
        while wanted not in seen:
            chunk = await proc.stdout.read(65536)
            assert chunk, f"the output ended before {wanted!r}: {bytes(seen)!r}"
            seen += chunk


# -- the client API ---------------------------------------------------------------------------


async def test_every_byte_value_through_stdout(make_sandbox: MakeSandbox) -> None:
    sb = await make_sandbox()
    fmt = "".join(f"\\{i:03o}" for i in range(256)) * 4
    proc = await sb.start(["printf", fmt])
    async with asyncio.timeout(WITHIN):
        assert await proc.communicate() == (bytes(range(256)) * 4, b"")
    assert proc.returncode == 0 and proc.timed_out is False


async def test_stdout_and_stderr_keep_their_order(make_sandbox: MakeSandbox) -> None:
    sb = await make_sandbox()
    # Each line is written only once the previous one was received: a strict interleaving.
    proc = await sb.start(["sh", "-c", 'while read s; do case $s in o*) echo "$s";; '
                           'e*) echo "$s" >&2;; esac; done'], stdin=True)
    async with asyncio.timeout(WITHIN):
        chunks = proc.output()
        for i in range(30):
            stream = "stdout" if i % 3 else "stderr"
            line = f"{stream[3]}{i}\n".encode()
            await proc.stdin.write(line)
            assert await anext(chunks) == (stream, line)
        await proc.stdin.close()
        assert [c async for c in chunks] == []
    assert proc.returncode == 0
    # A burst: each stream's own order holds.
    proc = await sb.start(["sh", "-c", "i=0; while [ $i -lt 2000 ]; do echo o$i; echo e$i >&2; "
                           "i=$((i+1)); done"])
    async with asyncio.timeout(WITHIN):
        out, err = await proc.communicate()
    assert out.decode().split() == [f"o{i}" for i in range(2000)]
    assert err.decode().split() == [f"e{i}" for i in range(2000)]


async def test_stdin_far_larger_than_a_pipe_buffer(make_sandbox: MakeSandbox) -> None:
    sb = await make_sandbox()
    data = os.urandom(8 * MiB)
    proc = await sb.start(["cat"], stdin=True, max_buffer=MiB)
    async with asyncio.timeout(WITHIN):
        out, err = await proc.communicate(data)
    assert hashlib.sha256(out).hexdigest() == hashlib.sha256(data).hexdigest()
    assert (err, proc.returncode) == (b"", 0)
    # Written by hand while another task reads: the same bytes.
    proc = await sb.start(["sha256sum"], stdin=True)

    async def feed() -> None:
        for start in range(0, len(data), 3 * MiB):
            await proc.stdin.write(data[start:start + 3 * MiB])
        await proc.stdin.close()

    async with asyncio.timeout(WITHIN):
        _, digest = await asyncio.gather(feed(), proc.stdout.read())
    assert digest.split()[0].decode() == hashlib.sha256(data).hexdigest()


async def test_a_reader_of_stdout_alone_is_not_stuck_by_stderr(
    make_sandbox: MakeSandbox
) -> None:
    sb = await make_sandbox()
    proc = await sb.start(["sh", "-c", "head -c 500000 /dev/zero >&2; echo done"])
    async with asyncio.timeout(WITHIN):
        assert await proc.stdout.read() == b"done\n"
        assert len(await proc.stderr.read()) == 500000


async def test_exit_codes_kill_and_timeout(make_sandbox: MakeSandbox) -> None:
    sb = await make_sandbox()
    async with asyncio.timeout(WITHIN):
        for cmd, code in ((["sh", "-c", "exit 3"], 3), (["false"], 1), (["true"], 0)):
            assert await (await sb.start(cmd)).wait() == code
        proc = await sb.start(["sh", "-c", "sleep 300 & sleep 300; wait"])
        await proc.kill()
        assert await proc.wait() == 137 and proc.timed_out is False
        proc = await sb.start(["sleep", "300"])
        await proc.terminate()
        assert await proc.wait() == 143
        proc = await sb.start(["sleep", "300"], timeout=0.5)
        assert await proc.wait() == 137 and proc.timed_out is True
        assert proc.duration is not None and proc.duration < 30
        listed = {e.exec_id: e for e in await sb.exec_list()}
        assert listed[proc.exec_id].running is False and listed[proc.exec_id].exit_code == 137


async def test_a_tty_is_resized(make_sandbox: MakeSandbox) -> None:
    sb = await make_sandbox()
    proc = await sb.start(["sh"], stdin=True, tty=True, rows=24, cols=80)
    seen = bytearray()
    await proc.write(b"stty size; echo E$((40+2))R >&2\n")  # the tty echoes what is typed:
    await read_until(proc, b"24 80", seen)  # look for what only the commands print
    await read_until(proc, b"E42R", seen)  # a tty has one stream: stderr comes as stdout
    await proc.resize(30, 100)
    await proc.write(b"stty size\n")
    await read_until(proc, b"30 100", seen)
    await proc.write(b"exit 3\n")
    async with asyncio.timeout(WITHIN):
        assert await proc.wait() == 3
        assert await proc.stderr.read() == b""


async def test_detach_then_attach_from_offset_0_on_a_new_connection(
    daemon: Daemon, make_sandbox: MakeSandbox
) -> None:
    sb = await make_sandbox()
    async with SandboxClient(daemon.socket) as first:
        proc = await first.start(sb.id, ["sh", "-c", "echo one; echo err >&2; sleep 1; "
                                         "echo two; exit 5"], detach=True)
        exec_id = proc.exec_id
        async with asyncio.timeout(WITHIN):
            assert await proc.stdout.read(4) == b"one\n"
        # Not detached: killed when its connection closes.
        doomed = await first.start(sb.id, ["sleep", "300"])
    async with SandboxClient(daemon.socket) as second:
        deadline = time.monotonic() + WITHIN
        while True:
            listed = {e.exec_id: e for e in await second.exec_list(sb.id)}
            if doomed.exec_id not in listed or not listed[doomed.exec_id].running:
                break
            assert time.monotonic() < deadline, "the exec outlived its connection"
            await asyncio.sleep(0.05)
        assert listed[exec_id].detached and listed[exec_id].cmd[0] == "sh"
        ps = await second.exec(sb.id, ["ps", "-o", "args"])  # nothing of it left inside
        assert b"sleep 300" not in ps.stdout, ps.stdout
        again = await second.attach(exec_id, offset=0)
        assert again.offset == 0
        async with asyncio.timeout(WITHIN):
            assert await again.communicate() == (b"one\ntwo\n", b"err\n")
        assert again.returncode == 5


def test_blocking_process(daemon: Daemon) -> None:
    with Client(daemon.socket) as c:
        sb = c.create(ttl=120, labels={"suite": "streams"})
        try:
            proc = sb.start(["sh", "-c", "cat; echo bye >&2; exit 4"], stdin=True)
            out, err = proc.communicate(b"x" * (3 * MiB), timeout=WITHIN)
            assert (len(out), err, proc.returncode) == (3 * MiB, b"bye\n", 4)
            proc = sb.start(["sh", "-c", "echo a; echo b >&2"])
            assert sorted(proc.output()) == [("stderr", b"b\n"), ("stdout", b"a\n")]
            assert proc.wait(timeout=WITHIN) == 0
        finally:
            c.remove(sb.id)


async def test_files_in_pieces(make_sandbox: MakeSandbox) -> None:
    sb = await make_sandbox()
    data = os.urandom(5 * MiB + 17)
    async with asyncio.timeout(WITHIN):
        assert await sb.write_file("/tmp/d/big.bin", data, mode=0o600) == len(data)
        assert await sb.read_file("/tmp/d/big.bin") == data
        sink = io.BytesIO()
        assert await sb.read_file_into("/tmp/d/big.bin", sink) == len(data)
        assert sink.getvalue() == data
        r = await sb.exec(["sha256sum", "/tmp/d/big.bin"])
        assert r.stdout.split()[0].decode() == hashlib.sha256(data).hexdigest()
        info = await sb.stat("/tmp/d/big.bin")
        assert isinstance(info, FileInfo)
        assert (info.name, info.size, info.is_dir, info.mode & 0o777) == (
            "big.bin", len(data), False, 0o600)
        assert (await sb.stat("/tmp/d")).is_dir
        await sb.write_file("/tmp/d/small", io.BytesIO(b"abc"))
        await sb.write_file("/tmp/d/empty", b"")
        entries = {e.name: e for e in await sb.listdir("/tmp/d")}
        assert set(entries) == {"big.bin", "small", "empty"}
        assert entries["empty"].size == 0 and await sb.read_file("/tmp/d/empty") == b""
        await sb.write_file("/tmp/d/big.bin", b"short")  # replaced, not overwritten in place
        assert await sb.read_file("/tmp/d/big.bin") == b"short"
        with pytest.raises(NotFound):
            await sb.read_file("/tmp/d/absent")


# -- sandboxctl ------------------------------------------------------------------------------


@pytest.fixture
def sandbox_id(daemon: Daemon) -> Iterator[str]:
    with Client(daemon.socket) as c:
        sb = c.create(ttl=300, labels={"suite": "streams-cli"})
        try:
            yield sb.id
        finally:
            with contextlib.suppress(NotFound):
                c.remove(sb.id)


def ctl(daemon: Daemon, *args: str, **kwargs: object) -> subprocess.CompletedProcess[bytes]:
    env = {k: v for k, v in os.environ.items() if k != "SANDBOXD_SOCKET"}
    return subprocess.run([*SANDBOXCTL, "--socket", daemon.socket, *args], capture_output=True,
                          timeout=WITHIN, env=env, **kwargs)  # type: ignore[call-overload]


def _set_size(fd: int, rows: int, cols: int) -> None:
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))


def _pty_read_until(fd: int, wanted: bytes, seen: bytearray) -> None:
    deadline = time.monotonic() + WITHIN
    while wanted not in seen:
        left = deadline - time.monotonic()
        assert left > 0, f"{wanted!r} never came; got {bytes(seen)!r}"
        if select.select([fd], [], [], left)[0]:
            try:
                seen += os.read(fd, 65536)
            except OSError:
                break
    assert wanted in seen, bytes(seen)


def test_sandboxctl_exec_it_sh_on_a_real_pty(daemon: Daemon, sandbox_id: str) -> None:
    master, slave = os.openpty()
    _set_size(slave, 24, 80)
    before = termios.tcgetattr(slave)
    env = {k: v for k, v in os.environ.items() if k != "SANDBOXD_SOCKET"}
    child = subprocess.Popen(
        [*SANDBOXCTL, "--socket", daemon.socket, "exec", "-it", sandbox_id, "sh"],
        stdin=slave, stdout=slave, stderr=slave, env=env, start_new_session=True,
        preexec_fn=lambda: fcntl.ioctl(0, termios.TIOCSCTTY, 0))
    seen = bytearray()
    try:
        os.write(master, b"stty size\n")
        _pty_read_until(master, b"24 80", seen)
        # Resize the window: SIGWINCH reaches sandboxctl, which resizes the remote tty. The
        # signal and the next keys race, so ask again until the new size shows.
        _set_size(master, 30, 100)
        deadline = time.monotonic() + WITHIN
        while b"30 100" not in seen:
            assert time.monotonic() < deadline, bytes(seen)
            os.write(master, b"stty size\n")
            with contextlib.suppress(AssertionError):
                _pty_read_until_briefly(master, b"30 100", seen)
        os.write(master, b"echo hi; exit 3\n")
        _pty_read_until(master, b"hi\r\n", seen)
        assert child.wait(WITHIN) == 3
        assert termios.tcgetattr(slave) == before
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        os.close(master)
        os.close(slave)


def _pty_read_until_briefly(fd: int, wanted: bytes, seen: bytearray) -> None:
    deadline = time.monotonic() + 0.5
    while wanted not in seen and time.monotonic() < deadline:
        if select.select([fd], [], [], 0.05)[0]:
            seen += os.read(fd, 65536)
    assert wanted in seen


def test_sandboxctl_exec_i_cat_is_binary_safe(daemon: Daemon, sandbox_id: str,
                                              tmp_path: Path) -> None:
    data = os.urandom(5 * MiB) + bytes(range(256))
    src = tmp_path / "in.bin"
    src.write_bytes(data)
    with open(src, "rb") as f:
        proc = ctl(daemon, "exec", "-i", sandbox_id, "cat", stdin=f)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == data and proc.stderr == b""
    proc = ctl(daemon, "exec", "-i", sandbox_id, "--", "sh", "-c", "cat >&2; exit 9",
               input=b"\x00\xff")
    assert (proc.returncode, proc.stdout, proc.stderr) == (9, b"", b"\x00\xff")


def test_sandboxctl_detach_ps_attach(daemon: Daemon, sandbox_id: str) -> None:
    proc = ctl(daemon, "exec", "-d", sandbox_id, "--", "sh", "-c", "echo hello; exit 6")
    assert proc.returncode == 0, proc.stderr
    exec_id = proc.stdout.decode().strip()
    listing = ctl(daemon, "ps", sandbox_id).stdout.decode()
    assert exec_id in listing
    proc = ctl(daemon, "attach", exec_id, "--offset", "0")
    assert (proc.returncode, proc.stdout) == (6, b"hello\n")
    proc = ctl(daemon, "attach", exec_id, "--offset", "2")
    assert (proc.returncode, proc.stdout) == (6, b"llo\n")


def test_sandboxctl_cp_both_ways(daemon: Daemon, sandbox_id: str, tmp_path: Path) -> None:
    data = os.urandom(20 * MiB)
    digest = hashlib.sha256(data).hexdigest()
    src = tmp_path / "big.bin"
    src.write_bytes(data)
    proc = ctl(daemon, "cp", str(src), f"{sandbox_id}:/tmp/big.bin")
    assert proc.returncode == 0, proc.stderr
    inside = ctl(daemon, "exec", sandbox_id, "sha256sum", "/tmp/big.bin")
    assert inside.stdout.split()[0].decode() == digest
    back = tmp_path / "back.bin"
    proc = ctl(daemon, "cp", f"{sandbox_id}:/tmp/big.bin", str(back))
    assert proc.returncode == 0, proc.stderr
    assert hashlib.sha256(back.read_bytes()).hexdigest() == digest
    proc = ctl(daemon, "cp", "-", f"{sandbox_id}:/tmp/from-stdin", input=data)
    assert proc.returncode == 0, proc.stderr
    proc = ctl(daemon, "cp", f"{sandbox_id}:/tmp/from-stdin", "-")
    assert proc.returncode == 0 and hashlib.sha256(proc.stdout).hexdigest() == digest
