"""The Docker implementation of the container backend interface.

Owns turning ``sandboxd.backend.base`` calls into engine calls (through
``engine``, the only importer of aiodocker), normalising what the engine
reports (inspect, list, events) into the interface's types, and the
Docker-specific parts: the hardened create body, exec processes, stats from
cgroup files. It must not know about owners, policy, deadlines or the wire.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import io
import tarfile
from collections.abc import AsyncIterator
from typing import Any

import structlog

from sandboxd.backend.base import (
    Backend,
    Channel,
    ContainerEvent,
    ContainerInfo,
    ContainerSpec,
    ContainerSummary,
    ImageInfo,
    Process,
    ProcessSpec,
)
from sandboxd.backend.docker import disk
from sandboxd.backend.docker.channel import DockerChannel
from sandboxd.backend.docker.containerspec import container_config
from sandboxd.backend.docker.engine import Engine
from sandboxd.backend.docker.processes import DockerProcess
from sandboxd.backend.docker.proctree import kill_container_init, process_alive
from sandboxd.backend.docker.stats import StatsReader
from sandboxd.wire.errors import Conflict, EngineError, NotFound, SandboxdError
from sandboxd.wire.units import parse_time

FOLLOWED_ACTIONS = ["pause", "unpause", "die", "oom", "destroy", "start"]

log = structlog.get_logger("sandboxd.backend.docker")


def _directory_tar(path: str, owner: int) -> bytes:
    """A tar of ``path``'s directories, the last one owned by ``owner`` (mode 0755)."""
    buf = io.BytesIO()
    parts = [p for p in path.strip("/").split("/") if p]
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for depth in range(1, len(parts) + 1):
            entry = tarfile.TarInfo("/".join(parts[:depth]))
            entry.type = tarfile.DIRTYPE
            entry.mode = 0o755
            if depth == len(parts):
                entry.uid = entry.gid = owner
            tar.addfile(entry)
    return buf.getvalue()


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
        user=str(config.get("User") or ""),
    )


