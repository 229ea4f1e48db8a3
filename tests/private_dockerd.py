"""A private Docker Engine for tests that stop and restart the engine under a daemon.

The host's engine is shared (other tests, other sessions), so a test that
takes the engine away runs its own ``dockerd`` instead: own data root, exec
root (hence its own managed containerd), socket and pid file, all under one
short directory in /tmp, no bridge and no iptables rules, and
``--live-restore`` so that its containers outlive a restart of the engine.

``PrivateDockerd`` starts and stops that engine (SIGTERM, then wait) any
number of times over the same directories; ``private_dockerd()`` is the
context manager that creates it, loads the base image into it and, whatever
happens, removes every container it holds, stops it and deletes the
directory (unmounting what the engine left mounted there). The conftest leak
check only watches the host's engine, so this teardown is the only thing
that cleans the private one.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

BASE_IMAGE = "sandboxd/base:latest"
START_TIMEOUT = 60.0
STOP_TIMEOUT = 60.0


class EngineStartError(RuntimeError):
    """The private dockerd did not come up."""


class PrivateDockerd:
    """One private ``dockerd`` rooted at ``root`` (started with :meth:`start`)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.data_root = root / "data"
        self.exec_root = root / "exec"
        self.socket = root / "docker.sock"
        self.pidfile = root / "docker.pid"
        self.config_file = root / "daemon.json"
        self.log_path = root / "dockerd.log"
        self.host = f"unix://{self.socket}"
        self.proc: subprocess.Popen[bytes] | None = None
        # The host's /etc/docker/daemon.json (if any) must not leak into this engine.
        self.config_file.write_text("{}\n")

    # the process ------------------------------------------------------------
    def command(self) -> list[str]:
        return [
            "dockerd",
            "--config-file", str(self.config_file),
            "--data-root", str(self.data_root),
            "--exec-root", str(self.exec_root),
            "-H", self.host,
            "--pidfile", str(self.pidfile),
            "--bridge=none",
            "--iptables=false",
            "--ip-masq=false",
            "--live-restore",
        ]

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self, timeout: float = START_TIMEOUT) -> None:
        """Start the engine and wait until ``docker info`` answers on its socket."""
        if self.running:
            return
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                self.command(), stdout=log, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, start_new_session=True,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise EngineStartError(
                    f"the private dockerd exited with status {self.proc.returncode}:\n"
                    f"{self.log_tail()}")
            if self.answers():
                return
            time.sleep(0.05)
        raise EngineStartError(f"the private dockerd did not answer within {timeout:g} s:\n"
                               f"{self.log_tail()}")

    def stop(self, timeout: float = STOP_TIMEOUT) -> None:
        """SIGTERM the engine and wait for it to exit (SIGKILL after ``timeout``).

        With live-restore its containers keep running (their shims stay).
        """
        proc = self.proc
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.proc = None
        self._kill_leftover_containerd()

    def _kill_leftover_containerd(self) -> None:
        """The managed containerd normally exits with dockerd; make sure of it."""
        pidfile = self.exec_root / "containerd" / "containerd.pid"
        with contextlib.suppress(OSError, ValueError):
            pid = int(pidfile.read_text().strip())
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            if str(self.exec_root).encode() in cmdline:  # ours, not a recycled pid
                os.kill(pid, signal.SIGKILL)

    def answers(self) -> bool:
        """True when ``docker info`` succeeds against this engine."""
        if not self.socket.exists():
            return False
        try:
            proc = subprocess.run(["docker", "-H", self.host, "info"],
                                  capture_output=True, timeout=10)
        except subprocess.TimeoutExpired:
            return False
        return proc.returncode == 0

    def log_tail(self, lines: int = 30) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    # the CLI against this engine ----------------------------------------
    def docker(self, *args: str, check: bool = True, timeout: float = 60) -> str:
        proc = subprocess.run(["docker", "-H", self.host, *args],
                              capture_output=True, text=True, timeout=timeout)
        if check and proc.returncode != 0:
            raise RuntimeError(f"docker -H {self.host} {' '.join(args)} failed: "
                               f"{proc.stderr.strip()}")
        return proc.stdout

    def load_image(self, ref: str = BASE_IMAGE) -> None:
        """Copy ``ref`` from the host's engine into this one (``docker save | load``)."""
        with subprocess.Popen(["docker", "save", ref], stdout=subprocess.PIPE) as save:
            load = subprocess.run(["docker", "-H", self.host, "load"], stdin=save.stdout,
                                  capture_output=True, timeout=120)
        if save.returncode != 0 or load.returncode != 0:
            raise RuntimeError(f"loading {ref} into the private engine failed: "
                               f"{load.stderr.decode(errors='replace').strip()}")

    def containers(self, *filters: str) -> list[str]:
        """Full ids of all containers (``filters``: ``docker ps --filter`` values)."""
        args = ["ps", "-aq", "--no-trunc"]
        for f in filters:
            args += ["--filter", f]
        return self.docker(*args).split()

    def remove_all_containers(self) -> None:
        ids = self.containers()
        if ids:
            self.docker("rm", "-f", *ids, check=False)

    # teardown -------------------------------------------------------------
    def destroy(self) -> None:
        """Remove every container, stop the engine, unmount and delete the directory.

        Containers outlive a stopped engine (live-restore), so the engine is
        started again if needed to remove them. Never raises.
        """
        try:
            with contextlib.suppress(Exception):
                self.start()
            with contextlib.suppress(Exception):
                self.remove_all_containers()
        finally:
            with contextlib.suppress(Exception):
                self.stop()
            self._unmount_all()
            shutil.rmtree(self.root, ignore_errors=True)

    def _unmount_all(self) -> None:
        prefix = str(self.root) + "/"
        try:
            with open("/proc/self/mountinfo") as fh:
                points = [line.split()[4] for line in fh]
        except OSError:
            return
        mine = [p for p in points if p == str(self.root) or p.startswith(prefix)]
        for point in sorted(set(mine), key=len, reverse=True):  # deepest first
            subprocess.run(["umount", "-l", point], capture_output=True, check=False)


@contextlib.contextmanager
def private_dockerd(image: str | None = BASE_IMAGE) -> Iterator[PrivateDockerd]:
    """A running private engine with ``image`` loaded; destroyed on exit."""
    root = Path(tempfile.mkdtemp(prefix="pd-", dir="/tmp"))  # short: socket paths
    engine = PrivateDockerd(root)
    try:
        engine.start()
        if image is not None:
            engine.load_image(image)
        yield engine
    finally:
        engine.destroy()
