"""Modern nets against PyTorch: ResNet-50 and GoogLeNet training, batch-1 inference latency.

Usage (from the repository root)::

    PYTHONPATH=. python tools/bench_models.py [--train resnet50,googlenet] [--batch 8]
        [--infer caffenet,googlenet,resnet50,squeezenet,mobilenet] [--rounds 3]
        [--seconds 3] [--layers NET] [--no-torch]

The nets are the prototxts in models/ (``MODELS``). Both libraries get the same weights:
netforge's net is filled with He-scaled random weights (the deploy prototxts carry no
fillers) and BatchNorm statistics, and the PyTorch modules, translated layer for layer from
netforge's built net, copy them. A PyTorch user's BatchNorm + Scale is one affine
``BatchNorm2d``, so a Scale that follows a BatchNorm in place is folded into it. Before
timing, both run one TEST-phase forward on the same batch and the net's outputs must agree
to 1e-3 of their largest magnitude (training nets: their losses), else the benchmark stops.

Training: ResNet-50 from its deploy prototxt (Input data + label, BatchNorm computing batch
statistics, SoftmaxWithLoss on fc1000) and GoogLeNet's train_val (its Data layers replaced by
Input, its three losses), at ``--batch`` random images, with SGD (momentum 0.9, weight decay
5e-4, as ``tools/bench_layers.py``). Inference: ``Net.forward()`` of the deploy net at batch 1
against the PyTorch modules under ``torch.inference_mode``. Each figure is the median over
``--rounds`` rounds in which the two libraries alternate, each running about ``--seconds``;
the spread is the smallest and largest round. The ratio is the median of the per-round
ratios, above 1 when netforge is faster.

``--layers NET`` prints the per-layer-type forward times of NET's batch-1 inference for both
libraries and netforge's slowest layers (``netforge.timing`` for a training net).
"""

from __future__ import annotations

# First: importing netforge picks OpenBLAS's kernels, which must happen before numpy loads.
import netforge

# isort: split
import argparse
import collections
import contextlib
import logging
import os
import statistics
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from bench_layers import SOLVER, sgd_solver
from bench_torch import torch_peer

from netforge.blob import Blob
from netforge.builtin_layers import _jit
from netforge.layer import Layer, create_layer
from netforge.net import Net
from netforge.proto import pb
from netforge.prototxt import read_net
from netforge.timing import time_net

ROOT = Path(__file__).resolve().parent.parent
MODELS = {
    "caffenet": "models/bvlc_reference_caffenet/deploy.prototxt",
    "googlenet": "models/bvlc_googlenet/deploy.prototxt",
    "resnet50": "models/resnet50/deploy.prototxt",
    "squeezenet": "models/squeezenet_v1.1/deploy.prototxt",
    "mobilenet": "models/mobilenet_v1/deploy.prototxt",
}
#: Training nets: (prototxt, whether it is a deploy net that needs a loss added).
TRAIN = {
    "resnet50": ("models/resnet50/deploy.prototxt", True),
    "googlenet": ("models/bvlc_googlenet/train_val.prototxt", False),
}
DATA_LAYERS = ("Data", "ImageData", "HDF5Data")
CLASSES = 1000


# -- the nets ------------------------------------------------------------------------------
def _input_layer(shape: tuple[int, ...], labels: bool) -> pb.LayerParameter:
    layer = pb.LayerParameter(name="input", type="Input", top=["data"])
    layer.input_param.shape.add().dim.extend(shape)
    if labels:
        layer.top.append("label")
        layer.input_param.shape.add().dim.append(shape[0])
    return layer


def deploy_param(name: str, batch: int = 1) -> pb.NetParameter:
    """The deploy net ``name`` with its input as an Input layer of ``batch`` images."""
    param = read_net(ROOT / MODELS[name])
    dims = list(param.input_dim) or [d for shape in param.input_shape[:1] for d in shape.dim]
    layers = list(param.layer)
    if dims:
        for field in ("input", "input_dim", "input_shape"):
            param.ClearField(field)
    else:  # an Input layer already
        dims = list(layers[0].input_param.shape[0].dim)
        layers = layers[1:]
    param.ClearField("layer")
    param.layer.append(_input_layer((batch, *dims[1:]), labels=False))
    param.layer.extend(layers)
    return param


