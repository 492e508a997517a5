"""Compiled CPU kernels for 2-D MAX and AVE pooling (numba, through ``_jit``).

numpy's pooling (``pooling.PoolingLayer``'s phase layout) makes one pass over memory per
kernel row and column, each several ufuncs long (MAX: a compare, a multiply and two maxima
per offset to keep the first maximum), and its backward as many masked adds. Here each
(item, channel) plane is copied once into its s_h·s_w stride phases (phase (a, b) holds the
padded pixels (s_h·u + a, s_w·v + b), padding set to the dtype's lowest value for MAX and to
0 for AVE), as ``depthwise`` does, so that every kernel offset (i, j) of every output row in
a block reads one phase at a fixed offset with unit stride: one vectorised pass per offset
over a block of output rows laid out at the phase's row width, the few columns past the
output width computed and dropped.

- MAX forward keeps, per output, the running maximum and the flat input index h·W + w of the
  first element that reached it (a later one wins only if strictly greater: Caffe's scan
  order). The running maximum starts at the dtype's lowest value with index −1, as Caffe's
  starts at −FLT_MAX with mask −1, so padding never wins; a window whose every element is
  −inf gives the lowest value and index −1, and no gradient, where the numpy path gives −inf
  and the first element. A NaN wins over any number, and the first NaN in scan order is kept:
  the maximum passes it on, as the numpy path's does, so that a divergence upstream reaches
  the loss and the solver names the layer (Caffe's CPU loop, whose ``>`` a NaN never passes,
  would hide it behind the window's other values). The index is kept for backward and
  written to the optional mask top.
- MAX backward zeroes each input plane and adds each top gradient at its kept index.
- AVE forward sums the window (padding adds 0) and multiplies by the layer's divisor, Caffe's
  window size clipped to the padded extent; backward adds the scaled top gradient to every
  offset of its window in phase layout and copies the phases back to the input plane
  (inputs no window reads get 0).

The planes are split among the worker pool (``_threads.run_chunks``) in (item, channel)
ranges when the call is large enough to repay waking a worker (``SPLIT_MIN``). Compiling
costs about 4 s (forward) and 2 s (backward) per dtype on the first run on a machine; later
runs load them from numba's cache in about 0.4 s.

Measured with ``tools/bench_pool.py`` (float32, ms per call, numpy path → kernels, PyTorch
2.13's max_pool2d / avg_pool2d beside them, median of 5 alternating rounds on the shared
2-core machine), forward / backward:

- CIFAR-10 quick pool1, MAX 3 × 3 s2 on (100, 32, 32, 32): 6.9 → 2.4 / 8.6 → 0.83
  (PyTorch 14.5 / 1.36)
- pool2, AVE 3 × 3 s2 on (100, 32, 16, 16): 1.32 → 1.22 / 1.84 → 0.83 (PyTorch 1.52 / 1.48)
- pool3, AVE 3 × 3 s2 on (100, 64, 8, 8): forward stays on numpy (``AVE_PLANE_MIN``),
  1.35; backward 1.46 → 0.98 (PyTorch 1.08 / 0.82)
- CaffeNet pool1, MAX 3 × 3 s2 on (32, 96, 55, 55): 16.6 → 5.7 / 21.5 → 2.8
  (PyTorch 40.5 / 16.8)

In CIFAR-10 quick's training (``netforge.timing.time_net``, 20 iterations, one run each way),
pool1 went from 9.3 / 10.4 ms to 4.2 / 1.5.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from netforge.builtin_layers import _jit
from netforge.builtin_layers._threads import WORKERS, even_chunks, run_chunks

#: Output elements one pass over the kernel offsets covers: a block of output rows whose
#: running maxima or sums stay in the first-level cache while every offset reads into them.
BLOCK = 1024

#: Least input elements worth splitting between the workers: waking the pooled thread cost
#: 0.1-0.2 ms per call on the shared 2-core machine. Measured, MAX 3 × 3 stride 2 forward +
#: backward, float32, one worker / two: (1, 64, 56, 56) (0.2 M) 0.43 / 0.66 ms,
#: (100, 64, 8, 8) (0.4 M) 2.6 / 2.2, (4, 64, 56, 56) (0.8 M) 2.1 / 1.5.
SPLIT_MIN = 1 << 18

#: Least plane (H·W) on which AVE forward takes the kernel: on smaller planes the per-plane
#: and per-row costs outweigh numpy's passes over the whole batch (CIFAR-10 quick's pool3,
#: 8 × 8 planes: numpy 1.47 ms, kernels 1.60; pool2, 16 × 16: 2.09 against 1.54).
AVE_PLANE_MIN = 256

Geometry = tuple[tuple[int, int], tuple[int, int], tuple[int, int]]


def _run(work: Callable[[int, int], None], planes: int, size: int) -> None:
    """``work(start, stop)`` over plane ranges: one per worker when the input has
    ``SPLIT_MIN`` elements or more, else the whole range here."""
    chunks = even_chunks(planes, WORKERS if size >= SPLIT_MIN else 1)
    run_chunks(np, lambda start, stop, _worker: work(start, stop), chunks)


def _planes(x: np.ndarray) -> np.ndarray:
    """(N, C, H, W) as (N·C, H, W), a view."""
    return x.reshape(-1, x.shape[2], x.shape[3])


def _flat(x: np.ndarray) -> np.ndarray:
    """(N, C, H, W) as (N·C, H·W), a view."""
    return x.reshape(x.shape[0] * x.shape[1], -1)


def index_type(dtype: np.dtype) -> type:
    """The integer type ``max_forward`` keeps maxima's indices in for data of ``dtype``:
    as wide as the data, so that the kernel's selects between values and between indices
    run on vectors of one lane count (float64 with int32 indices ran 40% slower)."""
    return np.int32 if np.dtype(dtype).itemsize <= 4 else np.int64


def max_forward(
    x: np.ndarray,
    y: np.ndarray,
    index: np.ndarray,
    mask: np.ndarray | None,
    geometry: Geometry,
) -> None:
    """MAX pooling of ``x`` (N, C, H, W) into ``y`` (N, C, Ho, Wo); ``index`` (``index_type``,
    shaped like ``y``) gets the flat input index h·W + w of each window's first maximum (−1
    when nothing beats the dtype's lowest value), and ``mask`` (``y``'s dtype), when given,
    the same, as Caffe's mask top. ``geometry`` is ((kh, kw), (sh, sw), (ph, pw))."""
    masked = _flat(mask) if mask is not None else np.empty((0, 0), x.dtype)
    _forward(x, y, _flat(index), masked, np.empty(0, x.dtype), geometry)


