"""The ``files.*`` methods: write, read, stat and list files in a sandbox (SPEC §3 files).

Owns their wire names, argument schemas and reply shapes; the file service
does the work through the sandbox's agent. It must not hold state or talk to
a backend.
"""

from __future__ import annotations

from typing import Any

from sandboxd.rpc import params as p
from sandboxd.rpc.dispatcher import CallContext, Method
from sandboxd.rpc.methods.sandbox import sandbox_id
from sandboxd.services.files import FileService

MAX_PATH = 4096


def build_file_methods(files: FileService, max_frame: int) -> list[Method]:
    async def write(ctx: CallContext, args: dict[str, Any]) -> None:
        await files.write(ctx.caller, args["id"], args["path"], args["data"],
                          mode=args.get("mode"), offset=args.get("offset"),
                          truncate=args.get("truncate"))

    async def read(ctx: CallContext, args: dict[str, Any]) -> bytes:
        return await files.read(ctx.caller, args["id"], args["path"],
                                offset=args.get("offset"), length=args.get("length"))

    async def stat(ctx: CallContext, args: dict[str, Any]) -> dict[str, Any]:
        return await files.stat(ctx.caller, args["id"], args["path"])

    async def list_(ctx: CallContext, args: dict[str, Any]) -> list[dict[str, Any]]:
        return await files.list(ctx.caller, args["id"], args["path"])

    where = {"id": sandbox_id(), "path": p.Field(p.string(MAX_PATH), required=True)}
    return [
        Method("files.write", write, {
            **where,
            "data": p.Field(p.binary(max_frame), required=True),
            "mode": p.Field(p.integer(0, 0o7777)),
            "offset": p.Field(p.integer(0, 2**62)),
            "truncate": p.Field(p.boolean()),
        }),
        Method("files.read", read, {
            **where,
            "offset": p.Field(p.integer(0, 2**62)),
            "length": p.Field(p.integer(0, 2**62)),
        }),
        Method("files.stat", stat, where),
        Method("files.list", list_, where),
    ]
