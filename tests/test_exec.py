"""Buffered ``sandbox.exec`` through the real daemon and the real Docker Engine.

Exit codes are the process's own, stdout and stderr come back as untouched
bytes (demultiplexed from the engine's real frames), stdin is delivered, a
timeout kills the process and everything it started, ``max_output`` keeps
head and tail without blocking the process, and a client that goes away
takes its exec with it.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable

import pytest
from conftest import Daemon, MakeSandbox, eventually
from sandboxd_client import (
    Conflict,
    ConnectionLost,
    InvalidParams,
    NotFound,
    PermissionDenied,
    SandboxClient,
)
from sandboxd_client.aio import Sandbox

ALL_BYTES = bytes(range(256))



async def process_list(sb: Sandbox) -> str:
    """The sandbox's processes as ``PID ARGS`` lines (busybox ps)."""
    r = await sb.exec(["ps", "-o", "pid,args"])
    assert r.exit_code == 0, r.stderr
    return r.stdout.decode(errors="replace")


def running(ps_output: str, needle: str) -> list[str]:
    return [line for line in ps_output.splitlines() if needle in line]


# -- exit codes -------------------------------------------------------------


async def test_exit_code_is_the_process_own(make_sandbox: MakeSandbox) -> None:
    sb = await make_sandbox()
    assert (await sb.exec(["true"])).exit_code == 0
    assert (await sb.exec(["false"])).exit_code == 1
    r = await sb.exec(["sh", "-c", "exit 3"])
    assert (r.exit_code, r.timed_out, r.truncated) == (3, False, False)
    assert (await sb.exec(["sh", "-c", "exit 255"])).exit_code == 255
    assert r.duration >= 0


async def test_killed_process_reports_signal_exit_code(make_sandbox: MakeSandbox) -> None:
    sb = await make_sandbox()
    r = await sb.exec(["sh", "-c", "kill -9 $$"])
    assert r.exit_code == 137
    assert r.timed_out is False
    r = await sb.exec(["sh", "-c", "kill -15 $$"])
    assert r.exit_code == 143


async def test_missing_binary_is_an_exit_code_not_an_error(make_sandbox: MakeSandbox) -> None:
    sb = await make_sandbox()
    r = await sb.exec(["/no/such/binary", "arg"])
    assert r.exit_code in (126, 127)
    assert r.timed_out is False
    r = await sb.exec(["no-such-command-anywhere"])
    assert r.exit_code in (126, 127)
    # The sandbox is unharmed.
    assert (await sb.exec(["true"])).exit_code == 0


# -- output -----------------------------------------------------------------


async def test_stdout_and_stderr_are_separate_and_untrimmed(make_sandbox: MakeSandbox) -> None:
    sb = await make_sandbox()
    r = await sb.exec(["sh", "-c", r"printf '\n  out \r\n\n'; printf '\terr  \n\n' >&2"])
    assert r.exit_code == 0
    assert r.stdout == b"\n  out \r\n\n"
    assert r.stderr == b"\terr  \n\n"
    assert isinstance(r.stdout, bytes) and isinstance(r.stderr, bytes)


async def test_no_output_is_empty_bytes(make_sandbox: MakeSandbox) -> None:
    sb = await make_sandbox()
    r = await sb.exec(["true"])
    assert r.stdout == b"" and r.stderr == b""


async def test_binary_output_via_printf(make_sandbox: MakeSandbox) -> None:
    sb = await make_sandbox()
    script = "printf '" + "".join(f"\\{b:03o}" for b in ALL_BYTES) + "'"
    r = await sb.exec(["sh", "-c", script + "; " + script + " >&2"])
    assert r.exit_code == 0
    assert r.stdout == ALL_BYTES
    assert r.stderr == ALL_BYTES


