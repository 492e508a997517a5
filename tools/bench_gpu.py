"""Training throughput and peak memory of netforge against PyTorch on one GPU (issue 7).

Usage (from the repository root)::

    PYTHONPATH=. python tools/bench_gpu.py [--device gpu|cpu] [--gpu 0]
        [--nets caffenet,googlenet] [--batch caffenet=256,googlenet=32]
        [--rounds 3] [--seconds 5] [--warmup 3] [--no-torch] [--json PATH]

    # smoke test of the script logic on the CPU (tiny batches, one iteration per round):
    PYTHONPATH=. python tools/bench_gpu.py --device cpu --batch caffenet=2,googlenet=2 \\
        --rounds 1 --seconds 0 --warmup 1

For each net, the TRAIN-phase prototxt in models/ (BVLC's CaffeNet and GoogLeNet train_val)
has its data layers replaced by Input layers holding one fixed batch of random images and
labels, copied to the device once: the figures are the layers and the solver, not data loading.

netforge trains it with its SGD solver and the hyper-parameters of the net's solver.prototxt
(momentum, weight decay, ``lr_mult``/``decay_mult`` as the prototxt says; Caffe folds the rate
into the momentum, PyTorch does not, which costs the same). PyTorch trains the same layers,
translated one for one from the netforge net (LRN across channels, ceil-mode pooling,
in-place ReLU, the inception branches joined by Concat, the weighted auxiliary losses), with
``torch.optim.SGD`` (foreach) and the same per-parameter rates and decays.

Both run float32 with TF32 off: ``CUPY_TF32=0`` is set before cupy is imported, and
``torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False``. PyTorch
uses cuDNN with ``cudnn.benchmark = True`` (its fastest configuration); netforge has no cuDNN
path. The two alternate for ``--rounds`` rounds of about ``--seconds`` each, after
``--warmup`` iterations, so that both see the same clocks; images/s are medians over rounds
and the ratio is the median of the per-round ratios netforge / PyTorch (above 1: netforge is
faster; the issue's target is >= 0.8).

Peak GPU memory, per framework and net, counts everything the framework allocated from
building the net to the end of the warm-up: for netforge the high-water mark of bytes in use
in cupy's memory pool (tracked by a counting allocator during the build and warm-up only, so
the timed rounds run on the plain pool) and the bytes the pool holds at the end; for PyTorch
``torch.cuda.max_memory_allocated`` and ``max_memory_reserved``. On the CPU no memory is
reported.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# cupy reads CUPY_TF32 when it first runs a matmul; set it before anything imports cupy.
os.environ["CUPY_TF32"] = "0"

import numpy as np  # noqa: E402

import netforge  # noqa: E402
from netforge.graph import replace_data_layers
from netforge.net import Net  # noqa: E402
from netforge.proto import pb  # noqa: E402
from netforge.prototxt import read_net  # noqa: E402
from netforge.solvers import get_solver, read_solver_param  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Bench:
    """A benchmarked net: its folder under models/, default batch and per-image input shape."""

    folder: str
    batch: int
    item: tuple[int, int, int]
    classes: int = 1000

    @property
    def prototxt(self) -> Path:
        return ROOT / "models" / self.folder / "train_val.prototxt"

    @property
    def solver(self) -> Path:
        return ROOT / "models" / self.folder / "solver.prototxt"


BENCHES = {
    "caffenet": Bench("bvlc_reference_caffenet", 256, (3, 227, 227)),
    "googlenet": Bench("bvlc_googlenet", 32, (3, 224, 224)),
}


def train_net_param(bench: Bench, batch: int) -> pb.NetParameter:
    """The net of ``bench`` with every data layer replaced by an Input layer of the same name,
    rules and tops: ``data`` (batch, C, H, W) and ``label`` (batch,)."""
    param, _ = replace_data_layers(read_net(bench.prototxt), bench.item, batch=batch)
    return param


def solver_param(bench: Bench, batch: int) -> pb.SolverParameter:
    """The net's own solver settings, without test nets, display, snapshots or a data source."""
    param = read_solver_param(bench.solver)
    for name in ("net", "train_net", "test_net", "test_iter", "test_interval", "snapshot_prefix"):
        param.ClearField(name)
    param.net_param.CopyFrom(train_net_param(bench, batch))
    param.display = 0
    param.snapshot = 0
    param.snapshot_after_train = False
    param.max_iter = 10**9
    param.random_seed = 1
    return param


