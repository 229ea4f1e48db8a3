"""``daemon.ping`` round trips per second: sandboxd next to a bare msgpack echo server.

Run with the daemon already serving::

    .venv/bin/python -m benchmarks.bench_ping --socket /tmp/bench.sock [--json FILE]

Two modes, each on one connection:

- sequential: one request in flight; the next is sent when the reply arrives
  (``RpcClient.call`` from ``benchmarks.common``);
- pipelined: ``--in-flight`` (default 100) requests outstanding at all
  times; every reply is answered with a new request, and the replies that
  arrive during ``--duration`` seconds are counted.

The baseline is a bare msgpack-RPC server this script starts in a subprocess
(``--echo-server PATH``): asyncio, Protocol-based, ``msgpack.Unpacker`` in,
``[1, msgid, None, "pong"]`` out, one ``transport.write`` per reply, the same
way the daemon writes. The same client code drives both servers; rounds
alternate which server goes first, and the table shows the median round. The
CPU columns (from /proc) show who was busy: a server near 100 % is the
bottleneck; a client near 100 % means the figures are a floor for both.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Any

import msgpack

from .common import (
    MAX_MSGID,
    REQUEST,
    RESPONSE,
    RpcClient,
    environment,
    peer_pid,
    process_cpu_seconds,
    render_table,
    run_benchmark,
    save_report,
)

TARGET = 0.7
WARMUP = 0.3  # seconds of traffic before each measurement, not counted
READY = "ready"
PROJECT_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# the bare server ------------------------------------------------------------
class EchoProtocol(asyncio.Protocol):
    """A minimal msgpack-RPC server: every request gets ``"pong"``."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.unpacker = msgpack.Unpacker(raw=False)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        assert self.transport is not None
        self.unpacker.feed(data)
        for msg in self.unpacker:
            if isinstance(msg, list) and len(msg) == 4 and msg[0] == REQUEST:
                self.transport.write(msgpack.packb([RESPONSE, msg[1], None, "pong"]))


async def echo_server(path: str) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    server = await loop.create_unix_server(EchoProtocol, path)
    print(READY, flush=True)
    await stop.wait()
    server.close()
    await server.wait_closed()


# the pipelined client ---------------------------------------------------------
class Pinger(asyncio.Protocol):
    """Keeps ``depth`` pings outstanding; counts the pongs received inside a window."""

    def __init__(self, depth: int) -> None:
        self.depth = depth
        self.transport: asyncio.Transport | None = None
        self.unpacker = msgpack.Unpacker(raw=False)
        self.packer = msgpack.Packer(use_bin_type=True)
        self.next_id = 0
        self.outstanding = 0
        self.sending = True
        self.counting = False
        self.counted = 0
        self.errors = 0
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.lost: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self._send(self.depth)

    def _send(self, count: int) -> None:
        assert self.transport is not None
        out = []
        for _ in range(count):
            self.next_id = self.next_id + 1 if self.next_id < MAX_MSGID else 0
            out.append(self.packer.pack([REQUEST, self.next_id, "daemon.ping", []]))
        self.outstanding += count
        self.transport.write(b"".join(out))

    def data_received(self, data: bytes) -> None:
        self.unpacker.feed(data)
        replies = 0
        for msg in self.unpacker:
            if isinstance(msg, list) and len(msg) == 4 and msg[0] == RESPONSE:
                replies += 1
                if msg[2] is not None or msg[3] != "pong":
                    self.errors += 1
        self.outstanding -= replies
        if self.counting:
            self.counted += replies
        if self.sending:
            self._send(replies)
        elif self.outstanding == 0 and not self.done.done():
            self.done.set_result(None)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.lost.done():
            self.lost.set_result(None)
        if not self.done.done():
            self.done.set_exception(ConnectionError("the server closed the connection"))


# measuring ---------------------------------------------------------------------
@dataclass
class Measurement:
    server: str
    mode: str
    calls: int
    seconds: float
    server_cpu: float | None  # fraction of one CPU
    client_cpu: float  # fraction of one CPU
    errors: int = 0

    @property
    def rate(self) -> float:
        return self.calls / self.seconds if self.seconds > 0 else 0.0

    def to_json(self) -> dict[str, Any]:
        return {
            "server": self.server,
            "mode": self.mode,
            "calls": self.calls,
            "seconds": round(self.seconds, 4),
            "calls_per_s": round(self.rate, 1),
            "server_cpu_pct": None if self.server_cpu is None else round(self.server_cpu * 100, 1),
            "client_cpu_pct": round(self.client_cpu * 100, 1),
            "errors": self.errors,
        }


