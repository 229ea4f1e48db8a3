"""Sandbox lifecycle through the real daemon and engine: create, get, list,
pause, resume, extend, stats, remove, ttl expiry, and their error codes."""

from __future__ import annotations

import asyncio
import os
import time

import pytest
from conftest import Daemon, MakeSandbox, docker, docker_inspect, not_running, wait_deleted
from sandboxd_client import (
    Conflict,
    InvalidParams,
    NotFound,
    PermissionDenied,
    QuotaExceeded,
    SandboxClient,
    parse_time,
)


async def test_create_returns_a_running_sandbox(make_sandbox: MakeSandbox) -> None:
    sb = await make_sandbox(ttl=60, labels={"purpose": "test"})
    assert sb.status == "running"
    assert len(sb.id) == 12
    assert sb.owner.uid == os.getuid() and sb.owner.gid == os.getgid()
    assert sb.image == "sandboxd/base"
    assert sb.network == "none" and sb.workdir == "/workspace"
    assert sb.limits.memory_bytes == 512 * 1024**2 and sb.limits.cpus == 1 and sb.limits.pids == 256
    assert sb.labels == {"purpose": "test"}
    created, expires = parse_time(sb.created_at), parse_time(sb.expires_at)
    assert created is not None and expires is not None
    assert abs((expires - created).total_seconds() - 60) < 1
    state = docker_inspect(sb.container_id or "")["State"]
    assert state["Running"] is True


async def test_get_by_id_and_by_name(make_sandbox: MakeSandbox, client: SandboxClient) -> None:
    sb = await make_sandbox(name="lifecycle-by-name")
    assert (await client.get(sb.id)).name == "lifecycle-by-name"
    assert (await client.get("lifecycle-by-name")).id == sb.id


async def test_name_taken_is_conflict(make_sandbox: MakeSandbox) -> None:
    await make_sandbox(name="lifecycle-dup")
    with pytest.raises(Conflict, match="taken"):
        await make_sandbox(name="lifecycle-dup")


async def test_list_filters_by_status_and_labels(make_sandbox: MakeSandbox,
                                                 client: SandboxClient) -> None:
    a = await make_sandbox(labels={"suite": "list", "n": "1"})
    b = await make_sandbox(labels={"suite": "list", "n": "2"})
    await b.pause()
    ids = {s.id for s in await client.list(labels={"suite": "list"})}
    assert {a.id, b.id} <= ids
    assert [s.id for s in await client.list(labels={"suite": "list", "n": "2"})] == [b.id]
    paused = {s.id for s in await client.list(status="paused")}
    assert b.id in paused and a.id not in paused
    with pytest.raises(InvalidParams):
        await client.list(status="sleeping")


async def test_pause_and_resume_follow_the_engine(make_sandbox: MakeSandbox) -> None:
    sb = await make_sandbox()
    assert (await sb.pause()).status == "paused"
    assert docker_inspect(sb.container_id or "")["State"]["Paused"] is True
    with pytest.raises(Conflict, match="already paused"):
        await sb.pause()
    assert (await sb.resume()).status == "running"
    assert docker_inspect(sb.container_id or "")["State"]["Paused"] is False
    with pytest.raises(Conflict):
        await sb.resume()


async def test_extend_moves_the_deadline(make_sandbox: MakeSandbox) -> None:
    sb = await make_sandbox(ttl=30)
    before = time.time()
    await sb.extend(600)
    expires = parse_time(sb.expires_at)
    assert expires is not None
    assert before + 599 <= expires.timestamp() <= time.time() + 601
    await sb.extend(0)
    assert sb.expires_at is None


async def test_ttl_expiry_removes_the_sandbox(make_sandbox: MakeSandbox,
                                             client: SandboxClient) -> None:
    sb = await make_sandbox(ttl=1)
    cid = sb.container_id or ""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if not docker("ps", "-aq", "--filter", f"id={cid}").strip():
            break
        await asyncio.sleep(0.1)
    assert not docker("ps", "-aq", "--filter", f"id={cid}").strip(), "container still there"
    with pytest.raises(NotFound):
        await client.get(sb.id)


async def test_idle_timeout_expires_an_idle_sandbox(make_sandbox: MakeSandbox,
                                                    client: SandboxClient) -> None:
    sb = await make_sandbox(ttl=120, idle_timeout=1.5)
    # Activity keeps it alive past its idle timeout.
    for _ in range(3):
        await asyncio.sleep(0.8)
        assert (await sb.exec(["true"])).exit_code == 0
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            await client.get(sb.id)
        except NotFound:
            return
        await asyncio.sleep(0.1)
    pytest.fail("an idle sandbox was not expired")


