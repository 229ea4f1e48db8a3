"""The ``sandbox.*`` lifecycle methods: create, get, list, pause, resume, extend, remove, stats.

Owns their wire names, argument schemas and reply shapes (SPEC §3). Handlers
are thin: policy resolution (``core.policy``) and the lifecycle service do
the work. It must not hold state or talk to a backend.
"""

from __future__ import annotations

from typing import Any

from sandboxd.core.policy import resolve_create
from sandboxd.core.settings import Defaults, Policy
from sandboxd.core.status import STATUSES
from sandboxd.rpc import params as p
from sandboxd.rpc.dispatcher import CallContext, Method
from sandboxd.services.images import ImageService
from sandboxd.services.sandboxes import SandboxService

MAX_TTL = 10 * 365 * 86400.0


def sandbox_id() -> p.Field:
    return p.Field(p.string(128), required=True)


def build_sandbox_methods(
    sandboxes: SandboxService, images: ImageService, defaults: Defaults, policy: Policy
) -> list[Method]:
    registry = sandboxes.registry

    async def create(ctx: CallContext, args: dict[str, Any]) -> dict[str, Any]:
        spec = resolve_create(args, defaults, policy)
        return (await sandboxes.create(ctx.caller, spec)).to_wire()

    def get(ctx: CallContext, args: dict[str, Any]) -> dict[str, Any]:
        return registry.lookup(ctx.caller, args["id"]).to_wire()

    def list_(ctx: CallContext, args: dict[str, Any]) -> list[dict[str, Any]]:
        records = registry.list(ctx.caller, args.get("status"), args.get("labels"))
        return [r.to_wire() for r in records]

    async def pause(ctx: CallContext, args: dict[str, Any]) -> dict[str, Any]:
        return (await sandboxes.pause(ctx.caller, args["id"])).to_wire()

    async def resume(ctx: CallContext, args: dict[str, Any]) -> dict[str, Any]:
        return (await sandboxes.resume(ctx.caller, args["id"])).to_wire()

    async def extend(ctx: CallContext, args: dict[str, Any]) -> dict[str, Any]:
        return (await sandboxes.extend(ctx.caller, args["id"], args["ttl"])).to_wire()

    async def remove(ctx: CallContext, args: dict[str, Any]) -> None:
        await sandboxes.remove(ctx.caller, args["id"])

    async def stats(ctx: CallContext, args: dict[str, Any]) -> dict[str, Any]:
        return await sandboxes.stats(ctx.caller, args["id"])

    async def snapshot(ctx: CallContext, args: dict[str, Any]) -> dict[str, Any]:
        record = registry.lookup(ctx.caller, args["id"])
        return await images.snapshot(ctx.caller, record, args.get("ref"))

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
        "disk": size,
        "runtime": p.Field(p.string(64)),
        # Asked for only to be refused with the reason (SPEC §4).
        "privileged": p.Field(p.boolean()),
        "cap_add": p.Field(p.string_list(64, 64)),
        "mounts": p.Field(p.string_list(64, 4096)),
        "devices": p.Field(p.string_list(64, 4096)),
    }
    return [
        Method("sandbox.create", create, create_params),
        Method("sandbox.get", get, {"id": sandbox_id()}),
        Method(
            "sandbox.list",
            list_,
            {"status": p.Field(p.one_of(*STATUSES)), "labels": p.Field(p.string_map())},
        ),
        Method("sandbox.pause", pause, {"id": sandbox_id()}),
        Method("sandbox.resume", resume, {"id": sandbox_id()}),
        Method(
            "sandbox.extend",
            extend,
            {"id": sandbox_id(), "ttl": p.Field(p.number(0.0, MAX_TTL), required=True)},
        ),
        Method("sandbox.remove", remove, {"id": sandbox_id()}),
        Method("sandbox.stats", stats, {"id": sandbox_id()}),
        Method("sandbox.snapshot", snapshot,
               {"id": sandbox_id(), "ref": p.Field(p.string(200))}),
    ]
