"""Streaming execs (SPEC §3 exec.start and friends): output followed live, stdin, a PTY, detach.

Owns every streamed command: starting it (through the exec service, so the
same checks, quota and user rules as ``sandbox.exec`` apply), its wire id
(``<sandbox id>.<hex>``: it names its sandbox, so no agent can claim another
sandbox's commands), the follower that receives its output (one connection
at a time: a new ``exec.attach`` takes over) and a forwarder that passes
output on in order and acknowledges it to the agent only once the follower's
connection took it (a slow reader slows its own command, nothing else), the
exit, stdin, signals, resizing, waiting, listing, and what happens when a
follower goes: a command not started ``detach`` is killed with everything it
started; a detached one runs on with its output retained by the agent. It
must not know about sockets or the wire encoding (a ``Follower`` does that).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import structlog

from sandboxd.backend.base import STDERR, Process
from sandboxd.core import quotas, status
from sandboxd.core.records import Caller, SandboxRecord
from sandboxd.services.agent import AgentExec, AgentProcess, ExitInfo
from sandboxd.services.agents import AgentHub
from sandboxd.services.execs import ExecService
from sandboxd.services.registry import Registry
from sandboxd.wire.errors import Conflict, InvalidParams, NotFound, SandboxdError
from sandboxd.wire.units import format_time

log = structlog.get_logger("sandboxd.streams")

STREAM_NAMES = {1: "stdout", STDERR: "stderr"}
KEEP_ENDED = 64  # ended commands per sandbox still listed (and waitable)
RESYNC_WAIT = 5.0  # seconds a call waits for a restarted daemon to resync with an agent


class Follower(Protocol):
    """Where a command's output goes: one client connection (``rpc`` implements it)."""

    @property
    def closed(self) -> bool: ...

    @property
    def writable(self) -> bool:
        """False while the client is behind on reading."""
        ...

    async def drain(self) -> None:
        """Wait until the client has read enough of what was sent."""

    def output(self, exec_id: str, stream: str, data: bytes | memoryview) -> None: ...

    def exited(self, exec_id: str, info: dict[str, Any]) -> None: ...

    def on_close(self, callback: Callable[[], None]) -> None: ...

    def hold(self) -> None:
        """It follows one more command (so it is not idle)."""

    def release(self) -> None: ...


@dataclass(eq=False)
class Streamed:
    """One streamed command the daemon follows."""

    exec_id: str
    record: SandboxRecord
    caller_uid: int
    detached: bool
    tty: bool
    cmd: list[str]
    process: Process
    started: float = field(default_factory=time.monotonic)
    started_at: float = field(default_factory=time.time)
    follower: Follower | None = None
    forwarder: asyncio.Task[None] | None = None
    ended: float | None = None
    attaches: int = 0  # exec.attach calls so far: the latest one wins

    @property
    def agent(self) -> AgentExec | None:
        return self.process.exec if isinstance(self.process, AgentProcess) else None


def _agent_id(record: SandboxRecord, num: int) -> str:
    return f"{record.id}.{num:016x}"


