"""The Docker implementation of the container backend interface.

Owns turning ``sandboxd.backend.base`` calls into engine calls (through
``engine``, the only importer of aiodocker), normalising what the engine
reports (inspect, list, events) into the interface's types, and the
Docker-specific parts: the hardened create body, exec processes, stats from
cgroup files. It must not know about owners, policy, deadlines or the wire.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from sandboxd.backend.base import (
    Backend,
    ContainerEvent,
    ContainerInfo,
    ContainerSpec,
    ContainerSummary,
    Process,
    ProcessSpec,
)
from sandboxd.backend.docker.containerspec import container_config
from sandboxd.backend.docker.engine import Engine
from sandboxd.backend.docker.processes import DockerProcess
from sandboxd.backend.docker.proctree import process_alive
from sandboxd.backend.docker.stats import StatsReader
from sandboxd.wire.units import parse_time

FOLLOWED_ACTIONS = ["pause", "unpause", "die", "oom", "destroy", "start"]


def _started_at(state: dict[str, Any]) -> float | None:
    text = state.get("StartedAt")
    if not text or text.startswith("0001-"):
        return None
    try:
        return parse_time(text[:26].rstrip("Z") + "Z")
    except ValueError:
        return None


def container_info(data: dict[str, Any]) -> ContainerInfo:
    """The engine's inspect JSON as a ``ContainerInfo``."""
    state = data.get("State") or {}
    host = data.get("HostConfig") or {}
    config = data.get("Config") or {}
    exit_code = state.get("ExitCode")
    return ContainerInfo(
        id=str(data.get("Id")),
        state=str(state.get("Status") or ""),
        labels=dict(config.get("Labels") or {}),
        image=str(config.get("Image") or data.get("Image") or ""),
        pid=int(state.get("Pid") or 0),
        started_at=_started_at(state),
        exit_code=None if exit_code is None else int(exit_code),
        oom_killed=bool(state.get("OOMKilled")),
        memory=int(host.get("Memory") or 0),
        cpus=float(host.get("NanoCpus") or 0) / 1e9,
        pids=int(host.get("PidsLimit") or 0),
        network=str(host.get("NetworkMode") or "none"),
        workdir=str(config.get("WorkingDir") or "/"),
    )


class DockerBackend(Backend):
    name = "docker"

    def __init__(
        self, url: str | None, *, command: list[str], nofile: int, concurrency: int = 32
    ) -> None:
        self.engine = Engine(url, concurrency=concurrency)
        self._command = list(command)
        self._nofile = nofile
        self._stats = StatsReader(self.engine)

    async def version(self) -> dict[str, Any]:
        version = await self.engine.version()
        return {"version": version.get("Version"), "api_version": version.get("ApiVersion")}

    async def close(self) -> None:
        await self.engine.close()

    # -- containers ----------------------------------------------------------

    async def create(self, spec: ContainerSpec) -> str:
        body = container_config(spec, command=self._command, nofile=self._nofile)
        return await self.engine.create_container(spec.name, body)

    async def start(self, container_id: str) -> None:
        await self.engine.start(container_id)

    async def pause(self, container_id: str) -> None:
        await self.engine.pause(container_id)

    async def resume(self, container_id: str) -> None:
        await self.engine.unpause(container_id)

    async def remove(self, container_id: str) -> bool:
        self._stats.forget(container_id)
        return await self.engine.remove(container_id)

    async def inspect(self, container_id: str) -> ContainerInfo:
        return container_info(await self.engine.inspect(container_id))

    async def list(self, label: str) -> list[ContainerSummary]:
        return [
            ContainerSummary(
                id=str(c.get("Id")), state=str(c.get("State") or ""),
                labels=dict(c.get("Labels") or {}),
            )
            for c in await self.engine.list_labelled(label)
        ]

    async def watch(self, label: str, since: float | None = None) -> AsyncIterator[ContainerEvent]:
        async for event in self.engine.events(label, FOLLOWED_ACTIONS, since=since):
            action = str(event.get("Action") or event.get("status") or "")
            actor = event.get("Actor") or {}
            attrs = dict(actor.get("Attributes") or {})
            exit_code = attrs.get("exitCode")
            try:
                code = None if exit_code is None else int(exit_code)
            except ValueError:
                code = None
            yield ContainerEvent(
                action=action,
                container_id=str(actor.get("ID") or event.get("id") or ""),
                labels=attrs,
                exit_code=code,
            )

    # -- processes and stats -------------------------------------------------

    async def exec(self, container_id: str, spec: ProcessSpec) -> Process:
        return await DockerProcess.start(self.engine, container_id, spec)

    async def stats(self, container_id: str) -> dict[str, Any]:
        return await self._stats.stats(container_id)

    async def main_process_alive(self, container_id: str) -> bool:
        info = await self.inspect(container_id)
        return info.pid > 0 and process_alive(info.pid)

    def forget(self, container_id: str) -> None:
        self._stats.forget(container_id)



