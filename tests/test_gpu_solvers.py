"""The six solvers on cupy agree with the same run on numpy (issue 7), and a GPU snapshot
resumes on the GPU and on the CPU.

Each case of test_solver.py's CASES (plain, L2 with lr/decay multipliers, L1, clipping,
iter_size) trains the HDF5Data least-squares net for five iterations on both backends from
the same seed; losses, weights and every history buffer must agree within float32 rounding.
All tests here need a GPU and skip cleanly without one.
"""

from __future__ import annotations

import numpy as np
import pytest
from test_solver import CASES, TYPE_SETTINGS, record_losses, solver_param

from netforge import backend as nb
from netforge.solvers import get_solver

pytestmark = pytest.mark.gpu

ITERATIONS = 5


def assert_same_state(solver, reference, rtol: float, atol: float) -> None:
    """Weights and history buffers of ``solver`` (any backend) match those of ``reference``."""
    for a, b in zip(solver.net.learnable_params, reference.net.learnable_params, strict=True):
        np.testing.assert_allclose(nb.to_numpy(a.data), nb.to_numpy(b.data), rtol=rtol, atol=atol)
    for a, b in zip(solver.history, reference.history, strict=True):
        assert nb.get_array_module(a) is solver.xp  # the history lives on the solver's device
        np.testing.assert_allclose(nb.to_numpy(a), nb.to_numpy(b), rtol=rtol, atol=atol)


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("solver_type", sorted(TYPE_SETTINGS))
def test_gpu_training_matches_cpu(tmp_path, solver_type, case):
    settings, net_options, _ = CASES[case]
    param = solver_param(tmp_path, solver_type, settings, **net_options)
    cpu = get_solver(param, dtype=np.float32)
    gpu = get_solver(param, dtype=np.float32, backend=nb.gpu(0))
    cpu_losses, gpu_losses = record_losses(cpu), record_losses(gpu)
    cpu.step(ITERATIONS)
    gpu.step(ITERATIONS)
    np.testing.assert_allclose(gpu_losses, cpu_losses, rtol=1e-5)
    assert_same_state(gpu, cpu, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("fmt", ["BINARYPROTO", "HDF5"])
@pytest.mark.parametrize("solver_type", ["Adam", "Nesterov"])
def test_gpu_snapshot_resumes_on_gpu_and_cpu(tmp_path, solver_type, fmt):
    settings = f"snapshot_format: {fmt} weight_decay: 0.01"
    whole = get_solver(solver_param(tmp_path, solver_type, settings), dtype=np.float64)
    whole.step(7)

    first = get_solver(
        solver_param(tmp_path, solver_type, settings + " snapshot: 4"),
        dtype=np.float64,
        backend=nb.gpu(0),
    )
    first.step(4)
    state = tmp_path / f"snap_iter_4.solverstate{'.h5' if fmt == 'HDF5' else ''}"
    for backend in (nb.gpu(0), nb.CPU):
        resumed = get_solver(
            solver_param(tmp_path, solver_type, settings), dtype=np.float64, backend=backend
        )
        resumed.restore(state)
        assert resumed.iter == 4
        resumed.step(3)
        assert_same_state(resumed, whole, rtol=1e-10, atol=1e-12)
