"""Configure numpy's OpenBLAS before numpy loads: the fastest kernels, and idle threads
that sleep instead of spinning; and reach the one BLAS call numpy does not offer, a GEMM
that adds into its output (``matmul_into``).

numpy's bundled OpenBLAS reads ``OPENBLAS_CORETYPE`` once, when it is loaded. Machines that
pin it to an older family (Haswell) on AVX-512 CPUs halve float32 GEMM speed (measured on
the 2-core CI machines: ~100–235 GFLOP/s with Haswell, ~450 with SkylakeX). So when netforge
is imported before numpy, on a Linux CPU with the AVX-512 subset SkylakeX kernels need, it
raises the setting to SkylakeX. ``NETFORGE_BLAS_CORETYPE`` overrides the choice: a core name
to force one, or ``keep`` to leave ``OPENBLAS_CORETYPE`` alone.

After a GEMM, OpenBLAS's worker threads busy-wait for new work (``OPENBLAS_THREAD_TIMEOUT``,
default 2^28 cycles, ~0.1 s), stealing the cores that netforge's own copy, pooling and update
work runs on between GEMMs. Unless the variable is set, netforge sets it to OpenBLAS's
minimum (4): `tools/bench_layers.py --no-torch` measured LeNet 3305 → 5177 img/s and
CIFAR-10 quick 838 → 1400 img/s on 2 cores, CaffeNet unchanged. Unlike the kernel family,
this one still applies when numpy is already loaded, as in every pycaffe script (``import
numpy as np`` before ``import caffe``): OpenBLAS re-reads its environment and restarts its
threads (ResNet-50's batch-1 forward, numpy imported first, 2 cores: 167 ms spinning, 114
ms after the restart, 122 with netforge imported first; medians of 20).

It also reaches the level-1 routines the SGD update is built from (``level1``) and sets
OpenBLAS's thread count (``set_blas_threads``).
"""

from __future__ import annotations

import ctypes
import os
import sys
from collections.abc import Iterator
from typing import Any, NamedTuple

_AVX512_CORES = {"SKYLAKEX", "COOPERLAKE", "SAPPHIRERAPIDS"}
_SKYLAKEX_FLAGS = {"avx512f", "avx512cd", "avx512bw", "avx512dq", "avx512vl"}

#: what this module did, for ``netforge device-query``: (previous value, chosen value) or None
adjustment: tuple[str, str] | None = None
#: OPENBLAS_THREAD_TIMEOUT set by netforge (None: left as the user had it)
thread_timeout: str | None = None


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def configure_openblas() -> None:
    """Set OPENBLAS_CORETYPE and OPENBLAS_THREAD_TIMEOUT for numpy's OpenBLAS if it is not
    loaded yet (see the module docstring)."""
    global adjustment, thread_timeout
    wanted = os.environ.get("NETFORGE_BLAS_CORETYPE", "")
    if wanted.lower() == "keep":
        return
    loaded = "numpy" in sys.modules
    if not os.environ.get("OPENBLAS_THREAD_TIMEOUT"):
        thread_timeout = os.environ["OPENBLAS_THREAD_TIMEOUT"] = "4"
        if loaded:
            _restart_openblas_threads()
    if loaded:  # OpenBLAS chose its kernels when it loaded
        return
    current = os.environ.get("OPENBLAS_CORETYPE", "")
    if not wanted:
        if current.upper() in _AVX512_CORES or not _SKYLAKEX_FLAGS <= _cpu_flags():
            return
        wanted = "SkylakeX"
    if wanted != current:
        os.environ["OPENBLAS_CORETYPE"] = wanted
        adjustment = (current, wanted)


def _openblas_libraries() -> Iterator[Any]:
    """Every OpenBLAS library loaded in this process (found through Linux's
    ``/proc/self/maps``), as a ctypes library."""
    try:
        with open("/proc/self/maps") as maps:
            paths = sorted({line.split()[-1] for line in maps if "openblas" in line.lower()})
    except OSError:
        return
    for path in paths:
        try:
            yield ctypes.CDLL(path)
        except OSError:
            continue


