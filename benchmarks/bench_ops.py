"""Per-operation latency of sandboxd next to raw aiodocker doing the same work.

Run with the daemon already serving::

    .venv/bin/python -m benchmarks.bench_ops --socket /tmp/bench.sock [--n 30] [--json FILE]

For each operation it times the call through sandboxd (msgpack-RPC over the
Unix socket, with the raw client in ``benchmarks.common``) and the same work
done directly with aiodocker against the same Docker Engine (``benchmarks.rawdocker``),
alternating the two sides iteration by iteration (ours first on even iterations,
raw first on odd ones) so that drift hits both equally. Warm-up iterations are run
but not counted. It prints p50/p95 for both sides and the ratio ours/raw.

Every container it makes is removed at the end, also after a failure or
Ctrl-C: sandboxes through ``sandbox.remove`` (any sandbox carrying this run's
``bench`` label included), raw containers by id and by the
``io.sandboxd.bench=1`` label they all carry.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Self

import aiodocker

from .common import (
    IMAGE,
    Compared,
    RpcClient,
    RpcError,
    cancel_on_sigterm,
    environment,
    exit_with,
    fmt_met,
    fmt_ms,
    log,
    ms_or_none,
    process_cpu_seconds,
    render_table,
    run_benchmark,
    save_report,
)
from .rawdocker import BENCH_LABEL, MIB, RawContainers

SANDBOX_TTL = 1800  # ours expire by themselves even if this process is SIGKILLed
ONE_MIB_CMD = ["head", "-c", str(MIB), "/dev/zero"]
CLEANUP_TIMEOUT = 30.0
RATIO_TARGET = 1.10
STATS_TARGET_S = 0.020


@dataclass
class OpResult(Compared):
    name: str
    target: str = ""
    daemon_cpu_s: float | None = None  # daemon CPU seconds over the phase
    daemon_calls: int = 0  # calls the daemon served in the phase (warm-up included)
    raw_cpu_s: float = 0.0  # this process's CPU during the raw calls (aiodocker's work)
    raw_calls: int = 0
    note: str = ""

    @property
    def daemon_cpu_per_call(self) -> float:
        if self.daemon_cpu_s is None or not self.daemon_calls:
            return math.nan
        return self.daemon_cpu_s / self.daemon_calls

    @property
    def raw_cpu_per_call(self) -> float:
        return self.raw_cpu_s / self.raw_calls if self.raw_calls else math.nan

    def met(self) -> bool | None:
        if not self.ours.values:
            return None
        if self.target == "ratio":
            return self.ratio_at(50) <= RATIO_TARGET
        if self.target == "stats":
            return self.ours.p50 < STATS_TARGET_S
        return None

    def target_text(self) -> str:
        if self.target == "ratio":
            return f"p50 <= {RATIO_TARGET:.2f}x"
        if self.target == "stats":
            return f"p50 < {STATS_TARGET_S * 1000:.0f} ms"
        return ""

    def to_json(self) -> dict[str, Any]:
        r50, r95 = self.ratio_at(50), self.ratio_at(95)
        return {
            "op": self.name,
            "sandboxd": self.ours.summary_ms(),
            "aiodocker": self.raw.summary_ms(),
            "ratio_p50": None if math.isnan(r50) else round(r50, 3),
            "ratio_p95": None if math.isnan(r95) else round(r95, 3),
            "paired_delta_ms": ms_or_none(self.paired_delta),
            "target": self.target_text() or None,
            "target_met": self.met(),
            "daemon_cpu_ms_per_call": ms_or_none(self.daemon_cpu_per_call),
            "raw_client_cpu_ms_per_call": ms_or_none(self.raw_cpu_per_call),
            "note": self.note or None,
        }


async def timed(fn: Callable[[], Awaitable[Any]]) -> tuple[float, Any]:
    started = time.perf_counter()
    result = await fn()
    return time.perf_counter() - started, result


async def timed_cpu(fn: Callable[[], Awaitable[Any]]) -> tuple[float, float, Any]:
    """(wall seconds, this process's CPU seconds, result) of one call."""
    cpu = time.process_time()
    wall, result = await timed(fn)
    return wall, time.process_time() - cpu, result


class Bench:
    def __init__(self, rpc: RpcClient, docker: aiodocker.Docker, args: argparse.Namespace) -> None:
        self.rpc = rpc
        self.docker = docker
        self.args = args
        self.run_id = secrets.token_hex(4)
        self.ours_ids: list[str] = []  # sandboxes alive
        self.raw = RawContainers(self.run_id, docker)  # raw containers alive
        self.daemon_pid = rpc.peer_pid
        self.results: list[OpResult] = []
        self.first_stats = OpResult(
            "stats (first call)",
            note="the first stats call on each fresh container, right after its create",
        )

    @classmethod
    async def run_against(cls, args: argparse.Namespace) -> tuple[Self, int, float]:
        """Connect to the daemon at ``--socket`` and the engine, run, and clean up
        whatever happens: (the bench, 1 if the clean-up had problems else 0, seconds)."""
        cancel_on_sigterm()
        rpc = await RpcClient.connect(args.socket)
        docker = aiodocker.Docker()
        bench = cls(rpc, docker, args)
        status = 0
        started = time.time()
        try:
            pong = await rpc.call("daemon.ping")
            if pong != "pong":
                raise RuntimeError(f"daemon.ping replied {pong!r}")
            log(f"run {bench.run_id}: daemon pid {bench.daemon_pid or '?'}")
            await bench.run()
        finally:
            log("cleaning up")
            problems = await asyncio.shield(bench.cleanup(args.socket))
            for problem in problems:
                log(f"cleanup: {problem}")
            if problems:
                status = 1
            await rpc.close()
            await docker.close()
        return bench, status, time.time() - started

    def config_json(self, **sizes: Any) -> dict[str, Any]:
        """The JSON report's ``config``: the socket, ``sizes`` (in their order), then the
        image, the run and the clients."""
        return {
            "socket": self.args.socket,
            **sizes,
            "image": IMAGE,
            "run_id": self.run_id,
            "client": "benchmarks.common.RpcClient (raw msgpack)",
            "aiodocker": aiodocker.__version__,
        }

    # one side, one operation -------------------------------------------
    async def ours_create(self) -> str:
        reply = await self.rpc.call(
            "sandbox.create",
            {"image": IMAGE, "ttl": SANDBOX_TTL, "labels": {"bench": self.run_id}},
        )
        sid = str(reply["id"])
        self.ours_ids.append(sid)
        if reply.get("status") != "running":
            raise RuntimeError(f"sandbox.create replied with status {reply.get('status')!r}")
        return sid

    async def ours_remove(self, sid: str) -> None:
        await self.rpc.call("sandbox.remove", {"id": sid})
        self.ours_ids.remove(sid)

    async def ours_exec(self, sid: str, cmd: list[str], expect: int) -> None:
        params: dict[str, Any] = {"id": sid, "cmd": cmd}
        if expect:
            params["max_output"] = 2 * MIB
        reply = await self.rpc.call("sandbox.exec", params)
        if reply["exit_code"] != 0 or len(reply["stdout"]) != expect or reply["truncated"]:
            raise RuntimeError(
                f"sandbox.exec {cmd}: exit {reply['exit_code']}, "
                f"{len(reply['stdout'])} bytes, truncated={reply['truncated']}"
            )

    async def raw_stats(self, cid: str) -> dict[str, Any]:
        result: dict[str, Any] = await self.docker._query_json(
            f"containers/{cid}/stats", params={"stream": "false", "one-shot": "true"}
        )
        return result

    # phases --------------------------------------------------------------
    def _cpu(self) -> float | None:
        return process_cpu_seconds(self.daemon_pid) if self.daemon_pid else None

    def _finish_cpu(self, op: OpResult, before: float | None, calls: int) -> None:
        after = self._cpu()
        if before is not None and after is not None:
            op.daemon_cpu_s = after - before
            op.daemon_calls = calls

    async def alternate(
        self,
        i: int,
        ours: Callable[[], Awaitable[Any]],
        raw: Callable[[], Awaitable[Any]],
        op: OpResult,
        record: bool,
    ) -> tuple[Any, Any]:
        """Run both sides once, ours first on even iterations, raw first on odd ones."""
        if i % 2 == 0:
            t_ours, r_ours = await timed(ours)
            t_raw, c_raw, r_raw = await timed_cpu(raw)
        else:
            t_raw, c_raw, r_raw = await timed_cpu(raw)
            t_ours, r_ours = await timed(ours)
        op.raw_cpu_s += c_raw
        op.raw_calls += 1
        if record:
            op.ours.add(t_ours)
            op.raw.add(t_raw)
        return r_ours, r_raw

    async def phase_create(self, n: int, warmup: int) -> list[tuple[str, str]]:
        op = OpResult("create")
        first = self.first_stats
        stats_cpu = 0.0
        pairs: list[tuple[str, str]] = []
        log(f"create: {warmup} warm-up + {n} measured pairs")
        before = self._cpu()
        for i in range(warmup + n):
            sid, cid = await self.alternate(i, self.ours_create, self.raw.create, op, i >= warmup)
            pairs.append((sid, cid))

            def ours_stats(sid: str = sid) -> Awaitable[Any]:
                return self.rpc.call("sandbox.stats", {"id": sid})

            def raw_stats(cid: str = cid) -> Awaitable[Any]:
                return self.raw_stats(cid)

            t0 = self._cpu()
            await self.alternate(i, ours_stats, raw_stats, first, i >= warmup)
            t1 = self._cpu()
            if t0 is not None and t1 is not None:
                stats_cpu += t1 - t0
        after = self._cpu()
        if before is not None and after is not None:
            op.daemon_cpu_s, op.daemon_calls = after - before - stats_cpu, warmup + n
            first.daemon_cpu_s, first.daemon_calls = stats_cpu, warmup + n
        self.results.append(op)
        return pairs

    async def phase_remove(self, pairs: list[tuple[str, str]], warmup: int) -> None:
        op = OpResult("remove")
        log(f"remove: {len(pairs)} pairs ({warmup} warm-up)")
        before = self._cpu()
        for i, (sid, cid) in enumerate(pairs):

            def ours(sid: str = sid) -> Awaitable[None]:
                return self.ours_remove(sid)

            def raw(cid: str = cid) -> Awaitable[None]:
                return self.raw.remove(cid)

            await self.alternate(i, ours, raw, op, i >= warmup)
        self._finish_cpu(op, before, len(pairs))
        self.results.append(op)

    async def phase_simple(
        self,
        name: str,
        n: int,
        warmup: int,
        ours: Callable[[], Awaitable[Any]],
        raw: Callable[[], Awaitable[Any]],
        target: str,
        note: str = "",
    ) -> None:
        op = OpResult(name, target=target, note=note)
        log(f"{name}: {warmup} warm-up + {n} measured pairs")
        before = self._cpu()
        for i in range(warmup + n):
            await self.alternate(i, ours, raw, op, i >= warmup)
        self._finish_cpu(op, before, warmup + n)
        self.results.append(op)

    async def phase_pause_resume(self, sid: str, cid: str, n: int, warmup: int) -> None:
        pause = OpResult("pause", target="ratio")
        resume = OpResult("resume", target="ratio")
        container = self.docker.containers.container(cid)
        log(f"pause/resume: {warmup} warm-up + {n} measured cycles")
        before = self._cpu()
        pause_cpu = 0.0
        for i in range(warmup + n):
            record = i >= warmup
            t0 = self._cpu()
            await self.alternate(
                i,
                lambda: self.rpc.call("sandbox.pause", {"id": sid}),
                container.pause,
                pause,
                record,
            )
            t1 = self._cpu()
            if t0 is not None and t1 is not None:
                pause_cpu += t1 - t0
            await self.alternate(
                i,
                lambda: self.rpc.call("sandbox.resume", {"id": sid}),
                container.unpause,
                resume,
                record,
            )
        after = self._cpu()
        if before is not None and after is not None:
            pause.daemon_cpu_s, pause.daemon_calls = pause_cpu, warmup + n
            resume.daemon_cpu_s, resume.daemon_calls = after - before - pause_cpu, warmup + n
        self.results += [pause, resume]

    async def run(self) -> None:
        args = self.args
        n_small, n_big, warmup = args.n or 30, args.n or 15, args.warmup
        if not args.skip_create:
            pairs = await self.phase_create(n_big, warmup)
            self.results.append(self.first_stats)
            await self.phase_remove(pairs, warmup)
        log("creating the long-lived pair for exec/pause/resume/stats")
        sid = await self.ours_create()
        cid = await self.raw.create()
        await self.phase_simple(
            "exec true",
            n_small,
            warmup,
            lambda: self.ours_exec(sid, ["true"], 0),
            lambda: self.raw.exec(cid, ["true"], 0),
            "ratio",
        )
        await self.phase_simple(
            "exec 1 MiB out",
            n_small,
            warmup,
            lambda: self.ours_exec(sid, ONE_MIB_CMD, MIB),
            lambda: self.raw.exec(cid, ONE_MIB_CMD, MIB),
            "ratio",
        )
        await self.phase_pause_resume(sid, cid, n_small, warmup)
        await self.phase_simple(
            "stats",
            n_small,
            warmup,
            lambda: self.rpc.call("sandbox.stats", {"id": sid}),
            lambda: self.raw_stats(cid),
            "stats",
            note="raw: back-to-back one-shot calls wait for Docker's 1 s stats collector tick",
        )
        order = [
            "create",
            "exec true",
            "exec 1 MiB out",
            "pause",
            "resume",
            "stats",
            "stats (first call)",
            "remove",
        ]
        self.results.sort(key=lambda r: order.index(r.name) if r.name in order else 99)

    # cleanup ---------------------------------------------------------------
    async def cleanup(self, socket_path: str) -> list[str]:
        """Remove everything this run made; the problems met, if any."""
        problems: list[str] = []
        rpc: RpcClient = self.rpc
        daemon_ok = True
        try:
            async with asyncio.timeout(CLEANUP_TIMEOUT):
                try:
                    await rpc.call("daemon.ping")
                except Exception:
                    await rpc.close()
                    rpc = await RpcClient.connect(socket_path)
                listed = await rpc.call("sandbox.list", {"labels": {"bench": self.run_id}})
                ids = set(self.ours_ids) | {str(s["id"]) for s in listed}
                for sid in ids:
                    try:
                        await rpc.call("sandbox.remove", {"id": sid})
                    except RpcError as exc:
                        if exc.code != "not_found":
                            problems.append(f"sandbox {sid}: {exc}")
                            daemon_ok = False
                self.ours_ids.clear()
        except Exception as exc:
            daemon_ok = False
            problems.append(f"removing sandboxes through the daemon failed: {exc!r}")
        finally:
            if rpc is not self.rpc:
                await rpc.close()
        labels = [f"{BENCH_LABEL}=1"]
        if not daemon_ok:
            # Last resort: the daemon cannot remove them, so remove them behind its back.
            labels.append(f"io.sandboxd.label.bench={self.run_id}")
        try:
            async with asyncio.timeout(CLEANUP_TIMEOUT):
                leftovers = set(self.raw.ids)
                for label in labels:
                    found = await self.docker.containers.list(all=True, filters={"label": [label]})
                    leftovers |= {c.id for c in found}
                for cid in leftovers:
                    try:
                        await self.docker.containers.container(cid).delete(force=True, v=True)
                    except aiodocker.DockerError as exc:
                        if exc.status != 404:
                            problems.append(f"container {cid[:12]}: {exc}")
                self.raw.ids.clear()
        except Exception as exc:
            problems.append(f"removing raw containers failed: {exc!r}")
        return problems


def report_table(results: list[OpResult]) -> str:
    headers = [
        "operation",
        "n",
        "ours p50",
        "ours p95",
        "raw p50",
        "raw p95",
        "p50 ratio",
        "p95 ratio",
        "paired Δ",
        "daemon CPU/call",
        "raw CPU/call",
        "target",
        "met",
    ]
    rows = []
    for r in results:
        rows.append(
            [
                r.name,
                str(len(r.ours.values)),
                *r.ratio_cells(),
                fmt_ms(r.daemon_cpu_per_call),
                fmt_ms(r.raw_cpu_per_call),
                r.target_text() or "-",
                fmt_met(r.met()),
            ]
        )
    return render_table(headers, rows)


async def main_async(args: argparse.Namespace) -> int:
    bench, status, elapsed = await Bench.run_against(args)
    print(
        f"sandboxd vs raw aiodocker, same engine, same run; times in ms; "
        f"warm-up {args.warmup} per op excluded; {elapsed:.0f} s total"
    )
    print(report_table(bench.results))
    print(
        "ratio = ours/raw. paired Δ = median over iterations of (ours - raw), ms.\n"
        "daemon CPU/call = the daemon's CPU over the phase / its calls (10 ms ticks: coarse); "
        "raw CPU/call = this process's CPU during the raw calls (aiodocker's own work)."
    )
    for r in bench.results:
        if r.note:
            print(f"  {r.name}: {r.note}")
    if args.json:
        save_report(
            args.json,
            {
                "benchmark": "bench_ops",
                "environment": environment(),
                "config": bench.config_json(
                    n=args.n or 30, n_create_remove=args.n or 15, warmup=args.warmup
                ),
                "elapsed_s": round(elapsed, 1),
                "results": [r.to_json() for r in bench.results],
            },
        )
    return status


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.bench_ops",
        description="p50/p95 per operation through sandboxd next to raw aiodocker.",
    )
    parser.add_argument("--socket", required=True, help="the running daemon's Unix socket")
    parser.add_argument(
        "--n",
        type=int,
        default=None,
        help="measured iterations per operation (default 30; 15 for create/remove)",
    )
    parser.add_argument("--warmup", type=int, default=3, help="warm-up iterations (default 3)")
    parser.add_argument("--json", metavar="FILE", help="also write the full results as JSON")
    parser.add_argument("--skip-create", action="store_true", help="skip create/remove")
    args = parser.parse_args(argv)
    if args.n is not None and args.n < 1:
        parser.error("--n must be at least 1")
    if args.warmup < 0:
        parser.error("--warmup must be 0 or more")
    return args


def main(argv: list[str] | None = None) -> int:
    return run_benchmark(main_async(parse_args(argv)), errors=(aiodocker.DockerError,))


if __name__ == "__main__":
    exit_with(main)
