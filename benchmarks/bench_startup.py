"""Start-up time of ``sandboxd serve`` with 0, 100 and 500 sandboxes to adopt.

Run as root next to a running Docker Engine with the image ``sandboxd/base``::

    .venv/bin/python -m benchmarks.bench_startup [--counts 0,100,500] [--runs 5] [--json FILE]

It starts its own daemons (own socket, state directory and instance name,
all under one temporary directory). For each count, in increasing order, a
first daemon brings the number of sandboxes up to that count (``ttl 0``,
``memory "8m"``, to keep them light) and is then SIGKILLed; then the daemon
is started ``--runs`` times, each time timed from just before the process is
spawned to

- ready: the ``READY=1`` datagram on a ``NOTIFY_SOCKET`` this script binds
  (the daemon sends it once the engine's view is adopted and it serves), and
- ping: the first ``daemon.ping`` answered on the socket,

checked (``sandbox.list`` holds every sandbox) and SIGKILLed again, so each
start is a crash recovery. The table shows p50/min/max per count; the target
is a ready p50 under 1 s at 500 sandboxes. A line for the bare interpreter
plus the daemon's imports gives the floor no start can beat.

Everything is removed at the end, also after a failure or Ctrl-C: every
container of the run's instance label (``docker rm -f``, in batches), the
daemons, and the temporary directory.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import select
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Any

from .common import (
    IMAGE,
    RpcClient,
    RpcError,
    environment,
    percentile,
    render_table,
    run_benchmark,
    write_json,
)
from .daemonproc import PROJECT_ROOT, START_TIMEOUT, DaemonProcess

TARGET_SECONDS = 1.0
TARGET_COUNT = 500
CREATE_CONCURRENCY = 8


@dataclass
class Result:
    count: int
    ready: list[float] = field(default_factory=list)
    ping: list[float] = field(default_factory=list)
    fill_seconds: float = 0.0

    def row(self) -> list[str]:
        def ms(values: list[float], pct: float | None = None, fn: Any = None) -> str:
            if not values:
                return "-"
            value = percentile(values, pct) if pct is not None else fn(values)
            return "-" if math.isnan(value) else f"{value * 1000:.0f}"

        return [
            str(self.count),
            str(len(self.ready)),
            ms(self.ready, 50),
            ms(self.ready, fn=min),
            ms(self.ready, fn=max),
            ms(self.ping, 50),
            f"{self.fill_seconds:.1f}",
        ]

    def to_json(self) -> dict[str, Any]:
        return {
            "sandboxes": self.count,
            "ready_p50_ms": round(percentile(self.ready, 50) * 1000, 1) if self.ready else None,
            "ping_p50_ms": round(percentile(self.ping, 50) * 1000, 1) if self.ping else None,
            "ready_ms": [round(v * 1000, 1) for v in self.ready],
            "ping_ms": [round(v * 1000, 1) for v in self.ping],
            "fill_seconds": round(self.fill_seconds, 2),
        }


class Bench:
    def __init__(self, runs: int) -> None:
        self.runs = runs
        self.daemon = DaemonProcess("bench-startup", "bst-", "warning", notify=True)
        self.socket = self.daemon.socket

    # the daemon process ---------------------------------------------------------------
    def _pings(self) -> bool:
        """True when a daemon.ping on a fresh connection answers (a blocking check)."""
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                sock.settimeout(2.0)
                sock.connect(self.socket)
                sock.sendall(b"\x94\x00\x01\xabdaemon.ping\x90")  # [0, 1, "daemon.ping", []]
                return b"pong" in sock.recv(256)
        except OSError:
            return False

    def timed_start(self) -> tuple[float, float]:
        """Spawn the daemon; seconds until READY=1 and until the first ping answer."""
        daemon = self.daemon
        assert daemon.notify is not None
        daemon.drain_notify()
        t0 = time.perf_counter()
        proc = daemon.spawn(notify=True)
        ready = ping = math.nan
        while math.isnan(ready) or math.isnan(ping):
            now = time.perf_counter()
            if now - t0 > START_TIMEOUT:
                raise RuntimeError(f"the daemon was not ready within {START_TIMEOUT:g} s")
            if proc.poll() is not None:
                raise RuntimeError(
                    f"the daemon exited with status {proc.returncode}; see {daemon.log}"
                )
            if math.isnan(ready):
                readable, _, _ = select.select([daemon.notify], [], [], 0.002)
                if readable:
                    data = daemon.notify.recv(4096)
                    if b"READY=1" in data.split(b"\n"):
                        ready = time.perf_counter() - t0
            if math.isnan(ping) and os.path.exists(self.socket) and self._pings():
                ping = time.perf_counter() - t0
        return ready, ping

    # sandboxes ------------------------------------------------------------------------
    async def _listed(self) -> list[dict[str, Any]]:
        rpc = await RpcClient.connect(self.socket)
        try:
            result: list[dict[str, Any]] = await rpc.call("sandbox.list")
            return result
        finally:
            await rpc.close()

    async def fill_to(self, count: int) -> float:
        """Bring the sandboxes up to ``count`` through a daemon; the seconds it took."""
        started = time.perf_counter()
        self.daemon.spawn()
        rpc = await self.daemon.connect(poll=0.02)
        try:
            have = len(await rpc.call("sandbox.list"))
            gate = asyncio.Semaphore(CREATE_CONCURRENCY)

            async def one() -> None:
                async with gate:
                    await rpc.call(
                        "sandbox.create",
                        {"image": IMAGE, "ttl": 0, "memory": "8m", "labels": {"bench": "startup"}},
                    )

            await asyncio.gather(*(one() for _ in range(count - have)))
        finally:
            await rpc.close()
        self.daemon.kill()
        return time.perf_counter() - started

    async def measure(self, count: int) -> Result:
        result = Result(count)
        result.fill_seconds = await self.fill_to(count)
        for _ in range(self.runs):
            ready, ping = self.timed_start()
            listed = len(await self._listed())
            self.daemon.kill()
            if listed != count:
                raise RuntimeError(f"the daemon adopted {listed} sandboxes, expected {count}")
            result.ready.append(ready)
            result.ping.append(ping)
        return result

    # cleanup ------------------------------------------------------------------------
    def cleanup(self) -> int:
        """Kill the daemon, remove every container of this instance and the temporary
        directory: how many containers were removed."""
        self.daemon.kill()
        removed = self.daemon.remove_containers()
        self.daemon.close()
        return removed


def import_floor(runs: int) -> float:
    """p50 seconds for the interpreter to import what ``sandboxd serve`` imports."""
    code = "import sandboxd.cli, sandboxd.daemon"
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-c", code], check=True, cwd=str(PROJECT_ROOT))
        times.append(time.perf_counter() - t0)
    return percentile(times, 50)


async def main_async(args: argparse.Namespace) -> int:
    bench = Bench(args.runs)
    results: list[Result] = []
    try:
        floor = import_floor(args.runs)
        for count in sorted(args.counts):
            print(f"... {count} sandboxes", file=sys.stderr, flush=True)
            results.append(await bench.measure(count))
    except (RpcError, RuntimeError) as exc:
        print(f"bench_startup: {exc}", file=sys.stderr)
        return 1
    finally:
        removed = bench.cleanup()
        print(f"... removed {removed} containers", file=sys.stderr)

    headers = ["sandboxes", "runs", "ready p50 ms", "min", "max", "ping p50 ms", "fill s"]
    print(render_table(headers, [r.row() for r in results]))
    print(f"floor (python + imports, p50): {floor * 1000:.0f} ms")
    verdict = ""
    at_target = [r for r in results if r.count == TARGET_COUNT]
    if at_target:
        p50 = percentile(at_target[0].ready, 50)
        ok = p50 < TARGET_SECONDS
        verdict = "PASS" if ok else "FAIL"
        print(
            f"target: ready p50 < {TARGET_SECONDS * 1000:.0f} ms at {TARGET_COUNT}: "
            f"{p50 * 1000:.0f} ms {verdict}"
        )
    if args.json:
        write_json(
            args.json,
            {
                "benchmark": "startup",
                "environment": environment(),
                "import_floor_ms": round(floor * 1000, 1),
                "results": [r.to_json() for r in results],
                "target": verdict or None,
            },
        )
    return 0 if verdict != "FAIL" else 2


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.bench_startup",
        description="Time from `sandboxd serve` to ready with sandboxes to adopt.",
    )
    parser.add_argument(
        "--counts",
        default="0,100,500",
        help="sandbox counts to adopt, comma-separated (default 0,100,500)",
    )
    parser.add_argument("--runs", type=int, default=5, help="timed starts per count (default 5)")
    parser.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    args = parser.parse_args(argv)
    try:
        args.counts = [int(c) for c in args.counts.split(",") if c.strip()]
    except ValueError:
        parser.error("--counts must be integers separated by commas")
    if not args.counts or any(c < 0 for c in args.counts) or args.runs < 1:
        parser.error("--counts must be non-negative and --runs at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    return run_benchmark(main_async(parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
