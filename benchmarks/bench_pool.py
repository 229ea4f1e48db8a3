"""Warm pools: create-to-first-command, remove, bursts and snapshots, next to raw aiodocker.

Run as root next to a running Docker Engine with the image ``sandboxd/base``, from the
repository root::

    .venv/bin/python -m benchmarks.bench_pool [--n 30] [--json FILE]

It starts its own daemon (own socket, state directory and ``SANDBOXD_INSTANCE``, all
under one temporary directory, like ``bench_resync``) with one warm pool::

    [[pool]]
    name = "bench"
    size = 20          # --pool-size

(the defaults: ``sandboxd/base``, memory 512m, cpus 1, pids 256, workdir /workspace,
network none), waits until the pool is full, and measures in one run:

1. create to first command (``sandbox.create`` then ``sandbox.exec ["true"]`` until the
   exec's reply): from the pool (the pool full again before every sample, so every
   claim is a hit; the refill time is reported), cold (``workdir: "/tmp"``, which the
   pool cannot serve: a container made on demand) and raw aiodocker (create + start +
   exec through the engine, ``bench_ops``' raw exec), the three alternating;
2. ``sandbox.remove`` next to a raw ``DELETE ?force=true``, and how long the engine
   then takes to delete our container in the background;
3. bursts of ``--pool-size`` concurrent create + exec true + remove cycles from a full
   pool, next to the same cycles through raw aiodocker, ``--rounds`` times;
4. ``--cold-burst`` concurrent cold ``sandbox.create`` next to as many concurrent raw
   create + start;
5. ``sandbox.snapshot`` of a sandbox that wrote 100 MB next to a raw ``commit`` of a
   container with the same 100 MB written (and the removal of both images);

with the daemon's CPU seconds and its request log (``ms`` per method) per phase.

The raw containers get ``bench_ops``' hardened create body (``raw_container_config`` in
``benchmarks.rawdocker``).
Everything is removed at the end, also after a failure, Ctrl-C or SIGTERM: the daemon is
stopped (SIGTERM, SIGKILL after 10 s), every container with the run's
``io.sandboxd.instance`` label (pool members included) or its raw ``io.sandboxd.bench.run``
label is removed with ``docker rm -f``, every image the run made with ``docker rmi -f``,
and the temporary directory is deleted. It exits 0 whether or not targets are met.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import secrets
import shutil
import subprocess
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import aiodocker

from .common import (
    IMAGE,
    Compared,
    RpcClient,
    Samples,
    cancel_on_sigterm,
    environment,
    exit_with,
    fmt_met,
    fmt_ms,
    fmt_ratio,
    log,
    ms_or_none,
    percentile,
    process_cpu_seconds,
    ratio,
    render_table,
    run_benchmark,
    save_report,
)
from .daemonproc import DaemonProcess, docker_ids, remove_containers
from .rawdocker import BENCH_LABEL, RUN_LABEL, RawContainers

POOL_NAME = "bench"
COLD_WORKDIR = "/tmp"  # the pool's members have /workspace: a create the pool cannot serve
TTL = 1800  # our sandboxes expire by themselves even if this process is SIGKILLed
BLOB_BYTES = 100 * 1024 * 1024
WRITE_BLOB = ["sh", "-c", f"head -c {BLOB_BYTES} /dev/urandom > /workspace/blob"]
RAW_IMAGE_REPO = "sandboxd-bench-raw"
SETTLE_TIMEOUT = 180.0  # a pool refill or a batch of background deletions
GONE_TIMEOUT = 60.0
INFO_POLL = 0.02  # daemon.info (it asks the engine for its version) while the pool refills
GONE_POLL = 0.005  # container inspect while waiting for a background deletion
SETTLE_POLL = 0.02  # daemon.info + a container list while waiting for everything to settle
POOL_TARGET_S = 0.005
COLD_RATIO_TARGET = 1.10
REMOVE_TARGET_S = 0.015
BURST_TARGET = 3.0


def engine_pids() -> list[int]:
    """The pids of the engine's dockerd (``/var/run/docker.pid``) and of the containerd it
    runs (its child), or none: their CPU is shared with every user of the engine."""
    try:
        dockerd = int(Path("/var/run/docker.pid").read_text().strip())
    except (OSError, ValueError):
        return []
    pids = [dockerd]
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        with contextlib.suppress(OSError, IndexError, ValueError):
            stat = Path(f"/proc/{entry}/stat").read_text()
            comm = stat[stat.index("(") + 1 : stat.rindex(")")]
            ppid = int(stat[stat.rindex(")") + 2 :].split()[1])
            if comm == "containerd" and ppid == dockerd:
                pids.append(int(entry))
    return pids


def fmt_s(seconds: float) -> str:
    return "-" if math.isnan(seconds) else f"{seconds:.2f}"


def fmt_rate(value: float) -> str:
    return "-" if math.isnan(value) else f"{value:.1f}"


@dataclass
class Row(Compared):
    """One latency row: ours next to raw (raw may be empty: an ours-only row)."""

    name: str
    note: str = ""

    def cells(self) -> list[str]:
        return [self.name, str(len(self.ours.values)), *self.ratio_cells()]

    def to_json(self) -> dict[str, Any]:
        r50 = self.ratio_at(50)
        return {
            "row": self.name,
            "sandboxd": self.ours.summary_ms(),
            "aiodocker": self.raw.summary_ms() if self.raw.values else None,
            "ratio_p50": None if math.isnan(r50) else round(r50, 3),
            "paired_delta_ms": ms_or_none(self.paired_delta),
            "note": self.note or None,
        }


ROW_HEADERS = ["row", "n", "ours p50", "ours p95", "raw p50", "raw p95", "p50 ratio",
               "p95 ratio", "paired Δ"]


@dataclass
class Batch:
    """One burst: every item started at once; the wall time until the last one ended."""

    side: str
    round: int
    items: int
    wall: float
    latencies: list[float]
    settle: float = math.nan  # ours: until the pool was full and the deletions done
    hits: int | None = None  # ours: pool claims during the batch
    steps: list[list[float]] = field(default_factory=list)  # per step: each cycle's seconds

    @property
    def sustained(self) -> float:
        """Items per second counting the settle (refill and deletions) as part of the work."""
        if math.isnan(self.settle):
            return self.rate
        return self.items / (self.wall + self.settle)

    @property
    def rate(self) -> float:
        return self.items / self.wall if self.wall > 0 else math.nan

    def to_json(self) -> dict[str, Any]:
        return {
            "side": self.side,
            "round": self.round,
            "items": self.items,
            "wall_s": round(self.wall, 4),
            "per_second": round(self.rate, 2),
            "latency_p50_ms": ms_or_none(percentile(self.latencies, 50)),
            "latency_p95_ms": ms_or_none(percentile(self.latencies, 95)),
            "settle_s": None if math.isnan(self.settle) else round(self.settle, 3),
            "pool_claims": self.hits,
            "steps_p50_ms": [ms_or_none(percentile(v, 50)) for v in self.steps],
            "steps_p95_ms": [ms_or_none(percentile(v, 95)) for v in self.steps],
        }


@dataclass
class PhaseStats:
    name: str
    wall: float = math.nan
    daemon_cpu: float | None = None
    engine_cpu: float | None = None
    bench_cpu: float = math.nan
    load: tuple[float, float, float] = (math.nan, math.nan, math.nan)  # at the phase's end
    span: tuple[float, float] = (0.0, 0.0)  # wall-clock start and end (the log's timestamps)

    def to_json(self) -> dict[str, Any]:
        return {
            "phase": self.name,
            "wall_s": round(self.wall, 2),
            "daemon_cpu_s": None if self.daemon_cpu is None else round(self.daemon_cpu, 2),
            "engine_cpu_s": None if self.engine_cpu is None else round(self.engine_cpu, 2),
            "bench_cpu_s": round(self.bench_cpu, 2),
            "loadavg_at_end": [round(x, 2) for x in self.load],
        }


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.run_id = secrets.token_hex(4)
        self.daemon = DaemonProcess(
            "bench-pool",
            "bpl-",
            "info",
            config='log_format = "json"\n\n'
            f'[[pool]]\nname = "{POOL_NAME}"\nsize = {args.pool_size}\n',
        )
        self.instance = self.daemon.instance
        self.rpc: RpcClient | None = None
        self.raw = RawContainers(self.run_id)  # its docker: set once the loop runs
        self.ours_ids: set[str] = set()  # sandboxes alive
        self.our_images: dict[str, str] = {}  # snapshot ref -> image id, not yet removed
        self.raw_images: set[str] = set()  # raw commit image ids, not yet removed
        self.start_seconds = math.nan
        self.first_fill = math.nan
        self.rows: dict[str, Row] = {}
        self.refill = Samples()  # as polled: the claim's reply until daemon.info shows full
        self.claimed_at: list[tuple[str, float]] = []  # measured pool samples: id, reply time
        self._log_entries: list[dict[str, Any]] | None = None
        self.misses = 0  # pool samples that were not claims
        self.bursts: list[Batch] = []
        self.cold_bursts: list[Batch] = []
        self.phases: list[PhaseStats] = []
        self.leftover: dict[str, int] = {}
        self.snapshot_sizes: dict[str, int] = {}
        self.errors: list[str] = []

    def row(self, name: str, note: str = "") -> Row:
        if name not in self.rows:
            self.rows[name] = Row(name, note=note)
        return self.rows[name]

    @property
    def daemon_pid(self) -> int:
        return self.daemon.pid

    async def connect(self) -> RpcClient:
        """A connection whose ``daemon.ping`` was answered (tried every 10 ms)."""
        return await self.daemon.connect(poll=0.01)

    @property
    def r(self) -> RpcClient:
        assert self.rpc is not None
        return self.rpc

    @property
    def d(self) -> aiodocker.Docker:
        return self.raw.d

    # waiting for the pool and the engine -------------------------------------------------
    async def pool_info(self) -> dict[str, Any]:
        info = await self.r.call("daemon.info")
        return dict(info["pool"][POOL_NAME])

    async def wait_full(self) -> float:
        """Seconds until ``daemon.info`` shows the pool full (polled every 20 ms)."""
        started = time.perf_counter()
        while True:
            pool = await self.pool_info()
            if pool["ready"] >= pool["size"] and not pool["starting"]:
                return time.perf_counter() - started
            if time.perf_counter() - started > SETTLE_TIMEOUT:
                raise RuntimeError(f"the pool is not full after {SETTLE_TIMEOUT:g} s: {pool}")
            self.daemon.check_alive()
            await asyncio.sleep(INFO_POLL)

    async def instance_containers(self) -> list[str]:
        found = await self.d.containers.list(
            all=True, filters={"label": [f"io.sandboxd.instance={self.instance}"]}
        )
        return [c.id for c in found]

    async def wait_settled(self) -> float:
        """Seconds until the pool is full and the engine holds only its members and our
        live sandboxes (every background deletion done)."""
        started = time.perf_counter()
        while True:
            pool = await self.pool_info()
            if pool["ready"] >= pool["size"] and not pool["starting"]:
                count = len(await self.instance_containers())
                if count == pool["size"] + len(self.ours_ids):
                    return time.perf_counter() - started
            else:
                count = -1
            if time.perf_counter() - started > SETTLE_TIMEOUT:
                raise RuntimeError(
                    f"not settled after {SETTLE_TIMEOUT:g} s: pool {pool}, {count} containers "
                    f"for {pool['size']} members and {len(self.ours_ids)} sandboxes"
                )
            self.daemon.check_alive()
            await asyncio.sleep(SETTLE_POLL)

    async def wait_gone(self, cid: str) -> None:
        """Until the engine no longer has container ``cid``."""
        deadline = time.monotonic() + GONE_TIMEOUT
        container = self.d.containers.container(cid)
        while True:
            try:
                await container.show()
            except aiodocker.DockerError as exc:
                if exc.status == 404:
                    return
                raise
            if time.monotonic() > deadline:
                raise RuntimeError(f"container {cid[:12]} still exists {GONE_TIMEOUT:g} s "
                                   "after its sandbox.remove")
            await asyncio.sleep(GONE_POLL)

    # one side, one operation -------------------------------------------------------------
    async def ours_create(self, rpc: RpcClient, cold: bool) -> dict[str, Any]:
        params: dict[str, Any] = {"image": IMAGE, "ttl": TTL, "labels": {"bench": self.run_id}}
        if cold:
            params["workdir"] = COLD_WORKDIR
        reply: dict[str, Any] = await rpc.call("sandbox.create", params)
        self.ours_ids.add(str(reply["id"]))
        if reply.get("status") != "running":
            raise RuntimeError(f"sandbox.create replied with status {reply.get('status')!r}")
        return reply

    async def ours_exec(self, rpc: RpcClient, sid: str, cmd: list[str]) -> None:
        reply = await rpc.call("sandbox.exec", {"id": sid, "cmd": cmd, "timeout": 300})
        if reply["exit_code"] != 0:
            raise RuntimeError(f"sandbox.exec {cmd}: exit {reply['exit_code']}, "
                               f"stderr {bytes(reply['stderr'])[:200]!r}")

    async def ours_remove(self, rpc: RpcClient, sid: str) -> None:
        await rpc.call("sandbox.remove", {"id": sid})
        self.ours_ids.discard(sid)

    # phases ----------------------------------------------------------------------------
    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[PhaseStats]:
        stats = PhaseStats(name)
        started = time.perf_counter()
        bench_cpu = time.process_time()
        daemon_cpu = process_cpu_seconds(self.daemon_pid)
        pids = engine_pids()
        engine = {p: process_cpu_seconds(p) for p in pids}
        wall_start = time.time()
        log(f"{name}  (load average {' '.join(f'{x:.2f}' for x in os.getloadavg())})")
        try:
            yield stats
        finally:
            stats.wall = time.perf_counter() - started
            stats.bench_cpu = time.process_time() - bench_cpu
            after = process_cpu_seconds(self.daemon_pid)
            if daemon_cpu is not None and after is not None:
                stats.daemon_cpu = after - daemon_cpu
            both = [(a, process_cpu_seconds(p)) for p, a in engine.items() if a is not None]
            if both:
                stats.engine_cpu = sum(b - a for a, b in both if b is not None)
            stats.load = os.getloadavg()
            stats.span = (wall_start, time.time())
            self.phases.append(stats)

    async def exec_true(self, side: str, ident: str) -> None:
        if side == "raw":
            await self.raw.exec(ident, ["true"])
        else:
            await self.ours_exec(self.r, ident, ["true"])

    async def first_command(self, side: str, record: bool) -> tuple[float, float, float, str]:
        """One create (+ start) and exec true: (create s, create + exec s, a second exec true
        once the pool is full again s, id)."""
        before = (await self.pool_info())["claims"] if side == "pool" else 0
        t0 = time.perf_counter()
        if side == "raw":
            ident = await self.raw.create()
        else:
            ident = str((await self.ours_create(self.r, cold=side == "cold"))["id"])
        t1 = time.perf_counter()
        await self.exec_true(side, ident)
        t2 = time.perf_counter()
        if side == "pool":
            await self.wait_full()
            if record:
                self.refill.add(time.perf_counter() - t1)  # from the claim's reply
                self.claimed_at.append((ident, time.time() - (time.perf_counter() - t1)))
            if (await self.pool_info())["claims"] != before + 1:
                self.misses += 1
        t3 = time.perf_counter()
        await self.exec_true(side, ident)
        return t1 - t0, t2 - t0, time.perf_counter() - t3, ident

    async def first_exec_after_refill(self) -> float:
        """A claim, the refill let finish, then the sandbox's first exec: its seconds. The
        sandbox is removed (and waited for) before the next sample."""
        reply = await self.ours_create(self.r, cold=False)
        sid, cid = str(reply["id"]), str(reply["container_id"])
        await self.wait_full()
        t0 = time.perf_counter()
        await self.ours_exec(self.r, sid, ["true"])
        took = time.perf_counter() - t0
        await self.ours_remove(self.r, sid)
        await self.wait_gone(cid)
        return took

    async def phase_first_command(self, n: int, warmup: int) -> list[dict[str, str]]:
        """Create + exec true, pool / cold / raw alternating; all three kept for removal."""
        pool_total = self.row("pool: create + exec true")
        pool_create = self.row("pool: create alone (claim)")
        pool_exec = self.row("pool: first exec true")
        cold_total = self.row(f"cold: create + exec true (workdir {COLD_WORKDIR})")
        cold_create = self.row("cold: create alone")
        cold_exec = self.row(
            "cold: first exec true", "includes waiting for the new sandbox's agent"
        )
        pool_again = self.row(
            "pool: 2nd exec true, pool full again",
            "the claimed sandbox's next exec once the refill is done; raw: its 2nd exec",
        )
        cold_again = self.row("cold: 2nd exec true")
        pool_quiet = self.row(
            "pool: first exec true, refill done first",
            "diagnostic: claim, wait until the pool is full, then the first exec",
        )
        made: list[dict[str, str]] = []
        sides = ["pool", "cold", "raw"]
        for i in range(warmup + n):
            record = i >= warmup
            got: dict[str, tuple[float, float, float, str]] = {}
            shift = i % 3
            for side in sides[shift:] + sides[:shift]:
                await self.wait_full()  # nothing of the pool's refill under any sample
                got[side] = await self.first_command(side, record)
            await self.wait_full()
            quiet = await self.first_exec_after_refill()
            if record:
                pool_quiet.ours.add(quiet)
            if record:
                raw = got["raw"]
                for side, total, create, first, again in (
                    ("pool", pool_total, pool_create, pool_exec, pool_again),
                    ("cold", cold_total, cold_create, cold_exec, cold_again),
                ):
                    ours = got[side]
                    create.ours.add(ours[0])
                    create.raw.add(raw[0])
                    total.ours.add(ours[1])
                    total.raw.add(raw[1])
                    first.ours.add(ours[1] - ours[0])
                    first.raw.add(raw[1] - raw[0])
                    again.ours.add(ours[2])
                    again.raw.add(raw[2])
            made.append({side: got[side][3] for side in sides})
        return made

    async def remove_one(self, side: str, ident: str, cid: str) -> tuple[float, float]:
        """(reply s, gone from the engine s), both from the call."""
        t0 = time.perf_counter()
        if side == "raw":
            await self.raw.remove(ident)
        else:
            await self.ours_remove(self.r, ident)
        t1 = time.perf_counter()
        await self.wait_gone(cid)  # raw: checked; it is gone at the reply
        return t1 - t0, time.perf_counter() - t0

    async def phase_remove(self, made: list[dict[str, str]], warmup: int) -> None:
        claimed = self.row("remove: claimed sandbox (reply)")
        cold = self.row("remove: cold sandbox (reply)")
        claimed_gone = self.row(
            "remove: claimed, until gone from engine",
            "ours: from the call until the engine no longer has the container",
        )
        cold_gone = self.row("remove: cold, until gone from engine")
        background = self.row(
            "background deletion (reply → gone)", "ours only: the engine's delete after the reply"
        )
        sides = ["pool", "cold", "raw"]
        for i, idents in enumerate(made):
            record = i >= warmup
            got: dict[str, tuple[float, float]] = {}
            shift = i % 3
            for side in sides[shift:] + sides[:shift]:
                ident = idents[side]
                cid = ident
                if side != "raw":
                    cid = str((await self.r.call("sandbox.get", {"id": ident}))["container_id"])
                got[side] = await self.remove_one(side, ident, cid)
            if not record:
                continue
            raw_t = got["raw"][0]
            for side, row, gone in (("pool", claimed, claimed_gone), ("cold", cold, cold_gone)):
                row.ours.add(got[side][0])
                row.raw.add(raw_t)
                gone.ours.add(got[side][1])
                gone.raw.add(raw_t)
                background.ours.add(got[side][1] - got[side][0])

    async def alternating_rounds(
        self,
        rounds: int,
        conns: int,
        burst: Callable[[str, int, list[RpcClient]], Awaitable[Batch]],
        into: list[Batch],
    ) -> None:
        """``rounds`` rounds of ``burst(side, round, connections)`` for each side, ours
        first in odd rounds, every burst from a settled state; ``conns`` connections are
        opened before the first and closed after the last."""
        clients = [await self.connect() for _ in range(conns)]
        try:
            for rnd in range(1, rounds + 1):
                order = ["ours", "raw"] if rnd % 2 else ["raw", "ours"]
                for side in order:
                    await self.wait_settled()
                    into.append(await burst(side, rnd, clients))
        finally:
            for rpc in clients:
                await rpc.close()

    async def phase_bursts(self, rounds: int) -> None:
        size = self.args.pool_size

        async def burst(side: str, rnd: int, conns: list[RpcClient]) -> Batch:
            if side == "ours":
                return await self.ours_burst(rnd, conns)
            return await self.raw_burst(rnd, size)

        await self.alternating_rounds(rounds, size, burst, self.bursts)

    async def ours_burst(self, rnd: int, conns: list[RpcClient]) -> Batch:
        before = (await self.pool_info())["claims"]

        async def cycle(rpc: RpcClient) -> tuple[float, float, float]:
            t0 = time.perf_counter()
            reply = await self.ours_create(rpc, cold=False)
            sid = str(reply["id"])
            t1 = time.perf_counter()
            await self.ours_exec(rpc, sid, ["true"])
            t2 = time.perf_counter()
            await self.ours_remove(rpc, sid)
            return t1 - t0, t2 - t1, time.perf_counter() - t2

        started = time.perf_counter()
        steps = await asyncio.gather(*(cycle(rpc) for rpc in conns))
        wall = time.perf_counter() - started
        claims = (await self.pool_info())["claims"] - before
        settle = await self.wait_settled()
        log(f"  round {rnd} ours: {len(conns)} cycles in {wall * 1000:.0f} ms "
            f"({claims} claims); settled {settle:.2f} s later")
        return Batch("ours", rnd, len(conns), wall, [sum(x) for x in steps], settle, claims,
                     [list(x) for x in zip(*steps, strict=True)])

    async def raw_burst(self, rnd: int, size: int) -> Batch:
        async def cycle() -> tuple[float, float, float]:
            t0 = time.perf_counter()
            cid = await self.raw.create()
            t1 = time.perf_counter()
            await self.raw.exec(cid, ["true"])
            t2 = time.perf_counter()
            await self.raw.remove(cid)
            return t1 - t0, t2 - t1, time.perf_counter() - t2

        started = time.perf_counter()
        steps = await asyncio.gather(*(cycle() for _ in range(size)))
        wall = time.perf_counter() - started
        log(f"  round {rnd} raw: {size} cycles in {wall * 1000:.0f} ms")
        return Batch("raw", rnd, size, wall, [sum(x) for x in steps], steps=[
            list(x) for x in zip(*steps, strict=True)])

    async def phase_cold_burst(self, rounds: int) -> None:
        count = self.args.cold_burst

        async def burst(side: str, rnd: int, conns: list[RpcClient]) -> Batch:
            if side == "ours":
                batch, ids = await self.ours_cold_burst(rnd, conns)
                await asyncio.gather(*(self.ours_remove(self.r, s) for s in ids))
                batch.settle = await self.wait_settled()
            else:
                batch, ids = await self.raw_cold_burst(rnd, count)
                await asyncio.gather(*(self.raw.remove(c) for c in ids))
            return batch

        await self.alternating_rounds(rounds, count, burst, self.cold_bursts)

    async def ours_cold_burst(self, rnd: int, conns: list[RpcClient]) -> tuple[Batch, list[str]]:
        async def one(rpc: RpcClient) -> tuple[float, str]:
            t0 = time.perf_counter()
            reply = await self.ours_create(rpc, cold=True)
            return time.perf_counter() - t0, str(reply["id"])

        started = time.perf_counter()
        done = await asyncio.gather(*(one(rpc) for rpc in conns))
        wall = time.perf_counter() - started
        log(f"  round {rnd} ours: {len(conns)} cold creates in {wall:.2f} s")
        return Batch("ours", rnd, len(conns), wall, [t for t, _ in done]), [s for _, s in done]

    async def raw_cold_burst(self, rnd: int, count: int) -> tuple[Batch, list[str]]:
        async def one() -> tuple[float, str]:
            t0 = time.perf_counter()
            cid = await self.raw.create()
            return time.perf_counter() - t0, cid

        started = time.perf_counter()
        done = await asyncio.gather(*(one() for _ in range(count)))
        wall = time.perf_counter() - started
        log(f"  round {rnd} raw: {count} creates + starts in {wall:.2f} s")
        return Batch("raw", rnd, count, wall, [t for t, _ in done]), [c for _, c in done]

    async def phase_snapshot(self, n: int) -> None:
        write = self.row("write 100 MB (exec of head -c … /dev/urandom)")
        snap = self.row("snapshot of 100 MB written",
                        "ours: sandbox.snapshot; raw: POST /commit?pause=true")
        remove = self.row("remove that image",
                          "ours: image.remove {ref}; raw: DELETE /images/{id}")
        await self.wait_settled()
        sid = str((await self.ours_create(self.r, cold=False))["id"])
        cid = await self.raw.create()
        t0 = time.perf_counter()
        await self.ours_exec(self.r, sid, WRITE_BLOB)
        t1 = time.perf_counter()
        await self.raw.exec(cid, WRITE_BLOB)
        write.ours.add(t1 - t0)
        write.raw.add(time.perf_counter() - t1)
        container = self.d.containers.container(cid)
        for i in range(n):
            async def ours() -> None:
                t0 = time.perf_counter()
                reply = await self.r.call("sandbox.snapshot", {"id": sid})
                snap.ours.add(time.perf_counter() - t0)
                self.our_images[str(reply["ref"])] = str(reply["id"])
                image = await self.d.images.inspect(str(reply["id"]))
                self.snapshot_sizes["ours"] = int(image.get("Size", 0))
                t0 = time.perf_counter()
                await self.r.call("image.remove", {"ref": str(reply["ref"])})
                remove.ours.add(time.perf_counter() - t0)
                self.our_images.pop(str(reply["ref"]))

            async def raw(i: int = i) -> None:
                t0 = time.perf_counter()
                result = await container.commit(
                    repository=RAW_IMAGE_REPO, tag=f"{self.run_id}-{i}", pause=True,
                    config={"Labels": {BENCH_LABEL: "1", RUN_LABEL: self.run_id}},
                )
                snap.raw.add(time.perf_counter() - t0)
                image_id = str(result["Id"])
                self.raw_images.add(image_id)
                image = await self.d.images.inspect(image_id)
                self.snapshot_sizes["raw"] = int(image.get("Size", 0))
                t0 = time.perf_counter()
                await self.d.images.delete(image_id)
                remove.raw.add(time.perf_counter() - t0)
                self.raw_images.discard(image_id)

            for side in ([ours, raw] if i % 2 == 0 else [raw, ours]):
                await side()
        await self.ours_remove(self.r, sid)
        await self.raw.remove(cid)

    async def leak_check(self) -> None:
        """After every removal: the engine should hold the pool's members and nothing else."""
        settle = await self.wait_settled()
        pool = await self.pool_info()
        ours = await self.instance_containers()
        raw = await self.d.containers.list(
            all=True, filters={"label": [f"{RUN_LABEL}={self.run_id}"]}
        )
        self.leftover = {
            "instance_containers": len(ours),
            "pool_size": int(pool["size"]),
            "pool_ready": int(pool["ready"]),
            "raw_containers": len(raw),
            "settle_ms": round(settle * 1000),
            "pool_claims": int(pool["claims"]),
            "pool_misses": int(pool["misses"]),
        }
        listed = await self.r.call("sandbox.list")
        self.leftover["sandboxes_listed"] = len(listed)

    async def run(self) -> None:
        args = self.args
        log(f"run {self.run_id}: starting a daemon (instance {self.instance}, pool of "
            f"{args.pool_size})")
        t0 = time.perf_counter()
        self.daemon.spawn()
        self.rpc = await self.connect()
        self.start_seconds = time.perf_counter() - t0
        self.first_fill = await self.wait_full()
        log(f"daemon answering after {self.start_seconds:.2f} s; pool full "
            f"{self.first_fill:.2f} s later")
        with self.phase("1 create to first command"):
            made = await self.phase_first_command(args.n, args.warmup)
        with self.phase("2 remove"):
            await self.phase_remove(made, args.warmup)
        with self.phase(f"3 bursts of {args.pool_size} cycles"):
            await self.phase_bursts(args.rounds)
        with self.phase(f"4 {args.cold_burst} concurrent cold creates"):
            await self.phase_cold_burst(args.cold_rounds)
        with self.phase("5 snapshot 100 MB"):
            await self.phase_snapshot(args.snapshots)
        await self.leak_check()

    # cleanup -------------------------------------------------------------------------------
    async def close(self) -> None:
        if self.rpc is not None:
            await self.rpc.close()
            self.rpc = None
        if self.raw.docker is not None:
            await self.raw.docker.close()
            self.raw.docker = None

    def cleanup(self) -> tuple[int, int, list[str]]:
        """Stop the daemon; remove every container and image of the run:
        (containers removed, things left, problems)."""
        problems: list[str] = []
        self.daemon.stop()
        filters = [self.daemon.instance_filter, f"label={RUN_LABEL}={self.run_id}"]
        removed = remove_containers(lambda: sorted(set(docker_ids("ps", filters)) | self.raw.ids))
        self.raw.ids.clear()
        images = set(docker_ids("images", filters)) | set(self.our_images.values())
        for image in images | self.raw_images:
            done = subprocess.run(["docker", "rmi", "-f", image], capture_output=True,
                                  text=True, timeout=300)
            if done.returncode and "No such image" not in done.stderr:
                problems.append(f"image {image[:19]}: {done.stderr.strip()}")
        left = len(docker_ids("ps", filters)) + len(docker_ids("images", filters))
        return removed, left, problems

    # the daemon's log -----------------------------------------------------------------------
    def log_entries(self) -> list[dict[str, Any]]:
        """The daemon's JSON log lines, each with ``t``: its timestamp as epoch seconds."""
        if self._log_entries is None:
            entries = []
            with contextlib.suppress(OSError), open(self.daemon.log, "rb") as fh:
                for line in fh:
                    try:
                        entry = json.loads(line)
                        stamp = datetime.fromisoformat(str(entry["timestamp"]))
                    except (ValueError, KeyError, TypeError):
                        continue
                    entry["t"] = stamp.timestamp()
                    entries.append(entry)
            self._log_entries = entries
        return self._log_entries

    def request_log(self, stats: PhaseStats) -> dict[str, list[float]]:
        """The daemon-side ``ms`` of each request answered during a phase, by method."""
        start, end = stats.span
        by_method: dict[str, list[float]] = {}
        for entry in self.log_entries():
            if entry.get("event") == "request" and start <= entry["t"] <= end:
                by_method.setdefault(str(entry.get("method")), []).append(float(entry["ms"]))
        return by_method

    def logged_refill(self) -> Samples:
        """Per measured claim: from its ``sandbox_created`` line to the first
        ``pool_member_ready`` after it with the pool full again (the daemon's clock)."""
        entries = self.log_entries()
        out = Samples()
        size = self.args.pool_size
        for sid, _ in self.claimed_at:
            created = next((e["t"] for e in entries if e.get("event") == "sandbox_created"
                            and e.get("sandbox_id") == sid), None)
            if created is None:
                continue
            full = next((e["t"] for e in entries if e.get("event") == "pool_member_ready"
                         and e["t"] >= created and int(e.get("ready", 0)) >= size), None)
            if full is not None:
                out.add(full - created)
        return out

    def log_counts(self) -> dict[str, int]:
        """Warnings and errors in the daemon's log, by event."""
        counts: dict[str, int] = {}
        for entry in self.log_entries():
            if entry.get("level") in ("warning", "error", "critical"):
                key = f"{entry.get('level')}: {entry.get('event')}"
                counts[key] = counts.get(key, 0) + 1
        return counts


