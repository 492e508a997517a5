"""Build hook: the wheel carries the repository's ``zoo/`` and ``models/`` folders.

They stay at the repository's top level (Caffe's layout, and the paths prototxts and
manifests name), so they are not inside the ``netforge`` package; ``build_py`` copies them
into the built package as ``netforge/_data/zoo`` and ``netforge/_data/models``, where
``netforge.zoo.manifest`` looks first. An editable install builds nothing there and finds
the source tree's copies instead. Everything else is in pyproject.toml.
"""

from __future__ import annotations

import os

from setuptools import setup
from setuptools.command.build_py import build_py

#: top-level folders the installed package carries, and what to leave out of them
CARRIED = ("zoo", "models")
SKIPPED = ("*.caffemodel", "*.solverstate", "*_metrics.jsonl", "__pycache__", ".gitignore")


class BuildWithZoo(build_py):
    """``build_py`` that also copies the zoo manifests and model folders into the package."""

    def run(self) -> None:
        super().run()
        if self.editable_mode:
            return
        import shutil

        for folder in CARRIED:
            target = os.path.join(self.build_lib, "netforge", "_data", folder)
            shutil.rmtree(target, ignore_errors=True)
            shutil.copytree(folder, target, ignore=shutil.ignore_patterns(*SKIPPED))


setup(cmdclass={"build_py": BuildWithZoo})
