"""The agent binary: its build, its two other modes, and its process properties."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import time
from pathlib import Path

import pytest
from agentproc import wait_until

import sandboxd.agent
from sandboxd.agent import build

pytestmark = pytest.mark.pure


def elf_machine(path: Path) -> int:
    head = path.read_bytes()[:64]
    assert head[:4] == b"\x7fELF"
    return int.from_bytes(head[18:20], "little")


def has_interpreter(path: Path) -> bool:
    """Whether the ELF file has a PT_INTERP program header (is dynamically linked)."""
    data = path.read_bytes()
    phoff = int.from_bytes(data[32:40], "little")
    phentsize = int.from_bytes(data[54:56], "little")
    phnum = int.from_bytes(data[56:58], "little")
    return any(int.from_bytes(data[phoff + i * phentsize:phoff + i * phentsize + 4], "little")
               == 3 for i in range(phnum))


def test_binary_is_static_small_and_for_this_machine(agent_bin: Path) -> None:
    assert not has_interpreter(agent_bin)
    assert agent_bin.stat().st_size < 150_000
    assert elf_machine(agent_bin) == {"x86_64": 62, "aarch64": 183}[sandboxd.agent.host_arch()]


def test_agent_binary_finds_it_or_names_the_build_command(
        agent_bin: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    if os.environ.get("SANDBOXD_AGENT_BIN"):
        pytest.skip("testing another build")
    assert sandboxd.agent.agent_binary() == agent_bin
    monkeypatch.setattr(sandboxd.agent, "BIN_DIR", tmp_path)
    with pytest.raises(sandboxd.agent.AgentMissing, match=r"python -m sandboxd\.agent\.build"):
        sandboxd.agent.agent_binary("arm64")
    with pytest.raises(ValueError, match="unsupported architecture"):
        sandboxd.agent.agent_binary("riscv64")


def test_build_only_when_sources_change(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    try:
        build.compiler(sandboxd.agent.host_arch())
    except build.BuildError as exc:
        pytest.skip(str(exc))
    src = tmp_path / "src"
    shutil.copytree(build.SRC_DIR, src)
    monkeypatch.setattr(build, "SRC_DIR", src)
    out = tmp_path / "out"
    first = build.build(out)
    mtime = first.stat().st_mtime_ns
    assert build.build(out).stat().st_mtime_ns == mtime  # up to date: untouched
    main_c = src / "main.c"
    main_c.write_text(main_c.read_text() + "\n/* changed */\n")
    assert build.build(out).stat().st_mtime_ns != mtime
    assert stat.S_IMODE(first.stat().st_mode) == 0o755
    assert [p.name for p in out.iterdir() if not p.name.startswith(".")] == [first.name]


def test_build_failure_is_reported(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    try:
        build.compiler(sandboxd.agent.host_arch())
    except build.BuildError as exc:
        pytest.skip(str(exc))
    src = tmp_path / "src"
    shutil.copytree(build.SRC_DIR, src)
    (src / "main.c").write_text("int main(void) { int unused; return 0; }\n")
    monkeypatch.setattr(build, "SRC_DIR", src)
    with pytest.raises(build.BuildError, match="unused"):
        build.build(tmp_path / "out")
    assert not list((tmp_path / "out").glob("sandboxd-agent-*"))


def test_cross_build_for_aarch64(tmp_path: Path) -> None:
    try:
        build.compiler("aarch64")
    except build.BuildError as exc:
        pytest.skip(str(exc))
    path = build.build(tmp_path, "aarch64")
    assert path.name == "sandboxd-agent-aarch64"
    assert elf_machine(path) == 183
    assert not has_interpreter(path)


def test_version(agent_bin: Path) -> None:
    out = subprocess.run([str(agent_bin), "--version"], capture_output=True, text=True,
                         check=True).stdout
    assert out == "sandboxd-agent 0.1.0 (protocol 1)\n"


def test_supervise_returns_the_status_after_every_descendant(agent_bin: Path) -> None:
    t0 = time.monotonic()
    proc = subprocess.run([str(agent_bin), "--supervise", "--", "sh", "-c",
                           "(sleep 0.3; echo late) & echo early; exit 5"],
                          capture_output=True, timeout=20)
    assert proc.returncode == 5
    assert proc.stdout == b"early\nlate\n"
    assert time.monotonic() - t0 >= 0.3
    proc = subprocess.run([str(agent_bin), "--supervise", "sh", "-c", "kill -TERM $$"],
                          capture_output=True, timeout=20)
    assert proc.returncode == 143
    proc = subprocess.run([str(agent_bin), "--supervise", "no-such-binary"],
                          capture_output=True, timeout=20)
    assert proc.returncode == 127
    assert proc.stderr == (b"sandboxd-agent: cannot run 'no-such-binary': "
                           b"No such file or directory\n")
    proc = subprocess.run([str(agent_bin), "--supervise"], capture_output=True, timeout=20)
    assert proc.returncode == 2


def test_supervise_forwards_signals_to_the_command(agent_bin: Path) -> None:
    with subprocess.Popen([str(agent_bin), "--supervise", "--", "sh", "-c",
                           "trap 'echo got; exit 9' USR1; echo ready; "
                           "while :; do sleep 0.05; done"], stdout=subprocess.PIPE) as proc:
        try:
            assert proc.stdout is not None
            assert proc.stdout.readline() == b"ready\n"
            proc.send_signal(10)  # SIGUSR1
            assert proc.wait(timeout=10) == 9
            assert proc.stdout.read() == b"got\n"
        finally:
            if proc.poll() is None:
                proc.kill()


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to start the agent as nobody")
def test_start_up_properties(agent_bin: Path) -> None:
    """Non-dumpable, channel on 990/991 close-on-exec, 0-2 on /dev/null, subreaper, tiny RSS."""
    r_in, w_in = os.pipe()
    r_out, w_out = os.pipe()
    proc = subprocess.Popen([str(agent_bin)], stdin=r_in, stdout=w_out,
                            stderr=subprocess.DEVNULL, user=65534, group=65534,
                            start_new_session=True)
    os.close(r_in)
    os.close(w_out)
    try:
        fd_dir = f"/proc/{proc.pid}/fd"
        wait_until(lambda: os.path.exists(f"{fd_dir}/991"), what="the channel on 991")
        # Non-dumpable: its /proc entries belong to root, not to its own uid (65534).
        assert os.stat(fd_dir).st_uid == 0
        assert os.stat(f"/proc/{proc.pid}").st_uid == 65534
        links = {int(n): os.readlink(f"{fd_dir}/{n}") for n in os.listdir(fd_dir)}
        assert links[0] == links[1] == links[2] == "/dev/null"
        assert links[990].startswith("pipe:") and links[991].startswith("pipe:")
        with open(f"/proc/{proc.pid}/fdinfo/990") as f:
            flags = int(f.read().split("flags:")[1].split()[0], 8)
        assert flags & 0o2000000  # O_CLOEXEC
        assert flags & 0o4000  # O_NONBLOCK
        with open(f"/proc/{proc.pid}/status") as f:
            status = f.read()
        rss_kb = int(status.split("VmRSS:")[1].split()[0])
        assert rss_kb < 200, f"idle RSS {rss_kb} kB"
    finally:
        proc.kill()
        proc.wait()
        os.close(w_in)
        os.close(r_out)
