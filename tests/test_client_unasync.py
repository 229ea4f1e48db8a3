"""The blocking API is generated from the asyncio one: ``client/_sync/`` must match ``_async/``.

Regenerating into a temporary directory must give exactly the committed
files (so nobody edits ``client/_sync/`` by hand), ``--check`` must say so by
its exit status, and the generated side must not touch asyncio.
"""

from __future__ import annotations

import ast
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.pure

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "unasync.py"
ASYNC = ROOT / "client" / "_async"
SYNC = ROOT / "client" / "_sync"


def unasync(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True,
                          timeout=60, cwd=ROOT)


def generated_names() -> set[str]:
    return {p.name for p in ASYNC.glob("*.py")} - {"_compat.py"}


def test_committed_sync_files_are_exactly_what_the_generator_writes(tmp_path: Path) -> None:
    out = tmp_path / "sync"
    proc = unasync("--dst", str(out))
    assert proc.returncode == 0, proc.stderr
    written = {p.name for p in out.glob("*.py")}
    assert written == generated_names()
    for name in sorted(written):
        assert (SYNC / name).read_text() == (out / name).read_text(), (
            f"client/_sync/{name} differs from what scripts/unasync.py generates: edit "
            f"client/_async/{name} and run `python scripts/unasync.py`")
    committed = {p.name for p in SYNC.glob("*.py")} - {"_compat.py"}
    assert committed == written, "client/_sync/ has files the generator does not write"


def test_check_exits_1_when_out_of_date(tmp_path: Path) -> None:
    assert unasync("--check").returncode == 0
    dst = tmp_path / "sync"
    shutil.copytree(SYNC, dst)
    assert unasync("--check", "--dst", str(dst)).returncode == 0
    client = dst / "client.py"
    client.write_text(client.read_text() + "\n# a hand edit\n")
    proc = unasync("--check", "--dst", str(dst))
    assert proc.returncode == 1
    assert "client.py is out of date" in proc.stderr
    (dst / "stray.py").write_text("")
    client.unlink()
    assert unasync("--check", "--dst", str(dst)).returncode == 1
    assert unasync("--dst", str(dst)).returncode == 0  # regenerating repairs it
    assert unasync("--check", "--dst", str(dst)).returncode == 0
    assert not (dst / "stray.py").exists() and (dst / "_compat.py").exists()


def test_generated_files_say_so_and_use_no_asyncio() -> None:
    for name in sorted(generated_names()):
        text = (SYNC / name).read_text()
        assert text.startswith("# GENERATED FILE: do not edit."), name
        tree = ast.parse(text)
        for node in ast.walk(tree):
            assert not isinstance(node, (ast.AsyncFunctionDef, ast.Await, ast.AsyncWith,
                                         ast.AsyncFor)), f"{name}:{node.lineno}"
            if isinstance(node, ast.Import):
                assert all(a.name != "asyncio" for a in node.names), name
            if isinstance(node, ast.ImportFrom):
                assert node.module != "asyncio", name
        assert re.search(r"\bAsync[A-Z]|\bawait\b|\basync (def|with|for)\b", text) is None, name
    compat = (SYNC / "_compat.py").read_text()
    assert "import asyncio" not in compat and "import threading" not in compat


def test_rules_rewrite_the_async_tokens() -> None:
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        import unasync as tool  # type: ignore[import-not-found]
    finally:
        sys.path.remove(str(SCRIPT.parent))
    src = (
        "from collections.abc import AsyncIterator, Callable\n"
        "from ..connection import AsyncChannel, AsyncConnection, DEFAULT\n"
        "__all__ = [\"AsyncSandbox\", \"AsyncClient\"]\n"
        "class AsyncThing:\n"
        "    async def __aenter__(self) -> AsyncThing:\n"
        "        async with x, y:\n"
        "            async for i in await z():  # noqa: ASYNC100 - why\n"
        "                await self.aclose()\n"
        "        raise StopAsyncIteration\n"
        "    def __aiter__(self) -> AsyncIterator[int]: ...\n"
        "    async def __anext__(self) -> int: return await anext(it)\n"
        "    async def __aexit__(self) -> None: ...\n"
    )
    assert tool.unasync_source(src) == (
        "from collections.abc import Callable, Iterator\n"
        "from ..connection import DEFAULT, BlockingChannel, BlockingConnection\n"
        "__all__ = [\"BlockingSandbox\", \"Client\"]\n"
        "class BlockingThing:\n"
        "    def __enter__(self) -> BlockingThing:\n"
        "        with x, y:\n"
        "            for i in z():\n"
        "                self.close()\n"
        "        raise StopIteration\n"
        "    def __iter__(self) -> Iterator[int]: ...\n"
        "    def __next__(self) -> int: return next(it)\n"
        "    def __exit__(self) -> None: ...\n"
    )
