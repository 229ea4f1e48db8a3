"""The ``events.*`` RPC methods: their argument schemas and thin handlers.

Owns the wire names ``events.subscribe`` and ``events.unsubscribe`` (SPEC §3
events), the checks of their arguments, and the shape of their replies. The
handlers are plain functions, so they run inline: a subscription's replay
snapshot and its registration for live events happen in one step, and the
reply is written before any of its events. It must not hold state or
deliver events itself (``services.eventbus`` and ``rpc.delivery`` do).
"""

from __future__ import annotations

from typing import Any

from sandboxd.rpc import params as p
from sandboxd.rpc.delivery import subscribe as deliver_to
from sandboxd.rpc.dispatcher import CallContext, Method
from sandboxd.services.eventbus import EventBus
from sandboxd.wire.errors import InvalidParams

MAX_TYPES = 64
MAX_SEQ = 2**63 - 1


def _type_patterns(name: str, value: Any) -> list[str]:
    patterns: list[str] = p.string_list(MAX_TYPES, 256)(name, value)
    for i, pattern in enumerate(patterns):
        stem = pattern[:-2] if pattern.endswith(".*") else pattern
        if pattern != "*" and (not stem or "*" in stem):
            raise InvalidParams(
                f"Argument '{name}[{i}]' must be an event type such as 'sandbox.created', "
                f"a prefix such as 'sandbox.*', or '*'; got {pattern!r}.",
                {"argument": name},
            )
    return patterns


def build_event_methods(bus: EventBus) -> list[Method]:
    def subscribe(ctx: CallContext, args: dict[str, Any]) -> dict[str, Any]:
        sub = deliver_to(
            bus,
            ctx,
            types=args.get("types"),
            sandbox=args.get("sandbox"),
            labels=args.get("labels"),
            since=args.get("since"),
        )
        return {"subscription": sub.id, "last_seq": bus.last_seq_for(ctx.caller)}

    def unsubscribe(ctx: CallContext, args: dict[str, Any]) -> None:
        bus.unsubscribe(ctx, args["subscription"])

    return [
        Method(
            "events.subscribe",
            subscribe,
            {
                "types": p.Field(_type_patterns),
                "sandbox": p.Field(p.string(128)),
                "labels": p.Field(p.string_map(max_items=256, value_len=4096)),
                "since": p.Field(p.integer(0, MAX_SEQ)),
            },
        ),
        Method(
            "events.unsubscribe",
            unsubscribe,
            {"subscription": p.Field(p.string(128), required=True)},
            during_shutdown=True,
        ),
    ]
