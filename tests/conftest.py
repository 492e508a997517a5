"""Shared fixtures: the array backends every layer test runs on, the shared data, and a
worker pool of two."""

from __future__ import annotations

import importlib
import os
from pathlib import Path

import pytest

from netforge.builtin_layers import _threads

REPO = Path(__file__).resolve().parent.parent
SHARED = REPO.parent / "shared"
FIXTURES = Path(__file__).resolve().parent / "fixtures"


def _gpu_available() -> bool:
    try:
        cupy = importlib.import_module("cupy")
        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:  # no cupy, no driver, or no device: all mean "no GPU"
        return False


GPU_AVAILABLE = _gpu_available()


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="no CUDA GPU with cupy on this machine")
    for item in items:
        if "gpu" in item.keywords and not GPU_AVAILABLE:
            item.add_marker(skip_gpu)


@pytest.fixture(params=["numpy", pytest.param("cupy", marks=pytest.mark.gpu)])
def backend(request):
    """Each test body runs on the CPU and, when a GPU is present, on cupy."""
    from netforge import backend as nb

    return nb.CPU if request.param == "numpy" else nb.gpu(0)


def shared_path(*parts: str) -> Path:
    """A file under ../shared, or a skip when this checkout has no ../shared beside it."""
    path = SHARED.joinpath(*parts)
    if not path.exists():
        if os.environ.get("NETFORGE_REQUIRE_SHARED"):
            pytest.fail(f"{path} is missing and NETFORGE_REQUIRE_SHARED is set (as in CI)")
        pytest.skip(f"{path} is not present (../shared is optional for the core tests)")
    return path


def level1_or_skip(dtype):
    """numpy's OpenBLAS level-1 routines for ``dtype`` (``netforge._blas.level1``). Where
    numpy bundles scipy-openblas, as its wheels do, they must be found; only a numpy built
    on another BLAS, where SGD keeps its numpy chain, skips."""
    import numpy as np

    from netforge import _blas

    routines = _blas.level1(dtype)
    blas = np.show_config(mode="dicts")["Build Dependencies"]["blas"]["name"]
    if blas == "scipy-openblas":
        assert routines is not None, "numpy's bundled OpenBLAS has no ILP64 axpby/axpy"
    elif routines is None:
        pytest.skip(f"numpy's BLAS is {blas}, not its bundled OpenBLAS")
    return routines


@pytest.fixture(params=["spinning", "locks"])
def two_workers(request, monkeypatch):
    """A fresh pool of one pooled thread beside the caller, handing off either way: through
    the compiled watches (``_threads._spin_waits``, where numba is there) or through locks."""
    if request.param == "spinning" and _threads._spin_waits() is None:
        pytest.skip("spinning hand-offs need numba (the jit extra) on Linux")
    if request.param == "locks":
        monkeypatch.setattr(_threads, "_spin_waits", lambda: None)
    monkeypatch.setattr(_threads, "WORKERS", 2)
    monkeypatch.setattr(_threads, "_pool", None)
    return request.param