@dataclass
class Device:
    """Where both frameworks run: synchronisation and memory accounting per framework."""

    gpu: int | None  # None: the CPU

    @property
    def is_gpu(self) -> bool:
        return self.gpu is not None

    def backend(self) -> Any:
        return netforge.backend.gpu(self.gpu) if self.is_gpu else netforge.backend.CPU


@dataclass
class PoolPeak:
    """A cupy allocator that records the high-water mark of bytes in use in a memory pool
    (cupy's pool keeps no such figure); installed only while nothing is being timed."""

    pool: Any
    peak: int = 0

    def malloc(self, size: int) -> Any:
        memory = self.pool.malloc(size)
        self.peak = max(self.peak, self.pool.used_bytes())
        return memory


# -- the trainers ---------------------------------------------------------------------------
class NetforgeTrainer:
    """netforge's SGD solver on the benchmark net, inputs written once on the device."""

    name = "netforge"

    def __init__(self, bench: Bench, batch: int, device: Device) -> None:
        self.device = device
        self.solver = get_solver(solver_param(bench, batch), backend=device.backend())
        net = self.solver.net
        # One fixed batch, drawn on the host and copied to the device once.
        rng = np.random.default_rng(0)
        data = rng.standard_normal((batch, *bench.item), dtype=np.float32)
        labels = rng.integers(0, bench.classes, batch).astype(np.float32)
        net.blobs["data"].data = net.backend.asarray(data)
        net.blobs["label"].data = net.backend.asarray(labels)

    @property
    def net(self) -> Net:
        return self.solver.net

    def run(self, iterations: int) -> None:
        self.solver.step(iterations)
        if self.device.is_gpu:
            self.net.backend.xp.cuda.Device(self.device.gpu).synchronize()


class TorchTrainer:
    """The netforge net's layers in PyTorch, one module per Caffe layer, trained with SGD."""

    name = "pytorch"

    def __init__(self, net: Net, bench: Bench, batch: int, device: Device) -> None:
        import torch

        self.torch = torch
        self.device = device
        where = torch.device(f"cuda:{device.gpu}" if device.is_gpu else "cpu")
        torch.manual_seed(0)
        self.steps: list[tuple[Callable, list[str], list[str]]] = []
        groups: dict[tuple[float, float], list[Any]] = {}
        for layer, bottoms, tops in zip(net.layers, net.layer_bottoms, net.layer_tops):
            shapes = [net.blobs[b].shape for b in bottoms]
            module = torch_module(torch, layer, shapes)
            if module is None:
                continue
            if isinstance(module, torch.nn.Module):
                module.to(where)
                specs = list(layer.layer_param.param)
                for j, tensor in enumerate(module.parameters()):
                    spec = specs[j] if j < len(specs) else pb.ParamSpec()
                    groups.setdefault((spec.lr_mult, spec.decay_mult), []).append(tensor)
            self.steps.append((module, bottoms, tops))
        self.loss_weights = dict(net.loss_weights)
        solver = read_solver_param(bench.solver)
        self.optimizer = torch.optim.SGD(
            [
                {
                    "params": tensors,
                    "lr": solver.base_lr * lr_mult,
                    "weight_decay": solver.weight_decay * decay_mult,
                }
                for (lr_mult, decay_mult), tensors in groups.items()
            ],
            lr=solver.base_lr,
            momentum=solver.momentum,
            foreach=True,
        )
        generator = torch.Generator(device=where).manual_seed(0)
        self.inputs = {
            "data": torch.randn(
                (batch, *bench.item), generator=generator, device=where, dtype=torch.float32
            ),
            "label": torch.randint(0, bench.classes, (batch,), generator=generator, device=where),
        }
        self._check_shapes(net)

    def _forward(self) -> dict[str, Any]:
        blobs = dict(self.inputs)
        for module, bottoms, tops in self.steps:
            outputs = module(*(blobs[b] for b in bottoms))
            if len(tops) == 1:
                blobs[tops[0]] = outputs
            else:
                blobs.update(zip(tops, outputs))
        return blobs

    def _check_shapes(self, net: Net) -> None:
        """Every PyTorch tensor has the shape of the netforge blob of the same name."""
        with self.torch.no_grad():
            blobs = self._forward()
        for name, value in blobs.items():
            if tuple(value.shape) != net.blobs[name].shape:
                raise SystemExit(
                    f"bench_gpu: PyTorch's {name} is {tuple(value.shape)}, netforge's is "
                    f"{net.blobs[name].shape}: the translation of the net is wrong"
                )

    def run(self, iterations: int) -> None:
        for _ in range(iterations):
            self.optimizer.zero_grad(set_to_none=True)
            blobs = self._forward()
            loss = sum(weight * blobs[name] for name, weight in self.loss_weights.items())
            loss.backward()
            self.optimizer.step()
        if self.device.is_gpu:
            self.torch.cuda.synchronize(self.device.gpu)


