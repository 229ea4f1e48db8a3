"""Typed views of the values the daemon returns (SPEC §3), built from wire maps.

This module owns the dataclasses ``Sandbox`` (its data part), ``Owner``,
``Limits``, ``ExecResult``, ``ExecExit``, ``ExecInfo``, ``FileInfo``,
``Stats``, ``DaemonInfo`` (with ``PoolInfo``), ``Event``, the image models
``ImageInfo``, ``EnsureResult``, ``PullProgress`` and ``Snapshot``, and friends,
their liberal ``from_wire`` constructors and their ``to_dict`` views. It must
not do any I/O or know about connections: the sandbox *handles* that can act
(``sb.exec(...)``) are subclasses defined by the typed API (``_async.client``,
and ``_sync.client`` generated from it).

Reading is liberal, as the SPEC asks: unknown keys are kept in ``extra`` and
never cause an error, a missing key takes a neutral default, and a str sent
as bin (or the reverse) is converted. Only a reply that is not a map at all
raises ``UnexpectedReply``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from datetime import UTC, datetime
from typing import Any, Self

from .exceptions import UnexpectedReply

__all__ = [
    "CallerInfo",
    "DaemonInfo",
    "EngineInfo",
    "EnsureResult",
    "Event",
    "ExecExit",
    "ExecInfo",
    "ExecResult",
    "FileInfo",
    "ImageInfo",
    "Limits",
    "Owner",
    "PoolInfo",
    "PullProgress",
    "Sandbox",
    "Snapshot",
    "Stats",
    "parse_time",
]

SANDBOX_STATUSES = ("creating", "running", "paused", "stopped", "error")


# -- liberal converters ------------------------------------------------------


def _as_map(value: Any, what: str) -> Mapping[str, Any]:
    if isinstance(value, Mapping):
        return value
    raise UnexpectedReply(
        f"Expected {what} as a map from sandboxd but got {type(value).__name__}; "
        "the daemon and client versions may not match.",
        {"value_type": type(value).__name__},
    )


def _str(value: Any, default: str = "") -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, (bytes, bytearray)):
        return bytes(value).decode("utf-8", "replace")
    if value is None:
        return default
    return str(value)


def _opt_str(value: Any) -> str | None:
    return None if value is None else _str(value)


def _int(value: Any, default: int = 0) -> int:
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, int):
        return value
    try:
        return int(value)
    except (TypeError, ValueError):
        return default


def _float(value: Any, default: float = 0.0) -> float:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    try:
        return float(value)
    except (TypeError, ValueError):
        return default


def _opt_float(value: Any) -> float | None:
    return None if value is None else _float(value)


def _opt_int(value: Any) -> int | None:
    return None if value is None else _int(value)


def _bool(value: Any) -> bool:
    return bool(value)


def _bytes(value: Any) -> bytes:
    if isinstance(value, bytes):
        return value
    if isinstance(value, (bytearray, memoryview)):
        return bytes(value)
    if isinstance(value, str):
        return value.encode("utf-8")
    return b""


def _str_map(value: Any) -> dict[str, str]:
    if not isinstance(value, Mapping):
        return {}
    return {_str(k): _str(v) for k, v in value.items()}


def _extra(data: Mapping[str, Any], known: tuple[str, ...]) -> dict[str, Any]:
    return {k: v for k, v in data.items() if k not in known}


def _names(cls: type[Any]) -> tuple[str, ...]:
    return tuple(f.name for f in fields(cls) if f.name != "extra")


def _plain(value: Any) -> Any:
    """A value with nested models turned into dicts (for JSON and ``to_dict``)."""
    if hasattr(value, "to_dict"):
        return value.to_dict()
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _to_dict(obj: Any, cls: type[Any]) -> dict[str, Any]:
    out = {f.name: _plain(getattr(obj, f.name)) for f in fields(cls) if f.name != "extra"}
    for key, value in getattr(obj, "extra", {}).items():
        out.setdefault(key, _plain(value))
    return out


def parse_time(value: str | None) -> datetime | None:
    """An RFC 3339 time from the wire (``"2026-11-26T15:04:05.123Z"``) as an aware datetime.

    Returns ``None`` for ``None`` or a string that is not a time.
    """
    if not value:
        return None
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError:
        return None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    return parsed


# -- models ------------------------------------------------------------------


@dataclass
class Owner:
    """The uid and gid a sandbox belongs to."""

    uid: int
    gid: int
    extra: dict[str, Any] = field(default_factory=dict, repr=False)

    @classmethod
    def from_wire(cls, data: Any) -> Self:
        m = data if isinstance(data, Mapping) else {}
        return cls(uid=_int(m.get("uid"), -1), gid=_int(m.get("gid"), -1),
                   extra=_extra(m, _names(cls)))

    def to_dict(self) -> dict[str, Any]:
        return _to_dict(self, Owner)


@dataclass
class Limits:
    """A sandbox's resource limits: memory and disk in bytes, CPUs, process count."""

    memory_bytes: int
    cpus: float
    pids: int
    disk_bytes: int = 0
    extra: dict[str, Any] = field(default_factory=dict, repr=False)

    @classmethod
    def from_wire(cls, data: Any) -> Self:
        m = data if isinstance(data, Mapping) else {}
        return cls(
            memory_bytes=_int(m.get("memory_bytes")),
            cpus=_float(m.get("cpus")),
            pids=_int(m.get("pids")),
            disk_bytes=_int(m.get("disk_bytes")),
            extra=_extra(m, _names(cls)),
        )

    def to_dict(self) -> dict[str, Any]:
        return _to_dict(self, Limits)


