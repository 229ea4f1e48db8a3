"""The in-sandbox agent: its C sources, their build, and the daemon side's frame codec.

Owns: ``src/`` (the static C program that runs as PID 1 of every sandbox container and serves
execs and files over the container's attach stream, see ``PROTOCOL.md``), ``build.py`` (builds
``bin/sandboxd-agent-<arch>`` from those sources), ``frames.py`` (the pure codec the daemon
uses to talk to the agent) and :func:`agent_binary` (where the built binary is).

Must not: use asyncio, talk to Docker, do channel I/O, or import any other ``sandboxd``
subpackage. The daemon's channel logic (attach, handshake, flow control, fallback) lives
elsewhere and depends on this package, never the other way round.
"""

from __future__ import annotations

import platform
from pathlib import Path

__all__ = ["ARCHES", "AgentMissing", "agent_binary", "binary_name", "host_arch"]

PACKAGE_DIR = Path(__file__).resolve().parent
BIN_DIR = PACKAGE_DIR / "bin"
ARCHES = ("x86_64", "aarch64")
_ALIASES = {"x86_64": "x86_64", "amd64": "x86_64", "aarch64": "aarch64", "arm64": "aarch64"}


class AgentMissing(FileNotFoundError):
    """The agent binary has not been built."""


def host_arch() -> str:
    """This machine's architecture as the agent names it (x86_64 or aarch64)."""
    return normalize_arch(platform.machine())


def normalize_arch(arch: str) -> str:
    """x86_64 / amd64 -> x86_64, aarch64 / arm64 -> aarch64; ValueError for others."""
    try:
        return _ALIASES[arch.lower()]
    except KeyError:
        raise ValueError(f"unsupported architecture {arch!r} (the agent supports "
                         f"{', '.join(ARCHES)})") from None


def binary_name(arch: str) -> str:
    return f"sandboxd-agent-{normalize_arch(arch)}"


def agent_binary(arch: str | None = None) -> Path:
    """The built agent binary for ``arch`` (default: this machine's).

    Raises AgentMissing, naming the build command, when it has not been built.
    """
    arch = normalize_arch(arch) if arch else host_arch()
    path = BIN_DIR / binary_name(arch)
    if not path.is_file():
        raise AgentMissing(
            f"the sandboxd agent for {arch} is not built ({path} is missing): run "
            f"`python -m sandboxd.agent.build --target {arch}`"
        )
    return path
