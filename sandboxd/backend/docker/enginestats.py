"""The engine's stats samples turned into SPEC §3 ``sandbox.stats`` figures.

The fallback for when the host's cgroup files are not visible (``cgroupstats``).

Owns the CPU percentage between two samples (a one-shot sample carries no
previous CPU reading) and the memory/pids/network sums. Pure: no I/O.
"""

from __future__ import annotations

from typing import Any


def cpu_percent(sample: dict[str, Any], previous: dict[str, Any] | None) -> float:
    if previous is None:
        return 0.0
    cur, prev = sample.get("cpu_stats") or {}, previous.get("cpu_stats") or {}
    cpu_delta = cur.get("cpu_usage", {}).get("total_usage", 0) - prev.get("cpu_usage", {}).get(
        "total_usage", 0
    )
    system_delta = cur.get("system_cpu_usage", 0) - prev.get("system_cpu_usage", 0)
    online = cur.get("online_cpus") or len(cur.get("cpu_usage", {}).get("percpu_usage") or []) or 1
    if cpu_delta <= 0 or system_delta <= 0:
        return 0.0
    return round(float(cpu_delta) / float(system_delta) * float(online) * 100.0, 2)


def memory_bytes(sample: dict[str, Any]) -> int:
    mem = sample.get("memory_stats") or {}
    usage = int(mem.get("usage", 0))
    inner = mem.get("stats") or {}
    # Like `docker stats`: page cache that could be dropped is not counted.
    cache = inner.get("total_inactive_file", inner.get("inactive_file", 0))
    return max(0, usage - int(cache))


def summarize(sample: dict[str, Any], previous: dict[str, Any] | None) -> dict[str, Any]:
    networks = sample.get("networks") or {}
    return {
        "cpu_percent": cpu_percent(sample, previous),
        "memory_bytes": memory_bytes(sample),
        "memory_limit_bytes": int((sample.get("memory_stats") or {}).get("limit", 0)),
        "pids": int((sample.get("pids_stats") or {}).get("current", 0)),
        "net_rx_bytes": sum(int(n.get("rx_bytes", 0)) for n in networks.values()),
        "net_tx_bytes": sum(int(n.get("tx_bytes", 0)) for n in networks.values()),
    }
