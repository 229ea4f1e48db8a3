"""Files in a sandbox, moved in chunks: SPEC §3 ``files.write``, ``files.read``, ``stat``, ``list``.

This module owns how a file of any size crosses the connection: writing in
pieces of at most ``CHUNK`` bytes (the first one creates or truncates the
file, the next ones go at their offset), reading piece by piece until a short
read (so a file is never whole in memory unless the caller asks for bytes),
and turning ``files.stat``/``files.list`` replies into ``FileInfo``. It must
not touch sockets or asyncio, nor know about local paths (callers hand it
file objects). Written once for both sides: ``scripts/unasync.py`` derives
the blocking module from the asyncio one. Local file objects are read and
written with their own (blocking) calls on both sides.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from typing import Any, Protocol

from ..connection import AsyncConnection
from ..exceptions import UnexpectedReply
from ..models import FileInfo, _bytes
from ..protocol import named_params

__all__ = [
    "CHUNK",
    "Readable",
    "Writable",
    "listdir",
    "read_file",
    "read_file_into",
    "stat",
    "write_file",
]

CHUNK = 1024 * 1024
"""The most bytes one ``files.write`` carries or one ``files.read`` asks for."""


class Readable(Protocol):
    """A binary file open for reading (``open(path, "rb")``, ``sys.stdin.buffer``, BytesIO)."""

    def read(self, size: int = -1, /) -> bytes: ...


class Writable(Protocol):
    """A binary file open for writing (``open(path, "wb")``, ``sys.stdout.buffer``, BytesIO)."""

    def write(self, data: bytes, /) -> object: ...


Data = bytes | bytearray | memoryview | Readable
"""What ``write_file`` takes: the bytes themselves, or a binary file to read them from."""


def _pieces(data: Data) -> Iterator[bytes]:
    """``data`` in pieces of at most ``CHUNK`` bytes; at least one (maybe empty)."""
    if isinstance(data, (bytes, bytearray, memoryview)):
        view = memoryview(data).cast("B")
        yield bytes(view[:CHUNK])
        for start in range(CHUNK, len(view), CHUNK):
            yield bytes(view[start:start + CHUNK])
        return
    piece = _fill(data)
    yield piece
    while len(piece) == CHUNK:
        piece = _fill(data)
        if piece:
            yield piece


def _fill(source: Readable) -> bytes:
    """Up to ``CHUNK`` bytes from ``source``, fewer only at its end (pipes return less)."""
    parts: list[bytes] = []
    wanted = CHUNK
    while wanted:
        got = source.read(wanted)
        if not got:
            break
        parts.append(got)
        wanted -= len(got)
    return b"".join(parts)


async def write_file(
    conn: AsyncConnection, id: str, path: str, data: Data, mode: int | None = None
) -> int:
    """Write ``data`` (bytes or a binary file) to ``path`` in sandbox ``id``; bytes written.

    The first piece creates the file (parents too) or truncates it, with
    ``mode`` if given; each next piece is written at its offset.
    """
    offset = 0
    for piece in _pieces(data):
        await conn.call("files.write", named_params({
            "id": id, "path": path, "data": piece,
            "mode": mode if offset == 0 else None,
            "offset": offset or None,
        }))
        offset += len(piece)
    return offset


async def read_file_into(conn: AsyncConnection, id: str, path: str, out: Writable) -> int:
    """Copy ``path`` of sandbox ``id`` into the binary file ``out``, piece by piece; bytes read."""
    offset = 0
    while True:
        piece = _bytes(await conn.call("files.read", named_params({
            "id": id, "path": path, "offset": offset, "length": CHUNK})))
        if piece:
            out.write(piece)
            offset += len(piece)
        if len(piece) < CHUNK:
            return offset


async def read_file(conn: AsyncConnection, id: str, path: str) -> bytes:
    """The whole of ``path`` in sandbox ``id`` (read piece by piece)."""
    buffer = io.BytesIO()
    await read_file_into(conn, id, path, buffer)
    return buffer.getvalue()


async def stat(conn: AsyncConnection, id: str, path: str) -> FileInfo:
    """``files.stat``: what ``path`` is (symlinks followed)."""
    return FileInfo.from_wire(await conn.call("files.stat", named_params({"id": id, "path": path})))


async def listdir(conn: AsyncConnection, id: str, path: str) -> list[FileInfo]:
    """``files.list``: the entries of directory ``path`` (no ``.`` or ``..``; any order)."""
    reply: Any = await conn.call("files.list", named_params({"id": id, "path": path}))
    if not isinstance(reply, (list, tuple)):
        raise UnexpectedReply(
            f"Expected a list of files from files.list, got {type(reply).__name__}.")
    return [FileInfo.from_wire(entry) for entry in reply]
