"""Pooling layers: Pooling (MAX, AVE, STOCHASTIC) and SPP.

Each computes what Caffe's layer of the same type computes (src/caffe/layers/
{pooling,spp}_layer.cpp), with the same parameters, defaults and output sizes (ceil rounding
by default). The work loops at most over kernel offsets, never over items, channels or pixels.
On numpy with the jit extra, MAX and AVE run ``pool_kernels``' numba kernels instead of the
phase-layout passes here (AVE forward only on planes of ``AVE_PLANE_MIN`` or more).

Deliberate difference from Caffe: a Pooling output with no window is a ShapeError instead of
a zero-sized blob.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np

from netforge.blob import Blob
from netforge.builtin_layers import _jit, pool_kernels
from netforge.builtin_layers._threads import WORKERS, run_chunks
from netforge.builtin_layers.conv_ops import (
    Geometry,
    Workspace,
    batch_chunks,
    interior,
    offset_slices,
)
from netforge.layer import Layer, register
from netforge.proto import pb

#: Most input elements one pooling chunk covers on numpy (1 MiB of float32).
POOL_CHUNK = 1 << 18

#: Caffe's FLT_MIN, which keeps stochastic pooling's test-time division defined.
FLT_MIN = float(np.finfo(np.float32).tiny)


# -- pooling -------------------------------------------------------------------------------
def _pool_extent(layer: Layer, size: int, kernel: int, stride: int, pad: int, ceil: bool) -> int:
    """Caffe's pooled size: ceil (CEIL) or floor (FLOOR) of (H + 2p − k)/s, plus one."""
    span = size + 2 * pad - kernel
    out = (-(-span // stride) if ceil else span // stride) + 1
    if out <= 0:
        raise layer.shape_error(
            f"input size {size} with pad {pad} leaves no room for a {kernel}-wide window"
        )
    return out


@register("Pooling")
class PoolingLayer(Layer):
    """Caffe's Pooling over the last two axes of an (N, C, H, W) bottom.

    MAX keeps the first maximum in window scan order, and its optional second top holds
    the argmax as Caffe stores it, the flat index h·W + w into the input plane. AVE
    divides by the window clipped to the padded extent (padding counts, but not what lies
    beyond the far padded border). STOCHASTIC (no padding) samples, in TRAIN, one element
    per window with probability activation / window sum from ``self.rng`` (Caffe's GPU
    kernel; its CPU path has none), and in TEST returns Σx² / (FLT_MIN + Σx); its TEST
    backward is that formula's exact gradient, where Caffe has none. Output sizes follow
    ``round_mode`` (CEIL by default); with padding, a last window starting in the padding
    is dropped.
    """

    bottoms = (1, 1)
    tops = (1, 2)
    reshape_follows_shapes = True

    def setup(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        p = self.layer_param.pooling_param
        self.method = p.pool
        if len(top) > 1 and self.method != pb.PoolingParameter.MAX:
            raise self.config_error("only MAX pooling has a second top (the argmax mask)")
        has = p.HasField
        if p.global_pooling:
            if has("kernel_size") or has("kernel_h") or has("kernel_w"):
                raise self.config_error("global_pooling takes the whole plane: give no kernel")
        elif has("kernel_size") == (has("kernel_h") and has("kernel_w")):
            raise self.config_error("give kernel_size, or both kernel_h and kernel_w")
        if not (has("pad_h") == has("pad_w") and not (has("pad") and has("pad_h"))):
            raise self.config_error("give pad, or both pad_h and pad_w")
        if not (has("stride_h") == has("stride_w") and not (has("stride") and has("stride_h"))):
            raise self.config_error("give stride, or both stride_h and stride_w")
        self.kernel = (
            (p.kernel_size, p.kernel_size) if has("kernel_size") else (p.kernel_h, p.kernel_w)
        )
        self.stride = (p.stride_h, p.stride_w) if has("stride_h") else (p.stride, p.stride)
        self.stride_param = self.stride
        self.pad = (p.pad_h, p.pad_w) if has("pad_h") else (p.pad, p.pad)
        self._divisors: dict[tuple[int, ...], Any] = {}
        if p.HasField("ceil_mode") and p.HasField("round_mode"):
            raise self.config_error("set round_mode or the fork's ceil_mode, not both")
        if p.HasField("ceil_mode"):
            self.ceil = p.ceil_mode
        else:
            self.ceil = p.round_mode == pb.PoolingParameter.CEIL
        if p.global_pooling and (any(self.pad) or self.stride != (1, 1)):
            raise self.config_error("global_pooling needs pad 0 and stride 1")
        if not p.global_pooling and min(self.kernel) <= 0:
            raise self.config_error(f"kernel sizes must be positive, got {self.kernel}")
        if min(self.stride) <= 0:
            raise self.config_error(f"strides must be positive, got {self.stride}")
        if any(self.pad):
            if self.method == pb.PoolingParameter.STOCHASTIC:
                raise self.config_error("padding works only with MAX and AVE pooling")
            if self.pad[0] >= self.kernel[0] or self.pad[1] >= self.kernel[1]:
                raise self.config_error(f"pad {self.pad} must be smaller than kernel {self.kernel}")
        # One workspace per pool worker; the first also holds the whole-batch buffers.
        self.workspaces = [Workspace() for _ in range(WORKERS)]
        self.ws = self.workspaces[0]
        # The flat input index of each MAX window's maximum, when the compiled kernels ran
        # forward (``pool_kernels``); None when the numpy path did.
        self.max_index: Any = None

    def reshape(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        shape = bottom[0].shape
        if len(shape) != 4:
            raise self.shape_error(f"bottom must be (num, channels, height, width), got {shape}")
        if self.layer_param.pooling_param.global_pooling:
            self.kernel = shape[2:]
        out = [
            _pool_extent(self, h, k, s, p, self.ceil)
            for h, k, s, p in zip(shape[2:], self.kernel, self.stride_param, self.pad)
        ]
        if any(self.pad):
            # The last window must start inside the image or its near padding.
            for d in range(2):
                if (out[d] - 1) * self.stride_param[d] >= shape[2 + d] + self.pad[d]:
                    out[d] -= 1
        self.out = tuple(out)
        # A stride past the padded plane leaves at most one more window, which reads nothing
        # at any such stride: H + 2p + 1 gives the same outputs and keeps the buffers and
        # phase loops sized by the input, not by a stride that may be near 2^31.
        self.stride = tuple(
            min(s, h + 2 * p + 1) for s, h, p in zip(self.stride_param, shape[2:], self.pad)
        )
        self.geom = Geometry(tuple(self.kernel), self.stride, self.pad, (1, 1))
        for t in top:
            t.reshape(shape[:2] + self.out)
        per_item = math.prod(shape[1:])
        if self.xp is np:
            limit = min(POOL_CHUNK, per_item * -(-shape[0] // WORKERS))
            self.chunks = batch_chunks(shape[0], per_item, limit, WORKERS)
            self.layout = _PhaseLayout.of(shape[2:], self.kernel, self.stride, self.pad, self.out)
        else:
            self.chunks = [(0, shape[0])]

    def _padded_shape(self, shape: Sequence[int]) -> tuple[int, ...]:
        """A buffer padded by ``pad`` before and, after, as far as the last window reaches
        (CEIL windows may overhang the padded extent)."""
        return tuple(shape[:2]) + tuple(
            max(p + h, (o - 1) * s + k)
            for h, k, s, p, o in zip(shape[2:], self.kernel, self.stride, self.pad, self.out)
        )

    def _padded(self, x: Any, fill: float, ws: Workspace) -> Any:
        shape = self._padded_shape(x.shape)
        if shape == x.shape:
            return x  # no padding and no window past the far edge: view the input itself
        buf = ws.get("in", shape, x.dtype, self.xp, fill=fill)
        buf[interior(self.pad, x.shape[2:])] = x
        return buf

    def _zeroed_grad(self, diff: Any, ws: Workspace) -> Any:
        """A zeroed gradient buffer shaped like ``_padded``'s (``diff`` itself if no pad)."""
        shape = self._padded_shape(diff.shape)
        buf = diff if shape == diff.shape else ws.scratch.get("grad", shape, diff.dtype, self.xp)
        buf.fill(0)
        return buf

    def _run(self, work) -> None:
        """``work(start, stop, workspace)`` over the batch chunks, on the worker pool."""
        run_chunks(
            self.xp, lambda start, stop, w: work(start, stop, self.workspaces[w]), self.chunks
        )

    def _windows(self, padded_x: Any):
        """(offset number, input view) for each kernel offset, in Caffe's scan order."""
        for number, (_, index) in enumerate(offset_slices(self.geom, self.out)):
            yield number, padded_x[index]

    # -- forward ------------------------------------------------------------------------
    def forward(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        x = bottom[0].data
        if self.method == pb.PoolingParameter.MAX:
            self._forward_max(x, top)
        elif self.method == pb.PoolingParameter.AVE:
            self._forward_ave(x, top[0].data)
        elif self.phase == pb.TRAIN:
            self._forward_sample(x, top[0].data)
        else:
            self._forward_weighted(x, top[0].data)

    def _kernel_geometry(self) -> pool_kernels.Geometry:
        return tuple(self.kernel), self.stride, self.pad

    def _forward_max(self, x: Any, top: Sequence[Blob]) -> None:
        self.max_index = None
        if self.xp is np:
            tops = [t.data for t in top]
            if _jit.usable(x, *tops):
                self.max_index = self.ws.get(
                    "max_index", tops[0].shape, pool_kernels.index_type(x.dtype), np
                )
                mask = tops[1] if len(tops) > 1 else None
                pool_kernels.max_forward(x, tops[0], self.max_index, mask, self._kernel_geometry())
            else:
                self._forward_max_phases(x, top)
            return
        xp = self.xp
        # Caffe starts each window at -FLT_MAX; padding with the dtype's lowest value keeps
        # padding from ever winning, and gives Caffe's value for a window with no input.
        lowest = float(np.finfo(x.dtype).min)
        kernel_count = math.prod(self.kernel)
        dtype = np.uint8 if kernel_count <= 256 else np.uint32
        best_all = top[0].data
        self.argmax = self.ws.get("argmax", best_all.shape, dtype, xp)

        def work(start: int, stop: int, ws: Workspace) -> None:
            best, arg = best_all[start:stop], self.argmax[start:stop]
            greater = ws.scratch.get("greater", best.shape, np.bool_, xp)
            step = ws.scratch.get("step", best.shape, dtype, xp)
            padded = self._padded(x[start:stop], lowest, ws)
            views = [view for _, view in self._windows(padded)]
            _first_maximum(xp, views, best, arg, greater, step)

        self._run(work)
        if len(top) > 1:
            top[1].data[...] = self._flat_index(self.argmax, x.shape[3])

    def _forward_max_phases(self, x: Any, top: Sequence[Blob]) -> None:
        """MAX forward on numpy, separably: the first maximum of each window row (a pass over
        the kernel columns), then the first row holding the window's maximum (a pass over the
        kernel rows). Both keep Caffe's first-maximum-in-scan-order choice, and every ufunc
        reads unit-stride operands in one long run (see ``_PhaseLayout``), which is several
        times faster than the per-offset strided views. The per-row column choice and the
        chosen row are kept per chunk for backward."""
        lay, (kh, kw), (sh, _) = self.layout, self.kernel, self.stride
        lowest = float(np.finfo(x.dtype).min)
        dtype = np.uint8 if max(kh, kw) <= 256 else np.uint32
        # Blob memory is allocated on first access: touch it here, not in the workers.
        top_all = top[0].data
        mask_all = top[1].data if len(top) > 1 else None
        planes = x.shape[1]

        def work(start: int, stop: int, ws: Workspace) -> None:
            count = (stop - start) * planes
            phases = lay.load(x[start:stop], ws, lowest)
            size = lay.rows * count * lay.width
            row_max = ws.scratch.get("row_max", (size,), x.dtype, np)
            row_arg = ws.get(f"row_arg{start}", (size,), dtype, np)
            greater = ws.scratch.get("greater", (size,), np.bool_, np)
            step = ws.scratch.get("step", (size,), dtype, np)
            columns = [lay.column_view(phases, k, size) for k in range(kw)]
            _first_maximum(np, columns, row_max, row_arg, greater, step)
            row_max = row_max.reshape(lay.rows, count, lay.width)
            shape = (self.out[0], count, lay.width)
            best = ws.scratch.get("best", shape, x.dtype, np)
            arg = ws.get(f"arg{start}", shape, dtype, np)
            greater, step = greater[: best.size].reshape(shape), step[: best.size].reshape(shape)
            span = sh * (self.out[0] - 1) + 1
            rows = [row_max[k : k + span : sh] for k in range(kh)]
            _first_maximum(np, rows, best, arg, greater, step)
            out = top_all[start:stop].reshape(count, *self.out)
            out[...] = best[..., : self.out[1]].transpose(1, 0, 2)
            if mask_all is not None:
                rows = row_arg.reshape(lay.rows, count, lay.width)
                offsets = arg.astype(np.int64) * kw
                for k in range(kh):
                    offsets += (arg == k) * rows[k : k + span : sh]
                mask = mask_all[start:stop].reshape(count, *self.out)
                offsets = offsets[..., : self.out[1]].transpose(1, 0, 2)
                mask[...] = self._flat_index(offsets, x.shape[3])

        self._run(work)

    def _flat_index(self, offsets: Any, width: int) -> Any:
        """Offset numbers within windows -> Caffe's mask, h·W + w into the input plane."""
        xp = self.xp
        kh, kw = self.kernel
        rows = xp.arange(self.out[0]).reshape(-1, 1) * self.stride[0] - self.pad[0]
        cols = xp.arange(self.out[1]) * self.stride[1] - self.pad[1]
        offsets = offsets.astype(np.int64)
        return (rows + offsets // kw) * width + cols + offsets % kw

    def _divisor(self, shape: Sequence[int]) -> Any:
        """Caffe's AVE window sizes: each window clipped to the padded extent H + 2p.
        Kept per input size, so a GPU run builds and uploads it once."""
        key = tuple(shape[2:])
        if key not in self._divisors:
            self._divisors[key] = self._window_sizes(shape)
        return self._divisors[key]

    def _window_sizes(self, shape: Sequence[int]) -> Any:
        sizes = []
        for h, k, s, p, o in zip(shape[2:], self.kernel, self.stride, self.pad, self.out):
            start = np.arange(o) * s - p
            sizes.append(np.minimum(start + k, h + p) - start)
        return self.xp.asarray(1.0 / np.outer(sizes[0], sizes[1]), dtype=self.dtype)

    def _forward_ave(self, x: Any, out_all: Any) -> None:
        xp = self.xp
        divisor = self._divisor(x.shape)
        if xp is np and tuple(self.kernel) == x.shape[2:] and not any(self.pad):
            # One window per plane (global pooling): all the plane sums are one BLAS
            # matrix-vector product, where the phase path makes kh + kw passes. SqueezeNet's
            # pool10 (1000 × 13 × 13, batch 1, float32): 0.45 -> 0.02 ms.
            planes = x.reshape(-1, math.prod(x.shape[2:]))
            np.matmul(planes, np.ones(planes.shape[1], x.dtype), out=out_all.reshape(-1))
            np.multiply(out_all, divisor, out=out_all)
            return
        if (
            xp is np
            and x.shape[2] * x.shape[3] >= pool_kernels.AVE_PLANE_MIN
            and _jit.usable(x, out_all, divisor)
        ):
            pool_kernels.ave_forward(x, out_all, divisor, self._kernel_geometry())
            return
        if xp is np:
            self._run(functools.partial(self._forward_ave_phases, x, out_all, divisor))
            return

        def work(start: int, stop: int, ws: Workspace) -> None:
            out = out_all[start:stop]
            for number, view in self._windows(self._padded(x[start:stop], 0.0, ws)):
                if number == 0:
                    out[...] = view
                else:
                    xp.add(out, view, out=out)
            xp.multiply(out, divisor, out=out)

        self._run(work)

    def _forward_ave_phases(self, x, out_all, divisor, start: int, stop: int, ws) -> None:
        """AVE forward on numpy, separably over the phase layout (``_PhaseLayout``): the sum
        of each window row (one add per kernel column), then of each window's rows (one
        add per kernel row), times Caffe's divisor. Each window is summed row by row
        instead of in scan order, which can change the last bit of a float32 mean."""
        lay, (kh, kw), (sh, _) = self.layout, self.kernel, self.stride
        count = (stop - start) * x.shape[1]
        phases = lay.load(x[start:stop], ws, 0.0)
        size = lay.rows * count * lay.width
        row_sum = ws.scratch.get("row_sum", (size,), x.dtype, np)
        np.copyto(row_sum, lay.column_view(phases, 0, size))
        for k in range(1, kw):
            np.add(row_sum, lay.column_view(phases, k, size), out=row_sum)
        row_sum = row_sum.reshape(lay.rows, count, lay.width)
        span = sh * (self.out[0] - 1) + 1
        total = ws.scratch.get("total", (self.out[0], count, lay.width), x.dtype, np)
        np.copyto(total, row_sum[0:span:sh])
        for k in range(1, kh):
            np.add(total, row_sum[k : k + span : sh], out=total)
        out = out_all[start:stop].reshape(count, *self.out)
        np.multiply(total[..., : self.out[1]].transpose(1, 0, 2), divisor, out=out)

    def _forward_sample(self, x: Any, out: Any) -> None:
        """Pick, per window, the first element whose running sum reaches u·Σ, u ~ U[0, 1)."""
        xp = self.xp
        xpad = self._padded(x, 0.0, self.ws)
        total = xp.zeros(out.shape, dtype=x.dtype)
        for _, view in self._windows(xpad):
            xp.add(total, view, out=total)
        threshold = total * self.random_uniform(out.shape)
        count = math.prod(self.kernel)
        self.argmax = xp.full(out.shape, count, dtype=np.int32)
        running = xp.zeros_like(total)
        for number, view in self._windows(xpad):
            xp.add(running, view, out=running)
            chosen = (running >= threshold) & (self.argmax == count)
            xp.copyto(self.argmax, xp.asarray(number, dtype=np.int32), where=chosen)
            xp.copyto(out, view, where=chosen)

    def _forward_weighted(self, x: Any, out: Any) -> None:
        xp = self.xp
        self.total = xp.full(out.shape, FLT_MIN, dtype=x.dtype)
        squares = xp.zeros_like(self.total)
        for _, view in self._windows(self._padded(x, 0.0, self.ws)):
            xp.add(self.total, view, out=self.total)
            squares += view * view
        xp.divide(squares, self.total, out=out)

    # -- backward -----------------------------------------------------------------------
    def backward(
        self, top: Sequence[Blob], propagate_down: Sequence[bool], bottom: Sequence[Blob]
    ) -> None:
        if not propagate_down[0]:
            return
        xp = self.xp
        dy_all = top[0].diff
        diff_all = bottom[0].diff
        if self.method == pb.PoolingParameter.STOCHASTIC and self.phase != pb.TRAIN:
            # d/dx of Σx²/(FLT_MIN + Σx) is (2x − y)/(FLT_MIN + Σx) for every x in the window.
            grad = self._zeroed_grad(diff_all, self.ws)
            ratio = dy_all / self.total
            y = top[0].data
            xpad = self._padded(bottom[0].data, 0.0, self.ws)
            for (_, view), (_, x) in zip(self._windows(grad), self._windows(xpad)):
                view += ratio * (2 * x - y)
            if grad is not diff_all:
                diff_all[...] = grad[interior(self.pad, diff_all.shape[2:])]
            return
        divisor = self._divisor(bottom[0].shape) if self.method == pb.PoolingParameter.AVE else None
        if xp is np:
            # SPP hands its levels strided views of its top gradient.
            dy_all = np.ascontiguousarray(dy_all)
        if self.max_index is not None:
            # The kernels ran forward: only they kept the maxima's positions.
            pool_kernels.max_backward(dy_all, self.max_index, diff_all)
            return
        if divisor is not None and xp is np and _jit.usable(dy_all, diff_all, divisor):
            pool_kernels.ave_backward(dy_all, divisor, diff_all, self._kernel_geometry())
            return
        if self.method == pb.PoolingParameter.MAX and xp is np:
            self._run(functools.partial(self._backward_max_phases, dy_all, diff_all))
            return
        if divisor is not None and xp is np:
            self._run(functools.partial(self._backward_ave_phases, dy_all, diff_all, divisor))
            return

        def work(start: int, stop: int, ws: Workspace) -> None:
            dy, diff = dy_all[start:stop], diff_all[start:stop]
            grad = self._zeroed_grad(diff, ws)
            routed = ws.scratch.get("routed", dy.shape, dy.dtype, xp)
            if divisor is not None:
                xp.multiply(dy, divisor, out=routed)
            for number, view in self._windows(grad):
                if divisor is None:  # MAX and STOCHASTIC TRAIN: to the recorded element
                    xp.multiply(dy, self.argmax[start:stop] == number, out=routed)
                xp.add(view, routed, out=view)
            if grad is not diff:
                diff[...] = grad[interior(self.pad, diff.shape[2:])]

        self._run(work)

    def _backward_max_phases(self, dy_all: Any, diff_all: Any, start: int, stop: int, ws) -> None:
        """MAX backward on numpy, the adjoint of ``_forward_max_phases``: each top gradient
        goes to its window's chosen row (a masked add per kernel row), and each row's sum to
        that row's chosen column (a masked add per kernel column)."""
        lay, (kh, kw), (sh, _) = self.layout, self.kernel, self.stride
        dy = self._laid_out_top_grad(dy_all, start, stop, ws)
        shape, count = dy.shape, dy.shape[1]
        arg = ws.get(f"arg{start}", shape, np.uint8 if max(kh, kw) <= 256 else np.uint32, np)
        size = lay.rows * count * lay.width
        row_arg = ws.get(f"row_arg{start}", (size,), arg.dtype, np)
        rows = ws.scratch.get("row_grad", (lay.rows, count, lay.width), dy.dtype, np)
        rows.fill(0)
        chosen = ws.scratch.get("chosen", (size,), np.bool_, np)
        routed = ws.scratch.get("routed", (size,), dy.dtype, np)
        span = sh * (self.out[0] - 1) + 1
        for k in range(kh):
            mask, part = chosen[: dy.size].reshape(shape), routed[: dy.size].reshape(shape)
            np.equal(arg, k, out=mask)
            np.multiply(dy, mask, out=part)
            target = rows[k : k + span : sh]
            np.add(target, part, out=target)
        phases = lay.zeroed(count, dy.dtype, ws)
        rows = rows.reshape(-1)
        for k in range(kw):
            np.equal(row_arg, k, out=chosen)
            np.multiply(rows, chosen, out=routed)
            target = lay.column_view(phases, k, size)
            np.add(target, routed, out=target)
        lay.store(phases, diff_all[start:stop])

    def _laid_out_top_grad(self, dy_all, start: int, stop: int, ws, divisor=None) -> Any:
        """The top gradient of chunk ``start:stop`` as (out rows, planes, layout width), times
        ``divisor`` if given; windows past the output width are padding of the layout, and
        their gradient is zero."""
        count = (stop - start) * dy_all.shape[1]
        dy = ws.scratch.get("dy", (self.out[0], count, self.layout.width), dy_all.dtype, np)
        dy[..., self.out[1] :] = 0
        top = dy_all[start:stop].reshape(count, *self.out).transpose(1, 0, 2)
        if divisor is None:
            dy[..., : self.out[1]] = top
        else:
            np.multiply(top, divisor[:, None], out=dy[..., : self.out[1]])
        return dy

    def _backward_ave_phases(self, dy_all, diff_all, divisor, start: int, stop: int, ws) -> None:
        """AVE backward on numpy, the adjoint of ``_forward_ave_phases``: each scaled top
        gradient is added to its window's rows (one add per kernel row), each row's sum to
        its columns (one add per kernel column)."""
        lay, (kh, kw), (sh, _) = self.layout, self.kernel, self.stride
        dy = self._laid_out_top_grad(dy_all, start, stop, ws, divisor)
        rows = ws.scratch.get("row_grad", (lay.rows, dy.shape[1], lay.width), dy.dtype, np)
        rows.fill(0)
        span = sh * (self.out[0] - 1) + 1
        for k in range(kh):
            target = rows[k : k + span : sh]
            np.add(target, dy, out=target)
        phases = lay.zeroed(dy.shape[1], dy.dtype, ws)
        size = rows.size
        rows = rows.reshape(-1)
        for k in range(kw):
            target = lay.column_view(phases, k, size)
            np.add(target, rows, out=target)
        lay.store(phases, diff_all[start:stop])


def _first_maximum(
    xp: Any, views: Sequence[Any], best: Any, arg: Any, greater: Any, step: Any
) -> None:
    """The element-wise maximum of ``views`` into ``best``, and into ``arg`` the index of the
    first view that holds it: a later view wins only if strictly greater, as in Caffe.

    The first two views are compared with each other directly, so nothing is copied in to
    start from. Since the offsets only grow, offset k wins exactly where k·(view > best)
    exceeds the index so far: ``arg = maximum(arg, k·greater)``, two cheap same-type passes,
    where a masked copy with random masks runs several times slower (branch mispredictions).
    ``greater`` (bool) and ``step`` (``arg``'s dtype) are scratch of ``best``'s size.
    """
    if len(views) == 1:
        xp.copyto(best, views[0])
        arg.fill(0)
        return
    first, second = views[0], views[1]
    if arg.itemsize == 1:
        xp.greater(second, first, out=arg.view(np.bool_))
    else:
        xp.greater(second, first, out=greater)
        xp.copyto(arg, greater)
    xp.maximum(first, second, out=best)
    flags = greater.view(np.uint8)
    for k, view in enumerate(views[2:], start=2):
        xp.greater(view, best, out=greater)
        xp.multiply(flags, arg.dtype.type(k), out=step)
        xp.maximum(arg, step, out=arg)
        xp.maximum(best, view, out=best)


class _PhaseLayout(NamedTuple):
    """A pooling batch chunk rearranged so that every kernel column is one unit-stride run.

    The padded input, ``rows`` × (``stride_w`` · ``width``) per plane, is stored as
    ``stride_w`` phases, phase r holding padded columns r, r + s, r + 2s, ... of every row,
    each phase laid out (rows, planes, width). Kernel column k of all windows is then the
    contiguous run starting at element k // s of phase k % s, with windows past the output
    width (and a ``tail``) as padding, and kernel row k is every s_h-th block of a
    (rows, planes, width) array, planes and width in one run. numpy's ufuncs run contiguous
    operands several times faster than strided or short-row ones.
    """

    rows: int  # padded input rows the windows read
    width: int  # windows per row, output width or more
    tail: int  # elements past the last phase that the last column's run reads
    pad: tuple[int, int]
    stride: int
    #: per phase: (first input column, stop, first phase column)
    phases: tuple[tuple[int, int, int], ...]
    in_rows: int  # input rows copied (those some window reads)

    @classmethod
    def of(cls, spatial, kernel, stride, pad, out) -> _PhaseLayout:
        (h, w), (kh, kw), (sh, sw), (ph, pw) = spatial, kernel, stride, pad
        rows = (out[0] - 1) * sh + kh
        width = -(-((out[1] - 1) * sw + kw) // sw)
        phases = []
        for r in range(sw):
            first = pw + (r - pw) % sw  # first padded column of this phase inside the input
            stop = min(pw + w, sw * width)
            phases.append((first - pw, max(stop - pw, first - pw), first // sw))
        return cls(rows, width, (kw - 1) // sw, (ph, pw), sw, tuple(phases), min(h, rows - ph))

    def _phase(self, buf: Any, r: int, count: int) -> Any:
        size = self.rows * count * self.width
        return buf[r * size : (r + 1) * size].reshape(self.rows, count, self.width)

    def load(self, x: Any, ws: Workspace, fill: float) -> Any:
        """The phases of chunk ``x`` (n, C, H, W), padding set to ``fill``; the buffer keeps
        its padding between calls (one per plane count), so only the input is copied."""
        count = x.shape[0] * x.shape[1]
        buf = ws.get(f"phases{count}", (self._length(count),), x.dtype, np, fill=fill)
        planes = x.reshape(count, *x.shape[2:])[:, : self.in_rows]
        for r, (first, stop, column) in enumerate(self.phases):
            part = planes[:, :, first : stop : self.stride]
            rows = slice(self.pad[0], self.pad[0] + self.in_rows)
            cols = slice(column, column + part.shape[2])
            self._phase(buf, r, count)[rows, :, cols] = part.transpose(1, 0, 2)
        return buf

    def zeroed(self, count: int, dtype: Any, ws: Workspace) -> Any:
        buf = ws.scratch.get("phase_grad", (self._length(count),), dtype, np)
        buf.fill(0)
        return buf

    def store(self, buf: Any, x: Any) -> None:
        """Write the input part of the phases into ``x`` (n, C, H, W); inputs no window reads
        get zero."""
        count = x.shape[0] * x.shape[1]
        planes = x.reshape(count, *x.shape[2:])
        if not self.covers(planes.shape[1:]):
            planes.fill(0)
        for r, (first, stop, column) in enumerate(self.phases):
            target = planes[:, : self.in_rows, first : stop : self.stride]
            rows = slice(self.pad[0], self.pad[0] + self.in_rows)
            cols = slice(column, column + target.shape[2])
            target[...] = self._phase(buf, r, count)[rows, :, cols].transpose(1, 0, 2)

    def covers(self, spatial: Sequence[int]) -> bool:
        """Whether some window reads every input row and column."""
        columns = sum(len(range(first, stop, self.stride)) for first, stop, _ in self.phases)
        return self.in_rows == spatial[0] and columns == spatial[1]

    def column_view(self, buf: Any, k: int, size: int) -> Any:
        """Kernel column ``k`` of every window as one contiguous run of ``size`` elements."""
        start = (k % self.stride) * size + k // self.stride
        return buf[start : start + size]

    def _length(self, count: int) -> int:
        return self.stride * self.rows * count * self.width + self.tail


# -- spatial pyramid pooling ---------------------------------------------------------------
@register("SPP")
class SPPLayer(Layer):
    """Caffe's SPP: level i pools the (N, C, H, W) bottom into a 2^i × 2^i grid with
    kernel ceil(H / 2^i), stride = kernel and pad (kernel·2^i − H + 1) / 2, flattens each
    level to (N, C·bins) and concatenates them along axis 1. With pyramid_height 1 the top
    is the single pooling's (N, C, 1, 1) output, unflattened, as in Caffe.

    The inner Pooling layers run in this layer's phase (Caffe builds them with a default
    LayerParameter, i.e. always TRAIN, which matters only to STOCHASTIC pooling).
    """

    bottoms = (1, 1)
    tops = (1, 1)

    def setup(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        param = self.layer_param.spp_param
        self.height = param.pyramid_height
        if self.height < 1:
            raise self.config_error("spp_param.pyramid_height must be at least 1")
        self.pool = param.pool
        self.plane: tuple[int, ...] = ()

    def _level(self, level: int, height: int, width: int) -> PoolingLayer:
        bins = 2**level
        if bins > min(height, width):
            # Caffe's inner pooling then fails its pad < kernel check; a pyramid_height near
            # 2^31 would first overflow the kernel and pad fields.
            raise self.shape_error(
                f"pyramid level {level} has {bins} bins per axis, more than the bottom's "
                f"{height}x{width} plane allows; lower spp_param.pyramid_height"
            )
        pooling = pb.PoolingParameter(pool=self.pool)
        for name, size in (("h", height), ("w", width)):
            kernel = -(-size // bins)
            setattr(pooling, f"kernel_{name}", kernel)
            setattr(pooling, f"stride_{name}", kernel)
            setattr(pooling, f"pad_{name}", (kernel * bins - size + 1) // 2)
        param = pb.LayerParameter(
            name=f"{self.name}/pool{level}", type="Pooling", pooling_param=pooling
        )
        return PoolingLayer(
            param, phase=self.phase, backend=self.backend, dtype=self.dtype, rng=self.rng
        )

    def reshape(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        shape = bottom[0].shape
        if len(shape) != 4:
            raise self.shape_error(f"bottom must be (num, channels, height, width), got {shape}")
        if shape[2:] != self.plane:
            # Kernel, stride and pad depend on the plane size: rebuild the levels.
            self.plane = shape[2:]
            self.levels = [self._level(i, *self.plane) for i in range(self.height)]
            self.outputs = [Blob((), self.dtype, self.backend) for _ in self.levels]
            for level, out in zip(self.levels, self.outputs):
                level.setup(bottom, [out])
        for level, out in zip(self.levels, self.outputs):
            level.reshape(bottom, [out])
        if self.height == 1:
            top[0].reshape(self.outputs[0].shape)
        else:
            top[0].reshape(shape[0], sum(out.count // shape[0] for out in self.outputs))
        self.scratch = Blob(shape, self.dtype, self.backend)

    def _slices(self) -> list[tuple[Blob, slice]]:
        start, spans = 0, []
        for out in self.outputs:
            width = math.prod(out.shape[1:])
            spans.append((out, slice(start, start + width)))
            start += width
        return spans

    def forward(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        num = bottom[0].shape[0]
        for level, (out, span) in zip(self.levels, self._slices()):
            level.rng = self.rng
            level.forward(bottom, [out])
            top[0].data.reshape(num, -1)[:, span] = out.data.reshape(num, -1)

    def backward(
        self, top: Sequence[Blob], propagate_down: Sequence[bool], bottom: Sequence[Blob]
    ) -> None:
        if not propagate_down[0]:
            return
        num = bottom[0].shape[0]
        dy = top[0].diff.reshape(num, -1)
        # Caffe's Split sums the levels' gradients: the first writes the bottom diff, the
        # others go through a scratch blob that sees the same data.
        self.scratch.share_data(bottom[0])
        for i, (level, (out, span)) in enumerate(zip(self.levels, self._slices())):
            out.diff = dy[:, span].reshape(out.shape)
            target = bottom[0] if i == 0 else self.scratch
            level.backward([out], [True], [target])
            if i:
                bottom[0].diff += self.scratch.diff