# report ------------------------------------------------------------------------------------
def burst_table(batches: list[Batch], what: str) -> str:
    headers = ["round", f"ours {what}", "ours wall s", "ours /s", "ours p50 each",
               "raw wall s", "raw /s", "raw p50 each", "ours/raw", "ours settle s",
               "ours /s incl. settle"]
    rows = []
    rounds = sorted({b.round for b in batches})
    ratios, ours_walls, raw_walls, settles = [], [], [], []
    for rnd in rounds:
        ours = next((b for b in batches if b.round == rnd and b.side == "ours"), None)
        raw = next((b for b in batches if b.round == rnd and b.side == "raw"), None)
        if ours is None or raw is None:
            continue
        rate_ratio = ratio(ours.rate, raw.rate)
        ratios.append(rate_ratio)
        ours_walls.append(ours.wall)
        raw_walls.append(raw.wall)
        settles.append(ours.settle)
        claims = "" if ours.hits is None else f" ({ours.hits} claims)"
        rows.append([
            str(rnd), f"{ours.items}{claims}", fmt_s(ours.wall), fmt_rate(ours.rate),
            fmt_ms(percentile(ours.latencies, 50)), fmt_s(raw.wall), fmt_rate(raw.rate),
            fmt_ms(percentile(raw.latencies, 50)), fmt_ratio(rate_ratio), fmt_s(ours.settle),
            fmt_rate(ours.sustained),
        ])
    if len(rows) > 1:
        items = batches[0].items
        ow, rw = percentile(ours_walls, 50), percentile(raw_walls, 50)
        rows.append([
            "median", "", fmt_s(ow), fmt_rate(items / ow), "", fmt_s(rw), fmt_rate(items / rw),
            "", fmt_ratio(percentile(ratios, 50)), fmt_s(percentile(settles, 50)),
            fmt_rate(items / (ow + percentile(settles, 50))),
        ])
    return render_table(headers, rows)


