"""The daemon's life: wire the layers together, serve, and stop in order.

Owns the wiring (the Docker backend injected into the services, the services
into the RPC methods), start-up (state loaded, engine synced or given up on
after a short wait, listener bound or inherited from systemd, readiness,
watchdog, scheduler) and the ordered, bounded, exception-safe shutdown: tell
systemd STOPPING=1, stop accepting, let in-flight calls finish within the
grace period, cancel the rest (their clean-up bounded too), let subscribers
receive ``daemon.stopping``, close connections, leave the sandboxes running
(or remove them when configured to, asking systemd for more time as it
goes). A second SIGTERM or SIGINT exits at once. Any failure before the
daemon is ready is a ``StartupError``. It must not implement any RPC method
itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import grp
import os
import resource
import signal
import socket
import sqlite3
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import structlog

from sandboxd import systemd
from sandboxd.agent import AgentMissing, agent_binary
from sandboxd.backend.docker import DockerBackend
from sandboxd.config import Config
from sandboxd.core.policy import resolve_create
from sandboxd.core.records import SandboxRecord
from sandboxd.logsetup import RateLimitedErrors, flush_logs
from sandboxd.rpc.dispatcher import Dispatcher
from sandboxd.rpc.methods.daemon import build_daemon_methods
from sandboxd.rpc.methods.events import build_event_methods
from sandboxd.rpc.methods.exec import build_exec_methods
from sandboxd.rpc.methods.files import build_file_methods
from sandboxd.rpc.methods.image import build_image_methods
from sandboxd.rpc.methods.sandbox import build_sandbox_methods
from sandboxd.rpc.server import RpcServer, StartupError, bind_unix_socket
from sandboxd.services.agents import AgentHub
from sandboxd.services.diskguard import DiskGuard
from sandboxd.services.eventbus import EventBus
from sandboxd.services.execs import ExecService
from sandboxd.services.files import FileService
from sandboxd.services.health import EngineInfo
from sandboxd.services.images import ImageService
from sandboxd.services.pool import PoolService
from sandboxd.services.reconcile import EngineWatcher, Reconciler
from sandboxd.services.registry import Registry
from sandboxd.services.sandboxes import SandboxService
from sandboxd.services.streams import ExecStreams
from sandboxd.services.tasks import cancel_and_wait
from sandboxd.store.eventlog import EventLogError
from sandboxd.store.state import StateStore
from sandboxd.wire.version import __version__

log = structlog.get_logger("sandboxd.daemon")

GC_THRESHOLD = 20_000
STARTUP_SYNC_WAIT = 3.0  # seconds to wait for the engine before serving without it
STEP_MIN = 0.5  # every shutdown step gets at least this long, even past the grace
CLEANUP_EXTEND = 30.0  # seconds asked of systemd at a time while removing sandboxes
REMOVALS_WAIT = 3.0  # seconds deletions under way may take to finish at shutdown


def agent_path(config: Config) -> str | None:
    """The agent binary sandboxes run, or None (then every command uses the engine)."""
    if config.agent_path == "none":
        return None
    if config.agent_path:
        if not os.access(config.agent_path, os.X_OK):
            raise StartupError(f"agent_path: {config.agent_path} is not an executable file")
        return config.agent_path
    try:
        return str(agent_binary())
    except AgentMissing as exc:
        log.warning("agent_missing", error=str(exc))
        return None


def make_is_admin(config: Config) -> Callable[[int, int, frozenset[int]], bool]:
    """Who is an admin: root, the daemon's own uid, and members of ``admin_group``."""
    admin_gids: set[int] = set()
    if config.admin_group:
        try:
            admin_gids.add(grp.getgrnam(config.admin_group).gr_gid)
        except KeyError:
            raise StartupError(f"admin_group: no group named {config.admin_group!r}") from None
    own_uid = os.getuid()

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


@dataclass
class Daemon:
    """Every long-lived part, wired; built by ``build`` and run by ``serve``."""

    config: Config
    backend: DockerBackend
    store: StateStore
    bus: EventBus
    registry: Registry
    sandboxes: SandboxService
    agents: AgentHub
    execs: ExecService
    watcher: EngineWatcher
    disk_guard: DiskGuard
    server: RpcServer
    pool: PoolService


