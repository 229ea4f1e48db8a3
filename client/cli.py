"""``sandboxctl``: the command-line interface to sandboxd.

This module owns argument parsing, human and JSON rendering, and the CLI's
error contract: a failure prints exactly one line on stderr,
``sandboxctl: <code>: <message>``, and exits 1 (usage errors exit 2, as
click does); never a traceback. ``--socket`` and ``--json`` are accepted both
before the command name and after it; the command's own value wins. The
streamed commands (``exec -i/-t/-d``, ``attach``) hand their process to
``relay`` (the concurrent stdin and output flows) inside ``terminal``'s raw
mode where there is one; ``cp`` hands its two ends to ``transfer``. ``image
pull`` renders the pull's progress events (``PullView``): one bar redrawn in
place on a terminal, one plain line per status change otherwise. It talks
to the daemon only through the blocking ``Client``; it must not speak the
wire protocol itself, nor import aiodocker or the daemon.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import shlex
import shutil
import signal
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, NoReturn, TypeVar

import click

from sandboxd.wire.errors import ConnectionLost, NotFound, SandboxdError
from sandboxd.wire.version import __version__

from . import terminal, transfer
from ._sync.client import Client
from .models import (
    DaemonInfo,
    EnsureResult,
    Event,
    ExecExit,
    ExecInfo,
    ExecResult,
    ImageInfo,
    PoolInfo,
    PullProgress,
    Sandbox,
    Snapshot,
    Stats,
    parse_time,
)
from .relay import relay

T = TypeVar("T")
F = TypeVar("F", bound=Callable[..., Any])

PROG = "sandboxctl"


# -- plumbing ----------------------------------------------------------------


class Failed(click.ClickException):
    """An error already rendered as the one-line message; exit code 1."""

    exit_code = 1

    def show(self, file: Any = None) -> None:
        click.echo(f"{PROG}: {self.message}", err=True)


def _error_line(err: SandboxdError) -> str:
    message = err.message
    data = err.data or {}
    engine = data.get("engine_message") if isinstance(data, Mapping) else None
    if engine and str(engine) not in message:
        message = f"{message} (engine: {engine})"
    return f"{err.code}: {message}"


@dataclass
class Settings:
    """The options every command takes, before or after its name: ``--socket``, ``--json``."""

    socket: str | None = None
    json: bool = False


def settings(ctx: click.Context) -> Settings:
    """This invocation's settings (the group's, overridden by the command's own options)."""
    found = ctx.find_object(Settings)
    return found if found is not None else ctx.ensure_object(Settings)


def _set_socket(ctx: click.Context, param: click.Parameter, value: str | None) -> None:
    if value:
        settings(ctx).socket = value


def _set_json(ctx: click.Context, param: click.Parameter, value: bool | None) -> None:
    if value is not None:
        settings(ctx).json = value


def common_options(json_help: str = "Print JSON instead of text.") -> Callable[[F], F]:
    """``--socket PATH`` and ``--json/--no-json`` on a command (they win over the group's)."""

    def decorate(f: F) -> F:
        f = click.option("--json/--no-json", "as_json", default=None, expose_value=False,
                         callback=_set_json, help=json_help)(f)
        f = click.option("--socket", "socket_path", metavar="PATH", expose_value=False,
                         callback=_set_socket,
                         help="The daemon's socket (wins over one given before the command).",
                         )(f)
        return f

    return decorate


def run(ctx: click.Context, action: Callable[[Client], T]) -> T:
    """Connect, run ``action(client)``, close; turn every failure into one stderr line."""
    try:
        with Client(settings(ctx).socket) as client:
            return action(client)
    except SandboxdError as err:
        raise Failed(_error_line(err)) from None
    except (click.ClickException, click.exceptions.Exit, click.Abort, BrokenPipeError):
        raise  # a closed stdout (``| head``): main() exits quietly
    except Exception as err:  # never a traceback; SANDBOXCTL_DEBUG=1 shows one
        if os.environ.get("SANDBOXCTL_DEBUG"):
            raise
        raise Failed(f"client_error: {type(err).__name__}: {err}") from None


def _json_default(value: Any) -> Any:
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value).decode("utf-8", "replace")
    if hasattr(value, "to_dict"):
        return value.to_dict()
    return str(value)


def emit_json(value: Any) -> None:
    click.echo(json.dumps(value, indent=2, sort_keys=False, default=_json_default,
                          ensure_ascii=False))


def _key_values(pairs: Sequence[str], what: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"{pair!r} is not KEY=VALUE.", param_hint=what)
        out[key] = value
    return out


_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_seconds(value: str) -> float | int:
    """A duration: seconds as a number, or with a unit suffix s, m, h or d (``10m``)."""
    text = value.strip().lower()
    factor = 1
    if text and text[-1] in _UNITS:
        factor, text = _UNITS[text[-1]], text[:-1]
    try:
        number = float(text)
    except ValueError:
        raise click.BadParameter(
            f"{value!r} is not a duration (seconds, or like 90s, 10m, 2h).") from None
    if number < 0 or number != number or number in (float("inf"), float("-inf")):
        raise click.BadParameter(f"{value!r} is not a usable duration.")
    seconds = number * factor
    return int(seconds) if seconds == int(seconds) else seconds


def _seconds_cb(ctx: click.Context, param: click.Parameter, value: str | None) -> Any:
    return None if value is None else parse_seconds(value)


def _size_cb(ctx: click.Context, param: click.Parameter, value: str | None) -> Any:
    """Bytes as an integer, or a string like ``512m`` sent as-is for the daemon to parse."""
    if value is None:
        return None
    text = value.strip()
    if not text:
        raise click.BadParameter("an empty size")
    return int(text) if text.isdigit() else text


def _ago_or_in(when: str | None, *, never: str = "never") -> str:
    t = parse_time(when)
    if t is None:
        return never if when is None else str(when)
    delta = (t - datetime.now(UTC)).total_seconds()
    if delta <= 0:
        return "expired"
    return "in " + _human_duration(delta)