def median_ratio(batches: list[Batch]) -> float:
    ratios = []
    for rnd in sorted({b.round for b in batches}):
        ours = [b for b in batches if b.round == rnd and b.side == "ours"]
        raw = [b for b in batches if b.round == rnd and b.side == "raw"]
        if ours and raw:
            ratios.append(ratio(ours[0].rate, raw[0].rate))
    return percentile(ratios, 50)


def targets(bench: Bench) -> list[tuple[str, str, bool | None]]:
    rows = bench.rows
    out: list[tuple[str, str, bool | None]] = []
    pool = rows.get("pool: create + exec true")
    if pool and pool.ours.values:
        p50 = pool.ours.p50
        out.append(("pool create + exec true p50 <= 5 ms", f"{fmt_ms(p50)} ms",
                    p50 <= POOL_TARGET_S))
    cold = rows.get("cold: create alone")
    if cold and cold.ours.values:
        r = ratio(cold.ours.p50, cold.raw.p50)
        out.append((
            f"cold create p50 <= {COLD_RATIO_TARGET:.2f}x raw create+start",
            f"{fmt_ms(cold.ours.p50)} vs {fmt_ms(cold.raw.p50)} ms = {fmt_ratio(r)}",
            None if math.isnan(r) else r <= COLD_RATIO_TARGET,
        ))
    for name in ("remove: claimed sandbox (reply)", "remove: cold sandbox (reply)"):
        rm = rows.get(name)
        if rm and rm.ours.values:
            out.append((f"{name.removesuffix(' (reply)')} p50 <= 15 ms",
                        f"{fmt_ms(rm.ours.p50)} ms", rm.ours.p50 <= REMOVE_TARGET_S))
    if bench.bursts:
        r = median_ratio(bench.bursts)
        out.append((
            f"{bench.args.pool_size} concurrent cycles: ours >= {BURST_TARGET:.0f}x raw "
            "cycles/s (median round)", fmt_ratio(r), None if math.isnan(r) else r >= BURST_TARGET,
        ))
    return out


