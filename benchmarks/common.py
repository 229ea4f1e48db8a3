"""Shared pieces of the sandboxd benchmarks: a raw msgpack-RPC client, statistics, tables.

The client here is deliberately independent of ``sandboxd`` and
``sandboxd_client``: it speaks SPEC §2 with nothing but ``msgpack`` and
``asyncio.open_unix_connection``, so a benchmark measures the daemon, not a
client library that changes with it; ``ExecFollower`` on top of it follows
streamed commands (``exec.output`` / ``exec.exit`` notifications). The module
also holds the percentile maths, a small fixed-width table printer and the
cell formats the tables share, per-process CPU accounting read from /proc (to
tell whether the daemon or the benchmark's own client was the bottleneck), the
JSON report writer and the entry points' run wrapper (exit status, Ctrl-C and
SIGTERM). It imports neither ``sandboxd`` nor ``sandboxd_client`` nor
``aiodocker``: a private daemon is ``daemonproc``'s, the raw Docker side
``rawdocker``'s.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import math
import os
import platform
import signal
import socket
import struct
import sys
import time
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from typing import Any

import msgpack

REQUEST = 0
RESPONSE = 1
NOTIFICATION = 2
MAX_MSGID = 2**32 - 1
READ_CHUNK = 1 << 20
IMAGE = "sandboxd/base"  # the image of every benchmark's sandboxes and raw containers


def log(msg: str) -> None:
    """A progress or diagnostic line on stderr (the results go to stdout)."""
    print(msg, file=sys.stderr, flush=True)


class RpcError(Exception):
    """An error reply ``[code, message, data]`` from the server."""

    def __init__(self, code: str, message: str, data: Any) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.data = data


class RpcConnectionLost(ConnectionError):
    """The connection closed while calls were pending."""


class RpcClient:
    """A minimal msgpack-RPC client on one Unix socket connection.

    Many calls may be in flight; replies are matched by msgid. Notifications
    are counted, and handed to ``on_notification(method, params)`` when it is
    set (``ExecFollower`` sets it); otherwise dropped.
    """

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer
        self._pending: dict[int, asyncio.Future[Any]] = {}
        self._ids = itertools.count(1)
        self._packer = msgpack.Packer(use_bin_type=True)
        self.notifications = 0
        self.on_notification: Callable[[str, list[Any]], None] | None = None
        self._reader_task = asyncio.get_running_loop().create_task(self._read_loop())

    @classmethod
    async def connect(cls, path: str) -> RpcClient:
        try:
            reader, writer = await asyncio.open_unix_connection(path, limit=READ_CHUNK)
        except OSError as exc:
            raise ConnectionError(
                f"cannot connect to {path}: {exc.strerror or exc}; is the daemon running?"
            ) from None
        return cls(reader, writer)

    @property
    def peer_pid(self) -> int:
        """The server process's pid (SO_PEERCRED), 0 when it cannot be read."""
        sock = self._writer.get_extra_info("socket")
        if sock is None:
            return 0
        return peer_pid(sock)

    def _next_id(self) -> int:
        msgid = next(self._ids)
        if msgid > MAX_MSGID:
            self._ids = itertools.count(1)
            msgid = next(self._ids)
        return msgid

    async def call(self, method: str, params: dict[str, Any] | None = None) -> Any:
        """Send one request and wait for its reply; an error reply raises ``RpcError``."""
        msgid = self._next_id()
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending[msgid] = fut
        body = [REQUEST, msgid, method, [] if params is None else [params]]
        try:
            self._writer.write(self._packer.pack(body))
            await self._writer.drain()
            return await fut
        finally:
            self._pending.pop(msgid, None)

    async def _read_loop(self) -> None:
        unpacker = msgpack.Unpacker(raw=False, max_buffer_size=256 * 1024 * 1024)
        exc: BaseException = RpcConnectionLost("the server closed the connection")
        try:
            while data := await self._reader.read(READ_CHUNK):
                unpacker.feed(data)
                for msg in unpacker:
                    self._deliver(msg)
        except (OSError, ValueError) as err:
            exc = RpcConnectionLost(f"connection failed: {err}")
        finally:
            for fut in self._pending.values():
                if not fut.done():
                    fut.set_exception(exc)

    def _deliver(self, msg: Any) -> None:
        if not isinstance(msg, list) or not msg:
            return
        if msg[0] == NOTIFICATION:
            self.notifications += 1
            handler = self.on_notification
            if handler is not None and len(msg) == 3 and isinstance(msg[2], list):
                method = msg[1].decode() if isinstance(msg[1], bytes) else str(msg[1])
                handler(method, msg[2])
            return
        if msg[0] != RESPONSE or len(msg) != 4:
            return
        fut = self._pending.get(msg[1])
        if fut is None or fut.done():
            return
        error, result = msg[2], msg[3]
        if error is not None:
            if isinstance(error, list) and len(error) >= 2:
                data = error[2] if len(error) > 2 else None
                fut.set_exception(RpcError(str(error[0]), str(error[1]), data))
            else:
                fut.set_exception(RpcError("unknown", repr(error), None))
        else:
            fut.set_result(result)

    async def close(self) -> None:
        self._writer.close()
        with contextlib.suppress(OSError):
            await self._writer.wait_closed()
        self._reader_task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._reader_task


