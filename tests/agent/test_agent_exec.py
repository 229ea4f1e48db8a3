"""Execs through a local agent: exit codes, output bytes and order, stdin, tty, signals,
tree kill, the orphan rule, timeouts."""

from __future__ import annotations

import os
import random
import signal
from pathlib import Path

import pytest
from agentproc import Agent, children_of, pid_alive, wait_until
from agentproc import ExecResult as agentproc_result

from sandboxd.agent import frames as fr

pytestmark = pytest.mark.pure


def test_handshake_reports_versions_and_no_execs(agent: Agent) -> None:
    assert agent.state is not None
    assert agent.state.protocol_version == fr.PROTOCOL_VERSION
    assert agent.state.agent_version == (0 << 16) | (1 << 8)
    assert agent.state.execs == ()


def test_true_false_and_exit_codes(agent: Agent) -> None:
    assert agent.run(["true"]).code == 0
    assert agent.run(["false"]).code == 1
    res = agent.run(["sh", "-c", "exit 42"])
    assert res.exit is not None
    assert (res.code, res.exit.signaled, res.exit.timed_out) == (42, False, False)
    assert res.pid is not None and res.pid > 0


@pytest.mark.parametrize(("sig", "code"), [(signal.SIGKILL, 137), (signal.SIGTERM, 143),
                                            (signal.SIGSEGV, 139)])
def test_killed_by_signal_reports_128_plus_n(agent: Agent, sig: int, code: int) -> None:
    res = agent.run(["sh", "-c", f"kill -{int(sig)} $$"])
    assert res.exit is not None
    assert (res.code, res.exit.signaled) == (code, True)


def test_missing_binary_is_127_with_the_stderr_line(agent: Agent) -> None:
    res = agent.run(["no-such-command-xyz"])
    assert res.code == 127
    assert res.stderr == (b"sandboxd-agent: cannot run 'no-such-command-xyz': "
                          b"No such file or directory\n")
    assert res.stdout == b""


def test_not_executable_is_126(agent: Agent, tmp_path: Path) -> None:
    script = tmp_path / "noexec"
    script.write_text("#!/bin/sh\n")
    script.chmod(0o644)
    res = agent.run([str(script)])
    assert res.code == 126
    assert b"Permission denied" in res.stderr


def test_missing_cwd_is_127_and_names_it(agent: Agent) -> None:
    res = agent.run(["pwd"], cwd="/no/such/dir")
    assert res.code == 127
    assert res.stderr == (b"sandboxd-agent: cannot run 'pwd': chdir '/no/such/dir': "
                          b"No such file or directory\n")


def test_cwd_and_env_are_laid_over_the_agents(agent: Agent, tmp_path: Path) -> None:
    res = agent.run(["sh", "-c", 'pwd; echo "$FOO:$LANG"; env | grep -c SBX_AGENT_TEST'],
                    cwd=str(tmp_path), env={"FOO": "bar", "LANG": "C.UTF-8"})
    assert res.stdout == f"{tmp_path}\nbar:C.UTF-8\n1\n".encode()


def test_every_byte_value_survives(agent: Agent, tmp_path: Path) -> None:
    blob = bytes(range(256)) * 64 + bytes(range(255, -1, -1))
    path = tmp_path / "blob"
    path.write_bytes(blob)
    res = agent.run(["cat", str(path)])
    assert res.code == 0
    assert res.stdout == blob
    res = agent.run(["sh", "-c", f"cat {path} >&2"])
    assert res.stderr == blob and res.stdout == b""


def test_offsets_partition_the_output_and_keep_the_interleaving(agent: Agent) -> None:
    script = "for i in $(seq 1 15); do echo out$i; sleep 0.01; echo err$i >&2; sleep 0.01; done"
    res = agent.run(["sh", "-c", script])
    assert res.code == 0 and res.exit is not None
    chunks = sorted(res.chunks, key=lambda c: c.offset)
    at = 0
    for c in chunks:
        assert c.offset == at
        at = c.end
    assert at == res.exit.end_offset
    merged = b"".join(bytes(c.data) for c in chunks)
    expected = b"".join(f"out{i}\nerr{i}\n".encode() for i in range(1, 16))
    assert merged == expected
    assert res.stdout == b"".join(f"out{i}\n".encode() for i in range(1, 16))


