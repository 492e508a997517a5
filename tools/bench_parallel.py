"""Data-parallel scaling on the CPU: 1 process with 1 thread against 2 MPI ranks with 1 thread
each, on BVLC's LeNet, CIFAR-10 quick and CaffeNet; and the all-reduce itself.

Usage (from the repository root; needs the ``mpi`` extra)::

    PYTHONPATH=. python tools/bench_parallel.py [--nets lenet,cifar10_quick,caffenet]
        [--seconds 20] [--min-iters 5] [--rounds 3] [--json results.jsonl]

For each net (its TRAIN prototxt with the data layers replaced by Input layers holding a random
batch, as ``tools/bench_layers.py`` does: the figures are the layers, the solver and the
gradient exchange, not data loading), every process is pinned to a core of its own
(``sched_setaffinity`` before netforge loads, so netforge's layer pool has one worker) with one
OpenBLAS thread, and trains with SGD:

- ``1 proc``: one process alone, images/s at the solver's batch size; it also times the
  forward and backward passes and the update apart (``fwd``, ``bwd``, ``upd`` ms, each timed
  directly: as the rest of an iteration, the update took the drift between two timings and
  came out negative) — the compute times docs/scaling.md's model starts from;
- ``2 ranks``: ``mpiexec -n 2``, each rank at the same batch size (effective batch 2x), images
  per second over both ranks; ``efficiency`` = 2-rank images/s / (2 x 1-process images/s);
- ``allreduce``: a blocking all-reduce of the whole gradient buffer, timed alone on the two
  ranks; ``exposed``: the time per iteration the ranks still waited for the reduce after
  backward (``DataParallel.on_gradients_ready``); ``hidden`` = 1 - exposed / allreduce, the
  share of the exchange that ran behind the backward pass.

Then an all-reduce sweep over message sizes on the two ranks: time per call (the smallest is
the latency), algorithm bandwidth (bytes / time) and bus bandwidth (x 2(n-1)/n, NCCL's
convention, comparable across rank counts).

The 1-process and 2-rank runs alternate for ``--rounds`` rounds, and each round's efficiency
compares the two runs next to each other: on a virtual machine the speed of a core drifts
(CIFAR-10 quick's training here went from 1341 to 900 img/s within minutes, with nothing else
running), so one run of each could compare two different machines. The table gives the
median round (by efficiency) and the spread of the efficiency over the rounds.

The machine must be quiet: the two ranks need two free cores. ``--seconds 1 --min-iters 2
--rounds 1 --nets lenet`` is a smoke test.
"""

from __future__ import annotations

import os
import sys

# Before netforge or numpy load: one core per process (netforge sizes its layer pool from the
# affinity), one BLAS thread.
if "--worker" in sys.argv or "--sweep" in sys.argv:
    _rank = int(os.environ.get("PMI_RANK", os.environ.get("OMPI_COMM_WORLD_RANK", "0")))
    _cores = sorted(os.sched_getaffinity(0))
    os.sched_setaffinity(0, {_cores[_rank % len(_cores)]})
    os.environ["OPENBLAS_NUM_THREADS"] = "1"


# isort: split
import argparse  # noqa: E402
import json  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))

from bench_layers import BENCHES, random_batch, sgd_solver, train_net_param  # noqa: E402

SWEEP_BYTES = [4 << k for k in range(0, 25, 2)]  # 4 B .. 64 MiB


def build_solver(name: str, seed: int):
    """The benchmark net's SGD solver with a random batch loaded (per-rank ``seed``)."""
    bench = BENCHES[name]
    solver = sgd_solver(train_net_param(bench))
    data, labels = random_batch(bench, seed)
    solver.net.blobs["data"].data = data
    solver.net.blobs["label"].data = labels
    return solver, bench.batch


