"""Pick OpenBLAS's fastest kernels before numpy loads.

numpy's bundled OpenBLAS reads ``OPENBLAS_CORETYPE`` once, when it is loaded. Machines that
pin it to an older family (Haswell) on AVX-512 CPUs halve float32 GEMM speed (measured on
the 2-core CI machines: ~100–235 GFLOP/s with Haswell, ~450 with SkylakeX). So when netforge
is imported before numpy, on a Linux CPU with the AVX-512 subset SkylakeX kernels need, it
raises the setting to SkylakeX. ``NETFORGE_BLAS_CORETYPE`` overrides the choice: a core name
to force one, or ``keep`` to leave ``OPENBLAS_CORETYPE`` alone.
"""

from __future__ import annotations

import os
import sys

_AVX512_CORES = {"SKYLAKEX", "COOPERLAKE", "SAPPHIRERAPIDS"}
_SKYLAKEX_FLAGS = {"avx512f", "avx512cd", "avx512bw", "avx512dq", "avx512vl"}

#: what this module did, for ``netforge device-query``: (previous value, chosen value) or None
adjustment: tuple[str, str] | None = None


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def choose_openblas_core() -> None:
    """Set OPENBLAS_CORETYPE for numpy's OpenBLAS if it is not loaded yet (see module doc)."""
    global adjustment
    if "numpy" in sys.modules:
        return
    wanted = os.environ.get("NETFORGE_BLAS_CORETYPE", "")
    current = os.environ.get("OPENBLAS_CORETYPE", "")
    if wanted.lower() == "keep":
        return
    if not wanted:
        if current.upper() in _AVX512_CORES or not _SKYLAKEX_FLAGS <= _cpu_flags():
            return
        wanted = "SkylakeX"
    if wanted != current:
        os.environ["OPENBLAS_CORETYPE"] = wanted
        adjustment = (current, wanted)
