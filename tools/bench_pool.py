"""MAX and AVE Pooling on the CPU: numba's kernels (pool_kernels) against the numpy path.

Usage (from the repository root)::

    PYTHONPATH=. python tools/bench_pool.py [--rounds 5] [--seconds 0.3] [--scale 1]
        [--no-torch]

Times, forward and backward apart, float32, the pooling layers of CIFAR-10 quick at batch
100 (pool1: MAX 3×3 stride 2 on (100, 32, 32, 32); pool2: AVE 3×3 s2 on (100, 32, 16, 16);
pool3: AVE 3×3 s2 on (100, 64, 8, 8)) and CaffeNet's pool1 at batch 32 (MAX 3×3 s2 on
(32, 96, 55, 55)); ``--scale`` divides the batches (a quick check). The two paths, and
PyTorch's ``max_pool2d`` / ``avg_pool2d`` (ceil_mode, count_include_pad) when it is
installed, take turns for ``--rounds`` rounds of about ``--seconds`` each. Prints the median
ms per call with the lowest and highest round.
"""

from __future__ import annotations

# First: importing netforge picks OpenBLAS's kernels, which must happen before numpy loads.
import netforge  # noqa: F401

# isort: split
import argparse

import bench_torch
import numpy as np
from bench_models import alternate, kernel_bench_args, kernels_switched, ms_cells
from google.protobuf import text_format

from netforge.blob import Blob
from netforge.layer import create_layer
from netforge.proto import pb

#: name: (pool, bottom shape); every layer is 3×3 stride 2, no padding.
CASES = {
    "cifar10_quick pool1": ("MAX", (100, 32, 32, 32)),
    "cifar10_quick pool2": ("AVE", (100, 32, 16, 16)),
    "cifar10_quick pool3": ("AVE", (100, 64, 8, 8)),
    "caffenet pool1": ("MAX", (32, 96, 55, 55)),
}


def netforge_runner(method: str, shape: tuple[int, ...], kernels: bool, backward: bool):
    """A function running the layer's forward (or backward) ``n`` times, with the kernels
    switched on or off for its calls."""
    text = (
        f'name: "pool" type: "Pooling" pooling_param {{ pool: {method} kernel_size: 3 stride: 2 }}'
    )
    layer = create_layer(text_format.Parse(text, pb.LayerParameter()), phase=pb.TRAIN)
    rng = np.random.default_rng(0)
    bottom, top = Blob(shape, np.float32, name="x"), Blob((), np.float32, name="y")
    layer.setup([bottom], [top])
    layer.reshape([bottom], [top])
    bottom.data = rng.standard_normal(shape, dtype=np.float32)
    top.diff = rng.standard_normal(top.shape, dtype=np.float32)

    def run(n: int) -> None:
        with kernels_switched(kernels):
            if backward:
                # Forward once on the same path: backward needs its kept maxima.
                layer.forward([bottom], [top])
            for _ in range(n):
                if backward:
                    layer.backward([top], [True], [bottom])
                else:
                    layer.forward([bottom], [top])

    return run


def torch_runner(method: str, shape: tuple[int, ...], backward: bool):
    """PyTorch's max_pool2d / avg_pool2d with Caffe's CEIL rounding."""
    import torch

    function = torch.nn.functional.max_pool2d if method == "MAX" else torch.nn.functional.avg_pool2d
    x = torch.randn(shape, requires_grad=backward)

    def forward() -> torch.Tensor:
        return function(x, 3, 2, ceil_mode=True)

    return bench_torch.torch_runner(forward, (x,), backward)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scale", type=int, default=1, help="divide the batches by this")
    args, with_torch = kernel_bench_args(parser)
    print(f"float32, ms per call: median [lowest-highest of {args.rounds} rounds]")
    for name, (method, full) in CASES.items():
        shape = (max(1, full[0] // args.scale),) + full[1:]
        for backward in (False, True):
            runners = {
                "numpy": netforge_runner(method, shape, False, backward),
                "kernels": netforge_runner(method, shape, True, backward),
            }
            if with_torch:
                runners["pytorch"] = torch_runner(method, shape, backward)
            per_call = alternate(runners, args.rounds, args.seconds, 3)
            direction = "backward" if backward else "forward"
            print(f"  {name:<20} {method} {str(shape):<18} {direction:<8} " + ms_cells(per_call))


if __name__ == "__main__":
    main()
