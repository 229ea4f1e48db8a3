"""Measure the agent: binary size, idle RSS, exec latency, bulk output throughput.

    .venv/bin/python tests/agent/bench_agent.py [--docker] [--gib N]

Locally the agent runs as a subprocess with two pipes; the reader acknowledges after every
read (256 KiB reads), as a prompt daemon would. With --docker the same is measured as PID 1
of a container through the Engine API's attach stream (not a test: numbers only).
"""

from __future__ import annotations

import argparse
import os
import select
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from agentproc import Agent, ExecResult

from sandboxd.agent import build
from sandboxd.agent import frames as fr


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * p))]


def local_latency(agent: Agent, argv: list[str], rounds: int = 300) -> list[float]:
    times = []
    for _ in range(rounds):
        exec_id = agent.new_id()
        res = agent.execs[exec_id] = ExecResult(exec_id)
        t0 = time.perf_counter()
        agent.send(fr.encode_start(exec_id, argv))
        while res.exit is None:
            agent.poll(1)
        times.append(time.perf_counter() - t0)
        agent.send(fr.encode_release(exec_id))
    return times


def local_throughput(agent: Agent, total: int, read_size: int = 256 << 10) -> float:
    exec_id = agent.new_id()
    agent.send(fr.encode_start(exec_id, ["head", "-c", str(total), "/dev/zero"]))
    rfd = agent._from_agent  # the benchmark reads the pipe itself: no per-frame bookkeeping
    dec = agent.decoder
    got = 0
    done = False
    t0 = time.perf_counter()
    while not done:
        select.select([rfd], [], [], 1)
        try:
            data = os.read(rfd, read_size)
        except BlockingIOError:
            continue
        dec.feed(data)
        last = None
        for frame in dec:
            if isinstance(frame, fr.Output):
                got += len(frame.data)
                last = frame
            elif isinstance(frame, fr.Exit):
                done = True
        if last is not None:
            os.write(agent._to_agent, fr.encode_ack(exec_id, last.end))
    elapsed = time.perf_counter() - t0
    assert got == total, (got, total)
    agent.send(fr.encode_release(exec_id))
    return total / elapsed


def docker_numbers(binary: Path, total: int) -> None:
    from dockerattach import Attach, agent_container

    with agent_container(binary, "sandboxd/base:latest", f"sbx-agent-bench-{os.getpid()}") as cid:
        att = Attach(cid)
        att.handshake()
        times = []
        for i in range(200):
            t0 = time.perf_counter()
            att.run(1000 + i, ["true"])
            times.append(time.perf_counter() - t0)
        print(f"docker attach: `true` START->EXIT median {percentile(times, 0.5) * 1e3:.2f} ms,"
              f" p90 {percentile(times, 0.9) * 1e3:.2f} ms")
        att.send(fr.encode_start(2, ["head", "-c", str(total), "/dev/zero"]))
        got = 0
        done = False
        t0 = time.perf_counter()
        while not done:
            att.pump(1)
            last = None
            while att.frames:
                frame = att.frames.popleft()
                if isinstance(frame, fr.Output):
                    got += len(frame.data)
                    last = frame
                elif isinstance(frame, fr.Exit):
                    done = True
            if last is not None:
                att.send(fr.encode_ack(2, last.end))
        rate = got / (time.perf_counter() - t0)
        print(f"docker attach: {got >> 20} MiB of output at {rate / 1e6:.0f} MB/s")
        att.close()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--docker", action="store_true", help="also measure through Docker")
    parser.add_argument("--gib", type=float, default=1.0, help="GiB of output to move locally")
    args = parser.parse_args()
    binary = build.build()
    print(f"binary: {binary} ({binary.stat().st_size} bytes)")
    with Agent(binary) as agent:
        agent.handshake()
        with open(f"/proc/{agent.proc.pid}/status") as f:
            rss = f.read().split("VmRSS:")[1].split()[0]
        print(f"idle RSS after the handshake: {rss} kB")
        for argv in (["true"], [shutil.which("busybox") or "true", "true"]):
            times = local_latency(agent, argv)
            print(f"local: {' '.join(argv)} START->EXIT median {percentile(times, 0.5) * 1e3:.3f}"
                  f" ms, p90 {percentile(times, 0.9) * 1e3:.3f} ms,"
                  f" min {min(times) * 1e3:.3f} ms")
        total = int(args.gib * (1 << 30))
        rate = local_throughput(agent, total)
        print(f"local: {total >> 20} MiB of output at {rate / 1e6:.0f} MB/s")
    if args.docker:
        docker_numbers(binary, 256 << 20)


if __name__ == "__main__":
    main()
