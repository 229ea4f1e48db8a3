"""The RPC method table: each SPEC §3 method name, its arguments and its handler.

Owns the binding of wire names and argument schemas to the daemon's parts
(the sandbox manager, the engine, the daemon's own facts). Handlers are thin:
they turn validated arguments into calls and records into wire maps. It must
not talk to Docker directly or hold state of its own.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any

from . import API_VERSION, __version__
from . import params as p
from .config import Config
from .dispatcher import CallContext, Method
from .engine import Engine
from .errors import SandboxdError
from .lifecycle import STATUSES
from .policy import resolve_create
from .sandboxes import SandboxManager

MAX_TTL = 10 * 365 * 86400.0
MAX_EXEC_TIMEOUT = 7 * 86400.0
MAX_ARGV_BYTES = 1024 * 1024  # a command line, all arguments together (Linux allows ~2 MiB)


@dataclass
class App:
    config: Config
    engine: Engine
    manager: SandboxManager
    started_at: float = field(default_factory=time.monotonic)


def _id() -> p.Field:
    return p.Field(p.string(128), required=True)


def build_methods(app: App) -> list[Method]:
    cfg, manager = app.config, app.manager

    def ping(ctx: CallContext, args: dict[str, Any]) -> str:
        return "pong"

    async def info(ctx: CallContext, args: dict[str, Any]) -> dict[str, Any]:
        engine: dict[str, Any] = {"version": None, "reachable": False}
        try:
            async with asyncio.timeout(2.0):
                version = await app.engine.version()
            engine = {
                "version": version.get("Version"),
                "api_version": version.get("ApiVersion"),
                "reachable": True,
            }
        except (SandboxdError, TimeoutError):
            pass
        return {
            "version": __version__,
            "api_version": API_VERSION,
            "engine": engine,
            "sandboxes": len(manager.list(ctx.caller, None, None)),
            "uptime": round(time.monotonic() - app.started_at, 3),
            "pool": {},
            "caller": ctx.caller.to_wire(),
        }

    async def create(ctx: CallContext, args: dict[str, Any]) -> dict[str, Any]:
        spec = resolve_create(args, cfg)
        return (await manager.create(ctx.caller, spec)).to_wire()

    def get(ctx: CallContext, args: dict[str, Any]) -> dict[str, Any]:
        return manager.lookup(ctx.caller, args["id"]).to_wire()

    def list_(ctx: CallContext, args: dict[str, Any]) -> list[dict[str, Any]]:
        records = manager.list(ctx.caller, args.get("status"), args.get("labels"))
        return [r.to_wire() for r in records]

    async def pause(ctx: CallContext, args: dict[str, Any]) -> dict[str, Any]:
        return (await manager.pause(ctx.caller, args["id"])).to_wire()

    async def resume(ctx: CallContext, args: dict[str, Any]) -> dict[str, Any]:
        return (await manager.resume(ctx.caller, args["id"])).to_wire()

    async def extend(ctx: CallContext, args: dict[str, Any]) -> dict[str, Any]:
        return (await manager.extend(ctx.caller, args["id"], args["ttl"])).to_wire()

    async def remove(ctx: CallContext, args: dict[str, Any]) -> None:
        await manager.remove(ctx.caller, args["id"])

    async def stats(ctx: CallContext, args: dict[str, Any]) -> dict[str, Any]:
        return await manager.stats(ctx.caller, args["id"])

    async def exec_(ctx: CallContext, args: dict[str, Any]) -> dict[str, Any]:
        return await manager.exec(ctx.caller, args.pop("id"), args)

    size = p.Field(p.size())
    create_params = {
        "image": p.Field(p.string(512)),
        "name": p.Field(p.string(63)),
        "memory": size,
        "cpus": p.Field(p.number(0.0, 1024.0)),
        "pids": p.Field(p.integer(0, 4_194_304)),
        "ttl": p.Field(p.number(0.0, MAX_TTL)),
        "idle_timeout": p.Field(p.number(0.0, MAX_TTL)),
        "env": p.Field(p.string_map()),
        "workdir": p.Field(p.string(1024)),
        "labels": p.Field(p.string_map(max_items=256, value_len=4096)),
        "network": p.Field(p.string(256)),
        "readonly_rootfs": p.Field(p.boolean()),
        "user": p.Field(p.string(256)),
        # Asked for only to be refused with the reason (SPEC §4).
        "privileged": p.Field(p.boolean()),
        "cap_add": p.Field(p.string_list(64, 64)),
        "mounts": p.Field(p.string_list(64, 4096)),
        "devices": p.Field(p.string_list(64, 4096)),
    }
    exec_params = {
        "id": _id(),
        "cmd": p.Field(p.argv(MAX_ARGV_BYTES), required=True),
        "env": p.Field(p.string_map()),
        "workdir": p.Field(p.string(1024)),
        "user": p.Field(p.string(256)),
        "stdin": p.Field(p.binary(cfg.max_frame)),
        "timeout": p.Field(p.number(0.001, MAX_EXEC_TIMEOUT)),
        "max_output": p.Field(p.integer(0, 2**40)),
    }
    return [
        Method("daemon.ping", ping, during_shutdown=True),
        Method("daemon.info", info, during_shutdown=True),
        Method("sandbox.create", create, create_params),
        Method("sandbox.get", get, {"id": _id()}),
        Method(
            "sandbox.list",
            list_,
            {"status": p.Field(p.one_of(*STATUSES)), "labels": p.Field(p.string_map())},
        ),
        Method("sandbox.pause", pause, {"id": _id()}),
        Method("sandbox.resume", resume, {"id": _id()}),
        Method(
            "sandbox.extend",
            extend,
            {"id": _id(), "ttl": p.Field(p.number(0.0, MAX_TTL), required=True)},
        ),
        Method("sandbox.remove", remove, {"id": _id()}),
        Method("sandbox.stats", stats, {"id": _id()}),
        Method("sandbox.exec", exec_, exec_params, cancel_on_disconnect=True),
    ]
