"""setuptools hook: ``pip install .`` also builds the in-sandbox agent from its C sources.

Everything else is in pyproject.toml. An editable install (``pip install -e``) leaves the
binary to ``python -m sandboxd.agent.build`` (scripts/setup.sh runs it).
"""

from __future__ import annotations

import sys
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py


class BuildPyWithAgent(build_py):
    def run(self) -> None:
        super().run()
        if getattr(self, "editable_mode", False):
            return
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from sandboxd.agent.build import build

        build(out_dir=Path(self.build_lib) / "sandboxd" / "agent" / "bin")


setup(cmdclass={"build_py": BuildPyWithAgent})
