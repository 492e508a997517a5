"""pycaffe's process-wide functions: the layer list, the random seed, logging, a timer, and
the multi-process solver settings (``caffe.layer_type_list``, ``caffe.set_random_seed``,
``caffe.init_log``, ``caffe.Timer``, ``caffe.solver_count``, ``caffe.NCCL``...).

They are thin setters of defaults (STYLE rule 6): nets and solvers own their state, and
read these defaults only when they are built without an explicit value.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np

from netforge.backend import import_cupy
from netforge.errors import DeviceError
from netforge.layer import registered_types
from netforge.parallel import world
from netforge.parallel.comm import NCCLCommunicator, nccl_module, new_nccl_uid
from netforge.parallel.data_parallel import DataParallel

log_ = logging.getLogger("netforge")

_GLOG_LEVELS = {0: logging.INFO, 1: logging.WARNING, 2: logging.ERROR, 3: logging.CRITICAL}

# Caffe's global generator: None until set_random_seed, then shared by every net and solver
# built afterwards without a generator or a random_seed of their own.
_seeded: dict[str, np.random.Generator | None] = {"rng": None}


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
    return world.world().count


def set_solver_count(count: int) -> None:
    """Declare how many solvers train together (Caffe's ``Caffe::set_solver_count``); nets
    built afterwards take their share of the training records (``netforge.parallel``)."""
    world.set_count(count)


def solver_rank() -> int:
    """This process's rank among the solvers (0 for the root solver)."""
    return world.world().rank


def set_solver_rank(rank: int) -> None:
    """Set this process's rank among the solvers (Caffe's ``Caffe::set_solver_rank``)."""
    world.set_rank(rank)


def set_multiprocess(multiprocess: bool) -> None:
    """Caffe's ``set_multiprocess``, which tells Caffe its solvers run in separate
    processes (BVLC's python/train.py) rather than as threads of one: netforge's always do,
    one per process, so there is nothing to record and the call changes nothing."""


def has_nccl() -> bool:
    """Whether multi-GPU training through NCCL is available: cupy with its NCCL binding
    and a GPU (``caffe.has_nccl()``)."""
    try:
        import_cupy()
        nccl_module()
    except DeviceError:
        return False
    return True


class NCCL(DataParallel):
    """Caffe's ``NCCL(solver, uid)``: keeps this process's GPU solver in step with the other
    ``solver_count()`` processes given the same ``uid`` (see ``netforge.parallel``), as
    BVLC's ``python/train.py`` uses it: ``nccl.bcast()``, ``solver.add_callback(nccl)`` and,
    with ``layer_wise_reduce``, ``solver.net.after_backward(nccl)``.

    Call ``set_solver_count``/``set_solver_rank`` before building the solver, so its data
    layers take this rank's share of the records. CPU solvers train data-parallel over MPI
    instead: ``mpiexec -n N netforge train``, or ``netforge.parallel.DataParallel(solver,
    MPICommunicator())`` under mpiexec."""

    def __init__(self, solver: Any, uid: bytes) -> None:
        device = solver.backend.device_id
        if device < 0:
            raise DeviceError(
                "NCCL runs between GPU solvers; this solver is on the CPU (train CPU "
                "processes over MPI: mpiexec -n N netforge train --solver S)"
            )
        current = world.world()
        super().__init__(solver, NCCLCommunicator(uid, current.rank, current.count, device))

    @staticmethod
    def new_uid() -> bytes:
        """A new NCCL communicator id, to hand to every rank's ``NCCL`` (pickles)."""
        return new_nccl_uid()


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
