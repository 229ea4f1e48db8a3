"""Warm pools on the real engine: filled in the background, claimed by exactly one create,
the caller's arguments applied, health-checked, adopted after a restart, never trusted
without their row, and counting against no quota."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections.abc import Callable
from typing import Any

from conftest import Daemon, docker, docker_inspect, eventually, raw_call, reachable, run_as
from sandboxd_client import QuotaExceeded, SandboxClient
from sandboxd_client.blocking import Client as BlockingClient

SpawnDaemon = Callable[..., Daemon]

POOL = """
[[pool]]
name = "small"
size = {size}
memory = "64m"
"""
FILL = 60.0  # seconds a pool may take to fill (members are made two at a time)


def info(d: Daemon) -> dict[str, Any]:
    reply = raw_call(d.socket, "daemon.info", timeout=30)
    assert reply[2] is None, reply[2]
    return dict(reply[3])


def members(d: Daemon) -> dict[str, str]:
    """The daemon's unclaimed-or-claimed pool containers: container id -> sandbox id."""
    out = docker("ps", "-a", "--no-trunc", "--filter", f"label=io.sandboxd.instance={d.instance}",
                 "--filter", "label=io.sandboxd.pool", "--format",
                 '{{.ID}} {{.Label "io.sandboxd.id"}}')
    return dict(line.split() for line in out.splitlines())


async def filled(d: Daemon, pool: str = "small") -> dict[str, Any]:
    async def full() -> bool:
        p = (await asyncio.to_thread(info, d))["pool"][pool]
        return bool(p["ready"] == p["size"] and p["starting"] == 0)

    await eventually(full, FILL, f"pool {pool} filling")
    return dict((await asyncio.to_thread(info, d))["pool"][pool])


def spawn_pool(spawn_daemon: SpawnDaemon, size: int, extra: str = "") -> Daemon:
    return spawn_daemon(config=POOL.format(size=size) + extra)


async def test_a_pool_fills_with_ownerless_members_that_are_not_sandboxes(
    spawn_daemon: SpawnDaemon,
) -> None:
    d = spawn_pool(spawn_daemon, 2)
    p = await filled(d)
    assert p == {"image": "sandboxd/base", "size": 2, "ready": 2, "starting": 0,
                 "claims": 0, "misses": 0}
    found = members(d)
    assert len(found) == 2
    for cid in found:
        c = docker_inspect(cid)
        labels = c["Config"]["Labels"]
        assert labels["io.sandboxd.pool"] == "small"
        assert "io.sandboxd.owner" not in labels and "io.sandboxd.name" not in labels
        assert c["State"]["Running"] and c["HostConfig"]["Memory"] == 64 << 20
    async with SandboxClient(d.socket) as c:
        assert await c.list() == []
        assert (await c.info()).sandboxes == 0


async def test_a_claim_is_the_callers_sandbox_with_its_arguments(
    spawn_daemon: SpawnDaemon,
) -> None:
    d = spawn_pool(spawn_daemon, 1)
    await filled(d)
    (member_cid, member_sid), = members(d).items()
    async with SandboxClient(d.socket) as c:
        stream = await c.events(types=["sandbox.created"]).start()
        async with stream:
            sb = await c.create(memory="64m", name="warm", labels={"team": "a"},
                                env={"GREETING": "hello"}, ttl=120, idle_timeout=60)
            assert (sb.id, sb.container_id) == (member_sid, member_cid)
            assert (sb.name, sb.labels, sb.status, sb.agent) == \
                ("warm", {"team": "a"}, "running", "ready")
            assert sb.owner.uid == os.getuid() and sb.idle_timeout == 60
            assert sb.expires_at is not None
            created = await asyncio.wait_for(anext(stream), 10)
            assert created.data["pool"] == "small" and created.sandbox_id == sb.id
            r = await sb.exec(["sh", "-c", 'echo "$GREETING $HOME"; hostname; id -u'])
            greeting, hostname, uid = r.stdout.decode().split("\n")[:3]
            assert greeting == "hello /workspace"
            assert hostname == f"sandbox-{sb.id[:8]}"  # fixed at creation: the id was too
            assert int(uid) >= 100000
            assert r.exit_code == 0
            got = await c.get("warm")
            assert got.id == sb.id and got.labels == {"team": "a"}
            assert [s.id for s in await c.list(labels={"team": "a"})] == [sb.id]
            # The pool makes a new member for the one claimed.
            p = await filled(d)
            assert p["claims"] == 1
            assert member_cid in members(d) and len(members(d)) == 2
            await sb.remove()


