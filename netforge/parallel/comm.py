"""Communicators: the collectives data-parallel training needs, over MPI or NCCL.

netforge does not move bytes between processes itself: ``MPICommunicator`` runs on mpi4py
(any MPI; the ``mpi`` extra installs mpi4py and MPICH's wheel), ``NCCLCommunicator`` on
cupy's NCCL binding (``cupy.cuda.nccl``, in the CUDA extras). Both offer the same four
operations on arrays of the training backend:

- ``start_allreduce(array)``: an in-place sum over the ranks that runs while the caller
  goes on (MPI's ``Iallreduce``; NCCL's ``ncclAllReduce`` on a stream of its own), with a
  ``Pending`` handle whose ``wait()`` makes the sum visible to what follows;
- ``broadcast(array, root)``: in place, from ``root``;
- ``allgather_bytes(data)``: a few bytes from every rank (error reports, a seed);
- ``abort(code)``: end every rank of the job now (a rank that raised must not leave the
  others waiting in a collective forever).

On MPI, waits poll with a deadline (``timeout`` seconds; None waits forever), so a rank
that stops answering without dying ends the run with a ``ParallelError`` instead of a hang.
A rank that dies is MPI's to notice: mpiexec (MPICH's hydra, Open MPI's mpirun) ends the
others at once and prints the dead process's id.
"""

from __future__ import annotations

import abc
import os
import sys
import time
from typing import Any, NoReturn

import numpy as np

from netforge.errors import ConfigError, DeviceError, ParallelError

#: Environment variables by which MPI launchers tell a process the job's size.
_SIZE_VARIABLES = ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "PMIX_SIZE", "MV2_COMM_WORLD_SIZE")

#: Seconds a rank waits for a collective before it gives up on the others (env
#: ``NETFORGE_COLLECTIVE_TIMEOUT``; 0 waits forever). Generous: a rank waits at its next
#: all-reduce while rank 0 tests and snapshots.
DEFAULT_TIMEOUT = 1800.0

#: Seconds an aborting rank waits for the launcher to forward its last output lines.
ABORT_GRACE = 0.5


def launched_size() -> int:
    """The number of processes an MPI launcher started this one among (1 when none did)."""
    for name in _SIZE_VARIABLES:
        value = os.environ.get(name)
        if value and value.isdigit():
            return int(value)
    return 1


def collective_timeout() -> float | None:
    """The collective deadline from ``NETFORGE_COLLECTIVE_TIMEOUT`` (None: no deadline)."""
    text = os.environ.get("NETFORGE_COLLECTIVE_TIMEOUT", str(DEFAULT_TIMEOUT))
    try:
        seconds = float(text)
    except ValueError:
        raise ConfigError(
            f"NETFORGE_COLLECTIVE_TIMEOUT={text!r}: give a number of seconds (0: no limit)"
        ) from None
    return seconds if seconds > 0 else None


class Pending(abc.ABC):
    """A collective under way."""

    @abc.abstractmethod
    def done(self) -> bool:
        """Whether it has finished (on MPI, also lets it progress)."""

    @abc.abstractmethod
    def wait(self) -> None:
        """Block until the result may be used by what follows on this rank."""


class _Done(Pending):
    def done(self) -> bool:
        return True

    def wait(self) -> None:
        return None


class Communicator(abc.ABC):
    """The ranks of one data-parallel job and the collectives among them."""

    #: "MPI" or "NCCL", for logs and errors.
    kind = ""

    def __init__(self, rank: int, size: int) -> None:
        self.rank = rank
        self.size = size

    @abc.abstractmethod
    def start_allreduce(self, array: Any) -> Pending:
        """Begin summing ``array`` over the ranks, in place."""

    def allreduce(self, array: Any) -> None:
        """Sum ``array`` over the ranks, in place, and wait for it."""
        self.start_allreduce(array).wait()

    @abc.abstractmethod
    def broadcast(self, array: Any, root: int = 0) -> None:
        """Overwrite ``array`` with ``root``'s, on every rank."""

    @abc.abstractmethod
    def allgather_bytes(self, data: bytes) -> list[bytes]:
        """Every rank's ``data``, in rank order (small payloads only)."""

    @abc.abstractmethod
    def abort(self, code: int = 1) -> NoReturn:
        """End every rank of the job."""


class MPICommunicator(Communicator):
    """MPI through mpi4py, on ``MPI.COMM_WORLD`` unless given a communicator.

    Arrays on a GPU make a round trip through host memory (no CUDA-aware MPI is assumed):
    this is the path for several ranks sharing one GPU, or GPUs without NCCL.
    """

    kind = "MPI"

    def __init__(self, comm: Any = None, timeout: float | None = DEFAULT_TIMEOUT) -> None:
        try:
            from mpi4py import MPI
        except ImportError:
            raise ConfigError(
                "data-parallel training over MPI needs mpi4py and an MPI runtime: "
                "pip install 'netforge[mpi]'"
            ) from None
        self._mpi = MPI
        self.comm = comm if comm is not None else MPI.COMM_WORLD
        self.timeout = timeout
        super().__init__(self.comm.Get_rank(), self.comm.Get_size())

    def start_allreduce(self, array: Any) -> Pending:
        if not isinstance(array, np.ndarray):
            host = array.get()
            _MPIPending(self, self.comm.Iallreduce(self._mpi.IN_PLACE, host)).wait()
            array.set(host)
            return _Done()
        return _MPIPending(self, self.comm.Iallreduce(self._mpi.IN_PLACE, array))

    def broadcast(self, array: Any, root: int = 0) -> None:
        host = array if isinstance(array, np.ndarray) else array.get()
        _MPIPending(self, self.comm.Ibcast(host, root=root)).wait()
        if host is not array:
            array.set(host)

    def allgather_bytes(self, data: bytes) -> list[bytes]:
        size = np.zeros(self.size, np.int64)
        size[self.rank] = len(data)
        self.allreduce(size)
        width = int(size.max())
        table = np.zeros((self.size, width), np.uint8)
        table[self.rank, : len(data)] = np.frombuffer(data, np.uint8)
        self.allreduce(table)
        return [bytes(table[r, : size[r]]) for r in range(self.size)]

    def abort(self, code: int = 1) -> NoReturn:
        # The launcher forwards this rank's output through a pipe it stops reading once the
        # abort reaches it: flush, and leave it a moment to pass the last lines on.
        sys.stdout.flush()
        sys.stderr.flush()
        time.sleep(ABORT_GRACE)
        self.comm.Abort(code)
        raise SystemExit(code)  # not reached: Abort ends this process too