def test_large_stdin_through_cat_respects_the_window(agent: Agent) -> None:
    data = random.Random(1).randbytes(8 << 20)
    exec_id = agent.start(["cat"], stdin=True)
    sent = 0
    consumed = 0
    chunk = 192 << 10
    while sent < len(data):
        size = min(chunk, len(data) - sent)
        if sent + size - consumed > fr.STDIN_WINDOW:
            ack = agent.take(fr.StdinAck, lambda a: a.exec_id == exec_id)
            assert ack.consumed >= consumed
            consumed = ack.consumed
            assert consumed <= sent
            continue
        agent.send(fr.encode_stdin(exec_id, data[sent:sent + size]))
        sent += size
    agent.send(fr.encode_close_stdin(exec_id))
    res = agent.wait_exit(exec_id, timeout=30)
    assert res.code == 0
    assert not res.errors
    assert res.stdout == data
    acks = [f for f in agent.frames if isinstance(f, fr.StdinAck)]
    assert max([consumed, *(a.consumed for a in acks)]) == len(data)


def test_stdin_beyond_the_window_is_dropped_with_an_error(agent: Agent) -> None:
    exec_id = agent.start(["sleep", "30"], stdin=True)
    blob = b"x" * (1 << 20)
    for _ in range(4):  # pipe (1 MiB) + window (1 MiB) < 4 MiB
        agent.send(fr.encode_stdin(exec_id, blob))
    err = agent.take(fr.Error, lambda e: e.ident == exec_id)
    assert err.code == fr.ErrorCode.STDIN_OVERFLOW


def test_close_stdin_ends_a_reader_and_no_stdin_means_dev_null(agent: Agent) -> None:
    res = agent.run(["wc", "-c"], stdin=b"12345")
    assert res.stdout.strip() == b"5"
    res = agent.run(["wc", "-c"])  # stdin is /dev/null
    assert res.stdout.strip() == b"0"
    exec_id = agent.start(["true"])
    agent.wait_exit(exec_id)
    agent.send(fr.encode_stdin(exec_id, b"late"))
    err = agent.take(fr.Error, lambda e: e.ident == exec_id)
    assert err.code == fr.ErrorCode.BAD_PAYLOAD


def test_tty_exec_has_a_terminal_and_resizes(agent: Agent) -> None:
    res = agent.run(["sh", "-c", "tty; stty size"], tty=True, rows=33, cols=101)
    assert res.code == 0
    assert res.stderr == b""
    lines = res.stdout.replace(b"\r\n", b"\n").splitlines()
    assert lines[0].startswith(b"/dev/pts/")
    assert lines[1] == b"33 101"
    exec_id = agent.start(["sh", "-c", "read line; stty size; echo got=$line"], tty=True,
                          stdin=True)
    agent.send(fr.encode_resize(exec_id, 40, 120))
    agent.send(fr.encode_stdin(exec_id, b"hi\n"))
    res = agent.wait_exit(exec_id)
    out = res.stdout.replace(b"\r\n", b"\n")
    assert b"40 120\n" in out and b"got=hi\n" in out
    assert res.code == 0


def test_default_tty_size_and_close_stdin_keeps_the_terminal(agent: Agent) -> None:
    exec_id = agent.start(["sh", "-c", "stty size"], tty=True, stdin=True)
    agent.send(fr.encode_close_stdin(exec_id))
    res = agent.wait_exit(exec_id)
    assert res.stdout.strip() == b"24 80"


def test_signal_goes_to_the_commands_group(agent: Agent) -> None:
    exec_id = agent.start(["sh", "-c", "trap 'echo term; exit 7' TERM; echo ready; "
                           "while :; do sleep 0.05; done"])
    agent.wait(lambda: b"ready" in agent.execs[exec_id].stdout, what="ready")
    agent.send(fr.encode_signal(exec_id, signal.SIGTERM))
    res = agent.wait_exit(exec_id)
    assert res.code in (7, 143)


def _sleepers(tag: int) -> list[int]:
    """Pids of `sleep <tag...>` processes."""
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
        except OSError:
            continue
        if len(argv) >= 2 and argv[0].endswith(b"sleep") and argv[1].startswith(str(tag).encode()):
            found.append(int(name))
    return found


def test_kill_tree_catches_setsid_env_i_and_double_forks(agent: Agent) -> None:
    tag = random.randrange(100000, 900000)
    script = (f"sleep {tag}1 & setsid sleep {tag}2 & (env -i sleep {tag}3 &); "
              f"sh -c 'sleep {tag}4 &'; (setsid sh -c 'sleep {tag}5 &' &); echo ready; wait")
    exec_id = agent.start(["sh", "-c", script])
    agent.wait(lambda: b"ready" in agent.execs[exec_id].stdout, what="ready")
    wait_until(lambda: len(_sleepers(tag)) == 5, what="five sleepers")
    pids = _sleepers(tag)
    agent.send(fr.encode_signal(exec_id, signal.SIGKILL))
    res = agent.wait_exit(exec_id)
    assert res.exit is not None and res.code == 137 and res.exit.signaled
    wait_until(lambda: not any(pid_alive(p) for p in pids), what="the sleepers to die")


