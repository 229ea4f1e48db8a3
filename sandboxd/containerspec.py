"""The Docker container configuration of a sandbox: every hardened default in one place.

Owns the create body sent to the engine (SPEC §4 hardened defaults, §5
labels). Pure: it builds a dict and must not call the engine or decide policy.
"""

from __future__ import annotations

from typing import Any

from .config import Config
from .models import SandboxRecord
from .policy import CreateSpec


def container_config(record: SandboxRecord, spec: CreateSpec, config: Config) -> dict[str, Any]:
    nofile = config.defaults.nofile
    host: dict[str, Any] = {
        "NetworkMode": spec.network,
        "CapDrop": ["ALL"],
        "CapAdd": spec.cap_add or None,
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
        "Entrypoint": list(config.defaults.command),
        "Cmd": None,
        "Env": [f"{k}={v}" for k, v in spec.env.items()],
        "WorkingDir": spec.workdir,
        "Labels": record.container_labels(config.instance),
        "Hostname": f"sandbox-{record.id[:8]}",
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
