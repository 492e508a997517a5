"""The switch for numba's compiled CPU kernels (netforge.builtin_layers._jit)."""

from __future__ import annotations

import subprocess
import sys
import threading

import numpy as np
import pytest

from netforge.builtin_layers import _jit


def _setting(value: str, code: str) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter with NETFORGE_JIT set to ``value``."""
    env = {"NETFORGE_JIT": value, "PATH": ""}
    return subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120
    )


def test_zero_turns_the_kernels_off():
    done = _setting("0", "from netforge.builtin_layers import _jit; print(_jit.enabled())")
    assert done.stdout.strip() == "False", done.stderr


def test_one_without_numba_is_a_config_error_naming_the_extra():
    code = (
        "import sys; sys.modules['numba'] = None\n"
        "from netforge.builtin_layers import _jit\n"
        "try:\n    _jit.enabled()\nexcept Exception as e:\n    print(type(e).__name__, e)"
    )
    done = _setting("1", code)
    assert done.stdout.startswith("ConfigError"), done.stderr
    assert "netforge[jit]" in done.stdout


def test_auto_without_numba_falls_back_to_numpy():
    code = (
        "import sys; sys.modules['numba'] = None\n"
        "from netforge.builtin_layers import _jit\nprint(_jit.enabled())"
    )
    assert _setting("auto", code).stdout.strip() == "False"


@pytest.mark.skipif(not _jit.enabled(), reason="numba (the jit extra) is not installed")
def test_a_kernel_compiles_per_dtype_and_computes_what_numpy_does():
    @_jit.kernel
    def scaled_sum(x, factor):
        total = x.dtype.type(0)
        for value in x:
            total += value * factor
        return total

    for dtype in (np.float32, np.float64):
        x = np.arange(10, dtype=dtype)
        assert scaled_sum(x, dtype(2)) == pytest.approx(90.0)


def test_device_query_reports_the_kernels_and_how_to_change_them(monkeypatch):
    from click.testing import CliRunner

    from netforge.cli.main import cli

    monkeypatch.setenv("NETFORGE_JIT", "0")
    _jit.numba.cache_clear()
    try:
        result = CliRunner().invoke(cli, ["device-query"])
    finally:
        _jit.numba.cache_clear()
    assert result.exit_code == 0, result.output
    assert "compiled CPU kernels: off (NETFORGE_JIT=0)" in result.output


@pytest.mark.skipif(not _jit.enabled(), reason="numba (the jit extra) is not installed")
def test_a_kernel_calls_a_helper_even_when_two_workers_make_its_first_call_at_once():
    @_jit.helper
    def doubled(value):
        return 2 * value

    @_jit.kernel
    def doubled_sum(x):
        total = x.dtype.type(0)
        for value in x:
            total += doubled(value)
        return total

    start, results = threading.Barrier(2), []

    def worker() -> None:
        start.wait()
        results.append(doubled_sum(np.arange(5.0)))

    threads = [threading.Thread(target=worker) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results == [20.0, 20.0]
