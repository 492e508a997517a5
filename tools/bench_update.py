"""The solver's cost outside the layers, against the memory traffic an update cannot avoid.

Usage (from the repository root)::

    PYTHONPATH=. python tools/bench_update.py [--nets lenet,cifar10_quick,caffenet]
        [--rounds 5] [--seconds 2]

For each of ``tools/bench_layers.py``'s nets (same prototxts, batches and SGD settings), three
figures per iteration are timed in one process, alternating round by round:

- **training**: real iterations, split as bench_layers splits them into the layers
  (``net.forward_backward``) and the rest, the solver's part; a round is one ``step`` call
  of at least ``bench_layers.MIN_ITERATIONS``, as there;
- **solver alone**: iterations with ``net.forward_backward`` replaced by a no-op, so only the
  solver runs (its update, regularization and bookkeeping) on warm parameters. The no-op
  reports no gradient bounds, so the finiteness check reads no diffs here; in training it
  reads those of the layers that report none (the convolutions);
- **traffic floor**: one array per kind (weights, gradients, history) as large as all the
  learnable parameters together, streamed through ``w += g; h += g`` in the solver's own
  cache-sized blocks and threads (``netforge.solvers.blocks``). That reads the weights,
  gradients and history once and writes the weights and history once, which every update
  with momentum must, with the least arithmetic numpy can do on them.

The shares are of an iteration made of the layers plus that part: what the solver costs now,
and what a single fused pass at memory speed would cost.
"""

from __future__ import annotations

# First: importing netforge picks OpenBLAS's kernels, which must happen before numpy loads.
import netforge  # noqa: F401

# isort: split
import argparse
import statistics
import time
from collections.abc import Callable

import numpy as np
from bench_layers import BENCHES, MIN_ITERATIONS, NetforgeTrainer

from netforge.blob import Blob
from netforge.solvers.blocks import ParamBlocks


def traffic_floor(count: int) -> Callable[[], None]:
    """One pass over ``count`` parameters' worth of weights, gradients and history, blocked
    and threaded as the solver's update is. The gradients are zero, so nothing drifts."""
    blob = Blob((count,))
    blob.data = np.ones(count, np.float32)
    blob.diff = np.zeros(count, np.float32)
    history = [np.ones(count, np.float32)]
    blocks = ParamBlocks(np, np.float32)
    cut = blocks.blocks([blob], history)

    def work(block, _scratch) -> None:
        np.add(block.data, block.diff, out=block.data)
        np.add(block.history[0], block.diff, out=block.history[0])

    return lambda: blocks.run(cut, work)


def seconds_per_call(function: Callable[[], None], calls: int) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        function()
    return (time.perf_counter() - start) / calls


def bench(name: str, rounds: int, seconds: float) -> dict:
    """Milliseconds per iteration of the layers, the solver in training, the solver alone
    and the traffic floor (medians over rounds) for net ``name``."""
    trainer = NetforgeTrainer(BENCHES[name])
    net = trainer.solver.net
    layers_and_solver = net.forward_backward
    params = sum(blob.count for blob in net.learnable_params)
    floor = traffic_floor(params)

    def training(iterations: int) -> tuple[float, float]:
        trainer.reset_clock()
        start = time.perf_counter()
        trainer.run(iterations)
        elapsed = time.perf_counter() - start
        return trainer.layer_seconds / iterations, trainer.outside_seconds(elapsed) / iterations

    def solver_alone(iterations: int) -> float:
        net.forward_backward = lambda: 0.0
        try:
            start = time.perf_counter()
            trainer.run(iterations)  # one call, as in training: the same deferred diffs
            return (time.perf_counter() - start) / iterations
        finally:
            net.forward_backward = layers_and_solver

    trainer.run(2)  # warm-up: buffers allocated, pools started
    per_iteration = sum(training(2))
    train_iterations = max(MIN_ITERATIONS, round(seconds / per_iteration))
    alone_iterations = max(10, round(seconds / max(solver_alone(3), 1e-6)))
    floor_passes = max(10, round(seconds / max(seconds_per_call(floor, 3), 1e-6)))
    figures: dict[str, list[float]] = {k: [] for k in ("layers", "solver", "alone", "floor")}
    for _ in range(rounds):
        layers, solver = training(train_iterations)
        figures["layers"].append(layers)
        figures["solver"].append(solver)
        figures["alone"].append(solver_alone(alone_iterations))
        figures["floor"].append(seconds_per_call(floor, floor_passes))
    ms = {k: statistics.median(v) * 1000 for k, v in figures.items()}
    return {"net": name, "params": params, **ms}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nets", default="lenet,cifar10_quick,caffenet")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=2.0, help="per round and figure")
    args = parser.parse_args()
    names = args.nets.split(",")
    unknown = sorted(set(names) - set(BENCHES))
    if unknown:
        parser.error(f"unknown nets {unknown}; choose from {sorted(BENCHES)}")
    print("ms per iteration, medians over rounds; shares of layers + that part")
    print(
        f"{'net':14} {'params':>8} {'layers':>8} {'solver':>8} {'share':>6} "
        f"{'alone':>8} {'floor':>8} {'share':>6} {'alone/floor':>11}"
    )
    for name in names:
        r = bench(name, args.rounds, args.seconds)
        print(
            f"{name:14} {r['params'] / 1e6:7.2f}M {r['layers']:8.2f} {r['solver']:8.2f} "
            f"{r['solver'] / (r['layers'] + r['solver']):6.1%} {r['alone']:8.2f} "
            f"{r['floor']:8.2f} {r['floor'] / (r['layers'] + r['floor']):6.1%} "
            f"{r['alone'] / r['floor']:11.2f}",
            flush=True,
        )


if __name__ == "__main__":
    main()
