"""PyTorch as the peer of netforge's benchmarks (``bench_layers.py``, ``bench_models.py``)."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any


def torch_peer(wanted: bool) -> bool:
    """Whether PyTorch runs beside netforge: ``wanted`` and importable. Gives it every core,
    as netforge has, and prints its version and threads (or how to install it)."""
    if not wanted:
        return False
    try:
        import torch
    except ImportError:
        print("PyTorch is not installed: netforge only (pip install torch==2.13.0)")
        return False
    torch.set_num_threads(os.cpu_count() or 1)
    print(f"PyTorch {torch.__version__}, {torch.get_num_threads()} threads")
    return True


def torch_runner(
    forward: Callable[[], Any], inputs: tuple, backward: bool
) -> Callable[[int], None]:
    """A function calling ``forward`` ``n`` times without autograd, or, with ``backward``,
    taking the gradient of one forward's output with respect to ``inputs`` ``n`` times
    (a fixed random top gradient, the graph kept): PyTorch's side of a layer benchmark."""
    import torch

    if not backward:

        def run(n: int) -> None:
            with torch.no_grad():
                for _ in range(n):
                    forward()

        return run
    y = forward()
    dy = torch.randn(y.shape)

    def run_backward(n: int) -> None:
        for _ in range(n):
            torch.autograd.grad(y, inputs, dy, retain_graph=True)

    return run_backward