@dataclass
class Sandbox:
    """The data of one sandbox, as ``sandbox.get`` returns it (SPEC §3).

    Times are the wire's RFC 3339 UTC strings; ``parse_time`` turns them into
    datetimes. Keys the daemon sends beyond these are kept in ``extra``.
    """

    id: str
    name: str
    status: str
    image: str
    owner: Owner
    created_at: str
    expires_at: str | None
    idle_timeout: float | None
    last_activity_at: str | None
    labels: dict[str, str]
    limits: Limits
    network: str
    workdir: str
    container_id: str | None
    user: str = ""  # the user its commands run as by default ("uid:gid")
    agent: str = ""  # its in-sandbox agent: "ready", "starting" or "unavailable"
    extra: dict[str, Any] = field(default_factory=dict, repr=False)

    @classmethod
    def from_wire(cls, data: Any) -> Self:
        m = _as_map(data, "a sandbox")
        return cls(
            id=_str(m.get("id")),
            name=_str(m.get("name")),
            status=_str(m.get("status")),
            image=_str(m.get("image")),
            owner=Owner.from_wire(m.get("owner")),
            created_at=_str(m.get("created_at")),
            expires_at=_opt_str(m.get("expires_at")),
            idle_timeout=_opt_float(m.get("idle_timeout")),
            last_activity_at=_opt_str(m.get("last_activity_at")),
            labels=_str_map(m.get("labels")),
            limits=Limits.from_wire(m.get("limits")),
            network=_str(m.get("network")),
            workdir=_str(m.get("workdir")),
            container_id=_opt_str(m.get("container_id")),
            user=_str(m.get("user")),
            agent=_str(m.get("agent")),
            extra=_extra(m, _names(Sandbox)),
        )

    def data_fields(self) -> dict[str, Any]:
        """The data fields only (no client reference), as a shallow dict."""
        return {f.name: getattr(self, f.name) for f in fields(Sandbox)}

    def _update_from(self, other: Sandbox) -> None:
        for name, value in other.data_fields().items():
            setattr(self, name, value)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict with the wire's key names (``extra`` keys merged in)."""
        return _to_dict(self, Sandbox)