async def test_binary_file_round_trip_through_stdin(make_sandbox: MakeSandbox) -> None:
    sb = await make_sandbox()
    payload = ALL_BYTES * 64 + os.urandom(70_000) + b"\0\0\n\n  "
    r = await sb.exec(["sh", "-c", "cat > /tmp/blob"], stdin=payload)
    assert (r.exit_code, r.stdout, r.stderr) == (0, b"", b"")
    r = await sb.exec(["cat", "/tmp/blob"], max_output=1 << 20)
    assert r.exit_code == 0
    assert r.stdout == payload
    r = await sb.exec(["sh", "-c", "cat /tmp/blob >&2"], max_output=1 << 20)
    assert (r.stdout, r.stderr) == (b"", payload)


async def test_interleaved_large_stdout_and_stderr_stay_complete_and_ordered(
    make_sandbox: MakeSandbox,
) -> None:
    sb = await make_sandbox()
    n = 2000
    r = await sb.exec(
        ["sh", "-c",
         f"i=0; while [ $i -lt {n} ]; do echo out$i; echo err$i >&2; i=$((i+1)); done"],
        timeout=60,
    )
    assert r.exit_code == 0 and not r.truncated
    assert r.stdout == b"".join(b"out%d\n" % i for i in range(n))
    assert r.stderr == b"".join(b"err%d\n" % i for i in range(n))


async def test_large_output_on_both_streams_many_frames(make_sandbox: MakeSandbox) -> None:
    sb = await make_sandbox()
    # ~600 KB per stream, written concurrently: many engine frames of varying sizes.
    r = await sb.exec(
        ["sh", "-c", "seq 1 80000 & seq 100000 180000 >&2 & wait"],
        max_output=4 << 20,
        timeout=60,
    )
    assert r.exit_code == 0 and not r.truncated
    assert r.stdout == "".join(f"{i}\n" for i in range(1, 80001)).encode()
    assert r.stderr == "".join(f"{i}\n" for i in range(100000, 180001)).encode()


# -- stdin ------------------------------------------------------------------


async def test_stdin_bytes_are_delivered_then_eof(make_sandbox: MakeSandbox) -> None:
    sb = await make_sandbox()
    r = await sb.exec(["cat"], stdin=b"hello\0world\n\xff")
    assert (r.exit_code, r.stdout, r.stderr) == (0, b"hello\0world\n\xff", b"")
    # Empty stdin is an immediate end-of-file, not a hang.
    r = await sb.exec(["cat"], stdin=b"", timeout=20)
    assert (r.exit_code, r.stdout, r.timed_out) == (0, b"", False)


async def test_large_stdin_with_output_flowing_back(make_sandbox: MakeSandbox) -> None:
    sb = await make_sandbox()
    payload = os.urandom(1 << 20)
    # cat writes while it still reads: stdin and stdout must flow at the same time.
    r = await sb.exec(["cat"], stdin=payload, max_output=2 << 20, timeout=60)
    assert r.exit_code == 0 and not r.timed_out and not r.truncated
    assert r.stdout == payload
    r = await sb.exec(["wc", "-c"], stdin=payload, timeout=60)
    assert r.stdout.split() == [str(1 << 20).encode()]


async def test_stdin_the_process_never_reads(make_sandbox: MakeSandbox) -> None:
    sb = await make_sandbox()
    r = await sb.exec(["sh", "-c", "echo done"], stdin=os.urandom(1 << 20), timeout=30)
    assert (r.exit_code, r.stdout, r.timed_out) == (0, b"done\n", False)


async def test_without_stdin_the_process_reads_eof(make_sandbox: MakeSandbox) -> None:
    sb = await make_sandbox()
    r = await sb.exec(["cat"], timeout=20)
    assert (r.exit_code, r.stdout, r.timed_out) == (0, b"", False)


# -- timeout ----------------------------------------------------------------