def _pair(values: Any, single: int, default: int) -> int:
    """Caffe's square kernel/stride/pad: the first repeated value, else the _h field if set."""
    if len(values):
        return values[0]
    return single or default


def torch_module(torch: Any, layer: Any, shapes: list[tuple[int, ...]]) -> Any:
    """The PyTorch module (or function of the bottoms) computing ``layer`` as Caffe does, or
    None for layers that move no data (Input, Split: PyTorch's autograd sums the fan-out)."""
    nn, functional = torch.nn, torch.nn.functional
    p = layer.layer_param
    kind = p.type
    in_place = list(p.bottom) == list(p.top)
    if kind in ("Input", "Split"):
        if kind == "Split":
            return lambda x: tuple(x for _ in p.top)
        return None
    if kind == "Convolution":
        c = p.convolution_param
        if c.kernel_h != c.kernel_w or c.stride_h != c.stride_w or c.pad_h != c.pad_w:
            raise SystemExit(f"bench_gpu: {p.name}: only square kernels are translated")
        return nn.Conv2d(
            shapes[0][1],
            c.num_output,
            _pair(c.kernel_size, c.kernel_h, 0),
            stride=_pair(c.stride, c.stride_h, 1),
            padding=_pair(c.pad, c.pad_h, 0),
            dilation=c.dilation[0] if len(c.dilation) else 1,
            groups=c.group,
            bias=c.bias_term,
        )
    if kind == "Pooling":
        q = p.pooling_param
        if q.global_pooling:
            raise SystemExit(f"bench_gpu: {p.name}: global pooling is not translated")
        size, stride, pad = q.kernel_size or q.kernel_h, q.stride or q.stride_h, q.pad or q.pad_h
        # Caffe rounds the pooled size up, clipping a last window that starts in the padding:
        # PyTorch's ceil_mode rule; Caffe's average divides by the window clipped to the
        # padded input, as count_include_pad=True does.
        if q.pool == pb.PoolingParameter.MAX:
            return nn.MaxPool2d(size, stride, pad, ceil_mode=True)
        if q.pool == pb.PoolingParameter.AVE:
            return nn.AvgPool2d(size, stride, pad, ceil_mode=True, count_include_pad=True)
        raise SystemExit(f"bench_gpu: {p.name}: only MAX and AVE pooling are translated")
    if kind == "ReLU":
        if p.relu_param.negative_slope:
            return nn.LeakyReLU(p.relu_param.negative_slope, inplace=in_place)
        return nn.ReLU(inplace=in_place)
    if kind == "LRN":
        q = p.lrn_param
        if q.norm_region != pb.LRNParameter.ACROSS_CHANNELS:
            raise SystemExit(f"bench_gpu: {p.name}: only LRN across channels is translated")
        # Both divide by (k + α/n · Σ x²)^β over n channels centred on each one.
        return nn.LocalResponseNorm(q.local_size, q.alpha, q.beta, q.k)
    if kind == "Dropout":
        # Out of place: PyTorch's ReLU keeps its output for backward, so an in-place dropout
        # after an in-place ReLU would corrupt it (netforge's dropout keeps a mask instead).
        return nn.Dropout(p.dropout_param.dropout_ratio)
    if kind == "InnerProduct":
        q = p.inner_product_param
        axis = q.axis % len(shapes[0])
        inputs = int(np.prod(shapes[0][axis:]))
        return nn.Sequential(nn.Flatten(axis), nn.Linear(inputs, q.num_output, bias=q.bias_term))
    if kind == "Concat":
        axis = p.concat_param.axis
        return lambda *xs: torch.cat(xs, dim=axis)
    if kind == "SoftmaxWithLoss":
        # Caffe's default normalization (VALID, no ignore_label): the mean over the batch.
        return lambda scores, labels: functional.cross_entropy(scores, labels)
    raise SystemExit(f"bench_gpu: no PyTorch translation for layer type {kind} ({p.name})")