class CpuWindow:
    """CPU used by the server process and by this process across a time window."""

    def __init__(self, server_pid: int) -> None:
        self.server_pid = server_pid
        self.wall = time.perf_counter()
        self.client = time.process_time()
        self.server = process_cpu_seconds(server_pid) if server_pid else None

    def end(self) -> tuple[float, float, float | None]:
        """(wall seconds, client CPU fraction, server CPU fraction or None)."""
        wall = time.perf_counter() - self.wall
        client = (time.process_time() - self.client) / wall
        after = process_cpu_seconds(self.server_pid) if self.server_pid else None
        server = None if after is None or self.server is None else (after - self.server) / wall
        return wall, client, server


async def sequential(server: str, path: str, duration: float) -> Measurement:
    rpc = await RpcClient.connect(path)
    try:
        pid = rpc.peer_pid
        warm_end = time.perf_counter() + WARMUP
        while time.perf_counter() < warm_end:
            await rpc.call("daemon.ping")
        calls = 0
        window = CpuWindow(pid)
        end = window.wall + duration
        while True:
            if await rpc.call("daemon.ping") != "pong":
                raise RuntimeError(f"{server}: daemon.ping did not answer pong")
            calls += 1
            if calls % 64 == 0 and time.perf_counter() >= end:
                break
        wall, client, server_cpu = window.end()
    finally:
        await rpc.close()
    return Measurement(server, "sequential", calls, wall, server_cpu, client)


async def pipelined(server: str, path: str, duration: float, depth: int) -> Measurement:
    loop = asyncio.get_running_loop()
    transport, pinger = await loop.create_unix_connection(lambda: Pinger(depth), path)
    try:
        sock = transport.get_extra_info("socket")
        pid = peer_pid(sock) if sock is not None else 0
        await asyncio.sleep(WARMUP)
        window = CpuWindow(pid)
        pinger.counting = True
        await asyncio.sleep(duration)
        pinger.counting = False
        wall, client, server_cpu = window.end()
        calls = pinger.counted
        pinger.sending = False
        if pinger.outstanding == 0 and not pinger.done.done():
            pinger.done.set_result(None)
        async with asyncio.timeout(10):
            await pinger.done
    finally:
        transport.close()
    return Measurement(server, "pipelined", calls, wall, server_cpu, client, pinger.errors)


class EchoServerProcess:
    """The bare server, run as ``python -m benchmarks.bench_ping --echo-server PATH``."""

    def __init__(self) -> None:
        self.dir = tempfile.mkdtemp(prefix="sandboxd-bench-echo-")
        self.path = os.path.join(self.dir, "echo.sock")
        self.proc: subprocess.Popen[str] | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "benchmarks.bench_ping", "--echo-server", self.path],
            stdout=subprocess.PIPE,
            text=True,
            cwd=PROJECT_ROOT,  # so that ``-m benchmarks...`` imports this checkout
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline().strip()
        if line != READY:
            self.stop()
            raise RuntimeError(f"the echo server did not start (said {line!r})")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        with contextlib.suppress(OSError):
            os.unlink(self.path)
        with contextlib.suppress(OSError):
            os.rmdir(self.dir)


def fmt_rate(value: float) -> str:
    return f"{value:,.0f}"


def fmt_cpu(values: list[float | None]) -> str:
    known = [v for v in values if v is not None]
    return f"{statistics.median(known) * 100:.0f}%" if known else "-"


def summarize(runs: list[Measurement], server: str, mode: str) -> tuple[float, list[Measurement]]:
    mine = [m for m in runs if m.server == server and m.mode == mode]
    return statistics.median(m.rate for m in mine), mine


