"""The daemon's side of the systemd service protocols, in the standard library only.

Owns two things:

- socket activation, as sd_listen_fds(3) defines it: the listening sockets
  systemd (or ``systemd-socket-activate``) passes from fd 3 on, described by
  ``LISTEN_PID``, ``LISTEN_FDS`` and ``LISTEN_FDNAMES``;
- the notify protocol, as sd_notify(3) defines it: ``READY=1``,
  ``STATUS=...``, ``STOPPING=1``, ``WATCHDOG=1`` and ``EXTEND_TIMEOUT_USEC=``
  datagrams to ``$NOTIFY_SOCKET``, and the watchdog pings, sent from the
  event loop so that a blocked loop stops them and systemd restarts the
  daemon.

It must not bind, listen on or accept from the API socket, choose or chmod
its path, configure logging, or import the rest of the daemon: the server
decides what to do with what this module reports. Nothing here raises to its
caller for a notify that fails, and nothing here blocks: without systemd
(no ``$NOTIFY_SOCKET``, no ``$LISTEN_FDS``) every call is a cheap no-op.
"""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import MutableMapping

__all__ = [
    "SD_LISTEN_FDS_START",
    "Notifier",
    "listen_fds",
    "listen_fds_with_names",
]

SD_LISTEN_FDS_START = 3
"""The first file descriptor systemd passes (sd_listen_fds(3))."""

_LISTEN_VARS = ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES")
_NOTIFY_VARS = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")


def _positive_int(text: str | None) -> int | None:
    if text is None:
        return None
    try:
        value = int(text.strip())
    except ValueError:
        return None
    return value if value > 0 else None


def listen_fds_with_names(unset_environment: bool = True) -> list[tuple[str, socket.socket]]:
    """The sockets passed by socket activation, each with its name.

    Names come from ``$LISTEN_FDNAMES`` (``FileDescriptorName=`` in the
    socket unit, ``--fdname=`` of ``systemd-socket-activate``); a missing name
    is ``"unknown"``, as in sd_listen_fds_with_names(3). Returns ``[]`` when
    the process was not socket-activated: no ``$LISTEN_FDS``, a malformed
    value, or a ``$LISTEN_PID`` that is not this process (the variables were
    inherited from a parent). Each descriptor gets ``FD_CLOEXEC`` so that no
    child inherits it. A descriptor that is not a socket (``ListenFIFO=``) or
    not open is skipped and left as it is.

    With ``unset_environment`` (the default) the three ``LISTEN_*`` variables
    are removed from ``os.environ`` whatever the outcome, so that a child
    process never takes them for its own.
    """
    try:
        pid = _positive_int(os.environ.get("LISTEN_PID"))
        count = _positive_int(os.environ.get("LISTEN_FDS"))
        if pid is None or count is None or pid != os.getpid():
            return []
        raw_names = os.environ.get("LISTEN_FDNAMES")
        names = raw_names.split(":") if raw_names else []
        result: list[tuple[str, socket.socket]] = []
        for index in range(count):
            fd = SD_LISTEN_FDS_START + index
            name = names[index] if index < len(names) and names[index] else "unknown"
            try:
                sock = socket.socket(fileno=fd)
            except OSError:
                continue  # EBADF (not open) or ENOTSOCK (a FIFO, a file)
            sock.set_inheritable(False)  # FD_CLOEXEC
            result.append((name, sock))
        return result
    finally:
        if unset_environment:
            for var in _LISTEN_VARS:
                os.environ.pop(var, None)


def listen_fds(unset_environment: bool = True) -> list[socket.socket]:
    """The listening sockets passed by socket activation, in order; ``[]`` if none.

    See :func:`listen_fds_with_names` for the rules; the server uses the one
    ``AF_UNIX`` ``SOCK_STREAM`` socket it is given instead of binding its own.
    """
    return [sock for _name, sock in listen_fds_with_names(unset_environment)]