async def test_twenty_concurrent_creates_against_a_pool_of_five(
    spawn_daemon: SpawnDaemon,
) -> None:
    d = spawn_pool(spawn_daemon, 5)
    await filled(d)
    pooled = set(members(d))
    async with SandboxClient(d.socket) as c:
        made = await asyncio.gather(*(c.create(memory="64m", ttl=120) for _ in range(20)),
                                    return_exceptions=True)
        try:
            sandboxes = [sb for sb in made if not isinstance(sb, BaseException)]
            assert len(sandboxes) == 20, [e for e in made if isinstance(e, BaseException)]
            assert len({sb.id for sb in sandboxes}) == 20
            assert len({sb.container_id for sb in sandboxes}) == 20
            from_pool = [sb for sb in sandboxes if sb.container_id in pooled]
            assert len(from_pool) == 5  # each member once, never twice
            p = info(d)["pool"]["small"]
            assert p["claims"] == 5 and p["misses"] == 15
            outs = await asyncio.gather(*(sb.exec(["echo", sb.id]) for sb in sandboxes))
            assert [o.stdout for o in outs] == [f"{sb.id}\n".encode() for sb in sandboxes]
        finally:
            await asyncio.gather(*(c.remove(sb.id) for sb in made
                                   if not isinstance(sb, BaseException)))


async def test_a_create_the_pool_cannot_serve_is_made_cold(spawn_daemon: SpawnDaemon) -> None:
    d = spawn_pool(spawn_daemon, 1)
    await filled(d)
    pooled = set(members(d))
    async with SandboxClient(d.socket) as c:
        for args in ({"workdir": "/tmp"}, {"disk": "64m"}, {"image": "sandboxd/base:latest",
                                                            "readonly_rootfs": True}):
            sb = await c.create(memory="64m", ttl=60, **args)
            try:
                assert sb.container_id not in pooled, args
            finally:
                await sb.remove()
        p = info(d)["pool"]["small"]  # a miss is a fitting create that found it empty
        assert p["claims"] == 0 and p["misses"] == 0 and p["ready"] == 1


async def test_memory_cpus_and_pids_are_updated_on_the_claimed_member(
    spawn_daemon: SpawnDaemon,
) -> None:
    d = spawn_pool(spawn_daemon, 1)
    await filled(d)
    (member_cid,) = members(d)
    async with SandboxClient(d.socket) as c:
        sb = await c.create(memory="48m", cpus=0.5, pids=77, ttl=60)
        try:
            assert sb.container_id == member_cid
            host = docker_inspect(member_cid)["HostConfig"]
            assert (host["Memory"], host["MemorySwap"], host["NanoCpus"], host["PidsLimit"]) \
                == (48 << 20, 48 << 20, 500_000_000, 77)
            limits = sb.limits
            assert (limits.memory_bytes, limits.cpus, limits.pids) == (48 << 20, 0.5, 77)
            r = await sb.exec(["cat", "/sys/fs/cgroup/pids/pids.max"])
            assert r.stdout.strip() in (b"77", b"")  # cgroup v1 path; v2 hides it
        finally:
            await sb.remove()


async def test_a_member_whose_agent_does_not_answer_is_never_handed_out(
    spawn_daemon: SpawnDaemon,
) -> None:
    d = spawn_pool(spawn_daemon, 1)
    await filled(d)
    (member_cid,) = members(d)
    pid = int(docker_inspect(member_cid)["State"]["Pid"])
    os.kill(pid, signal.SIGSTOP)  # the agent (its PID 1) stops answering; the channel stays
    try:
        async with SandboxClient(d.socket) as c:
            sb = await c.create(memory="64m", ttl=60)
            try:
                assert sb.container_id != member_cid
                assert (await sb.exec(["true"])).exit_code == 0
            finally:
                await sb.remove()
        # The sick member is deleted; the pool makes another.
        await eventually(lambda: asyncio.to_thread(lambda: member_cid not in members(d)),
                         30, "the unhealthy member being deleted")
        p = await filled(d)  # the create got a new member (made meanwhile) or a cold one
        assert p["claims"] + p["misses"] == 1
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGCONT)  # if the member is still there


