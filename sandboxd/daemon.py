"""The daemon's life: wire the parts together, serve, and stop in order.

Owns start-up (listener bound or inherited from systemd, readiness
notification, the watchdog and the scheduler) and the ordered, bounded
shutdown: tell systemd STOPPING=1, stop accepting, let in-flight calls finish
within the grace period, cancel the rest, close connections, leave the
sandboxes running (or remove them when configured to). It must not
implement any RPC method itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import grp
import os
import signal
import socket
import sqlite3
from collections.abc import Callable
from typing import Any

import structlog

from . import __version__, systemd
from .config import Config
from .dispatcher import Dispatcher
from .engine import Engine
from .eventlog import EventLogError
from .eventmethods import build_event_methods
from .events import EventBus
from .methods import App, build_methods
from .models import SandboxRecord
from .reconcile import EngineWatcher, Reconciler
from .sandboxes import SandboxManager
from .server import RpcServer, StartupError, bind_unix_socket
from .state import StateStore
from .tasks import cancel_and_wait

log = structlog.get_logger("sandboxd.daemon")

GC_THRESHOLD = 20_000
STARTUP_SYNC_WAIT = 3.0  # seconds to wait for the engine before serving without it


def admin_check(config: Config) -> tuple[int, set[int]]:
    """(daemon uid, admin gids) for deciding who is an admin."""
    gids: set[int] = set()
    if config.admin_group:
        try:
            gids.add(grp.getgrnam(config.admin_group).gr_gid)
        except KeyError:
            raise StartupError(f"admin_group: no group named {config.admin_group!r}") from None
    return os.getuid(), gids


def make_is_admin(config: Config) -> Callable[[int, int, frozenset[int]], bool]:
    own_uid, admin_gids = admin_check(config)

    def is_admin(uid: int, gid: int, groups: frozenset[int]) -> bool:
        if uid in (0, own_uid):
            return True
        if not admin_gids:
            return False
        return gid in admin_gids or bool(admin_gids & groups)

    return is_admin


def _listener(config: Config) -> tuple[socket.socket, bool]:
    inherited = [s for s in systemd.listen_fds() if s.family == socket.AF_UNIX]
    if inherited:
        return inherited[0], True
    return bind_unix_socket(config.socket, config.socket_group), False


async def serve(config: Config) -> int:
    """Run until SIGTERM/SIGINT; the exit status."""
    loop = asyncio.get_running_loop()
    notifier = systemd.Notifier.from_env()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    engine = Engine(config.engine_url)
    store = StateStore(config.state_dir)
    bus = EventBus(
        config.state_dir, retain=config.events.retain, queue_size=config.events.queue_size
    )
    try:
        await bus.open()
    except (OSError, sqlite3.Error, EventLogError) as exc:
        raise StartupError(f"state_dir {config.state_dir}: {exc}") from None

    def publish(kind: str, record: SandboxRecord | None, data: dict[str, Any]) -> None:
        if record is None:
            bus.publish(kind, data=data)
            return
        bus.publish(
            kind,
            sandbox_id=record.id,
            sandbox_name=record.name,
            owner_uid=record.owner_uid,
            labels=record.labels,
            data=data,
        )

    manager = SandboxManager(engine, config, store, publish)
    try:
        adopted = await manager.load()
    except (OSError, sqlite3.Error) as exc:
        raise StartupError(f"state_dir {config.state_dir}: {exc}") from None
    watcher = EngineWatcher(
        Reconciler(manager, engine, config.instance, config.create_grace),
        relist_interval=config.relist_interval,
    )
    app = App(config=config, engine=engine, manager=manager)
    dispatcher = Dispatcher(build_methods(app) + build_event_methods(bus))
    server = RpcServer(dispatcher, max_frame=config.max_frame, is_admin=make_is_admin(config))
    sock, activated = _listener(config)
    path = sock.getsockname() or config.socket
    watcher.start()
    # Ready once the engine's view is adopted, or without it when the engine is away.
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(watcher.synced.wait(), timeout=STARTUP_SYNC_WAIT)
    await server.start(sock)
    manager.scheduler.start()
    watchdog = loop.create_task(notifier.run_watchdog())
    log.info(
        "daemon_started",
        version=__version__,
        socket=path,
        socket_activated=activated,
        pid=os.getpid(),
        sandboxes=adopted,
        engine_reachable=watcher.reachable,
    )
    bus.publish(
        "daemon.started",
        data={"version": __version__, "pid": os.getpid(), "sandboxes": manager.count()},
    )
    # Start-up objects (modules, config, adopted records) never become garbage: keep them
    # out of every collection, and collect less often (a request allocates a few objects).
    gc.freeze()
    gc.set_threshold(GC_THRESHOLD, 20, 20)
    notifier.ready(f"serving on {path}")

    await stop.wait()

    notifier.stopping(f"stopping: finishing {server.in_flight()} calls")
    bus.publish("daemon.stopping", data={"in_flight": server.in_flight()})
    log.info("daemon_stopping", in_flight=server.in_flight())
    server.stop_accepting()
    cancelled = await server.drain(config.shutdown_grace)
    await bus.deliver_pending(within=1.0)
    server.close_connections()
    if config.cleanup_on_exit:
        await manager.remove_all()
    await manager.scheduler.stop()
    await watcher.stop()
    await store.close()
    await bus.close()
    await cancel_and_wait(watchdog)
    await engine.close()
    if not activated:
        with contextlib.suppress(OSError):
            os.unlink(config.socket)
    log.info("daemon_stopped", cancelled_calls=cancelled)
    return 0