class ExecStreams:
    def __init__(self, registry: Registry, execs: ExecService, agents: AgentHub) -> None:
        self.registry = registry
        self.execs = execs
        self.agents = agents
        self._by_id: dict[str, Streamed] = {}
        self._following: dict[Follower, set[Streamed]] = {}
        self._ended_ids: dict[str, deque[str]] = {}  # sandbox id -> its ended commands
        registry.on_forget.append(self._sandbox_gone)

    # -- starting and finding ----------------------------------------------------

    async def start(self, caller: Caller, ref: str, args: dict[str, Any],
                    follower: Follower) -> dict[str, Any]:
        record = self.registry.lookup(caller, ref)
        status.check("exec", record.status, record.name)
        tty, detached = bool(args.get("tty")), bool(args.get("detach"))
        request = self.execs.request(record, {**args, "stdin": b"" if args.get("stdin") else None})
        quotas.check_execs(self.execs.quota, self.execs.running(caller.uid))
        process = await self.execs.start(
            record, request, tty=tty, detached=detached,
            rows=int(args.get("rows", 0)), cols=int(args.get("cols", 0)),
        )
        agent = process.exec if isinstance(process, AgentProcess) else None
        exec_id = _agent_id(record, agent.num) if agent else f"{record.id}.e{id(process):x}"
        streamed = Streamed(exec_id, record, caller.uid, detached, tty, list(request.cmd),
                            process)
        self._by_id[exec_id] = streamed
        self.execs.began(caller.uid, record, request.cmd)
        self._follow(streamed, follower)
        return {"exec_id": exec_id}

    def _find(self, caller: Caller, exec_id: str) -> Streamed:
        """The command, if the caller may see its sandbox (``not_found`` otherwise)."""
        sid, _, num = exec_id.partition(".")
        with contextlib.suppress(NotFound):
            record = self.registry.lookup(caller, sid)
            streamed = self._by_id.get(exec_id)
            if streamed is not None and streamed.record is record:
                return streamed
            adopted = self._adopt(record, num)
            if adopted is not None:
                return adopted
        raise NotFound(f"No command {exec_id!r}.", {"exec_id": exec_id})

    async def _find_resynced(self, caller: Caller, exec_id: str) -> Streamed:
        """``_find``, but a sandbox whose agent is still resynchronising (a daemon just
        restarted) is waited for, RESYNC_WAIT at most: until then its detached commands
        are not known yet, which is not the same as gone."""
        try:
            return self._find(caller, exec_id)
        except NotFound:
            sid = exec_id.partition(".")[0]
            with contextlib.suppress(NotFound):
                record = self.registry.lookup(caller, sid)
                session = self.agents.session(record.id)
                if session is not None and not session.ready \
                        and await session.wait_ready(RESYNC_WAIT):
                    return self._find(caller, exec_id)
            raise

    def _adopt(self, record: SandboxRecord, num: str) -> Streamed | None:
        """A detached command this daemon did not start (it was restarted): the agent
        still has it; follow it from here."""
        session = self.agents.session(record.id)
        try:
            value = int(num, 16)
        except ValueError:
            return None
        agent = session.execs.get(value) if session is not None else None
        if agent is None or not agent.detached:
            return None
        streamed = Streamed(_agent_id(record, value), record, record.owner_uid, True,
                            agent.tty, agent.cmd, AgentProcess(agent))
        self._by_id[streamed.exec_id] = streamed
        return streamed

    # -- following -----------------------------------------------------------------

    def _follow(self, streamed: Streamed, follower: Follower) -> None:
        old = streamed.forwarder
        if old is not None:
            old.cancel()
        self._unfollow(streamed)
        streamed.follower = follower
        mine = self._following.get(follower)
        if mine is None:
            mine = self._following[follower] = set()
            follower.on_close(lambda: self._follower_gone(follower))
        mine.add(streamed)
        follower.hold()
        streamed.forwarder = asyncio.get_running_loop().create_task(
            self._forward(streamed, follower), name=f"exec-{streamed.exec_id}"
        )

    def _unfollow(self, streamed: Streamed) -> None:
        """The command's follower no longer follows it (it ended, or another took over)."""
        follower, streamed.follower = streamed.follower, None
        if follower is None:
            return
        mine = self._following.get(follower)
        if mine is not None and streamed in mine:
            mine.discard(streamed)
            follower.release()

    async def _forward(self, streamed: Streamed, follower: Follower) -> None:
        """Output to the follower in order, acknowledged once its connection took it;
        then the exit."""
        agent = streamed.agent
        try:
            if agent is not None:
                while (piece := await agent.next_output(ack_now=False)) is not None:
                    stream, data, offset = piece
                    follower.output(streamed.exec_id, STREAM_NAMES[stream], data)
                    if not follower.writable:
                        await follower.drain()
                    agent.ack(offset + len(data), eager=not follower.closed)
                info = await agent.exit
            else:
                reader = streamed.process.stream
                while (part := await reader.read()) is not None:
                    follower.output(streamed.exec_id, STREAM_NAMES[part[0]], part[1])
                    if not follower.writable:
                        await follower.drain()
                info = ExitInfo(await streamed.process.wait_exit_code(), False, False)
        except SandboxdError as exc:
            log.info("exec_stream_failed", exec_id=streamed.exec_id, error=exc.message)
            info = ExitInfo(-1, False, False)
        if follower.closed or streamed.follower is not follower:
            return
        self._ended(streamed, info)
        follower.exited(streamed.exec_id, self._exit_map(streamed, info))
        self._unfollow(streamed)
        if not streamed.detached:
            # Delivered: nothing more to attach to or wait for. What it started in the
            # background goes with it (start it detached to keep that running).
            self._kill(streamed)
            self._forget(streamed)

    def _exit_map(self, streamed: Streamed, info: ExitInfo) -> dict[str, Any]:
        ended = streamed.ended if streamed.ended is not None else time.monotonic()
        return {
            "exit_code": info.exit_code,
            "timed_out": info.timed_out,
            "duration": round(ended - streamed.started, 6),
        }

    def _ended(self, streamed: Streamed, info: ExitInfo) -> None:
        if streamed.ended is None:
            streamed.ended = time.monotonic()
            self.execs.ended(streamed.caller_uid, streamed.record, info.exit_code,
                             info.timed_out)

    def _follower_gone(self, follower: Follower) -> None:
        """A connection closed: what it followed and did not detach is killed."""
        for streamed in self._following.pop(follower, set()):
            if streamed.follower is not follower:
                continue  # another connection took it over
            streamed.follower = None
            if streamed.forwarder is not None:
                streamed.forwarder.cancel()
            if streamed.detached:
                continue  # runs on; its output is retained for exec.attach
            self._kill(streamed)
            self._forget(streamed)

    def _kill(self, streamed: Streamed) -> None:
        """Kill the command and everything it started (also what lingers after its exit)."""
        agent = streamed.agent
        if agent is not None:
            with contextlib.suppress(SandboxdError):
                agent.signal(9)
            return
        self.execs.reaper.kill(streamed.process, "its connection closed")

    def _forget(self, streamed: Streamed) -> None:
        """Let the agent forget an ended command; its exit stays listed for a while."""
        if streamed.ended is None:
            self._ended(streamed, ExitInfo(-1, False, True))
        agent = streamed.agent
        if agent is not None:
            if agent.running:  # killed just now: forget it at the agent once it has exited
                agent.exit.add_done_callback(lambda _: agent.release())
            else:
                agent.release()
        ended = self._ended_ids.setdefault(streamed.record.id, deque())
        ended.append(streamed.exec_id)
        while len(ended) > KEEP_ENDED:
            self._by_id.pop(ended.popleft(), None)

    def _sandbox_gone(self, record: SandboxRecord) -> None:
        for streamed in [s for s in self._by_id.values() if s.record is record]:
            if streamed.forwarder is not None:
                streamed.forwarder.cancel()
            self._unfollow(streamed)
            self._forget(streamed)
            self._by_id.pop(streamed.exec_id, None)
        self._ended_ids.pop(record.id, None)

    # -- the calls -----------------------------------------------------------------

    async def write(self, caller: Caller, exec_id: str, data: bytes) -> None:
        streamed = await self._find_resynced(caller, exec_id)
        self.execs.deadlines.touch(streamed.record)
        if streamed.agent is not None:
            await streamed.agent.write(data)
        else:
            await streamed.process.stream.write(data)

    def close_stdin(self, caller: Caller, exec_id: str) -> None:
        streamed = self._find(caller, exec_id)
        if streamed.agent is not None:
            streamed.agent.close_stdin()
        else:
            streamed.process.stream.close_stdin()

    async def kill(self, caller: Caller, exec_id: str, signo: int) -> None:
        streamed = await self._find_resynced(caller, exec_id)
        if streamed.agent is not None:
            streamed.agent.signal(signo)
        elif signo == 9:
            await streamed.process.kill_tree()
        else:
            raise Conflict("Only signal 9 can be sent to a command run through the engine.",
                           {"signal": signo})

    def resize(self, caller: Caller, exec_id: str, rows: int, cols: int) -> None:
        streamed = self._find(caller, exec_id)
        if not streamed.tty or streamed.agent is None:
            raise Conflict("Only a command started with tty can be resized.",
                           {"exec_id": exec_id})
        streamed.agent.resize(rows, cols)

    async def wait(self, caller: Caller, exec_id: str) -> dict[str, Any]:
        streamed = await self._find_resynced(caller, exec_id)
        if streamed.agent is not None:
            info = await asyncio.shield(streamed.agent.exit)
        else:
            info = ExitInfo(await streamed.process.wait_exit_code(), False, False)
        self._ended(streamed, info)
        return self._exit_map(streamed, info)

    async def attach(self, caller: Caller, exec_id: str, offset: int,
                     follower: Follower) -> dict[str, Any]:
        streamed = await self._find_resynced(caller, exec_id)
        agent = streamed.agent
        if agent is None or not streamed.detached:
            raise Conflict("Only a command started with detach can be attached to.",
                           {"exec_id": exec_id})
        streamed.attaches += 1
        mine = streamed.attaches
        if streamed.forwarder is not None:
            streamed.forwarder.cancel()
            streamed.forwarder = None
        self._unfollow(streamed)
        start = await agent.rewind(offset)
        if streamed.attaches != mine:
            raise Conflict("Another exec.attach of this command came after this one.",
                           {"exec_id": exec_id})
        if not follower.closed:  # its caller may have gone while it waited
            self._follow(streamed, follower)
        return {"offset": start}

    def list(self, caller: Caller, ref: str) -> list[dict[str, Any]]:
        record = self.registry.lookup(caller, ref)
        session = self.agents.session(record.id)
        if session is not None:  # detached commands of an earlier daemon, too
            for num, known in list(session.execs.items()):
                if known.detached and _agent_id(record, num) not in self._by_id:
                    self._adopt(record, f"{num:016x}")
        out = []
        for streamed in self._by_id.values():
            if streamed.record is not record:
                continue
            agent = streamed.agent
            exited = agent.exit.result() if agent and agent.exit.done() and \
                not agent.exit.exception() else None
            out.append({
                "exec_id": streamed.exec_id,
                "cmd": streamed.cmd,
                "running": agent.running if agent else streamed.ended is None,
                "exit_code": exited.exit_code if exited else None,
                "detached": streamed.detached,
                "tty": streamed.tty,
                "started_at": format_time(agent.started_at if agent else streamed.started_at),
            })
        return out


def signal_number(value: Any) -> int:
    """A signal given as a number or a name (``"TERM"``, ``"SIGKILL"``)."""
    import signal as signals

    if isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= 64:
        return value
    if isinstance(value, str):
        name = value.upper()
        name = name if name.startswith("SIG") else f"SIG{name}"
        with contextlib.suppress(AttributeError):
            return int(getattr(signals, name))
    raise InvalidParams(f"Argument 'signal' must be a signal number or name, got {value!r}.",
                        {"argument": "signal"})
