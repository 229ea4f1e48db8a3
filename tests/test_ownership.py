"""Defects an attacker used, each fixed: names per owner, sizes past int64, OOM reports,
stats of a dead sandbox, and what a subscription reveals.

Against the real daemon and engine; a second uid is a forked child (``run_as``)
speaking raw msgpack-RPC.
"""

from __future__ import annotations

import socket
from collections.abc import Callable
from typing import Any

import pytest
from conftest import Daemon, MakeSandbox, call_on, docker, reachable, run_as
from sandboxd_client import Conflict, InvalidParams, SandboxClient

SpawnDaemon = Callable[..., Daemon]
OTHER = 65534


def _as_other(path: str, calls: list[tuple[str, dict[str, Any]]]) -> list[Any]:
    """Make each call on one connection; the raw replies."""
    out = []
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.connect(path)
        for i, (method, args) in enumerate(calls):
            out.append(call_on(sock, [0, i, method, [args] if args else []], 60))
    return out


async def test_names_are_unique_per_owner_and_resolve_within_the_callers_own(
    spawn_daemon: SpawnDaemon,
) -> None:
    d = reachable(spawn_daemon())
    async with SandboxClient(d.socket) as root:
        mine = await root.create(name="web", ttl=300)
        try:
            # Another user takes the same name: allowed, and nothing tells them root has it.
            created, got, dup, seen = run_as(OTHER, _as_other, d.socket, [
                ("sandbox.create", {"name": "web", "ttl": 300}),
                ("sandbox.get", {"id": "web"}),
                ("sandbox.create", {"name": "web", "ttl": 300}),
                ("sandbox.get", {"id": mine.id}),
            ])
            assert created[2] is None and created[3]["owner"]["uid"] == OTHER
            theirs = created[3]
            assert got[2] is None and got[3]["id"] == theirs["id"]  # their own "web"
            assert dup[2][0] == "conflict" and "one of your sandboxes" in dup[2][1]
            assert seen[2][0] == "not_found"  # root's sandbox, by id: not theirs
            # Root (an admin) resolves "web" to its own; the other's needs its id.
            assert (await root.get("web")).id == mine.id
            assert (await root.get(theirs["id"])).owner.uid == OTHER
            with pytest.raises(Conflict, match="one of your sandboxes"):
                await root.create(name="web", ttl=300)
            await root.remove(theirs["id"])
        finally:
            await root.remove(mine.id)


@pytest.mark.parametrize("memory", ["9" * 400 + "g", 2**63, 2**64 - 1, "8589934592g"])
async def test_sizes_beyond_int64_are_invalid_params(client: SandboxClient,
                                                     memory: Any) -> None:
    with pytest.raises(InvalidParams, match="memory"):
        await client.create(memory=memory, ttl=60)


async def test_an_earlier_oom_of_a_command_is_not_the_death_of_the_sandbox(
    make_sandbox: MakeSandbox, client: SandboxClient,
) -> None:
    sb = await make_sandbox(memory="16m")
    async with client.events(types=["sandbox.*"], sandbox=sb.id) as events:
        await events.start()
        bomb = await sb.exec(["sh", "-c", "x=$(head -c 64m /dev/zero | tr '\\0' a)"],
                             timeout=30)
        assert bomb.exit_code != 0
        async for ev in events:
            if ev.type == "sandbox.oom":
                break
        assert (await client.get(sb.id)).status == "running"  # only the bomb died
        docker("kill", sb.container_id or "")  # now the sandbox dies, of a SIGKILL
        async for ev in events:
            if ev.type == "sandbox.died":
                assert ev.data["oom_killed"] is False, ev.data
                assert ev.data["exit_code"] == 137
                break


async def test_stats_of_a_sandbox_whose_main_process_died_is_conflict(
    make_sandbox: MakeSandbox, client: SandboxClient,
) -> None:
    sb = await make_sandbox()
    await client.stats(sb.id)  # the stats source is known and warm
    docker("kill", sb.container_id or "")
    with pytest.raises(Conflict):  # right away, before the daemon even saw the death
        await client.stats(sb.id)


async def test_last_seq_counts_only_what_the_caller_may_see(spawn_daemon: SpawnDaemon) -> None:
    d = reachable(spawn_daemon())
    async with SandboxClient(d.socket) as root:
        sb = await root.create(ttl=300)  # events of root's sandbox, after daemon.started
        try:
            [reply] = run_as(OTHER, _as_other, d.socket, [("events.subscribe", {})])
            other_last = reply[3]["last_seq"]
            [mine] = _as_other(d.socket, [("events.subscribe", {})])
            assert mine[3]["last_seq"] > other_last  # root sees its sandbox's events
            ids = {reply[3]["subscription"], mine[3]["subscription"]}
            assert all(len(i) >= 16 for i in ids)  # not sequential, not guessable
        finally:
            await root.remove(sb.id)
