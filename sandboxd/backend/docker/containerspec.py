"""The Docker create body of a sandbox container: every hardened default in one place.

Owns the translation of a backend-neutral ``ContainerSpec`` into the body of
``POST /containers/create`` with the SPEC §4 hardened defaults (no network
unless allowed, every capability dropped, no-new-privileges, limits, an
init, no restart, a log driver that cannot fill the disk). Pure: it builds a
dict and must not call the engine or decide policy.
"""

from __future__ import annotations

from typing import Any

from sandboxd.backend.base import ContainerSpec


def container_config(spec: ContainerSpec, *, command: list[str], nofile: int) -> dict[str, Any]:
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
        "Ulimits": [{"Name": "nofile", "Soft": nofile, "Hard": nofile}],
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
    if spec.readonly_rootfs:
        host["Tmpfs"] = {
            "/tmp": "rw,nosuid,nodev,size=64m",
            spec.workdir: "rw,nosuid,nodev,size=256m",
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
    return body
