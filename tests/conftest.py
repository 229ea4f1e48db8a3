"""Shared fixtures: a real Docker Engine, the base image, real daemons, and leak checks.

Every test that touches sandboxes runs against the real engine through a
real ``sandboxd serve`` process. The autouse ``no_leaked_containers``
fixture fails a test that leaves a sandbox container behind (and removes
it), so nothing leaks between tests even when a test fails midway.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import pickle
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import msgpack
import pytest
import pytest_asyncio
from sandboxd_client import SandboxClient
from sandboxd_client.aio import Sandbox

ROOT = Path(__file__).resolve().parent.parent
BASE_IMAGE = "sandboxd/base:latest"
LABEL = "io.sandboxd.id"
# Every daemon of this test session names its containers with this prefix, so parallel
# sessions on one engine never count (or remove) each other's sandboxes.
SESSION = f"test-{os.getpid()}-{int(time.time())}"
_daemon_count = 0
REMOVAL_GRACE = 10.0  # seconds the engine may take to delete a removed sandbox's container


def docker(*args: str, check: bool = True, timeout: float = 60) -> str:
    """Run the docker CLI; its stdout."""
    proc = subprocess.run(["docker", *args], capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise RuntimeError(f"docker {' '.join(args)} failed: {proc.stderr.strip()}")
    return proc.stdout


def docker_inspect(ref: str) -> dict[str, Any]:
    data: list[dict[str, Any]] = json.loads(docker("inspect", ref))
    return data[0]


def not_running(cid: str) -> bool:
    """The container is gone or stopped (a removal kills it before the engine deletes it)."""
    out = docker("inspect", "-f", "{{.State.Running}}", cid, check=False).strip()
    return out in ("", "false")


def wait_deleted(cid: str, within: float = 10.0) -> None:
    """Poll until the engine has deleted the container (a removal finishes in the
    background, just after its reply)."""
    deadline = time.monotonic() + within
    while docker("ps", "-aq", "--filter", f"id={cid}").strip():
        assert time.monotonic() < deadline, f"container {cid[:12]} still there after {within} s"
        time.sleep(0.05)


async def eventually(probe: Callable[[], Awaitable[bool]], within: float = 30.0,
                     what: str = "the condition", interval: float = 0.05) -> float:
    """Poll ``probe`` until it is true; the seconds it took. Fails after ``within``."""
    start = time.monotonic()
    while not await probe():
        if time.monotonic() - start > within:
            pytest.fail(f"{what} did not happen within {within:g} s")
        await asyncio.sleep(interval)
    return time.monotonic() - start


def local_refs(token: str) -> list[str]:
    """Every local image reference that holds ``token``."""
    out = docker("images", "--format", "{{.Repository}}:{{.Tag}}", check=False)
    return [ref for ref in out.split() if token in ref]


def remove_images(refs: list[str], within: float = REMOVAL_GRACE) -> None:
    """Delete these images by id (every tag), once no container uses them any more.

    A removed sandbox's container is deleted just after the reply, in the
    background; deleting its image before would only untag it (a dangling
    image left behind).
    """
    ids = {docker("image", "inspect", "-f", "{{.Id}}", ref, check=False).strip() for ref in refs}
    ids.discard("")
    deadline = time.monotonic() + within
    for image_id in ids:
        while (docker("ps", "-aq", "--filter", f"ancestor={image_id}", check=False).strip()
               and time.monotonic() < deadline):
            time.sleep(0.1)
        docker("rmi", "-f", image_id, check=False)


def labelled_containers() -> set[str]:
    """This session's sandbox containers."""
    out = docker("ps", "-a", "--no-trunc", "--filter", f"label={LABEL}",
                 "--format", '{{.ID}} {{.Label "io.sandboxd.instance"}}')
    found = set()
    for line in out.splitlines():
        cid, _, instance = line.partition(" ")
        if instance.startswith(SESSION + "-"):
            found.add(cid)
    return found


def _engine_up() -> bool:
    try:
        return subprocess.run(["docker", "info"], capture_output=True, timeout=20).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def _ensure_engine() -> None:
    if _engine_up():
        return
    if shutil.which("dockerd") is None:
        pytest.exit("dockerd is not installed: run scripts/setup.sh first", returncode=3)
    log = open("/var/log/sandboxd-test-dockerd.log", "ab")
    subprocess.Popen(["dockerd"], stdout=log, stderr=log, start_new_session=True)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if _engine_up():
            return
        time.sleep(0.5)
    pytest.exit("dockerd did not come up within 60 s", returncode=3)


