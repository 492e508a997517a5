"""BatchNorm, Scale and Bias on the CPU: numba's kernels (norm_kernels) against the numpy path.

Usage (from the repository root)::

    PYTHONPATH=. python tools/bench_norm.py [--batch 8] [--rounds 5] [--seconds 0.3]
        [--no-torch]

Each layer runs in place, as ResNet-50's do, on float32 blobs of ResNet-50's shapes at
``--batch`` ((N, 64, 56, 56), (N, 256, 56, 56), (N, 512, 28, 28), (N, 2048, 7, 7)):
BatchNorm with batch statistics (TRAIN) and with global ones (TEST), Scale with a bias, and
Bias. The two paths, and PyTorch's ``batch_norm`` with its affine part (what BatchNorm +
Scale compute) when it is installed, take turns for ``--rounds`` rounds of about
``--seconds`` each. Prints the median ms per call with the lowest and highest round, forward
and backward apart.
"""

from __future__ import annotations

# First: importing netforge picks OpenBLAS's kernels, which must happen before numpy loads.
import netforge  # noqa: F401

# isort: split
import argparse
from collections.abc import Callable

import bench_torch
import numpy as np
from bench_models import alternate, kernel_bench_args, kernels_switched, ms_cells
from google.protobuf import text_format

from netforge.blob import Blob
from netforge.layer import create_layer
from netforge.proto import pb

LAYERS = {
    "BatchNorm TRAIN": ('type: "BatchNorm"', pb.TRAIN),
    "BatchNorm TEST": ('type: "BatchNorm"', pb.TEST),
    "Scale+bias": ('type: "Scale" scale_param { bias_term: true }', pb.TRAIN),
    "Bias": ('type: "Bias"', pb.TRAIN),
}


def resnet_shapes(batch: int) -> list[tuple[int, ...]]:
    """ResNet-50's BatchNorm bottoms at ``batch``: the widest of each stage and res2's first."""
    return [(batch, 64, 56, 56), (batch, 256, 56, 56), (batch, 512, 28, 28), (batch, 2048, 7, 7)]


def netforge_runner(name: str, shape: tuple[int, ...], kernels: bool, backward: bool):
    """A function running the layer's forward (or backward) ``n`` times in place, with the
    kernels switched on or off for its calls."""
    text, phase = LAYERS[name]
    param = text_format.Parse(f'name: "{name}" {text}', pb.LayerParameter())
    layer = create_layer(param, phase=phase, rng=np.random.default_rng(0))
    blob = Blob(shape, np.float32, name="blob")
    layer.setup([blob], [blob])
    layer.param_propagate_down = [True] * len(layer.blobs)
    layer.reshape([blob], [blob])
    if param.type == "BatchNorm":
        # The global statistics of the data (mean 0, variance 1).
        layer.blobs[1].data[...] = 1
        layer.blobs[2].data[...] = 1
    # Each channel of mean 0 and variance 1 exactly, so that repeated in-place backward
    # calls (dx = P(dy) / std) keep the values' scale: no drift to inf or denormals.
    rng = np.random.default_rng(1)
    x = rng.standard_normal(shape)
    axes = (0, *range(2, len(shape)))
    x = (x - x.mean(axis=axes, keepdims=True)) / x.std(axis=axes, keepdims=True)
    blob.data = x.astype(np.float32)
    blob.diff = rng.standard_normal(shape, dtype=np.float32)
    layer.forward([blob], [blob])
    step: Callable[[], None] = (
        (lambda: layer.backward([blob], [True], [blob]))
        if backward
        else (lambda: layer.forward([blob], [blob]))
    )

    def run(n: int) -> None:
        with kernels_switched(kernels):
            for _ in range(n):
                step()

    return run


def torch_runner(shape: tuple[int, ...], train: bool, backward: bool):
    """PyTorch's batch_norm with weight and bias (BatchNorm + Scale in one call)."""
    import torch

    channels = shape[1]
    x = torch.randn(shape, requires_grad=backward)
    weight = torch.ones(channels, requires_grad=backward)
    bias = torch.zeros(channels, requires_grad=backward)
    mean, var = torch.zeros(channels), torch.ones(channels)

    def forward() -> torch.Tensor:
        return torch.nn.functional.batch_norm(x, mean, var, weight, bias, train, 0.1, 1e-5)

    return bench_torch.torch_runner(forward, (x, weight, bias), backward)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=8)
    args, with_torch = kernel_bench_args(parser)
    print(f"float32, in place, ms per call: median [lowest-highest of {args.rounds} rounds]")
    for shape in resnet_shapes(args.batch):
        for backward in (False, True):
            direction = "backward" if backward else "forward"
            for name in LAYERS:
                runners = {
                    "numpy": netforge_runner(name, shape, False, backward),
                    "kernels": netforge_runner(name, shape, True, backward),
                }
                per_call = alternate(runners, args.rounds, args.seconds, 3)
                print(f"  {str(shape):<18} {name:<16} {direction:<8} " + ms_cells(per_call))
            if with_torch:
                for train in (True, False):
                    run = {"pytorch": torch_runner(shape, train, backward)}
                    per_call = alternate(run, args.rounds, args.seconds, 3)
                    label = "torch BN+affine " + ("train" if train else "eval")
                    print(f"  {str(shape):<18} {label:<16} {direction:<8} " + ms_cells(per_call))


if __name__ == "__main__":
    main()
