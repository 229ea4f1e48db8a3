"""The local terminal, for ``sandboxctl exec -t``: raw mode, its size, and signals as a pipe.

This module owns putting a terminal in raw mode and restoring it on every
way out (a return, an exception, SIGTERM or SIGHUP: those raise
``SystemExit`` while raw mode is on, so the restore runs), reading a
terminal's size, and turning a signal (SIGWINCH) into a readable file
descriptor that another thread can wait on. It must not talk to sandboxd;
signal handlers can only be installed from the main thread.
"""

from __future__ import annotations

import contextlib
import os
import signal
import termios
import tty
from collections.abc import Iterator
from types import FrameType
from typing import Any

__all__ = ["SignalPipe", "is_terminal", "raw_mode", "terminal_size"]

_EXIT_SIGNALS = (signal.SIGTERM, signal.SIGHUP)


def is_terminal(fd: int) -> bool:
    """True when ``fd`` is a terminal."""
    try:
        return os.isatty(fd)
    except OSError:
        return False


def terminal_size(fd: int) -> tuple[int, int] | None:
    """``(rows, cols)`` of the terminal ``fd``, or None when it has none (or is no terminal)."""
    try:
        size = os.get_terminal_size(fd)
    except OSError:
        return None
    if size.lines <= 0 or size.columns <= 0:
        return None
    return size.lines, size.columns


def _exit_on_signal(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)


@contextlib.contextmanager
def raw_mode(fd: int) -> Iterator[None]:
    """Raw mode on the terminal ``fd`` inside the block; its settings restored on every way out.

    Every byte typed then goes through as is (Ctrl-C included); output is not
    post-processed (a remote pseudo-terminal already sends ``\\r\\n``).
    """
    saved = termios.tcgetattr(fd)
    previous: dict[int, Any] = {}
    try:
        for sig in _EXIT_SIGNALS:
            previous[sig] = signal.signal(sig, _exit_on_signal)
        tty.setraw(fd, termios.TCSANOW)
        yield
    finally:
        with contextlib.suppress(termios.error, OSError):
            termios.tcsetattr(fd, termios.TCSADRAIN, saved)
        for signum, handler in previous.items():
            signal.signal(signum, handler)


class SignalPipe:
    """A signal made readable: each delivery writes a byte that ``fileno()`` then has to read.

    ``with SignalPipe(signal.SIGWINCH) as winch:`` installs the handler (main
    thread only) and restores the previous one on the way out; another thread
    polls ``winch.fileno()`` and calls ``drain()`` when it is readable.
    """

    def __init__(self, signum: int) -> None:
        self.signum = signum
        self._read, self._write = os.pipe()
        os.set_blocking(self._read, False)
        os.set_blocking(self._write, False)
        self._previous: Any = None

    def fileno(self) -> int:
        return self._read

    def _handler(self, signum: int, frame: FrameType | None) -> None:
        with contextlib.suppress(OSError):  # full (a wake-up is pending anyway) or closed
            os.write(self._write, b"\x00")

    def drain(self) -> None:
        """Read every pending wake-up."""
        with contextlib.suppress(OSError):
            while os.read(self._read, 512):
                pass

    def __enter__(self) -> SignalPipe:
        self._previous = signal.signal(self.signum, self._handler)
        return self

    def __exit__(self, *exc: object) -> None:
        signal.signal(self.signum, self._previous)
        os.close(self._write)
        os.close(self._read)
