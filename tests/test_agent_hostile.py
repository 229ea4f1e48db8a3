"""Garbage from the agent's side ends that sandbox's channel and nothing else.

The agent runs beside hostile code, so every byte it sends is untrusted. A daemon started
with ``agent_path`` pointing at ``tests/hostile/fake_agent.c`` (built static by a fixture)
runs that fake as every sandbox's PID 1; the sandbox's environment picks what it does after
a valid handshake (``FAKE_AGENT_MODE``): garbage bytes, a header with a bad CRC, an oversized
length, OUTPUT for an exec the daemon never started. Each time:

- the sandbox's ``agent`` becomes ``"unavailable"`` and ``sandbox.error`` is published with
  ``data.component == "agent"`` and the reason;
- a command in that sandbox still works: it falls back to the engine's exec (which runs the
  fake as ``--supervise -- CMD``); what needs the agent (a terminal, files) is ``conflict``;
- another sandbox of the same daemon whose (fake) agent behaves stays ``"ready"``, and a
  sandbox of a second daemon with the real agent is untouched and still runs commands.

Also: an agent that never answers HELLO ends ``"unavailable"`` after the handshake limit
(10 s) and commands still work; an agent in step that never runs anything cannot hold a
caller past the command's timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import pytest_asyncio
from conftest import Daemon, eventually, started_daemon
from hostile.common import MIB, RssWatch, build_static, remove_and_wait
from sandboxd_client import Conflict, DeadlineExceeded, SandboxClient
from sandboxd_client.aio import Sandbox

from sandboxd.services.agent import HANDSHAKE_LIMIT


@pytest.fixture(scope="module")
def fake_agent(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_static("fake_agent.c", tmp_path_factory.mktemp("fake-agent"))


@pytest.fixture(scope="module")
def fake_daemon(engine: None, fake_agent: Path) -> Iterator[Daemon]:
    """A daemon whose sandboxes all run the fake agent as PID 1."""
    with started_daemon(f'agent_path = "{fake_agent}"\n') as d:
        yield d


@pytest_asyncio.fixture
async def fake(fake_daemon: Daemon) -> AsyncIterator[SandboxClient]:
    async with SandboxClient(fake_daemon.socket) as c:
        yield c


@pytest_asyncio.fixture
async def bystanders(fake: SandboxClient,
                     client: SandboxClient) -> AsyncIterator[tuple[Sandbox, Sandbox]]:
    """A sandbox of the fake daemon whose agent stays in step ("quiet"), and one of the
    session's daemon with the real agent; both must be untouched by what follows."""
    made: list[Sandbox] = []
    try:
        calm = await fake.create(ttl=180, env={"FAKE_AGENT_MODE": "quiet"})
        made.append(calm)
        real = await client.create(ttl=180)
        made.append(real)
        for sb in made:
            async def ready(sb: Sandbox = sb) -> bool:
                return (await sb.refresh()).agent == "ready"

            await eventually(ready, within=15, what=f"the agent of {sb.id} ready")
        yield calm, real
    finally:
        for sb in made:
            with contextlib.suppress(Exception):
                await remove_and_wait(sb)


async def agent_becomes(sb: Sandbox, state: str, within: float) -> float:
    """Poll until ``sb.agent == state``; the seconds it took."""
    started = time.monotonic()

    async def there() -> bool:
        return (await sb.refresh()).agent == state

    await eventually(there, within=within, what=f"agent {state!r} for {sb.id}")
    return time.monotonic() - started


async def assert_untouched(fake_daemon: Daemon, fake: SandboxClient, calm: Sandbox,
                           real: Sandbox) -> None:
    assert fake_daemon.proc is not None and fake_daemon.proc.poll() is None
    assert await fake.ping() == "pong"
    calm = await calm.refresh()
    assert (calm.status, calm.agent) == ("running", "ready")
    real = await real.refresh()
    assert (real.status, real.agent) == ("running", "ready")
    r = await real.exec(["sh", "-c", "echo real; cat /proc/1/cmdline"], timeout=30)
    assert (r.exit_code, r.stdout) == (0, b"real\n/.sandboxd/agent\0"), r
    failed = {e.get("sandbox_id") for e in fake_daemon.log_events()
              if e.get("event") == "agent_failed"}
    assert calm.id not in failed