def print_report(bench: Bench, elapsed: float) -> None:
    args = bench.args
    print(
        f"sandboxd warm pool ({args.pool_size} members of sandboxd/base, 512m, 1 cpu, 256 pids, "
        f"workdir /workspace, network none) vs raw aiodocker, same engine, one run; "
        f"{elapsed:.0f} s total; load average at the end "
        f"{' '.join(f'{x:.2f}' for x in os.getloadavg())} on {os.cpu_count()} CPUs"
    )
    print(f"daemon: answering {bench.start_seconds:.2f} s after spawn, pool full "
          f"{bench.first_fill:.2f} s later")
    print()
    print(f"1. create to first command, ms ({args.n} measured of {args.n + args.warmup}; pool / "
          f"cold / raw alternating, the pool full before every sample)")
    print(f"   cold = sandbox.create with workdir {COLD_WORKDIR!r}: the pool cannot serve it, the "
          "daemon makes a container on demand")
    print("   raw = containers.create (bench_ops' hardened body) + start [+ exec create, start, "
          "inspect until ExitCode]")
    first = [bench.rows[k] for k in bench.rows if k.startswith(("pool:", "cold:"))]
    print(render_table(ROW_HEADERS, [r.cells() for r in first]))
    refill, logged = bench.refill, bench.logged_refill()
    print(f"   pool refill after a claim, ms: daemon log (its sandbox_created line until "
          f"pool_member_ready with the pool full) p50 {fmt_ms(logged.p50)}, p95 "
          f"{fmt_ms(logged.p95)} (n {len(logged.values)}); as polled (claim's reply until "
          f"daemon.info shows it full, every {INFO_POLL * 1000:g} ms) p50 {fmt_ms(refill.p50)}, "
          f"p95 {fmt_ms(refill.p95)}")
    print(f"   pool samples that were not claims: {bench.misses}")
    print()
    print("2. remove, ms (raw = DELETE /containers/{id}?force=true&v=true: gone at its reply)")
    removes = [bench.rows[k] for k in bench.rows if k.startswith(("remove:", "background"))]
    print(render_table(ROW_HEADERS, [r.cells() for r in removes]))
    print()
    print(f"3. bursts: {args.pool_size} concurrent create + exec true + remove cycles "
          f"(ours from a full pool of {args.pool_size}, one connection each; raw create + "
          f"start + exec + delete); each burst starts with everything settled")
    print(burst_table(bench.bursts, "cycles"))
    print("   ours settle = after the burst, until the pool is full again and the engine "
          "has deleted the removed containers (the work the burst left behind); "
          "incl. settle = cycles / (wall + settle)")
    for side in ("ours", "raw"):
        steps = [b.steps for b in bench.bursts if b.side == side and b.steps]
        if steps:
            merged = [[x for s in steps for x in s[k]] for k in range(3)]
            print(f"   {side} steps, p50 / p95 ms over all rounds: " + ", ".join(
                f"{name} {fmt_ms(percentile(v, 50))} / {fmt_ms(percentile(v, 95))}"
                for name, v in zip(("create", "exec true", "remove"), merged, strict=True)))
    print()
    print(f"4. {args.cold_burst} concurrent cold creates (workdir {COLD_WORKDIR!r}: not from "
          f"the pool) vs {args.cold_burst} concurrent raw create + start")
    print(burst_table(bench.cold_bursts, "creates"))
    print("   ours settle = after removing them, until the engine has deleted them (raw: "
          "deleted at the delete's reply)")
    print()
    sizes = bench.snapshot_sizes
    print(f"5. snapshot, ms ({args.snapshots} each, alternating; the same sandbox and raw "
          f"container each time, the image removed between): image size ours "
          f"{sizes.get('ours', 0) / 1e6:.0f} MB, raw {sizes.get('raw', 0) / 1e6:.0f} MB")
    snaps = [bench.rows[k] for k in bench.rows
             if k.startswith(("write", "snapshot", "remove that"))]
    print(render_table(ROW_HEADERS, [r.cells() for r in snaps]))
    print()
    print("6. per phase: CPU seconds and the daemon's own request log (server-side ms)")
    headers = ["phase", "wall s", "daemon CPU s", "dockerd+containerd CPU s", "bench CPU s",
               "load avg (1/5/15) at end"]
    rows = [[p.name, fmt_s(p.wall),
             "-" if p.daemon_cpu is None else f"{p.daemon_cpu:.2f}",
             "-" if p.engine_cpu is None else f"{p.engine_cpu:.2f}",
             f"{p.bench_cpu:.2f}", " ".join(f"{x:.2f}" for x in p.load)] for p in bench.phases]
    print(render_table(headers, rows))
    headers = ["phase", "method", "n", "p50 ms", "p95 ms", "max ms"]
    rows = []
    for p in bench.phases:
        for method, values in sorted(bench.request_log(p).items()):
            rows.append([p.name, method, str(len(values)), f"{percentile(values, 50):.2f}",
                         f"{percentile(values, 95):.2f}", f"{max(values):.2f}"])
    print(render_table(headers, rows))
    print("   (daemon.info: the benchmark's polling of the pool; dockerd+containerd CPU counts "
          "every user of the engine)")
    print()
    left = bench.leftover
    if left:
        print(f"after every removal: engine holds {left['instance_containers']} containers of "
              f"the instance for a pool of {left['pool_size']} ({left['pool_ready']} ready), "
              f"{left['raw_containers']} raw, {left['sandboxes_listed']} sandboxes listed; "
              f"pool claims {left['pool_claims']}, misses {left['pool_misses']}")
    warnings = bench.log_counts()
    print(f"daemon log warnings/errors: {warnings or 'none'}")
    print()
    print("targets:")
    for name, value, met in targets(bench):
        print(f"  {name}: {value} — met {fmt_met(met)}")


