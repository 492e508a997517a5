"""pycaffe's process-wide functions: the layer list, the random seed, logging, a timer, and
the multi-process solver settings (``caffe.layer_type_list``, ``caffe.set_random_seed``,
``caffe.init_log``, ``caffe.Timer``, ``caffe.solver_count``, ``caffe.NCCL``...).

They are thin setters of defaults (STYLE rule 6): nets and solvers own their state, and
read these defaults only when they are built without an explicit value.
"""

from __future__ import annotations

import logging
import time

import numpy as np

from netforge.errors import DeviceError
from netforge.layer import registered_types

log_ = logging.getLogger("netforge")

_GLOG_LEVELS = {0: logging.INFO, 1: logging.WARNING, 2: logging.ERROR, 3: logging.CRITICAL}

# Caffe's global generator: None until set_random_seed, then shared by every net and solver
# built afterwards without a generator or a random_seed of their own.
_seeded: dict[str, np.random.Generator | None] = {"rng": None}

# Caffe's solver_count / solver_rank / multiprocess globals.
_solvers = {"count": 1, "rank": 0, "multiprocess": False}


def layer_type_list() -> list[str]:
    """Every layer type netforge can build (Caffe's ``LayerRegistry::LayerTypeList``),
    sorted; plugin types and ``Python`` included."""
    return registered_types()


def set_random_seed(seed: int) -> None:
    """Seed the generator that nets and solvers built afterwards share when they are given
    none (Caffe's ``Caffe::set_random_seed``): fillers, dropout and shuffles repeat from the
    same seed. A solver's own ``random_seed`` still takes precedence, as in Caffe."""
    _seeded["rng"] = np.random.default_rng(int(seed))


def default_rng() -> np.random.Generator:
    """The generator set by ``set_random_seed``, or a freshly seeded one when none was set."""
    rng = _seeded["rng"]
    return rng if rng is not None else np.random.default_rng()


def init_log(level: int = 0, stderr: bool = True) -> None:
    """Show netforge's log lines (Caffe's glog format) on standard error from ``level`` up:
    0 INFO, 1 WARNING, 2 ERROR, 3 FATAL (glog's ``minloglevel``). netforge always logs to
    standard error; glog's log files (``stderr=False``) are not written."""
    from netforge.train_log import setup_logging

    setup_logging().setLevel(_GLOG_LEVELS.get(int(level), logging.INFO))


def log(message: str) -> None:
    """Log ``message`` at INFO level on the ``netforge`` logger (Caffe's ``LOG(INFO)``)."""
    log_.info("%s", message)


class Timer:
    """A stopwatch (Caffe's ``Timer``): ``start()``, ``stop()``, ``ms`` (milliseconds between
    them, or up to now while running)."""

    def __init__(self) -> None:
        self._start: float | None = None
        self._elapsed = 0.0
        self._running = False

    def start(self) -> None:
        """Start (or restart) timing."""
        self._start = time.perf_counter()
        self._running = True

    def stop(self) -> None:
        """Stop timing; ``ms`` then stays at the time since ``start``."""
        if self._running and self._start is not None:
            self._elapsed = time.perf_counter() - self._start
            self._running = False

    @property
    def ms(self) -> float:
        """Milliseconds from ``start`` to ``stop`` (to now while running; 0 before start)."""
        if self._running and self._start is not None:
            return (time.perf_counter() - self._start) * 1e3
        return self._elapsed * 1e3


def solver_count() -> int:
    """The number of solvers training together (1: one process, one device)."""
    return _solvers["count"]


def set_solver_count(count: int) -> None:
    """Declare how many solvers train together (Caffe's ``Caffe::set_solver_count``)."""
    _solvers["count"] = int(count)


def solver_rank() -> int:
    """This process's rank among the solvers (0 for the root solver)."""
    return _solvers["rank"]


def set_solver_rank(rank: int) -> None:
    """Set this process's rank among the solvers (Caffe's ``Caffe::set_solver_rank``)."""
    _solvers["rank"] = int(rank)


def set_multiprocess(multiprocess: bool) -> None:
    """Declare that the solvers run in separate processes (Caffe's ``set_multiprocess``)."""
    _solvers["multiprocess"] = bool(multiprocess)


def has_nccl() -> bool:
    """Whether multi-GPU training through NCCL is available: not in this netforge version,
    which trains on one device (``caffe.has_nccl()`` is False on Caffe builds without it)."""
    return False


_NCCL_MESSAGE = (
    "multi-GPU training with NCCL is not available in this netforge version "
    "(netforge.has_nccl() is False); train on one GPU or the CPU"
)


class NCCL:
    """Caffe's ``NCCL(solver, uid)``: gradient exchange between GPU solvers. netforge trains
    on one device, so building one raises a DeviceError, as Caffe builds without NCCL do."""

    def __init__(self, solver: object, uid: bytes) -> None:
        raise DeviceError(_NCCL_MESSAGE)

    @staticmethod
    def new_uid() -> bytes:
        """A new NCCL communicator id; raises a DeviceError (no NCCL here)."""
        raise DeviceError(_NCCL_MESSAGE)


__all__ = [
    "NCCL",
    "Timer",
    "has_nccl",
    "init_log",
    "layer_type_list",
    "log",
    "set_multiprocess",
    "set_random_seed",
    "set_solver_count",
    "set_solver_rank",
    "solver_count",
    "solver_rank",
]
