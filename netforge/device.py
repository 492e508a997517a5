"""What netforge can compute on here: numpy's BLAS and its measured float32 GEMM rate, and
the GPU through cupy when one is present (``netforge device-query``)."""

from __future__ import annotations

import ctypes
import importlib
import os
import platform
import time
from typing import Any

import numpy as np

from netforge import _blas


def gemm_gflops(n: int = 1024, repeats: int = 5) -> float:
    """Measured float32 n×n GEMM rate in GFLOP/s (best of ``repeats``)."""
    a = np.random.default_rng(0).standard_normal((n, n), dtype=np.float32)
    b = np.random.default_rng(1).standard_normal((n, n), dtype=np.float32)
    a @ b  # warm the BLAS threads up
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best / 1e9


def blas_info() -> dict[str, Any]:
    """numpy's BLAS library, version and the kernel family it chose (OpenBLAS core type)."""
    info: dict[str, Any] = {}
    config = np.show_config(mode="dicts")
    blas = config.get("Build Dependencies", {}).get("blas", {})
    info["library"] = blas.get("name", "unknown")
    info["version"] = blas.get("version", "unknown")
    info["core_type"] = _openblas_core()
    info["OPENBLAS_CORETYPE"] = os.environ.get("OPENBLAS_CORETYPE", "")
    info["adjusted_from"] = _blas.adjustment[0] if _blas.adjustment else None
    info["OPENBLAS_THREAD_TIMEOUT"] = os.environ.get("OPENBLAS_THREAD_TIMEOUT", "")
    info["thread_timeout_set_by_netforge"] = _blas.thread_timeout is not None
    return info


def _openblas_core() -> str | None:
    """The kernel family the loaded OpenBLAS runs (its get_corename), if it is OpenBLAS."""
    function = _blas.openblas_symbol(
        "scipy_openblas_get_corename64_",
        "scipy_openblas_get_corename",
        "openblas_get_corename64_",
        "openblas_get_corename",
    )
    if function is None:
        return None
    function.restype = ctypes.c_char_p
    return function().decode()


def gpu_info() -> list[dict[str, Any]]:
    """One entry per CUDA device, or an empty list when cupy or a GPU is missing."""
    try:
        cupy = importlib.import_module("cupy")
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception:  # no cupy, no driver, no device: all mean "no GPU here"
        return []
    devices = []
    for i in range(count):
        props = cupy.cuda.runtime.getDeviceProperties(i)
        with cupy.cuda.Device(i):
            free, total = cupy.cuda.runtime.memGetInfo()
        devices.append(
            {
                "id": i,
                "name": props["name"].decode()
                if isinstance(props["name"], bytes)
                else props["name"],
                "compute_capability": f"{props['major']}.{props['minor']}",
                "memory_total_gib": total / 2**30,
                "memory_free_gib": free / 2**30,
                "multiprocessors": props["multiProcessorCount"],
                "driver_version": cupy.cuda.runtime.driverGetVersion(),
                "runtime_version": cupy.cuda.runtime.runtimeGetVersion(),
                "cupy_version": cupy.__version__,
            }
        )
    return devices


def query(measure: bool = True) -> dict[str, Any]:
    """Everything ``netforge device-query`` reports."""
    return {
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "numpy": np.__version__,
        "blas": blas_info(),
        "gemm_gflops_float32": gemm_gflops() if measure else None,
        "jit": jit_info(),
        "gpus": gpu_info(),
    }


def jit_info() -> dict[str, Any]:
    """Whether the layers use numba's compiled CPU kernels (the jit extra), and why not."""
    from netforge.builtin_layers import _jit
    from netforge.errors import ConfigError

    setting = os.environ.get(_jit.SETTING, "auto")
    try:
        module = _jit.numba()
    except ConfigError as exc:
        return {"setting": setting, "numba": None, "enabled": False, "reason": str(exc)}
    return {
        "setting": setting,
        "numba": module.__version__ if module is not None else None,
        "enabled": module is not None,
    }