@dataclass
class ExecResult:
    """The outcome of a buffered ``sandbox.exec``; stdout and stderr stay bytes."""

    exit_code: int
    stdout: bytes
    stderr: bytes
    timed_out: bool
    truncated: bool
    duration: float
    extra: dict[str, Any] = field(default_factory=dict, repr=False)

    @classmethod
    def from_wire(cls, data: Any) -> Self:
        m = _as_map(data, "an exec result")
        return cls(
            exit_code=_int(m.get("exit_code"), -1),
            stdout=_bytes(m.get("stdout")),
            stderr=_bytes(m.get("stderr")),
            timed_out=_bool(m.get("timed_out")),
            truncated=_bool(m.get("truncated")),
            duration=_float(m.get("duration")),
            extra=_extra(m, _names(cls)),
        )

    @property
    def ok(self) -> bool:
        """True when the command exited 0 without timing out."""
        return self.exit_code == 0 and not self.timed_out

    def to_dict(self) -> dict[str, Any]:
        return _to_dict(self, ExecResult)


@dataclass
class ExecExit:
    """How a streamed exec ended (``exec.exit``, ``exec.wait``): its own exit code."""

    exit_code: int
    timed_out: bool
    duration: float
    extra: dict[str, Any] = field(default_factory=dict, repr=False)

    @classmethod
    def from_wire(cls, data: Any) -> Self:
        m = _as_map(data, "an exec exit")
        return cls(
            exit_code=_int(m.get("exit_code"), -1),
            timed_out=_bool(m.get("timed_out")),
            duration=_float(m.get("duration")),
            extra=_extra(m, _names(cls)),
        )

    def to_dict(self) -> dict[str, Any]:
        return _to_dict(self, ExecExit)


@dataclass
class ExecInfo:
    """One exec of a sandbox, as ``exec.list`` shows it."""

    exec_id: str
    cmd: list[str]
    running: bool
    exit_code: int | None
    detached: bool
    tty: bool
    started_at: str
    extra: dict[str, Any] = field(default_factory=dict, repr=False)

    @classmethod
    def from_wire(cls, data: Any) -> Self:
        m = _as_map(data, "an exec")
        cmd = m.get("cmd")
        code = m.get("exit_code")
        return cls(
            exec_id=_str(m.get("exec_id")),
            cmd=[_str(c) for c in cmd] if isinstance(cmd, (list, tuple)) else [],
            running=_bool(m.get("running")),
            exit_code=None if code is None else _int(code, -1),
            detached=_bool(m.get("detached")),
            tty=_bool(m.get("tty")),
            started_at=_str(m.get("started_at")),
            extra=_extra(m, _names(cls)),
        )

    def to_dict(self) -> dict[str, Any]:
        return _to_dict(self, ExecInfo)


@dataclass
class FileInfo:
    """A file in a sandbox (``files.stat``, ``files.list``): ``mode`` has the type bits.

    ``mtime`` is kept as the daemon sends it: an RFC 3339 string (see
    ``parse_time``) or seconds since the epoch.
    """

    name: str
    size: int
    mode: int
    is_dir: bool
    mtime: str | float | None
    extra: dict[str, Any] = field(default_factory=dict, repr=False)

    @classmethod
    def from_wire(cls, data: Any) -> Self:
        m = _as_map(data, "a file entry")
        mtime: Any = m.get("mtime")
        return cls(
            name=_str(m.get("name")),
            size=_int(m.get("size")),
            mode=_int(m.get("mode")),
            is_dir=_bool(m.get("is_dir")),
            mtime=mtime if mtime is None else _str(mtime) if isinstance(
                mtime, (str, bytes, bytearray)) else _float(mtime),
            extra=_extra(m, _names(cls)),
        )

    def to_dict(self) -> dict[str, Any]:
        return _to_dict(self, FileInfo)


@dataclass
class Stats:
    """A point-in-time resource sample of one sandbox (``sandbox.stats``)."""

    cpu_percent: float
    memory_bytes: int
    memory_limit_bytes: int
    pids: int
    net_rx_bytes: int
    net_tx_bytes: int
    extra: dict[str, Any] = field(default_factory=dict, repr=False)

    @classmethod
    def from_wire(cls, data: Any) -> Self:
        m = _as_map(data, "sandbox stats")
        return cls(
            cpu_percent=_float(m.get("cpu_percent")),
            memory_bytes=_int(m.get("memory_bytes")),
            memory_limit_bytes=_int(m.get("memory_limit_bytes")),
            pids=_int(m.get("pids")),
            net_rx_bytes=_int(m.get("net_rx_bytes")),
            net_tx_bytes=_int(m.get("net_tx_bytes")),
            extra=_extra(m, _names(cls)),
        )

    def to_dict(self) -> dict[str, Any]:
        return _to_dict(self, Stats)


