"""Configure numpy's OpenBLAS before numpy loads: the fastest kernels, and idle threads
that sleep instead of spinning.

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
CIFAR-10 quick 838 → 1400 img/s on 2 cores, CaffeNet unchanged.
"""

from __future__ import annotations

import ctypes
import os
import sys
from typing import Any

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
    if "numpy" in sys.modules or wanted.lower() == "keep":
        return
    if not os.environ.get("OPENBLAS_THREAD_TIMEOUT"):
        thread_timeout = os.environ["OPENBLAS_THREAD_TIMEOUT"] = "4"
    current = os.environ.get("OPENBLAS_CORETYPE", "")
    if not wanted:
        if current.upper() in _AVX512_CORES or not _SKYLAKEX_FLAGS <= _cpu_flags():
            return
        wanted = "SkylakeX"
    if wanted != current:
        os.environ["OPENBLAS_CORETYPE"] = wanted
        adjustment = (current, wanted)


def openblas_symbol(*names: str) -> Any:
    """The first of ``names`` exported by an OpenBLAS library loaded in this process (found
    through Linux's ``/proc/self/maps``; numpy's copy prefixes some symbols), or None."""
    try:
        with open("/proc/self/maps") as maps:
            paths = sorted({line.split()[-1] for line in maps if "openblas" in line.lower()})
    except OSError:
        return None
    for path in paths:
        try:
            library = ctypes.CDLL(path)
        except OSError:
            continue
        for name in names:
            function = getattr(library, name, None)
            if function is not None:
                return function
    return None
