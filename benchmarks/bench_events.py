"""Event delivery latency: from the call that causes an event to each subscriber's receipt.

Run with the daemon already serving::

    .venv/bin/python -m benchmarks.bench_events --socket /tmp/bench.sock \\
        [--subscribers 1,10,100] [--rate 1000] [--seconds 3] [--json FILE]

One sandbox is created; one driver connection calls ``sandbox.extend`` on
it at a paced rate (default 1,000 per second, pipelined: the pacing never
waits for a reply), each with a distinct ``ttl`` that tags the event it
causes. For each subscriber count, worker processes open that many
connections (one subscription each, filtered to this sandbox's
``sandbox.extended``) and timestamp every ``event`` notification as it is
read. Latency is receipt time minus the driver's send time of the causing
request, both on CLOCK_MONOTONIC (shared by every process on the host): it
includes the request's trip into the daemon, the event's commit to the log,
the fan-out and the trip out, so it is an upper bound of publish-to-delivery.

The subscribers run in worker processes (several, so the readers are not the
bottleneck); the daemon's CPU use over the measured window is shown so a
saturated host is visible. The sandbox is removed at the end, also after a
failure or Ctrl-C; it also carries a ttl, so it expires by itself if this
process is SIGKILLed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import multiprocessing
import os
import sys
import time
from array import array
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

import msgpack

from sandboxd.wire.units import parse_time

from .common import (
    RpcClient,
    RpcError,
    environment,
    fmt_ms,
    log,
    percentile,
    process_cpu_seconds,
    render_table,
    run_benchmark,
    write_json,
)

SANDBOX_TTL = 1800
TAG_BASE = 100_000  # ttl = TAG_BASE + k tags the k-th extend of a run
WARMUP = 200
TARGET_P99_S = 0.010


# -- subscriber workers (separate processes) ---------------------------------


class _Subscriber(asyncio.Protocol):
    """One subscription on one connection; records (tag, receipt time) per event."""

    def __init__(self, subscribed: asyncio.Future[None]) -> None:
        self.unpacker = msgpack.Unpacker(raw=False)
        self.tags = array("q")
        self.times = array("d")  # monotonic, at read
        self.walls = array("d")  # wall clock, at read
        self.stamps: list[str] = []  # the events' own ``time`` (publish, ms resolution)
        self.lagged = 0
        self.subscribed = subscribed
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        now, wall = time.monotonic(), time.time()
        self.unpacker.feed(data)
        for msg in self.unpacker:
            if msg[0] == 2 and msg[1] == "event":
                event = msg[2][1]
                self.tags.append(int(event["data"]["ttl"]) - TAG_BASE)
                self.times.append(now)
                self.walls.append(wall)
                self.stamps.append(event["time"])
            elif msg[0] == 2 and msg[1] == "events.lagged":
                self.lagged += 1
            elif msg[0] == 1 and not self.subscribed.done():
                if msg[2] is None:
                    self.subscribed.set_result(None)
                else:
                    self.subscribed.set_exception(RuntimeError(f"subscribe failed: {msg[2]}"))


async def _worker_main(path: str, sandbox_id: str, count: int, pipe: Connection) -> None:
    loop = asyncio.get_running_loop()
    subs: list[_Subscriber] = []
    request = msgpack.packb(
        [0, 1, "events.subscribe", [{"types": ["sandbox.extended"], "sandbox": sandbox_id}]],
        use_bin_type=True,
    )
    for _ in range(count):
        done: asyncio.Future[None] = loop.create_future()
        transport, proto = await loop.create_unix_connection(lambda d=done: _Subscriber(d), path)  # type: ignore[misc]
        transport.write(request)
        await done
        subs.append(proto)
    pipe.send("ready")
    await asyncio.to_thread(pipe.recv)  # "stop"
    for sub in subs:
        if sub.transport is not None:
            sub.transport.close()
    pipe.send(
        [
            (sub.tags.tobytes(), sub.times.tobytes(), sub.walls.tobytes(), sub.stamps, sub.lagged)
            for sub in subs
        ]
    )


def _worker(path: str, sandbox_id: str, count: int, pipe: Connection) -> None:
    asyncio.run(_worker_main(path, sandbox_id, count, pipe))


# -- the driver -----------------------------------------------------------------


@dataclass
class Result:
    subscribers: int
    events: int
    expected: int
    delivered: int
    lagged: int
    publish: list[float]  # the event's own time (publish, ms resolution) -> read
    reply: list[float]  # the causing call's reply read -> event read (µs resolution)
    request: list[float]  # the causing call sent -> event read
    rate: float
    daemon_cpu: float | None
    workers_cpu: float | None

    @property
    def ok(self) -> bool:
        return self.delivered == self.expected and percentile(self.publish, 99) < TARGET_P99_S

    def row(self) -> list[str]:
        def cpu(v: float | None) -> str:
            return "-" if v is None else f"{v * 100:.0f}%"

        return [
            str(self.subscribers),
            f"{self.rate:,.0f}/s",
            f"{self.delivered:,}/{self.expected:,}",
            str(self.lagged),
            fmt_ms(percentile(self.publish, 50)),
            fmt_ms(percentile(self.publish, 99)),
            fmt_ms(percentile(self.reply, 50)),
            fmt_ms(percentile(self.reply, 99)),
            fmt_ms(percentile(self.request, 50)),
            fmt_ms(percentile(self.request, 99)),
            cpu(self.daemon_cpu),
            cpu(self.workers_cpu),
            "yes" if self.ok else "NO",
        ]

    def to_json(self) -> dict[str, Any]:
        def ms(values: list[float], pct: float) -> float:
            return round(percentile(values, pct) * 1000, 3)

        return {
            "subscribers": self.subscribers,
            "events": self.events,
            "rate": round(self.rate, 1),
            "expected": self.expected,
            "delivered": self.delivered,
            "lagged": self.lagged,
            "publish_to_read_ms": {"p50": ms(self.publish, 50), "p99": ms(self.publish, 99)},
            "reply_to_read_ms": {"p50": ms(self.reply, 50), "p99": ms(self.reply, 99)},
            "request_to_read_ms": {"p50": ms(self.request, 50), "p99": ms(self.request, 99)},
            "daemon_cpu": self.daemon_cpu,
            "workers_cpu": self.workers_cpu,
        }


async def _drive(
    rpc: RpcClient,
    sandbox_id: str,
    start: int,
    count: int,
    rate: float,
    sent: dict[int, float],
    replied: dict[int, float],
) -> float:
    """Send ``count`` tagged extends at ``rate`` per second; the achieved rate."""
    pending: set[asyncio.Task[Any]] = set()

    async def one(k: int) -> None:
        sent[k] = time.monotonic()
        await rpc.call("sandbox.extend", {"id": sandbox_id, "ttl": TAG_BASE + k})
        replied[k] = time.monotonic()

    t0 = time.monotonic()
    for i in range(count):
        delay = t0 + i / rate - time.monotonic()
        if delay > 0.0005:
            await asyncio.sleep(delay)
        task = asyncio.create_task(one(start + i))
        pending.add(task)
        task.add_done_callback(pending.discard)
    elapsed = time.monotonic() - t0
    if pending:
        await asyncio.gather(*pending)
    return count / elapsed if elapsed > 0 else float("nan")


def _cpu(pids: list[int]) -> float | None:
    total = 0.0
    for pid in pids:
        value = process_cpu_seconds(pid)
        if value is None:
            return None
        total += value
    return total


async def run_one(
    args: argparse.Namespace, rpc: RpcClient, sandbox_id: str, subscribers: int, first_tag: int
) -> Result:
    ctx = multiprocessing.get_context("spawn")
    nworkers = max(1, min(args.workers, subscribers))
    shares = [
        subscribers // nworkers + (1 if i < subscribers % nworkers else 0) for i in range(nworkers)
    ]
    procs, pipes = [], []
    try:
        for share in shares:
            here, there = ctx.Pipe()
            proc = ctx.Process(
                target=_worker, args=(args.socket, sandbox_id, share, there), daemon=True
            )
            proc.start()
            procs.append(proc)
            pipes.append(here)
        for pipe in pipes:
            if not await asyncio.to_thread(pipe.poll, 60):
                raise RuntimeError("a subscriber worker did not get ready within 60 s")
            if pipe.recv() != "ready":
                raise RuntimeError("a subscriber worker failed")

        sent: dict[int, float] = {}
        replied: dict[int, float] = {}
        await _drive(rpc, sandbox_id, first_tag, WARMUP, args.rate, sent, replied)
        count = int(args.rate * args.seconds)
        worker_pids = [p.pid for p in procs if p.pid is not None]
        cpu0, wcpu0 = process_cpu_seconds(rpc.peer_pid), _cpu(worker_pids)
        w0 = time.monotonic()
        rate = await _drive(rpc, sandbox_id, first_tag + WARMUP, count, args.rate, sent, replied)
        cpu1, wcpu1 = process_cpu_seconds(rpc.peer_pid), _cpu(worker_pids)
        window = time.monotonic() - w0
        await asyncio.sleep(1.0)  # let the last events arrive
        for pipe in pipes:
            pipe.send("stop")
        results = []
        for pipe in pipes:
            if not await asyncio.to_thread(pipe.poll, 60):
                raise RuntimeError("a subscriber worker did not report within 60 s")
            results.extend(pipe.recv())
    finally:
        for proc in procs:
            proc.join(5)
            if proc.is_alive():
                proc.kill()

    first = first_tag + WARMUP
    stamps: dict[str, float] = {}
    publish: list[float] = []
    reply: list[float] = []
    request: list[float] = []
    delivered = lagged = 0
    for tag_bytes, time_bytes, wall_bytes, texts, lag in results:
        tags, times, walls = array("q"), array("d"), array("d")
        tags.frombytes(tag_bytes)
        times.frombytes(time_bytes)
        walls.frombytes(wall_bytes)
        lagged += lag
        for k, t, wall, text in zip(tags, times, walls, texts, strict=True):
            if k < first or k not in sent:
                continue
            delivered += 1
            if text not in stamps:
                stamps[text] = parse_time(text)
            # Event.time is truncated to the millisecond: add half of one for the mean.
            publish.append(wall - stamps[text] - 0.0005)
            request.append(t - sent[k])
            if k in replied:
                reply.append(t - replied[k])
    cpu = None if cpu0 is None or cpu1 is None else (cpu1 - cpu0) / window
    wcpu = None if wcpu0 is None or wcpu1 is None else (wcpu1 - wcpu0) / window
    return Result(
        subscribers,
        count,
        count * subscribers,
        delivered,
        lagged,
        publish,
        reply,
        request,
        rate,
        cpu,
        wcpu,
    )


async def main_async(args: argparse.Namespace) -> int:
    rpc = await RpcClient.connect(args.socket)
    sandbox_id: str | None = None
    results: list[Result] = []
    try:
        if await rpc.call("daemon.ping") != "pong":
            raise RuntimeError("daemon.ping did not answer pong")
        sb = await rpc.call("sandbox.create", {"ttl": SANDBOX_TTL, "labels": {"bench": "events"}})
        sandbox_id = str(sb["id"])
        log(f"sandbox {sandbox_id}")
        tag = 0
        for n in args.subscribers:
            log(f"{n} subscriber(s): {args.rate:g} events/s for {args.seconds:g} s ...")
            result = await run_one(args, rpc, sandbox_id, n, tag)
            tag += WARMUP + result.events
            results.append(result)
            log("  " + "  ".join(result.row()))
    finally:
        if sandbox_id is not None:
            with contextlib.suppress(RpcError, OSError, Exception):
                async with asyncio.timeout(30):
                    await rpc.call("sandbox.remove", {"id": sandbox_id})
        await rpc.close()

    headers = [
        "subs",
        "rate",
        "delivered",
        "lagged",
        "pub p50",
        "pub p99",
        "reply p50",
        "reply p99",
        "req p50",
        "req p99",
        "daemon CPU",
        "subs CPU",
        "p99<10ms",
    ]
    print(
        f"Event delivery latency in ms, {args.rate:g} events/s for {args.seconds:g} s, "
        f"{os.cpu_count()} CPUs"
    )
    print(render_table(headers, [r.row() for r in results]))
    print(
        "pub: the event's own time (set at publish, ms resolution) -> notification read;\n"
        "reply: the causing sandbox.extend's reply read -> notification read;\n"
        "req: that call sent -> notification read (includes the daemon's durable state "
        "write before the reply)."
    )
    if args.json:
        write_json(
            args.json,
            {
                "environment": environment(),
                "rate": args.rate,
                "seconds": args.seconds,
                "results": [r.to_json() for r in results],
            },
        )
    return 0 if all(r.ok for r in results) else 2


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="bench_events", description=__doc__.split("\n")[0])
    parser.add_argument("--socket", required=True, help="the daemon's socket")
    parser.add_argument(
        "--subscribers",
        default="1,10,100",
        type=lambda s: [int(x) for x in s.split(",") if x],
        help="subscriber counts to measure (default 1,10,100)",
    )
    parser.add_argument("--rate", type=float, default=1000.0, help="events per second")
    parser.add_argument("--seconds", type=float, default=3.0, help="measured seconds per count")
    parser.add_argument(
        "--workers",
        type=int,
        default=max(1, min(4, os.cpu_count() or 1)),
        help="subscriber processes (default: up to 4)",
    )
    parser.add_argument("--json", help="also write the results to this JSON file")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return run_benchmark(main_async(args))


if __name__ == "__main__":
    sys.exit(main())
