"""What keeping the last good state costs a training iteration (``netforge/solvers/guard.py``).

Usage (from the repository root)::

    PYTHONPATH=. python tools/bench_guard.py [--nets lenet,cifar10_quick,caffenet]
        [--rounds 5] [--seconds 2]

For each of ``tools/bench_layers.py``'s nets (same prototxts, batches and SGD settings), two
solvers train in one process, round by round in turn: one keeping the last good state (the
default) and one with it switched off (``LastGood.enabled = False``); both check the loss
and gradients for NaN as usual. Printed per net: the median time per iteration of each,
their difference, and how often the state is copied (every ``every`` iterations, so that
at most ``guard.BUDGET`` bytes are copied per iteration on average).
"""

from __future__ import annotations

# First: importing netforge picks OpenBLAS's kernels, which must happen before numpy loads.
import netforge  # noqa: F401

# isort: split
import argparse
import statistics
import time

from bench_layers import BENCHES, NetforgeTrainer, iterations_for


def per_iteration(trainer: NetforgeTrainer, iterations: int) -> float:
    start = time.perf_counter()
    trainer.run(iterations)
    return (time.perf_counter() - start) / iterations


def bench(name: str, rounds: int, seconds: float) -> None:
    kept, off = NetforgeTrainer(BENCHES[name]), NetforgeTrainer(BENCHES[name])
    off.solver._last_good.enabled = False
    iterations = iterations_for(kept, seconds)
    times: dict[str, list[float]] = {"kept": [], "off": []}
    for _ in range(rounds):
        times["kept"].append(per_iteration(kept, iterations))
        times["off"].append(per_iteration(off, iterations))
    with_state, without = (statistics.median(times[k]) * 1e3 for k in ("kept", "off"))
    guard = kept.solver._last_good
    print(
        f"{name:14} last good state kept {with_state:8.2f} ms/iter, off {without:8.2f} ms/iter, "
        f"difference {with_state - without:+6.2f} ms ({(with_state / without - 1) * 100:+5.1f}%); "
        f"{guard.size / 2**20:.1f} MiB copied every {guard.every} iteration(s)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nets", default=",".join(BENCHES))
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=2.0)
    args = parser.parse_args()
    for name in args.nets.split(","):
        bench(name, args.rounds, args.seconds)


if __name__ == "__main__":
    main()
