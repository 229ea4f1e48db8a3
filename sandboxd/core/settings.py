"""The sandbox settings a policy decision needs: defaults, policy limits and quotas.

Owns the ``[defaults]``, ``[policy]`` and ``[quota]`` sections of the
configuration as plain dataclasses with their built-in values (SPEC §3, §4,
§6). Loading them from TOML, the environment and flags is ``sandboxd.config``'s
job. Pure data: no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass, field

MIB = 1024 * 1024


@dataclass
class Defaults:
    image: str = "sandboxd/base"
    memory: int = 512 * MIB
    cpus: float = 1.0
    pids: int = 256
    ttl: float = 300.0
    idle_timeout: float | None = None
    workdir: str = "/workspace"
    network: str = "none"
    max_output: int = 1 * MIB
    exec_timeout: float | None = None
    # The sandbox's idle main process, run under Docker's init.
    command: list[str] = field(default_factory=lambda: ["sleep", "infinity"])
    nofile: int = 1024
    disk: int = 1024 * MIB  # what a sandbox may write, all places together
    # Each sandbox runs as its own unprivileged uid from this range (uid = gid).
    uid_min: int = 100_000
    uid_max: int = 165_535


@dataclass
class Policy:
    images: list[str] | None = None  # fnmatch patterns; None allows any
    max_memory: int | None = None
    max_cpus: float | None = None
    max_pids: int | None = None
    max_ttl: float | None = None  # None: ttl 0 (no expiry) is allowed
    max_output: int = 16 * MIB
    networks: list[str] = field(default_factory=lambda: ["none"])
    cap_add: list[str] = field(default_factory=list)
    user: str | None = None  # when set, every sandbox runs as this user
    users: list[str] = field(default_factory=list)  # other users a caller may ask for
    allow_root: bool = False  # root inside a sandbox: an explicit opt-in
    max_disk: int | None = None
    runtimes: list[str] = field(default_factory=list)  # e.g. ["runsc"]; the default is runc
    readonly_rootfs: bool = False  # when true, every sandbox's rootfs is read-only
    max_env: int = 256
    max_labels: int = 64
    max_label_bytes: int = 8192  # keys and values of one sandbox's labels, together


@dataclass
class Quota:
    max_sandboxes: int | None = None
    max_memory: int | None = None
    max_execs: int = 64  # commands running at once, per uid


@dataclass
class DiskSettings:
    """``[disk]``: how sandbox disk use is held and the host's free space guarded."""

    enforcement: str = "auto"  # auto (the strongest the engine has), quota, measured
    check_interval: float = 1.0  # the longest between two measurements of a sandbox
    floor: int = 2048 * MIB  # below this free on the engine's data root: refuse, freeze


@dataclass
class PoolSettings:
    """One ``[[pool]]`` table: a warm pool of ``size`` sandboxes made with these arguments
    (as ``sandbox.create`` takes them; an unset one takes its default). ``name`` defaults
    to ``pool-<n>``."""

    size: int = 0
    name: str | None = None
    image: str | None = None
    memory: int | None = None
    cpus: float | None = None
    pids: int | None = None
    network: str | None = None
    user: str | None = None
    disk: int | None = None
    workdir: str | None = None
    readonly_rootfs: bool | None = None
    runtime: str | None = None

    def create_args(self) -> dict[str, object]:
        """The ``sandbox.create`` arguments this pool's members are made with."""
        keys = ("image", "memory", "cpus", "pids", "network", "user", "disk", "workdir",
                "readonly_rootfs", "runtime")
        return {k: getattr(self, k) for k in keys if getattr(self, k) is not None}