def train_param(name: str, batch: int) -> pb.NetParameter:
    """Training net ``name`` at ``batch``: Input (data, label) instead of data layers; a
    deploy net's final Softmax becomes SoftmaxWithLoss and its BatchNorms lose
    ``use_global_stats`` (Caffe's default then: batch statistics in TRAIN)."""
    path, deploy = TRAIN[name]
    if deploy:
        param = deploy_param(name, batch)
        param.layer[0].CopyFrom(_input_layer((batch, 3, 224, 224), labels=True))
        last = param.layer[-1]
        last.type = "SoftmaxWithLoss"
        last.bottom.append("label")
        last.top[:] = ["loss"]
        for layer in param.layer:
            if layer.type == "BatchNorm":
                layer.batch_norm_param.ClearField("use_global_stats")
        return param
    param = read_net(ROOT / path)
    layers = [layer for layer in param.layer if layer.type not in DATA_LAYERS]
    param.ClearField("layer")
    param.layer.append(_input_layer((batch, 3, 224, 224), labels=True))
    param.layer.extend(layers)
    return param


def fill_weights(net: Net, seed: int = 0) -> None:
    """He-scaled normal weights, small biases, BatchNorm statistics near the identity and
    Scale factors that keep the residual sums bounded."""
    rng = np.random.default_rng(seed)
    for layer in net.layers:
        blobs = layer.blobs
        if layer.type in ("Convolution", "InnerProduct"):
            w = blobs[0].data
            fan_in = w[0].size
            w[...] = rng.standard_normal(w.shape) * np.sqrt(2.0 / fan_in)
            if len(blobs) > 1:
                blobs[1].data[...] = 0.01 * rng.standard_normal(blobs[1].shape)
        elif layer.type == "BatchNorm":
            blobs[0].data[...] = 0.1 * rng.standard_normal(blobs[0].shape)
            blobs[1].data[...] = rng.uniform(0.5, 1.5, blobs[1].shape)
            blobs[2].data[...] = 1.0
        elif layer.type == "Scale":
            blobs[0].data[...] = rng.uniform(0.3, 0.7, blobs[0].shape)
            if len(blobs) > 1:
                blobs[1].data[...] = 0.01 * rng.standard_normal(blobs[1].shape)


