"""``image.ensure`` with live pull progress: the one image call that is more than a request.

This module owns ``ensure_image``: without a progress callback it is the
plain ``image.ensure`` call; with one, it subscribes to the caller's
``image.pull.progress`` and ``image.pulled`` events *before* asking (so no
event of the pull can be missed), hands each progress event of that
reference to the callback as the connection reads it, while the call is
still waiting for its reply, and once the reply says the image was pulled,
waits a moment for that pull's ``image.pulled`` (the daemon may send the
last events just after the reply), so that every progress event of the pull
has been handed over when ``ensure_image`` returns. Then it unsubscribes.

The callback runs inline, in arrival order, while the connection reads
(``protocol.NotificationHandler``): it must be quick and must not call the
client. An exception it raises stops further calls to it and is raised once
the reply came (the daemon's pull goes on regardless: it never stops a pull
a caller stopped waiting for). It must not touch sockets or asyncio
(``connection`` and ``_compat`` do). Written once for both sides:
``scripts/unasync.py`` derives the blocking module from the asyncio one.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable
from typing import Any

from sandboxd.wire.errors import ConnectionLost, SandboxdError

from ..channels import FINAL, Item, Lanes
from ..connection import AsyncConnection
from ..exceptions import ChannelClosed
from ..models import EnsureResult, Event, PullProgress, _as_map, _str
from ..protocol import named_params

__all__ = ["DRAIN_TIMEOUT", "PROGRESS", "PULLED", "ProgressCallback", "ensure_image"]

log = logging.getLogger("sandboxd_client.images")

PROGRESS = "image.pull.progress"
PULLED = "image.pulled"
DRAIN_TIMEOUT = 5.0  # seconds to wait, after the reply, for the pull's image.pulled event
_UNSUBSCRIBE_TIMEOUT = 2.0

ProgressCallback = Callable[[PullProgress], None]
"""Receives the data of each ``image.pull.progress`` event of the pull, in order."""


class _PullWatch:
    """One ``ensure_image`` call's view of its subscription's events."""

    def __init__(self, ref: str, on_progress: ProgressCallback) -> None:
        self.ref = ref
        self.on_progress = on_progress
        # An admin sees every uid's events, and the daemon tells each uid waiting on a
        # pull of its own: keep only ours (the daemon knows us by our uid, SO_PEERCRED).
        self.uid = os.getuid()
        self.subscription: str | None = None
        self.ended = False  # the pull's image.pulled came (or the subscription was cut off)
        self.error: Exception | None = None

    def subscribed(self, reply: Any) -> str:
        """Routed with the subscribe reply: events of the subscription come after it."""
        self.subscription = _str(_as_map(reply, "the events.subscribe reply").get("subscription"))
        return self.subscription

    def _ours(self, params: list[Any]) -> Event | None:
        if (self.subscription is None or len(params) < 2
                or _str(params[0]) != self.subscription):
            return None
        try:
            event = Event.from_wire(params[1])
        except SandboxdError:
            return None
        if event.owner_uid is not None and event.owner_uid != self.uid:
            return None
        return event if _str(event.data.get("ref")) == self.ref else None

    def on_event(self, params: list[Any]) -> None:
        """The ``event`` notification handler: progress to the callback, the end noted."""
        event = self._ours(params)
        if event is None or self.ended:
            return
        if event.type == PULLED:
            self.ended = True
        elif event.type == PROGRESS and self.error is None:
            try:
                self.on_progress(PullProgress.from_wire(event.data))
            except Exception as exc:  # raised by ensure_image once the reply came
                self.error = exc

    def on_lagged(self, params: list[Any]) -> None:
        """The daemon cut the subscription off: no more events will come on it."""
        if params and self.subscription is not None and _str(params[0]) == self.subscription:
            log.warning("sandboxd: progress events of pulling %s were cut off", self.ref)
            self.ended = True

    def is_end(self, item: Item) -> bool:
        """Whether a notification is the last one this watch needs."""
        method, params = item
        if method == "events.lagged":
            return True
        event = self._ours(params)
        return event is not None and event.type == PULLED


async def ensure_image(
    conn: AsyncConnection, ref: str, on_progress: ProgressCallback | None = None
) -> EnsureResult:
    """``image.ensure {ref}``, pulling when missing; ``on_progress`` gets each progress event."""
    if on_progress is None:
        return EnsureResult.from_wire(await conn.call("image.ensure", named_params({"ref": ref})))
    watch = _PullWatch(ref, on_progress)
    removers = [conn.on_notification("event", watch.on_event),
                conn.on_notification("events.lagged", watch.on_lagged)]
    try:
        types = named_params({"types": [PROGRESS, PULLED]})
        await conn.call("events.subscribe", types, on_result=watch.subscribed)
        try:
            result = EnsureResult.from_wire(
                await conn.call("image.ensure", named_params({"ref": ref})))
            if result.pulled:
                await _await_end(conn, watch)
        finally:
            await _unsubscribe(conn, watch.subscription)
    finally:
        for remove in removers:
            remove()
    if watch.error is not None:
        raise watch.error
    return result


async def _await_end(conn: AsyncConnection, watch: _PullWatch) -> None:
    """Wait (at most ``DRAIN_TIMEOUT``) for the pull's ``image.pulled``, if not seen yet."""
    assert watch.subscription is not None
    # Opened before looking at ``ended``: an end routed meanwhile is in one or the other.
    channel = conn.open_channel(("event", "events.lagged"), key=watch.subscription,
                                maxsize=None, lanes=Lanes(is_final=watch.is_end))
    try:
        if not watch.ended:
            try:
                await channel.get(DRAIN_TIMEOUT, lane=FINAL)
            except TimeoutError:
                log.debug("sandboxd: no image.pulled event for %s within %gs", watch.ref,
                          DRAIN_TIMEOUT)
            except (ConnectionLost, ChannelClosed):
                pass
    finally:
        channel.close()


async def _unsubscribe(conn: AsyncConnection, subscription: str | None) -> None:
    if subscription is None or conn.closed:
        return
    params = named_params({"subscription": subscription})
    with contextlib.suppress(SandboxdError, TimeoutError):
        await conn.call("events.unsubscribe", params, timeout=_UNSUBSCRIBE_TIMEOUT)
