"""Running a command inside a sandbox: the buffered exec of SPEC §3.

Owns one exec's life: create it with a marker in its environment, start it,
demultiplex its output into bounded captures, feed stdin, enforce the
timeout by killing the process tree (the engine cannot), and read the
process's own exit code (polling past the engine's brief "still running"
after output ends). It must not check ownership, sandbox state or policy.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from dataclasses import dataclass
from typing import Any

import structlog

from .demux import STDERR, Demuxer
from .engine import Engine, ExecStream
from .errors import Conflict, DeadlineExceeded, SandboxdError
from .output import OutputCapture
from .proctree import MARKER_VAR, kill_exec_tree

log = structlog.get_logger("sandboxd.exec")

# The engine usually reports the exit a few ms after the output ends: poll finely at first.
EXIT_POLL_DELAYS = (0.0,) + (0.001,) * 10 + (0.002,) * 5 + (0.005, 0.01, 0.02, 0.05, 0.1, 0.2)
EXIT_WAIT_LIMIT = 5.0
DRAIN_AFTER_KILL = 5.0
OUTPUT_AFTER_EXIT = 0.5  # once the process is gone, how long its last output may take


@dataclass
class ExecRequest:
    cmd: list[str]
    env: dict[str, str]
    workdir: str | None
    user: str | None
    stdin: bytes | None
    timeout: float | None
    max_output: int


async def wait_exit_code(engine: Engine, exec_id: str) -> int:
    """The exec's own exit code; polls while the engine still says Running."""
    deadline = time.monotonic() + EXIT_WAIT_LIMIT
    attempt = 0
    while True:
        info = await engine.exec_inspect(exec_id)
        code = info.get("ExitCode")
        if not info.get("Running") and code is not None:
            return int(code)
        if time.monotonic() > deadline:
            raise DeadlineExceeded(
                "The command's output ended but the Docker Engine reported no exit code "
                f"within {EXIT_WAIT_LIMIT:g} s.",
                {"exec_id": exec_id},
            )
        await asyncio.sleep(EXIT_POLL_DELAYS[min(attempt, len(EXIT_POLL_DELAYS) - 1)])
        attempt += 1


async def kill_exec(engine: Engine, container_id: str, exec_id: str, marker: str) -> int:
    """SIGKILL the exec's process and everything it started."""
    exec_info = await engine.exec_inspect(exec_id)
    container = await engine.inspect(container_id)
    container_pid = int((container.get("State") or {}).get("Pid") or 0)
    exec_pid = int(exec_info.get("Pid") or 0)
    if container_pid <= 0:
        return 0  # the container is gone: so is everything in it
    killed = await asyncio.to_thread(kill_exec_tree, exec_pid, container_pid, marker)
    log.info("exec_killed", exec_id=exec_id, processes=killed)
    return killed


class BufferedExec:
    """One run of ``sandbox.exec``: start to exit code, output captured."""

    def __init__(self, engine: Engine, container_id: str, request: ExecRequest) -> None:
        self.engine = engine
        self.container_id = container_id
        self.request = request
        self.marker = secrets.token_hex(8)
        self.stdout = OutputCapture(request.max_output)
        self.stderr = OutputCapture(request.max_output)
        self._demux = Demuxer()
        self.aborted: str | None = None
        self._aborted = asyncio.Event()
        self._exited = asyncio.Event()

    def abort(self, reason: str) -> None:
        """End the run now (its sandbox is being removed); ``run`` raises ``Conflict``."""
        self.aborted = reason
        self._aborted.set()

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

    async def _watch_exit(self, exec_id: str, pump: asyncio.Task[None]) -> None:
        """Set ``_exited`` once the process is gone and its output had time to arrive."""
        delay = 0.05
        while not pump.done():
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.5)
            try:
                info = await self.engine.exec_inspect(exec_id)
            except SandboxdError:
                return  # the engine or the container went away: the pump will see it too
            if not info.get("Running") and info.get("ExitCode") is not None:
                await asyncio.wait({pump}, timeout=OUTPUT_AFTER_EXIT)
                self._exited.set()
                return

    async def _pump(self, stream: ExecStream) -> None:
        demux, out, err = self._demux, self.stdout, self.stderr
        while (chunk := await stream.read()) is not None:
            for which, data in demux.feed(chunk):
                (err if which == STDERR else out).append(data)

    async def _feed_stdin(self, stream: ExecStream, data: bytes) -> None:
        try:
            if data:
                await stream.write(data)
            stream.close_stdin()
        except Exception:
            pass  # the process exited or closed its stdin: the rest of the input is moot

    async def run(self) -> dict[str, Any]:
        try:
            return await self._run()
        except SandboxdError:
            if self.aborted:
                raise Conflict(self.aborted, {"status": "removed"}) from None
            raise

    async def _run(self) -> dict[str, Any]:
        req = self.request
        started = time.monotonic()
        env = [f"{k}={v}" for k, v in req.env.items()] + [f"{MARKER_VAR}={self.marker}"]
        exec_id = await self.engine.exec_create(
            self.container_id,
            req.cmd,
            env=env,
            workdir=req.workdir,
            user=req.user,
            stdin=req.stdin is not None,
            tty=False,
        )
        stream = await self.engine.exec_start(exec_id, tty=False)
        timed_out = False
        feeder: asyncio.Task[None] | None = None
        pump = asyncio.create_task(self._pump(stream))
        watcher: asyncio.Task[None] | None = None
        try:
            if req.stdin is not None:
                feeder = asyncio.create_task(self._feed_stdin(stream, req.stdin))
                # The engine keeps the stream open until it has all of stdin, even after
                # the process is gone: notice the exit ourselves so nobody waits on it.
                watcher = asyncio.create_task(self._watch_exit(exec_id, pump))
            outcome = await self._until(pump, req.timeout)
            if outcome == "timeout":
                timed_out = True
                await kill_exec(self.engine, self.container_id, exec_id, self.marker)
                outcome = await self._until(pump, DRAIN_AFTER_KILL)
        except asyncio.CancelledError:
            # The caller went away or the daemon is stopping: leave nothing running.
            await asyncio.shield(kill_exec(self.engine, self.container_id, exec_id, self.marker))
            raise
        finally:
            for task in (pump, feeder, watcher):
                if task is not None and not task.done():
                    task.cancel()
            await stream.close()
        if self.aborted:
            raise Conflict(self.aborted, {"status": "removed"})
        exit_code = await wait_exit_code(self.engine, exec_id)
        return {
            "exit_code": exit_code,
            "stdout": self.stdout.result(),
            "stderr": self.stderr.result(),
            "timed_out": timed_out,
            "truncated": self.stdout.truncated or self.stderr.truncated,
            "duration": round(time.monotonic() - started, 6),
        }