def openblas_symbol(*names: str) -> Any:
    """The first of ``names`` exported by an OpenBLAS library loaded in this process (numpy's
    copy prefixes some symbols), or None."""
    for library in _openblas_libraries():
        for name in names:
            function = getattr(library, name, None)
            if function is not None:
                return function
    return None


def _restart_openblas_threads() -> None:
    """Make loaded OpenBLAS libraries take the environment's ``OPENBLAS_THREAD_TIMEOUT``:
    re-read the environment, then stop the thread server, which the next threaded call
    starts again with the timeout it read. This must not run while another thread is
    inside a BLAS call; it runs at ``import netforge``."""
    for library in _openblas_libraries():
        read_env = getattr(library, "openblas_read_env", None)
        shutdown = getattr(library, "blas_thread_shutdown_", None)
        if read_env is not None and shutdown is not None:
            read_env()
            shutdown()


# -- C += A·B in one GEMM ---------------------------------------------------------------------
_ROW_MAJOR, _NO_TRANS, _TRANS = 101, 111, 112
#: numpy's OpenBLAS builds are ILP64 (64-bit integers) and say so with the ``64_`` suffix;
#: an unsuffixed ``cblas_?gemm`` could take 32-bit integers, so it is never called.
_GEMM_NAMES = {
    "float32": ("scipy_cblas_sgemm64_", "cblas_sgemm64_"),
    "float64": ("scipy_cblas_dgemm64_", "cblas_dgemm64_"),
}
_gemms: dict[str, Any] = {}


def _gemm(dtype: Any) -> Any:
    """numpy's OpenBLAS ``cblas_?gemm`` for ``dtype`` with its ILP64 signature, or None."""
    name = str(dtype)
    if name not in _gemms:
        function = openblas_symbol(*_GEMM_NAMES[name]) if name in _GEMM_NAMES else None
        if function is not None:
            scalar = ctypes.c_float if name == "float32" else ctypes.c_double
            index, pointer = ctypes.c_int64, ctypes.c_void_p
            function.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int]
            function.argtypes += [index, index, index, scalar, pointer, index, pointer, index]
            function.argtypes += [scalar, pointer, index]
            function.restype = None
        _gemms[name] = function
    return _gemms[name]


