"""Relaying a streamed process to local file descriptors (``sandboxctl exec -i/-t``, ``attach``).

This module owns the two flows of an interactive or piped exec and keeps
them concurrent, as the buffering rule of ``process`` requires (a thread
that waits for a write's reply must not be the one that reads the output):
the calling thread writes the output to the local stdout and stderr as it
arrives, byte for byte, until the exit; one pump thread sends the local
stdin to the process as it comes (each ``exec.write`` waiting for its
reply; end of file closes the process's stdin) and turns each SIGWINCH into
``exec.resize`` with the terminal's new size. A process that stops reading
its stdin is not an error (like a broken pipe: the pump stops sending); any
other failure to feed it kills it (it might wait for that input forever)
and is raised once its output ended. It
must not parse arguments, print messages or touch terminal modes (``cli``
and ``terminal`` do), and talks to the daemon only through a
``BlockingProcess``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import threading
from collections.abc import Callable

from sandboxd.wire.errors import ConnectionLost, SandboxdError

from ._sync.process import STDIN_GONE, BlockingProcess
from .models import ExecExit

__all__ = ["READ_SIZE", "relay"]

log = logging.getLogger("sandboxd_client.relay")

READ_SIZE = 256 * 1024
_JOIN_TIMEOUT = 2.0

Size = Callable[[], tuple[int, int] | None]


def write_all(fd: int, data: bytes) -> None:
    """Write all of ``data`` to ``fd`` (a pipe may take it in pieces)."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


class _Pump(threading.Thread):
    """Local stdin to the process, and SIGWINCH to ``exec.resize``, until stopped."""

    def __init__(self, proc: BlockingProcess, stdin_fd: int | None, winch_fd: int | None,
                 size: Size | None) -> None:
        super().__init__(name=f"sandboxctl-stdin-{proc.exec_id}", daemon=True)
        self.proc = proc
        self.stdin_fd = stdin_fd
        self.winch_fd = winch_fd
        self.size = size
        self.error: SandboxdError | None = None
        self._stopping = False
        self._stop_read, self._stop_write = os.pipe()

    def stop(self) -> None:
        """Ask the pump to end (it ends at once unless inside a call) and wait a little."""
        self._stopping = True
        with contextlib.suppress(OSError):
            os.write(self._stop_write, b"\x00")
        if self.is_alive():
            self.join(_JOIN_TIMEOUT)
        if not self.is_alive():
            os.close(self._stop_read)
            os.close(self._stop_write)

    def run(self) -> None:
        poller = select.poll()
        poller.register(self._stop_read, select.POLLIN)
        for fd in (self.stdin_fd, self.winch_fd):
            if fd is not None:
                poller.register(fd, select.POLLIN)
        try:
            while not self._stopping:
                ready = {fd for fd, _ in poller.poll()}
                if self._stopping or self._stop_read in ready:
                    return
                if self.winch_fd is not None and self.winch_fd in ready:
                    self._resize()
                if self.stdin_fd is not None and self.stdin_fd in ready:
                    if not self._forward():
                        poller.unregister(self.stdin_fd)
                        self.stdin_fd = None
        except ConnectionLost:
            return  # the output side sees it too and reports it
        except SandboxdError as err:
            self.error = err
            with contextlib.suppress(SandboxdError):
                self.proc.kill()  # unfed, it might wait forever; its output then ends

    def _resize(self) -> None:
        assert self.winch_fd is not None
        with contextlib.suppress(OSError):
            while os.read(self.winch_fd, 512):
                pass
        size = self.size() if self.size is not None else None
        if size is not None:
            try:
                self.proc.resize(*size)
            except ConnectionLost:
                raise
            except SandboxdError as err:  # it exited meanwhile, say
                log.debug("resize of %s failed: %s", self.proc.exec_id, err)

    def _forward(self) -> bool:
        """Send what stdin has now; False once stdin is done with (its end, or nobody reads)."""
        assert self.stdin_fd is not None
        try:
            data = os.read(self.stdin_fd, READ_SIZE)
        except OSError as exc:  # EIO: the terminal went away; treat as the end
            log.debug("reading stdin failed: %s", exc)
            data = b""
        try:
            if data:
                self.proc.stdin.write(data)
                return True
            self.proc.stdin.close()
        except STDIN_GONE as err:  # the command stopped reading its stdin (or exited)
            log.debug("stdin of %s is gone: %s", self.proc.exec_id, err)
        return False


def relay(
    proc: BlockingProcess,
    *,
    stdin_fd: int | None = None,
    stdout_fd: int = 1,
    stderr_fd: int = 2,
    winch_fd: int | None = None,
    size: Size | None = None,
) -> ExecExit:
    """Copy ``proc``'s output to ``stdout_fd``/``stderr_fd`` until it exits; its exit.

    With ``stdin_fd``, what it yields goes to the process's stdin meanwhile
    (its end closes that stdin). With ``winch_fd`` (a ``terminal.SignalPipe``
    for SIGWINCH), each wake-up resizes the process's tty to ``size()``.
    """
    pump: _Pump | None = None
    if stdin_fd is not None or winch_fd is not None:
        pump = _Pump(proc, stdin_fd, winch_fd, size)
        pump.start()
    try:
        for stream, data in proc.output():
            write_all(stderr_fd if stream == "stderr" else stdout_fd, data)
        proc.wait()
    finally:
        if pump is not None:
            pump.stop()
    if pump is not None and pump.error is not None:
        raise pump.error
    assert proc.exit is not None
    return proc.exit
