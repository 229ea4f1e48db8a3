"""The sandbox state machine: which statuses exist and what each action needs.

Owns the table of allowed actions per status and the ``Conflict`` message a
wrong-state call gets. Pure logic: no I/O, no engine, no records.
"""

from __future__ import annotations

from .errors import Conflict

CREATING = "creating"
RUNNING = "running"
PAUSED = "paused"
STOPPED = "stopped"
ERROR = "error"
STATUSES = (CREATING, RUNNING, PAUSED, STOPPED, ERROR)

_ALLOWED: dict[str, frozenset[str]] = {
    "pause": frozenset({RUNNING}),
    "resume": frozenset({PAUSED}),
    "exec": frozenset({RUNNING}),
    "files": frozenset({RUNNING}),
    "stats": frozenset({RUNNING, PAUSED}),
    "extend": frozenset({RUNNING, PAUSED, STOPPED, ERROR}),
    "snapshot": frozenset({RUNNING, PAUSED, STOPPED}),
    "remove": frozenset(STATUSES),
}

_HINTS = {
    PAUSED: "resume it first",
    CREATING: "wait until it is running",
    STOPPED: "its main process has ended; remove it and create a new one",
    ERROR: "it failed; remove it",
    RUNNING: "it is already running",
}


def check(action: str, status: str, name: str) -> None:
    """Raise ``Conflict`` when ``action`` is not allowed in ``status``."""
    if status in _ALLOWED[action]:
        return
    if action == "pause" and status == PAUSED:
        hint = "it is already paused"
    else:
        hint = _HINTS.get(status, "")
    raise Conflict(
        f"Cannot {action} sandbox '{name}' while it is {status}" + (f": {hint}." if hint else "."),
        {"status": status, "action": action},
    )
