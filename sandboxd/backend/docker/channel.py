"""The channel to a Docker container's main process: its attach stream, demultiplexed.

Owns turning the engine's hijacked attach connection into the plain byte
stream of ``backend.base.Channel``: the 8-byte stream headers removed, the
main process's stdout passed on, its stderr dropped (the agent writes none).
It never half-closes the connection (the engine then drops the whole attach).
It must not interpret the bytes.
"""

from __future__ import annotations

from collections import deque

from sandboxd.backend.base import Channel
from sandboxd.backend.docker.demux import STDERR, Demuxer
from sandboxd.backend.docker.engine import RawStream


class DockerChannel(Channel):
    def __init__(self, raw: RawStream) -> None:
        self._raw = raw
        self._demux = Demuxer()
        self._ready: deque[memoryview] = deque()

    async def read(self) -> bytes | memoryview | None:
        # Views into what the engine sent: no copy on the way to the frame decoder.
        while not self._ready:
            chunk = await self._raw.read()
            if chunk is None:
                return None
            self._ready.extend(
                data for which, data in self._demux.feed_views(chunk) if which != STDERR
            )
        return self._ready.popleft()

    async def write(self, data: bytes) -> None:
        await self._raw.write(data)

    def write_nowait(self, data: bytes) -> None:
        self._raw.write_nowait(data)

    async def close(self) -> None:
        await self._raw.close()
