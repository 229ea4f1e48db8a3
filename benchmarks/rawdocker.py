"""The raw side of the benchmarks: the same work done straight through aiodocker.

What a client without sandboxd does against the same Docker Engine, the baseline
``bench_ops``, ``bench_exec`` and ``bench_pool`` compare the daemon with: a container
made with the hardened create body sandboxd sends (SPEC §4) that only sleeps
(``raw_container_config``), a buffered exec in it (exec create, start read to EOF,
exec inspect until the exit code) and a forced delete. ``RawContainers`` makes, execs
in and deletes such containers and keeps the ids of those alive, so that a benchmark
can remove them whatever happens; every one carries ``io.sandboxd.bench=1`` and the
run's ``io.sandboxd.bench.run`` label.
"""

from __future__ import annotations

import asyncio
from typing import Any

import aiodocker
from aiodocker.execs import Exec

from .common import IMAGE

MIB = 1024 * 1024
BENCH_LABEL = "io.sandboxd.bench"
RUN_LABEL = "io.sandboxd.bench.run"
MEMORY = 512 * MIB  # sandboxd's default memory, cpus, pids, nofile, workdir
CPUS = 1.0
PIDS = 256
NOFILE = 1024
WORKDIR = "/workspace"
# Exec exit-code polling: an immediate check, then backing off.
EXIT_POLL_DELAYS = (0.0, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2)


def raw_container_config(run_id: str, index: int) -> dict[str, Any]:
    """The hardened create body sandboxd sends (SPEC §4), for the raw side."""
    return {
        "Image": IMAGE,
        "Entrypoint": ["sleep", "infinity"],
        "Cmd": None,
        "Env": [],
        "WorkingDir": WORKDIR,
        "Labels": {BENCH_LABEL: "1", RUN_LABEL: run_id},
        "Hostname": f"bench-{index}",
        "AttachStdin": False,
        "AttachStdout": False,
        "AttachStderr": False,
        "Tty": False,
        "OpenStdin": False,
        "NetworkDisabled": True,
        "StopTimeout": 1,
        "HostConfig": {
            "NetworkMode": "none",
            "CapDrop": ["ALL"],
            "SecurityOpt": ["no-new-privileges"],
            "Privileged": False,
            "PidsLimit": PIDS,
            "Memory": MEMORY,
            "MemorySwap": MEMORY,
            "NanoCpus": int(CPUS * 1e9),
            "Init": True,
            "Ulimits": [{"Name": "nofile", "Soft": NOFILE, "Hard": NOFILE}],
            "RestartPolicy": {"Name": "no", "MaximumRetryCount": 0},
            "LogConfig": {"Type": "none", "Config": {}},
            "ReadonlyRootfs": False,
            "AutoRemove": False,
            "IpcMode": "private",
        },
    }


async def wait_exit(execution: Exec) -> dict[str, Any]:
    """Exec inspect until the engine reports an exit code: the last inspect."""
    attempt = 0
    while True:
        info: dict[str, Any] = await execution.inspect()
        if not info.get("Running") and info.get("ExitCode") is not None:
            return info
        await asyncio.sleep(EXIT_POLL_DELAYS[min(attempt, len(EXIT_POLL_DELAYS) - 1)])
        attempt += 1


class RawContainers:
    """This run's raw containers: made, exec'd in and deleted through aiodocker.

    ``ids`` holds the containers made and not yet deleted (recorded before their
    start, so a failed start is cleaned up too). ``docker`` may be set later, once an
    event loop runs.
    """

    def __init__(self, run_id: str, docker: aiodocker.Docker | None = None) -> None:
        self.run_id = run_id
        self.docker = docker
        self.ids: set[str] = set()
        self._index = 0

    @property
    def d(self) -> aiodocker.Docker:
        assert self.docker is not None
        return self.docker

    async def create(self) -> str:
        """Create and start one container: its id."""
        self._index += 1
        container = await self.d.containers.create(
            raw_container_config(self.run_id, self._index),
            name=f"bench-{self.run_id}-{self._index}",
        )
        self.ids.add(container.id)
        await container.start()
        return container.id

    async def exec(
        self, cid: str, cmd: list[str], expect: int | None = None, keep: bool = True
    ) -> None:
        """What a correct aiodocker client does for a buffered exec: the output read to
        EOF (kept in memory, or only counted), then the exit code. An error unless it is
        0 and (with ``expect``) that many bytes came out."""
        execution = await self.d.containers.container(cid).exec(cmd)
        chunks: list[bytes] = []
        size = 0
        async with execution.start(detach=False) as stream:
            while (msg := await stream.read_out()) is not None:
                size += len(msg.data)
                if keep:
                    chunks.append(msg.data)
        info = await wait_exit(execution)
        if info["ExitCode"] != 0 or (expect is not None and size != expect):
            got = "" if expect is None else f", {size} bytes"
            raise RuntimeError(f"raw exec {cmd}: exit {info['ExitCode']}{got}")

    async def remove(self, cid: str) -> None:
        """``DELETE /containers/{id}?force=true&v=true``: gone at its reply."""
        async with self.d._query(
            f"containers/{cid}", method="DELETE", params={"force": "true", "v": "true"}
        ):
            pass
        self.ids.discard(cid)
