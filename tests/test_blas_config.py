"""netforge configures numpy's OpenBLAS before numpy loads (netforge/_blas.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from conftest import REPO

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
