"""Sandboxes cannot fill the host's disk: the ``disk`` limit and the host's floor.

On this host the engine's storage (overlay2 on ext4) has no quota, so the
limit is held by measurement: RLIMIT_FSIZE stops any one file at the limit,
and the daemon measures each sandbox and freezes one that is over its limit
and still writing. The host guard refuses creates and freezes writers while
the engine's data root is below its free-space floor.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from conftest import Daemon, MakeSandbox, docker_inspect
from sandboxd_client import Conflict, QuotaExceeded, SandboxClient
from sandboxd_client.aio import Sandbox

SpawnDaemon = Callable[..., Daemon]
MIB = 1024 * 1024


def written(container_id: str) -> int:
    """What the container wrote, as the host sees it (its writable layer and the
    engine's hostname/hosts/resolv.conf files), in allocated bytes."""
    info = docker_inspect(container_id)
    total = 0
    upper = info["GraphDriver"]["Data"]["UpperDir"]
    for root, dirs, files in os.walk(upper):
        for name in dirs + files:
            try:
                total += os.lstat(os.path.join(root, name)).st_blocks * 512
            except OSError:
                pass
    for key in ("HostnamePath", "HostsPath", "ResolvConfPath"):
        if info.get(key):
            total += os.stat(info[key]).st_blocks * 512
    return total


async def test_the_2_gib_dd_stops_at_the_disk_limit(make_sandbox: MakeSandbox,
                                                   client: SandboxClient) -> None:
    sb = await make_sandbox(disk="64m")
    info = await client.info()
    assert info.extra["disk"]["enforcement"] == "measured"
    # At / it cannot even start: the sandbox is not root.
    r = await sb.exec(["dd", "if=/dev/zero", "of=/big", "bs=1M", "count=2048"])
    assert r.exit_code != 0 and b"Permission denied" in r.stderr
    r = await sb.exec(["dd", "if=/dev/zero", "of=/tmp/big", "bs=1M", "count=2048"], timeout=60)
    assert r.exit_code != 0  # SIGXFSZ, or EFBIG: "File too large"
    size = int((await sb.exec(["stat", "-c", "%s", "/tmp/big"])).stdout)
    assert size == 64 * MIB
    assert written(sb.container_id or "") < 64 * MIB + 4 * MIB


async def test_the_hostname_flood_stops_at_the_limit(spawn_daemon: SpawnDaemon) -> None:
    """As its own uid the sandbox cannot write /etc/hostname at all; as root (the policy's
    opt-in) one file still never outgrows the limit."""
    d = spawn_daemon(config="[policy]\nallow_root = true\n")
    async with SandboxClient(d.socket) as c:
        own = await c.create(ttl=120, disk="32m")
        rooted = await c.create(ttl=120, disk="32m", user="root")
        try:
            flood = ["sh", "-c", "head -c 104857600 /dev/zero >> /etc/hostname"]
            r = await own.exec(flood)
            assert r.exit_code != 0 and b"ermission denied" in r.stderr
            r = await rooted.exec(flood, timeout=60)
            assert r.exit_code != 0
            host_file = docker_inspect(rooted.container_id or "")["HostnamePath"]
            assert os.stat(host_file).st_size <= 32 * MIB
        finally:
            await own.remove()
            await rooted.remove()


@contextlib.asynccontextmanager
async def frozen_writer(
    d: Daemon, loop_body: str
) -> AsyncIterator[tuple[SandboxClient, Sandbox, dict[str, Any], int]]:
    """A 64 MiB sandbox running ``while true; do <loop_body>; done`` until the disk guard
    freezes it: (client, sandbox, the ``sandbox.paused`` data, bytes past the limit).
    The sandbox is removed afterwards, and the writer with it."""
    async with SandboxClient(d.socket) as c:
        sb = await c.create(ttl=120, disk="64m")
        writer: asyncio.Task[Any] | None = None
        try:
            async with c.events(types=["sandbox.paused"], sandbox=sb.id) as events:
                await events.start()
                writer = asyncio.create_task(sb.exec(
                    ["sh", "-c", f"i=0; while true; do i=$((i+1)); {loop_body}; done"],
                    timeout=120))
                ev = await anext(events)
            assert ev.data["cause"] == "disk_limit"
            assert ev.data["limit_bytes"] == 64 * MIB
            yield c, sb, ev.data, ev.data["used_bytes"] - 64 * MIB
        finally:
            for s in await c.list():
                await c.remove(s.id)
            if writer is not None:
                with contextlib.suppress(Conflict):  # ended with its sandbox, either way
                    await writer


async def test_many_files_past_the_limit_freeze_the_sandbox(spawn_daemon: SpawnDaemon) -> None:
    """One file is stopped by RLIMIT_FSIZE; many are caught by measurement: the sandbox is
    frozen with an event and stays frozen."""
    d = spawn_daemon(config="[disk]\ncheck_interval = 0.25\n")
    body = "head -c 16777216 /dev/zero > /tmp/f$i || exit 1"
    async with frozen_writer(d, body) as (c, sb, data, overshoot):
        print(f"disk overshoot when frozen: {overshoot / MIB:.1f} MiB")
        assert 0 < overshoot < 1024 * MIB, data
        assert (await c.get(sb.id)).status == "paused"
        used_when_frozen = written(sb.container_id or "")
        await asyncio.sleep(0.5)
        assert written(sb.container_id or "") == used_when_frozen  # it is frozen


async def test_a_steady_writer_is_frozen_close_to_its_limit(spawn_daemon: SpawnDaemon) -> None:
    """A sandbox writing some tens of MB/s is looked at sooner as it nears its limit, so
    it is frozen a few MiB past it, not a whole ``check_interval`` of writing past it
    (5 s here: it reaches its limit in about two)."""
    d = spawn_daemon(config="[disk]\ncheck_interval = 5\n")
    body = "head -c 1048576 /dev/zero > /tmp/f$i || exit 1; sleep 0.02"
    async with frozen_writer(d, body) as (_, _, data, overshoot):
        print(f"steady writer: frozen {overshoot / MIB:.1f} MiB past the limit")
        assert 0 < overshoot < 16 * MIB, data


async def test_below_the_host_floor_creates_are_refused_and_writers_frozen(
    spawn_daemon: SpawnDaemon,
) -> None:
    d = spawn_daemon(config="[disk]\ncheck_interval = 0.25\n")
    async with SandboxClient(d.socket) as c:
        sb = await c.create(ttl=120)
        idle = await c.create(ttl=120)
    try:
        # The same daemon's state, now with a floor above the host's free space.
        d.stop()
        d.config_path.write_text('[disk]\ncheck_interval = 0.25\nfloor = "100000g"\n')
        d.start()
        async with SandboxClient(d.socket) as c:
            async def low() -> bool:
                return bool((await c.info()).extra["disk"]["low"])

            deadline = time.monotonic() + 10
            while not await low():
                assert time.monotonic() < deadline
                await asyncio.sleep(0.1)
            with pytest.raises(QuotaExceeded, match="disk is nearly full"):
                await c.create(ttl=60)
            await c.exec(sb.id, ["sh", "-c", "head -c 1048576 /dev/zero > /tmp/w"])

            async def frozen() -> bool:
                return (await c.get(sb.id)).status == "paused"

            deadline = time.monotonic() + 10
            while not await frozen():
                assert time.monotonic() < deadline, "the writing sandbox was not frozen"
                await asyncio.sleep(0.1)
            assert (await c.get(idle.id)).status == "running"  # it wrote nothing
    finally:
        async with SandboxClient(d.socket) as c:
            for s in await c.list():
                await c.remove(s.id)
