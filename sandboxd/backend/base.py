"""The container backend interface: everything the services need from a container engine.

Owns the typed contract between the sandbox services and whatever runs the
containers: the backend-neutral description of a sandbox container
(``ContainerSpec``), what the engine reports about one (``ContainerInfo``,
``ContainerSummary``, ``ContainerEvent``), a process started by the engine in
a container (``Process``, ``ProcessStream``), and ``Backend`` itself:
containers (create, start, remove, pause, resume, update, inspect, list,
watch), processes, stats, files and images. The Docker backend
(``sandboxd.backend.docker``) implements it; a second one (Kubernetes, later)
implements the same methods.

Every method raises only ``sandboxd.wire.errors`` classes: ``NotFound`` for a
missing container or image, ``Conflict`` for a state clash or a name in use,
``EngineUnavailable`` when the engine cannot be reached or does not answer,
``EngineError`` when it refuses. Nothing engine-specific (no aiodocker, no
Docker JSON) crosses this interface. This module must not import any backend.
"""

from __future__ import annotations

import builtins
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

STDOUT = 1
STDERR = 2


@dataclass(frozen=True, slots=True)
class ContainerSpec:
    """One sandbox container as the services want it; the backend adds its hardening."""

    name: str
    image: str
    labels: dict[str, str]
    hostname: str
    env: dict[str, str]
    workdir: str
    user: str | None
    memory: int
    cpus: float
    pids: int
    network: str
    readonly_rootfs: bool
    cap_add: tuple[str, ...] = ()
    disk: int = 0  # bytes it may write in all; 0: no limit
    runtime: str | None = None  # the engine's runtime (e.g. "runsc"); None: its default
    workdir_owner: int | None = None  # a uid that must be able to write the workdir
    # The in-sandbox agent (a host path): run as the main process, read-only, reached
    # through ``Backend.attach``. None: an idle main process under the engine's init.
    agent: str | None = None


AGENT_PATH = "/.sandboxd/agent"  # where the agent is inside every sandbox that has one


@dataclass(frozen=True, slots=True)
class ContainerSummary:
    """A container as a listing shows it."""

    id: str
    state: str  # the engine's state: running, paused, exited, created, dead, ...
    labels: dict[str, str]


@dataclass(frozen=True, slots=True)
class ContainerInfo:
    """A container as an inspection shows it."""

    id: str
    state: str
    labels: dict[str, str]
    image: str
    pid: int  # the main process's pid on the host, 0 when it is not running
    started_at: float | None
    exit_code: int | None
    oom_killed: bool
    memory: int
    cpus: float
    pids: int
    network: str
    workdir: str
    user: str = ""  # the user its processes run as ("" for the image's default)


@dataclass(frozen=True, slots=True)
class ContainerEvent:
    """A change the engine reports for one container."""

    action: str  # pause, unpause, die, oom, destroy, start
    container_id: str
    labels: dict[str, str] = field(default_factory=dict)
    exit_code: int | None = None


@dataclass(frozen=True, slots=True)
class ImageInfo:
    """A local image."""

    id: str
    refs: tuple[str, ...]  # its repository:tag names
    size: int
    created: float  # epoch seconds
    labels: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class ProcessSpec:
    """A command to run in a container through the engine."""

    cmd: list[str]
    env: dict[str, str]
    workdir: str | None
    user: str | None
    stdin: bool
    tty: bool = False


class ProcessStream(ABC):
    """The standard streams of a process the engine started.

    Reading applies back-pressure: while nobody reads, the process's output is
    not read either, so a process that writes faster than it is consumed blocks.
    """

    @abstractmethod
    async def read(self) -> tuple[int, bytes] | None:
        """The next piece of output as ``(STDOUT or STDERR, bytes)``; None at the end."""

    @abstractmethod
    async def write(self, data: bytes) -> None:
        """Write to the process's stdin (waits while the engine does not take it)."""

    @abstractmethod
    def close_stdin(self) -> None:
        """End of file on the process's stdin."""

    @abstractmethod
    async def close(self) -> None:
        """Let go of the streams (never raises)."""


class Channel(ABC):
    """Bytes to and from a container's main process: its stdin and its stdout.

    The engine's own framing is removed: ``read`` gives exactly what the main
    process wrote to its stdout. Never half-closed (an engine may drop the whole
    stream when its writing side closes).
    """

    @abstractmethod
    async def read(self) -> bytes | memoryview | None:
        """The next bytes the main process wrote (maybe a view: copy to keep them apart
        from the stream); None when the stream ended."""

    @abstractmethod
    async def write(self, data: bytes) -> None:
        """Write to its stdin; waits while the engine does not take the bytes."""

    @abstractmethod
    def write_nowait(self, data: bytes) -> None:
        """Queue bytes for its stdin without waiting (small frames whose number is bounded
        by their sender); raises ``EngineUnavailable`` when the stream is gone."""

    @abstractmethod
    async def close(self) -> None:
        """Let go of the stream (never raises)."""


