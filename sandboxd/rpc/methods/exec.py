"""The command methods: ``sandbox.exec`` (buffered).

Owns its wire name, argument schema and reply shape (SPEC §3 exec). The exec
service does the work. It must not hold state or talk to a backend.
"""

from __future__ import annotations

from typing import Any

from sandboxd.rpc import params as p
from sandboxd.rpc.dispatcher import CallContext, Method
from sandboxd.rpc.methods.sandbox import sandbox_id
from sandboxd.services.execs import ExecService

MAX_EXEC_TIMEOUT = 7 * 86400.0
MAX_ARGV_BYTES = 1024 * 1024  # a command line, all arguments together (Linux allows ~2 MiB)


def build_exec_methods(execs: ExecService, max_frame: int) -> list[Method]:
    async def exec_(ctx: CallContext, args: dict[str, Any]) -> dict[str, Any]:
        return await execs.exec(ctx.caller, args.pop("id"), args)

    exec_params = {
        "id": sandbox_id(),
        "cmd": p.Field(p.argv(MAX_ARGV_BYTES), required=True),
        "env": p.Field(p.string_map()),
        "workdir": p.Field(p.string(1024)),
        "user": p.Field(p.string(256)),
        "stdin": p.Field(p.binary(max_frame)),
        "timeout": p.Field(p.number(0.001, MAX_EXEC_TIMEOUT)),
        "max_output": p.Field(p.integer(0, 2**40)),
    }
    return [Method("sandbox.exec", exec_, exec_params, cancel_on_disconnect=True)]