def _ago(when: str | None) -> str:
    """How long ago an RFC 3339 time was: ``5m03s ago`` (the string itself if unreadable)."""
    t = parse_time(when)
    if t is None:
        return when or "-"
    return _human_duration(max(0.0, (datetime.now(UTC) - t).total_seconds())) + " ago"


def _human_duration(seconds: float) -> str:
    s = int(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def _human_bytes(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{value:.0f}{unit}" if unit == "B" else f"{value:.1f}{unit}"
        value /= 1024
    return f"{n}B"  # pragma: no cover


def table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Left-aligned columns separated by two spaces (the last column unpadded)."""
    widths = [len(h) for h in headers]
    for row in rows:
        for i, cell in enumerate(row):
            widths[i] = max(widths[i], len(cell))
    lines = []
    for row in [list(headers), *[list(r) for r in rows]]:
        cells = [cell.ljust(widths[i]) for i, cell in enumerate(row[:-1])] + [row[-1]]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)


def listing(pairs: Sequence[tuple[str, Any]]) -> str:
    width = max(len(k) for k, _ in pairs)
    return "\n".join(f"{k + ':':<{width + 1}} {v}" for k, v in pairs)


def _sandbox_listing(sb: Sandbox) -> str:
    labels = ", ".join(f"{k}={v}" for k, v in sorted(sb.labels.items())) or "-"
    expires = "never" if sb.expires_at is None else (
        f"{sb.expires_at} ({_ago_or_in(sb.expires_at)})")
    pairs: list[tuple[str, Any]] = [
        ("id", sb.id),
        ("name", sb.name),
        ("status", sb.status),
        ("image", sb.image),
        ("owner", f"{sb.owner.uid}:{sb.owner.gid}"),
        ("created_at", sb.created_at),
        ("expires_at", expires),
        ("idle_timeout", "-" if sb.idle_timeout is None else f"{sb.idle_timeout:g}s"),
        ("last_activity_at", sb.last_activity_at or "-"),
        ("labels", labels),
        ("memory", _human_bytes(sb.limits.memory_bytes)),
        ("cpus", f"{sb.limits.cpus:g}"),
        ("pids", sb.limits.pids),
        ("network", sb.network),
        ("workdir", sb.workdir),
        ("container_id", sb.container_id or "-"),
    ]
    pairs += [(k, v) for k, v in sorted(sb.extra.items())]
    return listing(pairs)


def _print_sandbox(ctx: click.Context, sb: Sandbox) -> None:
    if settings(ctx).json:
        emit_json(sb.to_dict())
    else:
        click.echo(sb.id)


def exec_json(result: ExecResult) -> dict[str, Any]:
    """The ``exec --json`` object: text fields decoded UTF-8 (replace) plus exact base64."""
    out = result.to_dict()
    out["stdout"] = result.stdout.decode("utf-8", "replace")
    out["stderr"] = result.stderr.decode("utf-8", "replace")
    out["stdout_b64"] = base64.b64encode(result.stdout).decode("ascii")
    out["stderr_b64"] = base64.b64encode(result.stderr).decode("ascii")
    return out


# -- commands ----------------------------------------------------------------


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--socket",
    "socket_path",
    envvar="SANDBOXD_SOCKET",
    metavar="PATH",
    help="The daemon's socket [env SANDBOXD_SOCKET; default /run/sandboxd/sandboxd.sock "
    "as root, else $XDG_RUNTIME_DIR/sandboxd.sock].",
)
@click.option("--json/--no-json", "as_json", default=False,
              help="Print JSON instead of text, for any command.")
@click.version_option(__version__, prog_name=PROG)
@click.pass_context
def cli(ctx: click.Context, socket_path: str | None, as_json: bool) -> None:
    """Control sandboxd: create sandboxes, run commands in them, snapshot and remove them.

    --socket and --json go before the command or after it (the command's own
    value wins). Errors print one line, "sandboxctl: CODE: MESSAGE", on stderr
    and exit 1; usage errors exit 2.
    """
    ctx.obj = Settings(socket=socket_path or None, json=as_json)


@cli.command()
@common_options()
@click.pass_context
def ping(ctx: click.Context) -> None:
    """Check that the daemon answers."""
    reply = run(ctx, lambda c: c.ping())
    if settings(ctx).json:
        emit_json({"result": reply})
    else:
        click.echo(reply)


@cli.command()
@common_options()
@click.pass_context
def info(ctx: click.Context) -> None:
    """Show the daemon's version, engine state and who you are to it."""
    result: DaemonInfo = run(ctx, lambda c: c.info())
    if settings(ctx).json:
        emit_json(result.to_dict())
        return
    engine = (f"{result.engine.version or '?'} (reachable)" if result.engine.reachable
              else "unreachable")
    caller = result.caller
    pairs: list[tuple[str, Any]] = [
        ("version", result.version),
        ("api_version", result.api_version),
        ("engine", engine),
        ("sandboxes", result.sandboxes),
        ("uptime", _human_duration(result.uptime)),
        ("caller", f"uid={caller.uid} gid={caller.gid} pid={caller.pid}"
                   + (" (admin)" if caller.admin else "")),
    ]
    pairs += pool_pairs(result.pool)
    click.echo(listing(pairs))


def pool_pairs(pools: Mapping[str, PoolInfo]) -> list[tuple[str, str]]:
    """``info``'s lines for the warm pools: one ``pool NAME`` line each, or ``pool: none``."""
    if not pools:
        return [("pool", "none")]
    return [(f"pool {name}", f"{p.image}: {p.ready}/{p.size} ready, {p.starting} starting, "
                             f"{p.claims} claims, {p.misses} misses")
            for name, p in sorted(pools.items())]


@cli.command()
@click.option("--image", help="Image to start (default: the daemon's).")
@click.option("--name", help="A unique name, usable wherever an ID is.")
@click.option("--memory", metavar="SIZE", callback=_size_cb,
              help="Memory limit: bytes, or like 512m, 1g.")
@click.option("--cpus", type=float, help="CPU limit, e.g. 0.5 or 2.")
@click.option("--pids", type=int, help="Maximum number of processes.")
@click.option("--ttl", metavar="SECONDS", callback=_seconds_cb,
              help="Lifetime (seconds, or 90s/10m/2h); 0 = no expiry.")
@click.option("--idle-timeout", metavar="SECONDS", callback=_seconds_cb,
              help="Expire after this long without activity.")
@click.option("--env", "env", multiple=True, metavar="K=V", help="Environment (repeatable).")
@click.option("--workdir", help="Working directory inside the sandbox.")
@click.option("--label", "label", multiple=True, metavar="K=V", help="Label (repeatable).")
@click.option("--network", help="Network to attach (default: none).")
@click.option("--readonly-rootfs/--no-readonly-rootfs", default=None,
              help="Mount the root filesystem read-only.")
@click.option("--user", help="User to run as inside the sandbox.")
@click.option("--disk", metavar="SIZE", callback=_size_cb,
              help="Limit on all the sandbox writes: bytes, or like 1g.")
@click.option("--runtime", help="Container runtime where the policy allows it, e.g. runsc.")
@common_options()
@click.pass_context
def create(
    ctx: click.Context,
    image: str | None,
    name: str | None,
    memory: int | str | None,
    cpus: float | None,
    pids: int | None,
    ttl: float | None,
    idle_timeout: float | None,
    env: tuple[str, ...],
    workdir: str | None,
    label: tuple[str, ...],
    network: str | None,
    readonly_rootfs: bool | None,
    user: str | None,
    disk: int | str | None,
    runtime: str | None,
) -> None:
    """Create a sandbox and print its ID (or, with --json, the whole sandbox)."""
    env_map = _key_values(env, "--env") if env else None
    labels = _key_values(label, "--label") if label else None
    extra: dict[str, Any] = {k: v for k, v in (("disk", disk), ("runtime", runtime))
                             if v is not None}
    sb = run(ctx, lambda c: c.create(
        image=image, name=name, memory=memory, cpus=cpus, pids=pids, ttl=ttl,
        idle_timeout=idle_timeout, env=env_map, workdir=workdir, labels=labels,
        network=network, readonly_rootfs=readonly_rootfs, user=user, **extra,
    ))
    _print_sandbox(ctx, sb)


@cli.command("ls")
@click.option("--status", type=click.Choice(["creating", "running", "paused", "stopped",
                                             "error"]), help="Only sandboxes in this state.")
@click.option("--label", "label", multiple=True, metavar="K=V",
              help="Only sandboxes with this label (repeatable; all must match).")
@click.option("-q", "--quiet", is_flag=True, help="Print IDs only.")
@common_options()
@click.pass_context
def ls(ctx: click.Context, status: str | None, label: tuple[str, ...], quiet: bool) -> None:
    """List your sandboxes (all of them, for an admin)."""
    labels = _key_values(label, "--label") if label else None
    sandboxes = run(ctx, lambda c: c.list(status=status, labels=labels))
    if settings(ctx).json:
        emit_json([sb.to_dict() for sb in sandboxes])
    elif quiet:
        for sb in sandboxes:
            click.echo(sb.id)
    else:
        rows = [[sb.id, sb.name or "-", sb.status, sb.image, _ago_or_in(sb.expires_at)]
                for sb in sandboxes]
        click.echo(table(["ID", "NAME", "STATUS", "IMAGE", "EXPIRES"], rows))


@cli.command()
@click.argument("sandbox_id", metavar="ID")
@common_options()
@click.pass_context
def inspect(ctx: click.Context, sandbox_id: str) -> None:
    """Show everything about one sandbox (by ID or name)."""
    sb = run(ctx, lambda c: c.get(sandbox_id))
    if settings(ctx).json:
        emit_json(sb.to_dict())
    else:
        click.echo(_sandbox_listing(sb))


class ExecCommand(click.Command):
    """``exec [OPTIONS] ID [OPTIONS --] CMD...``.

    Everything after ID is the command (as with ``docker exec``), so
    ``sandboxctl exec ID ls -la`` works. A ``--`` right after ID is dropped.
    Options placed between ID and a ``--`` are treated as if they came
    before ID. A ``--`` inside the command itself is left alone.
    """

    def _option(self, name: str) -> click.Option | None:
        for param in self.params:
            if isinstance(param, click.Option) and name in (*param.opts, *param.secondary_opts):
                return param
        return None

    def _takes_value(self, token: str) -> bool | None:
        """Whether option ``token`` takes the next argument; None if it is none of ours."""
        name = token.split("=", 1)[0]
        option = self._option(name)
        if option is not None:
            return not option.is_flag and "=" not in token
        if not token.startswith("--") and len(token) > 2:  # a cluster of short flags: -it
            options = [self._option(f"-{c}") for c in token[1:]]
            if all(o is not None and o.is_flag for o in options):
                return False
        return None

    def _id_index(self, args: list[str]) -> int | None:
        i = 0
        while i < len(args):
            token = args[i]
            if token == "--":
                return None
            if token.startswith("-") and len(token) > 1:
                takes = self._takes_value(token)
                if takes is None:
                    return None  # unknown option: let click report it
                i += 2 if takes else 1
                continue
            return i
        return None

    def _options_end(self, rest: list[str]) -> int | None:
        """If ``rest`` is options then ``--``, the index of that ``--``."""
        i = 0
        while i < len(rest):
            token = rest[i]
            if token == "--":
                return i
            if not token.startswith("-"):
                return None
            takes = self._takes_value(token)
            if takes is None:
                return None
            i += 2 if takes else 1
        return None

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        j = self._id_index(args)
        if j is not None:
            head, sid, rest = args[:j], args[j], args[j + 1 :]
            if rest and rest[0] == "--":
                rest = rest[1:]
            elif (k := self._options_end(rest)) is not None:
                head, rest = head + rest[:k], rest[k + 1 :]
            elif rest and rest[0].startswith("-"):
                raise click.UsageError(
                    f"{rest[0]!r} is not an exec option here; put options before ID, or "
                    "between ID and '--', and the command after.", ctx)
            args = [*head, sid, *rest]
        return super().parse_args(ctx, args)


@cli.command("exec", cls=ExecCommand, context_settings={"ignore_unknown_options": True,
                                                        "allow_interspersed_args": False})
@click.argument("sandbox_id", metavar="ID")
@click.argument("cmd", nargs=-1, required=True, type=click.UNPROCESSED, metavar="-- CMD...")
@click.option("-i", "--interactive", is_flag=True,
              help="Stream sandboxctl's stdin to the command as it comes (binary-safe; its end "
              "closes the command's stdin).")
@click.option("-t", "--tty", is_flag=True,
              help="Give the command a terminal sized like yours (needs a terminal on stdin; "
              "all output is then stdout). With -i: an interactive session in raw mode.")
@click.option("-d", "--detach", is_flag=True,
              help="Start the command detached, print its exec id and return; it runs on "
              "(follow it with `sandboxctl attach`).")
@click.option("--env", "env", multiple=True, metavar="K=V", help="Environment (repeatable).")
@click.option("--workdir", help="Working directory for the command.")
@click.option("--user", help="User to run the command as.")
@click.option("--timeout", metavar="SECONDS", callback=_seconds_cb,
              help="Kill the command after this long.")
@click.option("--max-output", type=int, metavar="BYTES",
              help="Keep at most this many bytes per stream (head and tail; buffered only).")
@click.option("--stdin", "forward_stdin", is_flag=True,
              help="Read sandboxctl's stdin to its end first and pass it to the buffered "
              "command (-i streams it instead).")
@common_options()
@click.pass_context
def exec_(
    ctx: click.Context,
    sandbox_id: str,
    cmd: tuple[str, ...],
    interactive: bool,
    tty: bool,
    detach: bool,
    env: tuple[str, ...],
    workdir: str | None,
    user: str | None,
    timeout: float | None,
    max_output: int | None,
    forward_stdin: bool,
) -> None:
    """Run CMD (an argv, no shell) in sandbox ID; exit with its exit code.

    Everything after ID is the command; options go before ID, or between
    ID and a `--` that precedes CMD. Use `sh -c '...'` for shell syntax.

    Without -i, -t or -d the command runs buffered: its stdout and stderr
    are written raw to sandboxctl's stdout and stderr once it ended, and a
    timeout or truncation is noted on stderr. With --json, one object is
    printed instead: exit_code, timed_out, truncated, duration, and
    stdout/stderr decoded as UTF-8 (invalid bytes replaced) plus
    stdout_b64/stderr_b64 with the exact bytes in base64. The exit code is
    still the command's.

    With -i and/or -t the command is streamed: output is written as it
    comes, and -i sends stdin as it comes (`sandboxctl exec -i ID cat <
    file`). `-it ID sh` is an interactive shell: your terminal is in raw
    mode until it exits (every key goes to the shell, Ctrl-C included) and
    the shell's terminal follows your window's size. -d starts the command
    detached and prints its exec id (--json: {"exec_id": ...}).
    """
    streamed = interactive or tty or detach
    env_map = _key_values(env, "--env") if env else None
    if streamed:
        _check_streamed_options(ctx, interactive, tty, detach, max_output, forward_stdin)
        exit_ = _exec_streamed(ctx, sandbox_id, list(cmd), interactive=interactive, tty=tty,
                               detach=detach, env=env_map, workdir=workdir, user=user,
                               timeout=timeout)
        ctx.exit(0 if exit_ is None else _exit_status(exit_.exit_code))
    data = sys.stdin.buffer.read() if forward_stdin else None
    result: ExecResult = run(ctx, lambda c: c.exec(
        sandbox_id, list(cmd), env=env_map, workdir=workdir, user=user, stdin=data,
        timeout=timeout, max_output=max_output,
    ))
    if settings(ctx).json:
        emit_json(exec_json(result))
    else:
        sys.stdout.flush()
        sys.stdout.buffer.write(result.stdout)
        sys.stdout.buffer.flush()
        sys.stderr.flush()
        sys.stderr.buffer.write(result.stderr)
        sys.stderr.buffer.flush()
        if result.timed_out:
            _timed_out_note(result.duration)
        if result.truncated:
            click.echo(f"{PROG}: output was truncated (over --max-output bytes per stream; "
                       "the middle was cut).", err=True)
    ctx.exit(_exit_status(result.exit_code))


def _timed_out_note(duration: float) -> None:
    click.echo(f"{PROG}: the command timed out after {duration:.1f}s and was killed.", err=True)


def _check_streamed_options(ctx: click.Context, interactive: bool, tty: bool, detach: bool,
                            max_output: int | None, forward_stdin: bool) -> None:
    """Refuse the combinations a streamed exec cannot honour (usage errors, exit 2)."""
    if forward_stdin:
        raise click.UsageError("--stdin is for the buffered exec; with -i, stdin is streamed "
                               "(drop --stdin).", ctx)
    if max_output is not None:
        raise click.UsageError("--max-output applies to the buffered exec only (without -i, "
                               "-t or -d).", ctx)
    if detach and interactive:
        raise click.UsageError("-d and -i do not mix: nothing would feed a detached "
                               "command's stdin.", ctx)
    if settings(ctx).json and not detach:
        raise click.UsageError("--json needs the buffered exec (without -i or -t; use --stdin "
                               "to pass input).", ctx)
    stdin_fd = _fileno(sys.stdin)
    if tty and not detach and (stdin_fd is None or not terminal.is_terminal(stdin_fd)):
        raise Failed("not_a_tty: -t needs a terminal on stdin, and stdin is not one; "
                     "use -i alone to pipe stdin to the command.")


def _fileno(stream: Any) -> int | None:
    """The file descriptor under ``stream``, or None (a test runner's in-memory stream)."""
    try:
        fd = stream.fileno()
    except (AttributeError, OSError, ValueError):
        return None
    return fd if isinstance(fd, int) else None


def _stdio() -> tuple[int, int, int]:
    """sandboxctl's stdin, stdout and stderr descriptors, flushed, for raw byte relaying."""
    fds = (_fileno(sys.stdin), _fileno(sys.stdout), _fileno(sys.stderr))
    if fds[0] is None or fds[1] is None or fds[2] is None:
        raise Failed("client_error: a streamed command needs stdin, stdout and stderr to be "
                     "files, pipes or terminals.")
    sys.stdout.flush()
    sys.stderr.flush()
    return fds[0], fds[1], fds[2]


def _exec_streamed(
    ctx: click.Context,
    sandbox_id: str,
    cmd: list[str],
    *,
    interactive: bool,
    tty: bool,
    detach: bool,
    env: dict[str, str] | None,
    workdir: str | None,
    user: str | None,
    timeout: float | None,
) -> ExecExit | None:
    """``exec -i/-t/-d``: start it, then print its id (-d) or relay it to this terminal."""
    stdin_fd = _fileno(sys.stdin)
    size = terminal.terminal_size(stdin_fd) if tty and stdin_fd is not None else None

    def stream(c: Client) -> ExecExit | None:
        proc = c.start(sandbox_id, cmd, stdin=interactive, tty=tty, detach=detach, env=env,
                       workdir=workdir, user=user, timeout=timeout,
                       rows=size[0] if size else None, cols=size[1] if size else None)
        if detach:
            proc.close()
            if settings(ctx).json:
                emit_json({"exec_id": proc.exec_id})
            else:
                click.echo(proc.exec_id)
            return None
        in_fd, out_fd, err_fd = _stdio()
        raw = terminal.raw_mode(in_fd) if tty and interactive else contextlib.nullcontext()
        winch = terminal.SignalPipe(signal.SIGWINCH) if tty else None
        with raw, winch if winch is not None else contextlib.nullcontext():
            return relay(proc, stdin_fd=in_fd if interactive else None, stdout_fd=out_fd,
                         stderr_fd=err_fd,
                         winch_fd=winch.fileno() if winch is not None else None,
                         size=lambda: terminal.terminal_size(in_fd))

    try:
        done = run(ctx, stream)
    except KeyboardInterrupt:
        ctx.exit(130)
    if done is not None and done.timed_out:
        _timed_out_note(done.duration)
    return done


def _exit_status(code: int) -> int:
    if 0 <= code <= 255:
        return code
    return 1


def _json_line(value: Any) -> None:
    click.echo(json.dumps(value, default=_json_default, ensure_ascii=False))


@cli.command()
@click.argument("exec_id", metavar="EXEC_ID")
@click.option("--offset", type=click.IntRange(min=0), default=0, show_default=True,
              metavar="N", help="Replay the output from byte N (stdout and stderr counted "
              "together).")
@common_options("Print one JSON object per line: {offset}, one {stream, data, data_b64} per "
                "chunk, then the exit.")
@click.pass_context
def attach(ctx: click.Context, exec_id: str, offset: int) -> None:
    """Follow a detached exec until it exits; exit with its exit code.

    Its output is replayed from --offset (the daemon keeps the last 1 MiB per
    stream; when older output was dropped, a note on stderr says where the
    replay starts), then followed live, raw to stdout and stderr. Ctrl-C
    stops following: the command runs on. One connection follows an exec at
    a time: attaching takes it over.
    """
    as_json = settings(ctx).json

    def follow(c: Client) -> ExecExit:
        proc = c.attach(exec_id, offset)
        if as_json:
            _json_line({"offset": proc.offset})
            for stream, data in proc.output():
                _json_line({"stream": stream, "data": data.decode("utf-8", "replace"),
                            "data_b64": base64.b64encode(data).decode("ascii")})
            proc.wait()
            assert proc.exit is not None
            _json_line(proc.exit.to_dict())
            return proc.exit
        if proc.offset > offset:
            click.echo(f"{PROG}: output before byte {proc.offset} was dropped; replaying "
                       "from there.", err=True)
        _, out_fd, err_fd = _stdio()
        return relay(proc, stdout_fd=out_fd, stderr_fd=err_fd)

    try:
        done = run(ctx, follow)
    except KeyboardInterrupt:
        ctx.exit(130)
    if done.timed_out and not as_json:
        _timed_out_note(done.duration)
    ctx.exit(_exit_status(done.exit_code))


def _exec_status(e: ExecInfo) -> str:
    if e.running:
        return "running"
    return "exited" if e.exit_code is None else f"exited({e.exit_code})"


@cli.command()
@click.argument("sandbox_id", metavar="ID")
@common_options()
@click.pass_context
def ps(ctx: click.Context, sandbox_id: str) -> None:
    """List the streamed execs of sandbox ID (running ones, and exited ones still kept)."""
    execs = run(ctx, lambda c: c.exec_list(sandbox_id))
    if settings(ctx).json:
        emit_json([e.to_dict() for e in execs])
        return
    rows = [[e.exec_id, _exec_status(e), "yes" if e.detached else "no",
             "yes" if e.tty else "no", e.started_at or "-", shlex.join(e.cmd)] for e in execs]
    click.echo(table(["EXEC_ID", "STATUS", "DETACHED", "TTY", "STARTED", "COMMAND"], rows))


def _local_error(exc: OSError) -> Failed:
    if isinstance(exc, IsADirectoryError) and exc.filename is None:
        return Failed(f"is_a_directory: {exc}")
    if exc.filename is not None:
        return Failed(f"local_error: {exc.filename}: {exc.strerror or exc}.")
    return Failed(f"local_error: {exc}")


@cli.command()
@click.argument("source")
@click.argument("destination")
@common_options("Print {source, destination, bytes} once copied.")
@click.pass_context
def cp(ctx: click.Context, source: str, destination: str) -> None:
    """Copy one file into or out of a sandbox: cp LOCAL ID:PATH, or cp ID:PATH LOCAL.

    LOCAL `-` is stdin (or stdout). A relative PATH is relative to the
    sandbox's workdir; write a local path that has a colon as ./a:b. Into a
    directory (or a path ending in /) the file goes under its own name. Any
    size, binary-safe: the bytes go in 1 MiB pieces both ways, never whole
    in memory. Permission bits are kept; a local file is replaced only once
    it was read completely.
    """
    src, dst = transfer.parse_location(source), transfer.parse_location(destination)
    if isinstance(src, transfer.Remote) == isinstance(dst, transfer.Remote):
        raise click.UsageError("Exactly one of SOURCE and DESTINATION must be ID:PATH (a file "
                               "in a sandbox); the other is a local path, or - for stdin/stdout.",
                               ctx)
    if settings(ctx).json and dst == transfer.STDIO:
        raise click.UsageError("--json would mix with the file written to stdout.", ctx)

    def copy(c: Client) -> transfer.Copied:
        try:
            if isinstance(dst, transfer.Remote):
                assert isinstance(src, str)
                return transfer.copy_to_sandbox(c, src, dst, sys.stdin.buffer)
            assert isinstance(src, transfer.Remote)
            return transfer.copy_from_sandbox(c, src, dst, sys.stdout.buffer)
        except BrokenPipeError:
            raise
        except OSError as exc:
            raise _local_error(exc) from None

    copied = run(ctx, copy)
    if settings(ctx).json:
        emit_json({"source": copied.source, "destination": copied.destination,
                   "bytes": copied.size})


@cli.command()
@click.argument("sandbox_id", metavar="ID")
@common_options()
@click.pass_context
def pause(ctx: click.Context, sandbox_id: str) -> None:
    """Freeze every process in a sandbox."""
    _print_sandbox(ctx, run(ctx, lambda c: c.pause(sandbox_id)))


@cli.command()
@click.argument("sandbox_id", metavar="ID")
@common_options()
@click.pass_context
def resume(ctx: click.Context, sandbox_id: str) -> None:
    """Unfreeze a paused sandbox."""
    _print_sandbox(ctx, run(ctx, lambda c: c.resume(sandbox_id)))


@cli.command()
@click.argument("sandbox_id", metavar="ID")
@click.argument("ttl", callback=_seconds_cb)
@common_options()
@click.pass_context
def extend(ctx: click.Context, sandbox_id: str, ttl: float) -> None:
    """Keep a sandbox alive: its deadline becomes now + TTL (seconds, or 10m/2h)."""
    sb = run(ctx, lambda c: c.extend(sandbox_id, ttl))
    if settings(ctx).json:
        emit_json(sb.to_dict())
    else:
        click.echo(f"{sb.id} expires {_ago_or_in(sb.expires_at)}"
                   + (f" ({sb.expires_at})" if sb.expires_at else ""))


@cli.command()
@click.argument("sandbox_id", metavar="ID")
@common_options()
@click.pass_context
def stats(ctx: click.Context, sandbox_id: str) -> None:
    """Show a sandbox's CPU, memory, process and network usage."""
    s: Stats = run(ctx, lambda c: c.stats(sandbox_id))
    if settings(ctx).json:
        emit_json(s.to_dict())
        return
    click.echo(listing([
        ("cpu", f"{s.cpu_percent:.1f}%"),
        ("memory", f"{_human_bytes(s.memory_bytes)} / {_human_bytes(s.memory_limit_bytes)}"),
        ("pids", s.pids),
        ("net_rx", _human_bytes(s.net_rx_bytes)),
        ("net_tx", _human_bytes(s.net_tx_bytes)),
    ]))


@cli.command()
@click.argument("sandbox_ids", metavar="ID...", nargs=-1, required=True)
@click.option("-f", "--force", is_flag=True, help="Do not fail on sandboxes that do not exist.")
@common_options("Print a JSON array: one {id, removed, error} object per ID.")
@click.pass_context
def rm(ctx: click.Context, sandbox_ids: tuple[str, ...], force: bool) -> None:
    """Stop and remove sandboxes; print each ID removed.

    Every ID is attempted; if any failed, exit 1 after reporting each failure.
    """
    _remove_each(ctx, sandbox_ids, force, lambda c, sid: c.remove(sid), key="id")


def _remove_each(ctx: click.Context, names: Sequence[str], force: bool,
                 remove: Callable[[Client, str], None], *, key: str) -> None:
    """Remove each of ``names``, print each one removed, report each failure, exit 1 if any.

    ``force`` counts a ``not_found`` as removed. With --json, one array of
    ``{<key>, removed, error}`` objects.
    """

    def remove_all(c: Client) -> list[tuple[str, SandboxdError | None]]:
        outcome: list[tuple[str, SandboxdError | None]] = []
        for name in names:
            try:
                remove(c, name)
                outcome.append((name, None))
            except NotFound as err:
                outcome.append((name, None if force else err))
            except ConnectionLost:
                raise
            except SandboxdError as err:
                outcome.append((name, err))
        return outcome

    outcome = run(ctx, remove_all)
    if settings(ctx).json:
        emit_json([{key: name, "removed": err is None,
                    "error": None if err is None else {"code": err.code, "message": err.message}}
                   for name, err in outcome])
    failed = False
    for name, err in outcome:
        if err is None:
            if not settings(ctx).json:
                click.echo(name)
        else:
            failed = True
            click.echo(f"{PROG}: {_error_line(err)}", err=True)
    if failed:
        ctx.exit(1)


@cli.command()
@click.argument("sandbox_id", metavar="SANDBOX")
@click.argument("ref", required=False)
@common_options("Print {ref, id} as JSON.")
@click.pass_context
def snapshot(ctx: click.Context, sandbox_id: str, ref: str | None) -> None:
    """Save a sandbox's filesystem as an image; print its reference.

    REF is NAME or NAME:TAG (lowercase letters, digits, '.', '_', '-'); the
    image is sandboxd-snapshot/u<UID>/NAME:TAG (by default NAME is the
    sandbox's name and TAG a timestamp). `sandboxctl create --image REF`
    starts a copy of the sandbox; `sandboxctl image rm REF` removes it.
    """
    snap: Snapshot = run(ctx, lambda c: c.snapshot(sandbox_id, ref))
    if settings(ctx).json:
        emit_json(snap.to_dict())
    else:
        click.echo(snap.ref)


# -- images ------------------------------------------------------------------


@cli.group()
@common_options()
def image() -> None:
    """List, pull and remove images (remove: your snapshots only)."""


def _short_id(image_id: str) -> str:
    """An image id as ``docker images`` shows it: 12 hex digits, without ``sha256:``."""
    return image_id.removeprefix("sha256:")[:12]


@image.command("ls")
@common_options()
@click.pass_context
def image_ls(ctx: click.Context) -> None:
    """List the images you may use and your snapshots (all images, for an admin)."""
    images: list[ImageInfo] = run(ctx, lambda c: c.images())
    if settings(ctx).json:
        emit_json([i.to_dict() for i in images])
        return
    rows = [[i.ref, _short_id(i.id), _human_bytes(i.size), _ago(i.created_at)] for i in images]
    click.echo(table(["REF", "ID", "SIZE", "CREATED"], rows))


_LAYER_DOWNLOADED = frozenset({"Verifying Checksum", "Download complete", "Extracting",
                               "Pull complete", "Already exists"})
_LAYER_DONE = frozenset({"Pull complete", "Already exists"})
_LAYER_WAITING = frozenset({"Pulling fs layer", "Waiting", "Downloading", "Verifying Checksum",
                            "Retrying"})


@dataclass
class _Layer:
    status: str = ""
    total: int | None = None  # bytes (compressed), once the engine said
    downloaded: int = 0
    extracted: int = 0


@dataclass
class PullView:
    """One pull as its progress events tell it: per layer, summed up for one bar.

    ``update(progress)`` takes each event and returns the plain line to print
    when its status is new for its layer (``None`` for a mere byte count);
    ``bar(width)`` is the one-line summary redrawn on a terminal: phase, a
    bar of the layers' bytes downloaded and then extracted (each half the
    way), bytes downloaded of their total, layers complete. Events may be
    dropped on the way (the daemon sends at most ~10 a second), so nothing
    here relies on seeing every step; ``finish()`` marks the pull done.
    """

    ref: str
    layers: dict[str, _Layer] = field(default_factory=dict)
    status: str = ""  # the pull's own latest status ("Pulling from ...", "Digest: ...")
    done: bool = False
    _shown: dict[str | None, str] = field(default_factory=dict)

    @staticmethod
    def _is_layer(p: PullProgress) -> bool:
        # The pull's own lines carry no id, or the tag ("latest: Pulling from library/x").
        return p.id is not None and not p.status.startswith("Pulling from")

    def update(self, p: PullProgress) -> str | None:
        """Take one progress event; the line to print if its status changed, else None."""
        if self._is_layer(p):
            assert p.id is not None
            layer = self.layers.setdefault(p.id, _Layer())
            layer.status = p.status
            if p.total:
                layer.total = max(p.total, layer.total or 0)
            if p.status == "Downloading" and p.current is not None:
                layer.downloaded = p.current
            elif p.status in _LAYER_DOWNLOADED:
                layer.downloaded = layer.total or layer.downloaded
            if p.status == "Extracting" and p.current is not None:
                layer.extracted = p.current
            elif p.status in _LAYER_DONE:
                layer.extracted = layer.total or layer.extracted
        elif p.status:
            self.status = p.status
        if not p.status or self._shown.get(p.id) == p.status:
            return None
        self._shown[p.id] = p.status
        return f"{p.id}: {p.status}" if p.id else p.status

    def finish(self) -> None:
        """The pull is over: every layer is complete."""
        self.done = True
        for layer in self.layers.values():
            layer.status = "Pull complete"
            layer.downloaded = layer.extracted = layer.total or 0

    def totals(self) -> tuple[int, int]:
        """Bytes downloaded and to download, over the layers whose size is known."""
        sized = [la for la in self.layers.values() if la.total]
        return (sum(min(la.downloaded, la.total or 0) for la in sized),
                sum(la.total or 0 for la in sized))

    def fraction(self) -> float:
        """How far the pull is, 0 to 1: download then extraction, weighed by layer size."""
        if self.done:
            return 1.0
        sized = [la for la in self.layers.values() if la.total]
        whole = sum(la.total or 0 for la in sized)
        if not whole:
            return 0.0
        got = sum(min(la.downloaded, la.total or 0) + min(la.extracted, la.total or 0)
                  for la in sized)
        return min(1.0, got / (2 * whole))

    def phase(self) -> str:
        if self.done:
            return "pulled"
        statuses = [la.status for la in self.layers.values()]
        if any(s in _LAYER_WAITING for s in statuses):
            return "downloading"
        if any(s not in _LAYER_DONE for s in statuses):
            return "extracting"
        return "pulling"

    def bar(self, width: int = 80) -> str:
        """The one-line summary, at most ``width`` characters."""
        got, whole = self.totals()
        complete = sum(1 for la in self.layers.values() if la.status in _LAYER_DONE)
        fraction = self.fraction()
        tail = (f" {fraction * 100:3.0f}%"
                + (f" {_human_bytes(got)}/{_human_bytes(whole)}" if whole else "")
                + (f" {complete}/{len(self.layers)} layers" if self.layers else ""))
        phase = f"{self.phase():<11}"  # padded: the bar stays put as the phase changes
        room = width - len(phase) - len(tail) - 4  # for the ref and the bar's cells
        cells = max(10, min(30, room - len(self.ref)))
        ref = self.ref
        if len(ref) > room - cells:  # a long ref is cut, never the bar or the numbers
            keep = room - cells - 1
            ref = ref[:keep] + "~" if keep > 0 else ""
        filled = int(fraction * cells)
        return f"{phase} {ref} [{'#' * filled}{'-' * (cells - filled)}]{tail}"[:width]


class _Redraw:
    """One terminal line rewritten in place with ``\r`` (padded over the previous text)."""

    def __init__(self) -> None:
        self.width = 0

    def draw(self, text: str) -> None:
        click.echo("\r" + text.ljust(self.width), nl=False)
        self.width = len(text)

    def end(self) -> None:
        if self.width:
            click.echo()
            self.width = 0


def _stdout_is_terminal() -> bool:
    fd = _fileno(sys.stdout)
    return fd is not None and terminal.is_terminal(fd)


@image.command("pull")
@click.argument("ref")
@common_options("Print only the result, {ref, id, pulled}, as JSON.")
@click.pass_context
def image_pull(ctx: click.Context, ref: str) -> None:
    """Make sure image REF is present, pulling it when missing.

    On a terminal a progress bar is redrawn on one line; otherwise one line
    is printed per status change of each layer (as `docker pull` does).
    Then the reference, the image id, and whether it had to be pulled.
    Ctrl-C stops waiting; the daemon finishes the pull regardless.
    """
    as_json = settings(ctx).json
    on_tty = not as_json and _stdout_is_terminal()
    view = PullView(ref)
    line = _Redraw()

    def show(progress: PullProgress) -> None:
        changed = view.update(progress)
        if on_tty:
            line.draw(view.bar(shutil.get_terminal_size().columns - 1))
        elif changed is not None:
            click.echo(changed)

    try:
        result: EnsureResult = run(ctx, lambda c: c.ensure_image(
            ref, on_progress=None if as_json else show))
    except KeyboardInterrupt:
        line.end()
        click.echo(f"{PROG}: stopped waiting; the daemon finishes the pull.", err=True)
        ctx.exit(130)
    except BaseException:
        line.end()
        raise
    if line.width:
        view.finish()
        line.draw(view.bar(shutil.get_terminal_size().columns - 1))
        line.end()
    if as_json:
        emit_json(result.to_dict())
        return
    click.echo(listing([
        ("ref", result.ref),
        ("id", result.id),
        ("pulled", "yes" if result.pulled else "no (already present)"),
    ]))


@image.command("rm")
@click.argument("refs", metavar="REF...", nargs=-1, required=True)
@click.option("-f", "--force", is_flag=True, help="Do not fail on images that do not exist.")
@common_options("Print a JSON array: one {ref, removed, error} object per REF.")
@click.pass_context
def image_rm(ctx: click.Context, refs: tuple[str, ...], force: bool) -> None:
    """Remove snapshots of yours (an admin: anyone's); print each REF removed.

    Only snapshots are removed through sandboxd: any other image is
    not_found to you (permission_denied to an admin). Every REF is
    attempted; if any failed, exit 1 after reporting each failure.
    """
    _remove_each(ctx, refs, force, lambda c, ref: c.remove_image(ref), key="ref")


def _event_value(value: Any) -> str:
    """A data value for ``key=value``: plain when that is unambiguous, else JSON."""
    if isinstance(value, (bytes, bytearray)):
        value = bytes(value).decode("utf-8", "replace")
    if isinstance(value, str):
        if not value or any(c.isspace() or c in "\"=" for c in value):
            return json.dumps(value, ensure_ascii=False)
        return value
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e15:
        return str(int(value))
    return json.dumps(value, default=_json_default, ensure_ascii=False, separators=(",", ":"))


def event_line(ev: Event) -> str:
    """``SEQ TIME TYPE SANDBOX key=value ...``: one readable line per event."""
    sandbox = ev.sandbox_id or "-"
    if ev.sandbox_name and ev.sandbox_name != ev.sandbox_id:
        sandbox = f"{sandbox}({ev.sandbox_name})"
    pairs = " ".join(f"{k}={_event_value(v)}" for k, v in ev.data.items())
    return f"{ev.seq} {ev.time} {ev.type} {sandbox}" + (f" {pairs}" if pairs else "")


@cli.command()
@click.option("--type", "types", multiple=True, metavar="TYPE",
              help="Only this event type, or a prefix like 'sandbox.*' (repeatable).")
@click.option("--sandbox", "sandbox_id", metavar="ID", help="Only events of this sandbox (ID "
              "or name).")
@click.option("--label", "label", multiple=True, metavar="K=V",
              help="Only events of sandboxes with this label (repeatable; all must match).")
@click.option("--since", type=click.IntRange(min=0), metavar="SEQ",
              help="First replay the retained events after SEQ.")
@common_options("Print one JSON object per line.")
@click.pass_context
def events(ctx: click.Context, types: tuple[str, ...], sandbox_id: str | None,
           label: tuple[str, ...], since: int | None) -> None:
    """Follow the daemon's events until Ctrl-C, one line each: SEQ TIME TYPE SANDBOX DATA.

    A lost connection or a cut-off is repaired by resubscribing from the last
    event shown, so nothing the daemon still retains is missed or repeated.
    """
    labels = _key_values(label, "--label") if label else None
    as_json = settings(ctx).json

    def follow(c: Client) -> bool:
        stream = c.events(types=list(types) or None, sandbox=sandbox_id, labels=labels,
                          since=since)
        with stream:
            for ev in stream:
                line = (json.dumps(ev.to_dict(), default=_json_default, ensure_ascii=False)
                        if as_json else event_line(ev))
                try:
                    click.echo(line)
                except BrokenPipeError:
                    return False  # ``sandboxctl events | head``: the reader is gone
        return True

    try:
        if not run(ctx, follow):
            raise BrokenPipeError  # main() exits quietly
    except KeyboardInterrupt:
        ctx.exit(0)


def main(argv: Sequence[str] | None = None) -> NoReturn:
    """The ``sandboxctl`` console script."""
    try:
        cli.main(args=list(argv) if argv is not None else None, prog_name=PROG)
    except BrokenPipeError:
        # stdout closed early (``sandboxctl ls | head``): exit quietly.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        sys.exit(1)
    sys.exit(0)  # pragma: no cover - cli.main always exits


if __name__ == "__main__":  # pragma: no cover
    main()