async def test_timeout_kills_and_reports(make_sandbox: MakeSandbox) -> None:
    sb = await make_sandbox()
    started = time.monotonic()
    r = await sb.exec(["sleep", "30"], timeout=1)
    elapsed = time.monotonic() - started
    assert r.timed_out is True
    assert r.exit_code == 137
    assert elapsed < 15, f"a 1 s timeout took {elapsed:.1f} s"
    assert 0.9 <= r.duration < 15


async def test_timeout_keeps_output_produced_before_the_kill(make_sandbox: MakeSandbox) -> None:
    sb = await make_sandbox()
    r = await sb.exec(["sh", "-c", "echo before; echo warn >&2; sleep 30; echo after"], timeout=1)
    assert r.timed_out and r.exit_code == 137
    assert r.stdout == b"before\n"
    assert r.stderr == b"warn\n"


async def test_no_timeout_when_the_command_finishes_in_time(make_sandbox: MakeSandbox) -> None:
    sb = await make_sandbox()
    r = await sb.exec(["sh", "-c", "echo quick"], timeout=30)
    assert (r.exit_code, r.stdout, r.timed_out) == (0, b"quick\n", False)


async def test_timeout_kills_everything_the_command_started(make_sandbox: MakeSandbox) -> None:
    sb = await make_sandbox()
    r = await sb.exec(
        ["sh", "-c", "sleep 300 & sleep 300 & setsid sleep 301 & (sleep 302 &) ; wait"],
        timeout=1,
    )
    assert r.timed_out and r.exit_code == 137
    leftovers: list[str] = []

    async def all_gone() -> bool:
        nonlocal leftovers
        ps = await process_list(sb)
        leftovers = [line for needle in ("sleep 300", "sleep 301", "sleep 302")
                     for line in running(ps, needle)]
        return not leftovers

    await eventually(all_gone, what="no sleep left after the timeout")
    assert leftovers == []
    # The sandbox's own main process (PID 1: its agent) survives the kill.
    assert any(line.split()[0] == "1" for line in (await process_list(sb)).splitlines()[1:])


async def test_timeout_kills_a_double_forked_child_with_a_cleared_environment(
    make_sandbox: MakeSandbox,
) -> None:
    sb = await make_sandbox()
    r = await sb.exec(["sh", "-c", "(env -i sleep 303 >/dev/null 2>&1 &) ; sleep 300"], timeout=1)
    assert r.timed_out and r.exit_code == 137

    async def gone() -> bool:
        return not running(await process_list(sb), "sleep 303")

    await eventually(gone, within=5, what="the double-forked sleep 303 is killed")


async def test_timeout_does_not_touch_other_execs(make_sandbox: MakeSandbox) -> None:
    sb = await make_sandbox()
    # A command from an earlier exec, left running in the background.
    r = await sb.exec(["sh", "-c", "sleep 310 > /dev/null 2>&1 &"])
    assert r.exit_code == 0
    r = await sb.exec(["sh", "-c", "sleep 311 & wait"], timeout=1)
    assert r.timed_out

    async def victim_gone() -> bool:
        return not running(await process_list(sb), "sleep 311")

    await eventually(victim_gone, what="the timed-out exec's sleep is killed")
    assert running(await process_list(sb), "sleep 310"), "another exec's process was killed"


# -- max_output -------------------------------------------------------------


async def test_max_output_truncates_without_blocking(make_sandbox: MakeSandbox) -> None:
    sb = await make_sandbox()
    r = await sb.exec(["head", "-c", "3000000", "/dev/zero"], max_output=100_000, timeout=60)
    assert r.exit_code == 0 and not r.timed_out
    assert r.truncated is True
    assert 0 < len(r.stdout) <= 100_000
    assert r.stderr == b""


