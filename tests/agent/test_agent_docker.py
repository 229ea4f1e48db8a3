"""The agent as PID 1 of real containers, over the Engine API's attach stream.

Validates the transport assumptions of PROTOCOL.md: the agent is the init (no docker-init),
a handshake syncs past whatever the engine delivers first, output written while nobody is
attached is re-sent after the next HELLO, the channel stays private to the agent (a
`docker exec` as the same uid can neither open /proc/1/fd/990 nor ptrace PID 1), signals
from inside are ignored while `docker stop` ends it at once, and it runs in an image that
holds nothing at all. Needs the Docker Engine (not marked pure); every container is removed.
"""

from __future__ import annotations

import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from dockerattach import Attach, agent_container, docker

import sandboxd.agent
from sandboxd.agent import build
from sandboxd.agent import frames as fr

BASE_IMAGE = "sandboxd/base:latest"

PTRACE_PROBE = r"""
#include <errno.h>
#include <stdio.h>
#include <string.h>
#include <sys/ptrace.h>
int main(void)
{
    long r = ptrace(PTRACE_ATTACH, 1, 0, 0);
    printf("%s\n", r == 0 ? "attached" : strerror(errno));
    return r == 0;
}
"""


def name() -> str:
    return f"sbx-agent-test-{uuid.uuid4().hex[:10]}"


@pytest.fixture
def container(engine: None, agent_bin: Path) -> Iterator[str]:
    with agent_container(agent_bin, BASE_IMAGE, name()) as cid:
        yield cid


def exec_as_nobody(cid: str, *argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["docker", "exec", "--user", "65534:65534", cid, *argv],
                          capture_output=True, text=True, timeout=30)


def test_agent_is_pid_1_and_serves_execs(container: str) -> None:
    att = Attach(container)
    try:
        state = att.handshake()
        assert state.execs == () and state.protocol_version == 1
        ex, out, err = att.run(1, ["sh", "-c", "id -u; echo $PPID; cat /proc/1/comm"])
        assert ex.exit_code == 0 and err == b""
        uid, ppid, comm = out.decode().split()
        assert (uid, comm) == ("65534", "agent")
        assert int(ppid) != 1  # the command's parent is its supervisor, not the agent
        ex, out, _ = att.run(2, ["no-such-binary"])
        assert ex.exit_code == 127
    finally:
        att.close()


def test_output_while_detached_is_resent_after_hello(container: str) -> None:
    first = Attach(container)
    first.handshake()
    script = "for i in $(seq 1 20); do echo line$i; sleep 0.02; done; echo bye >&2; exit 4"
    first.send(fr.encode_start(3, ["sh", "-c", script], detached=True))
    first.send(fr.encode_start(4, ["sh", "-c", "sleep 0.3; echo later"]))
    first.take(fr.Started, lambda s: s.exec_id == 4)
    first.close()  # detach: the engine now drops what the agent writes

    def exited() -> fr.State | None:
        att = Attach(container)
        try:
            st = att.handshake()
        finally:
            att.close()
        return st if len(st.execs) == 2 and all(r.exited for r in st.execs) else None

    deadline = time.monotonic() + 20
    while (st := exited()) is None:
        assert time.monotonic() < deadline, "the execs did not finish"
    assert {r.exec_id: (r.exit_code, r.acked) for r in st.execs} == {3: (4, 0), 4: (0, 0)}

    second = Attach(container)
    try:
        second.handshake()
        outs: dict[int, bytearray] = {3: bytearray(), 4: bytearray()}
        exits: dict[int, fr.Exit] = {}
        deadline = time.monotonic() + 10
        while len(exits) < 2:
            assert time.monotonic() < deadline, "no EXIT re-sent"
            second.pump(0.1)
            while second.frames:
                f = second.frames.popleft()
                if isinstance(f, fr.Output):
                    outs[f.exec_id] += f.data
                    second.send(fr.encode_ack(f.exec_id, f.end))
                elif isinstance(f, fr.Exit):
                    exits[f.exec_id] = f
        expected = "".join(f"line{i}\n" for i in range(1, 21)) + "bye\n"
        assert sorted(bytes(outs[3]).decode()) == sorted(expected)
        assert bytes(outs[4]) == b"later\n"
        assert (exits[3].exit_code, exits[3].end_offset) == (4, len(expected))
    finally:
        second.close()


def test_channel_and_pid_1_are_private(container: str, tmp_path: Path) -> None:
    for argv in (["cat", "/proc/1/fd/990"], ["ls", "/proc/1/fd/"], ["cat", "/proc/1/environ"],
                 ["dd", "if=/proc/1/mem", "bs=1", "count=1"]):
        proc = exec_as_nobody(container, *argv)
        assert proc.returncode != 0 and "Permission denied" in proc.stderr, (argv, proc)
    try:
        cc = build.compiler(sandboxd.agent.host_arch())
    except build.BuildError as exc:
        pytest.skip(str(exc))
    src = tmp_path / "probe.c"
    src.write_text(PTRACE_PROBE)
    probe = tmp_path / "probe"
    subprocess.run([*cc, "-static", "-O1", "-o", str(probe), str(src)], check=True)
    docker("cp", str(probe), f"{container}:/tmp/probe")
    proc = exec_as_nobody(container, "/tmp/probe")
    assert proc.returncode == 0 and proc.stdout.strip() == "Operation not permitted"


def test_signals_from_inside_are_ignored_and_docker_stop_is_prompt(container: str) -> None:
    for sig in ("TERM", "INT", "HUP", "KILL"):
        assert exec_as_nobody(container, "kill", f"-{sig}", "1").returncode == 0
    att = Attach(container)
    try:
        att.handshake()
        _, out, _ = att.run(1, ["echo", "alive"])
        assert out == b"alive\n"
        att.send(fr.encode_start(2, ["sleep", "300"]))
        att.take(fr.Started)
    finally:
        att.close()
    t0 = time.monotonic()
    docker("stop", "--time", "20", container)
    assert time.monotonic() - t0 < 5  # SIGTERM from outside ends the agent at once
    assert docker("inspect", "-f", "{{.State.ExitCode}}", container) == "0"


def test_runs_in_an_image_holding_nothing(engine: None, agent_bin: Path, tmp_path: Path) -> None:
    image = f"sbx-agent-empty-{uuid.uuid4().hex[:8]}:test"
    subprocess.run(["tar", "-cf", str(tmp_path / "empty.tar"), "-T", "/dev/null"], check=True)
    docker("import", str(tmp_path / "empty.tar"), image)
    try:
        with agent_container(agent_bin, image, name()) as cid:
            att = Attach(cid)
            try:
                att.handshake()
                ex, out, _ = att.run(1, ["/.sandboxd/agent", "--version"])
                assert ex.exit_code == 0 and out.startswith(b"sandboxd-agent ")
                ex, _, err = att.run(2, ["sh"])
                assert ex.exit_code == 127 and b"cannot run 'sh'" in err
                att.send(fr.encode_flist(9, "/"))
                res = att.take(fr.FResult)
                assert res.errno == 0
                names = {e.name for e in fr.parse_entries(res.body)}
                assert {b".sandboxd", b"proc", b"dev"} <= names
            finally:
                att.close()
    finally:
        docker("rmi", "-f", image, check=False)
