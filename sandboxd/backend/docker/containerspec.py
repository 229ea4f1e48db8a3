"""The Docker create body of a sandbox container: every hardened default in one place.

Owns the translation of a backend-neutral ``ContainerSpec`` into the body of
``POST /containers/create`` with the SPEC §4 hardened defaults (no network
unless allowed, every capability dropped, no-new-privileges, limits, an
init, no restart, a log driver that cannot fill the disk). Pure: it builds a
dict and must not call the engine or decide policy.
"""

from __future__ import annotations

from typing import Any

from sandboxd.backend.base import AGENT_PATH, ContainerSpec


def container_config(
    spec: ContainerSpec, *, command: list[str], nofile: int, disk_quota: bool
) -> dict[str, Any]:
    """The create body; ``disk_quota`` when the engine's storage holds ``spec.disk`` itself."""
    ulimits = [{"Name": "nofile", "Soft": nofile, "Hard": nofile}]
    if spec.disk:
        # No one file may outgrow the whole limit, whatever else holds it.
        ulimits.append({"Name": "fsize", "Soft": spec.disk, "Hard": spec.disk})
    host: dict[str, Any] = {
        "NetworkMode": spec.network,
        "CapDrop": ["ALL"],
        "CapAdd": list(spec.cap_add) or None,
        "SecurityOpt": ["no-new-privileges"],
        "Privileged": False,
        "PidsLimit": spec.pids,
        "Memory": spec.memory,
        "MemorySwap": spec.memory,  # equal to Memory: no swap
        "NanoCpus": int(spec.cpus * 1e9),
        "Init": True,
        "Ulimits": ulimits,
        "RestartPolicy": {"Name": "no", "MaximumRetryCount": 0},
        "LogConfig": {"Type": "none", "Config": {}},
        "ReadonlyRootfs": spec.readonly_rootfs,
        "AutoRemove": False,
        "Binds": None,
        "Devices": [],
        "PidMode": "",
        "IpcMode": "private",
        "UTSMode": "",
        "UsernsMode": "",
        "OomKillDisable": False,
    }
    if spec.disk and disk_quota:
        host["StorageOpt"] = {"size": str(spec.disk)}
    if spec.runtime:
        host["Runtime"] = spec.runtime
    if spec.readonly_rootfs:
        owner = spec.workdir_owner
        mine = f",uid={owner},gid={owner},mode=0755" if owner is not None else ""
        host["Tmpfs"] = {
            "/tmp": "rw,nosuid,nodev,size=64m,mode=1777",
            spec.workdir: f"rw,nosuid,nodev,size=256m{mine}",
        }
    body: dict[str, Any] = {
        "Image": spec.image,
        "Entrypoint": list(command),
        "Cmd": None,
        "Env": [f"{k}={v}" for k, v in spec.env.items()],
        "WorkingDir": spec.workdir,
        "Labels": dict(spec.labels),
        "Hostname": spec.hostname,
        "AttachStdin": False,
        "AttachStdout": False,
        "AttachStderr": False,
        "Tty": False,
        "OpenStdin": False,
        "NetworkDisabled": spec.network == "none",
        "StopTimeout": 1,
        "HostConfig": host,
    }
    if spec.user:
        body["User"] = spec.user
    if spec.agent is not None:
        # The agent is the main process and the init (it reaps and supervises), reached
        # over the attach stream: stdin stays open across attaches, output is framed.
        host["Init"] = False
        host["Binds"] = [f"{spec.agent}:{AGENT_PATH}:ro"]
        body.update(
            Entrypoint=[AGENT_PATH],
            AttachStdin=True,
            AttachStdout=True,
            AttachStderr=True,
            OpenStdin=True,
            StdinOnce=False,
        )
    return body
