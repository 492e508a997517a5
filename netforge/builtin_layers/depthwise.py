"""Depthwise 2-D convolution (one input channel per group), computed without im2col.

A Convolution with ``group`` equal to its input channels C and ``num_output`` = C·M (M
filters per channel; MobileNet's 3×3 "/dw" layers have M = 1) does kh·kw multiply-adds per
output. im2col + GEMM copies every input pixel kh·kw times and then runs C GEMMs of (M,
kh·kw) by (kh·kw, pixels), far too thin for BLAS; at batch 1 they also run on one worker
(``ConvolutionLayer._forward_one`` splits a group's output channels, and there is one).

Here numba kernels (``_jit``: serial, GIL-free, compiled per dtype on first use, cached on
disk) convolve each (item, channel) plane directly, the planes split among the worker pool
(``_threads``) in (item, channel) ranges. A plane is first copied into its s_h·s_w stride
phases, zero-padded (phase (a, b) holds padded pixels (s_h·u + a, s_w·v + b)), so that
every tap (i, j) of every stride and dilation reads one phase at a fixed offset with unit
stride. Over a block of output rows laid out at the phase's row width, a tap is then one
contiguous multiply-add that the compiler vectorises; the few columns past the output
width are computed and dropped. Backward is the same walk: the bottom gradient adds
weight × top gradient into phase-shaped sums gathered back once per plane, and the weight
gradient accumulates top gradient × input per tap elementwise (a scalar running sum would
not vectorise under IEEE ordering), reduced once per plane. The top gradient's dropped
columns are zero there, so they add nothing. (One difference from the GEMM path: an input
pixel that no output reads, past the last full window, still meets a zero in the weight
gradient, so an inf there gives NaN instead of being ignored.)

``ConvolutionLayer`` uses ``DepthwiseConv`` on numpy when ``_jit.enabled()``; without
numba, depthwise layers keep im2col + GEMM. Compiling costs about 2 s per kernel and dtype
the first time on a machine (forward 2.2 s, backward 2.4 s for float32 here); later runs
load them from numba's cache in milliseconds (plus importing numba, about 0.7 s).
"""

from __future__ import annotations

import numpy as np

from netforge.builtin_layers import _jit
from netforge.builtin_layers._threads import WORKERS, even_chunks, run_chunks

#: Output elements one pass over the kernel taps covers: a block of output rows whose
#: accumulator stays in the first-level cache while every tap adds into it.
BLOCK = 1024

#: Partial sums per weight in the weight gradient: wide enough to vectorise, short enough
#: that zeroing and reducing them once per plane costs little next to the taps.
LANES = 64

#: Least input elements worth splitting the planes between the workers: below it, handing
#: half of them to the pooled thread costs more than it saves. With the pool's spinning
#: hand-offs (``_threads``), forward ms of MobileNet's 3 × 3 layers at batch 1 inside the
#: net, two workers / one (medians of 201, alternating): 1024 × 7 × 7 0.21 / 0.25,
#: 512 × 14 × 14 0.16 / 0.20, 256 × 28 × 28 0.21 / 0.26; the whole batch-1 forward (median
#: of 15 alternating rounds) 16.0 ms against 16.8 with the former threshold of 1 << 18,
#: measured when hand-offs slept on locks (512 × 14 × 14 then 0.26 / 0.21).
SPLIT_MIN = 1 << 15