def _ensure_image() -> None:
    if subprocess.run(["docker", "image", "inspect", BASE_IMAGE], capture_output=True).returncode:
        subprocess.run(["bash", str(ROOT / "scripts" / "build-base-image.sh")], check=True)


@pytest.fixture(scope="session")
def engine() -> None:
    """A running Docker Engine with the base image, for the whole session."""
    _ensure_engine()
    _ensure_image()


def wait_for_socket(path: str, proc: subprocess.Popen[bytes] | None, timeout: float = 20) -> None:
    """Poll until a daemon answers daemon.ping at ``path``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"the daemon exited early with status {proc.returncode}")
        try:
            if raw_call(path, "daemon.ping", timeout=2) == [1, 1, None, "pong"]:
                return
        except OSError:
            pass
        time.sleep(0.05)
    raise RuntimeError(f"no daemon answered on {path} within {timeout} s")


def call_on(sock: socket.socket, request: list[Any], within: float = 10) -> Any:
    """Send one msgpack-RPC request on ``sock`` and read the first message back."""
    sock.settimeout(within)
    sock.sendall(msgpack.packb(request, use_bin_type=True))
    unpacker = msgpack.Unpacker(raw=False)
    while True:
        data = sock.recv(65536)
        if not data:
            raise ConnectionError("the daemon closed the connection without an answer")
        unpacker.feed(data)
        for obj in unpacker:
            return obj


def raw_call(path: str, method: str, params: list[Any] | None = None, timeout: float = 10) -> Any:
    """One msgpack-RPC request over a fresh connection; the raw response array."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(path)
        return call_on(sock, [0, 1, method, params or []], timeout)


class Daemon:
    """A ``sandboxd serve`` process with its own socket and state directory."""

    def __init__(self, workdir: Path, config: str = "", env: dict[str, str] | None = None,
                 args: list[str] | None = None) -> None:
        self.workdir = workdir
        self.socket = str(workdir / "sandboxd.sock")
        self.state_dir = str(workdir / "state")
        self.log_path = workdir / "daemon.log"
        self.config_path = workdir / "config.toml"
        self.config_path.write_text(config)
        global _daemon_count
        _daemon_count += 1
        self.instance = f"{SESSION}-{_daemon_count}"
        self.env = {**os.environ, "SANDBOXD_STATE_DIR": self.state_dir,
                    "SANDBOXD_INSTANCE": self.instance, **(env or {})}
        self.env.pop("SANDBOXD_SOCKET", None)
        self.env.pop("NOTIFY_SOCKET", None)
        self.args = args or []
        self.proc: subprocess.Popen[bytes] | None = None

    def command(self) -> list[str]:
        return [sys.executable, "-m", "sandboxd", "serve", "--socket", self.socket,
                "--config", str(self.config_path), *self.args]

    def start(self, wait: bool = True) -> Daemon:
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT,
                                     env=self.env, cwd=str(ROOT))
        log.close()
        if wait:
            try:
                wait_for_socket(self.socket, self.proc)
            except RuntimeError as exc:
                raise RuntimeError(f"{exc}\n--- daemon log ---\n{self.log()}") from None
        return self

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        """Signal the daemon and wait; its exit status."""
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def log_events(self) -> list[dict[str, Any]]:
        out = []
        for line in self.log().splitlines():
            with contextlib.suppress(ValueError):
                out.append(json.loads(line))
        return out


def reachable(d: Daemon) -> Daemon:
    """Let other uids reach the daemon's socket (its directory is a private temp dir)."""
    os.chmod(d.workdir, 0o755)
    return d


