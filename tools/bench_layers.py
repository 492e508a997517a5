"""Training throughput of netforge against PyTorch on BVLC's LeNet, CIFAR-10 quick and CaffeNet.

Usage (from the repository root)::

    PYTHONPATH=. python tools/bench_layers.py [--nets lenet,cifar10_quick,caffenet]
        [--rounds 3] [--seconds 2] [--no-torch] [--no-memory] [--no-gemm] [--layers]

For each net, the TRAIN-phase prototxt in models/ is read and its data layers replaced by Input
layers holding random images and labels (one fixed batch: the benchmark measures the layers
and the solver, not data loading). netforge trains it with its SGD solver (momentum 0.9, weight
decay 5e-4, ``lr_mult`` 2 on biases as the prototxts say); PyTorch (if installed; it is not a
netforge dependency) trains the same layers, translated one for one, with ``torch.optim.SGD``
and the same hyper-parameters, in the same process. The two alternate for ``--rounds`` rounds
of about ``--seconds`` each (at least 20 iterations), after two warm-up iterations, so that
both see the same machine load; the figures are the medians over rounds, and the ratio is
the median of the per-round ratios netforge / PyTorch (above 1: netforge is faster), with
the lowest and highest round's ratio beside it ("rounds").

"outside layers" is the share of netforge's iteration spent outside ``net.forward_backward``:
the solver's update, regularization and bookkeeping (Caffe's ApplyUpdate and Step). For
PyTorch the same column counts ``optimizer.zero_grad`` and ``optimizer.step``.

Peak memory is measured in a fresh subprocess per library and net: the peak resident set size
(Linux ``VmHWM``) after building the net and training three iterations, minus the peak after
the imports and what each library's first operation starts on any net: torch's import and one
tiny convolution (9 MiB here); with netforge's jit extra, numba's import and the start of its
compiler, which the first kernel pays for (58 MiB here). It includes BLAS and allocator
buffers, which tracemalloc misses.

The GEMM section times a 2048x2048 float32 product (best of 10) in subprocesses that import
numpy directly, under different ``OPENBLAS_CORETYPE`` settings, and names the kernel family
numpy's OpenBLAS chose. This process imports netforge before numpy, so it runs with the
kernel choice of ``netforge/_blas.py``.
"""

from __future__ import annotations

# First: importing netforge picks OpenBLAS's kernels, which must happen before numpy loads.
import netforge

# isort: split
import argparse
import json
import logging
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from bench_torch import torch_peer

from netforge import _blas
from netforge.net import Net
from netforge.proto import pb
from netforge.prototxt import read_net
from netforge.timing import time_net

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Bench:
    """A benchmarked net: its train prototxt, batch size and per-image input shape."""

    prototxt: str
    batch: int
    item: tuple[int, int, int]
    classes: int


BENCHES = {
    "lenet": Bench("models/mnist/lenet_train_test.prototxt", 64, (1, 28, 28), 10),
    "cifar10_quick": Bench(
        "models/cifar10/cifar10_quick_train_test.prototxt", 100, (3, 32, 32), 10
    ),
    "caffenet": Bench("models/bvlc_reference_caffenet/train_val.prototxt", 32, (3, 227, 227), 1000),
}
DATA_LAYERS = {"Data": "data_param", "ImageData": "image_data_param", "HDF5Data": "hdf5_data_param"}
SOLVER = {"base_lr": 0.01, "momentum": 0.9, "weight_decay": 5e-4}


def sgd_solver(net_param: pb.NetParameter):
    """The benchmarks' solver: SGD at a fixed rate with ``SOLVER``'s settings, on the CPU,
    never displaying, testing or snapshotting."""
    solver_param = pb.SolverParameter(
        net_param=net_param,
        type="SGD",
        lr_policy="fixed",
        max_iter=10**9,
        display=0,
        snapshot_after_train=False,
        solver_mode=pb.SolverParameter.CPU,
        random_seed=1,
        **SOLVER,
    )
    return netforge.get_solver(solver_param)


