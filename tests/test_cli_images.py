"""``sandboxctl image ls|pull|rm``, ``sandboxctl snapshot`` and the pools in ``info``.

The progress rendering (``PullView``: plain lines, the one-line bar) is pure
logic, tested with made-up events; the commands run against the real daemon,
in-process (click's runner) or as a process (for a real non-terminal stdout,
and on a pseudo-terminal for the bar), pulling from a real registry on
127.0.0.1. Every test removes the sandboxes and images it made, even when it
fails midway.
"""

from __future__ import annotations

import fcntl
import json
import os
import pty
import re
import secrets
import struct
import subprocess
import sys
import termios
from collections.abc import Callable, Iterator

import pytest
from click.testing import CliRunner, Result
from conftest import BASE_IMAGE, Daemon, docker, local_refs, remove_images
from registry import Registry, local_registry, make_unique_image, push_image
from sandboxd_client import PoolInfo, PullProgress
from sandboxd_client.cli import PullView, cli, pool_pairs

SANDBOXCTL = [sys.executable, "-c", "from sandboxd_client.cli import main; main()"]
LAYER_BYTES = 32 << 20


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items()
            if k not in ("SANDBOXD_SOCKET", "COLUMNS", "LINES")}


def ctl(socket_path: str, *args: str) -> subprocess.CompletedProcess[str]:
    """sandboxctl as a process, its stdout a pipe (not a terminal)."""
    return subprocess.run([*SANDBOXCTL, "--socket", socket_path, *args], capture_output=True,
                          text=True, timeout=120, env=_env())


def invoke(*args: str) -> Result:
    """sandboxctl in-process."""
    return CliRunner().invoke(cli, list(args), env={"SANDBOXD_SOCKET": None})


def one_error_line(stderr: str, code: str) -> None:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"sandboxctl: {code}: "), stderr
    assert "Traceback" not in stderr


# -- fixtures (images removed by id once no container uses them) ----------------------






@pytest.fixture
def token() -> Iterator[str]:
    """A name part unique to this test; every local image naming it is removed afterwards."""
    t = f"c{secrets.token_hex(4)}"
    yield t
    remove_images(local_refs(t))


@pytest.fixture
def sandboxes(daemon: Daemon) -> Iterator[list[str]]:
    """Sandbox ids a test made through the CLI; removed afterwards."""
    made: list[str] = []
    yield made
    if made:
        ctl(daemon.socket, "rm", "-f", *made)


@pytest.fixture(scope="module")
def registry() -> Iterator[Registry]:
    with local_registry() as reg:
        yield reg


@pytest.fixture
def pushed(registry: Registry, token: str) -> Iterator[Callable[[str], str]]:
    """``pushed(name)``: a fresh image in the registry and not here; the ref to pull."""
    made: list[str] = []

    def push(name: str) -> str:
        source = f"sbd-src-{token}-{name}:src"
        made.append(make_unique_image(source, LAYER_BYTES))
        ref = push_image(registry, source, f"{token}-{name}", "v1")
        docker("rmi", source)  # no local tag is left: the engine has to pull it
        return ref

    yield push
    remove_images(made)


# -- pure: rendering --------------------------------------------------------------------


def P(id: str | None, status: str, current: int | None = None,
      total: int | None = None) -> PullProgress:
    """A made-up progress event of ``reg.example/app:1``."""
    return PullProgress(ref="reg.example/app:1", id=id, status=status, current=current,
                        total=total)


@pytest.mark.pure
def test_plain_lines_one_per_status_change() -> None:
    view = PullView("reg.example/app:1")
    events = [
        P("1", "Pulling from app"),
        P("aaa", "Pulling fs layer"), P("bbb", "Pulling fs layer"),
        P("aaa", "Downloading", 10, 100), P("aaa", "Downloading", 50, 100),
        P("bbb", "Downloading", 1, 300), P("aaa", "Downloading", 90, 100),
        P("aaa", "Download complete"), P("aaa", "Extracting", 40, 100),
        P("aaa", "Extracting", 100, 100), P("aaa", "Pull complete"),
        P(None, "Digest: sha256:abc"), P(None, "Status: Downloaded newer image"),
    ]
    lines = [line for e in events if (line := view.update(e)) is not None]
    assert lines == [
        "1: Pulling from app",
        "aaa: Pulling fs layer", "bbb: Pulling fs layer",
        "aaa: Downloading", "bbb: Downloading",
        "aaa: Download complete", "aaa: Extracting", "aaa: Pull complete",
        "Digest: sha256:abc", "Status: Downloaded newer image",
    ]
    assert set(view.layers) == {"aaa", "bbb"}  # the tag line is the pull's, no layer


