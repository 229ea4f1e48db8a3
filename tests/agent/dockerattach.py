"""The agent as PID 1 of a real container, reached through the Engine API's attach stream.

A minimal stand-in for the daemon's transport, for the Docker tests and the benchmark:
``docker run`` with the agent bind-mounted as the entrypoint (the flags PROTOCOL.md names),
``POST /containers/{id}/attach`` over /var/run/docker.sock (hijacked, Tty false, so the
engine's 8-byte stream headers are removed here), and sandboxd.agent.frames on top.
"""

from __future__ import annotations

import contextlib
import select
import socket
import subprocess
import time
from collections import deque
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

from sandboxd.agent import frames as fr

T = TypeVar("T")
DOCKER_SOCK = "/var/run/docker.sock"
AGENT_PATH = "/.sandboxd/agent"


def docker(*args: str, check: bool = True, timeout: float = 60) -> str:
    proc = subprocess.run(["docker", *args], capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise RuntimeError(f"docker {' '.join(args)}: {proc.stderr.strip()}")
    return proc.stdout.strip()


def run_agent_container(binary: Path, image: str, name: str,
                        extra_mounts: tuple[tuple[Path, str], ...] = ()) -> str:
    """Start a container whose PID 1 is the agent; its id."""
    mounts = [f"--volume={binary}:{AGENT_PATH}:ro"]
    mounts += [f"--volume={src}:{dst}:ro" for src, dst in extra_mounts]
    return docker("run", "-d", "-i", "--init=false", f"--name={name}", "--network=none",
                  "--cap-drop=ALL", "--security-opt=no-new-privileges", "--user=65534:65534",
                  "--log-driver=none", *mounts, f"--entrypoint={AGENT_PATH}", image)


class Attach:
    """One attach connection to a container running the agent."""

    def __init__(self, container: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(DOCKER_SOCK)
        self.sock.sendall(
            f"POST /containers/{container}/attach?stream=1&stdin=1&stdout=1&stderr=1 "
            "HTTP/1.1\r\nHost: docker\r\nConnection: Upgrade\r\nUpgrade: tcp\r\n"
            "Content-Length: 0\r\n\r\n".encode())
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = self.sock.recv(4096)
            if not chunk:
                raise ConnectionError("the engine closed the attach connection")
            head += chunk
        status, _, rest = head.partition(b"\r\n\r\n")
        if b" 101 " not in status.split(b"\r\n")[0] and b" 200 " not in status.split(b"\r\n")[0]:
            raise ConnectionError(f"attach failed: {status!r}")
        self.nonce = fr.new_nonce()
        self.decoder = fr.Decoder(self.nonce)
        self.frames: deque[fr.AgentFrame] = deque()
        self.stderr = bytearray()
        self.received = 0
        self._head = bytearray()  # a stream header cut by a read
        self._left = 0  # payload bytes of the current stream frame still to come
        self._kind = 0
        self._demux(bytes(rest))
        self.sock.setblocking(False)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()

    def send(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            try:
                view = view[self.sock.send(view):]
            except BlockingIOError:
                select.select([], [self.sock], [], 1)

    def _demux(self, data: bytes) -> None:
        """Strip the engine's 8-byte stream headers; stdout payloads go to the decoder as
        zero-copy slices of data."""
        view = memoryview(data)
        at = 0
        while at < len(view):
            if self._left == 0:
                need = 8 - len(self._head)
                self._head += view[at:at + need]
                at += min(need, len(view) - at)
                if len(self._head) == 8:
                    self._kind = self._head[0]
                    self._left = int.from_bytes(self._head[4:8], "big")
                    self._head.clear()
                continue
            take = min(self._left, len(view) - at)
            if self._kind == 1:
                self.decoder.feed(view[at:at + take])
            else:
                self.stderr += view[at:at + take]
            self._left -= take
            at += take
        for frame in self.decoder:
            self.frames.append(frame)

    def pump(self, timeout: float) -> None:
        r, _, _ = select.select([self.sock], [], [], timeout)
        if not r:
            return
        while True:
            try:
                data = self.sock.recv(1 << 20)
            except BlockingIOError:
                break
            if not data:
                raise ConnectionError("the attach stream ended")
            self.received += len(data)
            self._demux(data)
            if len(data) < 1 << 20:
                break

    def take(self, kind: type[T], pred: Callable[[T], bool] | None = None,
             timeout: float = 10) -> T:
        deadline = time.monotonic() + timeout
        while True:
            for i, frame in enumerate(self.frames):
                if isinstance(frame, kind) and (pred is None or pred(frame)):
                    del self.frames[i]
                    return frame
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no {kind.__name__} frame within {timeout} s")
            self.pump(min(left, 0.1))

    def handshake(self, timeout: float = 10) -> fr.State:
        """HELLO (re-sent every 500 ms, new nonce each time) until the matching STATE."""
        deadline = time.monotonic() + timeout
        while True:
            self.send(fr.encode_hello(self.nonce))
            try:
                return self.take(fr.State, lambda s: s.nonce == self.nonce, timeout=0.5)
            except TimeoutError:
                if time.monotonic() > deadline:
                    raise
                self.nonce = fr.new_nonce()
                self.decoder.expect(self.nonce)

    def run(self, exec_id: int, argv: list[str], timeout: float = 20, **kwargs: object
            ) -> tuple[fr.Exit, bytes, bytes]:
        """START, collect output (acking it), wait for EXIT, RELEASE."""
        self.send(fr.encode_start(exec_id, argv, **kwargs))  # type: ignore[arg-type]
        out: dict[int, bytearray] = {fr.STDOUT: bytearray(), fr.STDERR: bytearray()}
        deadline = time.monotonic() + timeout
        while True:
            for i, frame in enumerate(self.frames):
                if getattr(frame, "exec_id", None) == exec_id:
                    del self.frames[i]
                    break
            else:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"exec {exec_id} did not exit")
                self.pump(0.1)
                continue
            if isinstance(frame, fr.Output):
                out[frame.stream] += frame.data
                self.send(fr.encode_ack(exec_id, frame.end))
            elif isinstance(frame, fr.Exit):
                self.send(fr.encode_release(exec_id))
                return frame, bytes(out[fr.STDOUT]), bytes(out[fr.STDERR])
            elif isinstance(frame, fr.StartFailed):
                raise RuntimeError(f"START_FAILED: {frame}")


@contextlib.contextmanager
def agent_container(binary: Path, image: str, name: str,
                    extra_mounts: tuple[tuple[Path, str], ...] = ()) -> Iterator[str]:
    cid = run_agent_container(binary, image, name, extra_mounts)
    try:
        yield cid
    finally:
        docker("rm", "-f", cid, check=False)
