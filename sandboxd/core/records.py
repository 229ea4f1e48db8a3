"""The daemon's record of one sandbox, its labels and its wire form (SPEC §3 Sandbox, §5).

Owns the fields the daemon keeps per sandbox, the caller identity and its one
ownership rule, the container labels that carry a record (SPEC §5) in both
directions (``container_labels`` and ``record_from_labels``), and
``to_wire``. Pure data: no engine calls, no policy, no I/O.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from sandboxd.wire.units import format_time, parse_time

LABEL_ID = "io.sandboxd.id"
LABEL_NAME = "io.sandboxd.name"
LABEL_OWNER = "io.sandboxd.owner"
LABEL_CREATED_AT = "io.sandboxd.created_at"
LABEL_INSTANCE = "io.sandboxd.instance"
# The deadline and idle timeout as created; later changes live in the state directory.
LABEL_EXPIRES_AT = "io.sandboxd.expires_at"
LABEL_IDLE_TIMEOUT = "io.sandboxd.idle_timeout"
LABEL_USER_PREFIX = "io.sandboxd.label."
LABEL_UID = "io.sandboxd.uid"  # the sandbox's own unprivileged uid
LABEL_DISK = "io.sandboxd.disk"
LABEL_AGENT = "io.sandboxd.agent"  # "1": the sandbox's main process is the agent
LABEL_POOL = "io.sandboxd.pool"  # a warm-pool member: its pool's name (no owner)
# On images made by sandbox.snapshot:
LABEL_SNAPSHOT_OWNER = "io.sandboxd.snapshot.owner"  # the uid the snapshot belongs to
LABEL_SNAPSHOT_OF = "io.sandboxd.snapshot.of"  # the sandbox it was made of
LABEL_SNAPSHOT_UID = "io.sandboxd.snapshot.uid"  # the sandbox uid whose files it holds
SNAPSHOT_LABELS = "io.sandboxd.snapshot."
SANDBOX_LABELS = "io.sandboxd."
CONTAINER_PREFIX = "sandboxd-"


def container_name(sandbox_id: str) -> str:
    return f"{CONTAINER_PREFIX}{sandbox_id}"


@dataclass(frozen=True, slots=True)
class Caller:
    """Who is on the other end of a connection (from SO_PEERCRED)."""

    uid: int
    gid: int
    pid: int
    admin: bool

    def sees(self, owner_uid: int | None) -> bool:
        """The one ownership rule (SPEC §4): admins see everything, anyone sees what
        belongs to no user (daemon and image events), everyone else only their own."""
        return self.admin or owner_uid is None or owner_uid == self.uid

    def to_wire(self) -> dict[str, Any]:
        return {"uid": self.uid, "gid": self.gid, "pid": self.pid, "admin": self.admin}


@dataclass
class SandboxRecord:
    id: str
    name: str
    image: str
    owner_uid: int
    owner_gid: int
    created_at: float
    memory: int
    cpus: float
    pids: int
    network: str
    workdir: str
    labels: dict[str, str] = field(default_factory=dict)
    status: str = "creating"
    expires_at: float | None = None
    idle_timeout: float | None = None
    last_activity_at: float = 0.0
    container_id: str | None = None
    uid: int | None = None  # its own unprivileged uid (None: ``user`` was asked for)
    user: str | None = None  # the user a caller asked for (root, or one the policy lists)
    disk: int = 0
    has_agent: bool = False
    agent: str = "unavailable"  # starting, ready, unavailable (then commands use the engine)
    # The create's environment: in the container's own for a cold sandbox, and given to
    # every command (a pooled sandbox's container was made before its caller asked).
    env: dict[str, str] = field(default_factory=dict)
    pool: str | None = None  # the warm pool it came from

    @property
    def run_as(self) -> str:
        """The user its processes run as by default, for the engine."""
        if self.user is not None:
            return self.user
        return f"{self.uid}:{self.uid}" if self.uid is not None else "0:0"

    def container_labels(
        self, instance: str, inherited: Mapping[str, str] | None = None
    ) -> dict[str, str]:
        """The container's labels. ``inherited``: the image's labels; a sandbox label among
        them that this sandbox does not set (an image made by ``sandbox.snapshot`` carries
        its sandbox's) is overridden with "" (a container cannot drop an image's label, and
        ``record_from_labels`` takes "" as absent)."""
        labels = {LABEL_INSTANCE: instance, LABEL_ID: self.id}
        if self.pool is not None:
            # A warm-pool member: no owner, name or deadline until it is claimed, and then
            # those live in the state directory (SPEC §5).
            labels[LABEL_POOL] = self.pool
        else:
            labels[LABEL_NAME] = self.name
            labels[LABEL_OWNER] = f"{self.owner_uid}:{self.owner_gid}"
            labels[LABEL_CREATED_AT] = format_time(self.created_at)
            if self.expires_at is not None:
                labels[LABEL_EXPIRES_AT] = format_time(self.expires_at)
            if self.idle_timeout is not None:
                labels[LABEL_IDLE_TIMEOUT] = repr(self.idle_timeout)
        if self.uid is not None:
            labels[LABEL_UID] = str(self.uid)
        if self.disk:
            labels[LABEL_DISK] = str(self.disk)
        if self.has_agent:
            labels[LABEL_AGENT] = "1"
        for key, value in self.labels.items():
            labels[LABEL_USER_PREFIX + key] = value
        for key in inherited or ():
            if key.startswith(SANDBOX_LABELS) and not key.startswith(SNAPSHOT_LABELS) \
                    and key not in labels:
                labels[key] = ""
        return labels

    def to_wire(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "name": self.name,
            "status": self.status,
            "image": self.image,
            "owner": {"uid": self.owner_uid, "gid": self.owner_gid},
            "created_at": format_time(self.created_at),
            "expires_at": None if self.expires_at is None else format_time(self.expires_at),
            "idle_timeout": self.idle_timeout,
            "last_activity_at": format_time(self.last_activity_at),
            "labels": dict(self.labels),
            "limits": {
                "memory_bytes": self.memory,
                "cpus": self.cpus,
                "pids": self.pids,
                "disk_bytes": self.disk,
            },
            "user": self.run_as,
            "agent": self.agent,
            "network": self.network,
            "workdir": self.workdir,
            "container_id": self.container_id,
        }


def record_from_labels(
    labels: Mapping[str, str],
    *,
    container_id: str,
    image: str,
    status: str,
    memory: int,
    cpus: float,
    pids: int,
    network: str,
    workdir: str,
    user: str,
    now: float,
) -> SandboxRecord | None:
    """Rebuild a record from a container's labels (when no state row survived).

    None when the labels do not name a sandbox or cannot be read, and for a warm-pool
    container (it has no owner of its own: its claim lives in the state directory, and a
    pool container without one is never handed to anyone). An empty label is absent (see
    ``container_labels``).
    """
    labels = {k: v for k, v in labels.items() if v != ""}
    sid = labels.get(LABEL_ID)
    if not sid or LABEL_POOL in labels:
        return None
    try:
        uid, gid = (int(x) for x in labels.get(LABEL_OWNER, "0:0").split(":", 1))
        created = parse_time(labels[LABEL_CREATED_AT]) if LABEL_CREATED_AT in labels else now
        expires = parse_time(labels[LABEL_EXPIRES_AT]) if LABEL_EXPIRES_AT in labels else None
        idle = float(labels[LABEL_IDLE_TIMEOUT]) if LABEL_IDLE_TIMEOUT in labels else None
        own_uid = int(labels[LABEL_UID]) if LABEL_UID in labels else None
        disk = int(labels.get(LABEL_DISK, "0"))
    except ValueError:
        return None
    return SandboxRecord(
        id=sid,
        name=labels.get(LABEL_NAME) or f"sb-{sid}",
        image=image,
        owner_uid=uid,
        owner_gid=gid,
        created_at=created,
        memory=memory,
        cpus=cpus,
        pids=pids,
        network=network,
        workdir=workdir,
        labels={
            k[len(LABEL_USER_PREFIX) :]: v
            for k, v in labels.items()
            if k.startswith(LABEL_USER_PREFIX)
        },
        status=status,
        expires_at=expires,
        idle_timeout=idle,
        last_activity_at=now,
        container_id=container_id,
        uid=own_uid,
        user=None if own_uid is not None else (user or None),
        disk=disk,
        has_agent=labels.get(LABEL_AGENT) == "1",
    )
