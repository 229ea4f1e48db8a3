"""A private ``sandboxd serve`` for the benchmarks that start their own daemon.

``DaemonProcess`` owns one daemon of the code beside the benchmarks (``python -m
sandboxd serve``, run from the repository root) and everything it is given: one
temporary directory in ``/tmp`` (short, for the socket paths) with its socket, state
directory, config file and log, an ``SANDBOXD_INSTANCE`` of its own (so that its
containers are told from any other daemon's) and, when asked, a ``NOTIFY_SOCKET`` to
receive its ``READY=1``. It starts, SIGKILLs and stops the daemon, connects to it once
it answers ``daemon.ping`` (with the raw client of ``benchmarks.common``), tells a
failure with the last lines of the daemon's log, and removes what the instance left in
the engine (``docker rm -f`` in batches, ``docker_ids`` and ``remove_containers``, which
``bench_pool`` also uses for its raw containers) and the temporary directory.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Collection
from pathlib import Path

from .common import RpcClient, RpcError, log

PROJECT_ROOT = Path(__file__).resolve().parent.parent
START_TIMEOUT = 60.0
STOP_GRACE = 10.0
# What the caller's environment may hold that would point the daemon elsewhere.
INHERITED = (
    "SANDBOXD_SOCKET",
    "SANDBOXD_CONFIG",
    "NOTIFY_SOCKET",
    "WATCHDOG_USEC",
    "WATCHDOG_PID",
    "LISTEN_FDS",
    "LISTEN_PID",
    "LISTEN_FDNAMES",
)


def docker_ids(kind: str, filters: list[str]) -> list[str]:
    """The ids ``docker ps -a`` (``kind`` "ps") or ``docker images`` ("images") lists
    under any one of ``filters`` (``label=...``)."""
    found: set[str] = set()
    for flt in filters:
        cmd = ["docker", kind, "-q", "--no-trunc", "--filter", flt]
        if kind == "ps":
            cmd.insert(2, "-a")
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        found |= set(out.stdout.split())
    return sorted(found)


def remove_containers(find: Callable[[], Collection[str]]) -> int:
    """``docker rm -f`` what ``find`` lists, 100 at a time, until it lists nothing (three
    rounds at most): how many were removed."""
    removed = 0
    for _ in range(3):
        ids = list(find())
        if not ids:
            break
        for i in range(0, len(ids), 100):
            subprocess.run(
                ["docker", "rm", "-f", *ids[i : i + 100]], capture_output=True, timeout=600
            )
        removed += len(ids)
    return removed


class DaemonProcess:
    """One private daemon: ``name`` prefixes its instance (``name-<pid>-<time>``),
    ``prefix`` its temporary directory; it logs at ``log_level`` with ``config`` as its
    config file; ``notify`` binds a ``NOTIFY_SOCKET`` for ``spawn(notify=True)``."""

    def __init__(
        self, name: str, prefix: str, log_level: str, config: str = "", notify: bool = False
    ) -> None:
        self.workdir = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))  # short: socket paths
        self.socket = str(self.workdir / "sandboxd.sock")
        self.notify_path = str(self.workdir / "notify.sock")
        self.config = self.workdir / "config.toml"
        self.config.write_text(config)
        self.log = self.workdir / "daemon.log"
        self.instance = f"{name}-{os.getpid()}-{int(time.time())}"
        self.env = {
            **os.environ,
            "SANDBOXD_STATE_DIR": str(self.workdir / "state"),
            "SANDBOXD_INSTANCE": self.instance,
            "SANDBOXD_LOG_LEVEL": log_level,
        }
        for var in INHERITED:
            self.env.pop(var, None)
        self.proc: subprocess.Popen[bytes] | None = None
        self.notify: socket.socket | None = None
        if notify:
            self.notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            self.notify.bind(self.notify_path)
            self.notify.setblocking(False)

    @property
    def pid(self) -> int:
        """The running daemon's pid, 0 when none was spawned."""
        return self.proc.pid if self.proc is not None else 0

    # the process -------------------------------------------------------------------
    def spawn(self, notify: bool = False) -> subprocess.Popen[bytes]:
        """Start the daemon (its output appended to the log), with ``NOTIFY_SOCKET`` set
        when ``notify``."""
        env = dict(self.env)
        if notify:
            env["NOTIFY_SOCKET"] = self.notify_path
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "sandboxd",
                    "serve",
                    "--socket",
                    self.socket,
                    "--config",
                    str(self.config),
                ],
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=str(PROJECT_ROOT),
            )
        return self.proc

    def kill(self) -> None:
        """SIGKILL (a crash) and reap it."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()
        self.proc = None

    def stop(self, grace: float = STOP_GRACE) -> None:
        """SIGTERM, then SIGKILL after the grace."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(grace)
            except subprocess.TimeoutExpired:
                self.kill()
        self.proc = None

    def check_alive(self) -> None:
        """An error when the daemon spawned last has exited."""
        if self.proc is not None and self.proc.poll() is not None:
            raise RuntimeError(f"the daemon exited with status {self.proc.returncode}")

    # talking to it -------------------------------------------------------------------
    async def connect(self, poll: float, within: float = START_TIMEOUT) -> RpcClient:
        """A connection whose ``daemon.ping`` was answered, tried every ``poll`` seconds
        for ``within`` seconds (an error at once if the daemon exits)."""
        deadline = time.monotonic() + within
        while True:
            self.check_alive()
            rpc: RpcClient | None = None
            try:
                rpc = await RpcClient.connect(self.socket)
                async with asyncio.timeout(2.0):
                    if await rpc.call("daemon.ping") == "pong":
                        return rpc
            except (ConnectionError, RpcError, TimeoutError):
                pass
            if rpc is not None:
                await rpc.close()
            if time.monotonic() > deadline:
                raise RuntimeError("the daemon did not answer daemon.ping in time")
            await asyncio.sleep(poll)

    def drain_notify(self) -> None:
        """Drop the datagrams an earlier daemon left on the notify socket."""
        assert self.notify is not None
        with contextlib.suppress(BlockingIOError):
            while True:
                self.notify.recv(4096)

    async def wait_ready1(self, t0: float) -> float:
        """Seconds from ``t0`` (perf_counter) until a ``READY=1`` datagram arrives."""
        assert self.notify is not None
        loop = asyncio.get_running_loop()
        while True:
            data = await loop.sock_recv(self.notify, 4096)
            if b"READY=1" in data.split(b"\n"):
                return time.perf_counter() - t0

    def report_error(self, name: str, exc: BaseException) -> None:
        """Tell a failure in one line, then the last lines of the daemon's log."""
        log(f"{name}: {exc!r}")
        with contextlib.suppress(OSError):
            tail = self.log.read_text().splitlines()[-15:]
            log("daemon log (last lines):\n  " + "\n  ".join(tail))

    # cleanup ---------------------------------------------------------------------------
    @property
    def instance_filter(self) -> str:
        return f"label=io.sandboxd.instance={self.instance}"

    def containers(self) -> list[str]:
        """The ids of every container of this instance the engine holds."""
        return docker_ids("ps", [self.instance_filter])

    def remove_containers(self) -> int:
        """``docker rm -f`` every container of this instance: how many."""
        return remove_containers(self.containers)

    def close(self) -> None:
        """Close the notify socket and delete the temporary directory (log included)."""
        if self.notify is not None:
            self.notify.close()
            self.notify = None
        shutil.rmtree(self.workdir, ignore_errors=True)
