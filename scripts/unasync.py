#!/usr/bin/env python3
"""Generate the blocking client API (``client/_sync/``) from the asyncio one (``client/_async/``).

This script owns the unasync rewrite (the approach of httpcore and urllib3):
each module of ``client/_async/`` except the hand-written ``_compat.py`` is
rewritten token by token (``async def`` -> ``def``, ``await x`` -> ``x``,
``__aenter__`` -> ``__enter__``, ``AsyncConnection`` ->
``BlockingConnection``, ...), its ``from ... import`` lists and ``__all__``
are re-sorted the way ruff wants them, and it is written to ``client/_sync/``
under a header that says it is generated. It must not change anything else: what
differs between the sides beyond these rules belongs in each side's
``_compat.py``.

    python scripts/unasync.py            # regenerate client/_sync/
    python scripts/unasync.py --check    # exit 1 if client/_sync/ is out of date
    python scripts/unasync.py --dst DIR  # write elsewhere (the tests compare)
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SRC = ROOT / "client" / "_async"
DST = ROOT / "client" / "_sync"
HAND_WRITTEN = frozenset({"_compat.py"})
LINE_LENGTH = 100

HEADER = (
    "# GENERATED FILE: do not edit. Written by scripts/unasync.py from client/_async/{name};\n"
    "# edit that file and run `python scripts/unasync.py` (a test fails when they differ).\n"
)

# (pattern, replacement), applied in order; patterns match whole words.
RULES: list[tuple[str, str]] = [
    (r"[ \t]*# noqa: ASYNC\d+[^\n]*", ""),  # async-only lint exemptions
    (r"\basync def\b", "def"),
    (r"\basync with\b", "with"),
    (r"\basync for\b", "for"),
    (r"\bawait ", ""),
    (r"\b__aenter__\b", "__enter__"),
    (r"\b__aexit__\b", "__exit__"),
    (r"\b__aiter__\b", "__iter__"),
    (r"\b__anext__\b", "__next__"),
    (r"\bStopAsyncIteration\b", "StopIteration"),
    (r"\bAsyncIterator\b", "Iterator"),
    (r"\bAsyncIterable\b", "Iterable"),
    (r"\bAsyncGenerator\b", "Generator"),
    (r"\baclose\b", "close"),
    (r"\banext\b", "next"),
    (r"\baiter\b", "iter"),
    (r"\bAsyncClient\b", "Client"),
    (r"\bAsync([A-Z]\w*)", r"Blocking\1"),  # AsyncSandbox -> BlockingSandbox, ...
    (r"\b_async\b", "_sync"),
    (r"\basynchronous\b", "blocking"),
    (r"\bAsynchronous\b", "Blocking"),
]
_COMPILED = [(re.compile(pattern), replacement) for pattern, replacement in RULES]

# No asyncio in the shared sources: it goes through _compat.
_FORBIDDEN = re.compile(r"^\s*(import asyncio|from asyncio\b)", re.MULTILINE)

_FROM_IMPORT = re.compile(
    r"^(?P<indent>[ \t]*)from (?P<module>[\w.]+) import "
    r"(?:\((?P<block>[^)]*)\)|(?P<line>[^\n(]+))$",
    re.MULTILINE,
)


def _member_key(name: str) -> tuple[int, str, str]:
    """ruff's isort order of imported names: CONSTANTS, then Classes, then others."""
    bare = name.split(" as ")[0]
    if len(bare) > 1 and bare.upper() == bare and any(c.isalpha() for c in bare):
        rank = 0
    elif bare[:1].isupper():
        rank = 1
    else:
        rank = 2
    return rank, bare.lower(), bare


def _sort_imports(text: str) -> str:
    def fix(match: re.Match[str]) -> str:
        indent, module = match["indent"], match["module"]
        raw = match["block"] if match["block"] is not None else match["line"]
        names = [n.strip() for n in raw.replace("\n", " ").split(",") if n.strip()]
        names = sorted(dict.fromkeys(names), key=_member_key)
        one_line = f"{indent}from {module} import {', '.join(names)}"
        if match["block"] is None and len(one_line) <= LINE_LENGTH:
            return one_line
        inner = "".join(f"{indent}    {n},\n" for n in names)
        return f"{indent}from {module} import (\n{inner}{indent})"

    return _FROM_IMPORT.sub(fix, text)


_ALL = re.compile(r"^__all__ = \[(?P<names>[^\]]*)\]", re.MULTILINE)


def _sort_all(text: str) -> str:
    """``__all__`` in ruff's isort-style order (RUF022), after renaming."""

    def fix(match: re.Match[str]) -> str:
        names = [n.strip() for n in match["names"].split(",") if n.strip()]
        ordered = sorted(names, key=lambda quoted: _member_key(quoted.strip("\"'")))
        one_line = f"__all__ = [{', '.join(ordered)}]"
        if "\n" not in match["names"] and len(one_line) <= LINE_LENGTH:
            return one_line
        return "__all__ = [\n" + "".join(f"    {n},\n" for n in ordered) + "]"

    return _ALL.sub(fix, text)


def unasync_source(text: str) -> str:
    """The blocking twin of one async source module (without the header)."""
    for pattern, replacement in _COMPILED:
        text = pattern.sub(replacement, text)
    return _sort_all(_sort_imports(text))


def generate(src: Path = SRC) -> dict[str, str]:
    """Every generated module's name and full text."""
    out: dict[str, str] = {}
    for path in sorted(src.glob("*.py")):
        if path.name in HAND_WRITTEN:
            continue
        text = path.read_text()
        if _FORBIDDEN.search(text):
            raise SystemExit(f"{path}: imports asyncio; move that code into _compat.py")
        out[path.name] = HEADER.format(name=path.name) + unasync_source(text)
    return out


def stale(files: dict[str, str], dst: Path) -> list[str]:
    """Names of generated files that are missing, different, or no longer generated."""
    wrong = [name for name, text in files.items()
             if not (dst / name).is_file() or (dst / name).read_text() != text]
    extra = [p.name for p in dst.glob("*.py")
             if p.name not in files and p.name not in HAND_WRITTEN]
    return sorted(wrong + extra)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true",
                        help="write nothing; exit 1 if the generated files are out of date")
    parser.add_argument("--src", type=Path, default=SRC, help="the async sources")
    parser.add_argument("--dst", type=Path, default=DST, help="where the sync files go")
    args = parser.parse_args(argv)
    files = generate(args.src)
    out_of_date = stale(files, args.dst)
    if args.check:
        for name in out_of_date:
            print(f"{args.dst / name} is out of date: run python scripts/unasync.py",
                  file=sys.stderr)
        return 1 if out_of_date else 0
    args.dst.mkdir(parents=True, exist_ok=True)
    for name in out_of_date:
        target = args.dst / name
        if name in files:
            target.write_text(files[name])
        else:
            target.unlink()
        print(f"wrote {target}" if name in files else f"removed {target}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