class StreamedExec:
    """What one connection has received of one streamed command (SPEC §3 exec.start)."""

    def __init__(self, exec_id: str, keep_output: bool) -> None:
        loop = asyncio.get_running_loop()
        self.exec_id = exec_id
        self.bytes = {"stdout": 0, "stderr": 0}
        self.chunks: list[bytes] | None = [] if keep_output else None
        self.first_output: asyncio.Future[float] = loop.create_future()  # its perf_counter
        self.exit: asyncio.Future[dict[str, Any]] = loop.create_future()  # the exit map

    @property
    def received(self) -> int:
        return self.bytes["stdout"] + self.bytes["stderr"]

    def output(self, stream: str, data: bytes) -> None:
        if not self.first_output.done():
            self.first_output.set_result(time.perf_counter())
        self.bytes[stream] = self.bytes.get(stream, 0) + len(data)
        if self.chunks is not None:
            self.chunks.append(data)

    def fail(self, exc: BaseException) -> None:
        for fut in (self.first_output, self.exit):
            if not fut.done():
                fut.set_exception(exc)
                fut.exception()  # retrieved: no "never retrieved" warning when unused


class ExecFollower:
    """Routes one connection's ``exec.output`` and ``exec.exit`` notifications by exec id.

    A command's record is made on its first mention, so output that arrives
    before the ``exec.start``/``exec.attach`` reply is not lost. Output is
    counted (and kept only with ``keep_output``); ``forget`` drops a record.
    """

    def __init__(self, rpc: RpcClient, keep_output: bool = False) -> None:
        self.rpc = rpc
        self.keep_output = keep_output
        self._execs: dict[str, StreamedExec] = {}
        rpc.on_notification = self._notified
        rpc._reader_task.add_done_callback(lambda _: self._lost())

    def watch(self, exec_id: str) -> StreamedExec:
        found = self._execs.get(exec_id)
        if found is None:
            found = self._execs[exec_id] = StreamedExec(exec_id, self.keep_output)
            if self.rpc._reader_task.done():
                found.fail(RpcConnectionLost("the connection is closed"))
        return found

    def forget(self, exec_id: str) -> None:
        self._execs.pop(exec_id, None)

    async def start(self, params: dict[str, Any]) -> StreamedExec:
        """``exec.start`` (params as SPEC §3); the record its notifications fill."""
        reply = await self.rpc.call("exec.start", params)
        return self.watch(str(reply["exec_id"]))

    async def attach(self, exec_id: str, offset: int = 0) -> tuple[StreamedExec, int]:
        """``exec.attach``; the record and the offset the replay really starts at."""
        self.forget(exec_id)
        watch = self.watch(exec_id)
        reply = await self.rpc.call("exec.attach", {"exec_id": exec_id, "offset": offset})
        return watch, int(reply["offset"])

    def _notified(self, method: str, params: list[Any]) -> None:
        if method == "exec.output" and len(params) == 3:
            self.watch(str(params[0])).output(str(params[1]), bytes(params[2]))
        elif method == "exec.exit" and len(params) == 2:
            fut = self.watch(str(params[0])).exit
            if not fut.done():
                fut.set_result(params[1] if isinstance(params[1], dict) else {})

    def _lost(self) -> None:
        for watch in self._execs.values():
            watch.fail(RpcConnectionLost("the connection closed before the command ended"))