async def test_max_output_keeps_head_and_tail_with_a_marker(make_sandbox: MakeSandbox) -> None:
    sb = await make_sandbox()
    r = await sb.exec(
        ["sh", "-c", "echo HEAD; head -c 500000 /dev/zero; echo TAIL"],
        max_output=100_000,
        timeout=60,
    )
    assert r.exit_code == 0 and r.truncated
    out = r.stdout
    assert len(out) <= 100_000
    assert out.startswith(b"HEAD\n\0\0\0")
    assert out.endswith(b"\0\0\0TAIL\n")
    middle = out[len(b"HEAD\n"):-len(b"TAIL\n")]
    marker = middle.strip(b"\0")
    assert marker, "no marker between the kept head and tail"
    assert middle.startswith(b"\0" * 1000) and middle.endswith(b"\0" * 1000)


async def test_max_output_applies_per_stream(make_sandbox: MakeSandbox) -> None:
    sb = await make_sandbox()
    r = await sb.exec(
        ["sh", "-c", "echo small; head -c 300000 /dev/zero >&2"], max_output=50_000
    )
    assert r.exit_code == 0 and r.truncated
    assert r.stdout == b"small\n"
    assert 0 < len(r.stderr) <= 50_000


async def test_output_exactly_at_max_output_is_not_truncated(make_sandbox: MakeSandbox) -> None:
    sb = await make_sandbox()
    r = await sb.exec(["head", "-c", "4096", "/dev/zero"], max_output=4096)
    assert (r.truncated, r.stdout) == (False, b"\0" * 4096)
    r = await sb.exec(["head", "-c", "4097", "/dev/zero"], max_output=4096)
    assert r.truncated is True and len(r.stdout) <= 4096


async def test_default_max_output_is_one_mib(make_sandbox: MakeSandbox) -> None:
    sb = await make_sandbox()
    r = await sb.exec(["head", "-c", str(1 << 20), "/dev/zero"])
    assert (r.truncated, len(r.stdout)) == (False, 1 << 20)
    r = await sb.exec(["head", "-c", str((1 << 20) + 1), "/dev/zero"])
    assert r.truncated is True and len(r.stdout) <= 1 << 20


# -- env, workdir, user -------------------------------------------------------


async def test_env_is_honoured(make_sandbox: MakeSandbox) -> None:
    sb = await make_sandbox(env={"FROM_CREATE": "c"})
    r = await sb.exec(["env"], env={"FOO": "bar baz", "EMPTY": "", "EQ": "a=b"})
    lines = r.stdout.decode().splitlines()
    assert "FOO=bar baz" in lines
    assert "EMPTY=" in lines
    assert "EQ=a=b" in lines
    assert "FROM_CREATE=c" in lines
    r = await sb.exec(["sh", "-c", 'printf %s "$FROM_CREATE"'], env={"FROM_CREATE": "exec"})
    assert r.stdout == b"exec"


async def test_workdir_default_and_override(make_sandbox: MakeSandbox) -> None:
    sb = await make_sandbox()
    assert (await sb.exec(["pwd"])).stdout == b"/workspace\n"
    assert (await sb.exec(["pwd"], workdir="/tmp")).stdout == b"/tmp\n"
    sb2 = await make_sandbox(workdir="/srv/work")
    assert (await sb2.exec(["pwd"])).stdout == b"/srv/work\n"


async def test_sandboxes_run_as_their_own_unprivileged_uid(make_sandbox: MakeSandbox) -> None:
    one, two = await make_sandbox(), await make_sandbox()
    uids = set()
    for sb in (one, two):
        r = await sb.exec(["sh", "-c", "id -u; id -g; echo $HOME; touch /tmp/t ./w && echo ok"])
        uid, gid, home, ok = r.stdout.decode().split()
        assert int(uid) >= 100_000 and uid == gid and ok == "ok", r
        assert home == "/workspace" and sb.user == f"{uid}:{gid}"
        uids.add(uid)
    assert len(uids) == 2  # one uid per sandbox, never shared
    with pytest.raises(PermissionDenied, match="not allowed"):
        await one.exec(["id"], user="nobody")
    with pytest.raises(PermissionDenied, match="root"):
        await one.exec(["id"], user="root")


