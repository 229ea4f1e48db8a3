"""The real daemon under systemd's protocols, without systemd as PID 1.

Runs ``python -m sandboxd serve`` as a subprocess: once behind
``systemd-socket-activate`` (a client that connects before the daemon exists
is served on the inherited socket), once with a ``$NOTIFY_SOCKET`` this test
owns (READY=1, then watchdog pings, then STOPPING=1 after SIGTERM, and exit
status 0). The daemon talks to the local Docker Engine; if the engine is
down it still starts and answers ``daemon.ping``.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO

import pytest
from conftest import SESSION, call_on

REPO = Path(__file__).resolve().parents[1]
START_TIMEOUT = 60.0  # the daemon's start-up: imports, state dir, adopting containers
STOP_TIMEOUT = 30.0
PING = [0, 1, "daemon.ping", []]
PONG = [1, 1, None, "pong"]


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A directory with a short path: AF_UNIX paths are limited to 107 bytes."""
    path = Path(tempfile.mkdtemp(prefix="sdl-", dir="/tmp"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


class Daemon:
    """One daemon subprocess, its stderr kept in a file for failure messages."""

    def __init__(self, cmd: list[str], env: dict[str, str], log_path: Path) -> None:
        self.log_path = log_path
        self._log: IO[bytes] = open(log_path, "wb")  # closed in stop()
        self.proc = subprocess.Popen(
            cmd,
            env=env,
            cwd=REPO,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]

    def check_alive(self) -> None:
        code = self.proc.poll()
        if code is not None:
            pytest.fail(f"the daemon exited early with status {code}:\n{self.log()}")

    def stop(self) -> None:
        """Teardown: whatever state it is in, it is gone afterwards."""
        try:
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGTERM)
                try:
                    self.proc.wait(timeout=STOP_TIMEOUT)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait(timeout=STOP_TIMEOUT)
        finally:
            self._log.close()


@pytest.fixture
def spawn(short_dir: Path) -> Iterator[Callable[[list[str], dict[str, str]], Daemon]]:
    started: list[Daemon] = []

    def start(cmd: list[str], env: dict[str, str]) -> Daemon:
        daemon = Daemon(cmd, env, short_dir / f"daemon-{len(started)}.log")
        started.append(daemon)
        return daemon

    try:
        yield start
    finally:
        for daemon in started:
            daemon.stop()


def _daemon_env(state_dir: Path) -> dict[str, str]:
    """The test's environment without anything that would steer the daemon elsewhere."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("LISTEN_", "NOTIFY_", "WATCHDOG_", "SANDBOXD_"))
    }
    env["SANDBOXD_STATE_DIR"] = str(state_dir)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return env


def _daemon_cmd(socket_path: Path) -> list[str]:
    return [sys.executable, "-m", "sandboxd", "serve", "--socket", str(socket_path)]


def _wait_for(condition: Callable[[], bool], daemon: Daemon, within: float, what: str) -> None:
    deadline = time.monotonic() + within
    while not condition():
        daemon.check_alive()
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}:\n{daemon.log()}")
        time.sleep(0.02)


def test_socket_activation_serves_a_client_that_came_first(
    short_dir: Path, spawn: Callable[[list[str], dict[str, str]], Daemon]
) -> None:
    tool = shutil.which("systemd-socket-activate")
    if tool is None:
        pytest.fail("systemd-socket-activate is not installed: apt-get install systemd")
    path = short_dir / "api.sock"
    env = _daemon_env(short_dir / "state")
    # systemd-socket-activate passes only PATH, HOME, USER and TERM on by
    # itself: everything else the daemon needs goes through -E.
    passed = [
        f"--setenv={k}={env[k]}"
        for k in ("SANDBOXD_STATE_DIR", "PYTHONPATH", "DOCKER_HOST")
        if k in env
    ]
    cmd = [tool, f"--listen={path}", "--fdname=sandboxd", *passed, *_daemon_cmd(path)]
    daemon = spawn(cmd, env)

    _wait_for(path.exists, daemon, 10, "systemd-socket-activate to listen")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
        # systemd-socket-activate execs the daemon only once this connection
        # arrives: the client connects and writes before the daemon runs.
        client.connect(str(path))
        assert call_on(client, PING, START_TIMEOUT) == PONG
    # The same process (exec, not fork) now is the daemon.
    cmdline = Path(f"/proc/{daemon.proc.pid}/cmdline").read_bytes().split(b"\0")
    assert b"sandboxd" in cmdline and b"serve" in cmdline

    daemon.proc.send_signal(signal.SIGTERM)
    assert daemon.proc.wait(timeout=STOP_TIMEOUT) == 0, daemon.log()


class NotifyListener:
    """The service manager's end of ``$NOTIFY_SOCKET``: records every assignment."""

    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.lines: list[str] = []

    def wait_for(self, line: str, daemon: Daemon, within: float, start: int = 0) -> int:
        """Index of the first ``line`` at or after ``start``, receiving until it comes."""
        deadline = time.monotonic() + within
        while True:
            if line in self.lines[start:]:
                return self.lines.index(line, start)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                pytest.fail(f"no {line} within {within}s; got {self.lines}:\n{daemon.log()}")
            self.sock.settimeout(min(remaining, 0.5))
            try:
                datagram = self.sock.recv(65536)
            except TimeoutError:
                if line != "STOPPING=1":  # after SIGTERM, exiting is expected
                    daemon.check_alive()
                continue
            self.lines.extend(datagram.decode().split("\n"))

    def drain(self) -> None:
        """Receive every datagram already queued (say, from a daemon that has exited)."""
        self.sock.setblocking(False)
        try:
            while True:
                self.lines.extend(self.sock.recv(65536).decode().split("\n"))
        except BlockingIOError:
            pass
        finally:
            self.sock.setblocking(True)


@pytest.fixture
def notify_listener(short_dir: Path) -> Iterator[NotifyListener]:
    listener = NotifyListener(short_dir / "notify")
    try:
        yield listener
    finally:
        listener.sock.close()


def test_notify_ready_watchdog_stopping(
    short_dir: Path,
    spawn: Callable[[list[str], dict[str, str]], Daemon],
    notify_listener: NotifyListener,
) -> None:
    path = short_dir / "api.sock"
    env = _daemon_env(short_dir / "state")
    env["NOTIFY_SOCKET"] = str(short_dir / "notify")
    env["WATCHDOG_USEC"] = "200000"  # a ping every 0.1 s
    daemon = spawn(_daemon_cmd(path), env)

    ready = notify_listener.wait_for("READY=1", daemon, START_TIMEOUT)
    # READY=1 means serving: a client connecting now is answered.
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
        client.connect(str(path))
        assert call_on(client, PING, 10) == PONG
    ping = notify_listener.wait_for("WATCHDOG=1", daemon, 5, start=ready + 1)
    # Pings keep coming, one per interval, while the daemon idles.
    notify_listener.wait_for("WATCHDOG=1", daemon, 5, start=ping + 1)

    before_sigterm = len(notify_listener.lines)
    assert "STOPPING=1" not in notify_listener.lines
    daemon.proc.send_signal(signal.SIGTERM)
    stopping = notify_listener.wait_for("STOPPING=1", daemon, STOP_TIMEOUT, start=before_sigterm)
    assert ready < ping < stopping
    assert daemon.proc.wait(timeout=STOP_TIMEOUT) == 0, daemon.log()
    statuses = [line for line in notify_listener.lines if line.startswith("STATUS=")]
    assert statuses and str(path) in statuses[0]  # READY's status names the socket


def test_cleanup_on_exit_asks_systemd_for_more_time(
    short_dir: Path,
    spawn: Callable[[list[str], dict[str, str]], Daemon],
    notify_listener: NotifyListener,
) -> None:
    """Removing sandboxes at exit can outlast the stop timeout: EXTEND_TIMEOUT_USEC asks
    for the time before each removal, and STATUS says how many are left."""
    path = short_dir / "api.sock"
    env = _daemon_env(short_dir / "state")
    env["NOTIFY_SOCKET"] = str(short_dir / "notify")
    env["SANDBOXD_INSTANCE"] = f"{SESSION}-extend"
    daemon = spawn([*_daemon_cmd(path), "--cleanup-on-exit"], env)
    notify_listener.wait_for("READY=1", daemon, START_TIMEOUT)
    made: list[str] = []
    try:
        for _ in range(2):
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
                client.connect(str(path))
                reply = call_on(client, [0, 1, "sandbox.create", [{"ttl": 300}]], 60)
            assert reply[2] is None, reply
            made.append(reply[3]["container_id"])
        before = len(notify_listener.lines)
        daemon.proc.send_signal(signal.SIGTERM)
        notify_listener.wait_for("STOPPING=1", daemon, STOP_TIMEOUT, start=before)
        assert daemon.proc.wait(timeout=STOP_TIMEOUT) == 0, daemon.log()
        notify_listener.drain()
        extends = [x for x in notify_listener.lines[before:]
                   if x.startswith("EXTEND_TIMEOUT_USEC=")]
        assert len(extends) >= 2 and all(int(x.split("=")[1]) > 0 for x in extends)
        assert any("sandboxes, 0 left" in x for x in notify_listener.lines[before:])
        left = subprocess.run(
            ["docker", "ps", "-aq", "--filter", f"label=io.sandboxd.instance={SESSION}-extend"],
            capture_output=True, text=True, timeout=60).stdout.split()
        assert left == []
    finally:
        if made:
            subprocess.run(["docker", "rm", "-f", *made], capture_output=True, timeout=60)
