"""Files in a sandbox (SPEC §3 files): written, read, looked at, listed, through its agent.

Owns ``files.*`` for the services: the checks (the sandbox is the caller's and
running, the path absolute, a read no larger than the chunk limit), cutting a
write or a read into frames the agent takes, and turning the agent's errno
into the wire's errors. The agent does the work as the sandbox's own uid
inside the container, so a path (or a symlink on it) resolves inside the
sandbox, never on the host. A sandbox whose agent is unavailable cannot be
used this way (``conflict``; its commands still work). It must not know the
wire encoding.
"""

from __future__ import annotations

import errno
import functools
from collections.abc import Callable
from typing import Any

from sandboxd.agent import frames as fr
from sandboxd.core import status
from sandboxd.core.records import Caller, SandboxRecord
from sandboxd.services.agent import AgentSession
from sandboxd.services.agents import AgentHub
from sandboxd.services.deadlines import Deadlines
from sandboxd.services.registry import Registry
from sandboxd.wire.errors import (
    Conflict,
    InvalidParams,
    NotFound,
    PermissionDenied,
    QuotaExceeded,
    SandboxdError,
    TooLarge,
)

AGENT_WAIT = 2.0
WRITE_PIECE = fr.MAX_PAYLOAD - 8192  # room for the frame's fields and the path


def _entry(entry: fr.FileEntry) -> dict[str, Any]:
    return {
        "name": entry.name.decode("utf-8", "surrogateescape"),
        "size": entry.size,
        "mode": entry.mode & 0o7777,
        "is_dir": entry.is_dir,
        "mtime": entry.mtime_ns / 1e9,
    }


def _error(code: int, path: str) -> SandboxdError:
    """The wire error for an errno the agent reported about ``path``."""
    name = errno.errorcode.get(code, str(code))
    data = {"path": path, "errno": name}
    if code == errno.ENOENT:
        return NotFound(f"No such file or directory in the sandbox: {path}.", data)
    if code in (errno.EACCES, errno.EPERM, errno.EROFS):
        return PermissionDenied(f"The sandbox's user may not do that to {path} ({name}).", data)
    if code in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        return QuotaExceeded(f"The sandbox's disk limit stops writing {path} ({name}).", data)
    if code == errno.E2BIG:
        return TooLarge(f"The answer about {path} is too large; ask for less.", data)
    if code in (errno.EISDIR, errno.ENOTDIR, errno.EINVAL, errno.ENAMETOOLONG, errno.ELOOP):
        return InvalidParams(f"{path} cannot be used that way ({name}).", data)
    return Conflict(f"The sandbox could not do that to {path} ({name}).", data)


class FileService:
    def __init__(self, registry: Registry, agents: AgentHub, deadlines: Deadlines,
                 *, max_chunk: int) -> None:
        self.registry = registry
        self.agents = agents
        self.deadlines = deadlines
        self.max_chunk = max_chunk

    async def _session(self, caller: Caller, ref: str, path: str) -> tuple[SandboxRecord,
                                                                          AgentSession]:
        if not path.startswith("/"):
            raise InvalidParams(f"A path in the sandbox must be absolute, got {path!r}.",
                                {"argument": "path"})
        record = self.registry.lookup(caller, ref)
        status.check("files", record.status, record.name)
        session = self.agents.session(record.id)
        if session is None or not await session.wait_ready(AGENT_WAIT):
            raise Conflict(
                f"Sandbox '{record.name}' has no working agent ({record.agent}), so its "
                "files cannot be reached this way; its commands still run.",
                {"agent": record.agent},
            )
        self.deadlines.touch(record)  # a files call is activity (SPEC §3)
        return record, session

    async def _ask(self, session: AgentSession, path: str,
                   frame_for: Callable[[int], bytes]) -> bytes:
        result = await session.file_request(frame_for)
        if result.errno:
            raise _error(result.errno, path)
        return result.body

    @staticmethod
    def _parsed(parse: Callable[[bytes], Any], body: bytes) -> Any:
        try:
            return parse(body)
        except fr.ChannelViolation as exc:
            raise Conflict(f"The sandbox's agent answered with something malformed: {exc}.",
                           {"agent": "malformed"}) from None

    async def write(self, caller: Caller, ref: str, path: str, data: bytes, *,
                    mode: int | None, offset: int | None, truncate: bool | None) -> None:
        _, session = await self._session(caller, ref, path)
        at = offset or 0
        cut = truncate if truncate is not None else at == 0
        view = memoryview(data)
        first = True
        while first or view:
            piece = bytes(view[:WRITE_PIECE])
            view = view[len(piece):]
            frame = functools.partial(fr.encode_fwrite, path=path, data=piece, offset=at,
                                      mode=mode or 0, truncate=cut and first, parents=True)
            await self._ask(session, path, frame)
            at += len(piece)
            first = False

    async def read(self, caller: Caller, ref: str, path: str, *, offset: int | None,
                   length: int | None) -> bytes:
        _, session = await self._session(caller, ref, path)
        want = self.max_chunk if length is None else length
        if want > self.max_chunk:
            raise TooLarge(
                f"A read of {want} bytes is over the limit of {self.max_chunk}; read the "
                "file in chunks (offset and length).", {"limit": self.max_chunk},
            )
        at = offset or 0
        parts: list[bytes] = []
        while want > 0:
            size = min(want, fr.FREAD_MAX)
            body = await self._ask(session, path, functools.partial(
                fr.encode_fread, path=path, offset=at, length=size))
            _, data = self._parsed(fr.parse_fread_body, body)
            parts.append(data)
            at += len(data)
            want -= len(data)
            if len(data) < size:
                break  # the end of the file
        return b"".join(parts)

    async def stat(self, caller: Caller, ref: str, path: str) -> dict[str, Any]:
        _, session = await self._session(caller, ref, path)
        body = await self._ask(session, path, lambda rid: fr.encode_fstat(rid, path))
        return _entry(self._parsed(fr.parse_entry, body))

    async def list(self, caller: Caller, ref: str, path: str) -> list[dict[str, Any]]:
        _, session = await self._session(caller, ref, path)
        body = await self._ask(session, path, lambda rid: fr.encode_flist(rid, path))
        return [_entry(e) for e in self._parsed(fr.parse_entries, body)]
