"""Running commands in sandboxes: the buffered exec of SPEC §3 and its accounting.

Owns ``ExecService`` (the checks before a command runs: the sandbox's state,
the policy's user, the per-uid running-command quota; the activity it counts
for; its events; ending every command of a sandbox that is removed) and
``BufferedExec``, one run from start to exit code: output into bounded
captures, stdin fed, the timeout kept by killing the process tree, the exit
code read. It must not parse wire messages or import a concrete backend.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from sandboxd.backend.base import AGENT_PATH, STDERR, Backend, Process, ProcessSpec
from sandboxd.core import quotas, status
from sandboxd.core.output import OutputCapture
from sandboxd.core.policy import check_env, check_user
from sandboxd.core.records import Caller, SandboxRecord
from sandboxd.core.settings import Defaults, Policy, Quota
from sandboxd.services.agent import AgentExec, AgentProcess
from sandboxd.services.agents import AgentHub
from sandboxd.services.deadlines import Deadlines
from sandboxd.services.reaper import Reaper
from sandboxd.services.registry import Registry
from sandboxd.services.sandboxes import Publisher
from sandboxd.wire.errors import (
    Conflict,
    DeadlineExceeded,
    InternalError,
    PermissionDenied,
    SandboxdError,
)

DRAIN_AFTER_KILL = 5.0
KILL_GRACE = 2.0  # past its timeout, how long a command's kill and last output may take
AGENT_WAIT = 2.0  # how long a command waits for a sandbox's agent that is still starting
OUTPUT_AFTER_EXIT = 0.5  # once the process is gone, how long its last output may take
EVENT_CMD_BYTES = 512  # an event carries at most this much of a command line


def _summary(cmd: list[str]) -> list[str]:
    """The start of an argv, bounded, for an event (events are kept and sent to many)."""
    out: list[str] = []
    room = EVENT_CMD_BYTES
    for arg in cmd:
        if room <= 0:
            out.append("...")
            break
        out.append(arg[:room])
        room -= len(arg) + 1
    return out


@dataclass
class ExecRequest:
    cmd: list[str]
    env: dict[str, str]
    workdir: str | None
    user: str | None
    stdin: bytes | None
    timeout: float | None
    max_output: int


class BufferedExec:
    """One run of ``sandbox.exec``: start to exit code, output captured."""

    def __init__(self, start: Callable[[], Awaitable[Process]], request: ExecRequest,
                 reaper: Reaper) -> None:
        self.start = start  # starts the process (through the agent, or the engine)
        self.reaper = reaper
        self.request = request
        self.stdout = OutputCapture(request.max_output)
        self.stderr = OutputCapture(request.max_output)
        self.aborted: str | None = None
        self._aborted = asyncio.Event()
        self._exited = asyncio.Event()
        self._process: Process | None = None

    def abort(self, reason: str) -> None:
        """End the run now (its sandbox is being removed); ``run`` raises ``Conflict``."""
        self.aborted = reason
        self._aborted.set()
        if isinstance(self._process, AgentProcess):
            self._process.exec.fail(Conflict(reason, {"status": "removed"}))

    async def _until(self, pump: asyncio.Task[None], limit: float | None) -> str:
        """Wait for the output to end: ``"done"``, ``"timeout"`` or ``"aborted"``."""
        aborted = asyncio.create_task(self._aborted.wait())
        exited = asyncio.create_task(self._exited.wait())
        try:
            done, _ = await asyncio.wait(
                {pump, aborted, exited}, timeout=limit, return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            aborted.cancel()
            exited.cancel()
        if pump in done:
            pump.result()  # re-raise a failure to read the output
            return "done"
        if self.aborted:
            return "aborted"
        return "done" if exited in done else "timeout"

    async def _watch_exit(self, process: Process, pump: asyncio.Task[None]) -> None:
        """Set ``_exited`` once the process is gone and its output had time to arrive."""
        delay = 0.05
        while not pump.done():
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.5)
            try:
                code = await process.exit_code()
            except SandboxdError:
                return  # the engine or the container went away: the pump will see it too
            if code is not None:
                await asyncio.wait({pump}, timeout=OUTPUT_AFTER_EXIT)
                self._exited.set()
                return

    async def _pump(self, process: Process) -> None:
        out, err, stream = self.stdout, self.stderr, process.stream
        while (piece := await stream.read()) is not None:
            (err if piece[0] == STDERR else out).append(piece[1])

    async def _feed_stdin(self, process: Process, data: bytes) -> None:
        try:
            if data:
                await process.stream.write(data)
            process.stream.close_stdin()
        except Exception:
            pass  # the process exited or closed its stdin: the rest of the input is moot

    async def run(self) -> dict[str, Any]:
        """Run to the exit code. With a timeout the caller is answered on the daemon's own
        clock: if the engine does not answer in time, ``timeout`` is raised on time and
        the kill follows (through the reaper) when the engine does. A process whose run
        fails or is cancelled is killed, never left running."""
        req = self.request
        starting = asyncio.ensure_future(self.start())
        loop = asyncio.get_running_loop()
        deadline = None if req.timeout is None else loop.time() + req.timeout
        process: Process | None = None
        try:
            async with asyncio.timeout_at(deadline):  # started within the timeout, at least
                process = await asyncio.shield(starting)
            async with asyncio.timeout_at(None if deadline is None else deadline + KILL_GRACE):
                return await self._supervise(process)
        except TimeoutError:
            self.reaper.kill(process or starting, "the engine did not answer in time")
            raise DeadlineExceeded(
                f"The command's timeout of {req.timeout:g} s passed and the engine did not "
                "answer in time; the command is killed as soon as it does.",
                {"timeout": req.timeout},
            ) from None
        except (SandboxdError, asyncio.CancelledError):
            self.reaper.kill(process or starting, "its caller got an error or went away")
            if self.aborted:
                raise Conflict(self.aborted, {"status": "removed"}) from None
            raise

    async def _supervise(self, process: Process) -> dict[str, Any]:
        self._process = process
        if isinstance(process, AgentProcess):
            return await self._supervise_agent(process)
        req = self.request
        started = time.monotonic()
        timed_out = False
        feeder: asyncio.Task[None] | None = None
        pump = asyncio.create_task(self._pump(process))
        watcher: asyncio.Task[None] | None = None
        try:
            if req.stdin is not None:
                feeder = asyncio.create_task(self._feed_stdin(process, req.stdin))
                # The engine keeps the stream open until it has all of stdin, even after
                # the process is gone: notice the exit ourselves so nobody waits on it.
                watcher = asyncio.create_task(self._watch_exit(process, pump))
            outcome = await self._until(pump, req.timeout)
            if outcome == "timeout":
                timed_out = True
                await process.kill_tree()
                outcome = await self._until(pump, DRAIN_AFTER_KILL)
        finally:
            for task in (pump, feeder, watcher):
                if task is not None and not task.done():
                    task.cancel()
            await process.stream.close()
        if self.aborted:
            raise Conflict(self.aborted, {"status": "removed"})
        exit_code = await process.wait_exit_code()
        return {
            "exit_code": exit_code,
            "stdout": self.stdout.result(),
            "stderr": self.stderr.result(),
            "timed_out": timed_out,
            "truncated": self.stdout.truncated or self.stderr.truncated,
            "duration": round(time.monotonic() - started, 6),
        }


    async def _drain(self, exec_: AgentExec) -> None:
        out, err = self.stdout, self.stderr
        while (piece := await exec_.next_output()) is not None:
            (err if piece[0] == STDERR else out).append(piece[1])

    async def _supervise_agent(self, process: AgentProcess) -> dict[str, Any]:
        """The agent's path: no task per run, the agent keeps the timeout too."""
        req, exec_ = self.request, process.exec
        started = time.monotonic()
        timed_out = False
        feeder = None
        if req.stdin is not None:
            feeder = asyncio.create_task(self._feed_stdin(process, req.stdin))
        try:
            try:
                async with asyncio.timeout(req.timeout):
                    await self._drain(exec_)
            except TimeoutError:
                timed_out = True
                exec_.signal(9)
                async with asyncio.timeout(DRAIN_AFTER_KILL):
                    await self._drain(exec_)
            info = await exec_.exit
        finally:
            if feeder is not None and not feeder.done():
                feeder.cancel()
        exec_.release()
        return {
            "exit_code": info.exit_code,
            "stdout": self.stdout.result(),
            "stderr": self.stderr.result(),
            "timed_out": timed_out or info.timed_out,
            "truncated": self.stdout.truncated or self.stderr.truncated,
            "duration": round(time.monotonic() - started, 6),
        }


