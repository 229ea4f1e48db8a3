"""A local agent process driven through sandboxd.agent.frames, for the agent tests.

The agent runs as an ordinary subprocess with two pipes (its channel), in its own session,
with a marker in its environment so that every process it starts (supervisors, commands) can
be found afterwards: ``close`` ends it and fails when anything it started is left over.
Nothing here sleeps hoping for a result: every wait polls a condition up to a deadline.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import subprocess
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from sandboxd.agent import frames as fr

T = TypeVar("T")
DEFAULT_TIMEOUT = 10.0


def wait_until(cond: Callable[[], T], timeout: float = DEFAULT_TIMEOUT,
               what: str = "condition", interval: float = 0.005) -> T:
    """Poll cond until it returns something truthy; that value. TimeoutError after timeout."""
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(interval)


def processes_with_marker(marker: str) -> list[int]:
    """Pids whose environment holds marker."""
    needle = marker.encode()
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/environ", "rb") as f:
                if needle in f.read():
                    found.append(int(name))
        except OSError:
            continue
    return found


def pid_alive(pid: int) -> bool:
    """Whether pid exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return False
    return stat[stat.rindex(b")") + 2:stat.rindex(b")") + 3] != b"Z"


def children_of(pid: int) -> list[int]:
    out = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        rest = stat[stat.rindex(b")") + 2:].split()
        if int(rest[1]) == pid:
            out.append(int(name))
    return out


@dataclass
class ExecResult:
    exec_id: int
    pid: int | None = None
    start_failed: fr.StartFailed | None = None
    exit: fr.Exit | None = None
    chunks: list[fr.Output] = field(default_factory=list)
    errors: list[fr.Error] = field(default_factory=list)
    stdin_sent: int = 0
    stdin_consumed: int = 0

    def stream(self, which: int) -> bytes:
        return b"".join(bytes(c.data) for c in self.chunks if c.stream == which)

    @property
    def stdout(self) -> bytes:
        return self.stream(fr.STDOUT)

    @property
    def stderr(self) -> bytes:
        return self.stream(fr.STDERR)

    @property
    def code(self) -> int:
        assert self.exit is not None, "the exec has not exited"
        return self.exit.exit_code


