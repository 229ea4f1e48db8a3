"""Where the client looks for the daemon's socket by default.

This module owns the default socket path rule of SPEC §6 as seen by a client:
``$SANDBOXD_SOCKET``, else ``/run/sandboxd/sandboxd.sock`` for root, else
``$XDG_RUNTIME_DIR/sandboxd.sock``. It must not touch the filesystem or the
network: it only computes a path (or ``None`` when no rule applies).
"""

from __future__ import annotations

import os
from collections.abc import Mapping

ROOT_SOCKET = "/run/sandboxd/sandboxd.sock"
SOCKET_NAME = "sandboxd.sock"


def default_socket_path(
    environ: Mapping[str, str] | None = None, euid: int | None = None
) -> str | None:
    """The socket path a client should use when none was given, or ``None``.

    ``None`` means a non-root user without ``XDG_RUNTIME_DIR``: there is no
    sensible default, and the caller should ask for ``--socket`` or
    ``SANDBOXD_SOCKET``.
    """
    env = os.environ if environ is None else environ
    explicit = env.get("SANDBOXD_SOCKET")
    if explicit:
        return explicit
    if (os.geteuid() if euid is None else euid) == 0:
        return ROOT_SOCKET
    runtime = env.get("XDG_RUNTIME_DIR")
    if runtime:
        return os.path.join(runtime, SOCKET_NAME)
    return None
