"""netforge configures numpy's OpenBLAS before numpy loads (netforge/_blas.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from conftest import REPO, level1_or_skip

from netforge import _blas

PROBE = (
    "import netforge, os, json; print(json.dumps({k: os.environ.get(k, '') for k in "
    "('OPENBLAS_CORETYPE', 'OPENBLAS_THREAD_TIMEOUT')}))"
)


def probe(**env: str) -> dict[str, str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith(("OPENBLAS_", "NETFORGE_"))}
    result = subprocess.run(
        [sys.executable, "-c", PROBE],
        env={**base, "PYTHONPATH": str(REPO), **env},
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(result.stdout)


def has_avx512() -> bool:
    with open("/proc/cpuinfo") as cpuinfo:
        flags = next((line for line in cpuinfo if line.startswith("flags")), "").split()
    return {"avx512f", "avx512cd", "avx512bw", "avx512dq", "avx512vl"} <= set(flags)


def test_older_kernels_are_raised_and_idle_threads_sleep() -> None:
    got = probe(OPENBLAS_CORETYPE="Haswell")
    assert got["OPENBLAS_CORETYPE"] == ("SkylakeX" if has_avx512() else "Haswell")
    assert got["OPENBLAS_THREAD_TIMEOUT"] == "4"


def test_user_settings_win() -> None:
    assert probe(OPENBLAS_THREAD_TIMEOUT="20")["OPENBLAS_THREAD_TIMEOUT"] == "20"
    assert probe(NETFORGE_BLAS_CORETYPE="Haswell")["OPENBLAS_CORETYPE"] == "Haswell"
    kept = probe(OPENBLAS_CORETYPE="Haswell", NETFORGE_BLAS_CORETYPE="keep")
    assert kept == {"OPENBLAS_CORETYPE": "Haswell", "OPENBLAS_THREAD_TIMEOUT": ""}


NUMPY_FIRST = """
import time
import numpy as np
a = np.ones((1024, 1024), np.float32)
import netforge
from netforge import _blas
a @ a  # a threaded GEMM; then its helper threads wait for more work
start = time.process_time()
time.sleep(0.1)
print(_blas.openblas_symbol("openblas_thread_timeout")(), time.process_time() - start)
"""


def test_idle_threads_sleep_when_numpy_was_imported_first() -> None:
    """pycaffe scripts import numpy before caffe: OpenBLAS has read its environment by then,
    so netforge makes it read it again and restart its threads. Spinning threads would burn
    about a core for 0.1 s after the GEMM; sleeping ones burn nothing."""
    base = {k: v for k, v in os.environ.items() if not k.startswith(("OPENBLAS_", "NETFORGE_"))}
    result = subprocess.run(
        [sys.executable, "-c", NUMPY_FIRST],
        env={**base, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        check=True,
    )
    timeout, idle_cpu = result.stdout.split()
    assert int(timeout) == 4
    assert float(idle_cpu) < 0.03


def layouts(rows: int, cols: int, dtype, seed: int):
    """A (rows, cols) matrix as a C-ordered array, a transposed one, and a row-major view
    with a leading dimension wider than its rows."""
    rng = np.random.default_rng(seed)
    base = rng.standard_normal((rows, cols)).astype(dtype)
    wide = np.zeros((rows, cols + 3), dtype)
    wide[:, :cols] = base
    return [base, np.ascontiguousarray(base.T).T, wide[:, :cols]]


@pytest.mark.parametrize("accumulate", [True, False])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_matmul_into_adds_or_writes_the_product_for_every_operand_layout(dtype, accumulate) -> None:
    tolerance = 1e-5 if dtype == np.float32 else 1e-12
    for a in layouts(7, 4, dtype, seed=0):
        for b in layouts(4, 9, dtype, seed=1):
            out = np.random.default_rng(2).standard_normal((7, 9)).astype(dtype)
            expected = a.astype(np.float64) @ b.astype(np.float64)
            if accumulate:
                expected += out
            else:
                out[0, 0] = np.nan  # a stale value is never read
            _blas.matmul_into(a, b, out, accumulate=accumulate)
            np.testing.assert_allclose(out, expected, rtol=tolerance, atol=tolerance)


@pytest.mark.parametrize("accumulate", [True, False])
def test_matmul_into_falls_back_where_blas_cannot_take_the_operands(accumulate) -> None:
    rng = np.random.default_rng(3)
    a, b = rng.standard_normal((5, 3)), rng.standard_normal((3, 5))
    cases = {
        "integers": (np.arange(6).reshape(2, 3), np.arange(6).reshape(3, 2), np.ones((2, 2), int)),
        "mixed dtypes": (a.astype(np.float32), b, np.zeros((5, 5))),
        "strided rows": (a[:, ::2], b[:2], np.zeros((5, 5))),
        "output aliases an operand": (np.eye(5), None, a @ b),
    }
    for name, (left, right, out) in cases.items():
        right = out if right is None else right
        expected = out + left @ right if accumulate else left @ right
        _blas.matmul_into(left, right, out, accumulate=accumulate)
        np.testing.assert_allclose(out, expected, rtol=1e-12, err_msg=name)


def test_matmul_into_reaches_the_gemm_of_numpys_openblas() -> None:
    """numpy's wheels bundle scipy-openblas, whose ILP64 GEMM ``matmul_into`` must find. A
    numpy built on another BLAS has no such symbol of its own; the expression serves there,
    and the tests above cover it."""
    blas = np.show_config(mode="dicts")["Build Dependencies"]["blas"]["name"]
    found = [_blas._gemm(np.dtype(t)) is not None for t in (np.float32, np.float64)]
    assert found == [True, True] or blas != "scipy-openblas", f"numpy's BLAS is {blas}"


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_level1_axpby_and_axpy_compute_their_formulas(dtype) -> None:
    routines = level1_or_skip(dtype)
    tolerance = 1e-6 if dtype == np.float32 else 1e-14
    rng = np.random.default_rng(4)
    x, y0 = (rng.standard_normal(1003).astype(dtype) for _ in range(2))
    y = y0.copy()
    routines.axpby(x.size, 0.5, x.ctypes.data, 1, -0.75, y.ctypes.data, 1)
    wide_x, expected = x.astype(np.float64), 0.5 * x.astype(np.float64) - 0.75 * y0
    np.testing.assert_allclose(y, expected, rtol=tolerance, atol=tolerance)
    routines.axpy(x.size, -3.0, x.ctypes.data, 1, y.ctypes.data, 1)
    np.testing.assert_allclose(y, expected - 3.0 * wide_x, rtol=tolerance, atol=10 * tolerance)


def test_level1_is_found_in_numpys_openblas_and_the_thread_count_restores() -> None:
    blas = np.show_config(mode="dicts")["Build Dependencies"]["blas"]["name"]
    found = [_blas.level1(t) is not None for t in (np.float32, np.float64)]
    assert found == [True, True] or blas != "scipy-openblas", f"numpy's BLAS is {blas}"
    assert _blas.level1(np.int32) is None
    before = _blas.set_blas_threads(1)
    assert _blas.set_blas_threads(before) == (1 if found[0] else before)