@pytest.mark.pure
def test_bar_sums_the_layers() -> None:
    view = PullView("reg.example/app:1")
    assert view.fraction() == 0.0 and "0%" in view.bar(80)
    view.update(P("aaa", "Downloading", 50, 100))
    view.update(P("bbb", "Downloading", 100, 300))
    view.update(P("ccc", "Already exists"))  # shared with an image here: no bytes
    assert view.totals() == (150, 400)
    assert view.fraction() == pytest.approx(150 / 800)  # download, then extraction
    line = view.bar(100)
    assert line.startswith("downloading reg.example/app:1 [")
    assert " 19% 150B/400B 1/3 layers" in line and "\r" not in line and "\n" not in line
    view.update(P("aaa", "Extracting", 100, 100))  # downloaded whole; extracted too
    view.update(P("bbb", "Download complete"))
    assert view.totals() == (400, 400)
    assert view.phase() == "extracting"
    assert view.fraction() == pytest.approx((400 + 100) / 800)
    view.update(P("aaa", "Pull complete"))
    view.update(P("bbb", "Pull complete"))
    assert view.fraction() == 1.0 and "3/3 layers" in view.bar(100)
    view.finish()
    assert view.bar(100).startswith("pulled ") and "100%" in view.bar(100)


@pytest.mark.pure
def test_bar_fits_the_width_and_survives_missed_events() -> None:
    long_ref = "127.0.0.1:5000/" + "very-long-name/" * 8 + "app:1"
    view = PullView(long_ref)
    view.update(P("aaa", "Extracting", 5, 10))  # the earlier events were dropped
    for width in (20, 40, 79, 200):
        line = view.bar(width)
        assert len(line) <= width
    assert "~" in view.bar(79) and "[" in view.bar(79) and "%" in view.bar(79)
    assert "1/1" not in view.bar(79) and "0/1 layers" in view.bar(79)
    assert view.totals() == (10, 10)  # extracting: it was downloaded whole
    view.finish()
    assert view.fraction() == 1.0 and view.totals() == (10, 10)
    empty = PullView("x:1")
    empty.finish()
    assert "100%" in empty.bar(60)


@pytest.mark.pure
def test_info_pool_lines() -> None:
    assert pool_pairs({}) == [("pool", "none")]
    pools = {"small": PoolInfo(image="sandboxd/base:latest", size=4, ready=3, claims=10,
                               misses=2, starting=1),
             "big": PoolInfo(image="x:1", size=1, ready=0, claims=0, misses=5, starting=1)}
    assert pool_pairs(pools) == [
        ("pool big", "x:1: 0/1 ready, 1 starting, 0 claims, 5 misses"),
        ("pool small", "sandboxd/base:latest: 3/4 ready, 1 starting, 10 claims, 2 misses"),
    ]


# -- against the daemon -------------------------------------------------------------------


def test_image_ls_table_and_json(daemon: Daemon) -> None:
    s = daemon.socket
    res = invoke("image", "ls", "--socket", s)
    assert res.exit_code == 0, res.output
    header, *rows = res.stdout.splitlines()
    assert header.split() == ["REF", "ID", "SIZE", "CREATED"]
    base_id = docker("image", "inspect", "-f", "{{.Id}}", BASE_IMAGE).strip()
    row = next(r.split("  ") for r in rows if r.startswith(BASE_IMAGE + " "))
    cells = [c.strip() for c in row if c.strip()]
    assert cells[1] == base_id.removeprefix("sha256:")[:12]
    assert re.fullmatch(r"\d+(\.\d)?(B|KiB|MiB|GiB|TiB)", cells[2])
    assert cells[3].endswith(" ago")
    for args in (["--json", "image", "ls", "--socket", s], ["image", "--json", "ls", "--socket", s],
                 ["image", "ls", "--socket", s, "--json"]):
        res = invoke(*args)
        assert res.exit_code == 0, (args, res.output)
        listed = {i["ref"]: i for i in json.loads(res.stdout)}
        assert listed[BASE_IMAGE]["id"] == base_id
        assert set(listed[BASE_IMAGE]) == {"ref", "id", "size", "created_at"}


def test_info_shows_the_pools(daemon: Daemon) -> None:
    res = invoke("info", "--socket", daemon.socket)
    assert res.exit_code == 0 and re.search(r"^pool:\s+none$", res.stdout, re.M), res.stdout
    assert json.loads(invoke("info", "--json", "--socket", daemon.socket).stdout)["pool"] == {}


