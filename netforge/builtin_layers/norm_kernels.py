"""Compiled CPU kernels for BatchNorm, Scale and Bias (numba, through ``_jit``).

Every array is seen as (outer, channels, inner), the view in which a per-channel statistic
or parameter broadcasts (BatchNorm: (N, C, H·W)). numpy needs one pass over memory per
operation, a fresh temporary between some, and reduces over axes (0, 2) with a slow strided
loop; these kernels fuse the passes and split the channels between the workers
(``_threads.run_chunks``), so both cores run.

Passes over memory, per layer call (r: read, w: written):

- BatchNorm with batch statistics, forward: per channel, a sum, a sum of squared deviations
  and the write of x − mean and of y: x is read three times, but the second and third reads
  of a channel come from cache while it fits (a channel of (8, 256, 56, 56) is 100 kB), so
  about 1r + 2w, against numpy's 4r + 2w and a BLAS reduction. Backward: the sums of dy and
  dy·(x − mean), then dx: 2r + 1w (the second from cache).
- BatchNorm with global statistics, and Scale, Bias: y = x·a + b per channel, 1r + 1w
  (Scale in place also writes its kept copy of x: 1r + 2w); numpy's BatchNorm takes 2r + 2w.
- Scale backward: Σ dy·x, Σ dy and dx = dy·s in one pass, 2r + 1w, against numpy's
  3r + 1w in three calls.

Sums add up in float64 (the data's values and products converted one by one), so a float32
channel of millions of values loses nothing to rounding; the variance is Caffe's
E[(x − mean)²], not E[x²] − E[x]². The kernels are compiled with ``_jit.VECTOR_SUMS``:
reassociation lets LLVM vectorise the sums (3x faster than one add per cycle's latency).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from netforge.builtin_layers import _jit
from netforge.builtin_layers._threads import WORKERS, run_chunks

#: Fewest values worth splitting between the workers: waking a pooled thread costs about
#: 0.1 ms on this kind of virtual machine, which a one-pass kernel over fewer values does not
#: repay (measured: (1, 64, 56, 56) BatchNorm forward 0.06 ms on one worker, 0.16 on two).
SPLIT_MIN = 1 << 19


def usable(*arrays: Any) -> bool:
    """Whether the kernels may run on ``arrays``: numba is enabled and they are C-ordered
    numpy arrays of one floating type, float32 or float64 (anything else, cupy included,
    takes the numpy path)."""
    if not _jit.enabled():
        return False
    first = arrays[0]
    return all(
        type(a) is np.ndarray and a.dtype == first.dtype and a.flags.c_contiguous for a in arrays
    ) and first.dtype in (np.float32, np.float64)


def _run(work: Any, channels: int, count: int) -> None:
    """``work(start, stop)`` over channel ranges: one range per worker when there are
    ``SPLIT_MIN`` values or more, else the whole range here."""
    parts = WORKERS if count >= SPLIT_MIN else 1
    chunks = [(w * channels // parts, (w + 1) * channels // parts) for w in range(parts)]
    chunks = [(start, stop) for start, stop in chunks if stop > start]
    run_chunks(np, lambda start, stop, _worker: work(start, stop), chunks)


def batch_norm_train_forward(
    x: np.ndarray, y: np.ndarray, centered: np.ndarray, eps: float
) -> tuple[np.ndarray, np.ndarray]:
    """BatchNorm with batch statistics on (N, C, rest) arrays: writes ``centered`` = x − mean
    and ``y`` = (x − mean) / sqrt(var + eps) (``y`` may be ``x``); returns the per-channel
    mean and biased variance, float64."""
    channels = x.shape[1]
    mean, var = np.empty(channels), np.empty(channels)
    _run(
        lambda start, stop: _batch_norm_train_forward(x, y, centered, eps, mean, var, start, stop),
        channels,
        x.size,
    )
    return mean, var


def batch_norm_train_backward(
    dy: np.ndarray, centered: np.ndarray, std: np.ndarray, dx: np.ndarray
) -> None:
    """The batch-statistics gradient into ``dx`` (which may be ``dy``), from the kept
    x − mean and the per-channel ``std`` = sqrt(var + eps), shape (C,)."""
    _run(
        lambda start, stop: _batch_norm_train_backward(dy, centered, std, dx, start, stop),
        dy.shape[1],
        dy.size,
    )


def channel_affine(
    x: np.ndarray,
    scale: np.ndarray,
    shift: np.ndarray,
    y: np.ndarray,
    kept: np.ndarray | None = None,
) -> None:
    """y = x·scale[c] + shift[c] over (outer, C, inner) arrays (``y`` may be ``x``); with
    ``kept``, x is also copied there in the same pass (Scale in place)."""
    keep = kept is not None
    target = kept if keep else y
    _run(
        lambda start, stop: _channel_affine(x, scale, shift, y, target, keep, start, stop),
        x.shape[1],
        x.size,
    )


def scale_backward(
    dy: np.ndarray, x: np.ndarray, scale: np.ndarray, dx: np.ndarray | None
) -> np.ndarray:
    """Scale's gradients over (outer, C, inner) arrays in one pass: returns (C, 2) float64
    sums, Σ dy·x and Σ dy per channel, and writes dx = dy·scale[c] unless ``dx`` is None
    (``dx`` may be ``dy``)."""
    sums = np.empty((dy.shape[1], 2))
    write = dx is not None
    target = dx if write else dy
    _run(
        lambda start, stop: _scale_backward(dy, x, scale, target, sums, write, start, stop),
        dy.shape[1],
        dy.size,
    )
    return sums


# -- kernels: serial over channels start..stop - 1 of (outer, channels, inner) arrays ---------
@_jit.kernel(fastmath=_jit.VECTOR_SUMS)
def _batch_norm_train_forward(x, y, centered, eps, mean, var, start, stop):
    outer, _, inner = x.shape
    count = outer * inner
    for c in range(start, stop):
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
        mean[c] = mu
        var[c] = total / count
        inv_std = x.dtype.type(1.0 / np.sqrt(var[c] + eps))
        for n in range(outer):
            for i in range(inner):
                d = x[n, c, i] - center
                centered[n, c, i] = d
                y[n, c, i] = d * inv_std


@_jit.kernel(fastmath=_jit.VECTOR_SUMS)
def _batch_norm_train_backward(dy, centered, std, dx, start, stop):
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
            for i in range(inner):
                dx[n, c, i] = dy[n, c, i] * inv_std - centered[n, c, i] * slope - shift


@_jit.kernel(fastmath=_jit.VECTOR_SUMS)
def _channel_affine(x, scale, shift, y, kept, keep, start, stop):
    outer, _, inner = x.shape
    for n in range(outer):
        for c in range(start, stop):
            a = scale[c]
            b = shift[c]
            if keep:
                for i in range(inner):
                    v = x[n, c, i]
                    kept[n, c, i] = v
                    y[n, c, i] = v * a + b
            else:
                for i in range(inner):
                    y[n, c, i] = x[n, c, i] * a + b


@_jit.kernel(fastmath=_jit.VECTOR_SUMS)
def _scale_backward(dy, x, scale, dx, sums, write, start, stop):
    outer, _, inner = dy.shape
    for c in range(start, stop):
        a = scale[c]
        sum_dyx = 0.0
        sum_dy = 0.0
        for n in range(outer):
            if write:
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