async def build(config: Config) -> Daemon:
    """Open the state and wire the layers; ``StartupError`` for anything that stops it."""
    is_admin = make_is_admin(config)
    backend = DockerBackend(
        config.engine_url,
        command=config.defaults.command,
        nofile=config.defaults.nofile,
        concurrency=config.engine_concurrency,
        disk_enforcement=config.disk.enforcement,
    )
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

    registry = Registry(store)
    sandboxes = SandboxService(
        backend, registry, instance=config.instance, defaults=config.defaults,
        policy=config.policy, quota=config.quota, publish=publish, agent=agent_path(config),
    )
    agents = AgentHub(backend, registry, publish)

    def image_event(kind: str, owner_uid: int | None, data: dict[str, Any]) -> None:
        bus.publish(kind, owner_uid=owner_uid, data=data)

    images = ImageService(backend, registry, config.policy, image_event, sandboxes.remover)
    sandboxes.check_image = images.check_use
    if config.pools and sandboxes.agent is None:
        raise StartupError("[[pool]]: warm pools need the in-sandbox agent (agent_path)")
    # Built without pools too: members an earlier configuration left are deleted.
    pool = PoolService(backend, sandboxes, agents, [
        (settings, resolve_create(settings.create_args(), config.defaults, config.policy))
        for settings in config.pools
    ])
    if config.pools:
        sandboxes.claim_warm = pool.claim
    registry.on_status.append(agents.follow)
    disk_guard = DiskGuard(backend, sandboxes, config.disk)
    execs = ExecService(
        backend, registry, sandboxes.deadlines, defaults=config.defaults,
        policy=config.policy, quota=config.quota, publish=publish, agents=agents,
    )
    streams = ExecStreams(registry, execs, agents)
    files = FileService(registry, agents, sandboxes.deadlines, max_chunk=config.max_file_chunk)
    try:
        await sandboxes.load()
        pool.load()
    except (OSError, sqlite3.Error) as exc:
        raise StartupError(f"state_dir {config.state_dir}: {exc}") from None
    watcher = EngineWatcher(
        Reconciler(sandboxes, backend, config.instance, config.create_grace, pool),
        relist_interval=config.relist_interval,
    )
    dispatcher = Dispatcher(
        build_daemon_methods(registry, EngineInfo(backend, lambda: watcher.reachable),
                             disk_guard.info,
                             pool.info)
        + build_sandbox_methods(sandboxes, images, config.defaults, config.policy)
        + build_image_methods(images)
        + build_exec_methods(execs, streams, config.max_frame)
        + build_file_methods(files, config.max_frame)
        + build_event_methods(bus)
    )
    server = RpcServer(
        dispatcher, max_frame=config.max_frame, is_admin=is_admin, limits=config.limits
    )
    return Daemon(
        config, backend, store, bus, registry, sandboxes, agents, execs, watcher, disk_guard,
        server, pool,
    )


FD_MARGIN = 512  # descriptors beyond client connections: engine, state, streams