def peer_pid(sock: socket.socket) -> int:
    """The pid at the other end of a Unix stream socket, or 0."""
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    except OSError:
        return 0
    pid: int = struct.unpack("3i", raw)[0]
    return pid


def process_cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds used so far by ``pid`` (all threads), None if unreadable."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            text = fh.read()
    except OSError:
        return None
    # The command name may contain spaces: fields start after the last ')'.
    fields = text[text.rindex(")") + 2 :].split()
    ticks = int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15)
    return ticks / os.sysconf("SC_CLK_TCK")


# statistics ---------------------------------------------------------------
def percentile(values: Sequence[float], pct: float) -> float:
    """The ``pct`` percentile with linear interpolation between closest ranks.

    Same definition as numpy's default ("linear"): with 30 samples p95 lies
    between the 28th and 29th smallest values.
    """
    if not values:
        return math.nan
    ordered = sorted(values)
    pos = (len(ordered) - 1) * pct / 100.0
    lo = math.floor(pos)
    hi = math.ceil(pos)
    if lo == hi:
        return ordered[lo]
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


@dataclass
class Samples:
    """Latencies of one operation on one side, in seconds."""

    values: list[float] = field(default_factory=list)

    def add(self, seconds: float) -> None:
        self.values.append(seconds)

    @property
    def p50(self) -> float:
        return percentile(self.values, 50)

    @property
    def p95(self) -> float:
        return percentile(self.values, 95)

    def summary_ms(self) -> dict[str, Any]:
        vals = self.values
        return {
            "n": len(vals),
            "p50_ms": round(self.p50 * 1000, 3) if vals else None,
            "p95_ms": round(self.p95 * 1000, 3) if vals else None,
            "min_ms": round(min(vals) * 1000, 3) if vals else None,
            "max_ms": round(max(vals) * 1000, 3) if vals else None,
            "mean_ms": round(sum(vals) / len(vals) * 1000, 3) if vals else None,
            "samples_ms": [round(v * 1000, 3) for v in vals],
        }


def ratio(ours: float, raw: float) -> float:
    if raw <= 0 or math.isnan(raw) or math.isnan(ours):
        return math.nan
    return ours / raw


@dataclass(kw_only=True)
class Compared:
    """The base of a benchmark's row: one operation timed through sandboxd (``ours``) and
    through the baseline (``raw``), the sides alternating iteration by iteration."""

    ours: Samples = field(default_factory=Samples)
    raw: Samples = field(default_factory=Samples)

    def ratio_at(self, pct: float) -> float:
        """ours ÷ raw at the ``pct`` percentile: how many times slower ours is."""
        return ratio(percentile(self.ours.values, pct), percentile(self.raw.values, pct))

    def speedup_at(self, pct: float) -> float:
        """raw ÷ ours at the ``pct`` percentile: how many times faster ours is (for a
        transfer, its MB/s ours ÷ raw)."""
        return ratio(percentile(self.raw.values, pct), percentile(self.ours.values, pct))

    @property
    def paired_delta(self) -> float:
        """Median over iterations of (ours - raw): the added time, robust to drift; NaN
        unless both sides have a sample for every iteration."""
        if len(self.ours.values) != len(self.raw.values):
            return math.nan
        diffs = [a - b for a, b in zip(self.ours.values, self.raw.values, strict=True)]
        return percentile(diffs, 50)

    def p50_p95_cells(self) -> list[str]:
        """The ``ours p50, ours p95, raw p50, raw p95`` cells, in ms."""
        ours, raw = self.ours, self.raw
        return [fmt_ms(ours.p50), fmt_ms(ours.p95), fmt_ms(raw.p50), fmt_ms(raw.p95)]

    def ratio_cells(self) -> list[str]:
        """The p50/p95 cells, then ``p50 ratio, p95 ratio`` (ours ÷ raw) and ``paired Δ``."""
        return [
            *self.p50_p95_cells(),
            fmt_ratio(self.ratio_at(50)),
            fmt_ratio(self.ratio_at(95)),
            fmt_delta(self.paired_delta),
        ]


