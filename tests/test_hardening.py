"""The hardened container every sandbox gets (SPEC §4, §5), checked on the real engine.

Each field of ``docker inspect`` that the SPEC names is checked one by one,
then the limits are shown to hold from inside (a fork loop meets the pids
limit, a memory hog is OOM-killed), and everything a client must never get
is refused with ``permission_denied`` before any container exists.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import Daemon, MakeSandbox, docker_inspect
from sandboxd_client import EngineError, PermissionDenied, SandboxClient, parse_time
from sandboxd_client.aio import Sandbox

MIB = 1024 * 1024


def pids_cgroup(sb: Sandbox) -> Path:
    """The host directory of the sandbox's pids cgroup (cgroup v1 or v2)."""
    assert sb.container_id
    pid = docker_inspect(sb.container_id)["State"]["Pid"]
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        if "pids" in controllers.split(","):
            return Path("/sys/fs/cgroup/pids") / path.lstrip("/")
        if controllers == "" and Path("/sys/fs/cgroup/cgroup.controllers").exists():
            return Path("/sys/fs/cgroup") / path.lstrip("/")
    pytest.fail(f"no pids cgroup for process {pid}")


def host_config(sb: Sandbox) -> dict[str, Any]:
    assert sb.container_id
    hc: dict[str, Any] = docker_inspect(sb.container_id)["HostConfig"]
    return hc


async def test_default_container_is_hardened(make_sandbox: MakeSandbox) -> None:
    sb = await make_sandbox(labels={"team": "a"})
    assert sb.container_id
    info = docker_inspect(sb.container_id)
    hc = info["HostConfig"]

    assert info["Name"] == f"/sandboxd-{sb.id}"
    assert hc["NetworkMode"] == "none"
    assert hc["CapDrop"] == ["ALL"]
    assert not hc.get("CapAdd")
    assert any(opt.startswith("no-new-privileges") and not opt.endswith(":false")
               for opt in hc["SecurityOpt"] or []), hc["SecurityOpt"]
    assert hc["PidsLimit"] == 256
    assert hc["Memory"] == 512 * MIB
    assert hc["MemorySwap"] == 512 * MIB
    assert hc["NanoCpus"] == 1_000_000_000
    # The agent is the container's init (it reaps and supervises): no docker-init.
    assert hc["Init"] is False
    assert info["Config"]["Entrypoint"] == ["/.sandboxd/agent"]
    nofile = [u for u in hc["Ulimits"] or [] if u["Name"] == "nofile"]
    assert len(nofile) == 1 and 0 < nofile[0]["Soft"] <= nofile[0]["Hard"], hc["Ulimits"]
    assert hc["RestartPolicy"]["Name"] in ("no", "")
    assert hc["LogConfig"]["Type"] == "none"
    assert hc["Privileged"] is False
    # The one host path in a sandbox: the agent binary, read-only.
    [agent_bind] = hc["Binds"]
    assert agent_bind.endswith(":/.sandboxd/agent:ro")
    assert not hc.get("Mounts")
    [mount] = info["Mounts"]
    assert (mount["Destination"], mount["RW"]) == ("/.sandboxd/agent", False)
    assert not hc.get("Devices")
    assert hc.get("PidMode", "") in ("", "private")
    assert hc.get("UsernsMode", "") == ""
    assert hc.get("ReadonlyRootfs") is False

    labels = info["Config"]["Labels"]
    assert labels["io.sandboxd.id"] == sb.id
    assert labels["io.sandboxd.name"] == sb.name
    assert labels["io.sandboxd.owner"] == f"{os.getuid()}:{os.getgid()}"
    created = parse_time(labels["io.sandboxd.created_at"])
    assert created is not None and created == parse_time(sb.created_at)
    assert labels["io.sandboxd.label.team"] == "a"
    assert "team" not in labels, "user labels must be prefixed"