class _MPIPending(Pending):
    def __init__(self, comm: MPICommunicator, request: Any) -> None:
        self.comm = comm
        self.request = request

    def done(self) -> bool:
        return bool(self.request.Test())

    def wait(self) -> None:
        timeout = self.comm.timeout
        if timeout is None:
            self.request.Wait()
            return
        # Test() also drives the transfer; the clock is read only every few thousand polls,
        # and the core is offered to others then (ranks may outnumber cores, as in CI).
        deadline = time.monotonic() + timeout
        while not self.request.Test():
            for _ in range(2000):
                if self.request.Test():
                    return
            os.sched_yield()
            if time.monotonic() > deadline:
                raise ParallelError(
                    f"rank {self.comm.rank} of {self.comm.size}: no answer from the other "
                    f"ranks for {timeout:g} s in a collective; a rank hangs (or lost its "
                    "network); raise NETFORGE_COLLECTIVE_TIMEOUT if rank 0's tests or "
                    "snapshots take longer"
                )


_NCCL_TYPES = {"float32": "NCCL_FLOAT32", "float64": "NCCL_FLOAT64", "int64": "NCCL_INT64"}


def nccl_module() -> Any:
    """``cupy.cuda.nccl``, or a DeviceError saying how to get it."""
    try:
        from cupy.cuda import nccl
    except ImportError:
        nccl = None
    if nccl is None or not getattr(nccl, "available", True):
        raise DeviceError(
            "multi-GPU training needs NCCL through cupy: pip install 'netforge[cuda12]' "
            "(or [cuda13]) and the nvidia-nccl wheel for that CUDA version"
        )
    return nccl


def new_nccl_uid() -> bytes:
    """A new NCCL communicator id (``ncclGetUniqueId``), as bytes that pickle."""
    return bytes(v & 0xFF for v in nccl_module().get_unique_id())


class NCCLCommunicator(Communicator):
    """NCCL through cupy, among ``size`` processes that were given the same ``uid``.

    Collectives run on a stream of their own, ordered after the work queued on the
    current (compute) stream when they start; ``wait()`` orders the compute stream after
    them without blocking the host. Arrays stay on the GPU: no host round trip.
    """

    kind = "NCCL"

    def __init__(self, uid: bytes, rank: int, size: int, device_id: int) -> None:
        import cupy

        self._nccl = nccl_module()
        self._cp = cupy
        self.device_id = device_id
        with cupy.cuda.Device(device_id):
            signed = tuple(b - 256 if b > 127 else b for b in uid)
            self.comm = self._nccl.NcclCommunicator(size, signed, rank)
            self.stream = cupy.cuda.Stream(non_blocking=True)
        super().__init__(rank, size)

    def _type(self, array: Any) -> int:
        name = _NCCL_TYPES.get(array.dtype.name)
        if name is None:
            raise ConfigError(f"NCCL collectives take float32, float64 or int64, not {array.dtype}")
        return getattr(self._nccl, name)

    def _after_compute(self) -> Any:
        """The compute stream of this rank's GPU, with the collective stream ordered after
        what is queued on it."""
        with self._cp.cuda.Device(self.device_id):
            compute = self._cp.cuda.get_current_stream()
            self.stream.wait_event(compute.record())
        return compute

    def start_allreduce(self, array: Any) -> Pending:
        compute = self._after_compute()
        ptr = array.data.ptr
        with self._cp.cuda.Device(self.device_id):
            self.comm.allReduce(
                ptr, ptr, array.size, self._type(array), self._nccl.NCCL_SUM, self.stream.ptr
            )
            return _NCCLPending(self.stream.record(), compute)

    def broadcast(self, array: Any, root: int = 0) -> None:
        compute = self._after_compute()
        with self._cp.cuda.Device(self.device_id):
            self.comm.bcast(array.data.ptr, array.size, self._type(array), root, self.stream.ptr)
            _NCCLPending(self.stream.record(), compute).wait()

    def allgather_bytes(self, data: bytes) -> list[bytes]:
        cp = self._cp
        size = cp.zeros(self.size, cp.int64)
        size[self.rank] = len(data)
        self.allreduce(size)
        sizes = size.get()
        table = np.zeros((self.size, int(sizes.max())), np.int64)
        table[self.rank, : len(data)] = np.frombuffer(data, np.uint8)
        device = cp.asarray(table)
        self.allreduce(device)
        rows = device.get()
        return [bytes(rows[r, : sizes[r]].astype(np.uint8)) for r in range(self.size)]

    def abort(self, code: int = 1) -> NoReturn:
        self.comm.abort()
        os._exit(code)  # the launcher sees the exit status and stops the other ranks


class _NCCLPending(Pending):
    def __init__(self, event: Any, compute: Any) -> None:
        self.event = event
        self.compute = compute

    def done(self) -> bool:
        return bool(self.event.done)

    def wait(self) -> None:
        self.compute.wait_event(self.event)