async def main_async(args: argparse.Namespace) -> int:
    echo = EchoServerProcess()
    echo.start()
    runs: list[Measurement] = []
    servers = {"sandboxd": args.socket, "bare": echo.path}
    try:
        rpc = await RpcClient.connect(args.socket)
        try:
            if await rpc.call("daemon.ping") != "pong":
                raise RuntimeError("daemon.ping did not answer pong")
        finally:
            await rpc.close()
        for rnd in range(args.rounds):
            order = ["sandboxd", "bare"] if rnd % 2 == 0 else ["bare", "sandboxd"]
            for name in order:
                m = await sequential(name, servers[name], args.duration)
                print(f"round {rnd + 1} {name} sequential: {m.rate:,.0f}/s", file=sys.stderr)
                runs.append(m)
            for name in order:
                m = await pipelined(name, servers[name], args.duration, args.in_flight)
                print(f"round {rnd + 1} {name} pipelined: {m.rate:,.0f}/s", file=sys.stderr)
                runs.append(m)
    finally:
        echo.stop()

    headers = [
        "mode",
        "sandboxd calls/s",
        "bare calls/s",
        "ratio",
        "target",
        "met",
        "sandboxd µs/call",
        "bare µs/call",
        "daemon CPU",
        "bare CPU",
        "client CPU s/b",
    ]
    rows = []
    results: list[dict[str, Any]] = []
    for mode, label in (("sequential", "sequential (1 in flight)"), ("pipelined", "")):
        if mode == "pipelined":
            label = f"pipelined ({args.in_flight} in flight)"
        ours, ours_runs = summarize(runs, "sandboxd", mode)
        bare, bare_runs = summarize(runs, "bare", mode)
        r = ours / bare if bare else 0.0
        met = r >= TARGET
        rows.append(
            [
                label,
                fmt_rate(ours),
                fmt_rate(bare),
                f"{r:.2f}x",
                f">= {TARGET:.1f}x",
                "yes" if met else "NO",
                f"{1e6 / ours:.1f}" if ours else "-",
                f"{1e6 / bare:.1f}" if bare else "-",
                fmt_cpu([m.server_cpu for m in ours_runs]),
                fmt_cpu([m.server_cpu for m in bare_runs]),
                fmt_cpu([m.client_cpu for m in ours_runs])
                + "/"
                + fmt_cpu([m.client_cpu for m in bare_runs]),
            ]
        )
        results.append(
            {
                "mode": mode,
                "in_flight": 1 if mode == "sequential" else args.in_flight,
                "sandboxd_calls_per_s": round(ours, 1),
                "bare_calls_per_s": round(bare, 1),
                "ratio": round(r, 3),
                "target": TARGET,
                "target_met": met,
            }
        )
    print(
        f"daemon.ping round trips per second, one connection, {args.duration:g} s per "
        f"measurement, median of {args.rounds} rounds"
    )
    print(render_table(headers, rows))
    print(
        "ratio = sandboxd/bare (higher is better). CPU = median share of one core during "
        "the window; client CPU s/b = this process while driving sandboxd / bare."
    )
    errors = sum(m.errors for m in runs)
    if errors:
        print(f"WARNING: {errors} error replies during pipelined runs")
    if args.json:
        save_report(
            args.json,
            {
                "benchmark": "bench_ping",
                "environment": environment(),
                "config": {
                    "socket": args.socket,
                    "duration_s": args.duration,
                    "rounds": args.rounds,
                    "in_flight": args.in_flight,
                    "warmup_s": WARMUP,
                },
                "results": results,
                "runs": [m.to_json() for m in runs],
            },
        )
    return 1 if errors else 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.bench_ping",
        description="daemon.ping round trips per second, sandboxd vs a bare msgpack server.",
    )
    parser.add_argument("--socket", help="the running daemon's Unix socket")
    parser.add_argument("--duration", type=float, default=3.0, help="seconds per measurement")
    parser.add_argument("--rounds", type=int, default=3, help="rounds (median is shown)")
    parser.add_argument("--in-flight", type=int, default=100, help="pipelined depth")
    parser.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    parser.add_argument("--echo-server", metavar="PATH", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.echo_server is None and not args.socket:
        parser.error("--socket is required")
    if args.duration <= 0 or args.rounds < 1 or args.in_flight < 1:
        parser.error("--duration, --rounds and --in-flight must be positive")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.echo_server:
        asyncio.run(echo_server(args.echo_server))
        return 0
    return run_benchmark(main_async(args))


if __name__ == "__main__":
    sys.exit(main())