@dataclass
class EngineInfo:
    """What the daemon knows of the Docker Engine."""

    version: str | None
    reachable: bool
    extra: dict[str, Any] = field(default_factory=dict, repr=False)

    @classmethod
    def from_wire(cls, data: Any) -> Self:
        m = data if isinstance(data, Mapping) else {}
        return cls(
            version=_opt_str(m.get("version")),
            reachable=_bool(m.get("reachable")),
            extra=_extra(m, _names(cls)),
        )

    def to_dict(self) -> dict[str, Any]:
        return _to_dict(self, EngineInfo)


@dataclass
class CallerInfo:
    """Who the daemon thinks the caller is (from SO_PEERCRED)."""

    uid: int
    gid: int
    pid: int
    admin: bool
    extra: dict[str, Any] = field(default_factory=dict, repr=False)

    @classmethod
    def from_wire(cls, data: Any) -> Self:
        m = data if isinstance(data, Mapping) else {}
        return cls(
            uid=_int(m.get("uid"), -1),
            gid=_int(m.get("gid"), -1),
            pid=_int(m.get("pid"), -1),
            admin=_bool(m.get("admin")),
            extra=_extra(m, _names(cls)),
        )

    def to_dict(self) -> dict[str, Any]:
        return _to_dict(self, CallerInfo)


@dataclass
class PoolInfo:
    """One warm pool of ``daemon.info``: its image, target size, and how it is doing.

    ``ready`` containers wait to be claimed, ``starting`` ones are on their
    way; ``claims`` counts creates served from the pool, ``misses`` those
    that found it empty.
    """

    image: str
    size: int
    ready: int
    claims: int
    misses: int
    starting: int
    extra: dict[str, Any] = field(default_factory=dict, repr=False)

    @classmethod
    def from_wire(cls, data: Any) -> Self:
        m = data if isinstance(data, Mapping) else {}
        return cls(
            image=_str(m.get("image")),
            size=_int(m.get("size")),
            ready=_int(m.get("ready")),
            claims=_int(m.get("claims")),
            misses=_int(m.get("misses")),
            starting=_int(m.get("starting")),
            extra=_extra(m, _names(cls)),
        )

    def to_dict(self) -> dict[str, Any]:
        return _to_dict(self, PoolInfo)


@dataclass
class DaemonInfo:
    """The reply of ``daemon.info``; ``pool`` maps each warm pool's name to its state."""

    version: str
    api_version: int
    engine: EngineInfo
    sandboxes: int
    uptime: float
    pool: dict[str, PoolInfo]
    caller: CallerInfo
    extra: dict[str, Any] = field(default_factory=dict, repr=False)

    @classmethod
    def from_wire(cls, data: Any) -> Self:
        m = _as_map(data, "daemon info")
        pool = m.get("pool")
        return cls(
            version=_str(m.get("version")),
            api_version=_int(m.get("api_version")),
            engine=EngineInfo.from_wire(m.get("engine")),
            sandboxes=_int(m.get("sandboxes")),
            uptime=_float(m.get("uptime")),
            pool={_str(name): PoolInfo.from_wire(p) for name, p in pool.items()}
            if isinstance(pool, Mapping) else {},
            caller=CallerInfo.from_wire(m.get("caller")),
            extra=_extra(m, _names(cls)),
        )

    def to_dict(self) -> dict[str, Any]:
        return _to_dict(self, DaemonInfo)