class DockerBackend(Backend):
    name = "docker"

    def __init__(
        self,
        url: str | None,
        *,
        command: list[str],
        nofile: int,
        concurrency: int = 32,
        disk_enforcement: str = "auto",
    ) -> None:
        self.engine = Engine(url, concurrency=concurrency)
        self._command = list(command)
        self._nofile = nofile
        self._stats = StatsReader(self.engine)
        self._disk_setting = disk_enforcement  # auto, quota or measured
        self._disk_mode: str | None = None if disk_enforcement == "auto" else disk_enforcement
        self._data_root: str | None = None
        self._layouts: dict[str, disk.Layout] = {}
        self._workdir_ok: dict[tuple[str, str], bool] = {}  # (image, workdir): writable by all
        self._pids: dict[str, int] = {}  # container id -> its main process's host pid
        self._learning: set[asyncio.Task[None]] = set()

    async def version(self) -> dict[str, Any]:
        version = await self.engine.version()
        return {"version": version.get("Version"), "api_version": version.get("ApiVersion")}

    async def close(self) -> None:
        await self.engine.close()

    # -- containers ----------------------------------------------------------

    async def create(self, spec: ContainerSpec) -> str:
        quota = await self.disk_enforcement() == disk.QUOTA
        body = container_config(spec, command=self._command, nofile=self._nofile,
                                disk_quota=quota)
        try:
            cid = await self.engine.create_container(spec.name, body)
        except EngineError as exc:
            if not (quota and disk.REFUSAL in exc.message and self._disk_setting == "auto"):
                raise
            # The storage has no quota after all (overlay2 on xfs without pquota).
            log.warning("disk_quota_unavailable", engine_message=exc.message)
            self._disk_mode = disk.MEASURED
            return await self.create(spec)
        if spec.workdir_owner is not None and not spec.readonly_rootfs:
            await self._own_workdir(cid, spec)
        return cid

    async def _own_workdir(self, cid: str, spec: ContainerSpec) -> None:
        """Make the workdir writable for a non-root sandbox where the image does not.

        Most images leave it to root (or do not have it: the engine then makes it,
        root's, at start); a directory entry owned by the sandbox's uid is copied in
        before the start. Asked once per image and workdir.
        """
        key = (spec.image, spec.workdir)
        if key not in self._workdir_ok:
            mode = await self.engine.path_mode(cid, spec.workdir)
            self._workdir_ok[key] = mode is not None and bool(mode & 0o002)
        if self._workdir_ok[key]:
            return
        owner = spec.workdir_owner
        assert owner is not None
        await self.engine.put_archive(cid, "/", _directory_tar(spec.workdir, owner))

    async def start(self, container_id: str) -> None:
        await self.engine.start(container_id)
        # Learn its main process's pid now, in the background, so a removal can kill it
        # from the host at once instead of asking the engine.
        task = asyncio.get_running_loop().create_task(self._learn_pid(container_id))
        self._learning.add(task)
        task.add_done_callback(self._learning.discard)

    async def _learn_pid(self, container_id: str) -> None:
        with contextlib.suppress(SandboxdError):
            await self.inspect(container_id)

    async def update_limits(self, container_id: str, memory: int, cpus: float,
                            pids: int) -> None:
        await self.engine.update_limits(container_id, memory, cpus, pids)

    async def kill_now(self, container_id: str) -> bool:
        pid = self._pids.get(container_id)
        if pid is None:
            try:
                pid = (await self.inspect(container_id)).pid
            except SandboxdError:
                return False
        # pidfd_open, a read of /proc/<pid>/cgroup and pidfd_send_signal: microseconds,
        # done here (a thread would queue behind others when many removals come at once).
        if pid > 0 and kill_container_init(pid, container_id):
            return True
        try:
            await self.engine.kill(container_id)
        except (Conflict, NotFound):
            return True  # not running, or gone: nothing left to kill
        return True

    async def pause(self, container_id: str) -> None:
        await self.engine.pause(container_id)

    async def resume(self, container_id: str) -> None:
        await self.engine.unpause(container_id)

    async def remove(self, container_id: str) -> bool:
        self.forget(container_id)
        return await self.engine.remove(container_id)

    async def inspect(self, container_id: str) -> ContainerInfo:
        info = container_info(await self.engine.inspect(container_id))
        if info.pid > 0:
            self._pids[info.id] = info.pid
        return info

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

    async def attach(self, container_id: str) -> Channel:
        return DockerChannel(await self.engine.attach(container_id))

    async def exec(self, container_id: str, spec: ProcessSpec) -> Process:
        return await DockerProcess.start(self.engine, container_id, spec)

    async def stats(self, container_id: str) -> dict[str, Any]:
        return await self._stats.stats(container_id)

    # -- disk ----------------------------------------------------------------

    async def _engine_info(self) -> dict[str, Any]:
        info = await self.engine.info()
        self._data_root = str(info.get("DockerRootDir") or "") or None
        return info

    async def disk_enforcement(self) -> str:
        if self._disk_mode is None:
            self._disk_mode = disk.enforcement_from_info(await self._engine_info())
        return self._disk_mode

    async def disk_usage(self, container_id: str) -> int:
        layout = self._layouts.get(container_id)
        if layout is None:
            layout = disk.layout_from_inspect(await self.engine.inspect(container_id))
            self._layouts[container_id] = layout
        return await asyncio.to_thread(disk.usage, layout)

    def free_space(self) -> tuple[int, int] | None:
        return disk.free_space(self._data_root) if self._data_root else None

    async def main_process_alive(self, container_id: str) -> bool:
        info = await self.inspect(container_id)
        return info.pid > 0 and process_alive(info.pid)

    def forget(self, container_id: str) -> None:
        self._stats.forget(container_id)
        self._layouts.pop(container_id, None)
        self._pids.pop(container_id, None)

    # -- images --------------------------------------------------------------

    async def images(self) -> builtins.list[ImageInfo]:
        return [
            ImageInfo(
                id=str(i.get("Id")),
                refs=tuple(t for t in i.get("RepoTags") or () if t != "<none>:<none>"),
                size=int(i.get("Size") or 0),
                created=float(i.get("Created") or 0),
                labels=dict(i.get("Labels") or {}),
            )
            for i in await self.engine.images()
        ]

    async def image(self, ref: str) -> ImageInfo:
        data = await self.engine.image_inspect(ref)
        created = _started_at({"StartedAt": data.get("Created")}) or 0.0
        return ImageInfo(
            id=str(data.get("Id")),
            refs=tuple(data.get("RepoTags") or ()),
            size=int(data.get("Size") or 0),
            created=created,
            labels=dict((data.get("Config") or {}).get("Labels") or {}),
        )

    async def pull(self, ref: str) -> AsyncIterator[dict[str, Any]]:
        async for line in self.engine.pull(ref):
            if line.get("error"):  # the engine reports a failed pull inside its stream
                raise EngineError(f"Pulling {ref!r} failed: {str(line['error'])[:300]}",
                                  {"image": ref})
            detail = line.get("progressDetail") or {}
            yield {
                "id": line.get("id"),
                "status": line.get("status"),
                "current": detail.get("current"),
                "total": detail.get("total"),
            }

    async def commit(self, container_id: str, repository: str, tag: str,
                     labels: dict[str, str], pause: bool) -> str:
        return await self.engine.commit(container_id, repository, tag, labels, pause)

    async def remove_image(self, ref: str) -> None:
        await self.engine.image_remove(ref)