# -- measurement ----------------------------------------------------------------------------
@dataclass
class Result:
    """One net's figures: images/s per round and framework, and peak memory in bytes."""

    net: str
    batch: int
    rates: dict[str, list[float]] = field(default_factory=dict)
    iterations: dict[str, int] = field(default_factory=dict)
    memory: dict[str, dict[str, int]] = field(default_factory=dict)

    def median(self, name: str) -> float:
        return statistics.median(self.rates[name])

    @property
    def ratio(self) -> float | None:
        if "pytorch" not in self.rates:
            return None
        pairs = zip(self.rates["netforge"], self.rates["pytorch"])
        return statistics.median(a / b for a, b in pairs)

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "net": self.net,
            "batch": self.batch,
            "rates": self.rates,
            "iterations_per_round": self.iterations,
            "memory_bytes": self.memory,
        }
        for name in self.rates:
            out[f"{name}_img_s"] = self.median(name)
        out["ratio"] = self.ratio
        return out


def timed(trainer: Any, iterations: int) -> float:
    start = time.perf_counter()
    trainer.run(iterations)
    return time.perf_counter() - start


def calibrate(trainer: Any, warmup: int, seconds: float) -> int:
    """Run ``warmup`` iterations (the last one timed); how many iterations fill ``seconds``."""
    if warmup > 1:
        trainer.run(warmup - 1)
    per_iteration = timed(trainer, 1)
    return max(1, round(seconds / per_iteration))


def build_netforge(bench: Bench, batch: int, device: Device, warmup: int, seconds: float):
    """The netforge trainer, warmed up, its iteration count and its memory figures."""
    if not device.is_gpu:
        trainer = NetforgeTrainer(bench, batch, device)
        return trainer, calibrate(trainer, warmup, seconds), {}
    import cupy

    pool = cupy.get_default_memory_pool()
    pool.free_all_blocks()
    counter = PoolPeak(pool)
    cupy.cuda.set_allocator(counter.malloc)
    try:
        trainer = NetforgeTrainer(bench, batch, device)
        count = calibrate(trainer, warmup, seconds)
    finally:
        cupy.cuda.set_allocator(pool.malloc)
    return trainer, count, {"peak_used": counter.peak, "pool_held": pool.total_bytes()}


def build_torch(net: Net, bench: Bench, batch: int, device: Device, warmup: int, seconds: float):
    """The PyTorch trainer, warmed up, its iteration count and its memory figures."""
    import torch

    if device.is_gpu:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device.gpu)
    trainer = TorchTrainer(net, bench, batch, device)
    count = calibrate(trainer, warmup, seconds)
    if not device.is_gpu:
        return trainer, count, {}
    memory = {
        "peak_allocated": torch.cuda.max_memory_allocated(device.gpu),
        "peak_reserved": torch.cuda.max_memory_reserved(device.gpu),
    }
    return trainer, count, memory


def bench_net(name: str, batch: int, device: Device, args: argparse.Namespace) -> Result:
    """Build both trainers for net ``name``, then alternate timed rounds between them."""
    bench = BENCHES[name]
    result = Result(name, batch)
    netforge_trainer, count, memory = build_netforge(
        bench, batch, device, args.warmup, args.seconds
    )
    trainers = [(netforge_trainer, count)]
    result.memory["netforge"] = memory
    if args.torch:
        torch_trainer, count, memory = build_torch(
            netforge_trainer.net, bench, batch, device, args.warmup, args.seconds
        )
        trainers.append((torch_trainer, count))
        result.memory["pytorch"] = memory
    for trainer, count in trainers:
        result.rates[trainer.name] = []
        result.iterations[trainer.name] = count
    for _ in range(args.rounds):
        for trainer, count in trainers:
            result.rates[trainer.name].append(count * batch / timed(trainer, count))
    return result


def release(device: Device) -> None:
    """Give the last net's memory back before the next net is measured (its trainers are
    gone once ``bench_net`` has returned)."""
    gc.collect()
    if not device.is_gpu:
        return
    import cupy

    cupy.get_default_memory_pool().free_all_blocks()
    if "torch" in sys.modules:
        sys.modules["torch"].cuda.empty_cache()


# -- output ---------------------------------------------------------------------------------
def gib(value: int | None) -> str:
    return "-" if value is None else f"{value / 2**30:.2f}"


