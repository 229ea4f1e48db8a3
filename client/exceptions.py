"""Client-only error classes, each a subclass of a ``sandboxd.wire.errors`` class.

This module owns the errors that only the client side can raise: failing to
reach the daemon at all, and a reply whose shape the client cannot use. It
must not define anything that crosses the wire; the wire codes and their
classes live in ``sandboxd.wire.errors``, which is the single source for them.
"""

from __future__ import annotations

from typing import ClassVar

from sandboxd.wire.errors import ConnectionLost, SandboxdError


class ConnectFailed(ConnectionLost):
    """The daemon's socket could not be reached (missing, refused, forbidden, timed out).

    A subclass of ``ConnectionLost`` so that one ``except ConnectionLost``
    covers "never connected" and "connection dropped" alike.
    """

    code: ClassVar[str] = "connect_failed"


class UnexpectedReply(SandboxdError):
    """The daemon answered, but with a value of a shape the client cannot read."""

    code: ClassVar[str] = "unexpected_reply"