class ExecService:
    def __init__(
        self,
        backend: Backend,
        registry: Registry,
        deadlines: Deadlines,
        *,
        defaults: Defaults,
        policy: Policy,
        quota: Quota,
        publish: Publisher,
        agents: AgentHub | None = None,
    ) -> None:
        self.backend = backend
        self.agents = agents
        self.registry = registry
        self.deadlines = deadlines
        self.defaults = defaults
        self.policy = policy
        self.quota = quota
        self.publish = publish
        self.reaper = Reaper()
        self._running: dict[str, set[BufferedExec]] = {}  # sandbox id -> its running execs
        self._by_uid: dict[int, int] = {}
        registry.on_forget.append(self._sandbox_gone)

    async def start(self, record: SandboxRecord, req: ExecRequest, *, tty: bool = False,
                    detached: bool = False, rows: int = 0, cols: int = 0) -> Process:
        """Start a command: through the sandbox's agent when it is ready and the command
        runs as the sandbox's own user, else through the engine (under the agent as its
        supervisor when the sandbox has one, so nothing it starts escapes a kill)."""
        session = self.agents.session(record.id) if self.agents is not None else None
        if session is not None and req.user == record.run_as:
            if await session.wait_ready(AGENT_WAIT):
                exec_ = await session.start_exec(
                    req.cmd, env=req.env, workdir=req.workdir, stdin=req.stdin is not None,
                    tty=tty, detached=detached, kill_after=req.timeout, rows=rows, cols=cols,
                )
                return AgentProcess(exec_)
        if tty or detached:
            raise Conflict(
                "A terminal or a detached command needs the sandbox's agent, which is "
                f"{record.agent} for this sandbox (or the command runs as another user).",
                {"agent": record.agent},
            )
        cmd = [AGENT_PATH, "--supervise", "--", *req.cmd] if record.has_agent else req.cmd
        assert record.container_id is not None
        return await self.backend.exec(
            record.container_id,
            ProcessSpec(cmd=cmd, env=req.env, workdir=req.workdir, user=req.user,
                        stdin=req.stdin is not None),
        )

    def _sandbox_gone(self, record: SandboxRecord) -> None:
        for runner in self._running.pop(record.id, ()):
            runner.abort(f"Sandbox '{record.name}' was removed while the command was running.")

    def _user(self, record: SandboxRecord, asked: str | None) -> str:
        """The user a command runs as: the sandbox's own, or one the policy allows."""
        forced = self.policy.user
        if forced is not None and asked not in (None, forced):
            raise PermissionDenied(f"Commands run as user {forced!r} by policy.",
                                   {"policy": "user"})
        if asked is None or asked == record.run_as:
            return record.run_as
        return check_user(asked, self.policy)

    def request(self, record: SandboxRecord, args: dict[str, Any]) -> ExecRequest:
        """A command's checked request: its user, environment, timeout and output cap."""
        return ExecRequest(
            cmd=args["cmd"],
            env={**record.env, **check_env(args.get("env", {}))},
            workdir=args.get("workdir"),
            user=self._user(record, args.get("user")),
            stdin=args.get("stdin"),
            timeout=args.get("timeout", self.defaults.exec_timeout),
            max_output=min(args.get("max_output", self.defaults.max_output),
                           self.policy.max_output),
        )

    def running(self, uid: int) -> int:
        """Commands of ``uid`` running now (buffered and streamed)."""
        return self._by_uid.get(uid, 0)

    def began(self, uid: int, record: SandboxRecord, cmd: list[str]) -> None:
        """A command started: it counts for the uid's quota and as the sandbox's activity."""
        self._by_uid[uid] = self._by_uid.get(uid, 0) + 1
        self.registry.hold(record.id)
        self.deadlines.touch(record)
        self.publish("exec.started", record, {"cmd": _summary(cmd)})

    def ended(self, uid: int, record: SandboxRecord, exit_code: int | None,
              timed_out: bool) -> None:
        left = self._by_uid.get(uid, 0) - 1
        if left > 0:
            self._by_uid[uid] = left
        else:
            self._by_uid.pop(uid, None)
        if self.registry.holds(record):
            self.registry.release(record.id)
            self.deadlines.touch(record)
        self.publish("exec.exited", record, {"exit_code": exit_code, "timed_out": timed_out})

    async def exec(self, caller: Caller, ref: str, args: dict[str, Any]) -> dict[str, Any]:
        record = self.registry.lookup(caller, ref)
        status.check("exec", record.status, record.name)
        request = self.request(record, args)
        quotas.check_execs(self.quota, self.running(caller.uid))
        if record.container_id is None:
            raise InternalError("sandbox has no container id")
        runner = BufferedExec(functools.partial(self.start, record, request), request,
                              self.reaper)
        running = self._running.setdefault(record.id, set())
        running.add(runner)
        self.began(caller.uid, record, request.cmd)
        result: dict[str, Any] | None = None
        try:
            result = await runner.run()
        finally:
            running.discard(runner)
            self.ended(caller.uid, record, result["exit_code"] if result else None,
                       bool(result and result["timed_out"]))
        return result
