"""sandboxctl against the real daemon: exit codes, raw bytes, --json, one-line errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner, Result
from conftest import Daemon
from sandboxd_client.cli import cli

SANDBOXCTL = [sys.executable, "-c", "from sandboxd_client.cli import main; main()"]


def ctl(
    daemon_socket: str, *args: str, stdin: bytes | None = None
) -> subprocess.CompletedProcess[bytes]:
    env = {k: v for k, v in os.environ.items() if k != "SANDBOXD_SOCKET"}
    return subprocess.run([*SANDBOXCTL, "--socket", daemon_socket, *args], input=stdin,
                          capture_output=True, timeout=60, env=env)


@pytest.fixture
def sandbox_id(daemon: Daemon) -> Iterator[str]:
    proc = ctl(daemon.socket, "create", "--ttl", "120", "--label", "suite=cli")
    assert proc.returncode == 0, proc.stderr
    sid = proc.stdout.decode().strip()
    yield sid
    ctl(daemon.socket, "rm", sid)


def test_exec_passes_bytes_and_the_exit_code(daemon: Daemon, sandbox_id: str) -> None:
    payload = bytes(range(256)) * 4
    proc = ctl(daemon.socket, "exec", "--stdin", sandbox_id, "--", "sh", "-c",
               "cat; printf 'err\\n' >&2; exit 3", stdin=payload)
    assert proc.returncode == 3
    assert proc.stdout == payload
    assert proc.stderr == b"err\n"


def test_json_output_of_create_ls_inspect_stats(daemon: Daemon, sandbox_id: str) -> None:
    inspect = json.loads(ctl(daemon.socket, "inspect", "--json", sandbox_id).stdout)
    assert inspect["id"] == sandbox_id and inspect["status"] == "running"
    listed = json.loads(ctl(daemon.socket, "ls", "--json", "--label", "suite=cli").stdout)
    assert sandbox_id in [s["id"] for s in listed]
    stats = json.loads(ctl(daemon.socket, "stats", "--json", sandbox_id).stdout)
    assert stats["memory_limit_bytes"] == 512 * 1024**2
    assert ctl(daemon.socket, "pause", sandbox_id).returncode == 0
    paused = json.loads(ctl(daemon.socket, "inspect", "--json", sandbox_id).stdout)
    assert paused["status"] == "paused"
    assert ctl(daemon.socket, "resume", sandbox_id).returncode == 0
    assert ctl(daemon.socket, "extend", sandbox_id, "600").returncode == 0


def test_errors_are_one_line_without_traceback(daemon: Daemon, tmp_path: Path) -> None:
    proc = ctl(daemon.socket, "inspect", "no-such-sandbox")
    assert proc.returncode == 1
    lines = proc.stderr.decode().strip().splitlines()
    assert len(lines) == 1 and "not_found" in lines[0] and "Traceback" not in lines[0]
    proc = ctl(str(tmp_path / "absent.sock"), "ping")
    assert proc.returncode == 1
    lines = proc.stderr.decode().strip().splitlines()
    assert len(lines) == 1 and "not running" in lines[0]


def test_ping_and_info(daemon: Daemon) -> None:
    assert ctl(daemon.socket, "ping").returncode == 0
    info = json.loads(ctl(daemon.socket, "info", "--json").stdout)
    assert info["engine"]["reachable"] is True and info["caller"]["uid"] == os.getuid()


def invoke(*args: str, env: dict[str, str | None] | None = None) -> Result:
    """sandboxctl in-process, with exactly these arguments (no --socket added)."""
    return CliRunner().invoke(cli, list(args), env={"SANDBOXD_SOCKET": None, **(env or {})})


def test_socket_and_json_before_or_after_the_command(daemon: Daemon, tmp_path: Path) -> None:
    good, bad = daemon.socket, str(tmp_path / "absent.sock")
    for args in (["--socket", good, "--json", "ping"], ["ping", "--socket", good, "--json"],
                 ["--json", "ping", "--socket", good], ["--socket", good, "ping", "--json"]):
        res = invoke(*args)
        assert res.exit_code == 0, (args, res.output)
        assert json.loads(res.stdout) == {"result": "pong"}, args
    # The command's own value wins over the group's, and over the environment.
    assert invoke("--socket", bad, "ping", "--socket", good).stdout == "pong\n"
    res = invoke("--socket", good, "ping", "--socket", bad)
    assert res.exit_code == 1 and f"not running at {bad}" in res.stderr
    assert invoke("ping", "--socket", good, env={"SANDBOXD_SOCKET": bad}).exit_code == 0
    assert invoke("--json", "ping", "--no-json", "--socket", good).stdout == "pong\n"
    assert invoke("--no-json", "info", "--json", "--socket", good).stdout.startswith("{")


def test_every_command_takes_socket_and_json_after_its_name(
    daemon: Daemon, sandbox_id: str
) -> None:
    s = daemon.socket
    assert json.loads(invoke("info", "--socket", s, "--json").stdout)["engine"]["reachable"]
    listed = json.loads(invoke("ls", "--label", "suite=cli", "--socket", s, "--json").stdout)
    assert sandbox_id in [x["id"] for x in listed]
    assert json.loads(invoke("--json", "inspect", sandbox_id, "--socket", s).stdout)[
        "id"] == sandbox_id
    assert invoke("inspect", sandbox_id, "--socket", s).stdout.startswith("id:")
    assert json.loads(invoke("stats", sandbox_id, "--json", "--socket", s).stdout)["pids"] >= 1
    assert json.loads(invoke("pause", sandbox_id, "--socket", s, "--json").stdout)[
        "status"] == "paused"
    assert json.loads(invoke("--socket", s, "resume", "--json", sandbox_id).stdout)[
        "status"] == "running"
    assert json.loads(invoke("extend", sandbox_id, "90", "--json", "--socket", s).stdout)[
        "id"] == sandbox_id
    # exec: options between ID and "--" (or before ID) belong to sandboxctl, the rest is CMD.
    res = invoke("exec", sandbox_id, "--socket", s, "--json", "--", "sh", "-c",
                 "echo out; exit 4")
    assert res.exit_code == 4 and json.loads(res.stdout)["stdout"] == "out\n"
    res = invoke("--json", "exec", "--socket", s, "--no-json", sandbox_id, "echo", "--json")
    assert res.exit_code == 0 and res.stdout == "--json\n"
    res = invoke("--socket", s, "rm", "--json", "no-such-sandbox")
    assert res.exit_code == 1
    assert json.loads(res.stdout) == [{"id": "no-such-sandbox", "removed": False, "error": {
        "code": "not_found", "message": json.loads(res.stdout)[0]["error"]["message"]}}]
    assert res.stderr.count("\n") == 1 and "not_found" in res.stderr
    made = json.loads(invoke("create", "--ttl", "60", "--socket", s, "--json").stdout)["id"]
    res = invoke("rm", made, "--json", "--socket", s)
    assert res.exit_code == 0 and json.loads(res.stdout) == [
        {"id": made, "removed": True, "error": None}]


def test_create_takes_disk_and_runtime(daemon: Daemon) -> None:
    proc = ctl(daemon.socket, "create", "--ttl", "60", "--disk", "64m", "--json")
    assert proc.returncode == 0, proc.stderr
    made = json.loads(proc.stdout)
    try:
        assert made["limits"]["disk_bytes"] == 64 * 1024**2
    finally:
        ctl(daemon.socket, "rm", made["id"])
    denied = ctl(daemon.socket, "create", "--ttl", "60", "--runtime", "runsc")
    assert denied.returncode == 1  # the session daemon's policy allows no other runtime
    assert denied.stderr.decode().startswith("sandboxctl: permission_denied: Runtime 'runsc'")