async def test_members_are_adopted_after_sigkill_and_claims_survive_it(
    spawn_daemon: SpawnDaemon,
) -> None:
    d = spawn_pool(spawn_daemon, 2)
    await filled(d)
    async with SandboxClient(d.socket) as c:
        claimed = await c.create(memory="64m", name="kept", labels={"k": "v"}, ttl=300)
    await filled(d)
    before = members(d)
    assert d.stop(signal.SIGKILL) == -signal.SIGKILL
    d.start()
    p = await filled(d)
    assert members(d) == before  # the same containers: adopted, none made or dropped
    assert p["ready"] == 2 and any(e.get("event") == "pool_member_adopted"
                                   for e in d.log_events())
    async with SandboxClient(d.socket) as c:
        again = await c.get("kept")
        assert (again.id, again.container_id, again.labels) == \
            (claimed.id, claimed.container_id, {"k": "v"})
        assert [s.id for s in await c.list()] == [claimed.id]  # members are not listed
        sb = await c.create(memory="64m", ttl=60)
        assert sb.container_id in before and sb.container_id != claimed.container_id
        assert (await sb.exec(["true"])).exit_code == 0
        await sb.remove()
        await again.remove()


async def test_a_pool_container_without_its_row_is_deleted_not_handed_out(
    spawn_daemon: SpawnDaemon,
) -> None:
    d = spawn_pool(spawn_daemon, 2)
    await filled(d)
    old = set(members(d))
    assert d.stop(signal.SIGKILL) == -signal.SIGKILL
    for suffix in ("", "-wal", "-shm"):  # the state is lost: nothing vouches for them
        with contextlib.suppress(FileNotFoundError):
            os.remove(os.path.join(d.state_dir, "state.db" + suffix))
    d.start()
    await filled(d)
    await eventually(lambda: asyncio.to_thread(lambda: not old & set(members(d))), 30,
                     "the unvouched members being deleted")
    assert len(members(d)) == 2


async def test_members_of_a_pool_no_longer_configured_are_deleted(
    spawn_daemon: SpawnDaemon,
) -> None:
    d = spawn_pool(spawn_daemon, 2)
    await filled(d)
    assert d.stop() == 0
    assert len(members(d)) == 2  # a stop leaves them, like sandboxes
    d.config_path.write_text("")
    d.start()
    await eventually(lambda: asyncio.to_thread(lambda: not members(d)), 30,
                     "the old pool's members being deleted")
    assert info(d)["pool"] == {}


async def test_members_count_against_no_quota_until_claimed(spawn_daemon: SpawnDaemon) -> None:
    d = reachable(spawn_pool(spawn_daemon, 2, "[quota]\nmax_sandboxes = 1\n"))
    await filled(d)
    uid = 65534

    def as_nobody() -> tuple[int, str, str]:
        with BlockingClient(d.socket) as c:
            sb = c.create(memory="64m", ttl=60)
            try:
                c.create(memory="64m", ttl=60)
            except QuotaExceeded as exc:
                refused = exc.code
            else:
                refused = "created"
            return sb.owner.uid, sb.container_id or "", refused

    owner, cid, refused = await asyncio.to_thread(run_as, uid, as_nobody)
    assert (owner, refused) == (uid, "quota_exceeded")
    assert cid in members(d)
    async with SandboxClient(d.socket) as c:
        (sb,) = await c.list()
        assert sb.owner.uid == uid
        await sb.remove()


def test_pool_settings_are_checked_at_start(spawn_daemon: SpawnDaemon) -> None:
    for config, message in (
        ("[[pool]]\nsize = 0\n", "[[pool]] #1 (pool-1) size: must be at least 1"),
        ('[[pool]]\nsize = 1\nnetwork = "host"\n', "Network 'host' is not allowed"),
        ('[[pool]]\nsize = 1\nname = "a"\n[[pool]]\nsize = 1\nname = "a"\n',
         "another pool has this name"),
        ("[[pool]]\nsize = 1\ncolour = 1\n", "[[pool]] #1 colour: unknown key"),
    ):
        d = spawn_daemon(config=config, wait=False)
        assert d.proc is not None
        assert d.proc.wait(timeout=30) != 0
        assert message in d.log(), d.log()