def _operand(array: Any) -> tuple[int, int] | None:
    """(CBLAS transpose flag, leading dimension) of a 2-D row-major or transposed view, or
    None for a layout BLAS cannot take as it is."""
    rows, cols = array.shape
    if any(s % array.itemsize for s in array.strides):
        return None
    step_row, step_col = (s // array.itemsize for s in array.strides)
    if step_col == 1 and step_row >= max(1, cols):
        return _NO_TRANS, step_row
    if step_row == 1 and step_col >= max(1, rows):
        return _TRANS, step_col
    return None


def matmul_into(a: Any, b: Any, out: Any, *, accumulate: bool = True) -> None:
    """``out += a @ b`` for 2-D arrays, the way Caffe accumulates parameter gradients, or
    with ``accumulate`` False ``out[...] = a @ b`` (a parameter diff that holds nothing to
    keep, ``Net.mark_param_diffs_stale``): on numpy, one GEMM with beta = 1 or 0 into
    ``out`` (numpy's ``matmul`` has no beta).

    ``out += a @ b`` writes the product to a temporary, then reads ``out`` and the temporary
    and writes ``out``. For InnerProduct's weight gradient, the product of two thin matrices
    (a batch of rows), that traffic is most of the time: CaffeNet's fc6 (4096 × 9216, batch
    32) takes 27 ms that way and 12 ms as one GEMM on 2 cores, and the 151 MB temporary no
    longer faults its pages in at every iteration. Other array modules, mixed dtypes,
    overlapping operands and layouts BLAS cannot take as they are use the expression.

    ctypes releases the GIL for the call, which numpy's ``matmul`` does not always do: on
    LeNet's conv1 weight gradient (25 × 18432 by 18432 × 20) a second Python thread waited
    out the 5 ms switch interval during the 0.3 ms product, so the convolution's other
    worker stalled (conv1 backward, 2 cores: 1.13-1.35 ms with ``matmul``, 0.77-0.96 ms
    with this). The ctypes call itself costs 10-30 µs more than numpy's ``matmul``, which
    is why the layers use it only where that stall was measured.
    """
    import numpy as np

    gemm = _gemm(out.dtype) if isinstance(out, np.ndarray) else None
    (m, k), n = a.shape, b.shape[1]
    layouts = (_operand(a), _operand(b)) if gemm is not None else (None, None)
    if (
        None in layouts
        or a.dtype != out.dtype
        or b.dtype != out.dtype
        or not out.flags.c_contiguous
        or out.shape != (m, n)
        or b.shape[0] != k
        or min(m, n, k) == 0
        or np.may_share_memory(a, out)
        or np.may_share_memory(b, out)
    ):
        if accumulate:
            out += a @ b
        else:
            out[...] = a @ b
        return
    (trans_a, lda), (trans_b, ldb) = layouts
    beta = 1.0 if accumulate else 0.0
    data = (a.ctypes.data, lda, b.ctypes.data, ldb, beta, out.ctypes.data, n)
    gemm(_ROW_MAJOR, trans_a, trans_b, m, n, k, 1.0, *data)


# -- thread count -----------------------------------------------------------------------------
_set_threads: Any = False  # False: not looked up yet; None: not found


def set_blas_threads(count: int) -> int:
    """Set the number of threads numpy's OpenBLAS runs a call on; returns the previous count
    (``count`` itself when OpenBLAS or the symbol is not there).

    OpenBLAS's ``openblas_set_num_threads_local``, which despite its name sets the
    process-wide count and returns the previous one. The lookup is done once: scanning
    ``/proc/self/maps`` costs about 0.7 ms."""
    global _set_threads
    if _set_threads is False:
        _set_threads = openblas_symbol("openblas_set_num_threads_local")
        if _set_threads is not None:
            _set_threads.argtypes = [ctypes.c_int]
            _set_threads.restype = ctypes.c_int
    return count if _set_threads is None else _set_threads(count)


# -- level 1: axpby and axpy -----------------------------------------------------------------
_LEVEL1_NAMES = {"float32": ("saxpby", "saxpy"), "float64": ("daxpby", "daxpy")}
_level1: dict[str, Any] = {}


class Level1(NamedTuple):
    """numpy's OpenBLAS ``cblas_?axpby`` and ``cblas_?axpy`` for one dtype, ILP64, taking
    raw addresses (``ndarray.ctypes.data``) and unit strides:

    - ``axpby(n, alpha, x, 1, beta, y, 1)``: ``y = alpha·x + beta·y``, one pass where numpy
      needs two products and a sum;
    - ``axpy(n, alpha, x, 1, y, 1)``: ``y += alpha·x``.
    """

    axpby: Any
    axpy: Any


def level1(dtype: Any) -> Level1 | None:
    """The level-1 routines for ``dtype`` (float32 or float64), or None when numpy's
    OpenBLAS, with its ILP64 interface, is not the BLAS loaded."""
    import numpy as np

    name = np.dtype(dtype).name
    if name not in _level1:
        found = [
            openblas_symbol(f"scipy_cblas_{routine}64_", f"cblas_{routine}64_")
            for routine in _LEVEL1_NAMES.get(name, ())
        ]
        routines = None
        if found and None not in found:
            axpby, axpy = found
            scalar = ctypes.c_float if name == "float32" else ctypes.c_double
            index, pointer = ctypes.c_int64, ctypes.c_void_p
            axpby.argtypes = [index, scalar, pointer, index, scalar, pointer, index]
            axpy.argtypes = [index, scalar, pointer, index, pointer, index]
            axpby.restype = axpy.restype = None
            routines = Level1(axpby, axpy)
        _level1[name] = routines
    return _level1[name]
