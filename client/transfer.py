"""Copying one file between this machine and a sandbox, for ``sandboxctl cp``.

This module owns what ``cp`` means: telling ``ID:PATH`` from a local path
(``-`` is stdin or stdout; a local path with a colon is written ``./a:b``),
resolving a relative sandbox path against the sandbox's workdir, copying
into a directory under the source's own name (either side), keeping the
permission bits, and streaming the bytes in pieces both ways (never the
whole file in memory). A local file is replaced only once it was read
completely (a temporary file beside it is renamed over it). It must not
parse arguments or print (``cli`` does), and talks to the daemon only
through the blocking ``Client``. Local failures raise ``OSError``.
"""

from __future__ import annotations

import contextlib
import os
import posixpath
import stat
import tempfile
from dataclasses import dataclass
from typing import BinaryIO

from sandboxd.wire.errors import NotFound

from ._sync.client import Client

__all__ = ["Copied", "Remote", "copy_from_sandbox", "copy_to_sandbox", "parse_location"]

STDIO = "-"


@dataclass(frozen=True)
class Remote:
    """A path in a sandbox: ``ID:PATH``."""

    sandbox: str
    path: str

    def __str__(self) -> str:
        return f"{self.sandbox}:{self.path}"


@dataclass(frozen=True)
class Copied:
    """What one copy did: from where, to where (resolved), how many bytes (``size``)."""

    source: str
    destination: str
    size: int


def parse_location(arg: str) -> Remote | str:
    """``ID:PATH`` as a ``Remote``; anything else (a local path, or ``-``) as is.

    It is remote when there is a colon, the part before it is not empty and
    has no ``/``, and a path follows.
    """
    sandbox, sep, path = arg.partition(":")
    if sep and sandbox and "/" not in sandbox and path:
        return Remote(sandbox, path)
    return arg


def _absolute(client: Client, where: Remote) -> str:
    if where.path.startswith("/"):
        return where.path
    return posixpath.join(client.get(where.sandbox).workdir or "/", where.path)


def _is_remote_dir(client: Client, sandbox: str, path: str) -> bool:
    try:
        return client.stat(sandbox, path).is_dir
    except NotFound:
        return False


def copy_to_sandbox(client: Client, source: str, destination: Remote,
                    stdin: BinaryIO) -> Copied:
    """Copy the local file ``source`` (``-``: ``stdin``) to ``destination``.

    Into a directory (an existing one, or a path ending in ``/``) the file
    goes under its own name; a local file's permission bits are kept.
    """
    path = _absolute(client, destination)
    if path.endswith("/") or _is_remote_dir(client, destination.sandbox, path):
        if source == STDIO:
            raise IsADirectoryError(
                f"{destination} is a directory; name the file to write stdin to.")
        path = posixpath.join(path, os.path.basename(os.path.normpath(source)))
    if source == STDIO:
        size = client.write_file(destination.sandbox, path, stdin)
    else:
        with open(source, "rb") as file:
            info = os.fstat(file.fileno())
            if stat.S_ISDIR(info.st_mode):
                raise IsADirectoryError(f"{source} is a directory; cp copies one file.")
            size = client.write_file(destination.sandbox, path, file,
                                     mode=stat.S_IMODE(info.st_mode))
    return Copied(source, f"{destination.sandbox}:{path}", size)


def copy_from_sandbox(client: Client, source: Remote, destination: str,
                      stdout: BinaryIO) -> Copied:
    """Copy ``source`` to the local file ``destination`` (``-``: ``stdout``).

    Into a local directory the file goes under its own name, with the
    sandbox file's permission bits.
    """
    path = _absolute(client, source)
    info = client.stat(source.sandbox, path)
    if info.is_dir:
        raise IsADirectoryError(f"{source.sandbox}:{path} is a directory; cp copies one file.")
    if destination == STDIO:
        size = client.read_file_into(source.sandbox, path, stdout)
        stdout.flush()
        return Copied(f"{source.sandbox}:{path}", destination, size)
    target = destination
    if destination.endswith("/") or os.path.isdir(destination):
        target = os.path.join(destination, posixpath.basename(path.rstrip("/")))
    fd, temporary = tempfile.mkstemp(prefix=".sandboxctl-", dir=os.path.dirname(target) or ".")
    try:
        with os.fdopen(fd, "wb") as file:
            size = client.read_file_into(source.sandbox, path, file)
            os.fchmod(file.fileno(), stat.S_IMODE(info.mode) or 0o644)
        os.replace(temporary, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise
    return Copied(f"{source.sandbox}:{path}", target, size)