def raise_fd_limit(max_connections: int) -> None:
    """Take the soft fd limit up to the hard one; warn when it cannot hold the connections."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
    if soft != resource.RLIM_INFINITY and soft < max_connections + FD_MARGIN:
        log.warning("fd_limit_low", limit=soft, max_connections=max_connections,
                    hint="raise LimitNOFILE or lower [limits] max_connections")


def _exit_at_once(sig: int) -> None:
    log.warning("second_signal", signal=signal.Signals(sig).name)
    flush_logs()
    os._exit(128 + sig)


async def serve(config: Config) -> int:
    """Run until SIGTERM/SIGINT; the exit status. ``StartupError`` when it cannot start."""
    loop = asyncio.get_running_loop()
    notifier = systemd.Notifier.from_env()
    stop = asyncio.Event()

    def on_signal(sig: int) -> None:
        if stop.is_set():
            _exit_at_once(sig)
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal, sig)
    loop.set_exception_handler(RateLimitedErrors())
    raise_fd_limit(config.limits.max_connections)
    try:
        d = await build(config)
    except StartupError:
        raise
    except Exception as exc:  # a bug or an unforeseen environment: still one clear line
        raise StartupError(f"{type(exc).__name__}: {exc}") from exc
    watchdog: asyncio.Task[None] | None = None
    activated = False
    try:
        sock, activated = _listener(config)
        path = sock.getsockname() or config.socket
        d.watcher.start()
        # Ready once the engine's view is adopted, or without it when the engine is away.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(d.watcher.synced.wait(), timeout=STARTUP_SYNC_WAIT)
        await d.server.start(sock)
        d.agents.open_all()
        d.sandboxes.deadlines.start()
        d.disk_guard.start()
        d.pool.start()
        watchdog = loop.create_task(notifier.run_watchdog())
    except BaseException as exc:
        await shutdown(d, notifier, None, activated, started=False)
        if isinstance(exc, StartupError):
            raise
        if isinstance(exc, Exception):
            raise StartupError(f"{type(exc).__name__}: {exc}") from exc
        raise
    log.info(
        "daemon_started",
        version=__version__,
        socket=path,
        socket_activated=activated,
        pid=os.getpid(),
        sandboxes=d.registry.count(),
        engine_reachable=d.watcher.reachable,
    )
    d.bus.publish(
        "daemon.started",
        data={"version": __version__, "pid": os.getpid(), "sandboxes": d.registry.count()},
    )
    # Start-up objects (modules, config, adopted records) never become garbage: keep them
    # out of every collection, and collect less often (a request allocates a few objects).
    gc.freeze()
    gc.set_threshold(GC_THRESHOLD, 20, 20)
    notifier.ready(f"serving on {path}")

    await stop.wait()
    return await shutdown(d, notifier, watchdog, activated, started=True)


async def shutdown(
    d: Daemon,
    notifier: systemd.Notifier,
    watchdog: asyncio.Task[None] | None,
    activated: bool,
    *,
    started: bool,
) -> int:
    """Stop in order within ``shutdown_grace`` in total; every step runs whatever
    the others did. The exit status: 0, or 1 when a step failed."""
    config = d.config
    deadline = time.monotonic() + config.shutdown_grace
    failures: list[str] = []

    def left() -> float:
        return max(STEP_MIN, deadline - time.monotonic())

    async def step(name: str, work: Awaitable[Any], bounded: bool = True) -> None:
        try:
            async with asyncio.timeout(left() if bounded else None):
                await work
        except TimeoutError:
            failures.append(name)
            log.warning("shutdown_step_timed_out", step=name)
        except Exception:
            failures.append(name)
            log.exception("shutdown_step_failed", step=name)

    cancelled = 0
    if started:
        in_flight = d.server.in_flight()
        notifier.stopping(f"stopping: finishing {in_flight} calls")
        with contextlib.suppress(Exception):
            d.bus.publish("daemon.stopping", data={"in_flight": in_flight})
        log.info("daemon_stopping", in_flight=in_flight)
        d.server.stop_accepting()
        # In-flight calls get the grace less a moment for the steps after them.
        grace = max(0.0, config.shutdown_grace - 1.5)
        try:
            cancelled = await d.server.drain(grace, cleanup=max(0.5, left() - 1.0))
        except Exception:
            failures.append("drain")
            log.exception("shutdown_step_failed", step="drain")
        await step("deliver_events", d.bus.deliver_pending(within=min(1.0, left())))
    d.server.close_connections()
    if config.cleanup_on_exit and started:

        def progress(remaining: int) -> None:
            notifier.extend_timeout(CLEANUP_EXTEND)
            notifier.status(f"stopping: removing sandboxes, {remaining} left")

        progress(d.registry.count())
        # Past the grace on purpose: each removal is bounded by the engine's call timeout,
        # and systemd is asked for more time before each one.
        await step("cleanup_pool", d.pool.remove_all(), bounded=False)
        await step("cleanup_on_exit", d.sandboxes.remove_all(progress), bounded=False)
    await step("pool", d.pool.stop())
    await step("reaper", d.execs.reaper.finish(within=min(2.0, left())))
    await step("agents", d.agents.close_all())
    await step("scheduler", d.sandboxes.deadlines.stop())
    await step("removals", d.sandboxes.remover.finish(within=min(REMOVALS_WAIT, left())))
    await step("disk_guard", d.disk_guard.stop())
    await step("engine_watch", d.watcher.stop())
    await step("state", d.store.close())
    await step("events", d.bus.close())
    await step("watchdog", cancel_and_wait(watchdog))
    await step("engine", d.backend.close())
    if started and not activated:
        with contextlib.suppress(OSError):
            os.unlink(config.socket)
    if started:
        log.info("daemon_stopped", cancelled_calls=cancelled, failed_steps=failures)
    return 1 if failures else 0