@dataclass(frozen=True)
class Event:
    """One daemon event (SPEC §3): ``seq`` orders them, ``time`` is RFC 3339 UTC."""

    seq: int
    time: str
    type: str
    sandbox_id: str | None = None
    sandbox_name: str | None = None
    owner_uid: int | None = None
    data: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_wire(cls, data: Any) -> Self:
        m = _as_map(data, "an event")
        owner = m.get("owner_uid")
        payload = m.get("data")
        return cls(
            seq=_int(m.get("seq")),
            time=_str(m.get("time")),
            type=_str(m.get("type")),
            sandbox_id=_opt_str(m.get("sandbox_id")),
            sandbox_name=_opt_str(m.get("sandbox_name")),
            owner_uid=None if owner is None else _int(owner),
            data=dict(payload) if isinstance(payload, Mapping) else {},
            extra=_extra(m, _names(cls)),
        )

    def to_dict(self) -> dict[str, Any]:
        return _to_dict(self, Event)


# -- images --------------------------------------------------------------------


@dataclass
class ImageInfo:
    """One image reference of ``image.list``: an image with several tags is listed once per tag.

    ``id`` is the engine's (``sha256:...``), ``size`` in bytes, ``created_at``
    an RFC 3339 UTC string (see ``parse_time``).
    """

    ref: str
    id: str
    size: int
    created_at: str
    extra: dict[str, Any] = field(default_factory=dict, repr=False)

    @classmethod
    def from_wire(cls, data: Any) -> Self:
        m = _as_map(data, "an image")
        return cls(
            ref=_str(m.get("ref")),
            id=_str(m.get("id")),
            size=_int(m.get("size")),
            created_at=_str(m.get("created_at")),
            extra=_extra(m, _names(cls)),
        )

    def to_dict(self) -> dict[str, Any]:
        return _to_dict(self, ImageInfo)


@dataclass
class EnsureResult:
    """The reply of ``image.ensure``: the image's id, and whether this call had to pull it."""

    ref: str
    id: str
    pulled: bool
    extra: dict[str, Any] = field(default_factory=dict, repr=False)

    @classmethod
    def from_wire(cls, data: Any) -> Self:
        m = _as_map(data, "the image.ensure reply")
        return cls(
            ref=_str(m.get("ref")),
            id=_str(m.get("id")),
            pulled=_bool(m.get("pulled")),
            extra=_extra(m, _names(cls)),
        )

    def to_dict(self) -> dict[str, Any]:
        return _to_dict(self, EnsureResult)


@dataclass(frozen=True)
class PullProgress:
    """The data of one ``image.pull.progress`` event: the engine's word on a pull.

    ``id`` is a layer's id for a layer's steps (``"Downloading"``,
    ``"Pull complete"``, ...), or whatever the engine puts there (the tag,
    None) for the pull's own steps (``"Pulling from ..."``, ``"Digest: ..."``).
    ``current`` and ``total`` are bytes where the engine counts them, else None.
    """

    ref: str
    id: str | None
    status: str
    current: int | None = None
    total: int | None = None
    extra: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_wire(cls, data: Any) -> Self:
        m = _as_map(data, "pull progress")
        return cls(
            ref=_str(m.get("ref")),
            id=_opt_str(m.get("id")),
            status=_str(m.get("status")),
            current=_opt_int(m.get("current")),
            total=_opt_int(m.get("total")),
            extra=_extra(m, _names(cls)),
        )

    def to_dict(self) -> dict[str, Any]:
        return _to_dict(self, PullProgress)


@dataclass
class Snapshot:
    """The reply of ``sandbox.snapshot``: the new image's reference and id.

    ``ref`` is ``sandboxd-snapshot/u<uid>/<name>:<tag>``; create a sandbox
    with ``image=ref`` to start a copy (a fork), ``remove_image(ref)`` to drop it.
    """

    ref: str
    id: str
    extra: dict[str, Any] = field(default_factory=dict, repr=False)

    @classmethod
    def from_wire(cls, data: Any) -> Self:
        m = _as_map(data, "the sandbox.snapshot reply")
        return cls(ref=_str(m.get("ref")), id=_str(m.get("id")), extra=_extra(m, _names(cls)))

    def to_dict(self) -> dict[str, Any]:
        return _to_dict(self, Snapshot)
