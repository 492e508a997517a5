"""Shared fixtures: the array backends every layer test runs on, and the shared data."""

from __future__ import annotations

import importlib
import os
from pathlib import Path

import pytest

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