def ave_forward(x: np.ndarray, y: np.ndarray, divisor: np.ndarray, geometry: Geometry) -> None:
    """AVE pooling of ``x`` (N, C, H, W) into ``y`` (N, C, Ho, Wo): each window's sum times
    ``divisor`` (Ho, Wo), the reciprocal of Caffe's clipped window size."""
    none = np.empty((0, 0), index_type(x.dtype))
    _forward(x, y, none, np.empty((0, 0), x.dtype), divisor.reshape(-1), geometry)


def _forward(x, y, index, mask, divisor, geometry: Geometry) -> None:
    planes, out = _planes(x), _flat(y)
    # MAX pads with the lowest value, which never wins; AVE with 0, which adds nothing.
    fill = np.finfo(x.dtype).min if divisor.size == 0 else x.dtype.type(0)
    _run(
        lambda start, stop: _pool_forward(
            planes, out, index, mask, divisor, fill, y.shape[2:], start, stop, *geometry
        ),
        planes.shape[0],
        x.size,
    )


def max_backward(dy: np.ndarray, index: np.ndarray, dx: np.ndarray) -> None:
    """MAX pooling's bottom gradient into ``dx`` (overwritten): each element of ``dy`` added
    at its window's kept ``index`` (from ``max_forward``)."""
    grad, kept, target = _flat(dy), _flat(index), _flat(dx)
    _run(
        lambda start, stop: _max_backward(grad, kept, target, start, stop),
        target.shape[0],
        dx.size,
    )


def ave_backward(dy: np.ndarray, divisor: np.ndarray, dx: np.ndarray, geometry: Geometry) -> None:
    """AVE pooling's bottom gradient into ``dx`` (overwritten): ``dy`` times ``divisor``
    added to every input of its window."""
    grad, target = _planes(dy), _planes(dx)
    _run(
        lambda start, stop: _ave_backward(grad, divisor, target, start, stop, *geometry),
        target.shape[0],
        dx.size,
    )


