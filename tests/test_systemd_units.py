"""systemd integration without a running daemon.

The unit files (checked by ``systemd-analyze verify`` and ``security``), the
sysusers.d entry (applied by ``systemd-sysusers`` to a scratch root), the
example config (loaded by the daemon's own loader), and
``sandboxd.systemd``: socket activation in a child process that really gets
the socket at fd 3, and the notify protocol against a real datagram socket.
systemd need not be PID 1; its tools must be installed (Debian: ``systemd``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import tomllib
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from sandboxd.systemd import Notifier, listen_fds, listen_fds_with_names

REPO = Path(__file__).resolve().parents[1]
UNITS = REPO / "systemd"
INSTALLED_EXEC = "/opt/sandboxd/venv/bin/sandboxd"
MAX_EXPOSURE = "2.0"


# --------------------------------------------------------------------------- helpers


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(
            f"{name} is not installed: install the systemd package (apt-get install systemd)"
        )
    return path


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A directory with a short path: AF_UNIX paths are limited to 107 bytes."""
    path = Path(tempfile.mkdtemp(prefix="sdt-", dir="/tmp"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _unit_entries(text: str) -> dict[str, list[tuple[str, str]]]:
    """Section -> [(key, value)] of a unit file; keys may repeat, as in systemd."""
    sections: dict[str, list[tuple[str, str]]] = {}
    current: list[tuple[str, str]] | None = None
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], [])
            continue
        assert current is not None, f"entry outside a section: {line!r}"
        key, sep, value = line.partition("=")
        assert sep, f"not a key=value line: {line!r}"
        current.append((key.strip(), value.strip()))
    return sections


def _values(entries: list[tuple[str, str]], key: str) -> list[str]:
    return [value for k, value in entries if k == key]


def _one(entries: list[tuple[str, str]], key: str) -> str:
    values = _values(entries, key)
    assert len(values) == 1, f"{key}= appears {len(values)} times"
    return values[0]


def _stage_units(where: Path, mutate: Callable[[str, str], str] | None = None) -> tuple[Path, Path]:
    """Copy the units to ``where`` with ExecStart= pointing at an existing stub."""
    where.mkdir(parents=True, exist_ok=True)
    stub = where / "bin" / "sandboxd"
    stub.parent.mkdir(exist_ok=True)
    stub.write_text("#!/bin/sh\nexit 0\n")
    stub.chmod(0o755)
    staged = []
    for name in ("sandboxd.socket", "sandboxd.service"):
        text = (UNITS / name).read_text()
        if name == "sandboxd.service":
            assert f"ExecStart={INSTALLED_EXEC} " in text
            text = text.replace(f"ExecStart={INSTALLED_EXEC} ", f"ExecStart={stub} ")
        if mutate is not None:
            text = mutate(name, text)
        (where / name).write_text(text)
        staged.append(where / name)
    return staged[0], staged[1]


