"""One image's 3×3 convolutions: Winograd's F(2×2, 3×3) kernels against im2col + GEMM.

Usage (from the repository root)::

    PYTHONPATH=. python tools/bench_winograd.py [--nets resnet50,googlenet,squeezenet]
        [--all] [--rounds 5] [--seconds 0.3] [--no-torch]

Each distinct 3×3, stride-1, ungrouped Convolution of the nets' deploy prototxts at batch 1
that ``netforge.builtin_layers.winograd_kernels`` takes (with ``--all``, every one, the
thresholds ``MIN_TILES`` and ``MIN_CHANNELS`` lifted, to show what they keep out) is built
twice at its shape in the net, on each CPU path (the kernels with numba, im2col + GEMM with
them switched off), plus PyTorch's ``conv2d`` when it is installed; they take turns for
``--rounds`` rounds of about ``--seconds`` each. Prints the median forward ms per call with
the lowest and highest round, and the largest difference from a float64 convolution,
relative to the largest output, of each netforge path.
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

from netforge.builtin_layers import winograd_kernels
from netforge.net import Net
from netforge.proto import pb


def three_by_three_layers(names: list[str]) -> list[tuple[str, pb.LayerParameter, tuple]]:
    """The nets' distinct 3×3, stride-1, undilated, ungrouped Convolutions at batch 1, as
    (net, parameter, bottom shape)."""
    found, seen = [], set()
    for name in names:
        net = Net(deploy_param(name), pb.TEST)
        for layer, bottoms in zip(net.layers, net.layer_bottoms):
            if layer.type != "Convolution" or layer.group != 1:
                continue
            geom = layer.geom
            if not winograd_kernels.fits(geom.kernel, geom.stride, geom.dilation):
                continue
            shape = net.blobs[bottoms[0]].shape
            key = (shape, layer.num_output, geom.pad)
            if key not in seen:
                seen.add(key)
                found.append((name, layer.layer_param, shape))
    return found


def netforge_runner(param: pb.LayerParameter, shape: tuple[int, ...], kernels: bool):
    """A function running the layer's forward ``n`` times, and its largest relative
    difference from a float64 convolution; None where the layer does not take the path
    asked for."""
    layer, bottom, top = layer_on_random_input(param, shape, pb.TEST, kernels)
    weights = layer.blobs[0].data
    weights[...] = np.random.default_rng(2).standard_normal(weights.shape) / np.sqrt(
        weights[0].size
    )
    if layer._winograd_one != kernels:
        return None

    def run(n: int) -> None:
        for _ in range(n):
            layer.forward([bottom], [top])

    run(1)
    pad = layer.geom.pad
    image = np.pad(bottom.data[0].astype(np.float64), ((0, 0), (pad[0],) * 2, (pad[1],) * 2))
    windows = np.lib.stride_tricks.sliding_window_view(image, (3, 3), axis=(1, 2))
    exact = np.einsum("chwij,ocij->ohw", windows, weights.astype(np.float64))
    if layer.bias_term:
        exact += layer.blobs[1].data[:, None, None]
    error = np.abs(top.data[0] - exact).max() / np.abs(exact).max()
    return run, error


def torch_runner(param: pb.LayerParameter, shape: tuple[int, ...]):
    """PyTorch's conv2d of the same geometry."""
    import torch

    conv = param.convolution_param
    x = torch.randn(shape)
    w = torch.randn((conv.num_output, shape[1], 3, 3))
    pad = conv.pad[0] if conv.pad else 0

    def run(n: int) -> None:
        with torch.no_grad():
            for _ in range(n):
                torch.nn.functional.conv2d(x, w, None, 1, pad)

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nets", default="resnet50,googlenet,squeezenet")
    parser.add_argument("--all", action="store_true", help="lift the kernels' thresholds")
    args, with_torch = kernel_bench_args(parser)
    if args.all:
        winograd_kernels.MIN_TILES = winograd_kernels.MIN_CHANNELS = 1
    print("3x3 stride-1 convolutions at batch 1, forward, float32, ms per call")
    print("median [lowest-highest round]; error: largest difference from float64 / largest output")
    for net, param, shape in three_by_three_layers(args.nets.split(",")):
        taken = netforge_runner(param, shape, True)
        if taken is None:
            continue
        (winograd, winograd_error), (im2col, im2col_error) = (
            taken,
            netforge_runner(param, shape, False),
        )
        runners = {"winograd": winograd, "im2col": im2col}
        if with_torch:
            runners["pytorch"] = torch_runner(param, shape)
        per_call = alternate(runners, args.rounds, args.seconds, 3)
        outputs = param.convolution_param.num_output
        print(
            f"  {net}/{param.name:<18} {shape[1]:>4} -> {outputs:<4} {shape[2]}x{shape[3]:<3} "
            + ms_cells(per_call)
            + f"  error {winograd_error:.1e} / {im2col_error:.1e}"
        )


if __name__ == "__main__":
    main()