async def test_inside_the_sandbox_no_caps_no_new_privs_no_network(
    make_sandbox: MakeSandbox,
) -> None:
    sb = await make_sandbox()
    r = await sb.exec(["cat", "/proc/self/status"])
    status = dict(
        line.split(":", 1) for line in r.stdout.decode().splitlines() if ":" in line
    )
    assert int(status["CapEff"].strip(), 16) == 0
    assert int(status["CapBnd"].strip(), 16) == 0
    assert status["NoNewPrivs"].strip() == "1"
    r = await sb.exec(["cat", "/proc/net/dev"])
    interfaces = [line.split(":")[0].strip() for line in r.stdout.decode().splitlines()[2:]]
    assert interfaces == ["lo"]
    r = await sb.exec(["sh", "-c", "ulimit -n"])
    assert r.exit_code == 0 and int(r.stdout) > 0


async def test_custom_limits_land_in_host_config(make_sandbox: MakeSandbox) -> None:
    sb = await make_sandbox(memory="64m", cpus=0.5, pids=32)
    hc = host_config(sb)
    assert hc["Memory"] == 64 * MIB
    assert hc["MemorySwap"] == 64 * MIB
    assert hc["NanoCpus"] == 500_000_000
    assert hc["PidsLimit"] == 32
    assert (sb.limits.memory_bytes, sb.limits.cpus, sb.limits.pids) == (64 * MIB, 0.5, 32)
    sb2 = await make_sandbox(memory=100 * MIB)
    hc2 = host_config(sb2)
    assert hc2["Memory"] == hc2["MemorySwap"] == 100 * MIB


async def test_readonly_rootfs_with_writable_tmp_and_workdir(make_sandbox: MakeSandbox) -> None:
    sb = await make_sandbox(readonly_rootfs=True)
    assert host_config(sb)["ReadonlyRootfs"] is True
    r = await sb.exec(["touch", "/not-allowed"])
    assert r.exit_code != 0
    assert b"Read-only" in r.stderr or b"read-only" in r.stderr, r.stderr
    r = await sb.exec(["sh", "-c", "echo x > /etc/passwd"])
    assert r.exit_code != 0
    r = await sb.exec(["sh", "-c", "echo t > /tmp/f && cat /tmp/f"])
    assert (r.exit_code, r.stdout) == (0, b"t\n")
    r = await sb.exec(["sh", "-c", "echo w > ./f && cat /workspace/f"])
    assert (r.exit_code, r.stdout) == (0, b"w\n")


async def test_readonly_rootfs_with_a_custom_workdir(make_sandbox: MakeSandbox) -> None:
    sb = await make_sandbox(readonly_rootfs=True, workdir="/srv/job")
    r = await sb.exec(["sh", "-c", "pwd; echo w > f && cat /srv/job/f"])
    assert (r.exit_code, r.stdout) == (0, b"/srv/job\nw\n")


@pytest.mark.parametrize(
    ("kwargs", "policy"),
    [
        ({"privileged": True}, "privileged"),
        ({"cap_add": ["SYS_ADMIN"]}, "cap_add"),
        ({"cap_add": ["CAP_NET_RAW"]}, "cap_add"),
        ({"mounts": ["/:/host"]}, "mounts"),
        ({"devices": ["/dev/sda"]}, "devices"),
        ({"network": "host"}, "networks"),
        ({"network": "bridge"}, "networks"),
        ({"network": "container:abc"}, "networks"),
    ],
    ids=lambda v: str(v) if isinstance(v, str) else "-".join(map(str, v.items())),
)
async def test_forbidden_requests_are_permission_denied(
    make_sandbox: MakeSandbox, kwargs: dict[str, Any], policy: str
) -> None:
    with pytest.raises(PermissionDenied) as info:
        await make_sandbox(**kwargs)
    assert info.value.code == "permission_denied"
    assert info.value.message  # the reason, for a human
    assert (info.value.data or {}).get("policy") == policy
    # No container was made: the autouse leak check would catch one left behind.