# output ---------------------------------------------------------------------
def render_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A plain fixed-width table: first column left-aligned, the rest right-aligned."""
    widths = [len(h) for h in headers]
    for row in rows:
        for i, cell in enumerate(row):
            widths[i] = max(widths[i], len(cell))

    def line(cells: Sequence[str]) -> str:
        out = [cells[0].ljust(widths[0])]
        out += [c.rjust(w) for c, w in zip(cells[1:], widths[1:], strict=True)]
        return "  ".join(out).rstrip()

    sep = "  ".join("-" * w for w in widths)
    return "\n".join([line(headers), sep, *(line(r) for r in rows)])


def fmt_ms(seconds: float) -> str:
    if math.isnan(seconds):
        return "-"
    ms = seconds * 1000
    if ms >= 100:
        return f"{ms:.0f}"
    if ms >= 10:
        return f"{ms:.1f}"
    return f"{ms:.2f}"


def fmt_ratio(value: float) -> str:
    return "-" if math.isnan(value) else f"{value:.2f}x"


def fmt_delta(seconds: float) -> str:
    """A signed difference in ms (``+1.23``, ``-0.45``); ``-`` when unknown."""
    if math.isnan(seconds):
        return "-"
    return f"{'-' if seconds < 0 else '+'}{fmt_ms(abs(seconds))}"


def fmt_met(met: bool | None) -> str:
    """A target's ``met`` cell: yes, NO, or ``-`` when there is nothing to judge."""
    return "-" if met is None else ("yes" if met else "NO")


def ms_or_none(seconds: float) -> float | None:
    """Seconds as ms rounded to the µs for a JSON report; None when unknown."""
    return None if math.isnan(seconds) else round(seconds * 1000, 3)


def environment() -> dict[str, Any]:
    """Facts about the machine a report was taken on."""
    return {
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "msgpack": ".".join(str(x) for x in msgpack.version),
    }


def write_json(path: str, report: dict[str, Any]) -> None:
    with open(path, "w") as fh:
        json.dump(report, fh, indent=2, sort_keys=False)
        fh.write("\n")


def save_report(path: str, report: dict[str, Any]) -> None:
    """``write_json``, then say so on stdout: ``wrote FILE``."""
    write_json(path, report)
    print(f"wrote {path}")


def exit_with(main: Callable[[], int]) -> None:
    """A benchmark's ``__main__``: exit with ``main()``'s status; output cut short by a
    closed pipe (``| head``) is not an error."""
    with contextlib.suppress(BrokenPipeError):
        sys.exit(main())


def cancel_on_sigterm() -> None:
    """Make SIGTERM cancel the running (main) task, so that its clean-up runs."""
    task = asyncio.current_task()
    if task is not None:
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)


def run_benchmark(
    main: Coroutine[Any, Any, int],
    errors: tuple[type[BaseException], ...] = (),
    on_error: Callable[[BaseException], None] | None = None,
) -> int:
    """Run a benchmark's main coroutine: its status; 130 on Ctrl-C, 143 when SIGTERM
    cancelled it (``cancel_on_sigterm``); 1 on an error reply, a ``RuntimeError``, an
    ``OSError`` or one of ``errors``, told by ``on_error`` or in one line."""
    caught: tuple[type[BaseException], ...] = (RpcError, RuntimeError, OSError, *errors)
    try:
        status: int = asyncio.run(main)
        return status
    except KeyboardInterrupt:
        log("interrupted")
        return 130
    except asyncio.CancelledError:
        log("terminated")
        return 143
    except caught as exc:
        if on_error is not None:
            on_error(exc)
        else:
            log(f"error: {exc}")
        return 1
