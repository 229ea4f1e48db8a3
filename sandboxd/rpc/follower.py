"""A connection as the follower of streamed commands: ``exec.output`` and ``exec.exit``.

Owns writing a command's output to the client that follows it, as SPEC §3
notifications, and telling the streams service when the client is behind
(``writable``/``drain``: the back-pressure that slows only that command) or
gone. While it follows a command, the connection is not idle. It must not
decide what happens to a command whose follower goes (the service does).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from sandboxd.rpc.delivery import FrameSink
from sandboxd.rpc.dispatcher import CallContext
from sandboxd.wire.codec import encode_notification


class ConnectionFollower:
    """A ``services.streams.Follower`` on one connection (one per connection: ``of``)."""

    def __init__(self, ctx: CallContext) -> None:
        self.ctx = ctx
        self.sink: FrameSink | None = ctx if isinstance(ctx, FrameSink) else None

    @classmethod
    def of(cls, ctx: CallContext) -> ConnectionFollower:
        """The connection's follower, made on first use."""
        follower: ConnectionFollower | None = getattr(ctx, "follower", None)
        if follower is None:
            follower = cls(ctx)
            ctx.follower = follower  # type: ignore[attr-defined]
        return follower

    @property
    def closed(self) -> bool:
        return self.ctx.closed

    @property
    def writable(self) -> bool:
        if self.sink is not None:
            return self.sink.writable
        return not self.ctx.closed

    async def drain(self) -> None:
        await self.ctx.drain()

    def output(self, exec_id: str, stream: str, data: bytes | memoryview) -> None:
        frame = encode_notification("exec.output", [exec_id, stream, data])
        if self.sink is not None:
            self.sink.send_frame(frame)
        else:
            self.ctx.notify("exec.output", [exec_id, stream, bytes(data)])

    def exited(self, exec_id: str, info: dict[str, Any]) -> None:
        self.ctx.notify("exec.exit", [exec_id, info])

    def on_close(self, callback: Callable[[], None]) -> None:
        self.ctx.on_close.append(callback)

    def hold(self) -> None:
        self.ctx.hold()  # a connection following a command is not idle

    def release(self) -> None:
        self.ctx.release()