def report_json(bench: Bench, elapsed: float) -> dict[str, Any]:
    args = bench.args
    return {
        "benchmark": "bench_pool",
        "environment": {**environment(), "loadavg_end": list(os.getloadavg())},
        "config": {
            "n": args.n, "warmup": args.warmup, "pool_size": args.pool_size,
            "rounds": args.rounds, "cold_burst": args.cold_burst,
            "cold_rounds": args.cold_rounds, "snapshots": args.snapshots,
            "cold_workdir": COLD_WORKDIR, "image": IMAGE, "run_id": bench.run_id,
            "instance": bench.instance, "aiodocker": aiodocker.__version__,
        },
        "elapsed_s": round(elapsed, 1),
        "daemon_start_s": round(bench.start_seconds, 3),
        "first_fill_s": round(bench.first_fill, 3),
        "rows": [r.to_json() for r in bench.rows.values()],
        "refill_polled": bench.refill.summary_ms(),
        "refill_logged": bench.logged_refill().summary_ms(),
        "pool_misses": bench.misses,
        "bursts": [b.to_json() for b in bench.bursts],
        "cold_bursts": [b.to_json() for b in bench.cold_bursts],
        "snapshot_image_bytes": bench.snapshot_sizes,
        "phases": [
            {**p.to_json(), "requests": {
                m: {"n": len(v), "p50_ms": round(percentile(v, 50), 3),
                    "p95_ms": round(percentile(v, 95), 3), "max_ms": round(max(v), 3)}
                for m, v in bench.request_log(p).items()}}
            for p in bench.phases
        ],
        "leftover": bench.leftover,
        "daemon_log_warnings": bench.log_counts(),
        "targets": [{"target": n, "value": v, "met": m} for n, v, m in targets(bench)],
    }


