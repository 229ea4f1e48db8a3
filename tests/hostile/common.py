"""Helpers shared by the hostile-code tests (``test_inside_attacks``, ``test_agent_hostile``,
``test_gvisor``): building the C probes of this folder, polling with a deadline, the process
list of a sandbox, and the daemon's memory watched from the host.

Nothing here starts daemons or sandboxes: the tests own what they create.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from sandboxd_client import NotFound
from sandboxd_client.aio import Sandbox

HERE = Path(__file__).resolve().parent
KIB = 1024
MIB = 1024 * 1024


def build_static(source: str, out_dir: Path) -> Path:
    """Compile ``tests/hostile/<source>`` with ``gcc -static -O2`` into ``out_dir``.

    Skips the calling test when gcc (or a static libc) is missing: the probes are then the
    only thing that cannot run, and the reason says so.
    """
    gcc = shutil.which("gcc")
    if gcc is None:
        pytest.skip("gcc is not installed (scripts/setup.sh installs it): no static C probe")
    out = out_dir / Path(source).stem
    proc = subprocess.run(
        [gcc, "-static", "-O2", "-Wall", "-Wextra", "-o", str(out), str(HERE / source)],
        capture_output=True, text=True, timeout=120,
    )
    if proc.returncode != 0:
        if "cannot find -lc" in proc.stderr:
            pytest.skip(f"gcc has no static libc (install libc6-dev): {proc.stderr.strip()}")
        raise RuntimeError(f"gcc failed on {source}:\n{proc.stderr}")
    out.chmod(0o755)
    return out



async def processes(sb: Sandbox) -> list[tuple[int, int, str]]:
    """The sandbox's processes as ``(pid, ppid, args)`` (busybox ps, from inside)."""
    r = await sb.exec(["ps", "-o", "pid,ppid,args"], timeout=30)
    assert r.exit_code == 0, r.stderr
    out = []
    for line in r.stdout.decode(errors="replace").splitlines()[1:]:
        pid, ppid, args = line.split(None, 2)
        out.append((int(pid), int(ppid), args))
    return out


async def remove_and_wait(sb: Sandbox, engine_host: str | None = None,
                          within: float = 60.0, daemon_log: Callable[[], str] | None = None,
                          engine_log: Callable[[], str] | None = None) -> None:
    """Remove ``sb`` and wait until its container is gone from the engine.

    The daemon answers ``sandbox.remove`` once the container is killed and deletes it in
    the background; a daemon that is SIGKILLed right after (the ``spawn_daemon`` teardown)
    would leave it behind, and the leak check could see it. On failure the daemon's log
    lines about that container (``daemon_log``) and the engine's (``engine_log``) are
    shown."""
    cid = sb.container_id
    with contextlib.suppress(NotFound):
        await sb.remove()
    if not cid:
        return
    cmd = ["docker", *(["-H", engine_host] if engine_host else []), "inspect", cid]
    deadline = time.monotonic() + within
    while True:
        proc = await asyncio.create_subprocess_exec(
            *cmd, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)
        if await proc.wait() != 0:
            return
        if time.monotonic() > deadline:
            lines = [line for line in (daemon_log() if daemon_log else "").splitlines()
                     if cid[:12] in line or sb.id in line]
            engine = [line for line in (engine_log() if engine_log else "").splitlines()
                      if cid[:12] in line or "level=error" in line or "level=warn" in line]
            pytest.fail(f"container {cid[:12]} of sandbox {sb.id} still on the engine "
                        f"{within:g} s after sandbox.remove; daemon log:\n"
                        + "\n".join(lines[-20:]) + "\nengine log:\n"
                        + "\n".join(engine[-20:]))
        await asyncio.sleep(0.1)


def matching(procs: list[tuple[int, int, str]], needle: str) -> list[tuple[int, int, str]]:
    return [p for p in procs if needle in p[2]]


def strangers(procs: list[tuple[int, int, str]]) -> list[tuple[int, int, str]]:
    """What runs besides the agent (PID 1 and the supervisors it forks, all shown as
    ``/.sandboxd/agent``) and the ``ps`` that listed them."""
    return [p for p in procs
            if not p[2].startswith("/.sandboxd/agent") and not p[2].startswith("ps ")]


def status_field(pid: int, key: str) -> int:
    """A ``kB`` field of ``/proc/<pid>/status`` (``VmRSS``, ``VmHWM``) in bytes."""
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * KIB
    raise KeyError(key)


class RssWatch:
    """The peak resident memory of a host process over a stretch of time.

    Two independent readings: ``VmHWM`` after resetting it (``clear_refs`` 5, as root),
    which the kernel keeps exactly, and ``VmRSS`` sampled every 10 ms by a thread (for
    when the reset is not allowed). ``peak`` is the larger of the two.
    """

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.baseline = status_field(pid, "VmRSS")
        self.sampled = self.baseline
        self.hwm_reset = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.wait(0.01):
            try:
                self.sampled = max(self.sampled, status_field(self.pid, "VmRSS"))
            except (OSError, KeyError):
                return

    def __enter__(self) -> RssWatch:
        try:
            with open(f"/proc/{self.pid}/clear_refs", "w") as fh:
                fh.write("5")
            self.hwm_reset = True
        except OSError:
            self.hwm_reset = False
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def peak(self) -> int:
        peak = self.sampled
        if self.hwm_reset:
            peak = max(peak, status_field(self.pid, "VmHWM"))
        return peak

    @property
    def growth(self) -> int:
        return self.peak - self.baseline

    def describe(self) -> str:
        return (f"daemon RSS baseline {self.baseline / MIB:.1f} MiB, peak {self.peak / MIB:.1f} "
                f"MiB (+{self.growth / MIB:.1f} MiB; VmHWM reset: {self.hwm_reset})")
