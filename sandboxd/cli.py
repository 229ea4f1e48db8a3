"""The ``sandboxd`` command line: ``sandboxd serve [--socket PATH] [--config FILE]``.

Owns flag parsing, loading the configuration (one clear line and exit 2 on
a bad one), logging set-up, running the event loop, and how the process
ends: a start-up failure is one line on stderr and exit 1 (never a
traceback), an unexpected failure later is logged (with its traceback, in
the log) and exit 1, and every log line written before any exit reaches
stdout. It must not contain daemon logic.
"""

from __future__ import annotations

import asyncio
import sys

import click
import structlog

from sandboxd.config import ConfigError, load_config
from sandboxd.logsetup import configure_logging, flush_logs
from sandboxd.rpc.server import StartupError
from sandboxd.wire.version import __version__


@click.group()
@click.version_option(__version__, prog_name="sandboxd")
def main() -> None:
    """sandboxd: a host daemon that owns Docker containers used as sandboxes."""


@main.command()
@click.option("--socket", "socket_path", metavar="PATH", help="Unix socket to serve on.")
@click.option(
    "--config", "config_path", metavar="FILE", help="TOML config file ($SANDBOXD_CONFIG)."
)
@click.option("--state-dir", metavar="DIR", help="State directory.")
@click.option("--engine-url", metavar="URL", help="Docker Engine URL (default: $DOCKER_HOST).")
@click.option("--log-level", type=click.Choice(["debug", "info", "warning", "error"]))
@click.option("--log-format", type=click.Choice(["auto", "json", "console"]))
@click.option(
    "--cleanup-on-exit",
    is_flag=True,
    default=None,
    help="Remove every sandbox when the daemon stops (default: leave them running).",
)
def serve(
    socket_path: str | None,
    config_path: str | None,
    state_dir: str | None,
    engine_url: str | None,
    log_level: str | None,
    log_format: str | None,
    cleanup_on_exit: bool | None,
) -> None:
    """Run the daemon until SIGTERM or SIGINT."""
    try:
        config = load_config(
            config_path,
            overrides={
                "socket": socket_path,
                "state_dir": state_dir,
                "engine_url": engine_url,
                "log_level": log_level,
                "log_format": log_format,
                "cleanup_on_exit": cleanup_on_exit,
            },
        )
    except ConfigError as exc:
        click.echo(f"sandboxd: config error: {exc}", err=True)
        sys.exit(2)
    configure_logging(config.log_level, config.log_format)
    try:
        from sandboxd.daemon import serve as run  # imported late: aiodocker is heavy

        code = asyncio.run(run(config))
    except StartupError as exc:
        flush_logs()
        click.echo(f"sandboxd: cannot start: {exc}", err=True)
        sys.exit(1)
    except Exception as exc:
        structlog.get_logger("sandboxd").exception("daemon_failed")
        flush_logs()
        click.echo(f"sandboxd: stopped by an unexpected error: {type(exc).__name__}: {exc}",
                   err=True)
        sys.exit(1)
    finally:
        flush_logs()
    sys.exit(code)


if __name__ == "__main__":  # pragma: no cover
    main()
