"""FREAD / FWRITE / FSTAT / FLIST through a local agent."""

from __future__ import annotations

import errno
import os
import stat
import time
from pathlib import Path

import pytest
from agentproc import Agent

from sandboxd.agent import frames as fr

pytestmark = pytest.mark.pure


class Files:
    def __init__(self, agent: Agent) -> None:
        self.agent = agent

    def _call(self, encode: bytes, rid: int) -> fr.FResult:
        return self.agent.request(encode, rid)

    def write(self, path: str, data: bytes, **kw: object) -> int:
        rid = self.agent.new_id()
        res = self._call(fr.encode_fwrite(rid, path, data, **kw), rid)  # type: ignore[arg-type]
        assert res.body == b""
        return res.errno

    def read(self, path: str, offset: int = 0, length: int = fr.FREAD_MAX
             ) -> tuple[int, int, bytes]:
        rid = self.agent.new_id()
        res = self._call(fr.encode_fread(rid, path, offset, length), rid)
        if res.errno:
            return res.errno, -1, b""
        size, data = fr.parse_fread_body(res.body)
        return 0, size, data

    def stat(self, path: str) -> tuple[int, fr.FileEntry | None]:
        rid = self.agent.new_id()
        res = self._call(fr.encode_fstat(rid, path), rid)
        return res.errno, (fr.parse_entry(res.body) if not res.errno else None)

    def list(self, path: str) -> tuple[int, list[fr.FileEntry]]:
        rid = self.agent.new_id()
        res = self._call(fr.encode_flist(rid, path), rid)
        return res.errno, (fr.parse_entries(res.body) if not res.errno else [])


@pytest.fixture
def files(agent: Agent) -> Files:
    return Files(agent)


def test_write_then_read_stat_and_list(files: Files, tmp_path: Path) -> None:
    path = tmp_path / "a.txt"
    assert files.write(str(path), b"hello world", mode=0o600) == 0
    assert path.read_bytes() == b"hello world"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600  # exact: the agent's umask is 0
    assert files.read(str(path)) == (0, 11, b"hello world")
    err, entry = files.stat(str(path))
    assert err == 0 and entry is not None
    assert (entry.name, entry.size, entry.is_dir) == (b"a.txt", 11, False)
    assert stat.S_ISREG(entry.mode)
    assert abs(entry.mtime_ns - path.stat().st_mtime_ns) == 0
    (tmp_path / "sub").mkdir()
    os.symlink("a.txt", tmp_path / "link")
    err, entries = files.list(str(tmp_path))
    assert err == 0
    by_name = {e.name: e for e in entries}
    assert set(by_name) == {b"a.txt", b"sub", b"link"}
    assert by_name[b"sub"].is_dir
    assert stat.S_ISLNK(by_name[b"link"].mode)  # listed, not followed


def test_default_mode_truncate_and_chunked_offsets(files: Files, tmp_path: Path) -> None:
    path = str(tmp_path / "big.bin")
    blob = os.urandom(3 * 1000 * 1000)
    step = 700 * 1000
    for off in range(0, len(blob), step):
        assert files.write(path, blob[off:off + step], offset=off, truncate=off == 0) == 0
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o644
    got = b""
    while True:
        err, size, data = files.read(path, offset=len(got), length=1 << 19)
        assert err == 0 and size == len(blob)
        if not data:
            break
        got += data
    assert got == blob
    assert files.write(path, b"short", truncate=True) == 0
    assert Path(path).read_bytes() == b"short"
    assert files.write(path, b"XY", offset=1) == 0  # no truncate: overwrite in place
    assert Path(path).read_bytes() == b"sXYrt"
    assert files.read(path, offset=100) == (0, 5, b"")


def test_parents_are_created_only_when_asked(files: Files, tmp_path: Path) -> None:
    path = tmp_path / "x" / "y" / "z.txt"
    assert files.write(str(path), b"1") == errno.ENOENT
    assert files.write(str(path), b"1", parents=True) == 0
    assert path.read_bytes() == b"1"
    assert stat.S_IMODE((tmp_path / "x" / "y").stat().st_mode) == 0o755


def test_errors(files: Files, tmp_path: Path) -> None:
    missing = str(tmp_path / "missing")
    assert files.read(missing)[0] == errno.ENOENT
    assert files.stat(missing)[0] == errno.ENOENT
    assert files.list(missing)[0] == errno.ENOENT
    assert files.read("relative/path")[0] == errno.EINVAL
    assert files.write("relative", b"x") == errno.EINVAL
    assert files.stat("")[0] == errno.EINVAL
    assert files.read(str(tmp_path))[0] == errno.EISDIR
    (tmp_path / "f").write_bytes(b"x")
    assert files.list(str(tmp_path / "f"))[0] == errno.ENOTDIR
    assert files.read(str(tmp_path / "f"), length=fr.FREAD_MAX + 1)[0] == errno.E2BIG
    assert files.read("/proc/self/status")[0] == errno.EINVAL  # procfs is refused
    assert files.write("/proc/self/comm", b"x") == errno.EINVAL


def test_fifo_and_devices_are_refused_without_blocking(files: Files, tmp_path: Path) -> None:
    fifo = str(tmp_path / "fifo")
    os.mkfifo(fifo)
    t0 = time.monotonic()
    assert files.read(fifo)[0] == errno.EINVAL
    assert files.write(fifo, b"x") == errno.EINVAL
    assert files.read("/dev/zero")[0] == errno.EINVAL
    assert files.write("/dev/null", b"x") == errno.EINVAL
    assert time.monotonic() - t0 < 2
    # A FIFO with a reader attached is refused too (not written into).
    rfd = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    try:
        assert files.write(fifo, b"x") == errno.EINVAL
        assert os.read(rfd, 10) == b""
    finally:
        os.close(rfd)


def test_stat_of_root_and_trailing_slash(files: Files, tmp_path: Path) -> None:
    err, entry = files.stat("/")
    assert err == 0 and entry is not None and entry.name == b"/" and entry.is_dir
    err, entry = files.stat(str(tmp_path) + "//")
    assert err == 0 and entry is not None and entry.name == tmp_path.name.encode()


def test_list_too_large_is_e2big(files: Files, tmp_path: Path) -> None:
    names = 5000
    for i in range(names):
        (tmp_path / (f"{i:05d}" + "n" * 200)).touch()
    err, _ = files.list(str(tmp_path))
    assert err == errno.E2BIG


def test_nul_in_a_path_is_a_bad_payload(agent: Agent) -> None:
    rid = agent.new_id()
    agent.send(fr.encode_frame(fr.FrameType.FSTAT, rid, b"/tmp\0x"))
    err = agent.take(fr.Error, lambda e: e.ident == rid)
    assert err.code == fr.ErrorCode.BAD_PAYLOAD