def random_batch(shape, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    data = rng.standard_normal(shape, dtype=np.float32)
    return data, rng.integers(0, CLASSES, shape[0]).astype(np.float32)


# -- PyTorch -------------------------------------------------------------------------------
class TorchNet:
    """A netforge net's layers as PyTorch modules holding copies of its weights."""

    def __init__(self, net: Net) -> None:
        import torch

        self.torch = torch
        self.steps: list[tuple[object, list[str], list[str]]] = []
        self.modules = torch.nn.ModuleList()
        #: Loss tops and their loss_weight.
        self.loss_weights: dict[str, float] = {}
        layers = list(zip(net.layers, net.layer_bottoms, net.layer_tops))
        folded = set()
        for i, (layer, bottoms, tops) in enumerate(layers):
            if i in folded:
                continue
            scale = None
            if layer.type == "BatchNorm" and i + 1 < len(layers):
                nxt, nb, _ = layers[i + 1]
                if nxt.type == "Scale" and nb == tops and len(nxt.blobs) == 2:
                    scale = nxt
                    folded.add(i + 1)
            module = self._module(layer, net.blobs[bottoms[0]].shape if bottoms else None, scale)
            if module is None:
                continue
            self.steps.append((module, bottoms, tops))
            if isinstance(module, torch.nn.Module):
                self.modules.append(module)

    def _module(self, layer, shape, scale):
        torch = self.torch
        nn, F = torch.nn, torch.nn.functional
        p, kind = layer.layer_param, layer.type
        t = lambda a: torch.from_numpy(np.array(a, dtype=np.float32))  # noqa: E731
        if kind in ("Input", "Accuracy", "Silence"):
            return None
        if kind == "Split":
            return lambda x: x  # forward gives every top the same tensor
        if kind == "Convolution":
            g = layer.geom
            conv = nn.Conv2d(
                shape[1], layer.num_output, g.kernel, g.stride, g.pad, g.dilation,
                groups=layer.group, bias=layer.bias_term,
            )  # fmt: skip
            with torch.no_grad():
                conv.weight.copy_(t(layer.blobs[0].data))
                if layer.bias_term:
                    conv.bias.copy_(t(layer.blobs[1].data))
            return conv
        if kind == "InnerProduct":
            w = layer.blobs[0].data
            linear = nn.Linear(w.shape[1], w.shape[0], bias=len(layer.blobs) > 1)
            with torch.no_grad():
                linear.weight.copy_(t(w))
                if len(layer.blobs) > 1:
                    linear.bias.copy_(t(layer.blobs[1].data))
            return nn.Sequential(nn.Flatten(), linear)
        if kind == "BatchNorm":
            q = p.batch_norm_param
            bn = nn.BatchNorm2d(shape[1], q.eps, 1 - q.moving_average_fraction, scale is not None)
            factor = layer.blobs[2].data[0]
            factor = 1 / factor if factor else 0.0
            with torch.no_grad():
                bn.running_mean.copy_(t(layer.blobs[0].data * factor))
                bn.running_var.copy_(t(layer.blobs[1].data * factor))
                if scale is not None:
                    bn.weight.copy_(t(scale.blobs[0].data))
                    bn.bias.copy_(t(scale.blobs[1].data))
            return bn
        if kind == "Pooling":
            cls = nn.MaxPool2d if layer.method == pb.PoolingParameter.MAX else nn.AvgPool2d
            return cls(tuple(layer.kernel), tuple(layer.stride), tuple(layer.pad), ceil_mode=True)
        if kind == "ReLU":
            return nn.ReLU(inplace=p.bottom[0] == p.top[0])
        if kind == "LRN":
            q = p.lrn_param
            return nn.LocalResponseNorm(q.local_size, q.alpha, q.beta, q.k)
        if kind == "Dropout":
            # Not in place: autograd needs the in-place ReLU's output that Dropout follows.
            return nn.Dropout(p.dropout_param.dropout_ratio)
        if kind == "Concat":
            return lambda *xs: torch.cat(xs, p.concat_param.axis)
        if kind == "Eltwise" and p.eltwise_param.operation == pb.EltwiseParameter.SUM:
            coeffs = list(p.eltwise_param.coeff) or [1.0] * len(p.bottom)
            if all(c == 1 for c in coeffs):
                return lambda *xs: sum(xs[1:], xs[0])
            return lambda *xs: sum(c * x for c, x in zip(coeffs, xs))
        if kind == "Softmax":
            return lambda x: F.softmax(x, 1)
        if kind == "SoftmaxWithLoss":
            # The top is the unweighted loss, as in netforge; loss_weight applies in the sum.
            self.loss_weights[p.top[0]] = p.loss_weight[0] if p.loss_weight else 1.0
            return lambda scores, labels: F.cross_entropy(scores, labels.long())
        raise SystemExit(f"bench: no PyTorch translation for layer {layer.name} ({kind})")

    def forward(self, inputs: dict, timings: dict | None = None) -> dict:
        """All blobs after one forward from ``inputs``; with ``timings``, each layer type's
        seconds are added to it."""
        blobs = dict(inputs)
        for module, bottoms, tops in self.steps:
            start = time.perf_counter()
            value = module(*(blobs[b] for b in bottoms))
            if timings is not None:
                kind = type(module).__name__ if isinstance(module, self.torch.nn.Module) else "fn"
                timings[kind] += time.perf_counter() - start
            blobs.update(dict.fromkeys(tops, value))
        return blobs


def check_agreement(net: Net, torch_net: TorchNet, names: list[str]) -> float:
    """Forward both (TEST phase: no dropout, BatchNorm's stored statistics) and return the
    largest difference of the ``names`` outputs relative to their magnitude; stop above
    1e-3."""
    torch = torch_net.torch
    net.forward()
    torch_net.modules.eval()
    inputs = {"data": torch.from_numpy(net.blobs["data"].data.copy())}
    if "label" in net.blobs:
        inputs["label"] = torch.from_numpy(net.blobs["label"].data.copy())
    with torch.inference_mode():
        theirs = torch_net.forward(inputs)
    worst = 0.0
    for name in names:
        ours, ref = net.blobs[name].data, theirs[name].numpy().reshape(net.blobs[name].shape)
        error = float(np.abs(ours - ref).max() / max(np.abs(ref).max(), 1e-30))
        if not error < 1e-3:
            raise SystemExit(f"bench: netforge and PyTorch disagree on {name}: {error:.2e}")
        worst = max(worst, error)
    return worst


# -- timing --------------------------------------------------------------------------------
def alternate(runners: dict, rounds: int, seconds: float, minimum: int) -> dict[str, list[float]]:
    """Seconds per call of each runner, per round, the runners taking turns; each round
    makes about ``seconds`` worth of calls (at least ``minimum``), sized after one warm-up
    call and one timed call."""
    counts = {}
    for key, run in runners.items():
        run(1)
        start = time.perf_counter()
        run(1)
        counts[key] = max(minimum, round(seconds / (time.perf_counter() - start)))
    per_call: dict[str, list[float]] = {k: [] for k in runners}
    for _ in range(rounds):
        for key, run in runners.items():
            start = time.perf_counter()
            run(counts[key])
            per_call[key].append((time.perf_counter() - start) / counts[key])
    return per_call


def ms_cells(per_call: dict[str, list[float]], digits: int = 3) -> str:
    """``alternate``'s seconds per call as "key median [lowest-highest]" in ms, side by side."""
    cells = []
    for key, seconds in per_call.items():
        ms = [1e3 * s for s in seconds]
        low, mid, high = min(ms), statistics.median(ms), max(ms)
        cells.append(f"{key} {mid:.{digits}f} [{low:.{digits}f}-{high:.{digits}f}]")
    return "  ".join(cells)


def kernel_bench_args(parser: argparse.ArgumentParser) -> tuple[argparse.Namespace, bool]:
    """The per-kernel benchmarks' command line: ``parser``'s own options plus ``--rounds``,
    ``--seconds`` (per round and runner) and ``--no-torch``; exits when numba is missing.
    Returns the arguments and whether PyTorch runs beside netforge."""
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=0.3)
    parser.add_argument("--no-torch", action="store_true")
    args = parser.parse_args()
    if not _jit.enabled():
        raise SystemExit("numba is not installed: pip install 'netforge[jit]'")
    return args, torch_peer(not args.no_torch)