async def test_stats_answer_fast_and_sensibly(make_sandbox: MakeSandbox) -> None:
    sb = await make_sandbox(memory="128m", pids=64)
    started = time.monotonic()
    for _ in range(5):
        stats = await sb.stats()
    # Well under a second each, even back to back (Docker's own sampler needs 1-2 s).
    assert (time.monotonic() - started) / 5 < 0.5
    assert stats.memory_limit_bytes == 128 * 1024**2
    assert 0 < stats.memory_bytes < stats.memory_limit_bytes
    assert stats.pids >= 1
    assert stats.net_rx_bytes == 0 and stats.net_tx_bytes == 0
    assert stats.cpu_percent >= 0


async def test_stats_see_cpu_load(make_sandbox: MakeSandbox) -> None:
    sb = await make_sandbox(cpus=1)
    await sb.stats()
    result = await sb.exec(["sh", "-c", "i=0; while [ $i -lt 200000 ]; do i=$((i+1)); done"])
    assert result.exit_code == 0
    assert (await sb.stats()).cpu_percent > 1.0


async def test_remove_is_immediate_even_when_pid1_ignores_sigterm(
    make_sandbox: MakeSandbox, client: SandboxClient
) -> None:
    sb = await make_sandbox()
    cid = sb.container_id or ""
    started = time.monotonic()
    await sb.remove()
    assert time.monotonic() - started < 5  # no 10 s stop grace
    assert not_running(cid)  # killed before the reply; deleted just after
    await asyncio.to_thread(wait_deleted, cid)
    with pytest.raises(NotFound):
        await client.get(sb.id)
    with pytest.raises(NotFound):
        await client.remove(sb.id)


async def test_remove_a_paused_sandbox(make_sandbox: MakeSandbox) -> None:
    sb = await make_sandbox()
    await sb.pause()
    await sb.remove()
    await asyncio.to_thread(wait_deleted, sb.container_id or "")


@pytest.mark.parametrize("method", ["sandbox.get", "sandbox.pause", "sandbox.resume",
                                    "sandbox.remove", "sandbox.stats"])
async def test_unknown_sandbox_is_not_found(client: SandboxClient, method: str) -> None:
    with pytest.raises(NotFound) as info:
        await client.call(method, id="no-such-sandbox")
    assert info.value.code == "not_found"
    assert "no-such-sandbox" in info.value.message


@pytest.mark.parametrize(
    "kwargs",
    [
        {"bogus": 1},
        {"memory": "12q"},
        {"memory": "1k"},
        {"cpus": "two"},
        {"cpus": 1000},
        {"pids": -1},
        {"ttl": True},
        {"name": "bad name!"},
        {"workdir": "relative"},
        {"env": {"A": 1}},
        {"labels": ["x"]},
    ],
)
async def test_bad_create_arguments_are_invalid_params(client: SandboxClient,
                                                       kwargs: dict[str, object]) -> None:
    before = await client.list()
    with pytest.raises(InvalidParams) as info:
        await client.call("sandbox.create", **kwargs)
    assert info.value.message.endswith(".")
    assert await client.list() == before  # nothing else touched


async def test_missing_image_is_a_clear_error(client: SandboxClient) -> None:
    with pytest.raises(NotFound, match="not on this host"):
        await client.create(image="sandboxd/does-not-exist:1")


async def test_policy_and_quota(spawn_daemon: object) -> None:
    d: Daemon = spawn_daemon(  # type: ignore[operator]
        config='[policy]\nmax_ttl = 60\nmax_memory = "256m"\nimages = ["sandboxd/*"]\n'
               "[quota]\nmax_sandboxes = 1\n"
    )
    async with SandboxClient(d.socket) as c:
        with pytest.raises(PermissionDenied, match="ttl"):
            await c.create(ttl=0, memory="64m")
        with pytest.raises(PermissionDenied, match="memory"):
            await c.create(memory="1g", ttl=30)
        with pytest.raises(PermissionDenied, match="not allowed"):
            await c.create(image="busybox", ttl=30, memory="64m")
        sb = await c.create(ttl=30, memory="64m")
        try:
            with pytest.raises(QuotaExceeded):
                await c.create(ttl=30, memory="64m")
            with pytest.raises(PermissionDenied):
                await sb.extend(600)
        finally:
            await sb.remove()


async def test_remove_during_an_exec_ends_the_exec_with_conflict(
    make_sandbox: MakeSandbox, client: SandboxClient
) -> None:
    sb = await make_sandbox()
    running = asyncio.create_task(sb.exec(["sleep", "30"], stdin=b"x" * 1024 * 1024, timeout=60))
    deadline = time.monotonic() + 10
    while "sleep 30" not in (await sb.exec(["ps"])).stdout.decode():
        assert time.monotonic() < deadline, "the exec never started"
        await asyncio.sleep(0.05)
    await sb.remove()
    with pytest.raises(Conflict, match="removed while the command was running"):
        await asyncio.wait_for(running, 20)
