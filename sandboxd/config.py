"""Daemon configuration: one TOML file, overridden by environment, then by flags.

Owns the key names of SPEC §6, their defaults, their types and the checks
that stop the daemon at start with one clear line naming a bad key. It must
not open sockets, talk to Docker or configure logging.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from sandboxd.core.policy import resolve_create
from sandboxd.core.settings import Defaults, DiskSettings, Policy, PoolSettings, Quota
from sandboxd.rpc.limits import Limits
from sandboxd.wire.errors import SandboxdError
from sandboxd.wire.units import parse_size

MIB = 1024 * 1024


class ConfigError(Exception):
    """A bad configuration: the message is one line naming the key."""


@dataclass
class EventsConfig:
    retain: int = 10000
    queue_size: int = 1024  # per subscription; a subscriber this far behind is cut off


def _default_socket() -> str:
    if os.geteuid() == 0:
        return "/run/sandboxd/sandboxd.sock"
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    # No shared /tmp fallback: another user could own that directory first.
    return str(Path(runtime) / "sandboxd.sock") if runtime else ""


def _default_state_dir() -> str:
    if os.geteuid() == 0:
        return "/var/lib/sandboxd"
    state = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return str(Path(state) / "sandboxd")


@dataclass
class Config:
    socket: str = field(default_factory=_default_socket)
    socket_group: str | None = None
    state_dir: str = field(default_factory=_default_state_dir)
    engine_url: str | None = None
    admin_group: str | None = None
    # Names this daemon's containers: two daemons on one engine never touch each other's.
    instance: str = "default"
    max_frame: int = 16 * MIB
    max_file_chunk: int = 8 * MIB  # the most one files.read returns
    shutdown_grace: float = 10.0
    cleanup_on_exit: bool = False
    create_grace: float = 30.0  # a container created but never started is removed after this
    relist_interval: float = 30.0  # how often the engine's containers are re-listed
    engine_concurrency: int = 32  # engine calls at once; more wait their turn
    # The in-sandbox agent binary: the one built with the package when unset; "none" runs
    # sandboxes without it (every command then goes through the engine's exec).
    agent_path: str | None = None
    log_level: str = "info"
    log_format: str = "auto"  # auto, json or console
    defaults: Defaults = field(default_factory=Defaults)
    policy: Policy = field(default_factory=Policy)
    quota: Quota = field(default_factory=Quota)
    events: EventsConfig = field(default_factory=EventsConfig)
    limits: Limits = field(default_factory=Limits)
    disk: DiskSettings = field(default_factory=DiskSettings)
    pools: list[PoolSettings] = field(default_factory=list)  # [[pool]] tables


_SECTIONS: dict[str, type[Any]] = {
    "defaults": Defaults,
    "policy": Policy,
    "quota": Quota,
    "events": EventsConfig,
    "limits": Limits,
    "disk": DiskSettings,
}
_SIZE_KEYS = {
    "memory", "max_memory", "max_output", "max_frame", "max_input", "max_input_total", "disk",
    "max_disk", "floor", "max_file_chunk",
}
_LOG_LEVELS = {"debug", "info", "warning", "error"}


def _coerce(where: str, name: str, value: Any, annotation: str) -> Any:
    """Check one value against its field's annotation, converting sizes."""
    optional = annotation.endswith("| None")
    base = annotation.removesuffix(" | None")
    if value is None and optional:
        return None
    if name in _SIZE_KEYS:
        try:
            return parse_size(value)
        except ValueError as exc:
            raise ConfigError(f"{where}{name}: {exc}") from None
    if base == "bool":
        if isinstance(value, bool):
            return value
    elif base == "int":
        if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
            return value
    elif base == "float":
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 0:
            return float(value)
    elif base == "str":
        if isinstance(value, str) and value:
            return value
    elif base.startswith("list[str]"):
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            return list(value)
    else:  # pragma: no cover - a field type this function does not know
        raise ConfigError(f"{where}{name}: unsupported setting type {annotation}")
    raise ConfigError(f"{where}{name}: expected {base}, got {value!r}")


def _fill(obj: Any, table: Mapping[str, Any], where: str) -> None:
    known = {f.name: f for f in fields(obj)}
    for name, value in table.items():
        f = known.get(name)
        top = isinstance(obj, Config)  # a section name there is a table, not a value
        if f is None or (top and (name in _SECTIONS or name in ("pool", "pools"))):
            raise ConfigError(f"{where}{name}: unknown key")
        setattr(obj, name, _coerce(where, name, value, str(f.type)))


