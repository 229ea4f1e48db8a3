"""Deadlines as monotonic instants: turning a timeout into one and back into what is left.

This module owns the two conversions that every client wait with an overall
timeout needs (an event stream's ``next_event``, a process's
``communicate``). It must not sleep, wait or do any I/O.
"""

from __future__ import annotations

import time

__all__ = ["deadline", "remaining"]


def deadline(timeout: float | None) -> float | None:
    """The monotonic instant ``timeout`` seconds from now (None: no deadline)."""
    return None if timeout is None else time.monotonic() + timeout


def remaining(when: float | None) -> float | None:
    """Seconds left until ``when`` (never negative; None: no deadline)."""
    return None if when is None else max(0.0, when - time.monotonic())