# -- kernels: serial over planes start..stop - 1 ----------------------------------------------
@_jit.helper
def _copy_plane(plane, grid, first_row, row_phase, row_at, pw, into_phases):  # pragma: no cover
    """Copy an (H, W) plane into its stride phases ``grid`` (s_h, s_w, rows, row width),
    from phase row ``first_row`` on, or with ``into_phases`` false back from them. Input row
    h lands in phase row ``row_phase[h]`` at ``first_row + row_at[h]`` (computed once per
    call: a division by a stride unknown at compile time takes tens of cycles)."""
    height, width = plane.shape
    sw = grid.shape[1]
    # Where input columns 0 and 1 land for stride 2: phase ``even`` from column ``c0``.
    even, c0, c1 = pw % 2, pw // 2, (pw + 1) // 2
    for h in range(height):
        row = plane[h]
        a, u = row_phase[h], first_row + row_at[h]
        # Strides 1 and 2 apart: with the stride a constant, LLVM vectorises the copy
        # (stride 2: 4x faster than the general loop).
        if sw == 1:
            phase_row = grid[a, 0, u, pw:]
            if into_phases:
                for t in range(width):
                    phase_row[t] = row[t]
            else:
                for t in range(width):
                    row[t] = phase_row[t]
        elif sw == 2:
            first, second = grid[a, even, u, c0:], grid[a, 1 - even, u, c1:]
            if into_phases:
                for t in range(width // 2):
                    first[t] = row[2 * t]
                    second[t] = row[2 * t + 1]
                if width % 2:
                    first[width // 2] = row[width - 1]
            else:
                for t in range(width // 2):
                    row[2 * t] = first[t]
                    row[2 * t + 1] = second[t]
                if width % 2:
                    row[width - 1] = first[width // 2]
        else:
            for b in range(sw):
                w0 = (b - pw) % sw
                phase_row = grid[a, b, u, (w0 + pw) // sw :]
                count = (width - w0 + sw - 1) // sw
                if into_phases:
                    for t in range(count):
                        phase_row[t] = row[w0 + t * sw]
                else:
                    for t in range(count):
                        row[w0 + t * sw] = phase_row[t]


@_jit.kernel
def _pool_forward(x, y, index, mask, divisor, fill, shape, start, stop, kernel, stride, pad):
    """MAX (``divisor`` empty) or AVE of the planes x[start:stop] (H, W) into y (Ho·Wo)."""
    height, width = x.shape[1], x.shape[2]
    out_h, out_w = shape
    kh, kw = kernel
    sh, sw = stride
    ph, pw = pad
    is_max = divisor.size == 0
    # Phase rows and columns: the padded plane, or as far as the last (CEIL) window reaches.
    hq = -(-max(height + 2 * ph, (out_h - 1) * sh + kh) // sh)
    wq = -(-max(width + 2 * pw, (out_w - 1) * sw + kw) // sw)
    # Small planes go ``group`` at a time, stacked in the phases (plane p from phase row
    # p·hq), so that a pass over a kernel offset covers several planes; an output row r ≥ Ho
    # of a plane is computed and dropped like the columns past Wo. One spare row: the last
    # block's dropped columns read a few elements past the phase. Measured, single thread,
    # 3 × 3 s2: 6400 planes 8 × 8, 10-17% faster stacked; 3200 of 16 × 16, even; 3200 of
    # 32 × 32 three to a group, 12% slower (the buffers outgrow the first-level cache).
    group = BLOCK // (hq * wq) if 4 * hq * wq <= BLOCK else 1
    phases = np.full((sh, sw, (group * hq + 1) * wq), fill, x.dtype)
    grid = phases.reshape(sh, sw, group * hq + 1, wq)
    rows = max(1, min((group - 1) * hq + out_h, BLOCK // wq))
    # Two buffers of running maxima (or sums) and offsets, each kernel offset reading one and
    # writing the other: an update in place (m = best[k]; best[k] = v if v > m else m) is a
    # conditional store to LLVM, vectorised as masked stores, which AMD's Zen runs
    # microcoded (measured 3x slower).
    best = np.empty((2, rows * wq), x.dtype)
    arg = np.empty((2, rows * wq), index.dtype)
    none = index.dtype.type(-1)
    want_mask = mask.shape[0] > 0
    # Integer divisions by a stride unknown at compile time take tens of cycles: each is
    # done once per call, not per plane.
    row_phase, row_at = (np.arange(height) + ph) % sh, (np.arange(height) + ph) // sh
    tap_row = np.stack((np.arange(kh) % sh, np.arange(kh) // sh))
    tap_col = np.stack((np.arange(kw) % sw, np.arange(kw) // sw))
    for q0 in range(start, stop, group):
        planes = min(stop, q0 + group) - q0
        for p in range(planes):
            _copy_plane(x[q0 + p], grid, p * hq, row_phase, row_at, pw, True)
        # Stacked rows up to the last plane's last output row.
        last = (planes - 1) * hq + out_h
        for r0 in range(0, last, rows):
            r1 = min(last, r0 + rows)
            count = (r1 - r0) * wq
            old_best, old_arg = best[0], arg[0]
            for k in range(count):
                old_best[k] = fill
                old_arg[k] = none
            side = 0
            for i in range(kh):
                a, ri = tap_row[0, i], tap_row[1, i]
                for j in range(kw):
                    b, cj = tap_col[0, j], tap_col[1, j]
                    src = phases[a, b, (r0 + ri) * wq + cj :]
                    if not is_max:
                        total = best[0]
                        for k in range(count):
                            total[k] += src[k]
                        continue
                    old_best, old_arg = best[side], arg[side]
                    new_best, new_arg = best[1 - side], arg[1 - side]
                    side = 1 - side
                    # The offset of input (i, j) from the window's first, in the flat plane.
                    offset = index.dtype.type(i * width + j)
                    for k in range(count):
                        v = src[k]
                        m = old_best[k]
                        t = old_arg[k]
                        wins = v > m or (v != v and m == m)
                        new_best[k] = v if wins else m
                        new_arg[k] = offset if wins else t
            q, oh = q0 + r0 // hq, r0 % hq
            for r in range(r1 - r0):
                if r > 0:
                    oh += 1
                    if oh == hq:
                        q, oh = q + 1, 0
                if oh >= out_h:
                    continue
                result, chosen = best[side, r * wq :], arg[side, r * wq :]
                top = y[q, oh * out_w :]
                if not is_max:
                    scale = divisor[oh * out_w :]
                    for ow in range(out_w):
                        top[ow] = result[ow] * scale[ow]
                    continue
                for ow in range(out_w):
                    top[ow] = result[ow]
                # Flat input index of the window's first input, plus the winner's offset.
                corner = index.dtype.type((oh * sh - ph) * width - pw)
                step = index.dtype.type(sw)
                kept = index[q, oh * out_w :]
                for ow in range(out_w):
                    t = chosen[ow]
                    kept[ow] = corner + ow * step + t if t >= 0 else none
                if want_mask:
                    flags = mask[q, oh * out_w :]
                    for ow in range(out_w):
                        flags[ow] = kept[ow]


@_jit.kernel
def _max_backward(dy, index, dx, start, stop):
    """dx[q] (H·W, overwritten) = Σ dy[q, e] over the outputs e whose maximum is at each
    input, for the planes q in [start, stop)."""
    size = dx.shape[1]
    outputs = dy.shape[1]
    for q in range(start, stop):
        target = dx[q]
        for e in range(size):
            target[e] = 0
        for e in range(outputs):
            flat = index[q, e]
            if flat >= 0:
                target[flat] += dy[q, e]


@_jit.kernel
def _ave_backward(dy, divisor, dx, start, stop, kernel, stride, pad):
    """dx[q] (H, W, overwritten) = Σ dy[q]·divisor over the windows holding each input, for
    the planes q in [start, stop): summed in ``_pool_forward``'s phase layout, then copied
    back."""
    height, width = dx.shape[1], dx.shape[2]
    out_h, out_w = dy.shape[1], dy.shape[2]
    kh, kw = kernel
    sh, sw = stride
    ph, pw = pad
    hq = -(-max(height + 2 * ph, (out_h - 1) * sh + kh) // sh)
    wq = -(-max(width + 2 * pw, (out_w - 1) * sw + kw) // sw)
    group = BLOCK // (hq * wq) if 4 * hq * wq <= BLOCK else 1  # as in _pool_forward
    flat = np.empty(sh * sw * (group * hq + 1) * wq, dx.dtype)
    phases = flat.reshape(sh, sw, (group * hq + 1) * wq)
    grid = flat.reshape(sh, sw, group * hq + 1, wq)
    rows = max(1, min((group - 1) * hq + out_h, BLOCK // wq))
    grad = np.empty(rows * wq, dx.dtype)
    row_phase, row_at = (np.arange(height) + ph) % sh, (np.arange(height) + ph) // sh
    tap_row = np.stack((np.arange(kh) % sh, np.arange(kh) // sh))
    tap_col = np.stack((np.arange(kw) % sw, np.arange(kw) // sw))
    for q0 in range(start, stop, group):
        planes = min(stop, q0 + group) - q0
        for k in range(flat.size):
            flat[k] = 0
        last = (planes - 1) * hq + out_h
        for r0 in range(0, last, rows):
            r1 = min(last, r0 + rows)
            count = (r1 - r0) * wq
            q, oh = q0 + r0 // hq, r0 % hq
            for r in range(r1 - r0):
                if r > 0:
                    oh += 1
                    if oh == hq:
                        q, oh = q + 1, 0
                dst = grad[r * wq :]
                # Dropped rows and columns get 0: they add nothing to the phases.
                filled = 0
                if oh < out_h:
                    src = dy[q, oh]
                    scale = divisor[oh]
                    for t in range(out_w):
                        dst[t] = src[t] * scale[t]
                    filled = out_w
                for t in range(filled, wq):
                    dst[t] = 0
            for i in range(kh):
                a, ri = tap_row[0, i], tap_row[1, i]
                for j in range(kw):
                    b, cj = tap_col[0, j], tap_col[1, j]
                    dst = phases[a, b, (r0 + ri) * wq + cj :]
                    for k in range(count):
                        dst[k] += grad[k]
        for p in range(planes):
            _copy_plane(dx[q0 + p], grid, p * hq, row_phase, row_at, pw, False)
