"""MobileNet v1's depthwise convolutions: the compiled kernels against im2col + GEMM.

Usage (from the repository root)::

    PYTHONPATH=. python tools/bench_depthwise.py [--batch 1] [--backward]
        [--rounds 5] [--seconds 0.3] [--no-torch]

Each depthwise layer of models/mobilenet_v1/deploy.prototxt (group == channels) is built
twice at its shape in the net, once on each CPU path (``netforge.builtin_layers.depthwise``
with numba, and im2col + GEMM with the kernels switched off), plus PyTorch's grouped
``conv2d`` when it is installed; they take turns for ``--rounds`` rounds of about
``--seconds`` each. Prints the median ms per call with the lowest and highest round, per
layer and summed: forward, or with ``--backward`` forward + backward (bottom and weight
gradients).
"""

from __future__ import annotations

# First: importing netforge picks OpenBLAS's kernels, which must happen before numpy loads.
import netforge  # noqa: F401

# isort: split
import argparse

import numpy as np
from bench_models import (
    alternate,
    deploy_param,
    kernel_bench_args,
    layer_on_random_input,
    ms_cells,
)

from netforge.net import Net
from netforge.proto import pb


def depthwise_layers(batch: int) -> list[tuple[pb.LayerParameter, tuple[int, ...]]]:
    """MobileNet v1's depthwise Convolution parameters with their bottom shapes."""
    net = Net(deploy_param("mobilenet", batch), pb.TEST)
    found = []
    for layer, bottoms in zip(net.layers, net.layer_bottoms):
        param = layer.layer_param
        if param.type == "Convolution" and param.convolution_param.group > 1:
            found.append((param, net.blobs[bottoms[0]].shape))
    return found


def netforge_runner(param: pb.LayerParameter, shape: tuple[int, ...], kernels: bool, backward):
    """A function running the layer ``n`` times, on the kernel path or on im2col + GEMM."""
    layer, bottom, top = layer_on_random_input(param, shape, pb.TRAIN, kernels)
    layer.param_propagate_down = [True] * len(layer.blobs)
    assert (layer._depthwise is not None) == kernels
    top.diff = np.random.default_rng(2).standard_normal(top.shape, dtype=np.float32)

    def run(n: int) -> None:
        for _ in range(n):
            layer.forward([bottom], [top])
            if backward:
                layer.backward([top], [True], [bottom])

    return run


def torch_runner(param: pb.LayerParameter, shape: tuple[int, ...], backward):
    """PyTorch's grouped conv2d of the same geometry."""
    import torch

    conv = param.convolution_param
    channels = shape[1]
    x = torch.randn(shape, requires_grad=backward)
    w = torch.randn((conv.num_output, 1, conv.kernel_size[0], conv.kernel_size[0]))
    w.requires_grad_(backward)
    stride = conv.stride[0] if conv.stride else 1
    pad = conv.pad[0] if conv.pad else 0

    def run(n: int) -> None:
        with torch.set_grad_enabled(backward):
            for _ in range(n):
                y = torch.nn.functional.conv2d(x, w, None, stride, pad, 1, channels)
                if backward:
                    y.backward(torch.ones_like(y))

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--backward", action="store_true", help="time forward + backward")
    args, with_torch = kernel_bench_args(parser)
    what = "forward + backward" if args.backward else "forward"
    print(f"MobileNet v1 depthwise layers, batch {args.batch}, {what}, float32, ms per call")
    print("median [lowest-highest round]")
    totals: dict[str, list[float]] = {}
    for param, shape in depthwise_layers(args.batch):
        runners = {
            "kernel": netforge_runner(param, shape, True, args.backward),
            "im2col": netforge_runner(param, shape, False, args.backward),
        }
        if with_torch:
            runners["pytorch"] = torch_runner(param, shape, args.backward)
        per_call = alternate(runners, args.rounds, args.seconds, 3)
        for key, seconds in per_call.items():
            totals.setdefault(key, [0.0] * len(seconds))
            totals[key] = [a + b for a, b in zip(totals[key], seconds)]
        print(f"  {param.name:<11} {str(shape):<20} " + ms_cells(per_call))
    print("  all (sum of each round)         " + ms_cells(totals, digits=2))


if __name__ == "__main__":
    main()