async def test_user_is_honoured_where_the_policy_allows_it(
    spawn_daemon: Callable[..., Daemon],
) -> None:
    d = spawn_daemon(config='[policy]\nusers = ["nobody", "65534", "1234:1234"]\n'
                            "allow_root = true\n")
    async with SandboxClient(d.socket) as c:
        sb = await c.create(ttl=60)
        try:
            assert (await sb.exec(["id", "-u"], user="nobody")).stdout == b"65534\n"
            assert (await sb.exec(["id", "-u"], user="65534")).stdout == b"65534\n"
            r = await sb.exec(["id", "-u"], user="1234:1234")
            assert r.stdout == b"1234\n"
            assert (await sb.exec(["id", "-u"], user="root")).stdout == b"0\n"
            with pytest.raises(PermissionDenied):
                await sb.exec(["id"], user="daemon")
            rooted = await c.create(ttl=60, user="root")
            try:
                assert (await rooted.exec(["id", "-u"])).stdout == b"0\n"
            finally:
                await rooted.remove()
        finally:
            await sb.remove()


# -- errors -------------------------------------------------------------------


async def test_exec_in_a_paused_sandbox_is_conflict(make_sandbox: MakeSandbox) -> None:
    sb = await make_sandbox()
    await sb.pause()
    try:
        with pytest.raises(Conflict) as info:
            await sb.exec(["true"])
        assert info.value.code == "conflict"
    finally:
        await sb.resume()
    assert (await sb.exec(["true"])).exit_code == 0


async def test_empty_cmd_is_invalid_params(make_sandbox: MakeSandbox,
                                           client: SandboxClient) -> None:
    sb = await make_sandbox()
    with pytest.raises(InvalidParams) as info:
        await sb.exec([])
    assert info.value.code == "invalid_params"
    with pytest.raises(InvalidParams, match="cmd"):
        await client.call("sandbox.exec", id=sb.id)
    with pytest.raises(InvalidParams, match="cmd"):
        await client.call("sandbox.exec", id=sb.id, cmd="echo hi")
    with pytest.raises(InvalidParams, match="timeout"):
        await client.call("sandbox.exec", id=sb.id, cmd=["true"], timeout=-1)
    with pytest.raises(InvalidParams, match="bogus"):
        await client.call("sandbox.exec", id=sb.id, cmd=["true"], bogus=1)


async def test_exec_on_unknown_sandbox_is_not_found(client: SandboxClient) -> None:
    with pytest.raises(NotFound) as info:
        await client.exec("000000000000", ["true"])
    assert info.value.code == "not_found"
    with pytest.raises(NotFound):
        await client.exec("no-such-sandbox-name", ["true"])


# -- disconnect -------------------------------------------------------------


async def test_exec_is_killed_when_its_client_disconnects(
    make_sandbox: MakeSandbox, daemon: Daemon, client: SandboxClient
) -> None:
    sb = await make_sandbox()
    other = SandboxClient(daemon.socket)
    await other.connect()
    pending = asyncio.create_task(other.exec(sb.id, ["sleep", "300"]))
    try:

        async def started() -> bool:
            return bool(running(await process_list(sb), "sleep 300"))

        await eventually(started, what="the sleep started")
    finally:
        await other.close()
    with pytest.raises(ConnectionLost):
        await pending

    async def gone() -> bool:
        return not running(await process_list(sb), "sleep 300")

    await eventually(gone, what="the disconnected client's exec is killed")
    assert await client.ping() == "pong"


async def test_concurrent_execs_in_one_sandbox(make_sandbox: MakeSandbox) -> None:
    sb = await make_sandbox()
    results = await asyncio.gather(
        *(sb.exec(["sh", "-c", f"echo {i}; echo e{i} >&2; exit {i}"]) for i in range(8))
    )
    for i, r in enumerate(results):
        assert (r.exit_code, r.stdout, r.stderr) == (i, f"{i}\n".encode(), f"e{i}\n".encode())
