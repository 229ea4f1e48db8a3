"""What a Docker sandbox writes to the host's disk: the enforcement in force, usage, free space.

Owns choosing how a sandbox's ``disk`` limit is held on this engine: the
storage driver's own quota (``--storage-opt size``: btrfs and zfs, overlay2
on xfs mounted with ``pquota``) where the engine supports it, otherwise
measurement: RLIMIT_FSIZE stops any one file at the limit, and the
sandbox's writable layer plus the hostname, hosts and resolv.conf files the
engine keeps for it are walked and added up (``usage``) for the services to
act on. It also reads the free space of the engine's data root. Host file
reads only; it must not decide what happens to a sandbox over its limit.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from typing import Any

QUOTA = "quota"
MEASURED = "measured"
QUOTA_DRIVERS = ("btrfs", "zfs")
REFUSAL = "--storage-opt is supported only"  # the engine's words when it has no quota


@dataclass
class Layout:
    """Where one container's writes land on the host."""

    upper: str | None  # its writable layer (overlay2 upperdir), None when unknown
    files: tuple[str, ...]  # the engine's per-container files it may write to


def enforcement_from_info(info: dict[str, Any]) -> str:
    """The strongest enforcement the engine's storage offers, from ``docker info``."""
    driver = str(info.get("Driver") or "")
    status = {str(k): str(v) for k, v in (info.get("DriverStatus") or [])}
    if driver in QUOTA_DRIVERS:
        return QUOTA
    if driver == "overlay2" and status.get("Backing Filesystem") == "xfs":
        return QUOTA  # if it was not mounted with pquota, the first create says so
    return MEASURED


def layout_from_inspect(data: dict[str, Any]) -> Layout:
    graph = (data.get("GraphDriver") or {}).get("Data") or {}
    files = tuple(
        str(data[key]) for key in ("HostnamePath", "HostsPath", "ResolvConfPath") if data.get(key)
    )
    upper = graph.get("UpperDir")
    return Layout(upper=str(upper) if upper else None, files=files)


def _tree_bytes(top: str) -> int:
    """Bytes allocated under ``top`` (st_blocks, so sparse files count what they use)."""
    total = 0
    stack = [top]
    while stack:
        path = stack.pop()
        try:
            entries = os.scandir(path)
        except OSError:
            continue
        with entries:
            for entry in entries:
                try:
                    st = entry.stat(follow_symlinks=False)
                except OSError:
                    continue
                total += st.st_blocks * 512
                if stat.S_ISDIR(st.st_mode):
                    stack.append(entry.path)
    return total


def usage(layout: Layout) -> int:
    """What the container has written, bytes (blocking: call it in a thread)."""
    total = _tree_bytes(layout.upper) if layout.upper else 0
    for path in layout.files:
        try:
            total += os.stat(path).st_blocks * 512
        except OSError:
            pass
    return total


def free_space(root: str) -> tuple[int, int] | None:
    """(free, total) bytes of the filesystem holding ``root``; None when not visible here."""
    try:
        st = os.statvfs(root)
    except OSError:
        return None
    return st.f_bavail * st.f_frsize, st.f_blocks * st.f_frsize
