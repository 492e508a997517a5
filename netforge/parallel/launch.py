"""Starting the ranks of a data-parallel run, and what each rank does before training.

Two ways in, one code path after them:

- ``mpiexec -n 4 netforge train --solver S``: the MPI launcher starts the processes (on
  one node or several); ``rank_communicator()`` finds it in the environment and opens an
  ``MPICommunicator``.
- ``netforge train --solver S --gpu 0,1,2,3`` (or ``--gpu all``): ``run_gpu_ranks`` starts
  one process per GPU (multiprocessing's spawn, as BVLC's ``python/train.py``), hands each
  the same NCCL id, and watches them: when one exits with an error or is killed, the others
  are stopped at once and a ``ParallelError`` names the rank; SIGINT and SIGHUP are passed
  on to them, so Ctrl-C stops every rank after the same iteration with rank 0's snapshot.

What every rank checks alone before it trains (the solver file, the flags, its GPU) is
settled together by ``agree_on_failure`` once the ranks are connected: an error every rank
found is reported once, naming how many ranks saw it, and every rank stops.

In every rank, ``prepare_rank`` runs before the solver is built (its data layers shard by
the rank; every rank gets rank 0's random seed so shuffled orders agree; only rank 0 loads
``--weights``), and ``start_rank`` after it is built and rank 0 restored ``--snapshot``
(the flat gradient buffer, the hooks, and the broadcast of rank 0's weights and solver
state: the snapshot is read once).
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import signal
import socket
from collections.abc import Callable
from multiprocessing.connection import wait
from typing import Any

import numpy as np

from netforge import errors
from netforge.errors import ConfigError, NetforgeError, ParallelError
from netforge.parallel.comm import (
    Communicator,
    MPICommunicator,
    NCCLCommunicator,
    collective_timeout,
    launched_size,
    new_nccl_uid,
)
from netforge.parallel.data_parallel import DataParallel
from netforge.parallel.world import set_world
from netforge.proto import pb

log = logging.getLogger("netforge")

#: Seconds the other ranks get to exit after SIGTERM before they are killed.
STOP_GRACE = 5.0

#: Signals the parent of ``--gpu 0,1``'s ranks passes on to them (the solver's actions).
FORWARDED_SIGNALS = tuple(
    getattr(signal, name) for name in ("SIGINT", "SIGHUP") if hasattr(signal, name)
)

# (uid, rank, size, device) of this process when run_gpu_ranks started it.
_assigned: dict[str, Any] = {}


def gpu_ids(gpu: str | None) -> list[int]:
    """The GPU ids of a ``--gpu`` value: an id, a comma list, or "all" (every GPU)."""
    if not gpu:
        return []
    from netforge.backend import parse_gpu_ids

    ids = parse_gpu_ids(gpu)
    if len(set(ids)) != len(ids):
        raise ConfigError(f"--gpu {gpu}: a GPU is named twice; one rank per GPU")
    if len(ids) > 1:
        from netforge.backend import gpu as gpu_backend

        for device in ids:  # before any rank starts: a DeviceError names the missing one
            gpu_backend(device)
    return ids


def rank_communicator() -> Communicator | None:
    """This process's communicator: NCCL when ``run_gpu_ranks`` started it, MPI when an MPI
    launcher started it among several, None when it trains alone."""
    if _assigned:
        return NCCLCommunicator(**_assigned)
    if launched_size() > 1:
        return MPICommunicator(timeout=collective_timeout())
    return None


def assigned_device() -> int:
    """The GPU ``run_gpu_ranks`` gave this process."""
    return int(_assigned["device_id"])


def agree_on_failure(comm: Communicator, failure: NetforgeError | None) -> NetforgeError | None:
    """The ranks' joint verdict on the checks each ran alone before connecting: None when
    none failed, else the same error on every rank, of the first failing rank's type (so its
    exit status), each distinct message once with the ranks that saw it, e.g.
    ``solver.prototxt: no such file (on 2 of 2 ranks)``. A collective: every rank calls it,
    failed or not, so none is left waiting for the others."""
    mine = None if failure is None else {"type": type(failure).__name__, "text": str(failure)}
    gathered = comm.allgather_bytes(json.dumps(mine).encode())  # never empty: "null" at least
    reports = {r: report for r, data in enumerate(gathered) if (report := json.loads(data))}
    if not reports:
        return None
    seen: dict[str, list[int]] = {}
    for rank, report in reports.items():
        seen.setdefault(report["text"], []).append(rank)
    parts = []
    for text, ranks in seen.items():
        where = f"on {len(ranks)} of {comm.size} ranks"
        if len(ranks) < comm.size:
            where += f": rank{'s' * (len(ranks) > 1)} " + ", ".join(map(str, ranks))
        parts.append(f"{text} ({where})")
    kind = getattr(errors, next(iter(reports.values()))["type"], None)
    if not (isinstance(kind, type) and issubclass(kind, NetforgeError)):
        kind = NetforgeError
    return kind("; ".join(parts))


def prepare_rank(param: pb.SolverParameter, comm: Communicator) -> None:
    """Before the solver is built: set the world its data layers shard by, give every
    rank rank 0's ``random_seed`` (drawing one when the solver has none), and leave the
    ``weights`` to rank 0 alone (they reach the others by the broadcast)."""
    set_world(comm.rank, comm.size)
    seed = param.random_seed
    if seed < 0:
        seed = int(np.random.SeedSequence().generate_state(1, np.uint32)[0])
    agreed = int(comm.allgather_bytes(str(seed).encode())[0])
    param.random_seed = agreed
    if comm.rank:
        param.ClearField("weights")
    # Should a rank die, its launcher names the process: these lines name its rank.
    places = comm.allgather_bytes(f"{os.getpid()} on {socket.gethostname()}".encode())
    for rank, place in enumerate(places):
        log.info("Rank %d is process %s", rank, place.decode())
    log.info(
        "Data-parallel training over %s on %d ranks: effective batch = %d x the batch size; "
        "random_seed %d",
        comm.kind,
        comm.size,
        comm.size,
        agreed,
    )


def start_rank(solver: Any, comm: Communicator) -> DataParallel:
    """After the solver is built (and, on rank 0 alone, restored): lay out the gradient
    buffer, hook the reduce into the solver, and broadcast rank 0's weights and solver
    state."""
    parallel = DataParallel(solver, comm).attach()
    parallel.broadcast()
    parallel.broadcast_solver_state()
    return parallel


def run_gpu_ranks(gpus: list[int], target: Callable[..., None], args: tuple) -> None:
    """Run ``target(*args)`` in one process per GPU, with NCCL among them; return when all
    have finished, or raise a ParallelError naming the first rank that failed (after
    stopping the others)."""
    uid = new_nccl_uid()
    context = multiprocessing.get_context("spawn")
    processes = [
        context.Process(
            target=_rank_main,
            args=(target, args, {"uid": uid, "rank": r, "size": len(gpus), "device_id": g}),
            name=f"netforge-rank-{r}",
        )
        for r, g in enumerate(gpus)
    ]
    for process in processes:
        process.start()
    watch(processes, [f"rank {r} (GPU {g})" for r, g in enumerate(gpus)])


def watch(processes: list[Any], names: list[str]) -> None:
    """Wait for the started ``processes``; raise a ParallelError naming (by ``names``) the
    first that fails, after stopping the others.

    SIGINT and SIGHUP reaching this process are passed on to them: each rank acts on them
    as a lone ``netforge train`` does (``--sigint-effect``, ``--sighup-effect``), and the
    ranks agree to stop or snapshot after the same iteration. Ctrl-C in a terminal reaches
    the ranks too (one process group); a repeat sets the same pending action."""

    def forward(signum: int, frame: Any) -> None:
        for process in processes:
            if process.is_alive():
                os.kill(process.pid, signum)

    previous = {s: signal.signal(s, forward) for s in FORWARDED_SIGNALS}
    running = {process.sentinel: r for r, process in enumerate(processes)}
    try:
        while running:
            for sentinel in wait(list(running)):
                rank = running.pop(sentinel)
                code = processes[rank].exitcode
                if code:
                    how = f"was killed by signal {-code}" if code < 0 else f"exited with {code}"
                    raise ParallelError(f"{names[rank]} {how}; the other ranks were stopped")
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        _stop(processes)


def _stop(processes: list[Any]) -> None:
    for process in processes:
        if process.is_alive():
            process.terminate()
    for process in processes:
        process.join(STOP_GRACE)
        if process.is_alive():
            process.kill()
            process.join()


def use_device(device_id: int) -> None:
    """Make ``device_id`` this process's current CUDA device (CUDA's cudaSetDevice): a rank
    owns one GPU, and cupy allocates on the current device."""
    from netforge.backend import import_cupy

    import_cupy().cuda.Device(device_id).use()


def _rank_main(target: Callable[..., None], args: tuple, assigned: dict[str, Any]) -> None:
    """A spawned rank: remember its NCCL assignment, take its GPU, then run the target."""
    _assigned.update(assigned)
    use_device(assigned["device_id"])
    target(*args)
