"""Client-only error classes, each a subclass of a ``sandboxd.wire.errors`` class.

This module owns the errors that only the client side can raise: failing to
reach the daemon at all, a reply whose shape the client cannot use, and the
end of a notification channel (closed by its consumer, or overflowed). It
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


class ChannelClosed(SandboxdError):
    """The notification channel was closed by its consumer: nothing more will come."""

    code: ClassVar[str] = "channel_closed"


class ChannelOverflow(SandboxdError):
    """A notification channel filled up and dropped what came next (its buffered part was read).

    Only channels opened with ``when_full="overflow"`` raise it; the consumer
    must start over (an event stream resubscribes from its last seq).
    """

    code: ClassVar[str] = "channel_overflow"


def copy_lost(err: ConnectionLost) -> ConnectionLost:
    """A fresh exception of the same class and content (never raise one instance twice)."""
    return type(err)(err.message, err.data)
