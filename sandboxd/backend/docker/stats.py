"""Fast ``sandbox.stats`` figures for Docker containers, with their per-container state.

Owns choosing each container's stats source once (its cgroup files on this
host, found from its main process; else the engine's one-shot stats), keeping
the previous sample so CPU is a rate, and dropping that state when the
container's main process changes. It must not check sandbox state or
ownership.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Any

import structlog

from sandboxd.backend.docker import cgroupstats
from sandboxd.backend.docker.engine import Engine
from sandboxd.backend.docker.enginestats import summarize as summarize_engine_stats
from sandboxd.backend.docker.proctree import process_alive
from sandboxd.wire.errors import Conflict
from sandboxd.wire.units import parse_time

log = structlog.get_logger("sandboxd.backend.docker")

STATS_WINDOW = 0.05  # seconds between two engine samples when no previous one is fresh
STATS_FRESH = 30.0


@dataclass
class _Source:
    reader: cgroupstats.CgroupReader | None
    started_ns: int | None
    previous: cgroupstats.Sample | None = None
    engine_previous: tuple[float, dict[str, Any]] | None = None


def _ended(cid: str) -> Conflict:
    return Conflict(
        "The sandbox's main process has ended: there is nothing left to measure; "
        "remove it and create a new one.",
        {"status": "stopped", "container_id": cid},
    )


class StatsReader:
    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        self._sources: dict[str, _Source] = {}

    def forget(self, container_id: str) -> None:
        self._sources.pop(container_id, None)

    async def stats(self, cid: str) -> dict[str, Any]:
        """Figures of a live container; ``Conflict`` once its main process has ended
        (its cgroup may linger with zeros, and the engine still answers for it)."""
        source = self._sources.get(cid)
        if source is None:
            source = self._sources[cid] = await self._source(cid)
        if source.reader is not None:
            try:
                sample = source.reader.sample()
            except OSError:
                source.reader = None  # the container's process changed: use the engine
            else:
                if process_alive(source.reader.pid):
                    previous, source.previous = source.previous, sample
                    return cgroupstats.summarize(sample, previous, source.started_ns)
                self.forget(cid)
                raise _ended(cid)
        info = await self._engine.inspect(cid)
        state = info.get("State") or {}
        if not state.get("Running"):
            self.forget(cid)
            raise _ended(cid)
        return await self._engine_stats(cid, source)

    async def _source(self, cid: str) -> _Source:
        info = await self._engine.inspect(cid)
        st = info.get("State") or {}
        started_ns = None
        if st.get("StartedAt"):
            try:
                age = time.time() - parse_time(st["StartedAt"][:26].rstrip("Z") + "Z")
                started_ns = time.monotonic_ns() - int(age * 1e9)
            except ValueError:
                pass
        reader = None
        pid = int(st.get("Pid") or 0)
        if pid > 0:
            try:
                reader = cgroupstats.CgroupReader(pid)
            except (OSError, ValueError):
                log.info("stats_from_engine", container_id=cid)
        return _Source(reader=reader, started_ns=started_ns)

    async def _engine_stats(self, cid: str, source: _Source) -> dict[str, Any]:
        now = time.monotonic()
        previous = source.engine_previous
        if previous is None or now - previous[0] > STATS_FRESH:
            first = await self._engine.stats_once(cid)
            await asyncio.sleep(STATS_WINDOW)
            previous = (now, first)
        sample = await self._engine.stats_once(cid)
        source.engine_previous = (time.monotonic(), sample)
        return summarize_engine_stats(sample, previous[1])
