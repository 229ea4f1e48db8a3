"""The command methods: ``sandbox.exec`` (buffered) and the streaming ``exec.*`` (SPEC §3).

Owns their wire names, argument schemas and reply shapes. The exec service
runs buffered commands, the streams service streamed ones; the connection
follows a streamed command's output (``rpc.follower``). It must not hold
state or talk to a backend.
"""

from __future__ import annotations

from typing import Any

from sandboxd.rpc import params as p
from sandboxd.rpc.dispatcher import CallContext, Method
from sandboxd.rpc.follower import ConnectionFollower
from sandboxd.rpc.methods.sandbox import sandbox_id
from sandboxd.services.execs import ExecService
from sandboxd.services.streams import ExecStreams, signal_number

MAX_EXEC_TIMEOUT = 7 * 86400.0
MAX_ARGV_BYTES = 1024 * 1024  # a command line, all arguments together (Linux allows ~2 MiB)
MAX_WRITE = 1024 * 1024  # one exec.write: the agent's stdin window


def _exec_id() -> p.Field:
    return p.Field(p.string(64), required=True)


def build_exec_methods(execs: ExecService, streams: ExecStreams, max_frame: int) -> list[Method]:
    async def exec_(ctx: CallContext, args: dict[str, Any]) -> dict[str, Any]:
        return await execs.exec(ctx.caller, args.pop("id"), args)

    async def start(ctx: CallContext, args: dict[str, Any]) -> dict[str, Any]:
        return await streams.start(ctx.caller, args.pop("id"), args,
                                   ConnectionFollower.of(ctx))

    async def write(ctx: CallContext, args: dict[str, Any]) -> None:
        await streams.write(ctx.caller, args["exec_id"], args["data"])

    def close_stdin(ctx: CallContext, args: dict[str, Any]) -> None:
        streams.close_stdin(ctx.caller, args["exec_id"])

    async def kill(ctx: CallContext, args: dict[str, Any]) -> None:
        await streams.kill(ctx.caller, args["exec_id"], signal_number(args.get("signal", 9)))

    def resize(ctx: CallContext, args: dict[str, Any]) -> None:
        streams.resize(ctx.caller, args["exec_id"], args["rows"], args["cols"])

    async def wait(ctx: CallContext, args: dict[str, Any]) -> dict[str, Any]:
        return await streams.wait(ctx.caller, args["exec_id"])

    async def attach(ctx: CallContext, args: dict[str, Any]) -> dict[str, Any]:
        return await streams.attach(ctx.caller, args["exec_id"], args.get("offset", 0),
                                    ConnectionFollower.of(ctx))

    def list_(ctx: CallContext, args: dict[str, Any]) -> list[dict[str, Any]]:
        return streams.list(ctx.caller, args["id"])

    common = {
        "id": sandbox_id(),
        "cmd": p.Field(p.argv(MAX_ARGV_BYTES), required=True),
        "env": p.Field(p.string_map()),
        "workdir": p.Field(p.string(1024)),
        "user": p.Field(p.string(256)),
        "timeout": p.Field(p.number(0.001, MAX_EXEC_TIMEOUT)),
    }
    exec_params = {
        **common,
        "stdin": p.Field(p.binary(max_frame)),
        "max_output": p.Field(p.integer(0, 2**40)),
    }
    size = p.Field(p.integer(1, 65535))
    start_params = {
        **common,
        "stdin": p.Field(p.boolean()),
        "tty": p.Field(p.boolean()),
        "detach": p.Field(p.boolean()),
        "rows": p.Field(p.integer(0, 65535)),
        "cols": p.Field(p.integer(0, 65535)),
    }
    signal_field = p.Field(lambda name, value: value)  # checked by signal_number
    return [
        Method("sandbox.exec", exec_, exec_params, cancel_on_disconnect=True),
        Method("exec.start", start, start_params),
        Method("exec.write", write,
               {"exec_id": _exec_id(), "data": p.Field(p.binary(MAX_WRITE), required=True)}),
        Method("exec.close_stdin", close_stdin, {"exec_id": _exec_id()}),
        Method("exec.kill", kill, {"exec_id": _exec_id(), "signal": signal_field}),
        Method("exec.resize", resize,
               {"exec_id": _exec_id(), "rows": p.Field(size.check, required=True),
                "cols": p.Field(size.check, required=True)}),
        Method("exec.wait", wait, {"exec_id": _exec_id()}),
        Method("exec.attach", attach,
               {"exec_id": _exec_id(), "offset": p.Field(p.integer(0, 2**63 - 1))}),
        Method("exec.list", list_, {"id": sandbox_id()}),
    ]
