"""The momentum solvers: SGD and Nesterov (Caffe's sgd_solver.cpp, nesterov_solver.cpp).

Both fold the learning rate into the momentum history (``h = momentum·h + local_rate·g``),
as Caffe does and PyTorch does not: changing the rate mid-run rescales only new steps.
Each update is a few in-place element-wise operations per parameter block.
"""

from __future__ import annotations

from typing import Any

from netforge.solvers.base import Solver, register_solver


@register_solver
class SGDSolver(Solver):
    """Caffe's "SGD": ``h ← momentum·h + local_rate·g``; the step is ``h``, left in the
    history (``step_history``) rather than copied into the diff at every iteration."""

    type = "SGD"
    step_history = 0

    def compute_update_value(
        self, grad: Any, history: tuple[Any, ...], scratch: tuple[Any, Any], local_rate: float
    ) -> None:
        (history,) = history
        history *= self.param.momentum
        grad *= local_rate
        history += grad


@register_solver
class NesterovSolver(Solver):
    """Caffe's "Nesterov": the history as SGD; the step is
    ``(1 + momentum)·h − momentum·h_prev`` (step back, then over-step)."""

    type = "Nesterov"

    def compute_update_value(
        self, grad: Any, history: tuple[Any, ...], scratch: tuple[Any, Any], local_rate: float
    ) -> None:
        momentum = self.param.momentum
        (history,), previous = history, scratch[0]
        previous[...] = history
        history *= momentum
        grad *= local_rate
        history += grad
        self.xp.multiply(history, 1.0 + momentum, out=grad)
        previous *= momentum
        grad -= previous
