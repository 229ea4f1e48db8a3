"""What a caller may ask for: defaults filled in, limits and the policy enforced.

Owns turning ``sandbox.create`` arguments into a complete ``CreateSpec``:
each omitted argument takes the config's default, each value is checked
against the policy (``PermissionDenied`` with the reason), and bad values are
``InvalidParams``. Pure logic: no engine, no records, no quotas (those need
the live sandbox set and live in the manager).
"""

from __future__ import annotations

import fnmatch
import os
import re
from dataclasses import dataclass, field
from typing import Any, TypeVar

from sandboxd.core.settings import Defaults, Policy
from sandboxd.wire.errors import InvalidParams, PermissionDenied, TooLarge

NAME_RE = re.compile(r"^[a-zA-Z0-9][a-zA-Z0-9_.-]{0,62}$")
ID_RE = re.compile(r"^[0-9a-f]{12}$")
LABEL_KEY_RE = re.compile(r"^[a-zA-Z0-9][a-zA-Z0-9_./-]{0,127}$")
ENV_KEY_RE = re.compile(r"^[^=\0]{1,256}$")
MIN_MEMORY = 6 * 1024 * 1024  # the engine refuses less
MIN_DISK = 1024 * 1024
FORBIDDEN_NETWORKS = ("host",)


_N = TypeVar("_N", int, float)


@dataclass
class CreateSpec:
    image: str
    name: str | None
    memory: int
    cpus: float
    pids: int
    ttl: float
    idle_timeout: float | None
    env: dict[str, str]
    workdir: str
    labels: dict[str, str]
    network: str
    readonly_rootfs: bool
    user: str | None  # None: the sandbox's own unprivileged uid
    cap_add: list[str] = field(default_factory=list)
    disk: int = 0
    runtime: str | None = None


def image_allowed(image: str, patterns: list[str] | None) -> bool:
    if patterns is None:
        return True
    candidates = {image}
    if ":" not in image.rsplit("/", 1)[-1] and "@" not in image:
        candidates.add(image + ":latest")
    return any(fnmatch.fnmatchcase(c, p) for c in candidates for p in patterns)


def check_name(name: str) -> str:
    if not NAME_RE.match(name) or ID_RE.match(name):
        raise InvalidParams(
            f"Sandbox name {name!r} is not valid: use 1-63 letters, digits, '_', '.' or '-', "
            "starting with a letter or digit, and not 12 hex digits (that is an id).",
            {"argument": "name"},
        )
    return name


ROOT_USERS = ("root", "0")
USER_RE = re.compile(r"^[a-zA-Z0-9_.][a-zA-Z0-9_.-]{0,63}(:[a-zA-Z0-9_.][a-zA-Z0-9_.-]{0,63})?$")


def is_root(user: str) -> bool:
    return user.split(":", 1)[0] in ROOT_USERS


def check_user(user: str, p: Policy, what: str = "user") -> str:
    """A ``user`` a caller asked for (create or exec), allowed by the policy or refused.

    Root (``root``, ``0``, with any group) needs ``allow_root``; any other user must be
    listed in ``users`` (or be the policy's own ``user``).
    """
    if not USER_RE.match(user):
        raise InvalidParams(
            f"{what} {user!r} is not valid: use a name or uid, optionally ':group'.",
            {"argument": what},
        )
    if is_root(user):
        if not p.allow_root:
            raise _deny(
                "Running as root is not allowed by the policy (set allow_root to opt in).",
                "allow_root",
            )
        return user
    if user != p.user and user not in p.users:
        allowed = ", ".join(p.users) or "none but the sandbox's own"
        raise _deny(f"User {user!r} is not allowed by the policy; allowed: {allowed}.", "users")
    return user


def check_env(env: dict[str, str]) -> dict[str, str]:
    for key in env:
        if not ENV_KEY_RE.match(key):
            raise InvalidParams(
                f"Environment variable name {key!r} is not valid.", {"argument": "env"}
            )
    return env


def _within(default: _N, maximum: _N | None) -> _N:
    return default if maximum is None or default <= maximum else maximum


def _deny(reason: str, what: str) -> PermissionDenied:
    return PermissionDenied(reason, {"policy": what})


