"""Per-uid quotas (SPEC §4): how many sandboxes, how much memory, how many running commands.

Owns the checks that turn "this would go over the caller's limit" into
``QuotaExceeded`` with the figures. Pure logic: the caller passes what the
uid already holds; no I/O, no asyncio.
"""

from __future__ import annotations

from collections.abc import Iterable

from sandboxd.core.records import SandboxRecord
from sandboxd.core.settings import Quota
from sandboxd.wire.errors import QuotaExceeded


def check_create(quota: Quota, mine: Iterable[SandboxRecord], memory: int) -> None:
    """Refuse a new sandbox of ``memory`` bytes for a uid that holds ``mine``."""
    owned = list(mine)
    if quota.max_sandboxes is not None and len(owned) >= quota.max_sandboxes:
        raise QuotaExceeded(
            f"You already have {len(owned)} sandboxes, the most allowed per user; "
            "remove one first.",
            {"limit": quota.max_sandboxes, "used": len(owned)},
        )
    if quota.max_memory is not None:
        used = sum(r.memory for r in owned)
        if used + memory > quota.max_memory:
            raise QuotaExceeded(
                f"This sandbox's memory would bring your total to {used + memory} bytes, "
                f"over your limit of {quota.max_memory}.",
                {"limit": quota.max_memory, "used": used},
            )


def check_execs(quota: Quota, running: int) -> None:
    """Refuse one more running command for a uid that has ``running`` of them."""
    if running >= quota.max_execs:
        raise QuotaExceeded(
            f"You already have {running} commands running, the most allowed at once; "
            "wait for one to finish.",
            {"limit": quota.max_execs, "used": running},
        )
