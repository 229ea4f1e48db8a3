"""sandboxctl against the real daemon: exit codes, raw bytes, --json, one-line errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import Daemon

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
