"""Build the agent binary from ``src/``: ``build(out_dir) -> Path`` and a command line.

    python -m sandboxd.agent.build [--out DIR] [--target x86_64|aarch64|all] [--force]

Toolchain, in order of preference: the ``ziglang`` PyPI package (``python -m ziglang cc``,
hermetic, cross-compiles both architectures against musl), else ``musl-gcc`` (this machine's
architecture only). The result is a static, stripped binary
``<out>/sandboxd-agent-<arch>`` (default out: ``sandboxd/agent/bin``, git-ignored). It is
rebuilt only when a source, the flags or the toolchain changed (a hash stamp beside it).

Owns only the build: no Docker, no asyncio, no other sandboxd import.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from sandboxd.agent import ARCHES, BIN_DIR, PACKAGE_DIR, binary_name, host_arch, normalize_arch

SRC_DIR = PACKAGE_DIR / "src"
CFLAGS = (
    "-std=gnu11", "-O2", "-Wall", "-Wextra", "-Werror",
    "-fstack-protector-strong", "-ffunction-sections", "-fdata-sections",
    "-fno-asynchronous-unwind-tables", "-static", "-s", "-Wl,--gc-sections",
)
INSTALL_HINT = (
    "no C toolchain for the sandboxd agent: install the `ziglang` Python package "
    "(pip install ziglang) or musl-gcc (apt-get install musl-tools)"
)


class BuildError(RuntimeError):
    """The agent could not be built."""


def sources() -> list[Path]:
    return sorted(p for p in SRC_DIR.iterdir() if p.suffix in (".c", ".h"))


def compiler(arch: str) -> list[str]:
    """The C compiler command for ``arch``; BuildError when none fits."""
    if importlib.util.find_spec("ziglang") is not None:
        return [sys.executable, "-m", "ziglang", "cc", "-target", f"{arch}-linux-musl"]
    musl = shutil.which("musl-gcc")
    if musl and arch == host_arch():
        return [musl]
    if musl:
        raise BuildError(f"musl-gcc builds for {host_arch()} only: install the `ziglang` "
                         f"Python package to build the agent for {arch}")
    raise BuildError(INSTALL_HINT)


def _toolchain_id(cc: list[str]) -> str:
    """What identifies the compiler: ziglang's version, or musl-gcc's resolved path."""
    if cc[0] == sys.executable:
        try:
            return "ziglang " + importlib.metadata.version("ziglang")
        except importlib.metadata.PackageNotFoundError:
            return "ziglang"
    return str(Path(cc[0]).resolve())


def _stamp(cc: list[str]) -> str:
    digest = hashlib.sha256()
    digest.update("\0".join([_toolchain_id(cc), *cc[1:], *CFLAGS]).encode())
    for path in sources():
        digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


def build(out_dir: Path | str | None = None, arch: str | None = None,
          force: bool = False) -> Path:
    """Build (when stale) the agent for ``arch`` (default: this machine's) into ``out_dir``."""
    arch = normalize_arch(arch) if arch else host_arch()
    out = Path(out_dir) if out_dir is not None else BIN_DIR
    out.mkdir(parents=True, exist_ok=True)
    target = out / binary_name(arch)
    stamp_file = out / f".{binary_name(arch)}.stamp"
    cc = compiler(arch)
    stamp = _stamp(cc)
    if (not force and target.is_file() and stamp_file.is_file()
            and stamp_file.read_text().strip() == stamp):
        return target
    c_files = [str(p) for p in sources() if p.suffix == ".c"]
    fd, tmp = tempfile.mkstemp(prefix=f".{binary_name(arch)}.", dir=out)
    os.close(fd)
    try:
        proc = subprocess.run([*cc, *CFLAGS, "-o", tmp, *c_files], capture_output=True,
                              text=True, cwd=SRC_DIR)
        if proc.returncode != 0:
            raise BuildError(f"building the agent for {arch} failed:\n{proc.stderr.strip()}")
        os.chmod(tmp, 0o755)
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    stamp_file.write_text(stamp + "\n")
    return target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sandboxd.agent.build",
                                     description="Build the sandboxd agent binary.")
    parser.add_argument("--out", type=Path, default=None,
                        help=f"output directory (default: {BIN_DIR})")
    parser.add_argument("--target", default=None, choices=[*ARCHES, "all"],
                        help="architecture (default: this machine's)")
    parser.add_argument("--force", action="store_true", help="rebuild even when up to date")
    args = parser.parse_args(argv)
    arches = list(ARCHES) if args.target == "all" else [args.target or host_arch()]
    try:
        for arch in arches:
            print(build(args.out, arch, force=args.force))
    except (BuildError, ValueError) as exc:
        print(f"sandboxd.agent.build: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