class Agent:
    """One agent subprocess and the daemon side of its channel."""

    def __init__(self, binary: Path, env: dict[str, str] | None = None,
                 cwd: str | None = None) -> None:
        self.marker = f"SBX_AGENT_TEST={uuid.uuid4().hex}"
        base = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LANG": "C"}
        for name in ("ASAN_OPTIONS", "UBSAN_OPTIONS"):  # for sanitizer builds of the agent
            if name in os.environ:
                base[name] = os.environ[name]
        full_env = {**base, **(env or {})}
        key, _, value = self.marker.partition("=")
        full_env[key] = value
        to_agent_r, self._to_agent = os.pipe()
        self._from_agent, from_agent_w = os.pipe()
        self.proc = subprocess.Popen([str(binary)], stdin=to_agent_r, stdout=from_agent_w,
                                     stderr=subprocess.DEVNULL, env=full_env, cwd=cwd,
                                     start_new_session=True)
        os.close(to_agent_r)
        os.close(from_agent_w)
        os.set_blocking(self._from_agent, False)
        os.set_blocking(self._to_agent, False)
        self.nonce = fr.new_nonce()
        self.decoder = fr.Decoder(self.nonce)
        self.frames: deque[fr.AgentFrame] = deque()
        self.state: fr.State | None = None
        self.execs: dict[int, ExecResult] = {}
        self.auto_ack = True
        self._next_id = 1
        self._closed = False
        self.raw_received = 0

    # -- channel --

    def _pump(self, timeout: float) -> bool:
        """Read what the agent wrote (waiting up to timeout); True when bytes came."""
        r, _, _ = select.select([self._from_agent], [], [], max(timeout, 0))
        if not r:
            return False
        got = False
        while True:
            try:
                data = os.read(self._from_agent, 1 << 20)
            except BlockingIOError:
                break
            if not data:
                break
            got = True
            self.raw_received += len(data)
            self.decoder.feed(data)
            if len(data) < 1 << 20:
                break
        for frame in self.decoder:
            self._track(frame)
            self.frames.append(frame)
        return got

    def _track(self, frame: fr.AgentFrame) -> None:
        if isinstance(frame, fr.State):
            self.state = frame
            return
        if isinstance(frame, fr.Output):
            res = self.execs.setdefault(frame.exec_id, ExecResult(frame.exec_id))
            res.chunks.append(fr.Output(frame.exec_id, frame.stream, frame.offset,
                                        memoryview(bytes(frame.data))))
            if self.auto_ack:
                self.send(fr.encode_ack(frame.exec_id, frame.end))
        elif isinstance(frame, fr.Started):
            self.execs.setdefault(frame.exec_id, ExecResult(frame.exec_id)).pid = frame.pid
        elif isinstance(frame, fr.StartFailed):
            self.execs.setdefault(frame.exec_id, ExecResult(frame.exec_id)).start_failed = frame
        elif isinstance(frame, fr.Exit):
            self.execs.setdefault(frame.exec_id, ExecResult(frame.exec_id)).exit = frame
        elif isinstance(frame, fr.StdinAck) and frame.exec_id in self.execs:
            res = self.execs[frame.exec_id]
            res.stdin_consumed = max(res.stdin_consumed, frame.consumed)
        elif isinstance(frame, fr.Error) and frame.ident in self.execs:
            self.execs[frame.ident].errors.append(frame)

    def send(self, data: bytes, timeout: float = DEFAULT_TIMEOUT) -> None:
        """Write data to the agent, reading its output meanwhile (never deadlocks)."""
        view = memoryview(data)
        deadline = time.monotonic() + timeout
        while view:
            try:
                n = os.write(self._to_agent, view)
                view = view[n:]
                continue
            except BlockingIOError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError("the agent does not read its channel")
            r, _, _ = select.select([self._from_agent], [self._to_agent], [], 0.5)
            if self._from_agent in r:
                self._pump(0)

    def poll(self, timeout: float = 0.0) -> None:
        self._pump(timeout)

    def wait(self, cond: Callable[[], T], timeout: float = DEFAULT_TIMEOUT,
             what: str = "condition") -> T:
        """Pump the channel until cond() is truthy."""
        deadline = time.monotonic() + timeout
        while True:
            value = cond()
            if value:
                return value
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"timed out waiting for {what}")
            if self.proc.poll() is not None:
                raise RuntimeError(f"the agent exited ({self.proc.returncode}) while waiting "
                                   f"for {what}")
            self._pump(min(left, 0.1))

    def take(self, kind: type[T], pred: Callable[[T], bool] | None = None,
             timeout: float = DEFAULT_TIMEOUT) -> T:
        """Remove and return the first received frame of kind (matching pred)."""
        found: list[T] = []

        def find() -> bool:
            for i, frame in enumerate(self.frames):
                if isinstance(frame, kind) and (pred is None or pred(frame)):
                    del self.frames[i]
                    found.append(frame)
                    return True
            return False

        self.wait(find, timeout, f"a {kind.__name__} frame")
        return found[0]

    def handshake(self) -> fr.State:
        self.send(fr.encode_hello(self.nonce))
        return self.take(fr.State, lambda s: s.nonce == self.nonce)

    def rehello(self) -> fr.State:
        """A second HELLO on the same stream (as a re-attached daemon would send)."""
        self.nonce = fr.new_nonce()
        self.frames.clear()
        self.send(fr.encode_hello(self.nonce))
        return self.take(fr.State, lambda s: s.nonce == self.nonce)

    # -- execs --

    def new_id(self) -> int:
        self._next_id += 1
        return self._next_id

    def start(self, argv: Sequence[str | bytes], **kwargs: Any) -> int:
        exec_id = kwargs.pop("exec_id", None) or self.new_id()
        self.execs[exec_id] = ExecResult(exec_id)
        self.send(fr.encode_start(exec_id, argv, **kwargs))
        return exec_id

    def wait_exit(self, exec_id: int, timeout: float = DEFAULT_TIMEOUT) -> ExecResult:
        res = self.execs[exec_id]
        self.wait(lambda: res.exit is not None or res.start_failed is not None, timeout,
                  f"exec {exec_id} to exit")
        return res

    def write_stdin(self, exec_id: int, data: bytes, chunk: int = 256 << 10) -> None:
        """Send data as STDIN frames, never more than STDIN_WINDOW past what was consumed."""
        res = self.execs[exec_id]
        view = memoryview(data)
        while view:
            size = min(chunk, len(view))

            def room(size: int = size) -> bool:
                fits = res.stdin_sent + size - res.stdin_consumed <= fr.STDIN_WINDOW
                return fits or res.exit is not None

            self.wait(room, what="stdin window room")
            self.send(fr.encode_stdin(exec_id, bytes(view[:size])))
            res.stdin_sent += size
            view = view[size:]

    def run(self, argv: Sequence[str | bytes], stdin: bytes | None = None,
            timeout: float = DEFAULT_TIMEOUT, release: bool = True,
            **kwargs: Any) -> ExecResult:
        """Start argv, feed stdin, wait for its exit and (by default) release it."""
        exec_id = self.start(argv, stdin=stdin is not None, **kwargs)
        if stdin is not None:
            self.write_stdin(exec_id, stdin)
            self.send(fr.encode_close_stdin(exec_id))
        res = self.wait_exit(exec_id, timeout)
        if release:
            self.send(fr.encode_release(exec_id))
        return res

    def request(self, data: bytes, request_id: int, timeout: float = DEFAULT_TIMEOUT
                ) -> fr.FResult:
        self.send(data)
        return self.take(fr.FResult, lambda f: f.request_id == request_id, timeout)

    # -- ending --

    def close(self) -> None:
        """End the agent and everything it started; AssertionError when anything stays."""
        if self._closed:
            return
        self._closed = True
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        for fd in (self._to_agent, self._from_agent):
            with contextlib.suppress(OSError):
                os.close(fd)
        marker = self.marker
        try:
            wait_until(lambda: not processes_with_marker(marker), 10, "the agent's processes")
        except TimeoutError:
            left = processes_with_marker(marker)
            for pid in left:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            raise AssertionError(f"processes left behind by the agent: {left}") from None

    def __enter__(self) -> Agent:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@contextlib.contextmanager
def running_agent(binary: Path, **kwargs: Any) -> Iterator[Agent]:
    agent = Agent(binary, **kwargs)
    try:
        yield agent
    finally:
        agent.close()
