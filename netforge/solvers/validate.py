"""Range checks of every SolverParameter field, made when a solver is built.

Caffe CHECKs a few of these and trusts the rest; a value out of range then shows up as a
complex learning rate, an overflow or a NaN deep in training. Here each field is checked
where the solver reads it, and a bad one is a ConfigError naming the solver file and the
field. Type-specific ranges (momentum2, rms_decay, delta) live with the solver types'
``check_param``; this module holds the checks every type shares.
"""

from __future__ import annotations

import math

from netforge.errors import ConfigError
from netforge.proto import pb

#: int32 fields that count iterations or intervals: 0 turns the feature off, < 0 is an error.
_COUNTS = ("max_iter", "display", "test_interval", "snapshot", "stepsize", "device_id")
#: float fields that must be finite and not negative.
_NON_NEGATIVE = ("base_lr", "gamma", "weight_decay", "momentum")
#: string fields that name files: the operating system refuses a NUL byte in a path.
_PATHS = ("net", "train_net", "snapshot_prefix")


def _fail(source: str, field: str, value: object, expected: str) -> ConfigError:
    return ConfigError(f"{source}: {field} is {value!r}; it must be {expected}")


def check_finite(source: str, field: str, value: float) -> None:
    """Raise a ConfigError naming ``field`` unless ``value`` is a finite number."""
    if not math.isfinite(value):
        raise _fail(source, field, value, "a finite number")


def check_unit_interval(
    source: str, field: str, value: float, *, closed: bool = False, solver: str = ""
) -> None:
    """Raise a ConfigError unless 0 <= ``value`` < 1 (or <= 1 with ``closed``)."""
    if not (0 <= value <= 1 if closed else 0 <= value < 1):
        bound = "[0, 1]" if closed else "[0, 1)"
        where = f" for {solver}" if solver else ""
        raise _fail(source, field, value, f"in {bound}{where}")


def check_solver_fields(param: pb.SolverParameter, source: str) -> None:
    """Check the ranges of the fields every solver type reads (see the module docstring)."""
    for name in _COUNTS:
        value = getattr(param, name)
        if value < 0:
            raise _fail(source, name, value, ">= 0 (0 turns it off)")
    for index, value in enumerate(param.test_iter):
        if value < 0:
            raise _fail(source, f"test_iter #{index}", value, ">= 0")
    for name in _NON_NEGATIVE:
        value = getattr(param, name)
        check_finite(source, name, value)
        if value < 0:
            raise _fail(source, name, value, ">= 0")
    for name in ("power", "delta", "clip_gradients", "rms_decay", "momentum2"):
        check_finite(source, name, getattr(param, name))
    if param.average_loss < 1:
        raise _fail(source, "average_loss", param.average_loss, ">= 1")
    if param.iter_size < 1:
        raise _fail(source, "iter_size", param.iter_size, ">= 1")
    previous = 0
    for index, value in enumerate(param.stepvalue):
        if value < previous:
            raise _fail(
                source, f"stepvalue #{index}", value, f">= 0 and >= the one before ({previous})"
            )
        previous = value
    paths = [(name, getattr(param, name)) for name in _PATHS if param.HasField(name)]
    paths += [(f"test_net #{i}", v) for i, v in enumerate(param.test_net)]
    paths += [(f"weights #{i}", v) for i, v in enumerate(param.weights)]
    for name, value in paths:
        if "\0" in value:
            raise _fail(source, name, value, "a path without NUL bytes")
