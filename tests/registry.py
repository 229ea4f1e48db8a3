"""A real image registry on 127.0.0.1 for the pull tests (Debian's ``docker-registry``).

``local_registry()`` starts ``docker-registry serve`` on a free loopback port
with its storage in a temporary directory, waits for its ``/v2/`` endpoint,
and on exit stops it and deletes the storage. ``push_image`` puts a local
image into it under a test reference and removes the local tag again, so
that the engine has to pull it. The engine treats 127.0.0.0/8 registries as
insecure (plain HTTP) by default, so no engine configuration is needed.
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import socket
import subprocess
import tarfile
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

START_TIMEOUT = 30.0


@dataclass(frozen=True)
class Registry:
    host: str  # "127.0.0.1:PORT"
    root: Path

    def ref(self, name: str, tag: str = "latest") -> str:
        return f"{self.host}/{name}:{tag}"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _docker(*args: str) -> str:
    proc = subprocess.run(["docker", *args], capture_output=True, text=True, timeout=120)
    if proc.returncode != 0:
        raise RuntimeError(f"docker {' '.join(args)} failed: {proc.stderr.strip()}")
    return proc.stdout


@contextlib.contextmanager
def local_registry() -> Iterator[Registry]:
    exe = shutil.which("docker-registry")
    if exe is None:
        raise RuntimeError("docker-registry is not installed: run scripts/setup.sh")
    root = Path(tempfile.mkdtemp(prefix="sbd-registry-"))
    port = _free_port()
    config = root / "config.yml"
    config.write_text(
        "version: 0.1\n"
        "log:\n  level: warn\n"
        f"storage:\n  filesystem:\n    rootdirectory: {root / 'data'}\n"
        "  delete:\n    enabled: true\n"
        f"http:\n  addr: 127.0.0.1:{port}\n"
    )
    log = open(root / "registry.log", "ab")
    proc = subprocess.Popen([exe, "serve", str(config)], stdout=log, stderr=log,
                            stdin=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/", timeout=2):
                    break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(
                        "docker-registry did not start: "
                        + (root / "registry.log").read_text(errors="replace")[-2000:]
                    ) from None
                time.sleep(0.1)
        yield Registry(f"127.0.0.1:{port}", root)
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
        shutil.rmtree(root, ignore_errors=True)


def push_image(registry: Registry, source: str, name: str, tag: str = "latest") -> str:
    """Push local image ``source`` to ``registry`` as ``name:tag`` and drop the local tag;
    the reference to pull."""
    ref = registry.ref(name, tag)
    _docker("tag", source, ref)
    try:
        _docker("push", ref)
    finally:
        _docker("rmi", ref)
    return ref


def make_unique_image(tag: str, size: int = 4 << 20) -> str:
    """A local image whose one layer holds ``size`` random bytes, so no other image shares
    it and a pull really downloads (and reports progress); its id."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        info = tarfile.TarInfo("blob")
        info.size = size
        tar.addfile(info, io.BytesIO(os.urandom(size)))
    proc = subprocess.run(["docker", "import", "-", tag], input=buf.getvalue(),
                          capture_output=True, timeout=120)
    if proc.returncode != 0:
        raise RuntimeError(f"docker import failed: {proc.stderr.decode(errors='replace')}")
    return proc.stdout.decode().strip()
