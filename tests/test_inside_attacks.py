"""Hostile code inside a default sandbox, against the real daemon and the real engine.

What code running in a sandbox tries, and what it must get:

- escapes: no capability, no-new-privileges, a seccomp filter; mounting, new namespaces and
  device nodes are refused; no network but ``lo``; no Docker or containerd socket; a
  setuid-root binary in the image gives no privilege (checked against a control run
  without no-new-privileges, where the same binary does give euid 0);
- the agent's channel (PID 1's fds 990/991) and memory: no open, no write, no ptrace, no
  ``/proc/1/environ`` or ``/proc/1/mem`` (a static C probe does the ptrace part);
- signals to PID 1 (``kill -9 1``, ``-TERM``, ``-STOP``, ``kill -9 -1``): the sandbox keeps
  running with the same init and answers the next command;
- resource bombs: a fork bomb is held by the pids limit while the daemon and a neighbour
  sandbox keep answering; a memory bomb is OOM-killed and ``sandbox.oom`` is published; a
  ``dd`` past the ``disk`` limit is stopped at the limit and the sandbox stays usable;
- output floods: 2 GiB through ``sandbox.exec`` with a small ``max_output``, and an endless
  stream through ``exec.start`` to a client that reads slowly: the daemon's resident memory
  stays within a bound while the buffered result keeps head, tail and ``truncated``;
- escaping a timeout with ``(setsid env -i sleep 1000 &)``, through the agent and through
  the engine's exec (a root command); a streamed exec whose connection closes;
- a second local uid: cannot see, exec in, remove, follow the events of, or attach to
  what root made (``not_found`` throughout).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import msgpack
import pytest
from conftest import (
    BASE_IMAGE,
    Daemon,
    MakeSandbox,
    call_on,
    docker,
    eventually,
    reachable,
    run_as,
)
from hostile.common import (
    MIB,
    RssWatch,
    build_static,
    matching,
    processes,
    remove_and_wait,
    strangers,
)
from sandboxd_client import Conflict, SandboxClient
from sandboxd_client.aio import Sandbox

SpawnDaemon = Callable[..., Daemon]
OTHER = 65534
# The daemon may grow by this much while gigabytes of output pass through it. What it holds
# per exec is bounded by the protocol, not by the output: the agent's send window (1 MiB),
# the two max_output captures (2 x 64 KiB here), one msgpack frame of output per
# notification (<= 256 KiB) and the socket buffers; the rest is the allocator's slack.
# Anything proportional to the output (gigabytes) would blow far past it.
RSS_BOUND = 64 * MIB
FLOOD = 2 * 1024 * MIB  # busybox head takes no "2g": the byte count


@pytest.fixture(scope="module")
def probe_bin(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tests/hostile/probe.c, built static for this machine."""
    return build_static("probe.c", tmp_path_factory.mktemp("probe"))


@pytest.fixture(scope="module")
def probe(probe_bin: Path) -> bytes:
    """The probe's bytes, to copy into a sandbox."""
    return probe_bin.read_bytes()


