"""Killing an exec together with everything it started, from the host's /proc.

The Docker Engine cannot kill an exec, so the daemon does: it finds the
exec's process (the host pid from the exec's inspect), every descendant of
it, every process still in the exec's session (the engine starts each exec
as a session leader, so a double-forked child re-parented to the container's
init is found even when it cleared its environment), and every process in
the same container whose environment carries the exec's marker variable
(which catches children that started a new session). Only a process that
both starts a new session and clears its environment after being orphaned
escapes. Each round stops (SIGSTOP)
what it finds so nothing can fork away, until a round finds nothing new;
then all get SIGKILL. Signals go through pidfds opened before the namespace
is re-checked, so a pid reused by another process is never hit. Blocking file
reads: call it in a thread. It must not touch processes outside the exec's
container pid namespace.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

PROC = Path("/proc")
MARKER_VAR = "SANDBOXD_EXEC"


def _pid_namespace(pid: int) -> str | None:
    try:
        return os.readlink(PROC / str(pid) / "ns" / "pid")
    except OSError:
        return None


def _parent_map(namespace: str) -> dict[int, tuple[int, int]]:
    """pid -> (ppid, session id) for every process in ``namespace``."""
    parents: dict[int, tuple[int, int]] = {}
    for entry in os.scandir(PROC):
        if not entry.name.isdigit():
            continue
        pid = int(entry.name)
        if _pid_namespace(pid) != namespace:
            continue
        try:
            stat = (PROC / entry.name / "stat").read_bytes()
        except OSError:
            continue
        fields = stat[stat.rfind(b")") + 2 :].split()
        parents[pid] = (int(fields[1]), int(fields[3]))
    return parents


def process_alive(pid: int) -> bool:
    """True when ``pid`` runs (exists and is neither a zombie nor dead) on this host."""
    try:
        stat = (PROC / str(pid) / "stat").read_bytes()
    except OSError:
        return False
    state = stat[stat.rfind(b")") + 2 : stat.rfind(b")") + 3]
    return state not in (b"Z", b"X")


def kill_container_init(pid: int, container_id: str) -> bool:
    """SIGKILL a container's main process (its whole pid namespace dies with it), if
    ``pid`` still is that container's: its cgroup names the container. Blocking reads."""
    try:
        fd = os.pidfd_open(pid)
    except OSError:
        return False
    try:
        try:
            cgroups = (PROC / str(pid) / "cgroup").read_text()
        except OSError:
            return False
        if container_id not in cgroups:
            return False  # the pid was reused: never signal a stranger
        _signal(fd, signal.SIGKILL)
        return True
    finally:
        os.close(fd)


def _has_marker(pid: int, marker: bytes) -> bool:
    try:
        return marker in (PROC / str(pid) / "environ").read_bytes()
    except OSError:
        return False


def _find(root: int, parents: dict[int, tuple[int, int]], marker: bytes) -> set[int]:
    found = {root} if root in parents else set()
    if root > 0:
        found |= {pid for pid, (_, sid) in parents.items() if sid == root}
    found |= {pid for pid in parents if _has_marker(pid, marker)}
    changed = True
    while changed:
        changed = False
        for pid, (ppid, _) in parents.items():
            if ppid in found and pid not in found:
                found.add(pid)
                changed = True
    return found


def kill_exec_tree(exec_pid: int, container_pid: int, exec_marker: str) -> int:
    """SIGKILL the exec and all it started; return how many processes were killed.

    ``container_pid`` is the host pid of the container's PID 1, used to name
    the pid namespace (the exec's own process may already be gone).
    """
    namespace = _pid_namespace(container_pid)
    if namespace is None or namespace == _pid_namespace(os.getpid()):
        return 0  # not a container we can see: never touch host processes
    marker = f"{MARKER_VAR}={exec_marker}\0".encode()
    handles: dict[int, int] = {}  # pid -> pidfd: signals reach that process, never a reuser
    try:
        for _ in range(50):
            targets = _find(exec_pid, _parent_map(namespace), marker) - handles.keys()
            targets.discard(container_pid)
            if not targets:
                break
            for pid in targets:
                fd = _open_in(pid, namespace)
                if fd is not None:
                    handles[pid] = fd
                    _signal(fd, signal.SIGSTOP)
        for fd in handles.values():
            _signal(fd, signal.SIGKILL)
        return len(handles)
    finally:
        for fd in handles.values():
            os.close(fd)


def _open_in(pid: int, namespace: str) -> int | None:
    """A pidfd for ``pid`` if it is (still) a process of ``namespace``; else None.

    The namespace is checked after the pidfd is open, so a pid that was reused by a
    process elsewhere in between is never signalled.
    """
    try:
        fd = os.pidfd_open(pid)
    except OSError:
        return None  # gone already
    if _pid_namespace(pid) != namespace:
        os.close(fd)
        return None
    return fd


def _signal(fd: int, sig: int) -> None:
    try:
        signal.pidfd_send_signal(fd, sig)
    except ProcessLookupError:
        pass  # exited meanwhile
