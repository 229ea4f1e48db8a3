"""Named-argument checking for RPC methods: the single place params are validated.

Owns the rule that ``params`` is ``[]`` or ``[{name: value}]``, that unknown
names are refused, and the small typed field checkers each method declares.
Every failure is an ``InvalidParams`` naming the argument. Pure logic: it
must not know what a method does.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from sandboxd.wire.errors import InvalidParams, TooLarge
from sandboxd.wire.units import parse_size

Check = Callable[[str, Any], Any]


@dataclass(frozen=True, slots=True)
class Field:
    check: Check
    required: bool = False


def validate(spec: Mapping[str, Field], params: list[Any]) -> dict[str, Any]:
    """Checked arguments by name; absent optional ones are simply missing."""
    if not params:
        args: Mapping[Any, Any] = {}
    elif len(params) == 1 and isinstance(params[0], dict):
        args = params[0]
    else:
        raise InvalidParams(
            "params must be [] or an array holding exactly one map of named arguments."
        )
    unknown = [
        str(k).encode("utf-8", "backslashreplace").decode() for k in args if k not in spec
    ]
    if unknown:
        known = ", ".join(sorted(spec)) or "none"
        raise InvalidParams(
            f"Unknown argument {', '.join(repr(u) for u in sorted(unknown))}; "
            f"this method takes: {known}.",
            {"unknown": sorted(unknown)},
        )
    out: dict[str, Any] = {}
    for name, field in spec.items():
        if name not in args or args[name] is None:
            if field.required:
                raise InvalidParams(f"Missing required argument '{name}'.", {"argument": name})
            continue
        out[name] = field.check(name, args[name])
    return out


def _bad(name: str, expected: str, value: Any) -> InvalidParams:
    shown = repr(value)
    if len(shown) > 60:
        shown = shown[:57] + "..."
    return InvalidParams(f"Argument '{name}' must be {expected}, got {shown}.", {"argument": name})


def string(max_len: int = 4096, allow_empty: bool = False) -> Check:
    def check(name: str, value: Any) -> str:
        if isinstance(value, bytes):
            try:
                value = value.decode("utf-8")
            except UnicodeDecodeError:
                raise _bad(name, "a UTF-8 string", value) from None
        if not isinstance(value, str) or (not value and not allow_empty):
            raise _bad(name, "a non-empty string", value)
        if not value.isascii():
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:  # invalid UTF-8 on the wire, decoded with escapes
                raise _bad(name, "valid UTF-8", value) from None
        if len(value) > max_len or "\0" in value:
            raise _bad(name, f"a string of at most {max_len} characters without NUL", value)
        return value

    return check


def integer(lo: int = 0, hi: int = 2**63 - 1) -> Check:
    def check(name: str, value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
            raise _bad(name, f"an integer from {lo} to {hi}", value)
        return value

    return check


def number(lo: float = 0.0, hi: float = 1e12) -> Check:
    def check(name: str, value: Any) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise _bad(name, "a number", value)
        if not math.isfinite(value) or not lo <= value <= hi:
            raise _bad(name, f"a number from {lo:g} to {hi:g}", value)
        return float(value)

    return check


def boolean() -> Check:
    def check(name: str, value: Any) -> bool:
        if not isinstance(value, bool):
            raise _bad(name, "true or false", value)
        return value

    return check


def binary(max_len: int) -> Check:
    def check(name: str, value: Any) -> bytes:
        if isinstance(value, str):
            value = value.encode("utf-8")
        if not isinstance(value, (bytes, bytearray)):
            raise _bad(name, "bytes (msgpack bin)", value)
        if len(value) > max_len:
            raise TooLarge(
                f"Argument '{name}' is {len(value)} bytes, over the limit of {max_len}.",
                {"argument": name, "limit": max_len},
            )
        return bytes(value)

    return check


def size() -> Check:
    def check(name: str, value: Any) -> int:
        try:
            return parse_size(value)
        except ValueError as exc:
            raise InvalidParams(f"Argument '{name}': {exc}.", {"argument": name}) from None

    return check


def string_list(max_items: int = 4096, item_len: int = 65536, min_items: int = 0) -> Check:
    item = string(item_len, allow_empty=True)

    def check(name: str, value: Any) -> list[str]:
        if not isinstance(value, list) or not min_items <= len(value) <= max_items:
            raise _bad(name, f"an array of {min_items} to {max_items} strings", value)
        return [item(f"{name}[{i}]", v) for i, v in enumerate(value)]

    return check


def argv(max_bytes: int) -> Check:
    """A command line: 1 or more strings, at most ``max_bytes`` together."""
    items = string_list(max_items=65536, item_len=max_bytes, min_items=1)

    def check(name: str, value: Any) -> list[str]:
        args: list[str] = items(name, value)
        total = sum(len(a.encode()) + 1 for a in args)
        if total > max_bytes:
            raise TooLarge(
                f"Argument '{name}' is {total} bytes, over the limit of {max_bytes}.",
                {"argument": name, "limit": max_bytes},
            )
        return args

    return check


def string_map(max_items: int = 256, key_len: int = 256, value_len: int = 65536) -> Check:
    def check(name: str, value: Any) -> dict[str, str]:
        if not isinstance(value, dict) or len(value) > max_items:
            raise _bad(name, f"a map of at most {max_items} string keys to strings", value)
        out: dict[str, str] = {}
        for key, item in value.items():
            k = string(key_len)(f"{name} key", key)
            out[k] = string(value_len, allow_empty=True)(f"{name}[{k!r}]", item)
        return out

    return check


def one_of(*choices: str) -> Check:
    def check(name: str, value: Any) -> str:
        if value not in choices:
            raise _bad(name, "one of " + ", ".join(choices), value)
        return str(value)

    return check
