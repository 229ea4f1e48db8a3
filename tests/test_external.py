"""Changes made behind the daemon's back (docker pause/unpause/kill/rm -f, kill -9
of the container's PID 1 from the host, an OOM inside) are followed: the
sandbox's status follows the engine and the same event types are published
with ``data.cause == "external"``."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
import pytest_asyncio
from conftest import Daemon, MakeSandbox, docker, docker_inspect
from sandboxd_client import NotFound, SandboxClient


class Events:
    """Collects ``event`` notifications of one subscription."""

    def __init__(self, client: SandboxClient) -> None:
        self.client = client
        self.items: list[dict[str, Any]] = []
        self.arrived = asyncio.Event()
        client.on_notification("event", self._on_event)

    def _on_event(self, params: list[Any]) -> None:
        self.items.append(params[1])
        self.arrived.set()

    async def wait_for(self, type_: str, sandbox_id: str, within: float = 15) -> dict[str, Any]:
        deadline = time.monotonic() + within
        while True:
            for ev in self.items:
                if ev["type"] == type_ and ev["sandbox_id"] == sandbox_id:
                    return ev
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                seen = [(e["type"], e["sandbox_id"]) for e in self.items]
                raise AssertionError(f"no {type_} for {sandbox_id} within {within} s; saw {seen}")
            self.arrived.clear()
            try:
                await asyncio.wait_for(self.arrived.wait(), remaining)
            except TimeoutError:
                pass


@pytest_asyncio.fixture
async def events(daemon: Daemon) -> AsyncIterator[Events]:
    async with SandboxClient(daemon.socket) as c:
        collector = Events(c)
        await c.call("events.subscribe", types=["sandbox.*"])
        yield collector


async def wait_status(client: SandboxClient, sid: str, status: str, within: float = 15) -> None:
    deadline = time.monotonic() + within
    while (current := (await client.get(sid)).status) != status:
        assert time.monotonic() < deadline, f"status stayed {current!r}, expected {status!r}"
        await asyncio.sleep(0.05)


async def test_docker_pause_and_unpause(make_sandbox: MakeSandbox, client: SandboxClient,
                                        events: Events) -> None:
    sb = await make_sandbox()
    docker("pause", sb.container_id or "")
    ev = await events.wait_for("sandbox.paused", sb.id)
    assert ev["data"]["cause"] == "external"
    await wait_status(client, sb.id, "paused")
    docker("unpause", sb.container_id or "")
    ev = await events.wait_for("sandbox.resumed", sb.id)
    assert ev["data"]["cause"] == "external"
    await wait_status(client, sb.id, "running")


async def test_docker_kill_is_died(make_sandbox: MakeSandbox, client: SandboxClient,
                                   events: Events) -> None:
    sb = await make_sandbox()
    docker("kill", sb.container_id or "")
    ev = await events.wait_for("sandbox.died", sb.id)
    assert ev["data"]["cause"] == "external" and ev["data"]["exit_code"] == 137
    await wait_status(client, sb.id, "stopped")
    assert (await client.get(sb.id)).status == "stopped"


async def test_kill_9_of_pid1_from_the_host(make_sandbox: MakeSandbox, client: SandboxClient,
                                            events: Events) -> None:
    sb = await make_sandbox()
    pid = docker_inspect(sb.container_id or "")["State"]["Pid"]
    os.kill(pid, signal.SIGKILL)
    ev = await events.wait_for("sandbox.died", sb.id)
    assert ev["data"]["cause"] == "external"
    await wait_status(client, sb.id, "stopped")


async def test_docker_rm_f_is_removed(make_sandbox: MakeSandbox, client: SandboxClient,
                                      events: Events) -> None:
    sb = await make_sandbox()
    docker("rm", "-f", sb.container_id or "")
    ev = await events.wait_for("sandbox.removed", sb.id)
    assert ev["data"]["cause"] == "external"
    with pytest.raises(NotFound):
        await client.get(sb.id)


async def test_memory_bomb_inside_is_oom(make_sandbox: MakeSandbox, client: SandboxClient,
                                         events: Events) -> None:
    sb = await make_sandbox(memory="16m")
    result = await sb.exec(["sh", "-c", "x=$(head -c 64m /dev/zero | tr '\\0' a); echo ${#x}"],
                           timeout=30)
    assert result.exit_code != 0
    ev = await events.wait_for("sandbox.oom", sb.id)
    assert ev["data"]["cause"] == "external"
    assert (await client.get(sb.id)).status == "running"  # only the bomb died


async def test_a_missed_change_is_found_by_relisting(spawn_daemon: Any) -> None:
    """The engine's event stream is not trusted alone: a change made while the daemon
    was down (so no engine event reaches it) is found by re-listing at start."""
    d: Daemon = spawn_daemon()
    async with SandboxClient(d.socket) as c:
        sb = await c.create(ttl=300)
    try:
        d.stop(signal.SIGKILL)
        docker("pause", sb.container_id or "")
        d.start()
        async with SandboxClient(d.socket) as c:
            await wait_status(c, sb.id, "paused")
    finally:
        docker("rm", "-f", sb.container_id or "", check=False)