def _verify_problems(socket_unit: Path, service_unit: Path) -> list[str]:
    """What ``systemd-analyze verify`` says about our units; [] when nothing.

    verify exits 0 on most problems (an unknown key, a bad value is "ignoring")
    and only logs them, so the log lines that name our files or units count.
    """
    proc = subprocess.run(
        [_tool("systemd-analyze"), "verify", "--man=no", str(socket_unit), str(service_unit)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=socket_unit.parent,
        check=False,
    )
    where = str(socket_unit.parent)
    problems = [
        line
        for line in (proc.stdout + proc.stderr).splitlines()
        if where in line or line.startswith(("sandboxd.service", "sandboxd.socket"))
    ]
    if proc.returncode != 0:
        problems.append(f"systemd-analyze verify exited {proc.returncode}")
    return problems


# --------------------------------------------------------------------------- unit files


def test_units_pass_systemd_analyze_verify(tmp_path: Path) -> None:
    socket_unit, service_unit = _stage_units(tmp_path / "units")
    assert _verify_problems(socket_unit, service_unit) == []


def _append_to_service(line: str) -> Callable[[str, str], str]:
    def mutate(name: str, text: str) -> str:
        if name != "sandboxd.service":
            return text
        return text.replace("[Service]\n", f"[Service]\n{line}\n", 1)

    return mutate


def _replace_in(unit: str, old: str, new: str) -> Callable[[str, str], str]:
    def mutate(name: str, text: str) -> str:
        if name != unit:
            return text
        assert old in text
        return text.replace(old, new, 1)

    return mutate


@pytest.mark.parametrize(
    "mutate",
    [
        pytest.param(_append_to_service("ProtectSytem=strict"), id="misspelt-key"),
        pytest.param(
            _replace_in("sandboxd.service", "ProtectSystem=strict", "ProtectSystem=strictest"),
            id="bad-value",
        ),
        pytest.param(
            _replace_in("sandboxd.socket", "SocketMode=0660", "SocketMode=0669"),
            id="bad-socket-mode",
        ),
        pytest.param(
            _replace_in("sandboxd.service", "ExecStart=/", "ExecStart=/nonexistent/"),
            id="missing-binary",
        ),
        pytest.param(
            _replace_in("sandboxd.service", "[Service]", "[Servce]"), id="misspelt-section"
        ),
    ],
)
def test_verify_check_catches_a_broken_unit(
    tmp_path: Path, mutate: Callable[[str, str], str]
) -> None:
    """The check above is not vacuous: a unit with a mistake in it fails it."""
    socket_unit, service_unit = _stage_units(tmp_path / "units", mutate)
    assert _verify_problems(socket_unit, service_unit) != []


def test_socket_unit_contract() -> None:
    sock = _unit_entries((UNITS / "sandboxd.socket").read_text())["Socket"]
    assert _one(sock, "ListenStream") == "/run/sandboxd/sandboxd.sock"
    assert _one(sock, "SocketMode") == "0660"
    assert _one(sock, "SocketGroup") == "sandboxd"
    assert _one(sock, "Accept") == "no"


def test_service_unit_contract() -> None:
    unit = _unit_entries((UNITS / "sandboxd.service").read_text())
    head, svc = unit["Unit"], unit["Service"]
    assert _one(svc, "Type") == "notify"
    assert _one(svc, "ExecStart") == f"{INSTALLED_EXEC} serve --config /etc/sandboxd/config.toml"
    wants = " ".join(_values(head, "Wants")).split()
    after = " ".join(_values(head, "After")).split()
    requires = " ".join(_values(head, "Requires") + _values(head, "BindsTo")).split()
    assert "docker.service" in wants and "docker.service" in after
    assert "docker.service" not in requires  # the daemon outlives an engine restart
    assert "sandboxd.socket" in requires and "sandboxd.socket" in after
    assert _one(svc, "Restart") == "on-failure"
    assert _one(svc, "WatchdogSec")
    assert _one(svc, "StateDirectory") == "sandboxd"
    assert _one(svc, "RuntimeDirectory") == "sandboxd"
    assert _one(svc, "RuntimeDirectoryPreserve") == "yes"
    assert _one(svc, "KillMode") == "mixed"
    assert _one(svc, "ProtectSystem") == "strict"
    assert _one(svc, "RestrictAddressFamilies") == "AF_UNIX"
    # Exactly what sandboxd/proctree.py needs to kill an exec's processes.
    caps = set(_one(svc, "CapabilityBoundingSet").split())
    assert caps == {"CAP_KILL", "CAP_SYS_PTRACE", "CAP_DAC_READ_SEARCH"}
    assert "User" not in dict(svc) and "PrivateUsers" not in dict(svc)


def test_service_security_exposure(tmp_path: Path) -> None:
    _socket_unit, service_unit = _stage_units(tmp_path / "units")
    proc = subprocess.run(
        [
            _tool("systemd-analyze"),
            "security",
            "--offline=true",
            f"--threshold={int(float(MAX_EXPOSURE) * 10)}",
            "--no-pager",
            str(service_unit),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=service_unit.parent,
        check=False,
    )
    match = re.search(r"Overall exposure level for sandboxd\.service: (\d+\.\d+)", proc.stdout)
    assert match, proc.stdout + proc.stderr
    assert float(match.group(1)) <= float(MAX_EXPOSURE), proc.stdout
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_sysusers_entry_creates_the_socket_group(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    proc = subprocess.run(
        [_tool("systemd-sysusers"), f"--root={root}", str(UNITS / "sandboxd.sysusers")],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    groups = {
        line.split(":")[0]: line.split(":")
        for line in (root / "etc" / "group").read_text().splitlines()
    }
    assert "sandboxd" in groups
    assert int(groups["sandboxd"][2]) < 1000  # a system group
    passwd = root / "etc" / "passwd"
    assert not passwd.exists() or "sandboxd" not in passwd.read_text()


# --------------------------------------------------------------------------- example config

_COMMENTED_SETTING = re.compile(r"(?m)^# ?((?:\[\[?\w+\]\]?|\w+ = ).*)$")


def test_example_config_loads_and_matches_the_units() -> None:
    from sandboxd.config import load_config

    example = UNITS / "config.example.toml"
    config = load_config(str(example), env={})
    sock = _unit_entries((UNITS / "sandboxd.socket").read_text())["Socket"]
    svc = _unit_entries((UNITS / "sandboxd.service").read_text())["Service"]
    assert config.socket == _one(sock, "ListenStream")
    assert config.socket_group == _one(sock, "SocketGroup")
    assert config.state_dir == "/var/lib/" + _one(svc, "StateDirectory")


def test_example_config_commented_settings_are_valid(tmp_path: Path) -> None:
    """Every commented-out example, uncommented, is a key the daemon accepts."""
    from sandboxd.config import load_config

    text = (UNITS / "config.example.toml").read_text()
    uncommented = _COMMENTED_SETTING.sub(r"\1", text)
    data = tomllib.loads(uncommented)
    for table in ("defaults", "policy", "quota", "events"):
        assert data[table], f"[{table}] shows no example"
    assert data["engine_url"] and data["admin_group"]
    path = tmp_path / "config.toml"
    path.write_text(uncommented)
    config = load_config(str(path), env={})
    assert config.admin_group == data["admin_group"]


# --------------------------------------------------------------------------- listen_fds

# Runs in the activated process: reports what listen_fds*() found, then
# answers one connection on each stream socket to prove it is the live one.
_CHILD = r"""
import json, os, socket, sys
from sandboxd import systemd
api, unset = sys.argv[1], sys.argv[2] == "1"
env_vars = ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES")
if api == "plain":
    found = [("", s) for s in systemd.listen_fds(unset_environment=unset)]
else:
    found = systemd.listen_fds_with_names(unset_environment=unset)
report = {
    "pid": os.getpid(),
    "sockets": [
        {
            "name": name,
            "fd": s.fileno(),
            "family": int(s.family),
            "type": int(s.type),
            "inheritable": s.get_inheritable(),
            "sockname": s.getsockname() if s.family == socket.AF_UNIX else None,
        }
        for name, s in found
    ],
    "env": {k: os.environ.get(k) for k in env_vars},
    "fd3_inheritable": os.get_inheritable(3),
}
print(json.dumps(report), flush=True)
for name, s in found:
    if s.type == socket.SOCK_STREAM:
        conn, _ = s.accept()
        conn.sendall(b"hello from " + name.encode())
        conn.close()
"""

# Plays the service manager: moves the given fds to 3, 4, ..., sets LISTEN_*
# and execs the child, keeping its pid as sd_listen_fds(3) requires.
_WRAPPER = r"""
import fcntl, os, sys
pid_mode, names, *rest = sys.argv[1:]
sep = rest.index("--")
sources, child = [int(fd) for fd in rest[:sep]], rest[sep + 1:]
high = [fcntl.fcntl(fd, fcntl.F_DUPFD, 100) for fd in sources]
for index, fd in enumerate(high):
    os.dup2(fd, 3 + index)
for fd in high:
    os.close(fd)
if pid_mode != "absent":
    os.environ["LISTEN_PID"] = str(os.getpid()) if pid_mode == "self" else "1"
    os.environ["LISTEN_FDS"] = str(len(sources))
    if names != "-":
        os.environ["LISTEN_FDNAMES"] = names
os.execv(sys.executable, [sys.executable, *child])
"""


def _child_env() -> dict[str, str]:
    env = {
        k: v for k, v in os.environ.items() if not k.startswith(("LISTEN_", "NOTIFY_", "WATCHDOG_"))
    }
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return env


def _activate(
    fds: list[int],
    *,
    pid_mode: str = "self",
    names: str = "-",
    api: str = "names",
    unset: bool = True,
) -> tuple[subprocess.Popen[str], dict[str, Any]]:
    cmd = [sys.executable, "-c", _WRAPPER, pid_mode, names, *map(str, fds), "--"]
    cmd += ["-c", _CHILD, api, "1" if unset else "0"]
    proc = subprocess.Popen(
        cmd,
        pass_fds=fds,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=_child_env(),
        cwd=REPO,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()  # the child prints before it accepts
    if not line:
        proc.kill()
        _, err = proc.communicate(timeout=10)
        pytest.fail(f"activated child failed: {err}")
    return proc, json.loads(line)


@contextlib.contextmanager
def _reaped(proc: subprocess.Popen[str]) -> Iterator[subprocess.Popen[str]]:
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate(timeout=10)


def _listening_unix(path: Path) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(path))
    sock.listen(8)
    return sock


def _read_all(sock: socket.socket) -> bytes:
    sock.settimeout(10)
    chunks = []
    while chunk := sock.recv(4096):
        chunks.append(chunk)
    return b"".join(chunks)


def test_listen_fds_takes_the_socket_at_fd_3(short_dir: Path) -> None:
    path = short_dir / "api.sock"
    with _listening_unix(path) as listener, socket.socket(socket.AF_UNIX) as client:
        client.connect(str(path))  # queued before the "daemon" exists, as under systemd
        proc, report = _activate([listener.fileno()], names="sandboxd")
        with _reaped(proc):
            assert report["sockets"] == [
                {
                    "name": "sandboxd",
                    "fd": 3,
                    "family": int(socket.AF_UNIX),
                    "type": int(socket.SOCK_STREAM),
                    "inheritable": False,  # FD_CLOEXEC set
                    "sockname": str(path),
                }
            ]
            assert report["env"] == {"LISTEN_PID": None, "LISTEN_FDS": None, "LISTEN_FDNAMES": None}
            assert _read_all(client) == b"hello from sandboxd"
            assert proc.wait(timeout=10) == 0


def test_listen_fds_plain_api_returns_sockets(short_dir: Path) -> None:
    path = short_dir / "api.sock"
    with _listening_unix(path) as listener, socket.socket(socket.AF_UNIX) as client:
        client.connect(str(path))
        proc, report = _activate([listener.fileno()], api="plain")
        with _reaped(proc):
            assert [(s["fd"], s["sockname"]) for s in report["sockets"]] == [(3, str(path))]
            assert _read_all(client) == b"hello from "


def test_listen_fds_several_with_names_skips_non_sockets(short_dir: Path) -> None:
    path = short_dir / "api.sock"
    read_end, write_end = os.pipe()
    dgram_a, dgram_b = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        with _listening_unix(path) as listener, socket.socket(socket.AF_UNIX) as client:
            client.connect(str(path))
            fds = [listener.fileno(), read_end, dgram_a.fileno()]
            proc, report = _activate(fds, names="api:fifo:")
            with _reaped(proc):
                found = [(s["name"], s["fd"], s["type"]) for s in report["sockets"]]
                assert found == [
                    ("api", 3, int(socket.SOCK_STREAM)),
                    ("unknown", 5, int(socket.SOCK_DGRAM)),  # empty name -> "unknown"
                ]
                assert _read_all(client) == b"hello from api"
    finally:
        for fd in (read_end, write_end):
            os.close(fd)
        dgram_a.close()
        dgram_b.close()


def test_listen_fds_ignores_another_process_fds(short_dir: Path) -> None:
    with _listening_unix(short_dir / "api.sock") as listener:
        proc, report = _activate([listener.fileno()], pid_mode="other")
        with _reaped(proc):
            assert report["sockets"] == []
            assert report["fd3_inheritable"] is True  # not touched
            assert report["env"] == {"LISTEN_PID": None, "LISTEN_FDS": None, "LISTEN_FDNAMES": None}


def test_listen_fds_keeps_environment_when_asked(short_dir: Path) -> None:
    path = short_dir / "api.sock"
    with _listening_unix(path) as listener, socket.socket(socket.AF_UNIX) as client:
        client.connect(str(path))
        proc, report = _activate([listener.fileno()], names="x", unset=False)
        with _reaped(proc):
            assert len(report["sockets"]) == 1
            assert report["env"] == {
                "LISTEN_PID": str(report["pid"]),
                "LISTEN_FDS": "1",
                "LISTEN_FDNAMES": "x",
            }
            assert _read_all(client) == b"hello from x"


def test_listen_fds_not_activated(short_dir: Path) -> None:
    with _listening_unix(short_dir / "api.sock") as listener:
        proc, report = _activate([listener.fileno()], pid_mode="absent")
        with _reaped(proc):
            assert report["sockets"] == []


@pytest.mark.parametrize(
    ("listen_pid", "listen_fds_value"),
    [(None, None), ("self", "not-a-number"), ("self", "0"), ("garbage", "1")],
)
def test_listen_fds_in_process_without_activation(
    monkeypatch: pytest.MonkeyPatch, listen_pid: str | None, listen_fds_value: str | None
) -> None:
    for var in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        monkeypatch.delenv(var, raising=False)
    if listen_pid is not None:
        monkeypatch.setenv("LISTEN_PID", str(os.getpid()) if listen_pid == "self" else listen_pid)
    if listen_fds_value is not None:
        monkeypatch.setenv("LISTEN_FDS", listen_fds_value)
    assert listen_fds() == []
    assert listen_fds_with_names() == []
    assert "LISTEN_PID" not in os.environ and "LISTEN_FDS" not in os.environ


# --------------------------------------------------------------------------- Notifier


@pytest.fixture
def manager(short_dir: Path) -> Iterator[socket.socket]:
    """A stand-in for systemd's notify socket."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(short_dir / "notify"))
    sock.setblocking(False)
    try:
        yield sock
    finally:
        sock.close()


def _drain(sock: socket.socket) -> list[str]:
    out = []
    while True:
        try:
            out.append(sock.recv(65536).decode())
        except BlockingIOError:
            return out


def _receive(sock: socket.socket, count: int = 1, timeout: float = 5.0) -> list[str]:
    deadline = time.monotonic() + timeout
    got: list[str] = []
    while len(got) < count and time.monotonic() < deadline:
        got += _drain(sock)
        if len(got) < count:
            time.sleep(0.005)
    return got


def _notifier_for(sock: socket.socket, **env: str) -> Notifier:
    return Notifier.from_env({"NOTIFY_SOCKET": sock.getsockname(), **env})


def test_notifier_messages(manager: socket.socket) -> None:
    notifier = _notifier_for(manager)
    assert notifier.enabled
    assert notifier.ready()
    assert notifier.ready("serving on /run/x.sock")
    assert notifier.status("adopting\n3 sandboxes")
    assert notifier.watchdog_ping()
    assert notifier.stopping()
    assert notifier.stopping("stopping: SIGTERM")
    assert notifier.extend_timeout(1.5)
    assert _receive(manager, 7) == [
        "READY=1",
        "READY=1\nSTATUS=serving on /run/x.sock",
        "STATUS=adopting 3 sandboxes",
        "WATCHDOG=1",
        "STOPPING=1",
        "STOPPING=1\nSTATUS=stopping: SIGTERM",
        "EXTEND_TIMEOUT_USEC=1500000",
    ]


def test_notifier_rejects_smuggled_lines(manager: socket.socket) -> None:
    notifier = _notifier_for(manager)
    assert notifier.notify("STATUS=ok\nREADY=1") is False
    assert notifier.notify() is False
    assert notifier.notify("STATUS=a", "WATCHDOG=1") is True
    assert _receive(manager) == ["STATUS=a\nWATCHDOG=1"]


def test_notifier_abstract_address() -> None:
    name = f"sandboxd-test-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.setblocking(False)
        notifier = Notifier.from_env({"NOTIFY_SOCKET": "@" + name})
        assert notifier.ready()
        assert _receive(sock) == ["READY=1"]


def test_notifier_from_env_unsets_only_when_asked(manager: socket.socket) -> None:
    env = {"NOTIFY_SOCKET": manager.getsockname(), "WATCHDOG_USEC": "1000", "OTHER": "x"}
    Notifier.from_env(env)
    assert set(env) == {"NOTIFY_SOCKET", "WATCHDOG_USEC", "OTHER"}
    notifier = Notifier.from_env(env, unset_environment=True)
    assert env == {"OTHER": "x"}
    assert notifier.enabled and notifier.watchdog_usec == 1000


def test_notifier_reads_os_environ(monkeypatch: pytest.MonkeyPatch, manager: socket.socket) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", manager.getsockname())
    monkeypatch.setenv("WATCHDOG_USEC", "4000000")
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    notifier = Notifier.from_env()
    assert notifier.watchdog_interval() == 2.0
    assert os.environ["NOTIFY_SOCKET"] == manager.getsockname()


async def test_notifier_without_manager_is_a_noop(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    monkeypatch.setenv("WATCHDOG_USEC", "1000000")
    notifier = Notifier.from_env()
    assert not notifier.enabled
    assert notifier.ready("x") is False
    assert notifier.watchdog_ping() is False
    assert notifier.watchdog_interval() is None
    await asyncio.wait_for(notifier.run_watchdog(), timeout=5)  # returns at once


@pytest.mark.parametrize("address", ["vsock:2:1234", "relative/path", ""])
def test_notifier_unsupported_address_is_a_noop(address: str) -> None:
    notifier = Notifier.from_env({"NOTIFY_SOCKET": address})
    assert not notifier.enabled and notifier.ready() is False


def test_notifier_never_raises(short_dir: Path) -> None:
    gone = Notifier.from_env({"NOTIFY_SOCKET": str(short_dir / "missing")})
    assert gone.enabled and gone.ready() is False
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as stream:
        stream.bind(str(short_dir / "stream"))
        stream.listen(1)
        assert Notifier.from_env({"NOTIFY_SOCKET": str(short_dir / "stream")}).ready() is False


def test_notifier_does_not_block_on_a_full_queue(manager: socket.socket) -> None:
    """A manager that stops reading fills its queue: sends fail at once, never block."""
    notifier = _notifier_for(manager)
    started = time.monotonic()
    results = [notifier.watchdog_ping() for _ in range(10_000)]
    assert results[0] is True
    assert False in results
    assert time.monotonic() - started < 30


@pytest.mark.parametrize(
    ("usec", "pid", "expected"),
    [
        ("30000000", None, 15.0),
        ("30000000", "self", 15.0),
        ("30000000", "1", None),  # the watchdog is meant for another process
        ("200000", None, 0.1),
        ("1", None, 5e-7),
        (None, None, None),
        ("0", None, None),
        ("-5", None, None),
        ("soon", None, None),
    ],
)
def test_watchdog_interval(
    manager: socket.socket, usec: str | None, pid: str | None, expected: float | None
) -> None:
    env = {"NOTIFY_SOCKET": manager.getsockname()}
    if usec is not None:
        env["WATCHDOG_USEC"] = usec
    if pid is not None:
        env["WATCHDOG_PID"] = str(os.getpid()) if pid == "self" else pid
    assert Notifier.from_env(env).watchdog_interval() == expected


async def _next_datagram(sock: socket.socket, within: float = 5.0) -> str:
    """The next datagram, received through the event loop; fails after ``within`` s."""
    async with asyncio.timeout(within):
        data = await asyncio.get_running_loop().sock_recv(sock, 65536)
    return data.decode()


async def test_run_watchdog_pings_repeatedly(manager: socket.socket) -> None:
    notifier = _notifier_for(manager, WATCHDOG_USEC="100000")  # a ping every 50 ms
    task = asyncio.create_task(notifier.run_watchdog())
    try:
        received = [await _next_datagram(manager) for _ in range(4)]
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    assert received == ["WATCHDOG=1"] * 4


async def test_blocked_loop_sends_no_watchdog(manager: socket.socket) -> None:
    """The pings come from the event loop: while it is blocked, none is sent."""
    notifier = _notifier_for(manager, WATCHDOG_USEC="40000")  # a ping every 20 ms
    task = asyncio.create_task(notifier.run_watchdog())
    try:
        assert await _next_datagram(manager) == "WATCHDOG=1"
        _drain(manager)  # no await between here and the check: the loop cannot run
        time.sleep(0.5)  # noqa: ASYNC251 - the point: block the loop for 25 intervals
        assert _drain(manager) == []
        assert await _next_datagram(manager) == "WATCHDOG=1"  # and it resumes
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
