"""Solvers: Caffe's SGD, Nesterov, AdaGrad, RMSProp, AdaDelta and Adam, and the loop.

``get_solver(path)`` builds the solver type a prototxt names (its ``type`` string, or the
legacy ``solver_type`` enum, upgraded on reading), as pycaffe's ``caffe.get_solver``.
"""

from __future__ import annotations

import os
from typing import Any

from netforge.errors import ConfigError
from netforge.proto import pb
from netforge.solvers.adaptive import AdaDeltaSolver, AdaGradSolver, AdamSolver, RMSPropSolver
from netforge.solvers.base import SOLVERS, Solver, read_solver_param
from netforge.solvers.sgd import NesterovSolver, SGDSolver


def get_solver(param: str | os.PathLike | pb.SolverParameter, **options: Any) -> Solver:
    """The solver of the type ``param`` names (Caffe's SolverRegistry::CreateSolver)."""
    message = read_solver_param(param)
    cls = SOLVERS.get(message.type)
    if cls is None:
        raise ConfigError(
            f"{param if not isinstance(param, pb.SolverParameter) else 'solver'}: unknown "
            f"solver type {message.type!r}; use one of {', '.join(SOLVERS)}"
        )
    return cls(message if isinstance(param, pb.SolverParameter) else param, **options)


__all__ = [
    "AdaDeltaSolver",
    "AdaGradSolver",
    "AdamSolver",
    "NesterovSolver",
    "RMSPropSolver",
    "SGDSolver",
    "Solver",
    "get_solver",
]
