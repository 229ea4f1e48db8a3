"""The client library and CLI against an in-test fake msgpack-RPC server (no daemon).

The fake server listens on a Unix socket under ``tmp_path`` and is scripted
by each test: it queues the requests it receives, and the test decides what
to answer, in what order, or whether to hang up. Only client logic is tested
here: msgid matching, error mapping, connection loss, notifications, models,
the blocking wrapper and the CLI's error path.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import click
import pytest
from click.testing import CliRunner
from sandboxd_client import (
    AsyncSandbox,
    BlockingSandbox,
    Client,
    ConnectFailed,
    ExecResult,
    Sandbox,
    SandboxClient,
    default_socket_path,
)
from sandboxd_client.cli import cli, parse_seconds

from sandboxd.wire.codec import (
    Decoder,
    Notification,
    Request,
    encode_notification,
    encode_response,
)
from sandboxd.wire.errors import (
    ConnectionLost,
    EngineError,
    InvalidParams,
    NotFound,
    SandboxdError,
)

pytestmark = pytest.mark.pure  # no Docker Engine: no engine start, no leak check


def decode(decoder: Decoder, data: bytes) -> list[Any]:
    """Feed ``data`` and pull every message it completes."""
    decoder.feed(data)
    return list(decoder)


SANDBOX: dict[str, Any] = {
    "id": "sb-1",
    "name": "alpha",
    "status": "running",
    "image": "sandboxd/base",
    "owner": {"uid": 1000, "gid": 1000},
    "created_at": "2026-11-26T15:04:05.123Z",
    "expires_at": "2099-11-26T15:09:05.123Z",
    "idle_timeout": None,
    "last_activity_at": "2026-11-26T15:04:05.123Z",
    "labels": {"team": "x"},
    "limits": {"memory_bytes": 536870912, "cpus": 1, "pids": 256},
    "network": "none",
    "workdir": "/workspace",
    "container_id": "c0ffee",
}


class Conn:
    """One accepted connection on the fake server."""

    def __init__(self, writer: asyncio.StreamWriter) -> None:
        self.writer = writer

    def respond(self, msgid: int, error: Any = None, result: Any = None) -> None:
        self.writer.write(encode_response(msgid, error, result))

    def notify(self, method: str, params: list[Any]) -> None:
        self.writer.write(encode_notification(method, params))

    def send_raw(self, data: bytes) -> None:
        self.writer.write(data)

    def close(self) -> None:
        self.writer.close()


Handler = Callable[[Conn, Request], Awaitable[None]]


class FakeServer:
    """A scripted msgpack-RPC server: every request goes to ``handler`` or a queue."""

    def __init__(self, path: str, handler: Handler | None = None) -> None:
        self.path = path
        self.handler = handler
        self.requests: asyncio.Queue[tuple[Conn, Request]] = asyncio.Queue()
        self.notifications: asyncio.Queue[Notification] = asyncio.Queue()
        self.conns: list[Conn] = []
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_unix_server(self._serve, self.path)

    async def stop(self) -> None:
        for conn in self.conns:
            conn.close()
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = Conn(writer)
        self.conns.append(conn)
        decoder = Decoder()
        try:
            while data := await reader.read(65536):
                for msg in decode(decoder, data):
                    if isinstance(msg, Request):
                        if self.handler is None:
                            self.requests.put_nowait((conn, msg))
                        else:
                            task = asyncio.create_task(self.handler(conn, msg))
                            self._tasks.add(task)
                            task.add_done_callback(self._tasks.discard)
                    elif isinstance(msg, Notification):
                        self.notifications.put_nowait(msg)
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            writer.close()

    async def next_request(self) -> tuple[Conn, Request]:
        async with asyncio.timeout(5):
            return await self.requests.get()


def named(req: Request) -> dict[str, Any]:
    return dict(req.params[0]) if req.params else {}


async def standard_handler(conn: Conn, req: Request) -> None:
    """A tiny daemon: enough methods for the typed API and the CLI."""
    p = named(req)
    if req.method == "daemon.ping":
        conn.respond(req.msgid, None, "pong")
    elif req.method in ("sandbox.create", "sandbox.get", "sandbox.pause", "sandbox.resume",
                        "sandbox.extend"):
        if p.get("id") == "missing":
            conn.respond(req.msgid, ["not_found", "No sandbox named 'missing'.",
                                     {"id": "missing"}])
            return
        status = {"sandbox.pause": "paused"}.get(req.method, "running")
        conn.respond(req.msgid, None, {**SANDBOX, "status": status, "future_key": [1, 2]})
    elif req.method == "sandbox.list":
        conn.respond(req.msgid, None, [SANDBOX, {**SANDBOX, "id": "sb-2", "name": "b"}])
    elif req.method == "sandbox.exec":
        conn.respond(req.msgid, None, {
            "exit_code": 3, "stdout": b"out\xff" + (p.get("stdin") or b""), "stderr": b"err",
            "timed_out": False, "truncated": True, "duration": 0.25, "new_field": "x",
        })
    elif req.method == "sandbox.stats":
        conn.respond(req.msgid, None, {
            "cpu_percent": 1.5, "memory_bytes": 10, "memory_limit_bytes": 20, "pids": 2,
            "net_rx_bytes": 0, "net_tx_bytes": 0})
    elif req.method == "sandbox.remove":
        if p.get("id") == "missing":
            conn.respond(req.msgid, ["not_found", "No sandbox named 'missing'.", None])
        else:
            conn.respond(req.msgid, None, None)
    else:
        conn.respond(req.msgid, ["method_not_found", f"No method {req.method!r}.", None])


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[FakeServer]:
    srv = FakeServer(str(tmp_path / "s.sock"))
    await srv.start()
    yield srv
    await srv.stop()


@pytest.fixture
def threaded_server(tmp_path: Path) -> Iterator[str]:
    """The standard fake daemon on its own loop thread, for blocking callers (CLI, Client)."""
    path = str(tmp_path / "t.sock")
    loop = asyncio.new_event_loop()
    ready = threading.Event()
    holder: dict[str, FakeServer] = {}

    async def start() -> None:
        holder["srv"] = FakeServer(path, standard_handler)
        await holder["srv"].start()
        ready.set()

    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    asyncio.run_coroutine_threadsafe(start(), loop).result(5)
    assert ready.wait(5)
    yield path
    asyncio.run_coroutine_threadsafe(holder["srv"].stop(), loop).result(5)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(5)
    loop.close()


# -- matching and params ----------------------------------------------------------------


async def test_out_of_order_responses_are_matched_by_msgid(server: FakeServer) -> None:
    async with SandboxClient(server.path) as client:
        calls = [asyncio.create_task(client.call("echo", n=i)) for i in range(10)]
        received = [await server.next_request() for _ in range(10)]
        assert len({req.msgid for _, req in received}) == 10
        for conn, req in reversed(received):
            conn.respond(req.msgid, None, {"echo": named(req)["n"]})
        async with asyncio.timeout(5):
            results = await asyncio.gather(*calls)
    assert results == [{"echo": i} for i in range(10)]


async def test_params_encoding(server: FakeServer) -> None:
    async with SandboxClient(server.path) as client:
        task = asyncio.create_task(client.call("a.b"))
        conn, req = await server.next_request()
        assert (req.method, req.params) == ("a.b", [])
        conn.respond(req.msgid, None, 1)
        assert await task == 1
        task = asyncio.create_task(client.call("a.b", x=1, skipped=None, ttl=0))
        conn, req = await server.next_request()
        assert req.params == [{"x": 1, "ttl": 0}]
        conn.respond(req.msgid, None, None)
        assert await task is None


async def test_msgid_wraps_around(server: FakeServer) -> None:
    async with SandboxClient(server.path) as client:
        client._conn._router.next_msgid = 2**32 - 1
        seen = []
        for _ in range(2):
            task = asyncio.create_task(client.call("m"))
            conn, req = await server.next_request()
            seen.append(req.msgid)
            conn.respond(req.msgid, None, req.msgid)
            assert await task == req.msgid
    assert seen == [2**32 - 1, 0]


async def test_unmatched_response_is_ignored(server: FakeServer) -> None:
    async with SandboxClient(server.path) as client:
        task = asyncio.create_task(client.call("m"))
        conn, req = await server.next_request()
        conn.respond(req.msgid + 1000, None, "stray")
        conn.respond(req.msgid, None, "mine")
        async with asyncio.timeout(5):
            assert await task == "mine"


# -- errors -------------------------------------------------------------------------------


async def test_error_response_raises_the_class_of_its_code(server: FakeServer) -> None:
    async with SandboxClient(server.path) as client:
        cases = [
            (["not_found", "No sandbox named 'x'.", {"id": "x"}], NotFound),
            (["invalid_params", "Bad memory '12q'.", None], InvalidParams),
            (["engine_error", "Engine refused.", {"engine_message": "boom"}], EngineError),
        ]
        for wire, cls in cases:
            task = asyncio.create_task(client.call("sandbox.get", id="x"))
            conn, req = await server.next_request()
            conn.respond(req.msgid, wire, None)
            with pytest.raises(cls) as info:
                await task
            assert (info.value.code, info.value.message, info.value.data) == tuple(wire)
        task = asyncio.create_task(client.call("m"))
        conn, req = await server.next_request()
        conn.respond(req.msgid, ["from_the_future", "New code.", None], None)
        with pytest.raises(SandboxdError) as unknown:
            await task
        assert unknown.value.code == "from_the_future"
        assert client.connected  # an error reply never breaks the connection


async def test_server_closing_fails_all_20_pending_calls_promptly(server: FakeServer) -> None:
    client = SandboxClient(server.path)
    await client.connect()
    calls = [asyncio.create_task(client.call("slow", n=i)) for i in range(20)]
    received = [await server.next_request() for _ in range(20)]
    start = time.monotonic()
    received[0][0].close()
    async with asyncio.timeout(2):
        results = await asyncio.gather(*calls, return_exceptions=True)
    assert time.monotonic() - start < 1.0
    assert all(isinstance(r, ConnectionLost) for r in results), results
    assert client.closed
    start = time.monotonic()
    with pytest.raises(ConnectionLost):
        await client.call("after")
    assert time.monotonic() - start < 0.1
    await client.close()


async def test_call_after_close_fails_immediately(server: FakeServer) -> None:
    client = SandboxClient(server.path)
    async with client:
        pending = asyncio.create_task(client.call("never"))
        await server.next_request()
    with pytest.raises(ConnectionLost):
        await pending
    async with asyncio.timeout(0.5):
        with pytest.raises(ConnectionLost):
            await client.call("after")
        with pytest.raises(ConnectionLost):
            await client.ping()
    await client.close()  # idempotent


async def test_protocol_error_notification_fails_pending_calls(server: FakeServer) -> None:
    async with SandboxClient(server.path) as client:
        task = asyncio.create_task(client.call("m"))
        conn, _ = await server.next_request()
        conn.notify("protocol.error", [["too_large", "Frame too big.", {"limit": 1}]])
        async with asyncio.timeout(2):
            with pytest.raises(ConnectionLost) as info:
                await task
    assert "Frame too big." in info.value.message
    assert info.value.data is not None and info.value.data["code"] == "too_large"


async def test_garbage_from_server_fails_pending_calls(server: FakeServer) -> None:
    async with SandboxClient(server.path) as client:
        task = asyncio.create_task(client.call("m"))
        conn, _ = await server.next_request()
        conn.send_raw(b"\xc1")
        async with asyncio.timeout(2):
            with pytest.raises(ConnectionLost):
                await task


async def test_cancelled_call_does_not_leak_or_break(server: FakeServer) -> None:
    async with SandboxClient(server.path) as client:
        task = asyncio.create_task(client.call("m"))
        conn, req = await server.next_request()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        assert client._conn._router.pending == {}
        conn.respond(req.msgid, None, "late")  # ignored
        task = asyncio.create_task(client.call("m2"))
        conn, req = await server.next_request()
        conn.respond(req.msgid, None, "ok")
        async with asyncio.timeout(2):
            assert await task == "ok"


async def test_connect_to_missing_socket_fails_fast(tmp_path: Path) -> None:
    path = str(tmp_path / "nothing.sock")
    async with asyncio.timeout(2):
        with pytest.raises(ConnectFailed) as info:
            await SandboxClient(path).connect()
    assert isinstance(info.value, ConnectionLost)
    assert path in info.value.message and "not running" in info.value.message


def test_client_imports_nothing_of_the_daemon() -> None:
    code = (
        "import sys, sandboxd_client, sandboxd_client.cli; "
        "print(sorted(m for m in sys.modules if m.startswith(('sandboxd.', 'aiodocker'))))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, timeout=60).stdout
    loaded = out.strip().strip("[]").replace("'", "").split(", ")
    assert "sandboxd.wire.codec" in loaded and "sandboxd.wire.errors" in loaded
    assert all(m == "sandboxd.wire" or m.startswith("sandboxd.wire.") for m in loaded), loaded


def test_cli_durations() -> None:
    assert parse_seconds("90") == 90 and parse_seconds("1.5") == 1.5
    assert parse_seconds("10m") == 600 and parse_seconds("2h") == 7200
    with pytest.raises(click.BadParameter):
        parse_seconds("soon")


def test_default_socket_path_rules() -> None:
    assert default_socket_path({"SANDBOXD_SOCKET": "/x.sock"}, 1000) == "/x.sock"
    assert default_socket_path({}, 0) == "/run/sandboxd/sandboxd.sock"
    assert default_socket_path({"XDG_RUNTIME_DIR": "/run/user/7"}, 7) == (
        "/run/user/7/sandboxd.sock")
    assert default_socket_path({}, 7) is None


# -- notifications ------------------------------------------------------------------------


async def test_notifications_are_dispatched_to_handlers(server: FakeServer) -> None:
    got: list[tuple[str, list[Any]]] = []
    async_got: asyncio.Queue[list[Any]] = asyncio.Queue()

    async def async_handler(params: list[Any]) -> None:
        await async_got.put(params)

    def failing(params: list[Any]) -> None:
        raise RuntimeError("handler bug")

    async with SandboxClient(server.path) as client:
        client.on_notification("exec.output", lambda p: got.append(("output", p)))
        client.on_notification("exec.output", failing)
        client.on_notification("event", async_handler)
        remove = client.on_notification("event", lambda p: got.append(("event", p)))
        remove()
        task = asyncio.create_task(client.call("m"))
        conn, req = await server.next_request()
        conn.notify("exec.output", ["e1", "stdout", b"a"])
        conn.notify("unknown.method", [1])
        conn.notify("exec.output", ["e1", "stderr", b"b"])
        conn.notify("event", ["sub", {"seq": 1}])
        conn.respond(req.msgid, None, "done")
        async with asyncio.timeout(2):
            assert await task == "done"
            assert await async_got.get() == ["sub", {"seq": 1}]
        assert got == [("output", ["e1", "stdout", b"a"]), ("output", ["e1", "stderr", b"b"])]
        assert client.connected
        await client.notify("hello", x=1)
        async with asyncio.timeout(2):
            note = await server.notifications.get()
        assert note == Notification("hello", [{"x": 1}])


# -- typed API and models -----------------------------------------------------------------


async def test_typed_methods_and_sandbox_handle(server: FakeServer) -> None:
    server.handler = standard_handler
    async with SandboxClient(server.path) as client:
        assert await client.ping() == "pong"
        sb = await client.create(ttl=60, memory="512m", labels={"team": "x"})
        assert isinstance(sb, AsyncSandbox) and isinstance(sb, Sandbox)
        assert sb.id == "sb-1" and sb.limits.pids == 256 and sb.owner.uid == 1000
        assert sb.extra == {"future_key": [1, 2]}
        assert "client" not in repr(sb)
        assert sb == await client.get("sb-1")
        result = await sb.exec(["cat"], stdin=b"\x00in")
        assert isinstance(result, ExecResult)
        assert result.stdout == b"out\xff\x00in" and result.stderr == b"err"
        assert (result.exit_code, result.truncated, result.timed_out) == (3, True, False)
        assert result.extra == {"new_field": "x"}
        assert (await sb.pause()).status == "paused" and sb.status == "paused"
        assert (await sb.refresh()).status == "running"
        assert (await sb.stats()).memory_limit_bytes == 20
        assert [s.id for s in await client.list(status="running")] == ["sb-1", "sb-2"]
        await sb.remove()
        with pytest.raises(NotFound):
            await client.get("missing")
        with pytest.raises(TypeError):
            await client.exec("sb-1", "echo hi")
        assert sb.to_dict()["future_key"] == [1, 2]
        assert sb.to_dict()["limits"]["memory_bytes"] == 536870912


def test_models_tolerate_missing_and_odd_values() -> None:
    sb = Sandbox.from_wire({"id": b"bin-id", "weird": {"nested": True}})
    assert sb.id == "bin-id" and sb.labels == {} and sb.expires_at is None
    assert sb.extra == {"weird": {"nested": True}}
    r = ExecResult.from_wire({"exit_code": 0, "stdout": "text"})
    assert r.stdout == b"text" and r.stderr == b""
    with pytest.raises(SandboxdError):
        Sandbox.from_wire(["not", "a", "map"])


# -- blocking client and CLI (server on its own thread) -------------------------------------


def test_blocking_client(threaded_server: str) -> None:
    with Client(threaded_server) as client:
        assert client.ping() == "pong"
        sb = client.create(ttl=60)
        assert isinstance(sb, BlockingSandbox)
        assert sb.exec(["cat"], stdin=b"!").stdout == b"out\xff!"
        assert sb.pause().status == "paused"
        with pytest.raises(NotFound):
            client.get("missing")
    client.close()  # a second close is harmless
    with pytest.raises(ConnectionLost):
        client.ping()


def test_blocking_client_missing_socket(tmp_path: Path) -> None:
    with pytest.raises(ConnectFailed):
        Client(str(tmp_path / "nope.sock"), connect_timeout=1)


def test_cli_error_is_one_line_exit_1(threaded_server: str) -> None:
    runner = CliRunner()
    res = runner.invoke(cli, ["--socket", threaded_server, "inspect", "missing"])
    assert res.exit_code == 1, res.output
    assert res.exception is None or isinstance(res.exception, SystemExit)
    assert res.stderr == "sandboxctl: not_found: No sandbox named 'missing'.\n"
    assert "Traceback" not in res.output


def test_cli_missing_socket(tmp_path: Path) -> None:
    path = str(tmp_path / "none.sock")
    res = CliRunner().invoke(cli, ["--socket", path, "ls"])
    assert res.exit_code == 1
    assert res.stderr.count("\n") == 1
    assert f"not running at {path}" in res.stderr


def test_cli_usage_error_exits_2(threaded_server: str) -> None:
    res = CliRunner().invoke(cli, ["--socket", threaded_server, "create", "--env", "NOEQUALS"])
    assert res.exit_code == 2


def test_cli_exec_raw_bytes_and_exit_code(threaded_server: str) -> None:
    runner = CliRunner()
    res = runner.invoke(cli, ["--socket", threaded_server, "exec", "--stdin", "sb-1", "--", "cat"],
                        input=b"\x01")
    assert res.exit_code == 3
    assert res.stdout_bytes == b"out\xff\x01"
    assert res.stderr_bytes.startswith(b"err")
    assert b"truncated" in res.stderr_bytes
    res = runner.invoke(cli, ["--socket", threaded_server, "exec", "--json", "sb-1", "true"])
    assert res.exit_code == 3
    out = json.loads(res.stdout)
    assert out["stdout"] == "out\ufffd" and out["stdout_b64"] == "b3V0/w=="


def test_cli_ls_table_and_json(threaded_server: str) -> None:
    runner = CliRunner()
    res = runner.invoke(cli, ["--socket", threaded_server, "ls"])
    assert res.exit_code == 0, res.output
    lines = res.stdout.splitlines()
    assert lines[0].split() == ["ID", "NAME", "STATUS", "IMAGE", "EXPIRES"]
    assert lines[1].index("alpha") == lines[0].index("NAME")
    res = runner.invoke(cli, ["--socket", threaded_server, "ls", "--json"])
    assert [s["id"] for s in json.loads(res.stdout)] == ["sb-1", "sb-2"]
    res = runner.invoke(cli, ["--socket", threaded_server, "rm", "sb-1", "missing"])
    assert res.exit_code == 1
    assert res.stdout == "sb-1\n"
    assert res.stderr == "sandboxctl: not_found: No sandbox named 'missing'.\n"
