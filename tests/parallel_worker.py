"""One rank of the data-parallel tests (run by tests/test_parallel.py under mpiexec), and the
small net and solver those tests share with their one-process references.

``python parallel_worker.py OUT DATA ITER_SIZE BUCKET_BYTES TYPE [TYPE...]``: for each solver
type, trains ``STEPS`` iterations on this rank's share of DATA's records with the gradients
all-reduced over MPI.COMM_WORLD, and rank 0 saves the learned parameters to OUT/TYPE.npz.
With ``PARALLEL_WORKER_GPU=1`` every rank trains on GPU 0 (the MPI path of ranks that share
a GPU: the gradients make a round trip through host memory).
"""

from __future__ import annotations

import os
import sys
import traceback
from pathlib import Path

import h5py
import numpy as np

from tests.nets import TYPE_SETTINGS

STEPS = 20
BATCH = 4

NET = """
name: "two_layers"
layer {{ name: "data" type: "HDF5Data" top: "data" top: "label"
        hdf5_data_param {{ source: "{listing}" batch_size: {batch} }} }}
layer {{ name: "ip1" type: "InnerProduct" bottom: "data" top: "ip1"
        inner_product_param {{ num_output: 7 weight_filler {{ type: "gaussian" std: 0.5 }}
                               bias_filler {{ type: "gaussian" std: 0.1 }} }} }}
layer {{ name: "relu1" type: "ReLU" bottom: "ip1" top: "ip1" }}
layer {{ name: "ip2" type: "InnerProduct" bottom: "ip1" top: "ip2"
        inner_product_param {{ num_output: 3 weight_filler {{ type: "gaussian" std: 0.5 }} }} }}
layer {{ name: "loss" type: "SoftmaxWithLoss" bottom: "ip2" bottom: "label" top: "loss" }}
"""


def write_data(folder: Path, rows: int = 96) -> Path:
    """A listing of one HDF5 file of ``rows`` records (6 features, 3 classes), fixed seed."""
    rng = np.random.default_rng(1234)
    data = rng.normal(size=(rows, 6)).astype(np.float32)
    label = (data[:, :3].sum(axis=1) > 0).astype(np.float32) + (data[:, 3] > 1)
    with h5py.File(folder / "records.h5", "w") as f:
        f["data"], f["label"] = data, label
    listing = folder / "records.txt"
    listing.write_text(f"{folder / 'records.h5'}\n")
    return listing


def solver_text(listing: Path, solver_type: str, iter_size: int, **extra: object) -> str:
    """A solver prototxt text for ``solver_type`` on the net above (``extra`` fields win)."""
    net = NET.format(listing=listing, batch=BATCH).replace("\n", " ")
    fields = {
        "type": f'"{solver_type}"',
        "base_lr": 0.05,
        "lr_policy": '"step"',
        "gamma": 0.5,
        "stepsize": 8,
        "weight_decay": 0.001,
        "iter_size": iter_size,
        "max_iter": STEPS,
        "random_seed": 7,
        "display": 0,
        **extra,
    }
    text = " ".join(f"{k}: {v}" for k, v in fields.items())
    return f"{text} {TYPE_SETTINGS[solver_type]} net_param {{ {net} }}"


def await_signal(out: Path) -> None:
    """A stand-in rank for the launcher's signal forwarding: say it is ready, then write the
    action its first SIGINT/SIGHUP asks for (within 60 s)."""
    import time

    from netforge.solvers.control import SignalActions

    with SignalActions() as actions:
        out.with_suffix(".ready").touch()
        deadline = time.monotonic() + 60
        action = "none"
        while action == "none" and time.monotonic() < deadline:
            time.sleep(0.01)
            action = actions()
    out.write_text(action)


def main(argv: list[str]) -> None:
    from netforge.backend import CPU, gpu
    from netforge.parallel import DataParallel, MPICommunicator
    from netforge.parallel.world import set_world
    from netforge.proto import pb
    from netforge.prototxt import parse_text
    from netforge.solvers import get_solver

    out, listing, iter_size, bucket = Path(argv[0]), Path(argv[1]), int(argv[2]), int(argv[3])
    comm = MPICommunicator(timeout=60)
    on_gpu = bool(os.environ.get("PARALLEL_WORKER_GPU"))
    try:
        for solver_type in argv[4:]:
            set_world(comm.rank, comm.size)  # before the nets are built: data layers shard
            param = parse_text(solver_text(listing, solver_type, iter_size), pb.SolverParameter)
            solver = get_solver(param, backend=gpu(0) if on_gpu else CPU)
            # Registered as BVLC's python/train.py registers caffe.NCCL.
            parallel = DataParallel(solver, comm, bucket_bytes=bucket)
            parallel.bcast()
            solver.add_callback(parallel)
            if solver.param.layer_wise_reduce:
                solver.net.after_backward(parallel)
            solver.step(STEPS)
            if comm.rank == 0:
                arrays = [np.asarray(p.data) for p in solver.net.learnable_params]
                np.savez(out / f"{solver_type}.npz", *arrays, loss=solver.loss)
    except BaseException:
        traceback.print_exc()
        comm.abort(1)  # the other rank must not wait for this one in a collective


if __name__ == "__main__":
    main(sys.argv[1:])
