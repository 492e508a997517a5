"""The adaptive solvers: AdaGrad, RMSProp, AdaDelta and Adam (Caffe's solvers/*.cpp).

The formulas, constants and history layouts are Caffe's, including its quirks: ε (``delta``)
is added to the root of the history, and for Adam before the bias correction (the "ε-hat"
form); AdaDelta reads its decay ρ from ``momentum``; Adam's β1 is ``momentum`` and β2
``momentum2``. AdaDelta and Adam keep two buffers per parameter, stored as Caffe stores them:
all first buffers, then all second buffers. Updates are in-place element-wise operations on
one block of a parameter at a time.
"""

from __future__ import annotations

import math
from typing import Any

from netforge.errors import ConfigError
from netforge.solvers.base import Solver, register_solver
from netforge.solvers.validate import check_unit_interval


def _check_delta(solver: Solver) -> None:
    """ε keeps the denominators above zero: 0 gives 0/0 wherever a gradient is 0."""
    if not solver.param.delta > 0:
        raise ConfigError(
            f"{solver.source}: delta is {solver.param.delta}; it must be > 0 for {solver.type}"
        )


def _decay_into(history: Any, decay: float, update: Any) -> None:
    """``history ← decay·history + (1 − decay)·update``; ``update`` is scratch afterwards."""
    history *= decay
    update *= 1.0 - decay
    history += update


@register_solver
class AdaGradSolver(Solver):
    """Caffe's "AdaGrad": ``h ← h + g²``; step ``local_rate·g / (√h + ε)``."""

    type = "AdaGrad"

    def check_param(self) -> None:
        if self.param.momentum != 0:
            raise ConfigError(f"{self.source}: momentum cannot be used with AdaGrad; remove it")
        _check_delta(self)

    def compute_update_value(
        self, grad: Any, history: tuple[Any, ...], scratch: tuple[Any, Any], local_rate: float
    ) -> None:
        (history,), scratch = history, scratch[0]
        self.xp.multiply(grad, grad, out=scratch)
        history += scratch
        self.xp.sqrt(history, out=scratch)
        scratch += self.param.delta
        grad /= scratch
        grad *= local_rate


@register_solver
class RMSPropSolver(Solver):
    """Caffe's "RMSProp": ``h ← ρ·h + (1 − ρ)·g²`` with ρ = ``rms_decay``; step
    ``local_rate·g / (√h + ε)``."""

    type = "RMSProp"

    def check_param(self) -> None:
        if self.param.momentum != 0:
            raise ConfigError(
                f"{self.source}: momentum cannot be used with RMSProp; use rms_decay instead"
            )
        check_unit_interval(self.source, "rms_decay", self.param.rms_decay, solver="RMSProp")
        _check_delta(self)

    def compute_update_value(
        self, grad: Any, history: tuple[Any, ...], scratch: tuple[Any, Any], local_rate: float
    ) -> None:
        (history,), scratch = history, scratch[0]
        self.xp.multiply(grad, grad, out=scratch)
        _decay_into(history, self.param.rms_decay, scratch)
        self.xp.sqrt(history, out=scratch)
        scratch += self.param.delta
        grad /= scratch
        grad *= local_rate


@register_solver
class AdaDeltaSolver(Solver):
    """Caffe's "AdaDelta" (ρ = ``momentum``): ``h ← ρ·h + (1 − ρ)·g²``;
    ``u = g·√((h₂ + ε)/(h + ε))``; ``h₂ ← ρ·h₂ + (1 − ρ)·u²``; step ``local_rate·u``."""

    type = "AdaDelta"
    history_sets = 2

    def check_param(self) -> None:
        check_unit_interval(
            self.source, "momentum", self.param.momentum, closed=True, solver="AdaDelta"
        )
        _check_delta(self)

    def compute_update_value(
        self, grad: Any, history: tuple[Any, ...], scratch: tuple[Any, Any], local_rate: float
    ) -> None:
        rho, delta, xp = self.param.momentum, self.param.delta, self.xp
        grads_sq, updates_sq = history
        scratch, denominator = scratch
        xp.multiply(grad, grad, out=scratch)
        _decay_into(grads_sq, rho, scratch)
        xp.add(updates_sq, delta, out=scratch)
        xp.add(grads_sq, delta, out=denominator)
        scratch /= denominator
        xp.sqrt(scratch, out=scratch)
        grad *= scratch
        xp.multiply(grad, grad, out=scratch)
        _decay_into(updates_sq, rho, scratch)
        grad *= local_rate


@register_solver
class AdamSolver(Solver):
    """Caffe's "Adam" (β1 = ``momentum``, β2 = ``momentum2``, t = it + 1):
    ``m ← β1·m + (1 − β1)·g``; ``v ← β2·v + (1 − β2)·g²``;
    step ``local_rate·√(1 − β2ᵗ)/(1 − β1ᵗ) · m / (√v + ε)``."""

    type = "Adam"
    history_sets = 2

    def check_param(self) -> None:
        # β1 = 1 divides by 1 − β1ᵗ = 0; β2 > 1 takes the square root of a negative number.
        check_unit_interval(self.source, "momentum", self.param.momentum, solver="Adam")
        check_unit_interval(self.source, "momentum2", self.param.momentum2, solver="Adam")
        _check_delta(self)

    def compute_update_value(
        self, grad: Any, history: tuple[Any, ...], scratch: tuple[Any, Any], local_rate: float
    ) -> None:
        beta1, beta2 = self.param.momentum, self.param.momentum2
        t = self.iter + 1
        correction = math.sqrt(1.0 - beta2**t) / (1.0 - beta1**t)
        first, second = history
        scratch = scratch[0]
        xp = self.xp
        xp.multiply(grad, 1.0 - beta1, out=scratch)
        first *= beta1
        first += scratch
        xp.multiply(grad, grad, out=scratch)
        _decay_into(second, beta2, scratch)
        xp.sqrt(second, out=scratch)
        scratch += self.param.delta
        xp.divide(first, scratch, out=grad)
        grad *= local_rate * correction