def resolve_create(args: dict[str, Any], d: Defaults, p: Policy) -> CreateSpec:
    # Things a client never gets, asked for explicitly.
    if args.get("privileged"):
        raise _deny("Privileged sandboxes are not allowed.", "privileged")
    if args.get("mounts"):
        raise _deny("Mounting host paths into a sandbox is not allowed.", "mounts")
    if args.get("devices"):
        raise _deny("Host devices cannot be given to a sandbox.", "devices")
    cap_add = [c.upper().removeprefix("CAP_") for c in args.get("cap_add", [])]
    allowed_caps = {c.upper().removeprefix("CAP_") for c in p.cap_add}
    extra = sorted(set(cap_add) - allowed_caps)
    if extra:
        raise _deny(
            f"Capabilities {', '.join(extra)} are not in the policy's allow-list "
            f"({', '.join(sorted(allowed_caps)) or 'empty'}).",
            "cap_add",
        )

    image = args.get("image", d.image)
    if not image_allowed(image, p.images):
        raise _deny(f"Image {image!r} is not allowed by the policy.", "images")

    # An omitted argument takes its default, held within the policy's maximum.
    memory = args.get("memory", _within(d.memory, p.max_memory))
    if memory < MIN_MEMORY:
        raise InvalidParams(
            f"memory must be at least 6m, got {memory} bytes.", {"argument": "memory"}
        )
    if p.max_memory is not None and memory > p.max_memory:
        raise _deny(
            f"memory {memory} bytes is over the policy's maximum of {p.max_memory}.", "max_memory"
        )

    cpus = args.get("cpus", _within(d.cpus, p.max_cpus))
    host_cpus = os.cpu_count() or 1
    if not 0.01 <= cpus <= host_cpus:
        raise InvalidParams(
            f"cpus must be from 0.01 to {host_cpus} on this host, got {cpus:g}.",
            {"argument": "cpus"},
        )
    if p.max_cpus is not None and cpus > p.max_cpus:
        raise _deny(f"cpus {cpus:g} is over the policy's maximum of {p.max_cpus:g}.", "max_cpus")

    pids = args.get("pids", _within(d.pids, p.max_pids))
    if pids < 1:
        raise InvalidParams("pids must be at least 1.", {"argument": "pids"})
    if p.max_pids is not None and pids > p.max_pids:
        raise _deny(f"pids {pids} is over the policy's maximum of {p.max_pids}.", "max_pids")

    default_ttl = d.ttl if d.ttl or p.max_ttl is None else p.max_ttl  # 0: never expires
    ttl = args.get("ttl", _within(default_ttl, p.max_ttl))
    if p.max_ttl is not None and (ttl == 0 or ttl > p.max_ttl):
        raise _deny(
            f"ttl {ttl:g} is not allowed: the policy's maximum is {p.max_ttl:g} seconds"
            + (" and every sandbox must expire." if ttl == 0 else "."),
            "max_ttl",
        )
    idle_timeout = args.get("idle_timeout", d.idle_timeout)
    if idle_timeout == 0:
        idle_timeout = None

    network = args.get("network", d.network)
    if network in FORBIDDEN_NETWORKS or ":" in network or network not in p.networks:
        raise _deny(
            f"Network {network!r} is not allowed; allowed: {', '.join(p.networks)}.", "networks"
        )

    readonly = args.get("readonly_rootfs", p.readonly_rootfs)
    if p.readonly_rootfs and not readonly:
        raise _deny("The policy requires a read-only root filesystem.", "readonly_rootfs")

    user = args.get("user")
    if p.user is not None:
        if user is not None and user != p.user:
            raise _deny(f"Sandboxes run as user {p.user!r} by policy.", "user")
        user = p.user
    elif user is not None:
        user = check_user(user, p)

    disk = args.get("disk", _within(d.disk, p.max_disk))
    if disk < MIN_DISK:
        raise InvalidParams(f"disk must be at least 1m, got {disk} bytes.", {"argument": "disk"})
    if p.max_disk is not None and disk > p.max_disk:
        raise _deny(f"disk {disk} bytes is over the policy's maximum of {p.max_disk}.",
                    "max_disk")

    runtime = args.get("runtime")
    if runtime is not None and runtime not in p.runtimes:
        allowed = ", ".join(p.runtimes) or "only the default"
        raise _deny(f"Runtime {runtime!r} is not allowed; allowed: {allowed}.", "runtimes")

    workdir = args.get("workdir", d.workdir)
    if not workdir.startswith("/"):
        raise InvalidParams("workdir must be an absolute path.", {"argument": "workdir"})

    labels = args.get("labels", {})
    if len(labels) > p.max_labels:
        raise InvalidParams(f"At most {p.max_labels} labels are allowed.", {"argument": "labels"})
    label_bytes = sum(len(k.encode()) + len(v.encode()) for k, v in labels.items())
    if label_bytes > p.max_label_bytes:
        raise TooLarge(
            f"Labels take {label_bytes} bytes, over the limit of {p.max_label_bytes}.",
            {"argument": "labels", "limit": p.max_label_bytes},
        )
    for key in labels:
        if not LABEL_KEY_RE.match(key):
            raise InvalidParams(
                f"Label key {key!r} is not valid: use letters, digits, '_', '.', '/' or '-'.",
                {"argument": "labels"},
            )
    env = check_env(args.get("env", {}))
    if len(env) > p.max_env:
        raise InvalidParams(
            f"At most {p.max_env} environment variables are allowed.", {"argument": "env"}
        )
    name = args.get("name")
    return CreateSpec(
        image=image,
        name=check_name(name) if name is not None else None,
        memory=memory,
        cpus=cpus,
        pids=pids,
        ttl=ttl,
        idle_timeout=idle_timeout,
        env=env,
        workdir=workdir,
        labels=labels,
        network=network,
        readonly_rootfs=readonly,
        user=user,
        cap_add=cap_add,
        disk=disk,
        runtime=runtime,
    )
