"""Recovery after a crash: how long until every sandbox's agent is ready again.

Run as root next to a running Docker Engine with the image ``sandboxd/base``::

    .venv/bin/python -m benchmarks.bench_resync [--sandboxes 100] [--runs 3] [--json FILE]

It starts its own daemon (own socket, state directory and instance name, all
under one temporary directory, like ``bench_startup``), creates
``--sandboxes`` sandboxes through it (``memory "32m"``, ``ttl 600``), waits
until each reports ``agent: "ready"``, starts one detached command that keeps
printing (``exec.start {detach: true}``) and closes that connection. Then,
``--runs`` times: SIGKILL the daemon, start it again and time, from just
before the process is spawned,

- READY=1: the datagram on a ``NOTIFY_SOCKET`` this script binds;
- ping: the first ``daemon.ping`` answered;
- all agents ready: the first ``sandbox.list`` (polled every ``--poll`` ms)
  in which every sandbox is listed with ``agent: "ready"`` (per sandbox,
  the first poll that shows it ready: p50/max in the table);
- attachable: the first ``exec.attach {exec_id, offset: 0}`` of the
  detached command that succeeds (tried every ``--poll`` ms on a second
  connection, ``not_found`` until the daemon has resynchronised with that
  sandbox's agent), and its first replayed ``exec.output``; the command must
  then still be printing (live output after the replay).

Everything is removed at the end, also after a failure, Ctrl-C or SIGTERM:
the daemon (SIGTERM, SIGKILL after 10 s), every container of the run's
instance label (``docker rm -f``, in batches) and the temporary directory.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import time
from dataclasses import dataclass, field
from typing import Any

from .common import (
    IMAGE,
    ExecFollower,
    RpcClient,
    RpcError,
    cancel_on_sigterm,
    environment,
    exit_with,
    log,
    percentile,
    render_table,
    run_benchmark,
    save_report,
)
from .daemonproc import START_TIMEOUT, DaemonProcess

MEMORY = "32m"
TTL = 600
RESYNC_TIMEOUT = 120.0
CREATE_CONCURRENCY = 8
TICKER = ["sh", "-c", "i=0; while :; do echo $i; i=$((i+1)); sleep 0.05; done"]


@dataclass
class RunResult:
    """One crash and restart; times in seconds from just before the spawn."""

    run: int
    ready: float = math.nan  # READY=1
    ping: float = math.nan
    all_agents: float = math.nan
    first_agent: float = math.nan
    per_sandbox: list[float] = field(default_factory=list)  # first poll that showed it ready
    ready_at_ready1: int = 0  # sandboxes whose agent was ready in the first list after READY=1
    listed: int = 0
    states_seen: dict[str, int] = field(default_factory=dict)  # the most at once, per state
    polls: int = 0
    attach: float = math.nan
    attach_output: float = math.nan
    attach_offset: int | None = None
    attach_tries: int = 0
    attach_errors: dict[str, int] = field(default_factory=dict)
    replayed: int = 0
    live: bool = False

    def row(self) -> list[str]:
        def ms(value: float) -> str:
            return "-" if math.isnan(value) else f"{value * 1000:.0f}"

        return [
            str(self.run),
            ms(self.ready),
            ms(self.ping),
            ms(self.first_agent),
            ms(percentile(self.per_sandbox, 50)),
            ms(percentile(self.per_sandbox, 95)),
            ms(self.all_agents),
            f"{self.listed}",
            ms(self.attach),
            ms(self.attach_output),
            ms(self.attach - self.ready),
            "yes" if self.live else "NO",
        ]

    def to_json(self) -> dict[str, Any]:
        def ms(value: float) -> float | None:
            return None if math.isnan(value) else round(value * 1000, 1)

        return {
            "run": self.run,
            "ready_ms": ms(self.ready),
            "ping_ms": ms(self.ping),
            "first_agent_ready_ms": ms(self.first_agent),
            "all_agents_ready_ms": ms(self.all_agents),
            "per_sandbox_agent_ready_ms": [ms(v) for v in sorted(self.per_sandbox)],
            "agents_ready_in_first_list": self.ready_at_ready1,
            "sandboxes_listed": self.listed,
            "agent_states_most_at_once": self.states_seen,
            "list_polls": self.polls,
            "attach_ms": ms(self.attach),
            "attach_first_output_ms": ms(self.attach_output),
            "attach_after_ready_ms": ms(self.attach - self.ready),
            "attach_offset": self.attach_offset,
            "attach_tries": self.attach_tries,
            "attach_errors": self.attach_errors,
            "replayed_bytes": self.replayed,
            "live_after_replay": self.live,
        }


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.poll = args.poll / 1000
        self.daemon = DaemonProcess("bench-resync", "brs-", "warning", notify=True)
        self.ids: list[str] = []
        self.exec_id = ""
        self.fill_seconds = math.nan
        self.first_ready_seconds = math.nan
        self.results: list[RunResult] = []

    async def _connect(self) -> RpcClient:
        """A connection whose ``daemon.ping`` was answered, tried every 2 ms."""
        return await self.daemon.connect(poll=0.002)

    # filling ----------------------------------------------------------------------------
    async def wait_all_ready(self, rpc: RpcClient, within: float) -> float:
        started = time.perf_counter()
        while True:
            listed = await rpc.call("sandbox.list")
            if len(listed) >= len(self.ids) and all(s.get("agent") == "ready" for s in listed):
                return time.perf_counter() - started
            if time.perf_counter() - started > within:
                states = [s.get("agent") for s in listed]
                raise RuntimeError(
                    f"agents not ready after {within:g} s: "
                    f"{ {s: states.count(s) for s in set(states)} }"
                )
            await asyncio.sleep(self.poll)

    async def fill(self) -> None:
        count = self.args.sandboxes
        log(f"starting a daemon and creating {count} sandboxes")
        started = time.perf_counter()
        self.daemon.spawn()
        rpc = await self._connect()
        try:
            gate = asyncio.Semaphore(CREATE_CONCURRENCY)

            async def one() -> None:
                async with gate:
                    reply = await rpc.call(
                        "sandbox.create",
                        {
                            "image": IMAGE,
                            "ttl": TTL,
                            "memory": MEMORY,
                            "labels": {"bench": "resync"},
                        },
                    )
                    self.ids.append(str(reply["id"]))

            await asyncio.gather(*(one() for _ in range(count)))
            self.fill_seconds = time.perf_counter() - started
            self.first_ready_seconds = await self.wait_all_ready(rpc, RESYNC_TIMEOUT)
            follower = ExecFollower(rpc)
            watch = await follower.start({"id": self.ids[0], "cmd": TICKER, "detach": True})
            self.exec_id = watch.exec_id
            async with asyncio.timeout(10):
                await watch.first_output
        finally:
            await rpc.close()  # the detached command runs on
        log(
            f"{count} sandboxes in {self.fill_seconds:.1f} s, agents ready "
            f"{self.first_ready_seconds:.1f} s later; detached command {self.exec_id}"
        )

    # one crash and restart ------------------------------------------------------------
    async def _poll_agents(self, rpc: RpcClient, t0: float, result: RunResult) -> None:
        want = set(self.ids)
        seen: dict[str, float] = {}
        first = True
        deadline = time.monotonic() + RESYNC_TIMEOUT
        while True:
            listed = await rpc.call("sandbox.list")
            now = time.perf_counter() - t0
            result.polls += 1
            result.listed = len(listed)
            counts: dict[str, int] = {}
            for s in listed:
                state = str(s.get("agent"))
                counts[state] = counts.get(state, 0) + 1
                if state == "ready" and s["id"] in want and s["id"] not in seen:
                    seen[s["id"]] = now
            for state, n in counts.items():
                result.states_seen[state] = max(result.states_seen.get(state, 0), n)
            if first:
                result.ready_at_ready1 = counts.get("ready", 0)
                first = False
            if seen and math.isnan(result.first_agent):
                result.first_agent = min(seen.values())
            if len(seen) == len(want):
                result.all_agents = now
                result.per_sandbox = list(seen.values())
                return
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"after {RESYNC_TIMEOUT:g} s {len(seen)} of {len(want)} agents are ready: "
                    f"{counts}"
                )
            self.daemon.check_alive()
            await asyncio.sleep(self.poll)

    async def _attach(self, t0: float, result: RunResult) -> None:
        rpc = await self._connect()
        try:
            follower = ExecFollower(rpc)
            deadline = time.monotonic() + RESYNC_TIMEOUT
            while True:
                result.attach_tries += 1
                try:
                    watch, offset = await follower.attach(self.exec_id, 0)
                    result.attach = time.perf_counter() - t0
                    result.attach_offset = offset
                    break
                except RpcError as exc:
                    result.attach_errors[exc.code] = result.attach_errors.get(exc.code, 0) + 1
                if time.monotonic() > deadline:
                    raise RuntimeError(
                        f"exec {self.exec_id} not attachable: {result.attach_errors}"
                    )
                await asyncio.sleep(self.poll)
            async with asyncio.timeout(10):
                result.attach_output = await watch.first_output - t0
                await asyncio.sleep(0.3)  # the replay of what was retained arrives at once
                result.replayed = watch.received
                for _ in range(200):  # live: more output within 2 s
                    if watch.received > result.replayed:
                        result.live = True
                        break
                    await asyncio.sleep(0.01)
        except TimeoutError:
            result.live = False
        finally:
            await rpc.close()  # detached: it runs on

    async def restart(self, run: int) -> RunResult:
        result = RunResult(run)
        self.daemon.kill()
        self.daemon.drain_notify()
        t0 = time.perf_counter()
        self.daemon.spawn(notify=True)
        ready1 = asyncio.create_task(self.daemon.wait_ready1(t0))
        rpc: RpcClient | None = None
        try:
            rpc = await self._connect()
            result.ping = time.perf_counter() - t0
            attach = asyncio.create_task(self._attach(t0, result))
            try:
                await self._poll_agents(rpc, t0, result)
                async with asyncio.timeout(START_TIMEOUT):
                    result.ready = await ready1
                    await attach
            finally:
                attach.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await attach
        finally:
            ready1.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await ready1
            if rpc is not None:
                await rpc.close()
        return result

    async def run(self) -> None:
        await self.fill()
        for run in range(1, self.args.runs + 1):
            log(f"run {run}: SIGKILL, restart, wait for every agent and the detached command")
            self.results.append(await self.restart(run))

    # cleanup ------------------------------------------------------------------------
    def cleanup(self) -> tuple[int, int]:
        """Stop the daemon, remove every container of this instance and the temporary
        directory: (removed, left)."""
        self.daemon.stop()
        removed = self.daemon.remove_containers()
        left = len(self.daemon.containers())
        self.daemon.close()
        return removed, left


def report(bench: Bench) -> str:
    headers = [
        "run",
        "READY=1",
        "ping",
        "1st agent",
        "agent p50",
        "agent p95",
        "all agents",
        "listed",
        "attach",
        "1st output",
        "attach-READY",
        "live",
    ]
    rows = [r.row() for r in bench.results]
    if len(bench.results) > 1:

        def med(values: list[float]) -> str:
            values = [v for v in values if not math.isnan(v)]
            return "-" if not values else f"{percentile(values, 50) * 1000:.0f}"

        rs = bench.results
        rows.append(
            [
                "p50",
                med([r.ready for r in rs]),
                med([r.ping for r in rs]),
                med([r.first_agent for r in rs]),
                med([percentile(r.per_sandbox, 50) for r in rs]),
                med([percentile(r.per_sandbox, 95) for r in rs]),
                med([r.all_agents for r in rs]),
                "",
                med([r.attach for r in rs]),
                med([r.attach_output for r in rs]),
                med([r.attach - r.ready for r in rs]),
                "",
            ]
        )
    return render_table(headers, rows)


async def main_async(bench: Bench) -> int:
    cancel_on_sigterm()
    await bench.run()
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    bench = Bench(args)
    status = 0
    started = time.time()
    try:
        status = run_benchmark(
            main_async(bench), on_error=lambda exc: bench.daemon.report_error("bench_resync", exc)
        )
    finally:
        log("cleaning up")
        removed, left = bench.cleanup()
        log(f"removed {removed} containers; {left} left")
        if left:
            status = 1
    elapsed = time.time() - started
    if not bench.results:
        return status
    print(
        f"crash recovery with {args.sandboxes} sandboxes (memory {MEMORY}, ttl {TTL}): "
        f"SIGKILL, then `sandboxd serve` again; ms from just before the spawn; "
        f"sandbox.list and exec.attach polled every {args.poll:g} ms; {elapsed:.0f} s total"
    )
    print(report(bench))
    print(
        "READY=1: the notify datagram. ping: the first daemon.ping answered. 1st agent / agent "
        "p50 / p95 / all agents: the first sandbox.list showing one / half / 95 % / every "
        'sandbox with agent "ready". listed: sandboxes in that list. attach: the first '
        "exec.attach of the detached command that succeeded; 1st output: its first replayed "
        "exec.output; attach-READY: attach minus READY=1. live: the command was still printing."
    )
    first = bench.results[0]
    print(
        f"first restart: {first.ready_at_ready1} agents ready in the first list; most at once "
        f"per state: {first.states_seen}; attach tries {first.attach_tries}, errors "
        f"{first.attach_errors or '{}'}, replay from offset {first.attach_offset}"
    )
    print(
        f"fill: {args.sandboxes} creates in {bench.fill_seconds:.1f} s, every agent ready "
        f"{bench.first_ready_seconds:.2f} s after the last create"
    )
    if args.json:
        save_report(
            args.json,
            {
                "benchmark": "bench_resync",
                "environment": environment(),
                "config": {
                    "sandboxes": args.sandboxes,
                    "runs": args.runs,
                    "poll_ms": args.poll,
                    "memory": MEMORY,
                    "ttl": TTL,
                    "detached_command": TICKER,
                },
                "fill_seconds": round(bench.fill_seconds, 2),
                "fill_agents_ready_seconds": round(bench.first_ready_seconds, 3),
                "results": [r.to_json() for r in bench.results],
            },
        )
    return status


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.bench_resync",
        description="Time from a SIGKILLed daemon's restart until every agent is ready again.",
    )
    parser.add_argument("--sandboxes", type=int, default=100, help="sandboxes (default 100)")
    parser.add_argument("--runs", type=int, default=3, help="crash + restart cycles (default 3)")
    parser.add_argument(
        "--poll", type=float, default=20.0, help="sandbox.list / exec.attach every MS (default 20)"
    )
    parser.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    args = parser.parse_args(argv)
    if args.sandboxes < 1 or args.runs < 1 or args.poll <= 0:
        parser.error("--sandboxes and --runs must be at least 1, --poll positive")
    return args


if __name__ == "__main__":
    exit_with(main)
