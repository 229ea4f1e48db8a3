"""The sandbox state machine: every status, every transition and what each action needs.

Owns the statuses, the table of actions allowed per status (and the
``Conflict`` a wrong-state call gets), the map from the engine's container
states to statuses, what our own actions lead to (``after``), and how a
status follows a change the engine reports (``follow``: the new status and
the event it is worth). Every place that changes a sandbox's status asks this
module what the new status is. Pure logic: no I/O, no engine, no records.
"""

from __future__ import annotations

from dataclasses import dataclass

from sandboxd.wire.errors import Conflict

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

# What our own successful actions leave the sandbox in.
_AFTER = {"start": RUNNING, "pause": PAUSED, "resume": RUNNING, "fail": ERROR}

_HINTS = {
    PAUSED: "resume it first",
    CREATING: "wait until it is running",
    STOPPED: "its main process has ended; remove it and create a new one",
    ERROR: "it failed; remove it",
    RUNNING: "it is already running",
}

# The engine's container states (docker inspect State.Status) as sandbox statuses.
ENGINE_STATES = {
    "running": RUNNING,
    "paused": PAUSED,
    "exited": STOPPED,
    "dead": STOPPED,
    "created": CREATING,
    "restarting": RUNNING,
    "removing": STOPPED,
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


def after(action: str) -> str:
    """The status our own ``action`` (start, pause, resume, fail) leaves a sandbox in."""
    return _AFTER[action]


def from_engine(state: str) -> str:
    """The status of a container the engine reports in ``state``."""
    return ENGINE_STATES.get(state, ERROR)


@dataclass(frozen=True, slots=True)
class Follow:
    """What a status does when the engine reports a state: see ``follow``."""

    status: str  # the status to record (the old one when nothing changes)
    event: str | None = None  # the event type the change is worth, if any
    changed: bool = False  # the status changes
    processes_changed: bool = False  # the main process ended or started again
    await_grace: bool = False  # created but never started: remove after the create grace


def follow(old: str, engine_state: str) -> Follow:
    """How a sandbox in ``old`` follows the engine reporting ``engine_state``.

    A create cut short (still ``created``) waits for its grace; one whose
    start went through but whose reply never got written becomes running
    quietly. Otherwise a different status is recorded, with the event of a
    change made behind the daemon's back.
    """
    new = from_engine(engine_state)
    if old == CREATING:
        if new == CREATING:
            return Follow(old, await_grace=True)
        if new == RUNNING:
            return Follow(RUNNING, changed=True)
    if new == old:
        return Follow(old)
    event = None
    if new == PAUSED:
        event = "sandbox.paused"
    elif new == RUNNING and old == PAUSED:
        event = "sandbox.resumed"
    elif new == STOPPED:
        event = "sandbox.died"
    return Follow(
        new, event=event, changed=True, processes_changed=STOPPED in (old, new)
    )
