"""A process started with the engine's exec: its streams, exit code and tree kill.

Owns one Docker exec: creating it with a marker in its environment, its raw
stream demultiplexed into ``(STDOUT|STDERR, bytes)``, reading the process's own
exit code (polling past the engine's brief "still running" after the output
ends), and killing the process with everything it started from the host's
/proc (the engine cannot kill an exec), or from inside the container with the
agent binary where the host cannot see the processes (gVisor). It must not decide timeouts, capture
output or know about sandboxes.
"""

from __future__ import annotations

import asyncio
import secrets
import time

import structlog

from sandboxd.backend.base import (
    AGENT_PATH,
    STDERR,
    STDOUT,
    Process,
    ProcessSpec,
    ProcessStream,
)
from sandboxd.backend.docker.demux import STDERR as DEMUX_STDERR
from sandboxd.backend.docker.demux import Demuxer
from sandboxd.backend.docker.engine import Engine, RawStream
from sandboxd.backend.docker.proctree import MARKER_VAR, kill_exec_tree
from sandboxd.wire.errors import DeadlineExceeded, NotFound

log = structlog.get_logger("sandboxd.backend.docker")

# The engine usually reports the exit a few ms after the output ends: poll finely at first.
EXIT_POLL_DELAYS = (0.0,) + (0.001,) * 10 + (0.002,) * 5 + (0.005, 0.01, 0.02, 0.05, 0.1, 0.2)
EXIT_WAIT_LIMIT = 5.0
INSIDE_KILL_LIMIT = 10.0  # seconds the kill from inside the container may take


class DemuxedStream(ProcessStream):
    """An exec's raw stream, split into its stdout and stderr pieces."""

    def __init__(self, raw: RawStream) -> None:
        self._raw = raw
        self._demux = Demuxer()
        self._ready: list[tuple[int, bytes]] = []

    async def read(self) -> tuple[int, bytes] | None:
        while not self._ready:
            chunk = await self._raw.read()
            if chunk is None:
                return None
            self._ready = [
                (STDERR if which == DEMUX_STDERR else STDOUT, data)
                for which, data in self._demux.feed(chunk)
            ]
            self._ready.reverse()
        return self._ready.pop()

    async def write(self, data: bytes) -> None:
        await self._raw.write(data)

    def close_stdin(self) -> None:
        self._raw.close_stdin()

    async def close(self) -> None:
        await self._raw.close()


class DockerProcess(Process):
    """One exec, started; see the module docstring."""

    def __init__(self, engine: Engine, container_id: str, exec_id: str, marker: str,
                 stream: ProcessStream, spec: ProcessSpec | None = None) -> None:
        self._engine = engine
        self._container_id = container_id
        self._exec_id = exec_id
        self._marker = marker
        self.stream = stream
        # The agent binary is in the container (the command runs under it): it can kill
        # from inside where the host cannot see the processes (gVisor).
        self._user = spec.user if spec is not None else None
        self._agent_inside = spec is not None and spec.cmd[:1] == [AGENT_PATH]

    @classmethod
    async def start(cls, engine: Engine, container_id: str, spec: ProcessSpec) -> DockerProcess:
        marker = secrets.token_hex(8)
        env = [f"{k}={v}" for k, v in spec.env.items()] + [f"{MARKER_VAR}={marker}"]
        exec_id = await engine.exec_create(
            container_id,
            spec.cmd,
            env=env,
            workdir=spec.workdir,
            user=spec.user,
            stdin=spec.stdin,
            tty=spec.tty,
        )
        raw = await engine.exec_start(exec_id)
        return cls(engine, container_id, exec_id, marker, DemuxedStream(raw), spec)

    async def exit_code(self) -> int | None:
        info = await self._engine.exec_inspect(self._exec_id)
        code = info.get("ExitCode")
        if info.get("Running") or code is None:
            return None
        return int(code)

    async def wait_exit_code(self) -> int:
        deadline = time.monotonic() + EXIT_WAIT_LIMIT
        attempt = 0
        while True:
            code = await self.exit_code()
            if code is not None:
                return code
            if time.monotonic() > deadline:
                raise DeadlineExceeded(
                    "The command's output ended but the Docker Engine reported no exit code "
                    f"within {EXIT_WAIT_LIMIT:g} s.",
                    {"exec_id": self._exec_id},
                )
            await asyncio.sleep(EXIT_POLL_DELAYS[min(attempt, len(EXIT_POLL_DELAYS) - 1)])
            attempt += 1

    async def kill_tree(self) -> int:
        try:
            exec_pid = int((await self._engine.exec_inspect(self._exec_id)).get("Pid") or 0)
        except NotFound:
            exec_pid = 0  # the engine restarted and forgot its execs: the marker still finds it
        container = await self._engine.inspect(self._container_id)
        container_pid = int((container.get("State") or {}).get("Pid") or 0)
        if container_pid <= 0:
            return 0  # the container is gone: so is everything in it
        killed = await asyncio.to_thread(kill_exec_tree, exec_pid, container_pid, self._marker)
        if killed == 0 and self._agent_inside and await self.exit_code() is None:
            killed = await self._kill_from_inside()
        log.info("exec_killed", exec_id=self._exec_id, processes=killed)
        return killed

    async def _kill_from_inside(self) -> int:
        """The host sees none of its processes (a gVisor sandbox): the agent binary, run
        in the container as the same user, kills what carries the marker, and below."""
        exec_id = await self._engine.exec_create(
            self._container_id, [AGENT_PATH, "--kill-marker", f"{MARKER_VAR}={self._marker}"],
            env=[], workdir=None, user=self._user, stdin=False, tty=False,
        )
        stream = DemuxedStream(await self._engine.exec_start(exec_id))
        out = bytearray()
        try:
            async with asyncio.timeout(INSIDE_KILL_LIMIT):
                while (piece := await stream.read()) is not None:
                    if piece[0] == STDOUT:
                        out += piece[1]
        except TimeoutError:
            return 0
        finally:
            await stream.close()
        text = out.decode(errors="replace").strip()
        return int(text) if text.isdigit() else 0
