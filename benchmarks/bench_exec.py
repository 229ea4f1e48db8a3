"""Commands, output streams and files through the in-sandbox agent, next to raw aiodocker.

Run with the daemon already serving::

    .venv/bin/python -m benchmarks.bench_exec --socket /tmp/bench.sock [--n 50] [--json FILE]

One sandbox (through sandboxd, whose PID 1 is the agent) and one raw container
of the same image with the hardened config ``bench_ops`` uses (``sleep
infinity`` under Docker's init; commands through the engine's exec) do the
same work, alternating iteration by iteration (ours first on even iterations,
raw first on odd ones) so that drift hits both equally; warm-up iterations run
but are not counted. Rows:

- exec ``true``: ``sandbox.exec`` next to exec create + start + inspect;
- time to the first output byte of ``sh -c 'echo x; sleep 1'``: ``exec.start``
  until the first ``exec.output`` notification, next to exec create + start
  until the first stdout frame;
- a 100 MiB stdout streamed (``exec.start``, counting ``exec.output`` bytes
  until ``exec.exit``) and a 16 MiB one buffered (``sandbox.exec``, the
  policy's ``max_output`` cap), next to a raw exec reading its stream;
- a 50 MiB file written and read in 4 MiB ``files.write``/``files.read``
  chunks, next to the engine's archive API (``PUT``/``GET
  /containers/{id}/archive`` with a tar of the same file);

then the agent's binary size and its memory (VmRSS of the sandbox's PID 1,
seen from the host) idle and after the run. It prints the tables and the
targets and exits 0 whether or not they are met.

Every container it makes is removed at the end, also after a failure, Ctrl-C
or SIGTERM, the same way ``bench_ops`` does it (whose create and clean-up it
reuses).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import math
import os
import platform
import tarfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiodocker

from . import bench_ops as ops
from .common import (
    Compared,
    ExecFollower,
    RpcClient,
    RpcError,
    Samples,
    StreamedExec,
    environment,
    exit_with,
    fmt_delta,
    fmt_met,
    fmt_ms,
    fmt_ratio,
    log,
    percentile,
    render_table,
    run_benchmark,
    save_report,
)

MIB = 1024 * 1024
MB = 1_000_000  # MB/s figures are 10^6 bytes per second
PROJECT_ROOT = Path(__file__).resolve().parent.parent
AGENT_PATH = "/.sandboxd/agent"  # where the daemon mounts the agent in a sandbox
STREAM_SIZE = 100 * MIB
BUFFERED_SIZE = 16 * MIB  # the policy's default cap on max_output
FILE_SIZE = 50 * MIB
CHUNK = 4 * MIB
FILE_DIR = "/tmp"
FILE_NAME = "bench-exec-file"
TTFB_CMD = ["sh", "-c", "echo x; sleep 1"]
AGENT_READY_TIMEOUT = 15.0
CALL_TIMEOUT = 120.0
EXEC_P50_TARGET_S = 0.003
EXEC_SPEEDUP_TARGET = 15.0
STREAM_TARGET = 1.0
READ_TARGET = 3.0


def head_cmd(size: int) -> list[str]:
    return ["head", "-c", str(size), "/dev/zero"]


@dataclass
class Row(Compared):
    """One operation, both sides: seconds per call (per transfer for the throughput rows)."""

    name: str
    size: int = 0  # bytes moved per call; 0 for a latency row
    target: str = ""  # exec, stream, read or empty
    ours_client_cpu_s: float = 0.0  # this process during our calls (warm-up included)
    raw_client_cpu_s: float = 0.0  # this process during the raw calls: aiodocker's work
    daemon_cpu_s: float | None = 0.0  # the daemon during our calls; None when unreadable
    calls: int = 0  # per side, warm-up included
    note: str = ""

    def per_call(self, seconds: float | None) -> float:
        return math.nan if seconds is None or not self.calls else seconds / self.calls

    def mbps(self, samples: Samples, pct: float) -> float:
        seconds = percentile(samples.values, pct)
        return math.nan if not samples.values or seconds <= 0 else self.size / seconds / MB

    def target_text(self) -> str:
        if self.target == "exec":
            return (
                f"p50 <= {EXEC_P50_TARGET_S * 1000:.0f} ms, raw/ours >= {EXEC_SPEEDUP_TARGET:.0f}x"
            )
        if self.target == "stream":
            return f"ours/raw >= {STREAM_TARGET:.1f}x"
        if self.target == "read":
            return f"ours/raw >= {READ_TARGET:.0f}x"
        return ""

    def met(self) -> bool | None:
        if not self.ours.values or not self.target:
            return None
        speedup = self.speedup_at(50)
        if self.target == "exec":
            return self.ours.p50 <= EXEC_P50_TARGET_S and speedup >= EXEC_SPEEDUP_TARGET
        if self.target == "stream":
            return speedup >= STREAM_TARGET
        if self.target == "read":
            return speedup >= READ_TARGET
        return None

    def to_json(self) -> dict[str, Any]:
        def num(value: float, digits: int = 3) -> float | None:
            return None if math.isnan(value) else round(value, digits)

        out: dict[str, Any] = {
            "op": self.name,
            "sandboxd": self.ours.summary_ms(),
            "aiodocker": self.raw.summary_ms(),
            "speedup_p50": num(self.speedup_at(50)),
            "speedup_p95": num(self.speedup_at(95)),
            "paired_delta_ms": num(self.paired_delta * 1e3),
            "daemon_cpu_ms_per_call": num(self.per_call(self.daemon_cpu_s) * 1e3),
            "ours_client_cpu_ms_per_call": num(self.per_call(self.ours_client_cpu_s) * 1e3),
            "raw_client_cpu_ms_per_call": num(self.per_call(self.raw_client_cpu_s) * 1e3),
            "target": self.target_text() or None,
            "target_met": self.met(),
            "note": self.note or None,
        }
        if self.size:
            out["bytes"] = self.size
            out["sandboxd"]["samples_mb_per_s"] = [
                round(self.size / v / MB, 1) for v in self.ours.values
            ]
            out["aiodocker"]["samples_mb_per_s"] = [
                round(self.size / v / MB, 1) for v in self.raw.values
            ]
            out["sandboxd_mb_per_s_p50"] = num(self.mbps(self.ours, 50), 1)
            out["aiodocker_mb_per_s_p50"] = num(self.mbps(self.raw, 50), 1)
        return out


def proc_status(pid: int) -> dict[str, str]:
    """``/proc/PID/status`` as a map (empty when unreadable)."""
    try:
        with open(f"/proc/{pid}/status") as fh:
            lines = fh.read().splitlines()
    except OSError:
        return {}
    return {k: v.strip() for k, _, v in (line.partition(":") for line in lines)}


def proc_cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            return fh.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return "?"


def binary_facts(path: str | None) -> dict[str, Any]:
    """The agent binary's path and size; this machine's build when ``path`` is not there."""
    if path is None or not os.path.exists(path):
        path = str(PROJECT_ROOT / "sandboxd/agent/bin" / f"sandboxd-agent-{platform.machine()}")
    size = os.stat(path).st_size if os.path.exists(path) else None
    return {"path": path, "bytes": size}


def kib(value: str | None) -> int | None:
    """``"140 kB"`` → 140."""
    if not value:
        return None
    with contextlib.suppress(ValueError):
        return int(value.split()[0])
    return None


def tar_of(name: str, data: bytes) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        info = tarfile.TarInfo(name)
        info.size = len(data)
        info.mode = 0o644
        info.mtime = int(time.time())
        tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


class ExecBench(ops.Bench):
    def __init__(self, rpc: RpcClient, docker: aiodocker.Docker, args: argparse.Namespace) -> None:
        super().__init__(rpc, docker, args)
        self.follower = ExecFollower(rpc)
        self.rows: list[Row] = []
        self.agent: dict[str, Any] = {}
        self.daemon_info: dict[str, Any] = {}

    # set-up ---------------------------------------------------------------------
    async def wait_agent(self, sid: str) -> float:
        """Seconds until the sandbox reports ``agent: "ready"`` (commands then go through it)."""
        started = time.perf_counter()
        state = "?"
        while time.perf_counter() - started < AGENT_READY_TIMEOUT:
            state = (await self.rpc.call("sandbox.get", {"id": sid})).get("agent", "?")
            if state == "ready":
                return time.perf_counter() - started
            await asyncio.sleep(0.01)
        raise RuntimeError(
            f"sandbox {sid}: agent {state!r} after {AGENT_READY_TIMEOUT:g} s, not 'ready' "
            "(commands would go through the engine's exec); see the daemon's log"
        )

    async def container_pid1(self, container_id: str) -> tuple[int, dict[str, Any]]:
        shown: dict[str, Any] = await self.docker.containers.container(container_id).show()
        return int(shown["State"]["Pid"]), shown

    async def memory_of(self, container_id: str) -> dict[str, Any]:
        pid, _ = await self.container_pid1(container_id)
        status = proc_status(pid)
        return {
            "pid": pid,
            "cmdline": proc_cmdline(pid),
            "vm_rss_kib": kib(status.get("VmRSS")),
            "vm_hwm_kib": kib(status.get("VmHWM")),
        }

    async def agent_binary(self, container_id: str) -> dict[str, Any]:
        """The binary the daemon mounts as the sandbox's PID 1 (its bind mount's source)."""
        _, shown = await self.container_pid1(container_id)
        path = None
        for bind in shown.get("HostConfig", {}).get("Binds") or []:
            source, _, rest = bind.partition(":")
            if rest.split(":")[0] == AGENT_PATH:
                path = source
        return binary_facts(path)

    # one side of one operation: each returns the seconds it measured --------------
    async def ours_exec(self, sid: str, cmd: list[str], expect: int) -> None:
        params: dict[str, Any] = {"id": sid, "cmd": cmd}
        if expect:
            params["max_output"] = expect
        reply = await self.rpc.call("sandbox.exec", params)
        if reply["exit_code"] != 0 or len(reply["stdout"]) != expect or reply["truncated"]:
            raise RuntimeError(
                f"sandbox.exec {cmd}: exit {reply['exit_code']}, "
                f"{len(reply['stdout'])} bytes, truncated={reply['truncated']}"
            )

    async def ours_first_byte(self, sid: str) -> float:
        started = time.perf_counter()
        watch = await self.follower.start({"id": sid, "cmd": TTFB_CMD})
        try:
            async with asyncio.timeout(CALL_TIMEOUT):
                await watch.first_output
                elapsed = time.perf_counter() - started
                with contextlib.suppress(RpcError):  # it may have ended already
                    await self.rpc.call("exec.kill", {"exec_id": watch.exec_id})
                info = await watch.exit
        finally:
            self.follower.forget(watch.exec_id)
        if watch.bytes["stdout"] != 2 or info.get("exit_code") not in (0, 137):
            raise RuntimeError(f"exec.start {TTFB_CMD}: {watch.bytes}, exit {info}")
        return elapsed

    async def raw_first_byte(self, cid: str) -> float:
        container = self.docker.containers.container(cid)
        started = time.perf_counter()
        execution = await container.exec(TTFB_CMD)
        async with execution.start(detach=False) as stream:
            msg = await stream.read_out()
            elapsed = time.perf_counter() - started
        # Closing the stream does not end the command (the engine cannot): its `sleep 1`
        # finishes by itself in the raw container.
        if msg is None or msg.stream != 1 or msg.data != b"x\n":
            raise RuntimeError(f"raw exec {TTFB_CMD}: first frame {msg!r}")
        return elapsed

    async def ours_stream(self, sid: str, size: int) -> None:
        watch: StreamedExec | None = None
        try:
            async with asyncio.timeout(CALL_TIMEOUT):
                watch = await self.follower.start({"id": sid, "cmd": head_cmd(size)})
                info = await watch.exit
        finally:
            if watch is not None:
                self.follower.forget(watch.exec_id)
        if info.get("exit_code") != 0 or watch.bytes["stdout"] != size:
            raise RuntimeError(f"exec.start head -c {size}: {watch.bytes}, exit {info}")

    async def ours_write(self, sid: str, data: bytes) -> None:
        view = memoryview(data)
        path = f"{FILE_DIR}/{FILE_NAME}"
        for off in range(0, len(data), CHUNK):
            chunk = view[off : off + CHUNK]
            await self.rpc.call(
                "files.write", {"id": sid, "path": path, "data": chunk, "offset": off}
            )

    async def ours_read(self, sid: str, size: int) -> bytes:
        buf = bytearray()
        path = f"{FILE_DIR}/{FILE_NAME}"
        for off in range(0, size, CHUNK):
            buf += await self.rpc.call(
                "files.read",
                {"id": sid, "path": path, "offset": off, "length": min(CHUNK, size - off)},
            )
        return bytes(buf)

    async def raw_put(self, cid: str, archive: bytes) -> None:
        async with self.docker._query(
            f"containers/{cid}/archive",
            method="PUT",
            params={"path": FILE_DIR},
            data=archive,
            headers={"Content-Type": "application/x-tar"},
        ):
            pass

    async def raw_get(self, cid: str) -> bytes:
        buf = bytearray()
        async with self.docker._query(
            f"containers/{cid}/archive", params={"path": f"{FILE_DIR}/{FILE_NAME}"}
        ) as response:
            async for chunk in response.content.iter_chunked(1 << 20):
                buf += chunk
        return bytes(buf)

    # running both sides ------------------------------------------------------------
    async def _side(
        self, fn: Callable[[], Awaitable[Any]], daemon: bool
    ) -> tuple[float, float, float | None]:
        """(seconds, this process's CPU seconds, daemon CPU seconds) of one call.

        A function that returns a float measured its own seconds (time to first byte).
        """
        d0 = self._cpu() if daemon else None
        cpu = time.process_time()
        started = time.perf_counter()
        result = await fn()
        wall = time.perf_counter() - started
        cpu = time.process_time() - cpu
        d1 = self._cpu() if daemon else None
        seconds = result if isinstance(result, float) else wall
        return seconds, cpu, None if d0 is None or d1 is None else d1 - d0

    async def pair(
        self,
        i: int,
        row: Row,
        ours: Callable[[], Awaitable[Any]],
        raw: Callable[[], Awaitable[Any]],
        record: bool,
    ) -> None:
        """Both sides once: ours first on even iterations, raw first on odd ones."""
        if i % 2 == 0:
            t_ours, c_ours, d_ours = await self._side(ours, True)
            t_raw, c_raw, _ = await self._side(raw, False)
        else:
            t_raw, c_raw, _ = await self._side(raw, False)
            t_ours, c_ours, d_ours = await self._side(ours, True)
        row.calls += 1
        row.ours_client_cpu_s += c_ours
        row.raw_client_cpu_s += c_raw
        row.daemon_cpu_s = (
            None if row.daemon_cpu_s is None or d_ours is None else (row.daemon_cpu_s + d_ours)
        )
        if record:
            row.ours.add(t_ours)
            row.raw.add(t_raw)

    async def phase(
        self,
        row: Row,
        n: int,
        warmup: int,
        ours: Callable[[], Awaitable[Any]],
        raw: Callable[[], Awaitable[Any]],
    ) -> None:
        log(f"{row.name}: {warmup} warm-up + {n} measured pairs")
        for i in range(warmup + n):
            await self.pair(i, row, ours, raw, i >= warmup)
        self.rows.append(row)

    async def phase_files(self, sid: str, cid: str, n: int, warmup: int) -> None:
        write = Row(
            f"files.write {FILE_SIZE // MIB} MiB",
            FILE_SIZE,
            note=f"ours: {math.ceil(FILE_SIZE / CHUNK)} files.write calls of <= 4 MiB, one at "
            "a time; raw: one PUT /archive of a tar built beforehand",
        )
        read = Row(
            f"files.read {FILE_SIZE // MIB} MiB",
            FILE_SIZE,
            target="read",
            note=f"ours: {math.ceil(FILE_SIZE / CHUNK)} files.read calls of <= 4 MiB, one at a "
            "time, into one buffer; raw: GET /archive read to the end (the tar stream)",
        )
        data = os.urandom(FILE_SIZE)
        archive = tar_of(FILE_NAME, data)
        log(f"files: {warmup} warm-up + {n} measured pairs of write, then read")
        got: dict[str, bytes] = {}

        async def ours_read() -> None:
            got["ours"] = await self.ours_read(sid, FILE_SIZE)

        async def raw_read() -> None:
            got["raw"] = await self.raw_get(cid)

        for i in range(warmup + n):
            await self.pair(
                i,
                write,
                lambda: self.ours_write(sid, data),
                lambda: self.raw_put(cid, archive),
                i >= warmup,
            )
            stat = await self.rpc.call("files.stat", {"id": sid, "path": f"{FILE_DIR}/{FILE_NAME}"})
            if stat["size"] != FILE_SIZE:
                raise RuntimeError(f"files.stat after files.write: size {stat['size']}")
            await self.pair(i, read, ours_read, raw_read, i >= warmup)
            if got.pop("ours") != data:
                raise RuntimeError("files.read returned other bytes than files.write wrote")
            with tarfile.open(fileobj=io.BytesIO(got.pop("raw"))) as tar:
                member = tar.extractfile(FILE_NAME)
                if member is None or member.read() != data:
                    raise RuntimeError("GET /archive returned other bytes than PUT wrote")
        self.rows += [write, read]

    async def run(self) -> None:
        args = self.args
        n, warmup = args.n, args.warmup
        nb = args.n_bulk if args.n_bulk is not None else n
        wb = args.warmup_bulk
        self.daemon_info = await self.rpc.call("daemon.info")
        log("creating the sandbox and the raw container")
        sid = await self.ours_create()
        ready_s = await self.wait_agent(sid)
        cid = await self.raw.create()
        sandbox = await self.rpc.call("sandbox.get", {"id": sid})
        container_id = str(sandbox["container_id"])
        await asyncio.sleep(1.0)  # let both settle before reading their memory
        self.agent = {
            "binary": await self.agent_binary(container_id),
            "ready_after_create_ms": round(ready_s * 1e3, 1),
            "idle": await self.memory_of(container_id),
            "raw_pid1": await self.memory_of(cid),
        }
        await self.phase(
            Row("exec true", target="exec"),
            n,
            warmup,
            lambda: self.ours_exec(sid, ["true"], 0),
            lambda: self.raw.exec(cid, ["true"], 0),
        )
        await self.phase(
            Row(
                "first output byte",
                note="sh -c 'echo x; sleep 1' from the call until the first output arrives; "
                "ours then exec.kill + exec.exit (untimed), raw closes its stream",
            ),
            n,
            warmup,
            lambda: self.ours_first_byte(sid),
            lambda: self.raw_first_byte(cid),
        )
        await self.phase(
            Row(
                f"stream {STREAM_SIZE // MIB} MiB stdout",
                STREAM_SIZE,
                target="stream",
                note="ours: exec.start until exec.exit, exec.output bytes counted; raw: exec "
                "create + start, the stream read to EOF and counted, then its exit code",
            ),
            nb,
            wb,
            lambda: self.ours_stream(sid, STREAM_SIZE),
            lambda: self.raw.exec(cid, head_cmd(STREAM_SIZE), STREAM_SIZE, keep=False),
        )
        await self.phase(
            Row(
                f"buffered exec {BUFFERED_SIZE // MIB} MiB",
                BUFFERED_SIZE,
                note=f"ours: sandbox.exec with max_output {BUFFERED_SIZE // MIB} MiB (the "
                "policy's cap), one reply; raw: the stream collected in memory, then its exit code",
            ),
            nb,
            wb,
            lambda: self.ours_exec(sid, head_cmd(BUFFERED_SIZE), BUFFERED_SIZE),
            lambda: self.raw.exec(cid, head_cmd(BUFFERED_SIZE), BUFFERED_SIZE),
        )
        await self.phase_files(sid, cid, nb, wb)
        await asyncio.sleep(1.0)
        self.agent["after_run"] = await self.memory_of(container_id)


# output ---------------------------------------------------------------------------
def fmt_mbps(value: float) -> str:
    return "-" if math.isnan(value) else f"{value:.0f}"


def row_table(
    first: str, headers: list[str], cells: Callable[[Row], list[str]], rows: list[Row]
) -> str:
    """One line per row: its name and n, then ``headers`` with the row's ``cells``, then
    its target and whether it was met."""
    return render_table(
        [first, "n", *headers, "target", "met"],
        [
            [r.name, str(len(r.ours.values)), *cells(r), r.target_text() or "-", fmt_met(r.met())]
            for r in rows
        ],
    )


def latency_table(rows: list[Row]) -> str:
    def cells(r: Row) -> list[str]:
        return [
            *r.p50_p95_cells(),
            fmt_ratio(r.speedup_at(50)),
            fmt_ratio(r.speedup_at(95)),
            fmt_delta(r.paired_delta),
            fmt_ms(r.per_call(r.daemon_cpu_s)),
        ]

    headers = ["ours p50", "ours p95", "raw p50", "raw p95", "raw/ours p50", "raw/ours p95"]
    return row_table("operation", [*headers, "paired Δ", "daemon CPU/call"], cells, rows)


def transfer_table(rows: list[Row]) -> str:
    def cells(r: Row) -> list[str]:
        rates = [r.mbps(r.ours, 50), r.mbps(r.ours, 95), r.mbps(r.raw, 50), r.mbps(r.raw, 95)]
        cpu = [r.daemon_cpu_s, r.ours_client_cpu_s, r.raw_client_cpu_s]
        return [
            *(fmt_mbps(v) for v in rates),
            fmt_ratio(r.speedup_at(50)),
            fmt_ms(r.ours.p50),
            fmt_ms(r.raw.p50),
            *(fmt_ms(r.per_call(seconds)) for seconds in cpu),
        ]

    headers = ["ours MB/s", "ours low", "raw MB/s", "raw low", "ours/raw", "ours ms p50"]
    headers += ["raw ms p50", "daemon CPU", "ours client CPU", "raw client CPU"]
    return row_table("transfer", headers, cells, rows)


def agent_table(agent: dict[str, Any]) -> str:
    def mem(key: str) -> str:
        m = agent.get(key) or {}
        rss, hwm = m.get("vm_rss_kib"), m.get("vm_hwm_kib")
        if rss is None:
            return "?"
        return f"VmRSS {rss} KiB (VmHWM {hwm} KiB)"

    binary = agent.get("binary") or {}
    size = binary.get("bytes")
    rows = [
        [
            "agent binary",
            "?" if size is None else f"{size} bytes ({size / 1024:.1f} KiB)",
            str(binary.get("path", "?")),
        ],
        [
            "agent, idle sandbox (PID 1)",
            mem("idle"),
            f"pid {agent.get('idle', {}).get('pid', '?')}: {agent.get('idle', {}).get('cmdline')}",
        ],
        [
            "agent after this run's work",
            mem("after_run"),
            "the same sandbox after every row above",
        ],
        [
            "raw container PID 1",
            mem("raw_pid1"),
            f"pid {agent.get('raw_pid1', {}).get('pid', '?')}: "
            f"{agent.get('raw_pid1', {}).get('cmdline')} (Docker's init)",
        ],
    ]
    return render_table(["agent", "figure", "what"], rows)


def targets_text(rows: list[Row]) -> list[str]:
    out = []
    by_name = {r.target: r for r in rows if r.target}
    if (r := by_name.get("exec")) and r.ours.values:
        speedup = r.speedup_at(50)
        out.append(
            f"exec true: ours p50 {fmt_ms(r.ours.p50)} ms <= {EXEC_P50_TARGET_S * 1e3:.0f} ms: "
            f"{fmt_met(r.ours.p50 <= EXEC_P50_TARGET_S)}"
        )
        out.append(
            f"exec true: raw/ours p50 {fmt_ratio(speedup)} >= {EXEC_SPEEDUP_TARGET:.0f}x: "
            f"{fmt_met(speedup >= EXEC_SPEEDUP_TARGET)}"
        )
    if (r := by_name.get("stream")) and r.ours.values:
        out.append(
            f"{r.name}: ours/raw MB/s {fmt_ratio(r.speedup_at(50))} >= {STREAM_TARGET:.1f}x: "
            f"{fmt_met(r.met())}"
        )
    if (r := by_name.get("read")) and r.ours.values:
        out.append(
            f"{r.name}: ours/raw GET /archive MB/s {fmt_ratio(r.speedup_at(50))} "
            f">= {READ_TARGET:.0f}x: {fmt_met(r.met())}"
        )
    return out


async def main_async(args: argparse.Namespace) -> int:
    bench, status, elapsed = await ExecBench.run_against(args)
    latency = [r for r in bench.rows if not r.size]
    transfers = [r for r in bench.rows if r.size]
    nb = args.n_bulk if args.n_bulk is not None else args.n
    print(
        f"sandboxd (through the in-sandbox agent) vs raw aiodocker (docker exec, archive API), "
        f"same engine, same run; {elapsed:.0f} s total"
    )
    print(f"\nlatency, ms; warm-up {args.warmup} per row excluded")
    print(latency_table(latency))
    print(
        "raw/ours = how many times faster ours is. paired Δ = median over iterations of "
        "(ours - raw), ms. daemon CPU/call = the daemon's CPU during our calls / calls "
        "(10 ms ticks: coarse)."
    )
    print(f"\ntransfers; warm-up {args.warmup_bulk} per row excluded; n = {nb}")
    print(transfer_table(transfers))
    print(
        "MB/s = 10^6 bytes/s from the p50 time; low = from the p95 time. ours/raw = ours MB/s "
        "÷ raw MB/s (p50). CPU columns: ms per transfer (daemon: the daemon process; client: "
        "this process during our / the raw calls). The agent, dockerd and containerd-shim "
        "are not counted."
    )
    for r in bench.rows:
        if r.note:
            print(f"  {r.name}: {r.note}")
    print()
    print(agent_table(bench.agent))
    print("\ntargets:")
    for line in targets_text(bench.rows):
        print(f"  {line}")
    if args.json:
        save_report(
            args.json,
            {
                "benchmark": "bench_exec",
                "environment": environment(),
                "config": bench.config_json(
                    n=args.n, n_bulk=nb, warmup=args.warmup, warmup_bulk=args.warmup_bulk
                ),
                "daemon_info": bench.daemon_info,
                "elapsed_s": round(elapsed, 1),
                "results": [r.to_json() for r in bench.rows],
                "agent": bench.agent,
                "targets": targets_text(bench.rows),
            },
        )
    return status


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.bench_exec",
        description="Exec latency, output streams and files through the agent next to raw "
        "aiodocker.",
    )
    parser.add_argument("--socket", required=True, help="the running daemon's Unix socket")
    parser.add_argument(
        "--n", type=int, default=50, help="measured iterations per row (default 50)"
    )
    parser.add_argument(
        "--n-bulk",
        type=int,
        default=None,
        help="measured iterations of the transfer rows (default: --n)",
    )
    parser.add_argument("--warmup", type=int, default=3, help="warm-up iterations (default 3)")
    parser.add_argument(
        "--warmup-bulk", type=int, default=1, help="warm-up iterations of the transfers (default 1)"
    )
    parser.add_argument("--json", metavar="FILE", help="also write every sample as JSON")
    args = parser.parse_args(argv)
    if args.n < 1 or (args.n_bulk is not None and args.n_bulk < 1):
        parser.error("--n and --n-bulk must be at least 1")
    if args.warmup < 0 or args.warmup_bulk < 0:
        parser.error("--warmup and --warmup-bulk must be 0 or more")
    return args


def main(argv: list[str] | None = None) -> int:
    return run_benchmark(main_async(parse_args(argv)), errors=(aiodocker.DockerError,))


if __name__ == "__main__":
    exit_with(main)