@pytest.mark.parametrize(("sig", "code"), [(signal.SIGKILL, 137), (signal.SIGTERM, 143)])
def test_a_signal_sent_with_the_start_is_not_lost(agent: Agent, sig: int, code: int) -> None:
    """START and SIGNAL in one write: the agent reads the SIGNAL before the supervisor has
    forked the command; it is delivered when the command is reported started."""
    tag = random.randrange(100000, 900000)
    for _ in range(5):
        exec_id = agent.new_id()
        agent.execs[exec_id] = agentproc_result(exec_id)
        agent.send(fr.encode_start(exec_id, ["sh", "-c", f"sleep {tag}1 & sleep {tag}2; wait"])
                   + fr.encode_signal(exec_id, sig))
        res = agent.wait_exit(exec_id)
        assert res.code == code
        if sig == signal.SIGKILL:
            wait_until(lambda: not _sleepers(tag), what="the sleepers to die")
        else:
            for pid in _sleepers(tag):  # SIGTERM goes to the group: sh's own sleeps too
                os.kill(pid, signal.SIGKILL)


def test_signal_9_after_exit_kills_what_the_command_left(agent: Agent) -> None:
    tag = random.randrange(100000, 900000)
    exec_id = agent.start(["sh", "-c", f"setsid sleep {tag}1 >/dev/null 2>&1 & echo started"])
    res = agent.wait_exit(exec_id)
    assert res.code == 0
    (pid,) = wait_until(lambda: _sleepers(tag), what="the sleeper")
    agent.send(fr.encode_signal(exec_id, signal.SIGKILL))
    wait_until(lambda: not pid_alive(pid), what="the sleeper to die")


def test_orphan_rule_when_the_supervisor_is_killed_from_inside(agent: Agent) -> None:
    tag = random.randrange(100000, 900000)
    exec_id = agent.start(["sh", "-c", f"sleep {tag}1 & sleep {tag}2 & kill -9 $PPID; "
                           f"sleep {tag}3"])
    res = agent.wait_exit(exec_id)
    assert res.code == 137
    wait_until(lambda: not _sleepers(tag), what="the orphans to be killed")
    # The agent serves on.
    assert agent.run(["echo", "still here"]).stdout == b"still here\n"


def test_supervisor_and_command_relationship(agent: Agent) -> None:
    exec_id = agent.start(["sh", "-c", "echo $PPID; exec sleep 30"])
    agent.wait(lambda: agent.execs[exec_id].stdout.endswith(b"\n"), what="the ppid")
    sup = int(agent.execs[exec_id].stdout)
    assert sup in children_of(agent.proc.pid)
    with open(f"/proc/{sup}/status") as f:
        status = f.read()
    assert f"\nPPid:\t{agent.proc.pid}\n" in status
    # The supervisor is its own session leader; the command leads its own group.
    with open(f"/proc/{sup}/stat", "rb") as f:
        fields = f.read().rsplit(b")", 1)[1].split()
    assert int(fields[3]) == sup  # session
    agent.send(fr.encode_signal(exec_id, signal.SIGKILL))
    assert agent.wait_exit(exec_id).code == 137


def test_timeout_kills_the_tree_and_says_so(agent: Agent) -> None:
    tag = random.randrange(100000, 900000)
    res = agent.run(["sh", "-c", f"setsid sleep {tag}1 & sleep {tag}2"], timeout_ms=300)
    assert res.exit is not None
    assert (res.exit.timed_out, res.code) == (True, 137)
    wait_until(lambda: not _sleepers(tag), what="the tree to die")


def test_exit_waits_for_output_but_not_for_background_holders(agent: Agent) -> None:
    # The background sleeper holds stdout: EXIT comes after the quiet bound, not after 30 s.
    tag = random.randrange(100000, 900000)
    res = agent.run(["sh", "-c", f"sleep {tag}1 & echo done"], timeout=5)
    assert res.code == 0 and res.stdout == b"done\n"
    pids = _sleepers(tag)
    assert pids and all(pid_alive(p) for p in pids)  # it keeps running in the tree


def test_a_supervisor_stopped_from_inside_still_reports_the_kill(agent: Agent) -> None:
    exec_id = agent.start(["sh", "-c", "kill -STOP $PPID; echo stopped; exec sleep 30"])
    agent.wait(lambda: b"stopped" in agent.execs[exec_id].stdout, what="stopped")
    agent.send(fr.encode_signal(exec_id, signal.SIGKILL))
    assert agent.wait_exit(exec_id).code == 137
