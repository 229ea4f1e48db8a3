"""The ``daemon.*`` methods: ``daemon.ping`` and ``daemon.info``.

Owns the shape of ``daemon.info`` (SPEC §3). It must not talk to the engine
itself: the engine's state comes from ``services.health`` through the
callable the daemon binds.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Any

from sandboxd.rpc.dispatcher import CallContext, Method
from sandboxd.services.registry import Registry
from sandboxd.wire.version import API_VERSION, __version__


def build_daemon_methods(
    registry: Registry,
    engine_info: Callable[[], Awaitable[dict[str, Any]]],
    disk_info: Callable[[], dict[str, Any]],
    pool_info: Callable[[], dict[str, Any]],
) -> list[Method]:
    """``engine_info()`` reports the engine (``services.health.EngineInfo``),
    ``disk_info()`` how disk is held (``services.diskguard``), ``pool_info()`` each warm
    pool (``services.pool``)."""
    started_at = time.monotonic()

    def ping(ctx: CallContext, args: dict[str, Any]) -> str:
        return "pong"

    async def info(ctx: CallContext, args: dict[str, Any]) -> dict[str, Any]:
        return {
            "version": __version__,
            "api_version": API_VERSION,
            "engine": await engine_info(),
            "sandboxes": len(registry.list(ctx.caller, None, None)),
            "uptime": round(time.monotonic() - started_at, 3),
            "pool": pool_info(),
            "disk": disk_info(),
            "caller": ctx.caller.to_wire(),
        }

    return [
        Method("daemon.ping", ping, during_shutdown=True),
        Method("daemon.info", info, during_shutdown=True),
    ]