@contextlib.contextmanager
def kernels_switched(on: bool) -> Iterator[None]:
    """netforge's compiled kernels (the jit extra) on or off for the calls inside."""
    chosen = _jit.enabled
    _jit.enabled = (lambda: True) if on else (lambda: False)
    try:
        yield
    finally:
        _jit.enabled = chosen


def layer_on_random_input(
    param: pb.LayerParameter, shape: tuple[int, ...], phase: int, kernels: bool
) -> tuple[Layer, Blob, Blob]:
    """The per-kernel benchmarks' layer: ``param``'s, set up and reshaped on a float32
    bottom of ``shape`` holding standard normal values, with the compiled kernels on or off
    while it chooses its paths. Returns (layer, bottom, top)."""
    with kernels_switched(kernels):
        layer = create_layer(param, phase=phase, rng=np.random.default_rng(0))
        bottom = Blob(shape, np.float32, name="bottom")
        bottom.data = np.random.default_rng(1).standard_normal(shape, dtype=np.float32)
        top = Blob((), np.float32, name="top")
        layer.setup([bottom], [top])
        layer.reshape([bottom], [top])
    return layer, bottom, top


def summary(per_call: dict[str, list[float]], scale: float) -> dict:
    """Median and spread of ``scale / seconds`` per library, and the median ratio."""
    out = {k: [scale / s for s in v] for k, v in per_call.items()}
    result = {k: (statistics.median(v), min(v), max(v)) for k, v in out.items()}
    if "pytorch" in out:
        ratios = [a / b for a, b in zip(out["netforge"], out["pytorch"])]
        result["ratio"] = (statistics.median(ratios), min(ratios), max(ratios))
    return result


