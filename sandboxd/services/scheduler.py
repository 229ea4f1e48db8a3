"""One deadline scheduler for every sandbox: a heap and a single task.

Owns the "when is the next thing due" logic: ``set(key, when)`` arms or
re-arms a key (``None`` disarms), and the callback runs for each key whose
time has come. It must not know what a key means or what expiry does.
"""

from __future__ import annotations

import asyncio
import heapq
import time
from collections.abc import Awaitable, Callable

import structlog

from sandboxd.services.tasks import cancel_and_wait

log = structlog.get_logger("sandboxd.scheduler")


class DeadlineScheduler:
    def __init__(
        self,
        on_due: Callable[[str], Awaitable[None]],
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._on_due = on_due
        self._clock = clock
        self._when: dict[str, float] = {}
        self._heap: list[tuple[float, str]] = []
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._running: set[asyncio.Task[None]] = set()

    def set(self, key: str, when: float | None) -> None:
        if when is None:
            self._when.pop(key, None)
            return
        if self._when.get(key) == when:
            return
        self._when[key] = when
        heapq.heappush(self._heap, (when, key))
        if self._heap[0] == (when, key):
            self._wakeup.set()

    def due_at(self, key: str) -> float | None:
        return self._when.get(key)

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        await cancel_and_wait(self._task)
        self._task = None
        for task in list(self._running):
            task.cancel()
        if self._running:
            await asyncio.gather(*self._running, return_exceptions=True)

    def _pop_due(self, now: float) -> list[str]:
        due: list[str] = []
        while self._heap:
            when, key = self._heap[0]
            if self._when.get(key) != when:
                heapq.heappop(self._heap)  # stale entry: re-armed or disarmed
                continue
            if when > now:
                break
            heapq.heappop(self._heap)
            del self._when[key]
            due.append(key)
        return due

    async def _run(self) -> None:
        while True:
            for key in self._pop_due(self._clock()):
                task = asyncio.get_running_loop().create_task(self._fire(key))
                self._running.add(task)
                task.add_done_callback(self._running.discard)
            self._wakeup.clear()
            delay = (self._heap[0][0] - self._clock()) if self._heap else None
            try:
                if delay is None:
                    await self._wakeup.wait()
                elif delay > 0:
                    await asyncio.wait_for(self._wakeup.wait(), timeout=min(delay, 60.0))
            except TimeoutError:
                pass

    async def _fire(self, key: str) -> None:
        try:
            await self._on_due(key)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("deadline_callback_failed", key=key)