def train_net_param(bench: Bench) -> pb.NetParameter:
    """The TRAIN net of ``bench`` with its data layers replaced by Input (data, label)."""
    param = read_net(ROOT / bench.prototxt)
    for layer in param.layer:
        if layer.type in DATA_LAYERS:
            for field in (*DATA_LAYERS.values(), "transform_param"):
                layer.ClearField(field)
            layer.type = "Input"
            layer.input_param.shape.add().dim.extend((bench.batch, *bench.item))
            layer.input_param.shape.add().dim.append(bench.batch)
    return param


def random_batch(bench: Bench, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A batch of standard normal images and uniformly drawn labels."""
    rng = np.random.default_rng(seed)
    data = rng.standard_normal((bench.batch, *bench.item), dtype=np.float32)
    labels = rng.integers(0, bench.classes, bench.batch).astype(np.float32)
    return data, labels


# -- netforge ------------------------------------------------------------------------------
class NetforgeTrainer:
    """netforge's SGD solver on the benchmark net, timing ``forward_backward`` inside it."""

    def __init__(self, bench: Bench) -> None:
        self.solver = sgd_solver(train_net_param(bench))
        net = self.solver.net
        data, labels = random_batch(bench)
        net.blobs["data"].data = data
        net.blobs["label"].data = labels
        self.layer_seconds = 0.0
        forward_backward = net.forward_backward

        def timed() -> float:
            start = time.perf_counter()
            loss = forward_backward()
            self.layer_seconds += time.perf_counter() - start
            return loss

        net.forward_backward = timed  # the solver calls it once per iteration

    def reset_clock(self) -> None:
        self.layer_seconds = 0.0

    def outside_seconds(self, elapsed: float) -> float:
        """Time outside the layers since ``reset_clock``, of ``elapsed`` in all."""
        return elapsed - self.layer_seconds

    def run(self, iterations: int) -> None:
        self.solver.step(iterations)


# -- PyTorch -------------------------------------------------------------------------------
class TorchTrainer:
    """The same layers in PyTorch, built from the netforge net's layers and blob shapes."""

    def __init__(self, bench: Bench) -> None:
        import torch

        self.torch = torch
        torch.manual_seed(0)
        net = Net(train_net_param(bench), pb.TRAIN)
        self.steps: list[tuple[object, list[str], list[str]]] = []
        weights, biases = [], []
        for layer, bottoms, tops in zip(net.layers, net.layer_bottoms, net.layer_tops):
            module = self._module(layer, net.blobs[bottoms[0]].shape if bottoms else None)
            if module is None:
                continue
            for name, p in getattr(module, "named_parameters", lambda: [])():
                (biases if name == "bias" else weights).append(p)
            self.steps.append((module, bottoms, tops))
        lr, momentum, decay = SOLVER["base_lr"], SOLVER["momentum"], SOLVER["weight_decay"]
        self.optimizer = torch.optim.SGD(
            [{"params": weights, "lr": lr}, {"params": biases, "lr": 2 * lr}],
            lr=lr,
            momentum=momentum,
            weight_decay=decay,
        )
        self.optimizer_seconds = 0.0
        data, labels = random_batch(bench)
        self.inputs = {"data": torch.from_numpy(data), "label": torch.from_numpy(labels).long()}
        self._check_shapes(net)

    def _module(self, layer, bottom_shape):
        """The PyTorch module (or function) computing ``layer``; None for Input."""
        nn, F = self.torch.nn, self.torch.nn.functional
        p = layer.layer_param
        if layer.type == "Input":
            return None
        if layer.type == "Split":
            return lambda x: x  # _forward gives every top the same tensor
        if layer.type == "Convolution":
            c = p.convolution_param
            return nn.Conv2d(
                bottom_shape[1],
                c.num_output,
                c.kernel_size[0],
                stride=c.stride[0] if c.stride else 1,
                padding=c.pad[0] if c.pad else 0,
                groups=c.group,
                bias=c.bias_term,
            )
        if layer.type == "Pooling":
            q = p.pooling_param
            kind = nn.MaxPool2d if q.pool == pb.PoolingParameter.MAX else nn.AvgPool2d
            # Caffe rounds pooled sizes up (ceil), as ceil_mode does.
            return kind(q.kernel_size, q.stride, q.pad, ceil_mode=True)
        if layer.type == "ReLU":
            return nn.ReLU(inplace=p.bottom[0] == p.top[0])
        if layer.type == "LRN":
            q = p.lrn_param
            return nn.LocalResponseNorm(q.local_size, q.alpha, q.beta, q.k)
        if layer.type == "Dropout":
            # Not in place: autograd needs the in-place ReLU's output that Dropout follows.
            return nn.Dropout(p.dropout_param.dropout_ratio)
        if layer.type == "InnerProduct":
            inputs = int(np.prod(bottom_shape[1:]))
            linear = nn.Linear(inputs, p.inner_product_param.num_output)
            return nn.Sequential(nn.Flatten(), linear)
        if layer.type == "SoftmaxWithLoss":
            return lambda scores, labels: F.cross_entropy(scores, labels)
        raise SystemExit(f"bench: no PyTorch translation for layer type {layer.type}")

    def _forward(self):
        blobs = dict(self.inputs)
        for module, bottoms, tops in self.steps:
            value = module(*(blobs[b] for b in bottoms))
            blobs.update(dict.fromkeys(tops, value))
        return blobs

    def _check_shapes(self, net: Net) -> None:
        with self.torch.no_grad():
            blobs = self._forward()
        for name, value in blobs.items():
            if name in net.blobs and tuple(value.shape) != net.blobs[name].shape:
                raise SystemExit(
                    f"bench: PyTorch {name} is {tuple(value.shape)}, netforge's is "
                    f"{net.blobs[name].shape}"
                )

    def reset_clock(self) -> None:
        self.optimizer_seconds = 0.0

    def outside_seconds(self, elapsed: float) -> float:
        """Time in ``zero_grad`` and ``step`` since ``reset_clock``."""
        return self.optimizer_seconds

    def run(self, iterations: int) -> None:
        clock = time.perf_counter
        for _ in range(iterations):
            start = clock()
            self.optimizer.zero_grad()
            self.optimizer_seconds += clock() - start
            loss = self._forward()["loss"]
            loss.backward()
            start = clock()
            self.optimizer.step()
            self.optimizer_seconds += clock() - start


# -- measurements --------------------------------------------------------------------------
def timed_run(trainer, iterations: int) -> float:
    start = time.perf_counter()
    trainer.run(iterations)
    return time.perf_counter() - start


#: Iterations per round at least, in one ``solver.step`` call. A call's last update also
#: copies the steps into the diffs (what Caffe leaves there after ``step``); ``netforge
#: train`` makes one call for the whole run and pays that once, so rounds of a few
#: iterations (CaffeNet: 4 in 2 s) would count it as a per-iteration cost.
MIN_ITERATIONS = 20


def iterations_for(trainer, seconds: float) -> int:
    """How many iterations fill about ``seconds`` (after the two warm-up ones it times),
    and at least ``MIN_ITERATIONS``."""
    per_iteration = timed_run(trainer, 2) / 2
    return max(MIN_ITERATIONS, round(seconds / per_iteration))


def bench_speed(name: str, rounds: int, seconds: float, with_torch: bool) -> dict:
    """Images/s of each library (median over rounds), their ratio, and netforge's share of
    time outside the layers, for net ``name``."""
    bench = BENCHES[name]
    trainers = {"netforge": NetforgeTrainer(bench)}
    if with_torch:
        trainers["pytorch"] = TorchTrainer(bench)
    counts = {k: iterations_for(t, seconds) for k, t in trainers.items()}
    rates = {k: [] for k in trainers}
    outside = {k: [] for k in trainers}
    for _ in range(rounds):
        for key, trainer in trainers.items():
            trainer.reset_clock()
            elapsed = timed_run(trainer, counts[key])
            rates[key].append(counts[key] * bench.batch / elapsed)
            outside[key].append(trainer.outside_seconds(elapsed) / elapsed)
    result = {
        "net": name,
        "batch": bench.batch,
        "netforge_img_s": statistics.median(rates["netforge"]),
        "outside_layers": statistics.median(outside["netforge"]),
    }
    if with_torch:
        result["pytorch_img_s"] = statistics.median(rates["pytorch"])
        result["pytorch_outside"] = statistics.median(outside["pytorch"])
        ratios = [a / b for a, b in zip(rates["netforge"], rates["pytorch"])]
        result["ratio"] = statistics.median(ratios)
        result["ratio_spread"] = (min(ratios), max(ratios))
    return result


def hot_layers(name: str, count: int = 5) -> list[tuple[str, float, float]]:
    """netforge's ``count`` slowest layers of ``name``: (layer, forward ms, backward ms),
    measured as ``netforge time`` does, over 10 iterations."""
    quiet = logging.getLogger("bench_layers.quiet")
    quiet.disabled = True
    net = NetforgeTrainer(BENCHES[name]).solver.net
    t = time_net(net, iterations=10, log=quiet)
    rows = list(zip(t.layer_names, t.forward_ms, t.backward_ms))
    return sorted(rows, key=lambda row: row[1] + row[2], reverse=True)[:count]


def peak_rss_mib() -> float:
    """This process's peak resident set size (Linux ``VmHWM``), in MiB.

    Not ``ru_maxrss``: Linux carries that across ``exec`` from the parent, so a child of a
    big benchmark process would report the parent's peak."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise SystemExit("bench: no VmHWM in /proc/self/status (the memory figures need Linux)")


def memory_child(library: str, name: str) -> None:
    """Subprocess body: print the peak RSS growth (MiB) of building and training ``name``."""
    bench = BENCHES[name]
    if library == "pytorch":
        import torch

        torch.set_num_threads(os.cpu_count() or 1)  # the import's cost belongs to the baseline
        # So does what its first operations start whatever the net (9 MiB here): one tiny
        # convolution's forward and backward.
        x = torch.ones(1, 1, 3, 3, requires_grad=True)
        torch.nn.functional.conv2d(x, torch.ones(1, 1, 2, 2)).sum().backward()
    else:
        # Likewise numba's, when the jit extra is there: its import (116 MiB resident here)
        # and the start of its compiler, which the first kernel pays for whatever the net
        # (LLVM, 58 MiB; later kernels add about 1 MiB between them), here on a function of
        # its own: library code, as torch's import is, not memory the net holds.
        from netforge.builtin_layers import _jit

        numba = _jit.numba()
        if numba is not None:
            numba.njit(lambda: 0)()
    baseline = peak_rss_mib()
    trainer = NetforgeTrainer(bench) if library == "netforge" else TorchTrainer(bench)
    trainer.run(3)
    peak = peak_rss_mib()
    print(json.dumps({"peak_mib": peak, "growth_mib": peak - baseline}))


def bench_memory(library: str, name: str) -> dict:
    out = subprocess.run(
        [sys.executable, __file__, "--memory-child", library, name],
        check=True,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


GEMM_CHILD = """
import ctypes, glob, os, time
import numpy as np
n = 2048
a = np.random.default_rng(0).standard_normal((n, n), dtype=np.float32)
a @ a
best = float("inf")
for _ in range(10):
    t = time.perf_counter(); a @ a; best = min(best, time.perf_counter() - t)
core = "?"
for lib in glob.glob(os.path.join(os.path.dirname(np.__path__[0]), "numpy.libs", "*openblas*")):
    try:
        f = ctypes.CDLL(lib).scipy_openblas_get_corename64_
        f.restype = ctypes.c_char_p
        core = f().decode()
    except (OSError, AttributeError):
        pass
print(2 * n**3 / best / 1e9, core)
"""


def bench_gemm() -> list[tuple[str, float, str]]:
    """(setting, GFLOP/s, OpenBLAS core) for the inherited environment and each override."""
    # What the user's environment said, before importing netforge changed it.
    launched = _blas.adjustment[0] if _blas.adjustment else os.environ.get("OPENBLAS_CORETYPE")
    settings = [(f"as launched ({launched or 'unset'})", launched or None)]
    settings += [(f"OPENBLAS_CORETYPE={c}", c) for c in ("Haswell", "SkylakeX")]
    settings.append(("OPENBLAS_CORETYPE unset", None))
    results = []
    for label, value in settings:
        env = {k: v for k, v in os.environ.items() if k != "OPENBLAS_CORETYPE"}
        if value is not None:
            env["OPENBLAS_CORETYPE"] = value
        out = subprocess.run(
            [sys.executable, "-c", GEMM_CHILD], capture_output=True, text=True, env=env
        )
        if out.returncode:
            # SkylakeX's kernels on a CPU without AVX-512 die of SIGILL: a setting to skip.
            results.append((label, float("nan"), f"none: the child exited {out.returncode}"))
            continue
        rate, core = out.stdout.split()
        results.append((label, float(rate), core))
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--nets", default=",".join(BENCHES), help="comma list of " + ", ".join(BENCHES)
    )
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=2.0, help="per round and library")
    parser.add_argument("--no-torch", action="store_true")
    parser.add_argument("--no-memory", action="store_true")
    parser.add_argument("--no-gemm", action="store_true")
    parser.add_argument("--layers", action="store_true", help="also list the slowest layers")
    parser.add_argument(
        "--memory-child", nargs=2, metavar=("LIBRARY", "NET"), help=argparse.SUPPRESS
    )
    args = parser.parse_args()
    if args.memory_child:
        memory_child(*args.memory_child)
        return
    with_torch = torch_peer(not args.no_torch)
    core = os.environ.get("OPENBLAS_CORETYPE", "(unset)")
    if _blas.adjustment:
        core += f" (netforge raised it from {_blas.adjustment[0] or 'unset'})"
    print(
        f"netforge {netforge.__version__}, numpy {np.__version__}, "
        f"OPENBLAS_CORETYPE={core}, {os.cpu_count()} CPUs"
    )
    names = args.nets.split(",")
    header = f"{'net':14} {'batch':>5} {'netforge img/s':>15} {'outside layers':>15}"
    if with_torch:
        header += f" {'PyTorch img/s':>14} {'outside':>8} {'ratio':>6} {'rounds':>9}"
    if not args.no_memory:
        header += f" {'netforge MiB':>13}" + (f" {'PyTorch MiB':>12}" if with_torch else "")
    print(header)
    for name in names:
        r = bench_speed(name, args.rounds, args.seconds, with_torch)
        line = f"{name:14} {r['batch']:5d} {r['netforge_img_s']:15.1f} {r['outside_layers']:14.1%}"
        if with_torch:
            low, high = r["ratio_spread"]
            line += f" {r['pytorch_img_s']:14.1f} {r['pytorch_outside']:7.1%} {r['ratio']:6.2f}"
            line += f" {low:.2f}-{high:.2f}"
        if not args.no_memory:
            line += f" {bench_memory('netforge', name)['growth_mib']:13.0f}"
            if with_torch:
                line += f" {bench_memory('pytorch', name)['growth_mib']:12.0f}"
        print(line, flush=True)
    if args.layers:
        print("\nnetforge's slowest layers (ms per iteration, forward + backward):")
        for name in names:
            hot = ", ".join(f"{layer} {f:.1f}+{b:.1f}" for layer, f, b in hot_layers(name))
            print(f"  {name:14} {hot}")
    if not args.no_gemm:
        print("\nfloat32 GEMM 2048x2048, numpy imported without netforge:")
        for label, rate, core in bench_gemm():
            print(f"  {label:32} {rate:7.1f} GFLOP/s  (OpenBLAS core {core})")


if __name__ == "__main__":
    main()