async def test_pids_limit_stops_a_fork_loop(
    make_sandbox: MakeSandbox, client: SandboxClient
) -> None:
    sb = await make_sandbox(pids=16)
    assert host_config(sb)["PidsLimit"] == 16
    r = await sb.exec(
        ["sh", "-c", "for i in $(seq 1 50); do sleep 30 & done; wait"], timeout=3
    )
    assert b"fork" in r.stderr, r.stderr
    assert r.exit_code != 0
    assert await client.ping() == "pong"
    # Read from the host: an exec would itself need a free pid in the sandbox.
    pids_dir = pids_cgroup(sb)
    assert (pids_dir / "pids.max").read_text().strip() == "16"
    assert 0 < int((pids_dir / "pids.current").read_text()) <= 16


async def test_memory_limit_oom_kills_the_hog(make_sandbox: MakeSandbox) -> None:
    sb = await make_sandbox(memory="32m")
    # busybox tail keeps its whole input in memory: 100 MiB cannot fit in 32 MiB (no swap).
    r = await sb.exec(["sh", "-c", "head -c 100m /dev/zero | tail"], timeout=60)
    assert r.timed_out is False
    assert r.exit_code == 137, (r.exit_code, r.stderr)
    # The sandbox survives its process's OOM kill.
    assert (await sb.exec(["true"])).exit_code == 0
    assert (await sb.refresh()).status == "running"


async def test_policy_can_allow_a_network_and_capabilities(
    spawn_daemon: Callable[..., Daemon],
) -> None:
    d = spawn_daemon(
        config='[policy]\nnetworks = ["none", "bridge"]\ncap_add = ["NET_BIND_SERVICE"]\n'
               "allow_root = true\n",
        env={"SANDBOXD_INSTANCE": f"hardening-{os.getpid()}"},  # keep off the session's
    )
    async with SandboxClient(d.socket) as c:
        made: list[str] = []
        try:
            # A capability means something to root only: root is the policy's opt-in.
            sb = await c.create(ttl=60, cap_add=["NET_BIND_SERVICE"], user="root")
            made.append(sb.id)
            hc = host_config(sb)
            assert hc["CapDrop"] == ["ALL"]
            assert hc["CapAdd"] == ["NET_BIND_SERVICE"]
            assert hc["Privileged"] is False
            assert hc["NetworkMode"] == "none"
            r = await sb.exec(["cat", "/proc/self/status"])
            cap_eff = next(line for line in r.stdout.decode().splitlines()
                           if line.startswith("CapEff:"))
            assert int(cap_eff.split()[1], 16) == 1 << 10  # CAP_NET_BIND_SERVICE only
            with pytest.raises(PermissionDenied):
                await c.create(ttl=60, cap_add=["SYS_ADMIN"])
            with pytest.raises(PermissionDenied):
                await c.create(ttl=60, network="host")
            try:
                sb = await c.create(ttl=60, network="bridge")
            except EngineError as exc:
                if "docker0" in exc.message:
                    pytest.skip(f"this host's Docker bridge is broken: {exc.message}")
                raise
            made.append(sb.id)
            hc = host_config(sb)
            assert hc["NetworkMode"] == "bridge"
            assert hc["CapDrop"] == ["ALL"] and not hc.get("CapAdd")
        finally:
            for sid in made:
                with contextlib.suppress(Exception):
                    await c.remove(sid)


async def test_remove_does_not_wait_for_a_stop_grace(
    make_sandbox: MakeSandbox, client: SandboxClient
) -> None:
    sb = await make_sandbox()
    # A process that ignores SIGTERM would make a graceful stop wait its full grace period.
    await sb.exec(["sh", "-c", "trap '' TERM; sleep 300 > /dev/null 2>&1 &"])
    started = time.monotonic()
    await client.remove(sb.id)
    assert time.monotonic() - started < 5