@_jit.helper
def _copy_phases(plane, grid, stride, pad, into_phases):  # pragma: no cover - numba
    """Copy an (H, W) plane into its stride phases ``grid`` (s_h, s_w, rows, row width),
    phase (a, b) holding padded pixels (s_h·u + a, s_w·v + b), or with ``into_phases``
    false back from them. The padding is not touched."""
    height, width = plane.shape
    sh, sw = stride
    ph, pw = pad
    for a in range(sh):
        for b in range(sw):
            h0, w0 = (a - ph) % sh, (b - pw) % sw
            if h0 < height and w0 < width:
                u0, v0 = (h0 + ph) // sh, (w0 + pw) // sw
                cols = (width - w0 + sw - 1) // sw
                for h in range(h0, height, sh):
                    phase_row = grid[a, b, u0 + (h - h0) // sh, v0:]
                    row = plane[h, w0:]
                    if into_phases:
                        for t in range(cols):
                            phase_row[t] = row[t * sw]
                    else:
                        for t in range(cols):
                            row[t * sw] = phase_row[t]


@_jit.helper
def _phase_buffer(x, stride, pad):  # pragma: no cover - numba
    """Zeroed storage for the stride phases of one (H, W) plane of ``x``: the flat phases,
    the (s_h, s_w, rows, row width) grid view of them that ``_copy_phases`` fills, and the
    row width. One spare row: the last output row's taps read a few elements past the
    phase."""
    sh, sw = stride
    ph, pw = pad
    hq, wq = -(-(x.shape[2] + 2 * ph) // sh), -(-(x.shape[3] + 2 * pw) // sw)
    phases = np.zeros((sh, sw, (hq + 1) * wq), x.dtype)
    return phases, phases.reshape(sh, sw, hq + 1, wq), wq


@_jit.kernel
def _forward(x, w, bias, y, start, stop, stride, pad, dilation):  # pragma: no cover - numba
    """y[n, c·M + m] = bias + Σ_ij w[c·M + m, i, j] · xpad[n, c, oh·s + i·d, ow·s + j·d]
    for the planes q = n·C + c in [start, stop); ``bias`` of length 0 means none.

    Each plane is first split into its s_h·s_w stride phases, zero-padded, so that
    every tap (i, j) reads one phase at a fixed offset with unit stride: over a block of
    output rows laid out at the phase's row width, a tap is one contiguous multiply-add
    (the few columns past the output width are computed and dropped)."""
    channels = x.shape[1]
    outputs, kh, kw = w.shape
    mult = outputs // channels
    out_h, out_w = y.shape[2], y.shape[3]
    sh, sw = stride
    dh, dw = dilation
    phases, grid, wq = _phase_buffer(x, stride, pad)
    rows = max(1, min(out_h, BLOCK // wq))
    acc = np.empty(rows * wq, y.dtype)
    for q in range(start, stop):
        n, c = q // channels, q % channels
        plane = x[n, c]
        _copy_phases(plane, grid, stride, pad, True)
        for m in range(mult):
            o = c * mult + m
            level = bias[o] if bias.shape[0] else 0
            for r0 in range(0, out_h, rows):
                r1 = min(out_h, r0 + rows)
                count = (r1 - r0) * wq
                block = acc[:count]
                block[:] = level
                for i in range(kh):
                    a, ri = (i * dh) % sh, (i * dh) // sh
                    for j in range(kw):
                        b, cj = (j * dw) % sw, (j * dw) // sw
                        src = phases[a, b, (r0 + ri) * wq + cj :]
                        weight = w[o, i, j]
                        for k in range(count):
                            block[k] += weight * src[k]
                for r in range(r1 - r0):
                    dst = y[n, o, r0 + r]
                    src = block[r * wq :]
                    for t in range(out_w):
                        dst[t] = src[t]


@_jit.kernel
def _backward(x, dy, w, dx, dw_part, start, stop, stride, pad, dilation):  # pragma: no cover
    """The bottom gradient dx (overwritten, when it has planes) and the weight gradient
    (added to ``dw_part``, when it has rows) of ``_forward`` for planes [start, stop), in
    ``_forward``'s phase layout: dx accumulates per phase and is gathered back once per
    plane; the weight gradient sums top gradient × input per tap elementwise into a
    block-long buffer (a scalar running sum would not vectorise under IEEE ordering),
    reduced once per plane. The top gradient's columns past the output width are zero,
    so the dropped columns add nothing."""
    channels = x.shape[1]
    outputs, kh, kw = w.shape
    mult = outputs // channels
    out_h, out_w = dy.shape[2], dy.shape[3]
    sh, sw = stride
    dh, dwl = dilation
    want_dx = dx.shape[0] > 0
    want_dw = dw_part.shape[0] > 0
    phases, grid, wq = _phase_buffer(x, stride, pad)
    dphases, dgrid, _ = _phase_buffer(x, stride, pad)
    rows = max(1, min(out_h, BLOCK // wq))
    grad = np.zeros(rows * wq, dy.dtype)
    sums = np.zeros((kh, kw, LANES), dy.dtype)
    for q in range(start, stop):
        n, c = q // channels, q % channels
        plane = x[n, c]
        if want_dw:
            _copy_phases(plane, grid, stride, pad, True)
        if want_dx:
            dphases[:] = 0
        for m in range(mult):
            o = c * mult + m
            if want_dw:
                sums[:] = 0
            for r0 in range(0, out_h, rows):
                r1 = min(out_h, r0 + rows)
                count = (r1 - r0) * wq
                for r in range(r1 - r0):
                    dst = grad[r * wq :]
                    src = dy[n, o, r0 + r]
                    for t in range(out_w):
                        dst[t] = src[t]
                for i in range(kh):
                    a, ri = (i * dh) % sh, (i * dh) // sh
                    for j in range(kw):
                        b, cj = (j * dwl) % sw, (j * dwl) // sw
                        base = (r0 + ri) * wq + cj
                        if want_dx:
                            dst = dphases[a, b, base:]
                            weight = w[o, i, j]
                            for k in range(count):
                                dst[k] += weight * grad[k]
                        if want_dw:
                            tap = sums[i, j]
                            for k0 in range(0, count, LANES):
                                src = phases[a, b, base + k0 :]
                                part = grad[k0:]
                                for k in range(min(LANES, count - k0)):
                                    tap[k] += part[k] * src[k]
            if want_dw:
                for i in range(kh):
                    for j in range(kw):
                        tap = sums[i, j]
                        # Halved elementwise first: a scalar sum runs at one add per latency.
                        for k in range(LANES // 2):
                            tap[k] += tap[LANES // 2 + k]
                        for k in range(LANES // 4):
                            tap[k] += tap[LANES // 4 + k]
                        dw_part[o, i, j] += tap[: LANES // 4].sum()
        if want_dx:
            _copy_phases(dx[n, c], dgrid, stride, pad, False)


def _plane_chunks(x: np.ndarray) -> list[tuple[int, int]]:
    """The (item, channel) plane ranges of ``x`` for the workers: one per worker from
    ``SPLIT_MIN`` elements on, else one."""
    return even_chunks(x.shape[0] * x.shape[1], WORKERS if x.size >= SPLIT_MIN else 1)


def is_depthwise(channels: int, group: int, spatial_axes: int) -> bool:
    """Whether a Convolution is one these kernels run: 2-D, one input channel per group,
    more than one channel (a single-channel convolution is an ordinary GEMM-shaped one)."""
    return spatial_axes == 2 and group == channels > 1


class DepthwiseConv:
    """Forward and backward of one depthwise Convolution's geometry on numpy arrays:
    ``x`` (N, C, H, W), weights (C·M, 1, kh, kw), top (N, C·M, Ho, Wo), all contiguous.

    MobileNet v1's thirteen 3×3 depthwise layers, float32, ms per call summed over the
    layers, median [lowest-highest] of rounds alternating the kernels, im2col + GEMM (the
    kernels switched off) and PyTorch 2.13's grouped conv2d, on one shared 2-core machine
    at load 2-2.4 (``tools/bench_depthwise.py``): batch-1 forward 5.5 [5.4-5.8] against
    14.3 [13.7-15.1] and PyTorch 5.1 [3.3-9.4] (conv2_1/dw 0.50, 2.08, 0.40; conv6/dw 0.30,
    0.87, 0.13: small planes still pay a fixed cost per plane); batch-8 forward + backward
    185 [174-191] against 639 [594-682] and PyTorch 1309 [1193-1389].
    """

    def __init__(
        self,
        stride: tuple[int, int],
        pad: tuple[int, int],
        dilation: tuple[int, int],
    ) -> None:
        self.stride, self.pad, self.dilation = stride, pad, dilation

    def forward(self, x: np.ndarray, w: np.ndarray, bias: np.ndarray | None, y: np.ndarray) -> None:
        """y (overwritten) = the convolution of x by weights w, plus bias when given."""
        flat_w = w.reshape(w.shape[0], w.shape[2], w.shape[3])
        level = bias if bias is not None else np.empty(0, x.dtype)
        geometry = (self.stride, self.pad, self.dilation)

        def work(start: int, stop: int, _worker: int) -> None:
            _forward(x, flat_w, level, y, start, stop, *geometry)

        run_chunks(np, work, _plane_chunks(x))

    def backward(
        self,
        x: np.ndarray,
        dy: np.ndarray,
        w: np.ndarray,
        dx: np.ndarray | None,
        dw: np.ndarray | None,
    ) -> None:
        """dx (overwritten) and dw (added to), whichever is given, from the top gradient."""
        flat_w = w.reshape(w.shape[0], w.shape[2], w.shape[3])
        chunks = _plane_chunks(x)
        none = np.empty((0, 1, 1, 1), x.dtype)
        parts = (
            np.zeros((len(chunks),) + flat_w.shape, x.dtype)
            if dw is not None
            else np.empty((len(chunks), 0, 1, 1), x.dtype)
        )
        geometry = (self.stride, self.pad, self.dilation)

        def work(start: int, stop: int, worker: int) -> None:
            target = dx if dx is not None else none
            _backward(x, dy, flat_w, target, parts[worker], start, stop, *geometry)

        run_chunks(np, work, chunks)
        if dw is not None:
            # In chunk order, so that the sum is the same on every run.
            flat_dw = dw.reshape(flat_w.shape)
            for part in parts:
                flat_dw += part