@pytest.mark.parametrize(("mode", "reason"), [
    ("garbage", "bad magic"),
    ("bad_crc", "header CRC mismatch"),
    ("oversized", "exceeds MAX_PAYLOAD"),
    ("unknown_exec", "an exec the daemon did not start"),
])
async def test_a_protocol_violation_ends_only_that_sandboxs_channel(
    fake_daemon: Daemon, fake: SandboxClient, bystanders: tuple[Sandbox, Sandbox],
    mode: str, reason: str,
) -> None:
    calm, real = bystanders
    async with fake.events(types=["sandbox.error"]) as events:
        await events.start()
        sb = await fake.create(ttl=180, env={"FAKE_AGENT_MODE": mode})
        try:
            ev = await events.next_event(timeout=20)
            assert ev is not None
            assert ev.sandbox_id == sb.id, f"a sandbox.error for another sandbox: {ev}"
            assert ev.data["component"] == "agent", ev.data
            assert reason in ev.data["error"], ev.data
            await agent_becomes(sb, "unavailable", within=10)
            assert (await sb.refresh()).status == "running"

            # Commands go through the engine now (the fake runs them as --supervise).
            r = await sb.exec(["sh", "-c", "echo via the engine; cat /proc/1/cmdline"],
                              timeout=30)
            assert (r.exit_code, r.stdout) == (0, b"via the engine\n/.sandboxd/agent\0"), r
            r = await sb.exec(["cat"], stdin=b"in\n", timeout=30)
            assert (r.exit_code, r.stdout) == (0, b"in\n"), r
            # What only the agent can do is refused, clearly.
            with pytest.raises(Conflict):
                await sb.start(["sh"], tty=True, stdin=True)
            with pytest.raises(Conflict):
                await sb.read_file("/etc/passwd")

            await assert_untouched(fake_daemon, fake, calm, real)
        finally:
            await remove_and_wait(sb)


async def test_an_agent_that_never_answers_hello_is_given_up_after_the_limit(
    fake_daemon: Daemon, fake: SandboxClient, bystanders: tuple[Sandbox, Sandbox],
) -> None:
    calm, real = bystanders
    started = time.monotonic()
    sb = await fake.create(ttl=180, env={"FAKE_AGENT_MODE": "silent"})
    try:
        assert sb.agent == "starting"
        await agent_becomes(sb, "unavailable", within=HANDSHAKE_LIMIT + 15)
        waited = time.monotonic() - started
        print(f"\nsilent agent: unavailable after {waited:.1f} s (limit {HANDSHAKE_LIMIT:g} s)")
        assert waited >= HANDSHAKE_LIMIT - 0.5
        r = await sb.exec(["echo", "still works"], timeout=30)
        assert (r.exit_code, r.stdout) == (0, b"still works\n"), r
        assert (await sb.refresh()).status == "running"
        await assert_untouched(fake_daemon, fake, calm, real)
    finally:
        await remove_and_wait(sb)


async def test_an_agent_that_floods_instead_of_answering_costs_the_daemon_no_memory(
    fake_daemon: Daemon, fake: SandboxClient, bystanders: tuple[Sandbox, Sandbox],
) -> None:
    """Bytes without end and no STATE: the daemon discards them while it looks for its
    nonce, up to a bound (16 MiB); past it the channel is ended as a protocol violation,
    for good (not attached again to more of the same, which cost half a core). Its memory
    stays flat and commands in the sandbox still work."""
    calm, real = bystanders
    assert fake_daemon.proc is not None
    with RssWatch(fake_daemon.proc.pid) as rss:
        sb = await fake.create(ttl=180, env={"FAKE_AGENT_MODE": "flood"})
        try:
            await agent_becomes(sb, "unavailable", within=HANDSHAKE_LIMIT + 15)
            violations = [e for e in fake_daemon.log_events()
                          if e.get("event") == "agent_channel_violation"
                          and e.get("sandbox_id") == sb.id]
            assert violations and "before the answer to HELLO" in violations[0]["error"]
            r = await sb.exec(["echo", "still works"], timeout=30)
            assert (r.exit_code, r.stdout) == (0, b"still works\n"), r
            await assert_untouched(fake_daemon, fake, calm, real)
        finally:
            await remove_and_wait(sb)
    print(f"\nflooding agent: {rss.describe()}")
    assert rss.growth < 64 * MIB, rss.describe()


async def test_an_agent_in_step_that_runs_nothing_cannot_hold_a_caller_past_its_timeout(
    fake_daemon: Daemon, fake: SandboxClient, bystanders: tuple[Sandbox, Sandbox],
) -> None:
    """The quiet fake completes the handshake and then ignores every START: a command with
    a timeout is still answered on the daemon's own clock (timeout plus its kill grace)."""
    calm, real = bystanders
    started = time.monotonic()
    with pytest.raises(DeadlineExceeded):
        await asyncio.wait_for(calm.exec(["echo", "never"], timeout=2), 30)
    took = time.monotonic() - started
    assert 2 <= took < 10, took
    await assert_untouched(fake_daemon, fake, calm, real)