@pytest.fixture(scope="module")
def suid_image(engine: None, probe_bin: Path,
               tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The base image plus two setuid-root binaries: the probe and a copy of busybox.

    ``COPY`` drops the setuid bit, so a ``RUN chmod`` (network none) sets it.
    """
    ctx = tmp_path_factory.mktemp("suid-image")
    (ctx / "suidprobe").write_bytes(probe_bin.read_bytes())
    (ctx / "Dockerfile").write_text(
        f"FROM {BASE_IMAGE}\n"
        "COPY suidprobe /bin/suidprobe\n"
        "RUN chown 0:0 /bin/suidprobe && chmod 4755 /bin/suidprobe"
        " && cp /bin/busybox /bin/busybox-suid && chmod 4755 /bin/busybox-suid\n"
    )
    tag = f"sandboxd-test/suid:{uuid.uuid4().hex[:12]}"
    proc = subprocess.run(["docker", "build", "--network", "none", "-q", "-t", tag, str(ctx)],
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "DOCKER_BUILDKIT": "0"})
    if proc.returncode != 0:
        raise RuntimeError(f"building {tag} failed: {proc.stderr.strip()}")
    try:
        yield tag
    finally:
        docker("rmi", "-f", tag, check=False)


def proc_status(text: bytes) -> dict[str, str]:
    return {k.strip(): v.strip() for k, _, v in
            (line.partition(":") for line in text.decode().splitlines()) if v}


def probe_lines(out: bytes) -> dict[str, str]:
    return dict(line.split("=", 1) for line in out.decode().splitlines() if "=" in line)


def pids_cgroup(container_id: str) -> Path:
    """The host directory of a container's pids cgroup (v1 or v2)."""
    pid = int(docker("inspect", "-f", "{{.State.Pid}}", container_id).strip())
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        if "pids" in controllers.split(","):
            return Path("/sys/fs/cgroup/pids") / path.lstrip("/")
        if controllers == "" and Path("/sys/fs/cgroup/cgroup.controllers").exists():
            return Path("/sys/fs/cgroup") / path.lstrip("/")
    raise AssertionError(f"no pids cgroup for process {pid}")


async def init_start_time(sb: Sandbox) -> str:
    """Field 22 of /proc/1/stat: changes if PID 1 was ever replaced."""
    r = await sb.exec(["cat", "/proc/1/stat"], timeout=10)
    assert r.exit_code == 0, r.stderr
    stat = r.stdout.decode()
    return stat[stat.rfind(")") + 2:].split()[19]


# -- escapes ---------------------------------------------------------------------------------


async def test_no_privilege_and_no_way_out(make_sandbox: MakeSandbox) -> None:
    sb = await make_sandbox()
    status = proc_status((await sb.exec(["cat", "/proc/self/status"])).stdout)
    for cap in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"):
        assert int(status[cap], 16) == 0, (cap, status[cap])
    assert status["NoNewPrivs"] == "1"
    assert status["Seccomp"] == "2"  # a filter is on (Docker's default profile)
    assert status["Uid"].split()[1] != "0"  # not root: its own uid from the daemon's range

    refused = {
        "mount tmpfs": ["mount", "-t", "tmpfs", "x", "/mnt"],
        "mount proc": ["mount", "-t", "proc", "proc", "/tmp"],
        "char device": ["mknod", "/tmp/mem", "c", "1", "1"],
        "block device": ["mknod", "/tmp/sda", "b", "8", "0"],
        "chroot": ["chroot", "/tmp", "/bin/true"],
        "nsenter init": ["nsenter", "-t", "1", "-m", "true"],
        "sysctl": ["sysctl", "-w", "kernel.hostname=pwned"],
        "raw socket": ["ping", "-c", "1", "-W", "1", "127.0.0.1"],
        "packet socket": ["arping", "-c", "1", "-I", "lo", "127.0.0.1"],
        "new link": ["ip", "link", "add", "x", "type", "dummy"],
    }
    for what, cmd in refused.items():
        r = await sb.exec(cmd, timeout=10)
        assert r.exit_code != 0, (what, r)
        assert any(why in r.stderr for why in (  # refused, not failed for another reason
            b"Operation not permitted", b"ermission denied", b"Read-only file system")), (
            what, r.stderr)
    made = await sb.exec(["sh", "-c", "ls /tmp/mem /tmp/sda 2>/dev/null"])
    assert made.stdout == b""

    r = await sb.exec(["cat", "/proc/net/dev"])
    interfaces = [line.split(":")[0].strip() for line in r.stdout.decode().splitlines()[2:]]
    assert interfaces == ["lo"]
    r = await sb.exec(["ls", "/var/run/docker.sock", "/run/docker.sock",
                       "/run/containerd/containerd.sock"])
    assert r.exit_code != 0 and r.stdout == b""
    # No Unix socket at all in its filesystem (proc and sys aside).
    r = await sb.exec(["find", "/", "(", "-path", "/proc", "-o", "-path", "/sys", ")",
                       "-prune", "-o", "-type", "s", "-print"], timeout=30)
    assert r.stdout == b"", r.stdout


async def test_new_namespaces_are_refused(make_sandbox: MakeSandbox) -> None:
    sb = await make_sandbox()
    if (await sb.exec(["sh", "-c", "busybox --list | grep -qx unshare"])).exit_code != 0:
        pytest.skip("this image's busybox has no unshare applet")
    for flags in (["-r"], ["-U"], ["-m"], ["-p", "-f"], ["-n"]):
        r = await sb.exec(["unshare", *flags, "true"], timeout=10)
        assert r.exit_code != 0, (flags, r)
        assert b"Operation not permitted" in r.stderr, (flags, r.stderr)


async def test_a_setuid_root_binary_gives_nothing(make_sandbox: MakeSandbox,
                                                  suid_image: str) -> None:
    """The image carries setuid-root copies of the probe and of busybox. Without
    no-new-privileges (a plain ``docker run``, the control) they do give euid 0; in a
    sandbox, run as its own uid, they give nothing and setuid(0) is refused."""
    control = docker("run", "--rm", "--network", "none", "--user", "100000:100000",
                     suid_image, "/bin/suidprobe", "ids")
    assert probe_lines(control.encode())["euid"] == "0", control  # the bit works

    sb = await make_sandbox(image=suid_image)
    uid = sb.user.split(":")[0]
    r = await sb.exec(["ls", "-ln", "/bin/suidprobe", "/bin/busybox-suid"])
    assert all(line.startswith("-rwsr-xr-x") and line.split()[2] == "0"
               for line in r.stdout.decode().splitlines()), r.stdout
    r = await sb.exec(["/bin/suidprobe", "ids"])
    ids = probe_lines(r.stdout)
    assert (ids["uid"], ids["euid"], ids["euid_after"]) == (uid, uid, uid), r.stdout
    assert ids["setuid0"] == "EPERM", r.stdout
    r = await sb.exec(["/bin/busybox-suid", "id", "-u"])
    assert r.stdout.decode().strip() == uid
    r = await sb.exec(["/bin/busybox-suid", "su", "-c", "id -u", "root"], stdin=b"", timeout=10)
    assert r.exit_code != 0 and b"0\n" not in r.stdout, r


# -- the agent: its channel, its memory, its signals -----------------------------------------


async def test_the_agents_channel_and_memory_are_out_of_reach(
    make_sandbox: MakeSandbox, probe: bytes,
) -> None:
    sb = await make_sandbox()
    attempts = {
        "read the channel": ["cat", "/proc/1/fd/990"],
        "list its fds": ["ls", "/proc/1/fd"],
        "write the channel": ["sh", "-c", "echo x > /proc/1/fd/991"],
        "write its stdout": ["sh", "-c", "echo x > /proc/1/fd/1"],
        "its environment": ["cat", "/proc/1/environ"],
        "its memory": ["head", "-c", "16", "/proc/1/mem"],
        "its cwd": ["ls", "/proc/1/cwd/"],
        "its root": ["ls", "/proc/1/root/"],
    }
    for what, cmd in attempts.items():
        r = await sb.exec(cmd, timeout=10)
        assert r.exit_code != 0 and b"denied" in r.stderr, (what, r)
    assert await sb.write_file("/tmp/probe", probe, mode=0o755)
    r = await sb.exec(["/tmp/probe", "ptrace"], timeout=10)
    assert r.exit_code == 0, r
    assert probe_lines(r.stdout) == {
        "ptrace_attach": "EPERM", "ptrace_seize": "EPERM", "process_vm_readv": "EPERM",
        "open_mem_read": "EACCES", "open_mem_write": "EACCES",
    }, r.stdout
    # Nothing of that disturbed it: still the agent, still in step.
    assert (await sb.refresh()).agent == "ready"
    assert (await sb.exec(["echo", "still here"])).stdout == b"still here\n"


async def test_signals_to_pid_1_change_nothing(make_sandbox: MakeSandbox) -> None:
    sb = await make_sandbox()
    started = await init_start_time(sb)
    for attack in (["kill", "-9", "1"], ["kill", "-TERM", "1"], ["kill", "-STOP", "1"],
                   ["kill", "-INT", "1"], ["kill", "-HUP", "1"], ["kill", "-9", "-1"]):
        # The kernel ignores SIGKILL and SIGSTOP sent to a namespace's init from inside; the
        # agent ignores every other signal from inside. `kill -9 -1` also kills its own
        # supervisor (same uid), sometimes before that reported the start: a Conflict then.
        with contextlib.suppress(Conflict):
            await sb.exec(attack, timeout=10)
        r = await sb.exec(["echo", "alive"], timeout=10)
        assert (r.exit_code, r.stdout) == (0, b"alive\n"), attack
    sb = await sb.refresh()
    assert (sb.status, sb.agent) == ("running", "ready")
    assert await init_start_time(sb) == started  # the same PID 1 all along


# -- resource bombs --------------------------------------------------------------------------


async def test_a_fork_bomb_is_held_by_the_pids_limit(
    make_sandbox: MakeSandbox, client: SandboxClient, probe: bytes,
) -> None:
    """Every process of the bomb forks copies of itself forever (the C probe: a busybox
    shell gives up at the first failed fork), so at the limit all of them spin on EAGAIN."""
    neighbour = await make_sandbox()
    sb = await make_sandbox(pids=64)
    assert sb.container_id
    await sb.write_file("/tmp/probe", probe, mode=0o755)
    current = pids_cgroup(sb.container_id) / "pids.current"
    bomb = asyncio.create_task(sb.exec(["/tmp/probe", "forkbomb"], timeout=10))
    try:
        async def at_the_limit() -> bool:
            return int(current.read_text()) >= 60

        await eventually(at_the_limit, within=10, what="the fork bomb reaching the pids limit")
        worst = 0.0
        for _ in range(5):  # while it rages: the daemon and the neighbour answer at once
            t = time.monotonic()
            assert await client.ping() == "pong"
            r = await neighbour.exec(["echo", "fine"], timeout=10)
            assert r.stdout == b"fine\n"
            worst = max(worst, time.monotonic() - t)
            assert worst < 3.0, f"a ping and a neighbour's exec took {worst:.2f} s"
            stats = await sb.stats()
            assert stats.pids <= 64
        print(f"\nduring the fork bomb: ping + neighbour exec took at most {worst * 1000:.0f} ms")
        result = await bomb
    finally:
        if not bomb.done():
            bomb.cancel()
            with contextlib.suppress(BaseException):
                await bomb
    assert result.timed_out and result.exit_code == 137

    async def calm() -> bool:  # the timeout's kill took the whole tree
        try:
            return strangers(await processes(sb)) == []
        except (AssertionError, Conflict):
            return False  # no pid free for ps (or its supervisor) yet

    await eventually(calm, within=20, what="the bomb's processes all killed")
    assert int(current.read_text()) < 8
    assert (await sb.exec(["echo", "ok"])).stdout == b"ok\n"


async def test_a_memory_bomb_is_oom_killed_and_reported(make_sandbox: MakeSandbox,
                                                      client: SandboxClient) -> None:
    sb = await make_sandbox(memory="64m")
    async with client.events(types=["sandbox.oom", "sandbox.died"], sandbox=sb.id) as events:
        await events.start()
        # busybox tail keeps its whole input in memory: 256 MiB cannot fit in 64 MiB.
        r = await sb.exec(["sh", "-c", "head -c 268435456 /dev/zero | tail"], timeout=60)
        assert r.exit_code == 137 and not r.timed_out, r
        ev = await events.next_event(timeout=20)
        assert ev is not None and ev.type == "sandbox.oom", ev
        assert ev.sandbox_id == sb.id
    sb = await sb.refresh()
    assert sb.status == "running"  # only the bomb died
    assert (await sb.exec(["echo", "ok"])).stdout == b"ok\n"


async def test_a_file_stopped_at_the_disk_limit_does_not_freeze_the_sandbox(
    spawn_daemon: SpawnDaemon,
) -> None:
    """One ``dd`` far past ``disk`` is stopped by RLIMIT_FSIZE at exactly the limit (the
    documented way one file is held): that is the whole penalty. The sandbox is not
    growing any more and must stay running and usable.

    A control sandbox over its limit by many small files (which only the measurement
    catches) is frozen: once its ``sandbox.paused`` came, the guard has looked at the
    subject too (it measures every running sandbox each ``check_interval``)."""
    d = spawn_daemon(config="[disk]\ncheck_interval = 0.25\n")
    async with SandboxClient(d.socket) as c:
        made: list[Sandbox] = []
        try:
            sb = await c.create(ttl=120, disk="32m")
            made.append(sb)
            r = await sb.exec(["dd", "if=/dev/zero", "of=/workspace/big", "bs=1M",
                               "count=200"], timeout=60)
            assert r.exit_code == 128 + 25, r  # SIGXFSZ
            async with c.events(types=["sandbox.paused"]) as events:
                await events.start()
                control = await c.create(ttl=120, disk="32m")
                made.append(control)
                # The freeze may come before the writes end (then the command waits,
                # frozen, until the sandbox is removed) or after: either is right.
                writer = asyncio.create_task(control.exec(
                    ["sh", "-c", "for i in $(seq 1 40); do "
                     "head -c 1048576 /dev/zero > /workspace/f$i; done"], timeout=60))
                paused = {}
                while control.id not in paused:
                    ev = await events.next_event(timeout=30)
                    assert ev is not None and ev.sandbox_id is not None
                    paused[ev.sandbox_id] = ev.data
                if writer.done():
                    assert writer.result().exit_code == 0, writer.result()
                writer.cancel()
            assert paused[control.id]["cause"] == "disk_limit"
            assert sb.id not in paused, (
                f"a sandbox whose one file RLIMIT_FSIZE stopped at the limit was frozen: "
                f"{paused[sb.id]}")
            sb = await sb.refresh()
            assert sb.status == "running"
            r = await sb.exec(["stat", "-c", "%s", "/workspace/big"], timeout=30)
            assert int(r.stdout) == 32 * MIB
        finally:
            for made_sb in made:
                with contextlib.suppress(Exception):
                    await remove_and_wait(made_sb)


# -- output floods ---------------------------------------------------------------------------


@pytest.mark.timeout(600)  # ~20 s here alone; minutes on a host busy with other suites
async def test_a_2_gib_flood_through_sandbox_exec_keeps_the_daemon_small(
    daemon: Daemon, make_sandbox: MakeSandbox,
) -> None:
    assert daemon.proc is not None
    sb = await make_sandbox()
    cap = 64 * 1024
    with RssWatch(daemon.proc.pid) as rss:
        t = time.monotonic()
        r = await sb.exec(["sh", "-c", f"echo HEAD; head -c {FLOOD} /dev/zero; echo TAIL"],
                          max_output=cap, timeout=540)
        took = time.monotonic() - t
    print(f"\n{FLOOD / MIB / 1024:g} GiB through sandbox.exec in {took:.1f} s "
          f"({FLOOD / took / MIB:.0f} MiB/s); {rss.describe()}")
    assert (r.exit_code, r.timed_out, r.truncated) == (0, False, True)
    assert len(r.stdout) <= cap and r.stderr == b""
    assert r.stdout.startswith(b"HEAD\n\0\0\0") and r.stdout.endswith(b"\0\0\0TAIL\n")
    assert rss.growth < RSS_BOUND, rss.describe()


async def test_a_flood_to_a_slow_streaming_reader_keeps_the_daemon_small(
    daemon: Daemon, make_sandbox: MakeSandbox,
) -> None:
    """A raw msgpack-RPC client starts ``cat /dev/zero`` and reads 16 KiB every 50 ms for
    8 s: the daemon must slow the command (the agent's window), not buffer its output.
    Closing the connection then kills it (not detached)."""
    assert daemon.proc is not None
    sb = await make_sandbox()
    reader, writer = await asyncio.open_unix_connection(daemon.socket)
    received = 0
    try:
        start = [0, 1, "exec.start", [{"id": sb.id, "cmd": ["cat", "/dev/zero"]}]]
        writer.write(msgpack.packb(start, use_bin_type=True))
        await writer.drain()
        unpacker = msgpack.Unpacker(raw=False, max_buffer_size=64 * MIB)
        exec_id = None
        with RssWatch(daemon.proc.pid) as rss:
            until = time.monotonic() + 8
            while time.monotonic() < until:
                data = await asyncio.wait_for(reader.read(16 * 1024), 30)
                assert data, "the daemon closed the connection"
                unpacker.feed(data)
                for msg in unpacker:
                    if msg[0] == 1:
                        assert msg[2] is None, msg
                        exec_id = msg[3]["exec_id"]
                    elif msg[0] == 2 and msg[1] == "exec.output":
                        received += len(msg[2][2])
                await asyncio.sleep(0.05)  # the slow reader
        print(f"\nslow reader: {received / MIB:.1f} MiB read in 8 s; {rss.describe()}")
        assert exec_id is not None
        assert received > 0
        assert rss.growth < RSS_BOUND, rss.describe()
    finally:
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()

    async def killed() -> bool:
        return not matching(await processes(sb), "cat /dev/zero")

    await eventually(killed, within=15, what="cat /dev/zero killed with its connection")


# -- escaping a timeout or a closed connection -----------------------------------------------


ESCAPE = ["sh", "-c", "(setsid env -i sleep 1000 >/dev/null 2>&1 &); sleep 300"]


async def test_a_timeout_through_the_agent_leaves_no_setsid_escapee(
    make_sandbox: MakeSandbox,
) -> None:
    sb = await make_sandbox()
    r = await sb.exec(ESCAPE, timeout=1)
    assert r.timed_out and r.exit_code == 137

    async def gone() -> bool:
        return not matching(await processes(sb), "sleep 1000")

    await eventually(gone, within=10, what="the setsid'd, env -i'd sleep 1000 killed")
    assert strangers(await processes(sb)) == []


async def test_a_timeout_through_the_engine_leaves_no_setsid_escapee(
    spawn_daemon: SpawnDaemon,
) -> None:
    """A command as another user than the sandbox's (root, the policy's opt-in) goes
    through the engine's exec under ``agent --supervise``; its timeout must reach the
    escapee as well."""
    d = spawn_daemon(config="[policy]\nallow_root = true\n")
    async with SandboxClient(d.socket) as c:
        sb = await c.create(ttl=120)
        try:
            run = asyncio.create_task(sb.exec(ESCAPE, user="root", timeout=4))
            try:
                seen: list[tuple[int, int, str]] = []

                async def escaped() -> bool:
                    nonlocal seen
                    seen = await processes(sb)
                    return bool(matching(seen, "sleep 1000"))

                await eventually(escaped, within=4, what="the escapee running")
                assert matching(seen, "/.sandboxd/agent --supervise"), seen  # the engine path
                r = await run
            finally:
                if not run.done():
                    run.cancel()
                    with contextlib.suppress(BaseException):
                        await run
            assert r.timed_out and r.exit_code == 137, r

            async def gone() -> bool:
                return not matching(await processes(sb), "sleep 1000")

            await eventually(gone, within=10, what="the root escapee killed")

            async def only_the_agent() -> bool:  # its supervisor's zombie reaped too
                return strangers(await processes(sb)) == []

            await eventually(only_the_agent, within=10, what="only the agent left")
        finally:
            await remove_and_wait(sb)


async def test_a_closed_connection_takes_its_streamed_exec_along(
    daemon: Daemon, make_sandbox: MakeSandbox,
) -> None:
    sb = await make_sandbox()
    async with SandboxClient(daemon.socket) as doomed:
        proc = await doomed.start(sb.id, [
            "sh", "-c", "sleep 1000 & (setsid env -i sleep 1001 >/dev/null 2>&1 &); "
                        "exec cat"], stdin=True)
        await proc.write(b"hello\n")
        assert await asyncio.wait_for(proc.stdout.readline(), 10) == b"hello\n"

        async def all_up() -> bool:
            procs = await processes(sb)
            return all(matching(procs, n) for n in ("sleep 1000", "sleep 1001", "cat"))

        await eventually(all_up, within=10, what="the streamed exec's processes running")
    # The connection is closed: nothing of that exec may remain.

    async def only_the_agent() -> bool:
        return strangers(await processes(sb)) == []

    await eventually(only_the_agent, within=15, what="only the agent left")


# -- another local user ----------------------------------------------------------------------


def _intrude(path: str, sid: str, name: str, exec_id: str) -> dict[str, Any]:
    """As another uid, on one connection: everything against root's sandbox and exec, then
    a subscription replayed from seq 0 and followed while it makes and removes its own."""
    replies: dict[str, Any] = {}
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.connect(path)
        attempts: list[tuple[str, dict[str, Any]]] = [
            ("sandbox.get", {"id": sid}),
            ("sandbox.get", {"id": name}),
            ("sandbox.exec", {"id": sid, "cmd": ["id"]}),
            ("sandbox.pause", {"id": sid}),
            ("sandbox.extend", {"id": sid, "ttl": 5}),
            ("sandbox.stats", {"id": sid}),
            ("sandbox.snapshot", {"id": sid}),
            ("files.read", {"id": sid, "path": "/etc/passwd"}),
            ("files.write", {"id": sid, "path": "/tmp/x", "data": b"x"}),
            ("exec.start", {"id": sid, "cmd": ["id"]}),
            ("exec.list", {"id": sid}),
            ("exec.attach", {"exec_id": exec_id}),
            ("exec.write", {"exec_id": exec_id, "data": b"x"}),
            ("exec.kill", {"exec_id": exec_id}),
            ("exec.wait", {"exec_id": exec_id}),
            ("sandbox.remove", {"id": sid}),
        ]
        for i, (method, args) in enumerate(attempts):
            reply = call_on(sock, [0, i, method, [args]], 30)
            replies[f"{i}: {method} {sorted(args)}"] = (
                reply[2][0] if reply[2] else f"ALLOWED: {reply[3]!r:.200}")
        listed = call_on(sock, [0, 100, "sandbox.list", []], 30)
        replies["listed"] = [s["id"] for s in listed[3]]
        # A subscription filtered on root's sandbox is taken like one on a sandbox that does
        # not exist (the filter is not looked up: no oracle); what it delivers is checked
        # with the events below.
        theirs = call_on(sock, [0, 101, "events.subscribe", [{"sandbox": sid}]], 30)
        nobodys = call_on(sock, [0, 102, "events.subscribe", [{"sandbox": "no-such-sb"}]], 30)
        replies["subscribe"] = [
            (r[2][0], None) if r[2] else ("ok", r[3]["last_seq"]) for r in (theirs, nobodys)]

        # Events: replay everything retained, then make an own sandbox; its events come
        # after any replayed one, so once its removal is seen, everything was seen.
        unpacker = msgpack.Unpacker(raw=False)
        pending: list[Any] = []

        def send(msgid: int, method: str, args: dict[str, Any]) -> Any:
            sock.sendall(msgpack.packb([0, msgid, method, [args]], use_bin_type=True))
            while True:
                for msg in unpacker:
                    if msg[0] == 1 and msg[1] == msgid:
                        return msg
                    pending.append(msg)
                data = sock.recv(65536)
                if not data:
                    raise ConnectionError("closed")
                unpacker.feed(data)

        assert send(200, "events.subscribe", {"since": 0})[2] is None
        own = send(201, "sandbox.create", {"ttl": 60})[3]
        send(202, "sandbox.exec", {"id": own["id"], "cmd": ["true"]})
        send(203, "sandbox.remove", {"id": own["id"]})
        deadline = time.monotonic() + 30
        while not any(m[0] == 2 and m[1] == "event" and m[2][1]["type"] == "sandbox.removed"
                      and m[2][1]["sandbox_id"] == own["id"] for m in pending):
            assert time.monotonic() < deadline, "own sandbox.removed never came"
            sock.settimeout(max(0.1, deadline - time.monotonic()))
            unpacker.feed(sock.recv(65536))
            pending.extend(unpacker)
        replies["events"] = [m[2][1] for m in pending if m[0] == 2 and m[1] == "event"]
        replies["own"] = own["id"]
    return replies


async def test_another_uid_cannot_reach_roots_sandbox(spawn_daemon: SpawnDaemon) -> None:
    d = reachable(spawn_daemon())
    async with SandboxClient(d.socket) as root:
        sb = await root.create(ttl=300, name="secret")
        try:
            detached = await sb.start(["sleep", "300"], detach=True)
            stop = asyncio.Event()

            async def busy() -> None:  # root's events while the other uid follows its own
                while not stop.is_set():
                    await sb.exec(["true"])

            churn = asyncio.create_task(busy())
            try:
                seen = await asyncio.to_thread(run_as, OTHER, _intrude, d.socket, sb.id,
                                               sb.name, detached.exec_id)
            finally:
                stop.set()
                await churn
            extra = ("listed", "events", "own", "subscribe")
            denied = {k: v for k, v in seen.items() if k not in extra}
            assert {k: v for k, v in denied.items() if v != "not_found"} == {}
            assert sb.id not in seen["listed"]
            theirs, nobodys = seen["subscribe"]
            assert theirs == nobodys, seen["subscribe"]
            assert seen["events"], "the other uid saw not even its own events"
            assert {e["sandbox_id"] for e in seen["events"]} <= {seen["own"], None}
            assert all(e["owner_uid"] in (OTHER, None) for e in seen["events"])
            # And nothing it tried touched root's sandbox or its detached command.
            sb = await sb.refresh()
            assert sb.status == "running"
            listed = {e.exec_id: e for e in await sb.exec_list()}
            assert listed[detached.exec_id].running
            await detached.kill()
        finally:
            await remove_and_wait(sb)