def _apply_table(config: Config, data: Mapping[str, Any], source: str) -> None:
    for name, value in data.items():
        if name in _SECTIONS:
            if not isinstance(value, dict):
                raise ConfigError(f"{source}: [{name}] must be a table")
            _fill(getattr(config, name), value, f"{source}: [{name}] ")
        elif name == "pool":
            if not isinstance(value, list) or not all(isinstance(t, dict) for t in value):
                raise ConfigError(f"{source}: [[pool]] must be an array of tables")
            config.pools = []
            for n, table in enumerate(value, start=1):
                pool = PoolSettings()
                _fill(pool, table, f"{source}: [[pool]] #{n} ")
                if pool.name is None:
                    pool.name = f"pool-{n}"
                config.pools.append(pool)
        else:
            _fill(config, {name: value}, f"{source}: ")


_ENV = {
    "SANDBOXD_SOCKET": ("socket", None),
    "SANDBOXD_SOCKET_GROUP": ("socket_group", None),
    "SANDBOXD_STATE_DIR": ("state_dir", None),
    "DOCKER_HOST": ("engine_url", None),
    "SANDBOXD_ADMIN_GROUP": ("admin_group", None),
    "SANDBOXD_DEFAULT_IMAGE": ("image", "defaults"),
    "SANDBOXD_LOG_LEVEL": ("log_level", None),
    "SANDBOXD_INSTANCE": ("instance", None),
}


def load_config(
    path: str | None = None,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Config:
    """Built-in defaults, then the TOML file, then the environment, then flags."""
    env = os.environ if env is None else env
    config = Config()
    path = path or env.get("SANDBOXD_CONFIG") or None
    if path:
        try:
            with open(path, "rb") as fh:
                data = tomllib.load(fh)
        except FileNotFoundError:
            raise ConfigError(f"{path}: no such config file") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path}: not valid TOML ({exc})") from None
        except OSError as exc:
            raise ConfigError(f"{path}: cannot read ({exc.strerror})") from None
        _apply_table(config, data, path)
    for var, (name, section) in _ENV.items():
        if env.get(var):
            target = getattr(config, section) if section else config
            _fill(target, {name: env[var]}, f"${var} ")
    for name, value in (overrides or {}).items():
        if value is not None:
            _fill(config, {name: value}, f"--{name.replace('_', '-')} ")
    if not config.socket:
        raise ConfigError(
            "socket: $XDG_RUNTIME_DIR is not set; pass --socket or set $SANDBOXD_SOCKET"
        )
    if config.log_level not in _LOG_LEVELS:
        raise ConfigError(f"log_level: expected one of {sorted(_LOG_LEVELS)}")
    if config.log_format not in {"auto", "json", "console"}:
        raise ConfigError("log_format: expected auto, json or console")
    if not config.defaults.command:
        raise ConfigError("[defaults] command: must not be empty")
    lim = config.limits
    if not 0 <= lim.admin_connections < lim.max_connections:
        raise ConfigError("[limits] admin_connections: must be less than max_connections")
    for name in ("max_connections_per_uid", "max_in_flight", "max_in_flight_per_uid"):
        if getattr(lim, name) < 1:
            raise ConfigError(f"[limits] {name}: must be at least 1")
    if config.engine_concurrency < 1:
        raise ConfigError("engine_concurrency: must be at least 1")
    if config.disk.enforcement not in ("auto", "quota", "measured"):
        raise ConfigError("[disk] enforcement: expected auto, quota or measured")
    if not 0 < config.defaults.uid_min <= config.defaults.uid_max:
        raise ConfigError("[defaults] uid_min, uid_max: expected 0 < uid_min <= uid_max")
    _check_pools(config)
    return config


POOL_NAME_MAX = 63


def _check_pools(config: Config) -> None:
    """Each pool names a sandbox the policy allows, a size, and a name of its own."""
    seen: set[str] = set()
    for n, pool in enumerate(config.pools, start=1):
        where = f"[[pool]] #{n} ({pool.name})"
        if pool.size < 1:
            raise ConfigError(f"{where} size: must be at least 1")
        name = pool.name or ""
        if not name or len(name) > POOL_NAME_MAX or not all(
                c.isalnum() or c in "_.-" for c in name):
            raise ConfigError(f"{where} name: use 1-63 letters, digits, '_', '.' or '-'")
        if name in seen:
            raise ConfigError(f"{where} name: another pool has this name")
        seen.add(name)
        try:
            resolve_create(pool.create_args(), config.defaults, config.policy)
        except SandboxdError as exc:
            raise ConfigError(f"{where}: {exc.message}") from None
