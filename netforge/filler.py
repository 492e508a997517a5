"""Weight fillers, as Caffe's filler.hpp: constant, uniform, gaussian (with sparse),
positive_unitball, xavier, msra and bilinear.

Every filler draws from the numpy Generator it is given (the net's, seeded from the
solver's ``random_seed``), and returns a numpy array that the caller moves to its backend.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from netforge.errors import ConfigError
from netforge.proto import pb


def _fans(shape: Sequence[int]) -> tuple[float, float]:
    """Caffe's fan_in = count / shape[0] and fan_out = count / shape[1]."""
    count = math.prod(shape)
    if not count:
        # An empty blob (num_output 0): nothing is drawn; Caffe divides 0 by 0 here.
        return 1.0, 1.0
    fan_in = count / shape[0] if shape else 1.0
    fan_out = count / shape[1] if len(shape) > 1 else 1.0
    return fan_in, fan_out


def _variance_n(filler: pb.FillerParameter, shape: Sequence[int]) -> float:
    fan_in, fan_out = _fans(shape)
    norm = filler.variance_norm
    if norm == pb.FillerParameter.FAN_OUT:
        return fan_out
    if norm == pb.FillerParameter.AVERAGE:
        return (fan_in + fan_out) / 2.0
    return fan_in


def _check_values(filler: pb.FillerParameter) -> None:
    """Finite parameters, a non-negative std and min <= max: numpy would raise a bare
    ValueError (or fill NaNs) for the others."""
    for name in ("value", "min", "max", "mean", "std"):
        if not math.isfinite(getattr(filler, name)):
            raise ConfigError(f"{filler.type} filler: {name} must be finite")
    if filler.std < 0:
        raise ConfigError(f"{filler.type} filler: std must be >= 0, got {filler.std}")
    if filler.min > filler.max:
        raise ConfigError(f"{filler.type} filler: min {filler.min} is above max {filler.max}")


def fill(
    filler: pb.FillerParameter,
    shape: Sequence[int],
    rng: np.random.Generator,
    dtype: Any = np.float32,
) -> np.ndarray:
    """An array of ``shape`` filled as Caffe's filler of type ``filler.type`` would."""
    shape = tuple(int(d) for d in shape)
    kind = filler.type
    _check_values(filler)
    if kind == "constant":
        out = np.full(shape, filler.value, dtype=np.float64)
    elif kind == "uniform":
        out = rng.uniform(filler.min, filler.max, size=shape)
    elif kind == "gaussian":
        out = rng.normal(filler.mean, filler.std, size=shape)
        if filler.sparse >= 0:
            # Caffe keeps each weight with probability sparse / num_outputs (shape[0]).
            if len(shape) < 2:
                raise ConfigError("gaussian filler: 'sparse' needs a blob with at least 2 axes")
            keep = filler.sparse / shape[0]
            out *= rng.random(size=shape) < keep
    elif kind == "positive_unitball":
        out = rng.uniform(0.0, 1.0, size=shape)
        rows = shape[0] if shape else 1
        flat = out.reshape(rows, -1)
        flat /= flat.sum(axis=1, keepdims=True)
    elif kind == "xavier":
        bound = math.sqrt(3.0 / _variance_n(filler, shape))
        out = rng.uniform(-bound, bound, size=shape)
    elif kind == "msra":
        out = rng.normal(0.0, math.sqrt(2.0 / _variance_n(filler, shape)), size=shape)
    elif kind == "bilinear":
        out = _bilinear(shape)
    else:
        raise ConfigError(
            f"unknown filler type {kind!r}; expected one of constant, uniform, gaussian, "
            "positive_unitball, xavier, msra, bilinear"
        )
    # asarray, not ascontiguousarray: the latter turns a 0-axis blob (PReLU channel_shared,
    # a scalar Scale) into shape (1,).
    return np.asarray(out, dtype=dtype, order="C")


def _bilinear(shape: tuple[int, ...]) -> np.ndarray:
    """Caffe's bilinear upsampling kernel: 4-D, square spatial extent."""
    if len(shape) != 4 or shape[2] != shape[3]:
        raise ConfigError(f"bilinear filler needs a 4-D blob with square kernels, got {shape}")
    k = shape[3]
    f = math.ceil(k / 2.0)
    c = (2 * f - 1 - f % 2) / (2.0 * f)
    ramp = 1 - np.abs(np.arange(k) / f - c)
    return np.broadcast_to(np.outer(ramp, ramp), shape).copy()


def filler_or(message: Any, field: str, **default: Any) -> pb.FillerParameter:
    """``message.<field>`` if the prototxt set it, else a FillerParameter from ``default``.

    Presence decides, as in Caffe: ``filler {}`` given explicitly is a constant-0 filler.
    """
    if message.HasField(field):
        return getattr(message, field)
    return pb.FillerParameter(**default)
