"""Sanitizers over the agent's C code.

1. The input path (frame assembly, resync, payload parsing, argv/envp building) is compiled
   into fuzz_frames.c with -fsanitize=address,undefined and fed many random and mutated
   frames: it must never crash and must always come back in step.
2. The whole agent is built with the same sanitizers and driven through a mixed session
   (execs, tty, stdin, a detached exec, files, garbage): no sanitizer report may appear.

Skipped only when no C compiler is installed.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
from agentproc import Agent

from sandboxd.agent import frames as fr
from sandboxd.agent.build import SRC_DIR

pytestmark = pytest.mark.pure

HERE = Path(__file__).resolve().parent
SAN = ["-fsanitize=address,undefined", "-fno-sanitize-recover=all", "-fno-omit-frame-pointer"]
CORE = ["crc32.c", "frame.c", "inbuf.c", "payload.c"]


def c_compiler() -> str:
    for cc in ("gcc", "clang", "cc"):
        if shutil.which(cc):
            return cc
    pytest.skip("no C compiler (gcc or clang) installed")


def compile_c(out: Path, sources: list[Path], extra: list[str] | None = None) -> Path:
    cmd = [c_compiler(), "-std=gnu11", "-g", "-O1", "-Wall", "-Wextra", "-Werror", *SAN,
           f"-I{SRC_DIR}", "-o", str(out), *map(str, sources), *(extra or [])]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0 and "sanitize" in proc.stderr:
        pytest.skip(f"the compiler has no sanitizer runtime: {proc.stderr.strip()[:200]}")
    assert proc.returncode == 0, proc.stderr
    return out


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_frame_decoder_survives_random_and_mutated_frames(tmp_path: Path, seed: int) -> None:
    harness = compile_c(tmp_path / "fuzz_frames",
                        [HERE / "fuzz_frames.c", *(SRC_DIR / c for c in CORE)])
    env = {**os.environ, "ASAN_OPTIONS": "abort_on_error=0:detect_leaks=1",
           "UBSAN_OPTIONS": "print_stacktrace=1:halt_on_error=1"}
    proc = subprocess.run([str(harness), str(seed), "20000"], capture_output=True, text=True,
                          env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "sentinels=20000" in proc.stdout


def test_whole_agent_under_sanitizers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    binary = compile_c(tmp_path / "agent-san", sorted(SRC_DIR.glob("*.c")))
    log = tmp_path / "san"
    monkeypatch.setenv("ASAN_OPTIONS", f"log_path={log}:detect_leaks=0")
    monkeypatch.setenv("UBSAN_OPTIONS", f"log_path={log}:print_stacktrace=1")
    with Agent(binary) as a:
        a.handshake()
        assert a.run(["sh", "-c", "echo out; echo err >&2; exit 3"]).code == 3
        assert a.run(["cat"], stdin=os.urandom(3 << 20)).code == 0
        assert a.run(["sh", "-c", "stty size"], tty=True).stdout.strip() == b"24 80"
        assert a.run(["no-such-binary"]).code == 127
        a.auto_ack = False
        detached = a.start(["head", "-c", str(3 << 20), "/dev/urandom"], detached=True)
        a.wait(lambda: (st := a.rehello()) and any(r.exited for r in st.execs), what="exit")
        a.auto_ack = True
        a.send(fr.encode_rewind(detached, 0))
        a.wait_exit(detached)
        rid = a.new_id()
        path = str(tmp_path / "f" / "x")
        assert a.request(fr.encode_fwrite(rid, path, b"data", parents=True), rid).errno == 0
        rid = a.new_id()
        assert a.request(fr.encode_flist(rid, str(tmp_path)), rid).errno == 0
        a.send(os.urandom(20000) + fr.encode_start(999, ["true"])[:30])
        a.send(fr.encode_ping(5))
        a.take(fr.Pong, lambda p: p.ident == 5, timeout=20)
        a.rehello()
    reports = sorted(tmp_path.glob("san*"))
    assert not reports, "\n".join(p.read_text()[-3000:] for p in reports)
