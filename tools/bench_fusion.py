"""Batch-1 inference, and training, with and without BatchNorm + Scale + ReLU fusion
(``netforge.fusion``).

Usage (from the repository root)::

    PYTHONPATH=. python tools/bench_fusion.py [--nets resnet50,mobilenet] [--rounds 5]
        [--seconds 1.0] [--no-jit] [--train resnet50] [--batch 8]

Each deploy net of ``tools/bench_models.py`` (random weights, BatchNorm statistics near the
identity) runs ``Net.forward`` at batch 1 with fusion off (``NETFORGE_FUSE=0``) and on, the
two taking turns for ``--rounds`` rounds of about ``--seconds`` each, on the numba kernels
(or, with ``--no-jit``, the numpy path). Prints the median ms per forward with the lowest and
highest round, and the largest difference between the two passes' values over every blob,
relative to the blob's largest value.

With ``--train``, each training net of ``tools/bench_models.py`` runs SGD iterations at
``--batch`` the same way (its training runs fused forward and backward, or not), and the
figures are ms per iteration; the difference is then over the loss after one iteration from
the same weights.
"""

from __future__ import annotations

# First: importing netforge picks OpenBLAS's kernels, which must happen before numpy loads.
import netforge  # noqa: F401

# isort: split
import argparse
import os

import numpy as np
from bench_models import (
    alternate,
    deploy_param,
    fill_weights,
    ms_cells,
    random_batch,
    sgd_solver,
    train_param,
)

from netforge import fusion
from netforge.builtin_layers import _jit
from netforge.net import Net
from netforge.proto import pb


def runner(net: Net, fused: bool):
    """A function running ``n`` forwards of ``net`` with fusion on or off."""

    def run(n: int) -> None:
        os.environ[fusion.SETTING] = "1" if fused else "0"
        for _ in range(n):
            net.forward()

    return run


def train_runner(solver, fused: bool):
    """A function running ``n`` SGD iterations of ``solver`` with fusion on or off."""

    def run(n: int) -> None:
        os.environ[fusion.SETTING] = "1" if fused else "0"
        solver.step(n)

    return run


def bench_train(name: str, batch: int, rounds: int, seconds: float) -> None:
    """Print ``name``'s training iterations at ``batch``, fusion off and on."""
    losses = []
    for fused in (False, True):
        solver = sgd_solver(train_param(name, batch))
        fill_weights(solver.net)
        data, labels = random_batch(solver.net.blobs["data"].shape)
        solver.net.blobs["data"].data, solver.net.blobs["label"].data = data, labels
        train_runner(solver, fused)(1)
        losses.append(solver.net.forward_loss())
    runs = len(fusion.plan(solver.net))
    runners = {"unfused": train_runner(solver, False), "fused": train_runner(solver, True)}
    per_call = alternate(runners, rounds, seconds, 2)
    error = abs(losses[0] - losses[1]) / abs(losses[0])
    print(f"  {name:<10} {runs} fused runs  {ms_cells(per_call, 0)}  loss rel. diff {error:.2g}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nets", default="resnet50,mobilenet")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=1.0)
    parser.add_argument("--no-jit", action="store_true", help="time the numpy path")
    parser.add_argument("--train", default="", help="training nets to time instead")
    parser.add_argument("--batch", type=int, default=8, help="training batch")
    args = parser.parse_args()
    if args.no_jit:
        _jit.enabled = lambda: False
    path = "numpy" if not _jit.enabled() else "numba kernels"
    if args.train:
        print(f"SGD iterations at batch {args.batch}, float32, {path}: ms, median [lowest-highest]")
        for name in args.train.split(","):
            bench_train(name, args.batch, args.rounds, args.seconds)
        return
    print(f"batch-1 Net.forward, float32, {path}: ms, median [lowest-highest of {args.rounds}]")
    for name in args.nets.split(","):
        net = Net(deploy_param(name), pb.TEST)
        fill_weights(net)
        net.blobs["data"].data = random_batch(net.blobs["data"].shape)[0]
        values = []
        for fused in (False, True):
            runner(net, fused)(1)
            values.append({k: b.data.copy() for k, b in net.blobs.items()})
        error = max(
            float(np.abs(values[0][k] - values[1][k]).max() / (np.abs(values[0][k]).max() or 1))
            for k in values[0]
        )
        runs = len(fusion.plan(net))
        runners = {"unfused": runner(net, False), "fused": runner(net, True)}
        per_call = alternate(runners, args.rounds, args.seconds, 3)
        cells = ms_cells(per_call, 2)
        print(f"  {name:<10} {runs} fused runs  {cells}  max rel. diff {error:.2g}")


if __name__ == "__main__":
    main()