def bench_train(name: str, batch: int, rounds: int, seconds: float, with_torch: bool) -> dict:
    """Images/s training ``name`` at ``batch`` (see the module docstring)."""
    param = train_param(name, batch)
    solver = sgd_solver(param)
    net = solver.net
    fill_weights(net)
    data, labels = random_batch(net.blobs["data"].shape)
    net.blobs["data"].data, net.blobs["label"].data = data, labels
    runners = {"netforge": solver.step}
    error = None
    if with_torch:
        torch = __import__("torch")
        check = Net(param, pb.TEST)
        _share(check, net)
        check.blobs["data"].data, check.blobs["label"].data = data, labels
        model = TorchNet(check)
        error = check_agreement(check, model, list(model.loss_weights))
        model.modules.train()
        weights = [p for n, p in model.modules.named_parameters() if not n.endswith("bias")]
        biases = [p for n, p in model.modules.named_parameters() if n.endswith("bias")]
        lr = SOLVER["base_lr"]
        optimizer = torch.optim.SGD(
            [{"params": weights, "lr": lr}, {"params": biases, "lr": 2 * lr}],
            lr=lr,
            momentum=SOLVER["momentum"],
            weight_decay=SOLVER["weight_decay"],
        )
        inputs = {"data": torch.from_numpy(data), "label": torch.from_numpy(labels)}

        def torch_step(iterations: int) -> None:
            for _ in range(iterations):
                optimizer.zero_grad()
                blobs = model.forward(inputs)
                sum(w * blobs[n] for n, w in model.loss_weights.items()).backward()
                optimizer.step()

        runners["pytorch"] = torch_step
    result = summary(alternate(runners, rounds, seconds, 3), batch)
    result["error"] = error
    return result


def _share(target: Net, source: Net) -> None:
    """Copy ``source``'s parameter blobs into ``target``'s layers of the same name."""
    by_name = {layer.name: layer for layer in source.layers}
    for layer in target.layers:
        other = by_name.get(layer.name)
        if other is not None:
            for mine, theirs in zip(layer.blobs, other.blobs):
                mine.data[...] = theirs.data


def inference_nets(name: str, with_torch: bool) -> tuple[Net, TorchNet | None, float | None]:
    net = Net(deploy_param(name), pb.TEST)
    fill_weights(net)
    net.blobs["data"].data = random_batch(net.blobs["data"].shape)[0]
    if not with_torch:
        return net, None, None
    model = TorchNet(net)
    return net, model, check_agreement(net, model, net.outputs)


def bench_infer(name: str, rounds: int, seconds: float, with_torch: bool) -> dict:
    """Batch-1 forward latency of deploy net ``name`` (see the module docstring)."""
    net, model, error = inference_nets(name, with_torch)

    def ours(iterations: int) -> None:
        for _ in range(iterations):
            net.forward()

    runners = {"netforge": ours}
    if model is not None:
        torch = model.torch
        inputs = {"data": torch.from_numpy(net.blobs["data"].data.copy())}

        def theirs(iterations: int) -> None:
            with torch.inference_mode():
                for _ in range(iterations):
                    model.forward(inputs)

        runners["pytorch"] = theirs
    result = summary(alternate(runners, rounds, seconds, 3), 1.0)
    result["error"] = error
    return result


