"""The ``image.*`` methods: list, ensure (pull when missing) and remove snapshots (SPEC §3).

Owns their wire names, argument schemas and reply shapes; the image service
does the work. It must not hold state or talk to a backend.
"""

from __future__ import annotations

from typing import Any

from sandboxd.rpc import params as p
from sandboxd.rpc.dispatcher import CallContext, Method
from sandboxd.services.images import ImageService


def build_image_methods(images: ImageService) -> list[Method]:
    async def list_(ctx: CallContext, args: dict[str, Any]) -> list[dict[str, Any]]:
        return await images.list(ctx.caller)

    async def ensure(ctx: CallContext, args: dict[str, Any]) -> dict[str, Any]:
        return await images.ensure(ctx.caller, args["ref"])

    async def remove(ctx: CallContext, args: dict[str, Any]) -> None:
        await images.remove(ctx.caller, args["ref"])

    ref = {"ref": p.Field(p.string(512), required=True)}
    return [
        Method("image.list", list_),
        Method("image.ensure", ensure, ref),
        Method("image.remove", remove, ref),
    ]
