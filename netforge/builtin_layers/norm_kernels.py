"""Compiled CPU kernels for BatchNorm, Scale and Bias (numba, through ``_jit``).

Every array is seen as (outer, channels, inner), the view in which a per-channel statistic
or parameter broadcasts (BatchNorm: (N, C, H·W)). numpy needs one pass over memory per
operation, a fresh temporary between some, and reduces over axes (0, 2) with a slow strided
loop; these kernels fuse the passes and split the channels between the workers
(``_threads.run_chunks``), so both cores run.

Passes over memory per call (r: arrays read, w: written; "cached": a channel's second read
while it fits in L2, 100 kB per channel of (8, 256, 56, 56) float32):

- BatchNorm with batch statistics, forward: per channel, a sum, a sum of squared deviations
  about the mean, and the write of x − mean (kept for backward) and of y: 1r + 2 cached r +
  2w, against numpy's 4r + 2w (BLAS sum, subtract, einsum, divide). Backward: the sums of dy
  and dy·(x − mean), then dx: 2r + 2 cached r + 1w, against numpy's 8r + 4w.
- y = x·a + b per channel (BatchNorm with global statistics, Scale, Bias forward; BatchNorm's
  global-statistics backward and a frozen Scale's, with b = 0): 1r + 1w, and Scale in place
  also writes its kept copy of x in the same pass (1r + 2w); numpy takes 2r + 2w or 3r + 3w.
  With a (leaky) ReLU after it in the same pass (``netforge.fusion``'s BatchNorm + Scale +
  ReLU at inference): still 1r + 1w, where the three layers take 4r + 4w on the kernels.
- Scale backward: Σ dy·x, Σ dy and dx = dy·s in one pass, 2r + 1w, against numpy's 4r + 1w.
- BatchNorm with batch statistics, Scale and ReLU in training (``netforge.fusion``'s
  training runs): forward as BatchNorm's alone, 1r + 2 cached r + 2w, where the three
  kernels take 3r + 2 cached r + 5w; backward the ReLU's mask and both layers' sums, then
  dx: 3r + 3 cached r + 1w, where they take 6r + 2 cached r + 3w.

In place, the caller passes the input array itself as the output (``y is x``), and the
kernels write through the one name they read: with two names for one memory, LLVM's
overlap check sends every loop to its scalar version, 3-5x slower ((8, 64, 3136) float32
y = x·a + b: 0.78 ms through two names, 0.15 through one). Two distinct arrays over one
memory still give the right values, at that scalar speed.

Sums add up in float64 (the data's values and products converted one by one), so a float32
channel of millions of values loses nothing to rounding; the variance is Caffe's
E[(x − mean)²], not E[x²] − E[x]². The kernels are compiled with ``_jit.VECTOR_SUMS``:
reassociation lets LLVM vectorise the sums (3x faster than one add per cycle's latency).

Measured with ``tools/bench_norm.py`` (float32, in place, ms per call, numpy path → kernels,
median of 5 alternating rounds on the shared 2-core machine, load 2.5-3), forward/backward:

- (8, 64, 56, 56): BatchNorm TRAIN 1.4 → 0.7 / 2.8 → 0.6, TEST 0.8 → 0.16 / 0.4 → 0.15,
  Scale 1.1 → 0.3 / 1.0 → 0.5
- (8, 256, 56, 56): BatchNorm TRAIN 9.7 → 3.6 / 16 → 4.1, TEST 4.3 → 0.8 / 2.2 → 1.4,
  Scale 8.1 → 2.5 / 6.4 → 3.3
- (8, 512, 28, 28): BatchNorm TRAIN 4.1 → 2.5 / 6.4 → 0.9, TEST 1.7 → 0.4 / 0.8 → 0.4,
  Scale 2.6 → 0.8 / 2.7 → 1.1
- (8, 2048, 7, 7): BatchNorm TRAIN 0.92 → 0.86 / 1.2 → 0.5, TEST 0.5 → 0.15 / 0.25 → 0.12,
  Scale 0.6 → 0.2 / 0.6 → 0.4
- (1, 256, 56, 56): BatchNorm TRAIN 1.1 → 0.6 / 1.2 → 0.2, TEST 0.43 → 0.11 / 0.22 → 0.10,
  Scale 0.5 → 0.13 / 0.6 → 0.3
- (1, 2048, 7, 7): BatchNorm TRAIN 0.16 → 0.14 / 0.19 → 0.08, TEST 0.09 → 0.05 /
  0.036 → 0.030, Scale 0.09 → 0.04 / 0.10 → 0.07

Bias forward gains as Scale's does (batch 8, 256 × 56²: 3.4 → 0.6 ms); its backward is a
BLAS sum on both paths. In ResNet-50's training at batch 8 (one run of three iterations
each, ``netforge.timing.time_net`` summed per layer type), BatchNorm went from 161/235 ms
forward/backward on the numpy path to 75/43 on the kernels, Scale from 109/104 to 40/53.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from netforge.builtin_layers import _jit
from netforge.builtin_layers._threads import WORKERS, even_chunks, run_chunks

#: Least work, in values times passes over them, worth splitting between the workers:
#: handing a range to the pooled thread cost 0.15-0.2 ms on the shared 2-core machine, which
#: half of a smaller call does not repay. Measured, float32 in place, one worker / two:
#: y = x·a + b (1 pass) on 0.8 M values 0.12 / 0.27 ms, on 3.2 M 0.66 / 0.59; BatchNorm's
#: batch-statistics forward (3 passes) on 0.8 M (1, 256, 56, 56) 0.43 / 0.39, on
#: (8, 256, 56, 56) 7.1 / 4.4.
SPLIT_MIN = 1 << 21


def _run(work: Any, channels: int, count: int, passes: int) -> None:
    """``work(start, stop)`` over channel ranges: one range per worker when ``passes`` over
    ``count`` values come to ``SPLIT_MIN`` or more, else the whole range here."""
    chunks = even_chunks(channels, 1 if count * passes < SPLIT_MIN else WORKERS)
    run_chunks(np, lambda start, stop, _worker: work(start, stop), chunks)


def batch_norm_train_forward(
    x: np.ndarray, y: np.ndarray, centered: np.ndarray, eps: float
) -> tuple[np.ndarray, np.ndarray]:
    """BatchNorm with batch statistics on (N, C, rest) arrays: writes ``centered`` = x − mean
    and ``y`` = (x − mean) / sqrt(var + eps) (``y`` may be ``x`` itself: in place); returns
    the per-channel mean and biased variance, float64."""
    channels = x.shape[1]
    mean, var = np.empty(channels), np.empty(channels)
    in_place = x is y
    _run(
        lambda start, stop: _batch_norm_train_forward(
            x, y, centered, in_place, eps, mean, var, start, stop
        ),
        channels,
        x.size,
        3,
    )
    return mean, var


def batch_norm_train_backward(
    dy: np.ndarray, centered: np.ndarray, std: np.ndarray, dx: np.ndarray
) -> None:
    """The batch-statistics gradient into ``dx`` (``dx`` may be ``dy`` itself: in place),
    from the kept x − mean and the per-channel ``std`` = sqrt(var + eps), shape (C,)."""
    in_place = dy is dx
    _run(
        lambda start, stop: _batch_norm_train_backward(
            dy, centered, std, dx, in_place, start, stop
        ),
        dy.shape[1],
        dy.size,
        2,
    )


def channel_affine(
    x: np.ndarray,
    scale: np.ndarray,
    shift: np.ndarray,
    y: np.ndarray,
    kept: np.ndarray | None = None,
    slope: float | None = None,
) -> None:
    """y = x·scale[c] + shift[c] over (outer, C, inner) arrays (``y`` may be ``x`` itself:
    in place); with ``kept``, x is also copied there in the same pass (Scale in place).
    With ``slope`` (and no ``kept``), ReLU follows in the same pass: y = v where v > 0, else
    ``slope``·v (0 for a slope of 0, even at v = −inf, as ReLU's maximum gives), v being
    x·scale + shift; NaN stays NaN (``netforge.fusion``'s BatchNorm + Scale + ReLU)."""
    if slope is not None:
        in_place = x is y
        _run(
            lambda start, stop: _channel_affine_relu(
                x, scale, shift, y, in_place, slope, start, stop
            ),
            x.shape[1],
            x.size,
            1,
        )
        return
    mode = _SEPARATE if x is not y else _IN_PLACE if kept is None else _KEEP
    target = y if kept is None else kept
    _run(
        lambda start, stop: _channel_affine(x, scale, shift, y, target, mode, start, stop),
        x.shape[1],
        x.size,
        1,
    )


def batch_norm_fold(
    mean_sum: np.ndarray,
    var_sum: np.ndarray,
    norm: np.ndarray,
    eps: float,
    factors: np.ndarray | None,
    bias: np.ndarray | None,
    dtype: np.dtype,
) -> tuple[np.ndarray, np.ndarray]:
    """BatchNorm's global statistics (blobs 0, 1 and 2, flat), then Scale's ``factors`` and
    ``bias`` when given, as one per-channel map x·a + b: returns a and b in ``dtype``,
    computed in float64 (``netforge.fusion`` gives the formulas). One call, where numpy's
    dozen operations on (C,) arrays cost 15 µs."""
    scale, shift = np.empty(mean_sum.size, dtype), np.empty(mean_sum.size, dtype)
    _batch_norm_fold(mean_sum, var_sum, norm, eps, factors, bias, scale, shift)
    return scale, shift


def scale_backward(
    dy: np.ndarray, x: np.ndarray, scale: np.ndarray, dx: np.ndarray | None
) -> np.ndarray:
    """Scale's gradients over (outer, C, inner) arrays in one pass: returns (C, 2) float64
    sums, Σ dy·x and Σ dy per channel, and writes dx = dy·scale[c] unless ``dx`` is None
    (``dx`` may be ``dy`` itself)."""
    sums = np.empty((dy.shape[1], 2))
    if dx is None:
        mode, dx = _NONE, dy
    else:
        mode = _IN_PLACE if dy is dx else _SEPARATE
    _run(
        lambda start, stop: _scale_backward(dy, x, scale, dx, sums, mode, start, stop),
        dy.shape[1],
        dy.size,
        2,
    )
    return sums


def batch_norm_scale_train_forward(
    x: np.ndarray,
    y: np.ndarray,
    centered: np.ndarray,
    eps: float,
    factors: np.ndarray,
    bias: np.ndarray,
    slope: float | None,
) -> tuple[np.ndarray, np.ndarray]:
    """BatchNorm with batch statistics, then Scale (``factors``, ``bias``) and, unless
    ``slope`` is None, ReLU, in one call (``netforge.fusion``'s training runs): writes
    ``centered`` = x − mean, as BatchNorm keeps it, and ``y`` (may be ``x``); returns the
    per-channel mean and biased variance, float64."""
    channels = x.shape[1]
    mean, var = np.empty(channels), np.empty(channels)
    in_place = x is y
    relu = slope is not None
    _run(
        lambda start, stop: _batch_norm_scale_train_forward(
            x, y, centered, in_place, eps, factors, bias, relu, slope or 0.0, mean, var, start, stop
        ),
        channels,
        x.size,
        3,
    )
    return mean, var


def batch_norm_scale_train_backward(
    dy: np.ndarray,
    y: np.ndarray,
    centered: np.ndarray,
    std: np.ndarray,
    factors: np.ndarray,
    dx: np.ndarray,
    slope: float | None,
) -> np.ndarray:
    """The gradients of ``batch_norm_scale_train_forward``'s chain from the top gradient
    ``dy`` and output ``y`` (the ReLU's mask, unless ``slope`` is None): writes the bottom
    gradient into ``dx`` (may be ``dy``) and returns the Scale's (C, 2) float64 sums, Σ dy'·x̂
    and Σ dy' per channel, dy' being dy through the ReLU and x̂ BatchNorm's output."""
    sums = np.empty((dy.shape[1], 2))
    in_place = dy is dx
    relu = slope is not None
    _run(
        lambda start, stop: _batch_norm_scale_train_backward(
            dy, y, centered, std, factors, dx, in_place, relu, slope or 0.0, sums, start, stop
        ),
        dy.shape[1],
        dy.size,
        2,
    )
    return sums


# -- kernels: serial over channels start..stop - 1 of (outer, channels, inner) arrays ---------
#: How a kernel writes its output: not at all, to its own array, over its input (in place),
#: over its input after copying the input to a kept array.
_NONE, _SEPARATE, _IN_PLACE, _KEEP = 0, 1, 2, 3


@_jit.helper
def _mean_and_variance(x, c):  # pragma: no cover - numba
    """Channel ``c``'s mean and biased variance, E[(x − mean)²] (Caffe's), summed in float64."""
    outer, _, inner = x.shape
    count = outer * inner
    total = 0.0
    for n in range(outer):
        for i in range(inner):
            total += x[n, c, i]
    mu = total / count
    center = x.dtype.type(mu)
    total = 0.0
    for n in range(outer):
        for i in range(inner):
            d = x[n, c, i] - center
            total += d * d
    return mu, total / count


@_jit.kernel(fastmath=_jit.VECTOR_SUMS)
def _batch_norm_train_forward(x, y, centered, in_place, eps, mean, var, start, stop):
    outer, _, inner = x.shape
    for c in range(start, stop):
        mean[c], var[c] = _mean_and_variance(x, c)
        center = x.dtype.type(mean[c])
        inv_std = x.dtype.type(1.0 / np.sqrt(var[c] + eps))
        for n in range(outer):
            if in_place:
                for i in range(inner):
                    d = x[n, c, i] - center
                    centered[n, c, i] = d
                    x[n, c, i] = d * inv_std
            else:
                for i in range(inner):
                    d = x[n, c, i] - center
                    centered[n, c, i] = d
                    y[n, c, i] = d * inv_std


@_jit.kernel(fastmath=_jit.VECTOR_SUMS)
def _batch_norm_train_backward(dy, centered, std, dx, in_place, start, stop):
    # dx = (dy − mean(dy) − (x − mean)·mean(dy·(x − mean)) / std²) / std
    outer, _, inner = dy.shape
    count = outer * inner
    for c in range(start, stop):
        sum_dy = 0.0
        sum_dyx = 0.0
        for n in range(outer):
            for i in range(inner):
                g = dy[n, c, i]
                sum_dy += g
                sum_dyx += g * centered[n, c, i]
        s = np.float64(std[c])
        inv_std = dy.dtype.type(1.0 / s)
        shift = dy.dtype.type(sum_dy / count / s)
        slope = dy.dtype.type(sum_dyx / count / (s * s * s))
        for n in range(outer):
            if in_place:
                for i in range(inner):
                    dy[n, c, i] = dy[n, c, i] * inv_std - centered[n, c, i] * slope - shift
            else:
                for i in range(inner):
                    dx[n, c, i] = dy[n, c, i] * inv_std - centered[n, c, i] * slope - shift


@_jit.kernel(fastmath=_jit.VECTOR_SUMS)
def _channel_affine(x, scale, shift, y, kept, mode, start, stop):
    outer, _, inner = x.shape
    for n in range(outer):
        for c in range(start, stop):
            a = scale[c]
            b = shift[c]
            if mode == _KEEP:
                for i in range(inner):
                    v = x[n, c, i]
                    kept[n, c, i] = v
                    x[n, c, i] = v * a + b
            elif mode == _IN_PLACE:
                for i in range(inner):
                    x[n, c, i] = x[n, c, i] * a + b
            else:
                for i in range(inner):
                    y[n, c, i] = x[n, c, i] * a + b


@_jit.kernel(fastmath=_jit.VECTOR_SUMS)
def _channel_affine_relu(x, scale, shift, y, in_place, slope, start, stop):
    # "v <= 0" rather than "v > 0" picks the negative side, so that NaN keeps its value, as
    # numpy's maximum does; a zero slope writes 0 rather than 0·v (NaN at v = −inf).
    outer, _, inner = x.shape
    zero = x.dtype.type(0)
    s = x.dtype.type(slope)
    leaky = slope != 0
    for n in range(outer):
        for c in range(start, stop):
            a = scale[c]
            b = shift[c]
            if in_place and leaky:
                for i in range(inner):
                    v = x[n, c, i] * a + b
                    x[n, c, i] = v * s if v <= zero else v
            elif in_place:
                for i in range(inner):
                    v = x[n, c, i] * a + b
                    x[n, c, i] = zero if v <= zero else v
            elif leaky:
                for i in range(inner):
                    v = x[n, c, i] * a + b
                    y[n, c, i] = v * s if v <= zero else v
            else:
                for i in range(inner):
                    v = x[n, c, i] * a + b
                    y[n, c, i] = zero if v <= zero else v


@_jit.kernel(fastmath=_jit.VECTOR_SUMS)
def _scale_backward(dy, x, scale, dx, sums, mode, start, stop):
    outer, _, inner = dy.shape
    for c in range(start, stop):
        a = scale[c]
        sum_dyx = 0.0
        sum_dy = 0.0
        for n in range(outer):
            if mode == _IN_PLACE:
                for i in range(inner):
                    g = dy[n, c, i]
                    sum_dyx += g * x[n, c, i]
                    sum_dy += g
                    dy[n, c, i] = g * a
            elif mode == _SEPARATE:
                for i in range(inner):
                    g = dy[n, c, i]
                    sum_dyx += g * x[n, c, i]
                    sum_dy += g
                    dx[n, c, i] = g * a
            else:
                for i in range(inner):
                    g = dy[n, c, i]
                    sum_dyx += g * x[n, c, i]
                    sum_dy += g
        sums[c, 0] = sum_dyx
        sums[c, 1] = sum_dy


# -- on (C,) parameter vectors ---------------------------------------------------------------
@_jit.kernel
def _batch_norm_fold(mean_sum, var_sum, norm, eps, factors, bias, scale, shift):
    # numba compiles a variant per None argument, with its branch pruned.
    total = np.float64(norm[0])
    factor = 0.0 if total == 0 else 1.0 / total
    for c in range(scale.size):
        a = 1.0 / np.sqrt(np.float64(var_sum[c]) * factor + eps)
        b = -factor * np.float64(mean_sum[c]) * a
        if factors is not None:
            a *= factors[c]
            b *= factors[c]
        if bias is not None:
            b += bias[c]
        scale[c] = a
        shift[c] = b


@_jit.helper
def _through_relu(g, y, relu, slope):  # pragma: no cover - numba
    """The top gradient ``g`` through a ReLU of ``slope`` whose output is ``y``: g where
    y > 0, else slope·g (NaN takes the slope, as ``ReLULayer``'s backward gives it)."""
    if relu and not y > 0:
        return g * slope
    return g


@_jit.kernel(fastmath=_jit.VECTOR_SUMS)
def _batch_norm_scale_train_forward(
    x, y, centered, in_place, eps, factors, bias, relu, slope, mean, var, start, stop
):
    # BatchNorm's three passes (``_batch_norm_train_forward``), the last of which also
    # applies the Scale, as one factor s/std and the bias, and the ReLU.
    outer, _, inner = x.shape
    zero = x.dtype.type(0)
    leak = x.dtype.type(slope)
    for c in range(start, stop):
        mean[c], var[c] = _mean_and_variance(x, c)
        center = x.dtype.type(mean[c])
        a = x.dtype.type(factors[c] / np.sqrt(var[c] + eps))
        b = bias[c]
        for n in range(outer):
            for i in range(inner):
                d = x[n, c, i] - center
                centered[n, c, i] = d
                v = d * a + b
                if relu and v <= zero:
                    v = zero if leak == zero else v * leak
                if in_place:
                    x[n, c, i] = v
                else:
                    y[n, c, i] = v


@_jit.kernel(fastmath=_jit.VECTOR_SUMS)
def _batch_norm_scale_train_backward(
    dy, y, centered, std, factors, dx, in_place, relu, slope, sums, start, stop
):
    # With g = dy through the ReLU and x̂ = (x − mean)/std: the Scale's sums Σ g·x̂ and Σ g,
    # and BatchNorm's gradient of dx̂ = s·g, (dx̂ − mean(dx̂) − x̂·mean(dx̂·x̂)) / std.
    outer, _, inner = dy.shape
    count = outer * inner
    leak = dy.dtype.type(slope)
    for c in range(start, stop):
        sum_g = 0.0
        sum_gx = 0.0
        for n in range(outer):
            for i in range(inner):
                g = _through_relu(dy[n, c, i], y[n, c, i], relu, leak)
                sum_g += g
                sum_gx += g * centered[n, c, i]
        s = np.float64(std[c])
        sums[c, 0] = sum_gx / s
        sums[c, 1] = sum_g
        k = factors[c] / s
        gain = dy.dtype.type(k)
        shift = dy.dtype.type(k * sum_g / count)
        slope_x = dy.dtype.type(k * sum_gx / (count * s * s))
        for n in range(outer):
            for i in range(inner):
                g = _through_relu(dy[n, c, i], y[n, c, i], relu, leak)
                v = g * gain - centered[n, c, i] * slope_x - shift
                if in_place:
                    dy[n, c, i] = v
                else:
                    dx[n, c, i] = v