async def main_async(bench: Bench) -> int:
    cancel_on_sigterm()
    bench.raw.docker = aiodocker.Docker()
    try:
        await bench.run()
    finally:
        await bench.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    bench = Bench(parse_args(argv))
    try:
        return run(bench)
    finally:
        bench.daemon.close()  # after the report: it reads the daemon's log


def run(bench: Bench) -> int:
    args = bench.args
    status = 0
    started = time.time()
    try:
        status = run_benchmark(
            main_async(bench),
            errors=(aiodocker.DockerError,),
            on_error=lambda exc: bench.daemon.report_error("bench_pool", exc),
        )
    finally:
        log("cleaning up")
        removed, left, problems = 0, 0, ["the clean-up failed"]
        try:
            removed, left, problems = bench.cleanup()
        finally:
            if args.daemon_log:
                with contextlib.suppress(OSError):
                    shutil.copyfile(bench.daemon.log, args.daemon_log)
        for problem in problems:
            log(f"cleanup: {problem}")
        log(f"removed {removed} containers; {left} containers or images left")
        if left or problems:
            status = 1
    elapsed = time.time() - started
    if bench.leftover:  # the run got to its end (the daemon is stopped: its log is complete)
        print_report(bench, elapsed)
        if args.json:
            save_report(args.json, report_json(bench, elapsed))
    return status


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.bench_pool",
        description="Warm-pool create, remove, bursts and snapshots next to raw aiodocker.",
    )
    parser.add_argument("--n", type=int, default=30,
                        help="measured create/exec and remove iterations (default 30)")
    parser.add_argument("--warmup", type=int, default=3, help="warm-up iterations (default 3)")
    parser.add_argument("--pool-size", type=int, default=20,
                        help="the pool's size and the burst's cycles (default 20)")
    parser.add_argument("--rounds", type=int, default=3, help="bursts per side (default 3)")
    parser.add_argument("--cold-burst", type=int, default=50,
                        help="concurrent cold creates (default 50)")
    parser.add_argument("--cold-rounds", type=int, default=1,
                        help="cold bursts per side (default 1)")
    parser.add_argument("--snapshots", type=int, default=5,
                        help="snapshots per side (default 5)")
    parser.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    parser.add_argument("--daemon-log", metavar="FILE", help="keep a copy of the daemon's log")
    args = parser.parse_args(argv)
    if min(args.n, args.pool_size, args.rounds, args.cold_burst, args.cold_rounds,
           args.snapshots) < 1 or args.warmup < 0:
        parser.error("counts must be at least 1, --warmup 0 or more")
    return args


if __name__ == "__main__":
    exit_with(main)
