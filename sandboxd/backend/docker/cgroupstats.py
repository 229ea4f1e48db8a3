"""Container resource figures read straight from the host's cgroup files.

The engine's stats endpoint samples once a second, so back-to-back calls
wait up to a second; the cgroup files answer in microseconds. This module
owns finding a container's cgroup directories (v1 or v2) from its main
process's /proc/<pid>/cgroup, reading one sample, and turning two samples
into SPEC §3 ``sandbox.stats`` figures. It must not call the engine; when
the files are not visible (a remote engine, another namespace) it raises
``OSError`` and the caller falls back to the engine.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

CGROUP_ROOT = Path("/sys/fs/cgroup")
PROC = Path("/proc")


@dataclass(frozen=True, slots=True)
class Sample:
    at_ns: int
    cpu_ns: int
    memory: int
    memory_limit: int
    pids: int
    rx: int
    tx: int


def _v1_dir(controllers: str, rel: str) -> Path | None:
    for mount in (controllers, *controllers.split(",")):
        path = CGROUP_ROOT / mount / rel.lstrip("/")
        if path.is_dir():
            return path
    return None


def _stat_value(text: str, key: str) -> int:
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        if name == key:
            return int(value)
    return 0


class CgroupReader:
    """Reads one container's figures; built from the host pid of its PID 1."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        lines = (PROC / str(pid) / "cgroup").read_text().splitlines()
        v1: dict[str, Path] = {}
        unified: Path | None = None
        for line in lines:
            _, controllers, rel = line.split(":", 2)
            if controllers == "":
                for base in (CGROUP_ROOT / "unified", CGROUP_ROOT):
                    candidate = base / rel.lstrip("/")
                    if (candidate / "cgroup.procs").exists():
                        unified = candidate
                        break
                continue
            found = _v1_dir(controllers, rel)
            if found is not None:
                for name in controllers.split(","):
                    v1[name] = found
        if "memory" in v1 and "cpuacct" in v1:
            self.v2 = False
            self.cpu_file = v1["cpuacct"] / "cpuacct.usage"
            self.mem_dir = v1["memory"]
            self.pids_file = (v1.get("pids") or v1["memory"]) / "pids.current"
        elif unified is not None and (unified / "memory.current").exists():
            self.v2 = True
            self.cpu_file = unified / "cpu.stat"
            self.mem_dir = unified
            self.pids_file = unified / "pids.current"
        else:
            raise FileNotFoundError(f"no cgroup files for pid {pid}")
        self.sample()  # fail now, not later, when something is missing

    def _cpu_ns(self) -> int:
        text = self.cpu_file.read_text()
        return _stat_value(text, "usage_usec") * 1000 if self.v2 else int(text)

    def _memory(self) -> tuple[int, int]:
        stat = (self.mem_dir / "memory.stat").read_text()
        if self.v2:
            usage = int((self.mem_dir / "memory.current").read_text())
            raw_limit = (self.mem_dir / "memory.max").read_text().strip()
            limit = 0 if raw_limit == "max" else int(raw_limit)
            inactive = _stat_value(stat, "inactive_file")
        else:
            usage = int((self.mem_dir / "memory.usage_in_bytes").read_text())
            limit = int((self.mem_dir / "memory.limit_in_bytes").read_text())
            inactive = _stat_value(stat, "total_inactive_file")
        return max(0, usage - inactive), limit

    def _net(self) -> tuple[int, int]:
        rx = tx = 0
        for line in (PROC / str(self.pid) / "net" / "dev").read_text().splitlines()[2:]:
            name, _, data = line.partition(":")
            if name.strip() == "lo":
                continue
            fields = data.split()
            rx += int(fields[0])
            tx += int(fields[8])
        return rx, tx

    def sample(self) -> Sample:
        memory, limit = self._memory()
        rx, tx = self._net()
        try:
            pids = int(self.pids_file.read_text())
        except FileNotFoundError:
            pids = 0
        return Sample(time.monotonic_ns(), self._cpu_ns(), memory, limit, pids, rx, tx)


def summarize(
    sample: Sample, previous: Sample | None, started_ns: int | None = None
) -> dict[str, Any]:
    """Wire figures; CPU is the percentage of one CPU since ``previous``.

    Without a previous sample, the average since the container started.
    """
    if previous is not None and sample.at_ns > previous.at_ns:
        cpu = (sample.cpu_ns - previous.cpu_ns) / (sample.at_ns - previous.at_ns)
    elif started_ns is not None and sample.at_ns > started_ns:
        cpu = sample.cpu_ns / (sample.at_ns - started_ns)
    else:
        cpu = 0.0
    return {
        "cpu_percent": round(max(0.0, cpu) * 100.0, 2),
        "memory_bytes": sample.memory,
        "memory_limit_bytes": sample.memory_limit,
        "pids": sample.pids,
        "net_rx_bytes": sample.rx,
        "net_tx_bytes": sample.tx,
    }


def visible() -> bool:
    """Whether this process can read cgroup files at all."""
    return os.path.isdir(CGROUP_ROOT)
