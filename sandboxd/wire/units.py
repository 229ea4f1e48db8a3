"""Wire units: sizes with Docker's binary suffixes and RFC 3339 timestamps.

Owns the parsing of size strings such as ``"512m"`` and the formatting of
times as RFC 3339 UTC with milliseconds (SPEC §2). Pure functions only; must
not import anything heavy (the client may use it).
"""

from __future__ import annotations

import datetime as _dt
import re

_UNITS = {"": 1, "b": 1, "k": 1024, "m": 1024**2, "g": 1024**3}
MAX_SIZE = 2**63 - 1  # what the engine (and any int64 field) can hold
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([bkmg]?)b?\s*$", re.IGNORECASE)


def parse_size(value: object) -> int:
    """Bytes from an int or a string like ``"512m"``; ``ValueError`` explains a bad one."""
    if isinstance(value, bool):
        raise ValueError("expected a size in bytes or a string like '512m', got a boolean")
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"a size cannot be negative, got {value}")
        if value > MAX_SIZE:
            raise ValueError(f"a size must be at most {MAX_SIZE} bytes")
        return value
    if isinstance(value, str):
        match = _SIZE_RE.match(value)
        if match is None:
            raise ValueError(
                f"{value!r} is not a size: use bytes or a number with b, k, m or g (e.g. '512m')"
            )
        number, unit = match.groups()
        whole, _, fraction = number.partition(".")
        scale = _UNITS[unit.lower()]
        # Exact arithmetic: a float would overflow (or round) on long digit strings.
        size = int(whole) * scale
        if fraction:
            size += int(fraction) * scale // 10 ** len(fraction)
        if size > MAX_SIZE:
            raise ValueError(f"{value[:40]!r} is more than {MAX_SIZE} bytes")
        return size
    raise ValueError(
        f"expected a size in bytes or a string like '512m', got {type(value).__name__}"
    )


def format_time(ts: float) -> str:
    """RFC 3339 UTC with milliseconds: ``2026-11-26T15:04:05.123Z``."""
    moment = _dt.datetime.fromtimestamp(ts, tz=_dt.UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


def parse_time(text: str) -> float:
    """Seconds since the epoch from an RFC 3339 string (the inverse of ``format_time``)."""
    if text.endswith("Z"):
        text = text[:-1] + "+00:00"
    return _dt.datetime.fromisoformat(text).timestamp()