class Process(ABC):
    """A process the engine started in a container."""

    stream: ProcessStream

    @abstractmethod
    async def exit_code(self) -> int | None:
        """The exit code once the engine reports the process ended, else None (no wait)."""

    @abstractmethod
    async def wait_exit_code(self) -> int:
        """The process's own exit code, waiting (bounded) for the engine to report it."""

    @abstractmethod
    async def kill_tree(self) -> int:
        """SIGKILL the process and everything it started; how many processes were hit."""


class Backend(ABC):
    """A container engine, as the sandbox services use it."""

    name: str

    @abstractmethod
    async def version(self) -> dict[str, Any]:
        """``{"version": ..., "api_version": ...}`` of the engine."""

    @abstractmethod
    async def close(self) -> None:
        """Release connections; the backend is unusable afterwards."""

    # -- containers ----------------------------------------------------------

    @abstractmethod
    async def create(self, spec: ContainerSpec) -> str:
        """Create (not start) the container; its id. ``Conflict`` when the name is taken."""

    @abstractmethod
    async def start(self, container_id: str) -> None: ...

    @abstractmethod
    async def pause(self, container_id: str) -> None: ...

    @abstractmethod
    async def resume(self, container_id: str) -> None: ...

    @abstractmethod
    async def remove(self, container_id: str) -> bool:
        """Kill and remove at once, no grace; False when it was already gone."""

    @abstractmethod
    async def update_limits(self, container_id: str, memory: int, cpus: float,
                            pids: int) -> None:
        """Change a running container's memory, cpus and pids limits."""
        raise NotImplementedError

    @abstractmethod
    async def kill_now(self, container_id: str) -> bool:
        """Kill the container's processes at once (before ``remove`` deletes it);
        False when that was not possible here (the caller then relies on ``remove``)."""

    @abstractmethod
    async def inspect(self, container_id: str) -> ContainerInfo: ...

    @abstractmethod
    async def list(self, label: str) -> list[ContainerSummary]:
        """Every container (running or not) carrying ``label`` (``key=value``)."""

    @abstractmethod
    def watch(self, label: str, since: float | None = None) -> AsyncIterator[ContainerEvent]:
        """Follow changes of the containers carrying ``label``, from ``since`` (epoch seconds).

        Ends, or raises ``EngineUnavailable``, when the engine goes away; no
        internal queue, so a slow consumer only slows this one stream.
        """

    # -- processes and stats -------------------------------------------------

    @abstractmethod
    async def attach(self, container_id: str) -> Channel:
        """The main process's stdin and stdout (containers made with an ``agent``)."""

    @abstractmethod
    async def exec(self, container_id: str, spec: ProcessSpec) -> Process:
        """Start ``spec`` in the container and return it with its streams open."""

    @abstractmethod
    async def stats(self, container_id: str) -> dict[str, Any]:
        """SPEC §3 ``sandbox.stats`` figures, fast (well under a second)."""

    # -- images --------------------------------------------------------------

    @abstractmethod
    async def images(self) -> builtins.list[ImageInfo]:
        """Every local image."""

    @abstractmethod
    async def image(self, ref: str) -> ImageInfo:
        """One local image by reference or id; ``NotFound`` when it is not here."""

    @abstractmethod
    def pull(self, ref: str) -> AsyncIterator[dict[str, Any]]:
        """Pull ``ref``, yielding progress as the engine reports it (``id``, ``status``,
        ``current``, ``total``); raises ``EngineError`` when the pull fails."""

    @abstractmethod
    async def commit(self, container_id: str, repository: str, tag: str,
                     labels: dict[str, str], pause: bool) -> str:
        """The container's filesystem as a local image ``repository:tag``; its id."""

    @abstractmethod
    async def remove_image(self, ref: str) -> None: ...

    # -- disk ----------------------------------------------------------------

    @abstractmethod
    async def disk_enforcement(self) -> str:
        """``"quota"`` when the engine's storage holds each container's ``disk`` itself,
        ``"measured"`` when the services must measure (``disk_usage``) and act."""

    @abstractmethod
    async def disk_usage(self, container_id: str) -> int:
        """Bytes the container has written (its writable layer and the engine's files)."""

    @abstractmethod
    def free_space(self) -> tuple[int, int] | None:
        """(free, total) bytes where the engine keeps containers; None when not visible."""

    @abstractmethod
    async def main_process_alive(self, container_id: str) -> bool:
        """Whether the container's main process is still alive right now (not ended, not
        a zombie), asked of the host where the engine's view may lag behind."""

    @abstractmethod
    def forget(self, container_id: str) -> None:
        """Drop what is cached about the container (its main process changed or it is gone)."""