def run_as(uid: int, fn: Callable[..., Any], *args: Any) -> Any:
    """Run ``fn(*args)`` in a forked child as ``uid`` (group root: the socket is 0660
    root:root, so it connects yet is no admin) and return what it returned."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: plain sockets only, then leave at once
        code = 0
        try:
            os.close(read_end)
            os.setgroups([])
            os.setgid(0)
            os.setuid(uid)
            data = pickle.dumps(("ok", fn(*args)))
        except BaseException as exc:  # reported to the parent, which fails the test
            data = pickle.dumps(("error", repr(exc)))
            code = 1
        with os.fdopen(write_end, "wb") as out:
            out.write(data)
        os._exit(code)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as inp:
        data = inp.read()
    os.waitpid(pid, 0)
    kind, value = pickle.loads(data)
    assert kind == "ok", value
    return value


@contextlib.contextmanager
def started_daemon(config: str = "", prefix: str = "sbd-") -> Iterator[Daemon]:
    """A daemon in a fresh directory under /tmp (short enough for its socket's path),
    stopped and its directory removed afterwards."""
    workdir = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    d = Daemon(workdir, config).start()
    try:
        yield d
    finally:
        d.stop()
        shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture(scope="session")
def daemon(engine: None) -> Iterator[Daemon]:
    """The session's shared daemon."""
    with started_daemon(prefix="sandboxd-test-") as d:
        yield d


@pytest.fixture
def spawn_daemon(engine: None) -> Iterator[Callable[..., Daemon]]:
    """Start extra daemons (own config, env or flags); all are stopped afterwards."""
    started: list[Daemon] = []

    def spawn(config: str = "", env: dict[str, str] | None = None,
              args: list[str] | None = None, wait: bool = True) -> Daemon:
        workdir = Path(tempfile.mkdtemp(prefix="sbd-", dir="/tmp"))  # short path for the socket
        d = Daemon(workdir, config, env, args)
        started.append(d)
        return d.start(wait=wait)

    yield spawn
    for d in started:
        with contextlib.suppress(Exception):
            d.stop(signal.SIGTERM, timeout=20)  # finishes the deletions under way
        with contextlib.suppress(Exception):
            d.stop(signal.SIGKILL)
        # A daemon's warm-pool members outlive it (adopted at its next start): not a
        # test's leak, but gone with its daemon here.
        members = docker("ps", "-aq", "--filter", f"label=io.sandboxd.instance={d.instance}",
                         "--filter", "label=io.sandboxd.pool", check=False).split()
        if members:
            docker("rm", "-f", *members, check=False)
        shutil.rmtree(d.workdir, ignore_errors=True)


@pytest.fixture(autouse=True)
def no_leaked_containers(request: pytest.FixtureRequest) -> Iterator[None]:
    """Fail (and clean up after) a test that leaves sandbox containers behind.

    Every test gets the engine and this check, except those marked ``pure``.
    """
    if request.node.get_closest_marker("pure") is not None:
        yield
        return
    request.getfixturevalue("engine")
    before = labelled_containers()
    yield
    # A removal answers once the sandbox is gone for its user; the engine deletes the
    # container just after, in the background: give that a moment before calling it a leak.
    deadline = time.monotonic() + REMOVAL_GRACE
    while (leaked := labelled_containers() - before) and time.monotonic() < deadline:
        time.sleep(0.05)
    if leaked:
        docker("rm", "-f", *leaked, check=False)
        pytest.fail(f"test left {len(leaked)} sandbox container(s) behind: {sorted(leaked)}")


@pytest_asyncio.fixture
async def client(daemon: Daemon) -> AsyncIterator[SandboxClient]:
    async with SandboxClient(daemon.socket) as c:
        yield c


MakeSandbox = Callable[..., Awaitable[Sandbox]]


@pytest_asyncio.fixture
async def make_sandbox(daemon: Daemon) -> AsyncIterator[MakeSandbox]:
    """Create sandboxes through the daemon; every one is removed afterwards."""
    made: list[str] = []
    async with SandboxClient(daemon.socket) as owner:

        async def make(client: SandboxClient | None = None, **kwargs: Any) -> Sandbox:
            kwargs.setdefault("ttl", 300)
            sb = await (client or owner).create(**kwargs)
            made.append(sb.id)
            return sb

        yield make
        for sid in made:
            with contextlib.suppress(Exception):
                await owner.remove(sid)


# -- the agent's own tests (tests/agent): the binary and a local agent ----------------


@pytest.fixture(scope="session")
def agent_bin() -> Path:
    """The agent binary for this machine, built (when stale) from the sources.

    SANDBOXD_AGENT_BIN runs the tests against another build (e.g. one with sanitizers).
    """
    from sandboxd.agent import build

    if os.environ.get("SANDBOXD_AGENT_BIN"):
        return Path(os.environ["SANDBOXD_AGENT_BIN"])
    try:
        return build.build()
    except build.BuildError as exc:
        pytest.fail(str(exc), pytrace=False)


@pytest.fixture
def agent(agent_bin: Path) -> Iterator[Any]:
    """A local agent (an ordinary subprocess, not PID 1) after its handshake; it is ended
    afterwards and the test fails if anything it started is left over."""
    sys.path.insert(0, str(ROOT / "tests" / "agent"))
    from agentproc import Agent

    a = Agent(agent_bin)
    try:
        a.handshake()
        yield a
    finally:
        a.close()
