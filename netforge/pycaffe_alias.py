"""Run an unmodified pycaffe script: ``import caffe`` and every ``caffe.<module>`` resolve to
netforge's modules (``caffe.io`` to ``netforge.io``, ``caffe.proto.caffe_pb2`` to
``netforge.proto.caffe_pb2``...).

The alias is opt-in: importing netforge never installs it, so a real Caffe on the same
machine is never shadowed. ``netforge pycaffe script.py [args]`` runs a script under it,
and its child Pythons (multiprocessing's spawn and forkserver workers, as BVLC's
``python/train.py`` starts one per GPU) get it from the ``caffe`` module in ``CHILD_PATH``;
``with caffe_alias(): ...`` installs it for a block of code.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import os
import runpy
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType

from netforge.errors import ConfigError

ALIAS = "caffe"
TARGET = "netforge"
# The folder whose caffe.py installs the alias in a child process: run_script puts it on
# PYTHONPATH (read by a fresh interpreter) and on sys.path (which spawn and forkserver copy
# from the parent into their workers, replacing the child's own).
CHILD_PATH = Path(__file__).resolve().parent / "pycaffe_path"


class CaffeAliasFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """A meta-path finder and loader that hands out netforge's module objects under the
    ``caffe`` names: the same objects, so classes, isinstance checks and module state are
    shared between ``caffe.X`` and ``netforge.X``."""

    def __init__(self) -> None:
        self._specs: dict[str, importlib.machinery.ModuleSpec | None] = {}

    def find_spec(
        self, fullname: str, path: Sequence[str] | None = None, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        """A spec for ``caffe`` and ``caffe.*`` when netforge has the module, else None."""
        if fullname != ALIAS and not fullname.startswith(ALIAS + "."):
            return None
        real_spec = importlib.util.find_spec(TARGET + fullname[len(ALIAS) :])
        if real_spec is None:
            return None
        package = real_spec.submodule_search_locations is not None
        return importlib.util.spec_from_loader(fullname, self, is_package=package)

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType:
        """netforge's module itself (imported now if it was not yet)."""
        module = importlib.import_module(TARGET + spec.name[len(ALIAS) :])
        self._specs[spec.name] = module.__spec__
        return module

    def exec_module(self, module: ModuleType) -> None:
        """Nothing to run: the module is netforge's, already executed. The import system set
        the alias's spec on it; give it back its own."""
        for name, spec in self._specs.items():
            if spec is not None and sys.modules.get(name) is module:
                module.__spec__ = spec


@contextmanager
def caffe_alias() -> Iterator[None]:
    """Make ``import caffe`` (and ``caffe.*``) import netforge inside the block; afterwards
    the alias and the ``caffe`` entries it created are gone."""
    if ALIAS in sys.modules and not _is_alias(sys.modules[ALIAS]):
        raise ConfigError(
            "a real 'caffe' module is already imported in this process; the netforge alias "
            "would not replace it (run the script in a fresh process: netforge pycaffe SCRIPT)"
        )
    finder = CaffeAliasFinder()
    sys.meta_path.insert(0, finder)
    try:
        yield
    finally:
        sys.meta_path.remove(finder)
        for name in [n for n in sys.modules if n == ALIAS or n.startswith(ALIAS + ".")]:
            if _is_alias(sys.modules[name]):
                del sys.modules[name]


def install_alias() -> ModuleType:
    """Install the alias for the rest of this process and return netforge, the module that
    ``caffe`` names: what a child process of ``netforge pycaffe`` runs on its first
    ``import caffe``. Installing it twice keeps one finder."""
    if not any(isinstance(finder, CaffeAliasFinder) for finder in sys.meta_path):
        sys.meta_path.insert(0, CaffeAliasFinder())
    return importlib.import_module(TARGET)


def _is_alias(module: ModuleType) -> bool:
    return getattr(module, "__name__", "").split(".")[0] == TARGET


def run_script(script: str | os.PathLike, args: Sequence[str] = ()) -> None:
    """Run ``script`` as ``__main__`` with ``args`` in ``sys.argv`` and its folder first on
    ``sys.path`` (as ``python script.py args`` does), under the ``caffe`` alias. While it
    runs, ``CHILD_PATH`` leads ``PYTHONPATH`` and follows the script's folder on ``sys.path``,
    so the Python processes it starts import netforge as ``caffe`` too; both are restored
    afterwards."""
    path = Path(script)
    if not path.is_file():
        raise ConfigError(f"{path}: no such script")
    saved_argv, saved_path = sys.argv[:], sys.path[:]
    saved_env = os.environ.get("PYTHONPATH")
    sys.argv = [str(path), *args]
    sys.path[:0] = [str(path.resolve().parent), str(CHILD_PATH)]
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(CHILD_PATH), saved_env]))
    try:
        with caffe_alias():
            runpy.run_path(str(path), run_name="__main__")
    finally:
        sys.argv, sys.path[:] = saved_argv, saved_path
        if saved_env is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = saved_env


__all__ = ["CHILD_PATH", "CaffeAliasFinder", "caffe_alias", "install_alias", "run_script"]