def report_lines(result: Result) -> list[str]:
    lines = []
    for name, rates in result.rates.items():
        memory = result.memory.get(name, {})
        peak = memory.get("peak_used", memory.get("peak_allocated"))
        held = memory.get("pool_held", memory.get("peak_reserved"))
        lines.append(
            f"{result.net:10} {result.batch:5d} {name:9} {result.median(name):10.1f} "
            f"{gib(peak):>10} {gib(held):>10}   rounds: " + ", ".join(f"{r:.1f}" for r in rates)
        )
    if result.ratio is not None:
        lines.append(f"{result.net:10} ratio netforge / PyTorch: {result.ratio:.3f}")
    return lines


def environment(device: Device, with_torch: bool) -> dict[str, Any]:
    """Versions and the settings that decide the comparison (TF32, cuDNN)."""
    info: dict[str, Any] = {
        "netforge": netforge.__version__,
        "numpy": np.__version__,
        "python": sys.version.split()[0],
        "CUPY_TF32": os.environ["CUPY_TF32"],
    }
    if device.is_gpu:
        import cupy

        props = cupy.cuda.runtime.getDeviceProperties(device.gpu)
        name = props["name"]
        info["gpu"] = name.decode() if isinstance(name, bytes) else name
        info["cupy"] = cupy.__version__
        info["cuda_runtime"] = cupy.cuda.runtime.runtimeGetVersion()
    if with_torch:
        import torch

        info["torch"] = torch.__version__
        info["torch_matmul_tf32"] = torch.backends.cuda.matmul.allow_tf32
        info["torch_cudnn_tf32"] = torch.backends.cudnn.allow_tf32
        info["torch_cudnn_benchmark"] = torch.backends.cudnn.benchmark
        if device.is_gpu:
            info["cudnn"] = torch.backends.cudnn.version()
    return info


def setup_torch(device: Device) -> bool:
    """Import PyTorch with TF32 off and cuDNN autotuning on; False when it is missing."""
    try:
        import torch
    except ImportError:
        print("PyTorch is not installed: netforge only")
        return False
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cudnn.benchmark = True
    torch.set_float32_matmul_precision("highest")
    if device.is_gpu and not torch.cuda.is_available():
        raise SystemExit("bench_gpu: PyTorch cannot see a CUDA GPU (run with --no-torch)")
    return True


def parse_batches(text: str) -> dict[str, int]:
    batches = {name: bench.batch for name, bench in BENCHES.items()}
    for item in filter(None, text.split(",")):
        name, _, value = item.partition("=")
        if name not in BENCHES or not value.isdigit() or int(value) <= 0:
            raise SystemExit(f"bench_gpu: --batch takes NET=N items for {', '.join(BENCHES)}")
        batches[name] = int(value)
    return batches


def main(argv: list[str] | None = None) -> list[Result]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("gpu", "cpu"), default="gpu")
    parser.add_argument("--gpu", type=int, default=0, help="CUDA device id")
    parser.add_argument("--nets", default=",".join(BENCHES), help="comma list of nets")
    parser.add_argument("--batch", default="", help="NET=N overrides, e.g. caffenet=128")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=5.0, help="per round and framework")
    parser.add_argument("--warmup", type=int, default=3, help="iterations before timing")
    parser.add_argument("--no-torch", dest="torch", action="store_false")
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    args = parser.parse_args(argv)
    names = [n for n in args.nets.split(",") if n]
    unknown = sorted(set(names) - set(BENCHES))
    if unknown:
        raise SystemExit(f"bench_gpu: unknown nets {unknown}; choose from {', '.join(BENCHES)}")
    if args.rounds < 1 or args.warmup < 1:
        raise SystemExit("bench_gpu: --rounds and --warmup must be at least 1")
    batches = parse_batches(args.batch)
    device = Device(args.gpu if args.device == "gpu" else None)
    if device.is_gpu:
        device.backend()  # a clear DeviceError now rather than halfway through
    args.torch = args.torch and setup_torch(device)
    info = environment(device, args.torch)
    print(" ".join(f"{key}={value}" for key, value in info.items()), flush=True)
    print(
        f"{'net':10} {'batch':>5} {'framework':9} {'images/s':>10} {'peak GiB':>10} "
        f"{'held GiB':>10}",
        flush=True,
    )
    results = []
    for name in names:
        result = bench_net(name, batches[name], device, args)
        release(device)
        results.append(result)
        for line in report_lines(result):
            print(line, flush=True)
    if args.json:
        args.json.write_text(
            json.dumps({"environment": info, "results": [r.as_dict() for r in results]}, indent=2)
        )
    return results


if __name__ == "__main__":
    main()