def timed_steps(solver, seconds: float, min_iters: int, agree=None) -> tuple[int, float]:
    """Iterations and seconds of one ``step`` call lasting about ``seconds``."""
    solver.step(2)  # warm-up: allocations, BLAS buffers
    start = time.perf_counter()
    solver.step(1)
    once = time.perf_counter() - start
    iters = max(min_iters, int(seconds / max(once, 1e-6)))
    if agree is not None:
        iters = agree(iters)  # every rank runs the same number
    start = time.perf_counter()
    solver.step(iters)
    return iters, time.perf_counter() - start


def worker_alone(name: str, seconds: float, min_iters: int) -> dict:
    solver, batch = build_solver(name, 0)
    iters, elapsed = timed_steps(solver, seconds, min_iters)
    net = solver.net
    fwd = bwd = upd = 0.0
    passes = max(3, iters // 4)
    for _ in range(passes):
        net.clear_param_diffs()
        start = time.perf_counter()
        net.forward_from_to()
        forwarded = time.perf_counter()
        net.backward_from_to()
        backwarded = time.perf_counter()
        solver.apply_update()
        fwd += forwarded - start
        bwd += backwarded - forwarded
        upd += time.perf_counter() - backwarded
    grad_bytes = sum(p.count for p in net.learnable_params) * 4
    return {
        "net": name,
        "batch": batch,
        "iters": iters,
        "iter_ms": elapsed / iters * 1e3,
        "images_per_s": batch * iters / elapsed,
        "fwd_ms": fwd / passes * 1e3,
        "bwd_ms": bwd / passes * 1e3,
        "update_ms": upd / passes * 1e3,
        "grad_bytes": grad_bytes,
    }


def worker_ranks(name: str, seconds: float, min_iters: int) -> dict | None:
    from mpi4py import MPI

    from netforge.parallel import DataParallel, MPICommunicator

    comm = MPICommunicator(timeout=None)
    solver, batch = build_solver(name, comm.rank)
    parallel = DataParallel(solver, comm).attach()
    parallel.broadcast()
    waited = [0.0]
    ready = parallel.on_gradients_ready

    def timed_ready() -> None:
        start = time.perf_counter()
        ready()
        waited[0] += time.perf_counter() - start

    solver.callbacks = [(None, timed_ready)]

    def agree(iters: int) -> int:
        return int(MPI.COMM_WORLD.allreduce(iters, op=MPI.MAX))

    iters, elapsed = timed_steps(solver, seconds, min_iters, agree)
    waited_run = waited[0]
    waited[0] = 0.0
    # The exchange alone: the whole flat buffer, blocking, a few times.
    MPI.COMM_WORLD.Barrier()
    rounds = 5
    start = time.perf_counter()
    for _ in range(rounds):
        comm.allreduce(parallel.flat)
    alone = (time.perf_counter() - start) / rounds
    slowest = MPI.COMM_WORLD.allreduce(elapsed, op=MPI.MAX)
    if comm.rank:
        return None
    # ``waited`` covers the 3 warm-up iterations too; count the timed ones' share.
    exposed = waited_run / (iters + 3)
    return {
        "net": name,
        "ranks": comm.size,
        "buckets": len(parallel.buckets),
        "images_per_s": comm.size * batch * iters / slowest,
        "allreduce_ms": alone * 1e3,
        "exposed_ms": exposed * 1e3,
        "hidden": max(0.0, 1.0 - exposed / alone) if alone else 1.0,
    }


def sweep() -> list[dict] | None:
    from mpi4py import MPI

    from netforge.parallel import MPICommunicator

    comm = MPICommunicator(timeout=None)
    rows = []
    for size in SWEEP_BYTES:
        buffer = np.ones(size // 4, np.float32)
        rounds = max(5, min(2000, (64 << 20) // size))
        comm.allreduce(buffer)
        MPI.COMM_WORLD.Barrier()
        start = time.perf_counter()
        for _ in range(rounds):
            comm.allreduce(buffer)
        seconds = (time.perf_counter() - start) / rounds
        seconds = MPI.COMM_WORLD.allreduce(seconds, op=MPI.MAX)
        algbw = size / seconds
        rows.append(
            {
                "bytes": size,
                "us": seconds * 1e6,
                "algbw_GBps": algbw / 1e9,
                "busbw_GBps": algbw * 2 * (comm.size - 1) / comm.size / 1e9,
            }
        )
    return rows if comm.rank == 0 else None


def run_json(command: list[str]) -> object:
    """Run a worker; its last stdout line is JSON."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=ROOT)
    if done.returncode:
        sys.exit(f"{' '.join(command)} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nets", default="lenet,cifar10_quick,caffenet")
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--min-iters", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=3, help="alternating 1-process/2-rank runs")
    parser.add_argument("--json", default=None, help="Also write the rows as JSON lines.")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--ranks", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--sweep", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker:
        if args.ranks == 1:
            result = worker_alone(args.worker, args.seconds, args.min_iters)
        else:
            result = worker_ranks(args.worker, args.seconds, args.min_iters)
        if result is not None:
            print(json.dumps(result))
        return
    if args.sweep:
        rows = sweep()
        if rows is not None:
            print(json.dumps(rows))
        return

    mpiexec = shutil.which("mpiexec", path=str(Path(sys.executable).parent)) or "mpiexec"
    me = [sys.executable, str(Path(__file__).resolve())]
    timing = ["--seconds", str(args.seconds), "--min-iters", str(args.min_iters)]
    rows: list[dict] = []
    print(
        f"{'net':14} {'batch':>5} {'1 proc img/s':>12} {'fwd ms':>8} {'bwd ms':>8} "
        f"{'upd ms':>7} {'2 ranks img/s':>13} {'efficiency':>10} {'grad MB':>8} "
        f"{'buckets':>7} {'allreduce ms':>12} {'exposed ms':>10} {'hidden':>6} "
        f"{'efficiency spread':>17}"
    )
    for name in args.nets.split(","):
        rounds = []
        for _ in range(args.rounds):
            alone = run_json([*me, "--worker", name, "--ranks", "1", *timing])
            ranks = run_json([mpiexec, "-n", "2", *me, "--worker", name, "--ranks", "2", *timing])
            rounds.append((ranks["images_per_s"] / (2 * alone["images_per_s"]), alone, ranks))
        rounds.sort(key=lambda r: r[0])
        efficiency, alone, ranks = rounds[len(rounds) // 2]
        spread = f"{rounds[0][0]:.1%}-{rounds[-1][0]:.1%}"
        print(
            f"{name:14} {alone['batch']:5d} {alone['images_per_s']:12.1f} "
            f"{alone['fwd_ms']:8.1f} {alone['bwd_ms']:8.1f} {alone['update_ms']:7.1f} "
            f"{ranks['images_per_s']:13.1f} {efficiency:10.1%} "
            f"{alone['grad_bytes'] / 1e6:8.2f} {ranks['buckets']:7d} "
            f"{ranks['allreduce_ms']:12.2f} {ranks['exposed_ms']:10.2f} {ranks['hidden']:6.0%} "
            f"{spread:>17}",
            flush=True,
        )
        rows.append(
            {
                **alone,
                "two_ranks": ranks,
                "efficiency": efficiency,
                "efficiency_rounds": [r[0] for r in rounds],
            }
        )
    sweep_rows = run_json([mpiexec, "-n", "2", *me, "--sweep"])
    print(f"\nall-reduce, 2 ranks: {'bytes':>10} {'us':>10} {'algbw GB/s':>11} {'busbw GB/s':>11}")
    for row in sweep_rows:
        print(
            f"{'':21}{row['bytes']:10d} {row['us']:10.1f} {row['algbw_GBps']:11.3f} "
            f"{row['busbw_GBps']:11.3f}"
        )
    print(f"latency (4 B): {sweep_rows[0]['us']:.1f} us; ", end="")
    print(f"bandwidth (64 MiB): {sweep_rows[-1]['busbw_GBps']:.2f} GB/s bus")
    if args.json:
        with open(args.json, "w") as out:
            for row in rows:
                out.write(json.dumps(row) + "\n")
            out.write(json.dumps({"allreduce_sweep": sweep_rows}) + "\n")


if __name__ == "__main__":
    main()
