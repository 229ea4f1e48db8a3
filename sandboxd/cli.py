"""The ``sandboxd`` command line: ``sandboxd serve [--socket PATH] [--config FILE]``.

Owns flag parsing, loading the configuration (one clear line and exit 2 on
a bad one), logging set-up and running the event loop. It must not contain
daemon logic.
"""

from __future__ import annotations

import asyncio
import sys

import click

from . import __version__
from .config import ConfigError, load_config
from .logsetup import configure_logging, flush_logs
from .server import StartupError


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
    from .daemon import serve as run  # imported late: aiodocker is heavy

    try:
        code = asyncio.run(run(config))
    except StartupError as exc:
        flush_logs()
        click.echo(f"sandboxd: cannot start: {exc}", err=True)
        sys.exit(1)
    flush_logs()
    sys.exit(code)


if __name__ == "__main__":  # pragma: no cover
    main()