class Notifier:
    """Sends sd_notify(3) messages to the service manager.

    Build it with :meth:`from_env`. Every method returns ``True`` when the
    datagram was handed to the kernel, ``False`` otherwise (no
    ``$NOTIFY_SOCKET``, the manager is gone, its queue is full); none raises
    and none blocks. A Notifier without an address is a no-op.
    """

    def __init__(
        self,
        address: str | None,
        *,
        watchdog_usec: int | None = None,
        watchdog_pid: int | None = None,
    ) -> None:
        """``address``: a socket path, or an abstract name written ``@name``."""
        self._address: str | None = None
        if address and (address.startswith("/") or address.startswith("@")):
            # Anything else (e.g. "vsock:...") is a transport this module
            # does not speak: stay silent rather than fail.
            self._address = "\0" + address[1:] if address.startswith("@") else address
        self.address = address if self._address is not None else None
        self.watchdog_usec = watchdog_usec
        self.watchdog_pid = watchdog_pid

    @classmethod
    def from_env(
        cls,
        environ: MutableMapping[str, str] | None = None,
        *,
        unset_environment: bool = False,
    ) -> Notifier:
        """Read ``$NOTIFY_SOCKET``, ``$WATCHDOG_USEC`` and ``$WATCHDOG_PID``.

        ``environ`` defaults to ``os.environ``. With ``unset_environment`` the
        three variables are removed from it, so that child processes do not
        inherit them; by default nothing is removed.
        """
        env: MutableMapping[str, str] = os.environ if environ is None else environ
        notifier = cls(
            env.get("NOTIFY_SOCKET"),
            watchdog_usec=_positive_int(env.get("WATCHDOG_USEC")),
            watchdog_pid=_positive_int(env.get("WATCHDOG_PID")),
        )
        if unset_environment:
            for var in _NOTIFY_VARS:
                env.pop(var, None)
        return notifier

    @property
    def enabled(self) -> bool:
        """Whether there is a service manager to notify."""
        return self._address is not None

    def notify(self, *lines: str) -> bool:
        """Send ``lines`` (``"KEY=value"`` each) as one datagram.

        Returns ``False`` without sending when there is nothing to send, when a
        line holds a newline (it would smuggle in another assignment), or on
        any socket error.
        """
        if self._address is None or not lines or any("\n" in line for line in lines):
            return False
        payload = "\n".join(lines).encode("utf-8", "replace")
        try:
            with socket.socket(
                socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK
            ) as sock:
                sent = sock.sendto(payload, self._address)
        except OSError:
            return False
        return sent == len(payload)

    def ready(self, status: str | None = None) -> bool:
        """``READY=1``: start-up is finished (``Type=notify`` units wait for it)."""
        if status is None:
            return self.notify("READY=1")
        return self.notify("READY=1", "STATUS=" + _one_line(status))

    def status(self, text: str) -> bool:
        """``STATUS=``: the one line ``systemctl status`` shows."""
        return self.notify("STATUS=" + _one_line(text))

    def stopping(self, status: str | None = None) -> bool:
        """``STOPPING=1``: the daemon has begun to shut down."""
        if status is None:
            return self.notify("STOPPING=1")
        return self.notify("STOPPING=1", "STATUS=" + _one_line(status))

    def watchdog_ping(self) -> bool:
        """``WATCHDOG=1``: the daemon is alive."""
        return self.notify("WATCHDOG=1")

    def extend_timeout(self, seconds: float) -> bool:
        """``EXTEND_TIMEOUT_USEC=``: ask for ``seconds`` more to finish starting or stopping."""
        return self.notify(f"EXTEND_TIMEOUT_USEC={max(0, int(seconds * 1_000_000))}")

    def watchdog_interval(self) -> float | None:
        """Seconds between watchdog pings, or ``None`` when no watchdog is wanted.

        Half of ``$WATCHDOG_USEC``, as sd_watchdog_enabled(3) advises, when it
        is set and ``$WATCHDOG_PID`` is absent or names this process; ``None``
        as well when there is no ``$NOTIFY_SOCKET`` to ping.
        """
        if self._address is None or self.watchdog_usec is None:
            return None
        if self.watchdog_pid is not None and self.watchdog_pid != os.getpid():
            return None
        return self.watchdog_usec / 2_000_000

    async def run_watchdog(self) -> None:
        """Ping every :meth:`watchdog_interval` seconds until cancelled.

        The pings are sent from the event loop itself, so a loop that is
        blocked sends none and systemd's watchdog fires. Returns at once when
        no watchdog is wanted.
        """
        interval = self.watchdog_interval()
        if interval is None:
            return
        while True:
            self.watchdog_ping()
            await asyncio.sleep(interval)


def _one_line(text: str) -> str:
    return " ".join(text.splitlines())
