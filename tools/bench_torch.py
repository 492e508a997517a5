"""PyTorch as the peer of netforge's benchmarks (``bench_layers.py``, ``bench_models.py``)."""

from __future__ import annotations

import os


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