def test_snapshot_fork_and_image_rm(daemon: Daemon, token: str,
                                    sandboxes: list[str]) -> None:
    s = daemon.socket
    made = ctl(s, "create", "--ttl", "120", "--name", f"orig-{token}")
    assert made.returncode == 0, made.stderr
    sandboxes.append(made.stdout.strip())
    wrote = ctl(s, "exec", f"orig-{token}", "--", "sh", "-c", "echo from-cli > /workspace/m")
    assert wrote.returncode == 0, wrote.stderr

    snap = ctl(s, "snapshot", f"orig-{token}")  # named after the sandbox
    assert snap.returncode == 0, snap.stderr
    ref = snap.stdout.strip()
    assert re.fullmatch(rf"sandboxd-snapshot/u{os.getuid()}/orig-{token}:[\w.-]+", ref)
    tagged = ctl(s, "snapshot", "--json", sandboxes[0], f"tagged-{token}:v1")
    assert tagged.returncode == 0, tagged.stderr
    tagged_snap = json.loads(tagged.stdout)
    assert tagged_snap["ref"] == f"sandboxd-snapshot/u{os.getuid()}/tagged-{token}:v1"
    assert tagged_snap["id"].startswith("sha256:")

    listed = ctl(s, "image", "ls")
    assert ref in listed.stdout and tagged_snap["id"][7:19] in listed.stdout

    fork = ctl(s, "create", "--ttl", "120", "--image", ref)
    assert fork.returncode == 0, fork.stderr
    sandboxes.append(fork.stdout.strip())
    read = ctl(s, "exec", sandboxes[1], "--", "cat", "/workspace/m")
    assert (read.returncode, read.stdout) == (0, "from-cli\n")

    removed = ctl(s, "image", "rm", tagged_snap["ref"])
    assert (removed.returncode, removed.stdout) == (0, tagged_snap["ref"] + "\n"), removed.stderr
    again = ctl(s, "image", "rm", tagged_snap["ref"])
    assert again.returncode == 1 and again.stdout == ""
    one_error_line(again.stderr, "not_found")
    assert ctl(s, "image", "rm", "-f", tagged_snap["ref"]).returncode == 0
    as_json = ctl(s, "image", "rm", "--json", tagged_snap["ref"])
    assert as_json.returncode == 1
    assert json.loads(as_json.stdout)[0]["error"]["code"] == "not_found"
    base = ctl(s, "image", "rm", BASE_IMAGE)  # no snapshot: never removed through sandboxd
    assert base.returncode == 1
    one_error_line(base.stderr, "permission_denied")
    assert BASE_IMAGE in ctl(s, "image", "ls").stdout

    bad = ctl(s, "snapshot", sandboxes[0], "Not Valid")
    assert bad.returncode == 1
    one_error_line(bad.stderr, "invalid_params")
    missing = ctl(s, "snapshot", f"no-such-{token}")
    assert missing.returncode == 1
    one_error_line(missing.stderr, "not_found")
    assert ctl(s, "snapshot").returncode == 2  # usage: SANDBOX is required


def test_image_pull_prints_plain_lines_off_a_terminal(
    daemon: Daemon, pushed: Callable[[str], str], registry: Registry, token: str,
) -> None:
    s = daemon.socket
    ref = pushed("plain")
    pulled = ctl(s, "image", "pull", ref)
    assert pulled.returncode == 0, pulled.stderr
    assert "\r" not in pulled.stdout and pulled.stderr == ""
    *progress, ref_line, id_line, pulled_line = pulled.stdout.splitlines()
    image_id = docker("image", "inspect", "-f", "{{.Id}}", ref).strip()
    assert ref_line.split() == ["ref:", ref]
    assert id_line.split() == ["id:", image_id]
    assert pulled_line.split() == ["pulled:", "yes"]
    assert progress, "no progress line"
    assert len(progress) == len(set(progress))  # one line per status change, not per byte
    assert all(line.strip() for line in progress)

    again = ctl(s, "image", "pull", ref)
    assert again.returncode == 0
    assert again.stdout.splitlines()[-1].split() == ["pulled:", "no", "(already", "present)"]
    as_json = ctl(s, "image", "pull", "--json", ref)
    assert json.loads(as_json.stdout) == {"ref": ref, "id": image_id, "pulled": False}

    absent = ctl(s, "image", "pull", registry.ref(f"absent-{token}"))
    assert absent.returncode == 1 and absent.stdout == ""
    assert len(absent.stderr.strip().splitlines()) == 1 and "absent" in absent.stderr


def _run_on_terminal(args: list[str], cols: int = 100) -> tuple[int, bytes, bytes]:
    """Run ``args`` with stdout on a pseudo-terminal; exit status, terminal output, stderr."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, cols, 0, 0))
    out = bytearray()
    with subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=slave,
                          stderr=subprocess.PIPE, env=_env()) as proc:
        os.close(slave)
        try:
            while True:
                try:
                    chunk = os.read(master, 65536)
                except OSError:  # EIO: the other side is closed
                    break
                if not chunk:
                    break
                out += chunk
        finally:
            os.close(master)
            try:
                proc.wait(timeout=120)
            except subprocess.TimeoutExpired:
                proc.kill()
        assert proc.stderr is not None
        err = proc.stderr.read()
    return proc.returncode, bytes(out), err


def test_image_pull_draws_a_bar_on_a_terminal(
    daemon: Daemon, pushed: Callable[[str], str]
) -> None:
    ref = pushed("tty")
    code, out, err = _run_on_terminal([*SANDBOXCTL, "--socket", daemon.socket, "image",
                                       "pull", ref])
    assert code == 0, err
    text = out.decode()
    bar, _, result = text.partition("\r\n")
    redraws = [r for r in bar.split("\r") if r]
    assert redraws, text
    assert all(len(r) <= 99 and "[" in r and "%" in r for r in redraws)
    assert redraws[-1].startswith("pulled ") and "100%" in redraws[-1]
    assert "Downloading" not in text  # no plain lines on a terminal
    assert result.split("\r\n")[2].split() == ["pulled:", "yes"]