def layer_report(name: str, with_torch: bool) -> None:
    """Per-layer-type forward ms of ``name`` at batch 1 in both libraries, and netforge's
    slowest layers (forward + backward when ``name`` is a training net)."""
    net, model, _ = inference_nets(name, with_torch)
    ours: collections.Counter = collections.Counter()
    per_layer: collections.Counter = collections.Counter()
    runs = 5
    for _ in range(runs):
        for layer, bottoms, tops in zip(net.layers, net.layer_bottoms, net.layer_tops):
            start = time.perf_counter()
            layer.forward([net.blobs[b] for b in bottoms], [net.blobs[t] for t in tops])
            elapsed = time.perf_counter() - start
            ours[layer.type] += elapsed
            per_layer[layer.name] += elapsed
    print(f"\n{name} batch 1 forward by layer type, ms (mean of {runs}):")
    print("  netforge: " + ", ".join(f"{k} {v / runs * 1e3:.1f}" for k, v in ours.most_common()))
    if model is not None:
        theirs: collections.Counter = collections.Counter()
        inputs = {"data": model.torch.from_numpy(net.blobs["data"].data.copy())}
        with model.torch.inference_mode():
            for _ in range(runs):
                model.forward(inputs, theirs)
        print(
            "  PyTorch:  " + ", ".join(f"{k} {v / runs * 1e3:.1f}" for k, v in theirs.most_common())
        )
    slowest = per_layer.most_common(12)
    print("  netforge's slowest: " + ", ".join(f"{k} {v / runs * 1e3:.1f}" for k, v in slowest))
    if name in TRAIN:
        quiet = logging.getLogger("bench_models.quiet")
        quiet.disabled = True
        solver = sgd_solver(train_param(name, 8))
        fill_weights(solver.net)
        t = time_net(solver.net, iterations=2, log=quiet)
        rows = sorted(zip(t.layer_names, t.forward_ms, t.backward_ms), key=lambda r: -(r[1] + r[2]))
        print(f"{name} training (batch 8), netforge's slowest layers, forward+backward ms:")
        print("  " + ", ".join(f"{n} {f:.0f}+{b:.0f}" for n, f, b in rows[:12]))


def _fmt(result: dict, key: str, digits: int = 1) -> str:
    median, low, high = result[key]
    return f"{median:.{digits}f} [{low:.{digits}f}-{high:.{digits}f}]"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--train", default=",".join(TRAIN), help="'' for none")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--infer", default=",".join(MODELS), help="'' for none")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=3.0, help="per round and library")
    parser.add_argument("--layers", default="", help="nets to break down per layer")
    parser.add_argument("--no-torch", action="store_true")
    args = parser.parse_args()
    with_torch = torch_peer(not args.no_torch)
    print(f"netforge {netforge.__version__}, numpy {np.__version__}, {os.cpu_count()} CPUs")
    print(f"load average at start: {os.getloadavg()[0]:.2f}")
    print("figures: median [lowest-highest round]; ratio above 1: netforge faster;")
    print("the last column: largest netforge-PyTorch output difference, relative")
    for name in filter(None, args.train.split(",")):
        r = bench_train(name, args.batch, args.rounds, args.seconds, with_torch)
        line = f"train {name:11} batch {args.batch}: img/s netforge {_fmt(r, 'netforge', 2)}"
        if with_torch:
            line += f" | PyTorch {_fmt(r, 'pytorch', 2)} | ratio {_fmt(r, 'ratio', 2)}"
            line += f" | {r['error']:.1e}"
        print(line, flush=True)
    for name in filter(None, args.infer.split(",")):
        r = bench_infer(name, args.rounds, args.seconds, with_torch)
        # Images/s to ms per image: the median stays the median, the spread swaps ends.
        lat = {k: tuple(1e3 / r[k][i] for i in (0, 2, 1)) for k in r if k not in ("ratio", "error")}
        line = f"infer {name:11} batch 1: ms/image netforge {_fmt(lat, 'netforge')}"
        if with_torch:
            line += f" | PyTorch {_fmt(lat, 'pytorch')} | ratio {_fmt(r, 'ratio', 2)}"
            line += f" | {r['error']:.1e}"
        print(line, flush=True)
    for name in filter(None, args.layers.split(",")):
        layer_report(name, with_torch)
    print(f"load average at end: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
