"""Vision layers: Convolution, Deconvolution, Im2col, Pooling, SPP, LRN and Crop.

Each computes what Caffe's layer of the same type computes (src/caffe/layers/
{base_conv,conv,deconv,im2col,pooling,spp,lrn,crop}_layer.cpp), with the same parameters,
defaults, output sizes and parameter blob shapes. The work is whole-array: convolution is
im2col + one batched GEMM over the groups per batch chunk (``conv_ops``), or, for deep
stride-1 2-D convolutions on numpy, one such GEMM per kernel row over shared window rows
(``conv_rows``); pooling and LRN loop at most over kernel or window offsets, never over
items, channels or pixels.

Deliberate differences from Caffe, all on inputs Caffe mishandles: an input smaller than
the (dilated) kernel is a ShapeError instead of C++ integer-division output sizes, and a
Pooling output with no window is a ShapeError instead of a zero-sized blob.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Any, ClassVar, NamedTuple

import numpy as np

from netforge._blas import matmul_into
from netforge.blob import Blob
from netforge.filler import filler_or
from netforge.layer import Layer, register
from netforge.layers._threads import WORKERS, run_chunks
from netforge.layers.conv_ops import (
    Geometry,
    Workspace,
    batch_chunks,
    col2im,
    im2col,
    interior,
    offset_slices,
    padded,
    windows,
)
from netforge.layers.conv_rows import RowShiftConv
from netforge.layers.conv_winograd import TILE, WinogradRowConv
from netforge.proto import pb

#: Most elements one column buffer holds (128 MiB of float32); larger batches run in chunks.
COLUMN_LIMIT = 1 << 25

#: Most elements a column buffer holds on numpy: 4 MiB of float32, so that each worker's
#: columns stay in cache between im2col and the GEMM that reads them.
CACHE_COLUMNS = 1 << 20

#: Most column elements a Convolution keeps from forward for its weight gradient (all chunks
#: together, 128 MiB of float32); beyond it, backward recomputes each chunk's columns.
KEPT_COLUMNS = 1 << 25

#: Least GEMM depth (kernel width × channels per group) at which a stride-1 2-D Convolution
#: on numpy uses kernel-row shifts (``conv_rows``) instead of im2col. Below it the shifted
#: GEMMs are too thin: CIFAR-10 quick's conv1 (3 channels, depth 15) is faster with im2col,
#: its conv2 (depth 160) and LeNet's conv2 (depth 100) are faster with shifts.
ROW_SHIFT_MIN_DEPTH = 64

#: Least output rows at which a row-shift Convolution uses Winograd's F(4, kh) along the rows
#: (``conv_winograd``): one tile's worth; with fewer, the one tile computes mostly rows that
#: are cropped off.
WINOGRAD_MIN_ROWS = TILE

#: Most bottom pixels per top pixel at which the row-shift Convolution computes its bottom
#: gradient as a full correlation rather than as the adjoint of forward (see
#: ``_ConvolutionBase._full_correlation``).
FULL_CORRELATION_WASTE = 1.5

#: Most input elements one pooling chunk covers on numpy (1 MiB of float32).
POOL_CHUNK = 1 << 18

#: Caffe's FLT_MIN, which keeps stochastic pooling's test-time division defined.
FLT_MIN = float(np.finfo(np.float32).tiny)


# -- convolution geometry ------------------------------------------------------------------
def _per_axis(
    layer: Layer,
    param: pb.ConvolutionParameter,
    name: str,
    axes: int,
    default: int | None,
    hw: tuple[str, str] | None = None,
) -> tuple[int, ...]:
    """A repeated ConvolutionParameter field (one value for all axes or one per axis), or
    its 2-D ``_h``/``_w`` alternative, as Caffe's BaseConvolutionLayer reads them."""
    values = list(getattr(param, name))
    if hw is not None and (param.HasField(hw[0]) or param.HasField(hw[1])):
        if axes != 2:
            raise layer.config_error(
                f"{hw[0]}/{hw[1]} apply to 2-D convolution only, but the input has {axes} "
                f"spatial axes: use the repeated '{name}' field"
            )
        if values:
            raise layer.config_error(f"give either '{name}' or {hw[0]}/{hw[1]}, not both")
        return (getattr(param, hw[0]), getattr(param, hw[1]))
    if not values and default is not None:
        return (default,) * axes
    if len(values) == 1:
        return (values[0],) * axes
    if len(values) == axes:
        return tuple(values)
    raise layer.config_error(
        f"'{name}' must be given once or once per spatial axis ({axes}); got {len(values)}"
    )


def _conv_geometry(layer: Layer, param: pb.ConvolutionParameter, shape: Sequence[int]):
    """(channel axis, Geometry) for a ConvolutionParameter applied to a bottom of ``shape``."""
    if not -len(shape) <= param.axis < max(len(shape), 1):
        raise layer.shape_error(f"axis {param.axis} is out of range for bottom shape {shape}")
    axis = param.axis % len(shape)
    axes = len(shape) - axis - 1
    geom = Geometry(
        kernel=_per_axis(layer, param, "kernel_size", axes, None, ("kernel_h", "kernel_w")),
        stride=_per_axis(layer, param, "stride", axes, 1, ("stride_h", "stride_w")),
        pad=_per_axis(layer, param, "pad", axes, 0, ("pad_h", "pad_w")),
        dilation=_per_axis(layer, param, "dilation", axes, 1),
    )
    for what, values in (
        ("kernel", geom.kernel),
        ("stride", geom.stride),
        ("dilation", geom.dilation),
    ):
        if any(v <= 0 for v in values):
            raise layer.config_error(f"{what} sizes must be positive, got {values}")
    return axis, geom


def _conv_output(layer: Layer, geom: Geometry, spatial: Sequence[int]) -> tuple[int, ...]:
    """The convolution output size, refusing inputs smaller than the dilated kernel."""
    extent = tuple(d * (k - 1) + 1 for k, d in zip(geom.kernel, geom.dilation))
    if any(h + 2 * p < e for h, p, e in zip(spatial, geom.pad, extent)):
        raise layer.shape_error(
            f"input spatial size {tuple(spatial)} (padded by {geom.pad}) is smaller than the "
            f"kernel extent {extent}"
        )
    return geom.conv_out(spatial)


class _ConvolutionBase(Layer):
    """Convolution and its transpose (Caffe's BaseConvolutionLayer).

    The "image side" is what im2col reads and col2im writes: the bottom for Convolution, the
    top for Deconvolution. The "rows side" is the other blob, viewed per group as a
    ``(channels/group, N·pixels)`` matrix. Weights are ``(rows channels, image channels /
    group, *kernel)``, i.e. a ``(group, rows/group, K)`` stack of GEMM operands.
    """

    bottoms = (1, None)
    tops = (1, None)
    transposed: ClassVar[bool] = False

    def setup(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        if len(top) != len(bottom):
            raise self.config_error(
                f"needs one top per bottom (each bottom is filtered alike), got {len(bottom)} "
                f"bottoms and {len(top)} tops"
            )
        param = self.layer_param.convolution_param
        self.axis, self.geom = _conv_geometry(self, param, bottom[0].shape)
        self.channels = bottom[0].shape[self.axis]
        self.num_output = param.num_output
        self.group = param.group
        if self.num_output <= 0:
            raise self.config_error("convolution_param.num_output must be set and positive")
        if self.group <= 0 or self.channels % self.group or self.num_output % self.group:
            raise self.config_error(
                f"group {self.group} must divide both the input channels ({self.channels}) and "
                f"num_output ({self.num_output})"
            )
        rows, image = (
            (self.channels, self.num_output)
            if self.transposed
            else (self.num_output, self.channels)
        )
        shapes = [(rows, image // self.group, *self.geom.kernel)]
        self.bias_term = param.bias_term
        if self.bias_term:
            shapes.append((self.num_output,))
        if self.blobs:
            got = [b.shape for b in self.blobs]
            if got != shapes:
                raise self.shape_error(f"parameter blobs have shapes {got}; expected {shapes}")
        else:
            self.blobs.append(
                self.make_blob(shapes[0], filler_or(param, "weight_filler", type="constant"))
            )
            if self.bias_term:
                self.blobs.append(
                    self.make_blob(shapes[1], filler_or(param, "bias_filler", type="constant"))
                )
        self.rows_channels = rows
        self.image_channels = image
        self.workspaces = [Workspace() for _ in range(WORKERS)]
        self._cached: int | None = None

    def reshape(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        shape = bottom[0].shape
        if len(shape) != self.axis + 1 + len(self.geom.kernel):
            raise self.shape_error(
                f"bottom shape {shape} has a different number of axes than at setup"
            )
        if shape[self.axis] != self.channels:
            raise self.shape_error(
                f"bottom has {shape[self.axis]} channels; the filters expect {self.channels}"
            )
        for b in bottom[1:]:
            if b.shape != shape:
                raise self.shape_error(f"all bottoms must share one shape: {shape} vs {b.shape}")
        spatial = shape[self.axis + 1 :]
        if self.transposed:
            out = self.geom.deconv_out(spatial)
            if any(o <= 0 for o in out):
                raise self.shape_error(f"output spatial size {out} is not positive")
            self.image_spatial, self.col_spatial = out, spatial
        else:
            out = _conv_output(self, self.geom, spatial)
            self.image_spatial, self.col_spatial = spatial, out
        self.num = math.prod(shape[: self.axis])
        self.in_spatial, self.out_spatial = spatial, out
        for t in top:
            t.reshape(shape[: self.axis] + (self.num_output,) + out)
        self._rowshift = self._row_shift_conv(spatial)
        if self._rowshift is not None:
            self._rowshift_dx = self._full_correlation(self._rowshift)
            per_item = self._rowshift.items_size(1)
        else:
            per_item = (
                self.image_channels * math.prod(self.geom.kernel) * math.prod(self.col_spatial)
            )
        self.chunks = batch_chunks(self.num, per_item, COLUMN_LIMIT)
        if self.xp is np:
            # Cache-sized chunks, at least one per worker, shared among the worker threads.
            limit = min(COLUMN_LIMIT, CACHE_COLUMNS, per_item * -(-self.num // WORKERS))
            self.chunks = batch_chunks(self.num, per_item, limit, WORKERS)
        # Forward writes each chunk's columns to a buffer of its own when all of them fit, so
        # that the weight gradient reuses them instead of running im2col again.
        self._keep = not self.transposed and self.num * per_item <= KEPT_COLUMNS
        self._cached = None
        geom = self.geom
        full_pad = tuple(d * (k - 1) - p for k, p, d in zip(geom.kernel, geom.pad, geom.dilation))
        stride_one = all(s == 1 for s in self.geom.stride) and min(full_pad, default=0) >= 0
        self._full_geom = (
            self.geom._replace(pad=full_pad)
            if stride_one and not self.transposed and self.num_output <= 2 * self.channels
            else None
        )

    def _row_shift_conv(self, spatial: Sequence[int]) -> RowShiftConv | None:
        """The kernel-row-shift form of this convolution (``conv_rows``) where it applies
        and pays: numpy, 2-D, stride 1, GEMMs at least ``ROW_SHIFT_MIN_DEPTH`` deep; with
        Winograd's transform along the rows (``conv_winograd``) where that applies and the
        output has at least ``WINOGRAD_MIN_ROWS`` rows."""
        geom = self.geom
        if self.xp is not np or self.transposed or len(geom.kernel) != 2:
            return None
        if geom.stride != (1, 1):
            return None
        args = (self.channels, self.num_output, self.group, geom, tuple(spatial))
        conv = RowShiftConv(*args)
        if conv.depth < ROW_SHIFT_MIN_DEPTH:
            return None
        if WinogradRowConv.fits(geom) and conv.out[0] >= WINOGRAD_MIN_ROWS:
            return WinogradRowConv(*args)
        return conv

    @staticmethod
    def _full_correlation(conv: RowShiftConv) -> RowShiftConv | None:
        """The full correlation that computes the bottom gradient, where it beats the
        adjoint of forward (``RowShiftConv.data_gradient``), else None. It moves kh times
        less data, but its GEMMs cost as many FLOPs per bottom pixel as forward's do per
        top pixel, with the bottom's channels as their short side. So the adjoint wins on
        an unpadded convolution of a small image (LeNet's conv2, 12×12 → 8×8: 2.1 ms
        against 3.6 ms for the layer's backward) and where the top has at least twice the
        bottom's channels where the form says so (``adjoint_for_wide_tops``; the same rule
        as ``_full_geom`` on the im2col path)."""
        full = conv.data_gradient_conv()
        wide_top = conv.out_group >= 2 * conv.in_group
        if full is None or (wide_top and conv.adjoint_for_wide_tops):
            return None
        if math.prod(conv.spatial) > FULL_CORRELATION_WASTE * math.prod(conv.out):
            return None
        return full

    # -- pieces of the GEMM formulation ---------------------------------------------------
    def _weights(self, array: Any) -> Any:
        """A weight-shaped array as the (group, rows/group, K) stack."""
        return array.reshape(self.group, self.rows_channels // self.group, -1)

    def _image(self, array: Any) -> Any:
        return array.reshape((self.num, self.image_channels) + tuple(self.image_spatial))

    def _rows_view(self, array: Any) -> Any:
        """A rows-side blob array as (N, channels, pixels)."""
        return array.reshape(self.num, self.rows_channels, -1)

    def _output(self, array: Any) -> Any:
        """A top-shaped array (for Convolution) as (N, num_output, *out)."""
        return array.reshape((self.num, self.num_output) + tuple(self.out_spatial))

    def _columns_key(self, start: int) -> str:
        """The workspace key of chunk ``start``'s columns: its own when the layer keeps
        columns for backward, else one shared by the worker's chunks."""
        return f"col{start}" if self._keep else "col"

    def _column_matrix(self, start: int, stop: int, dtype: Any, ws: Workspace) -> Any:
        """The (C·prod(kernel), n·pixels) column matrix of chunk ``start:stop``, in the
        workspace buffer ``_columns_key`` names (rows padded, ``Workspace.matrix``)."""
        rows = self.image_channels * math.prod(self.geom.kernel)
        cols = (stop - start) * math.prod(self.col_spatial)
        return ws.matrix(self._columns_key(start), rows, cols, dtype, self.xp)

    def _column_buffer(self, start: int, stop: int, dtype: Any, ws: Workspace) -> Any:
        """The column matrix of chunk ``start:stop`` as a (group, K, n·pixels) stack."""
        col = self._column_matrix(start, stop, dtype, ws)
        return col.reshape(self.group, -1, col.shape[1])

    def _columns(self, image: Any, start: int, stop: int, ws: Workspace) -> Any:
        """im2col of an image-side chunk into its column buffer (see ``_column_buffer``)."""
        col = self._column_matrix(start, stop, image.dtype, ws)
        shape = (self.image_channels, *self.geom.kernel, stop - start, *self.col_spatial)
        im2col(image, self.geom, self.col_spatial, col.reshape(shape), ws)
        return col.reshape(self.group, -1, col.shape[1])

    def _uncolumns(self, col: Any, image: Any, ws: Workspace) -> None:
        """col2im of a (group, K, n·pixels) stack into an image-side chunk (overwritten).

        The scatter-add runs channel-major, (C, n, ...), the order the columns are stored
        in, which is about a third faster than adding into the (n, C, ...) image directly;
        the one transposing copy happens when the padding is cropped off.
        """
        n, nk = image.shape[0], len(self.geom.kernel)
        col = col.reshape((self.image_channels, *self.geom.kernel, n, *self.col_spatial))
        order = (0, nk + 1) + tuple(range(1, nk + 1)) + tuple(range(nk + 2, 2 * nk + 2))
        col2im(col.transpose(order), self.geom, self.col_spatial, image.swapaxes(0, 1), ws)

    def _to_rows(self, chunk: Any, ws: Workspace) -> Any:
        """(n, channels, pixels) -> the (group, channels/group, n·pixels) GEMM operand."""
        n, c, p = chunk.shape
        rows = ws.matrix("rows", c, n * p, chunk.dtype, self.xp)
        self.xp.copyto(rows.reshape(c, n, p), chunk.transpose(1, 0, 2))
        return rows.reshape(self.group, c // self.group, n * p)

    def _from_rows(self, rows: Any, chunk: Any, bias: Any = None) -> None:
        """Write a (group, channels/group, n·pixels) stack into (n, channels, pixels)."""
        n, c, p = chunk.shape
        view = rows.reshape(c, n, p).transpose(1, 0, 2)
        if bias is None:
            self.xp.copyto(chunk, view)
        else:
            self.xp.add(view, bias.reshape(1, c, 1), out=chunk)

    def _matmul(self, a: Any, b: Any, ws: Workspace, key: str) -> Any:
        """The (group, m, n) stack a @ b, into a workspace matrix (``Workspace.matrix``)."""
        (group, m), n = a.shape[:2], b.shape[-1]
        out = ws.matrix(key, group * m, n, b.dtype, self.xp).reshape(group, m, n)
        return self.xp.matmul(a, b, out=out)

    def _run(self, work) -> None:
        """``work(start, stop, workspace)`` over the batch chunks, on the worker pool."""
        run_chunks(
            self.xp, lambda start, stop, w: work(start, stop, self.workspaces[w]), self.chunks
        )

    def _weight_gradient_parts(self, shape: Sequence[int]) -> list[Any]:
        """Zeroed per-worker weight-gradient sums of ``shape``, added to the parameter diff
        in worker order once all chunks are done."""
        parts = [ws.get("dw", shape, self.dtype, self.xp) for ws in self.workspaces]
        for part in parts:
            part.fill(0)
        return parts

    def _add_weight_gradient(self, parts: list[Any], col: Any, rows: Any, ws: Workspace) -> None:
        """Add one chunk's col · rowsᵀ to its worker's part. The product is formed
        transposed, (K, n·pixels) · (n·pixels, rows), because OpenBLAS runs that shape
        about 1.7x faster than rows · colᵀ (measured on CIFAR-10 quick's conv2 chunks).
        With one group it is one GEMM adding into the part (``matmul_into``), which also
        lets the other worker run while it computes."""
        part = parts[self.workspaces.index(ws)]
        if col.shape[0] == 1:
            matmul_into(col[0], rows[0].T, part[0])
        else:
            part += self._matmul(col, rows.transpose(0, 2, 1), ws, "dwgemm")

    # -- forward / backward ---------------------------------------------------------------
    def forward(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        xp = self.xp
        weights = self._weights(self.blobs[0].data)
        bias = self.blobs[1].data if self.bias_term else None
        conv = self._rowshift
        stack = conv.filters(self.blobs[0].data) if conv is not None else None
        # Blob memory is allocated on first access: touch it here, not in the workers.
        for b, t in zip(bottom, top):
            if self.transposed:

                def work(start, stop, ws, x=b.data, y=t.data):
                    rows = self._to_rows(self._rows_view(x)[start:stop], ws)
                    col = self._matmul(weights.transpose(0, 2, 1), rows, ws, "colgemm")
                    self._uncolumns(col, self._image(y)[start:stop], ws)

            elif conv is not None:

                def work(start, stop, ws, x=b.data, y=t.data):
                    rows = conv.rows(self._image(x)[start:stop], ws, self._columns_key(start))
                    conv.apply(rows, stack, self._output(y)[start:stop], bias, ws)

            else:

                def work(start, stop, ws, x=b.data, y=t.data):
                    col = self._columns(self._image(x)[start:stop], start, stop, ws)
                    rows = self._matmul(weights, col, ws, "rowsgemm")
                    self._from_rows(rows, self._rows_view(y)[start:stop], bias)

            self._run(work)
            if self.transposed and bias is not None:
                out = t.data.reshape(self.num, self.num_output, -1)
                xp.add(out, bias.reshape(1, -1, 1), out=out)
        # Kept columns (or, with the whole batch in one chunk, the shared buffer) hold the last
        # bottom's columns until backward.
        single = len(self.chunks) == 1 and not self.transposed
        self._cached = len(bottom) - 1 if single or self._keep else None

    def backward(
        self, top: Sequence[Blob], propagate_down: Sequence[bool], bottom: Sequence[Blob]
    ) -> None:
        want_w = bool(self.param_propagate_down and self.param_propagate_down[0])
        want_b = (
            self.bias_term and len(self.param_propagate_down) > 1 and self.param_propagate_down[1]
        )
        weights = self._weights(self.blobs[0].data)
        for i, (b, t) in enumerate(zip(bottom, top)):
            if want_b:
                # Summing over pixels as a matrix-vector product is 3x faster on numpy
                # than sum(axis=(0, 2)), which reduces along a strided axis.
                dy = t.diff.reshape(self.num, self.num_output, -1)
                per_item = self.xp.matmul(dy, self.xp.ones(dy.shape[2], dtype=dy.dtype))
                self.blobs[1].diff += per_item.sum(axis=0)
            if not (want_w or propagate_down[i]):
                continue
            dx = b.diff if propagate_down[i] else None
            if self._rowshift is not None:
                self._backward_row_shifts(b.data, t.diff, dx, want_w, self._cached == i)
            else:
                parts = (
                    self._weight_gradient_parts(weights.transpose(0, 2, 1).shape)
                    if want_w
                    else None
                )
                backward = self._backward_transposed if self.transposed else self._backward_direct
                self._run(
                    functools.partial(
                        backward, b.data, t.diff, dx, weights, parts, self._cached == i
                    )
                )
                if want_w:
                    dw = self._weights(self.blobs[0].diff)
                    for part in parts:
                        dw += part.transpose(0, 2, 1)
            self._cached = None  # the column buffers now hold other columns

    def _backward_row_shifts(self, x, dy_all, dx_all, want_w: bool, cached: bool) -> None:
        """Backward in the kernel-row-shift form: the filter gradient from the forward
        rows (kept, or rebuilt per chunk); the bottom gradient as the full correlation of
        the top gradient or as the adjoint of forward (``_full_correlation`` decides)."""
        conv, full = self._rowshift, self._rowshift_dx
        w = self.blobs[0].data
        parts = self._weight_gradient_parts(conv.filters_shape) if want_w else None
        adjoint = dx_all is not None and full is None
        stack = conv.weights(w) if adjoint else None
        stack_full = (
            full.filters(conv.transposed_filters(w)) if dx_all is not None and full else None
        )

        def work(start: int, stop: int, ws: Workspace) -> None:
            dy = self._output(dy_all)[start:stop]
            dy_last = conv.channels_last(dy, ws) if parts is not None or adjoint else None
            if parts is not None:
                key = self._columns_key(start)
                if cached:
                    rows = conv.rows_buffer(ws, key, stop - start, dy.dtype, self.xp)
                else:
                    rows = conv.rows(self._image(x)[start:stop], ws, key)
                conv.add_weight_gradient(rows, dy_last, parts[self.workspaces.index(ws)], ws)
            if adjoint:
                conv.data_gradient(dy_last, stack, self._image(dx_all)[start:stop], ws)
            elif stack_full is not None:
                rows_full = full.rows(dy, ws, "rows_dx")
                full.apply(rows_full, stack_full, self._image(dx_all)[start:stop], None, ws)

        self._run(work)
        if want_w:
            dw = self.blobs[0].diff
            for part in parts:
                dw += conv.weight_diff(part)

    def _backward_direct(self, x, dy_all, dx_all, weights, parts, cached, start, stop, ws) -> None:
        dy = self._to_rows(self._rows_view(dy_all)[start:stop], ws)
        if parts is not None:
            if cached:
                col = self._column_buffer(start, stop, dy.dtype, ws)
            else:
                col = self._columns(self._image(x)[start:stop], start, stop, ws)
            self._add_weight_gradient(parts, col, dy, ws)
        if dx_all is not None and self._full_geom is not None:
            self._data_gradient_by_full_correlation(dy_all, dx_all, start, stop, ws)
        elif dx_all is not None:
            dcol = self._matmul(weights.transpose(0, 2, 1), dy, ws, "colgemm")
            self._uncolumns(dcol, self._image(dx_all)[start:stop], ws)

    def _data_gradient_by_full_correlation(self, dy_all, dx_all, start, stop, ws) -> None:
        """dx for a stride-1 convolution: the top gradient, padded by d(k − 1) − p, correlated
        with the spatially flipped, channel-transposed filters. The same FLOPs as Caffe's
        GEMM + col2im, but the data movement is one im2col copy instead of prod(kernel)
        scatter-adds, which is faster when the top has no more channels than twice the
        bottom (``_full_geom`` is set only then)."""
        xp, group, nk = self.xp, self.group, len(self.geom.kernel)
        w = self.blobs[0].data.reshape(
            (group, self.num_output // group, self.channels // group) + self.geom.kernel
        )
        w = (
            xp.flip(w, axis=tuple(range(3, 3 + nk)))
            .swapaxes(1, 2)
            .reshape(group, self.channels // group, -1)
        )
        n = stop - start
        dy = dy_all.reshape((self.num, self.num_output) + tuple(self.out_spatial))[start:stop]
        rows, pixels = self.num_output * math.prod(self.geom.kernel), n * math.prod(self.in_spatial)
        col = ws.matrix("fullcol", rows, pixels, dy.dtype, xp)
        shape = (self.num_output, *self.geom.kernel, n, *self.in_spatial)
        im2col(dy, self._full_geom, self.in_spatial, col.reshape(shape), ws, "fullcol_pad")
        dx = self._matmul(w, col.reshape(group, -1, pixels), ws, "fullgemm")
        self._from_rows(dx, dx_all.reshape(self.num, self.channels, -1)[start:stop])

    def _backward_transposed(
        self, x, dy_all, dx_all, weights, parts, cached, start, stop, ws
    ) -> None:
        col = self._columns(self._image(dy_all)[start:stop], start, stop, ws)
        if parts is not None:
            self._add_weight_gradient(
                parts, col, self._to_rows(self._rows_view(x)[start:stop], ws), ws
            )
        if dx_all is not None:
            dx = self._matmul(weights, col, ws, "rowsgemm")
            self._from_rows(dx, self._rows_view(dx_all)[start:stop])


@register("Convolution")
class ConvolutionLayer(_ConvolutionBase):
    """Caffe's Convolution: N-D, grouped, dilated, strided, padded cross-correlation plus
    an optional bias; weights (num_output, channels/group, *kernel), bias (num_output),
    both constant-0 filled unless a filler is given; output (H + 2p − (d(k−1)+1))/s + 1."""


@register("Deconvolution")
class DeconvolutionLayer(_ConvolutionBase):
    """Caffe's Deconvolution, the transpose of Convolution (its forward is Convolution's
    data gradient): weights (channels, num_output/group, *kernel), bias (num_output);
    output s(H − 1) + d(k − 1) + 1 − 2p."""

    transposed = True


@register("Im2col")
class Im2colLayer(Layer):
    """Caffe's Im2col: the columns a Convolution with this ConvolutionParameter multiplies,
    top (…, C·prod(kernel), *out) with channel-major, then kernel-offset order."""

    bottoms = (1, 1)
    tops = (1, 1)

    def setup(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        self.axis, self.geom = _conv_geometry(
            self, self.layer_param.convolution_param, bottom[0].shape
        )
        if not self.geom.kernel:
            raise self.config_error("needs at least one spatial axis after the channel axis")
        self.ws = Workspace()

    def reshape(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        shape = bottom[0].shape
        if len(shape) != self.axis + 1 + len(self.geom.kernel):
            raise self.shape_error(
                f"bottom shape {shape} has a different number of axes than at setup"
            )
        self.spatial = shape[self.axis + 1 :]
        self.out = _conv_output(self, self.geom, self.spatial)
        channels = shape[self.axis]
        self.image_shape = (math.prod(shape[: self.axis]), channels) + self.spatial
        self.col_shape = self.image_shape[:2] + self.geom.kernel + self.out
        top[0].reshape(shape[: self.axis] + (channels * math.prod(self.geom.kernel),) + self.out)

    def forward(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        x = padded(bottom[0].data.reshape(self.image_shape), self.geom.pad, self.ws, "pad")
        self.xp.copyto(top[0].data.reshape(self.col_shape), windows(x, self.geom, self.out))

    def backward(
        self, top: Sequence[Blob], propagate_down: Sequence[bool], bottom: Sequence[Blob]
    ) -> None:
        if propagate_down[0]:
            col2im(
                top[0].diff.reshape(self.col_shape),
                self.geom,
                self.out,
                bottom[0].diff.reshape(self.image_shape),
                self.ws,
            )


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

    def reshape(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        shape = bottom[0].shape
        if len(shape) != 4:
            raise self.shape_error(f"bottom must be (num, channels, height, width), got {shape}")
        if self.layer_param.pooling_param.global_pooling:
            self.kernel = shape[2:]
        out = [
            _pool_extent(self, h, k, s, p, self.ceil)
            for h, k, s, p in zip(shape[2:], self.kernel, self.stride, self.pad)
        ]
        if any(self.pad):
            # The last window must start inside the image or its near padding.
            for d in range(2):
                if (out[d] - 1) * self.stride[d] >= shape[2 + d] + self.pad[d]:
                    out[d] -= 1
        self.out = tuple(out)
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
        buf = diff if shape == diff.shape else ws.get("grad", shape, diff.dtype, self.xp)
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

    def _forward_max(self, x: Any, top: Sequence[Blob]) -> None:
        if self.xp is np:
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
            greater = ws.get("greater", best.shape, np.bool_, xp)
            step = ws.get("step", best.shape, dtype, xp)
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
            row_max = ws.get("row_max", (size,), x.dtype, np)
            row_arg = ws.get(f"row_arg{start}", (size,), dtype, np)
            greater = ws.get("greater", (size,), np.bool_, np)
            step = ws.get("step", (size,), dtype, np)
            columns = [lay.column_view(phases, k, size) for k in range(kw)]
            _first_maximum(np, columns, row_max, row_arg, greater, step)
            row_max = row_max.reshape(lay.rows, count, lay.width)
            shape = (self.out[0], count, lay.width)
            best = ws.get("best", shape, x.dtype, np)
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
        row_sum = ws.get("row_sum", (size,), x.dtype, np)
        np.copyto(row_sum, lay.column_view(phases, 0, size))
        for k in range(1, kw):
            np.add(row_sum, lay.column_view(phases, k, size), out=row_sum)
        row_sum = row_sum.reshape(lay.rows, count, lay.width)
        span = sh * (self.out[0] - 1) + 1
        total = ws.get("total", (self.out[0], count, lay.width), x.dtype, np)
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
        if self.method == pb.PoolingParameter.MAX and xp is np:
            self._run(functools.partial(self._backward_max_phases, dy_all, diff_all))
            return
        if divisor is not None and xp is np:
            self._run(functools.partial(self._backward_ave_phases, dy_all, diff_all, divisor))
            return

        def work(start: int, stop: int, ws: Workspace) -> None:
            dy, diff = dy_all[start:stop], diff_all[start:stop]
            grad = self._zeroed_grad(diff, ws)
            routed = ws.get("routed", dy.shape, dy.dtype, xp)
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
        rows = ws.get("row_grad", (lay.rows, count, lay.width), dy.dtype, np)
        rows.fill(0)
        chosen = ws.get("chosen", (size,), np.bool_, np)
        routed = ws.get("routed", (size,), dy.dtype, np)
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
        dy = ws.get("dy", (self.out[0], count, self.layout.width), dy_all.dtype, np)
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
        rows = ws.get("row_grad", (lay.rows, dy.shape[1], lay.width), dy.dtype, np)
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
        buf = ws.get("phase_grad", (self._length(count),), dtype, np)
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


# -- local response normalization ----------------------------------------------------------
@register("LRN")
class LRNLayer(Layer):
    """Caffe's LRN, y = x · scale^−β.

    ACROSS_CHANNELS: scale = k + α/n · Σ x² over the n channels centred on each channel
    (zero beyond the ends). WITHIN_CHANNEL: scale = 1 + α/n² · Σ x² over the n × n window
    centred on each pixel (zero padded); Caffe builds it from Power, AVE Pooling and
    Eltwise layers, whose shift is 1, so ``k`` is ignored there, as here. Backward is the
    exact gradient: dx = dy · scale^−β − (2αβ / size) · x · Σ_window(dy · y / scale), where
    size is n or n², and the window sum is the same centred sum (it is self-adjoint).
    """

    bottoms = (1, 1)
    tops = (1, 1)

    def setup(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        p = self.layer_param.lrn_param
        self.size = p.local_size
        if self.size % 2 == 0:
            raise self.config_error(f"local_size must be odd, got {self.size}")
        self.half = (self.size - 1) // 2
        self.alpha, self.beta = p.alpha, p.beta
        self.across = p.norm_region == pb.LRNParameter.ACROSS_CHANNELS
        self.k = p.k if self.across else 1.0
        self.norm = self.size if self.across else self.size * self.size
        #: the axes a window spans: channels, or height and width
        self.axes = (1,) if self.across else (2, 3)
        self.ws = Workspace()

    def reshape(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        if bottom[0].num_axes != 4:
            raise self.shape_error(
                f"bottom must be (num, channels, height, width), got {bottom[0].shape}"
            )
        top[0].reshape(bottom[0].shape)

    def _bordered(self, axis: int, shape: Sequence[int], dtype: Any) -> tuple[Any, Any]:
        """The window buffer of ``axis``: ``shape`` with a zero border of half a window on
        both sides of that axis (written once), and the view of its interior."""
        padded = list(shape)
        padded[axis] += 2 * self.half
        buf = self.ws.get(f"window{axis}", padded, dtype, self.xp, fill=0)
        index = [slice(None)] * len(shape)
        index[axis] = slice(self.half, self.half + shape[axis])
        return buf, buf[tuple(index)]

    def _summand(self, shape: Sequence[int], dtype: Any) -> Any:
        """Where to write the values ``_window_sum`` sums: the first buffer's interior."""
        return self._bordered(self.axes[0], shape, dtype)[1]

    def _window_sum(self, out: Any) -> None:
        """Write into ``out`` the centred window sums (zero outside) of what ``_summand``
        holds: across channels, or in-plane one axis after the other."""
        xp, shape = self.xp, out.shape
        for i, axis in enumerate(self.axes):
            buf, _ = self._bordered(axis, shape, out.dtype)
            last = i == len(self.axes) - 1
            total = out if last else self._bordered(self.axes[i + 1], shape, out.dtype)[1]
            index = [slice(None)] * len(shape)
            for offset in range(self.size):
                index[axis] = slice(offset, offset + shape[axis])
                if offset == 0:
                    xp.copyto(total, buf[tuple(index)])
                else:
                    xp.add(total, buf[tuple(index)], out=total)

    def forward(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        # Every intermediate lives in the workspace: CaffeNet's norm1 has 9 MB per array,
        # and fresh temporaries that size fault their pages in at every pass.
        xp, ws = self.xp, self.ws
        x = bottom[0].data
        xp.multiply(x, x, out=self._summand(x.shape, x.dtype))
        self.scale = ws.get("scale", x.shape, x.dtype, xp)
        self._window_sum(self.scale)
        self.scale *= self.alpha / self.norm
        self.scale += self.k
        self.factor = xp.power(self.scale, -self.beta, out=ws.get("factor", x.shape, x.dtype, xp))
        # In place, backward reads x back as y · scale^β; keep the input instead.
        self.input = None
        if top[0] is bottom[0]:
            self.input = ws.get("input", x.shape, x.dtype, xp)
            xp.copyto(self.input, x)
        xp.multiply(x, self.factor, out=top[0].data)

    def backward(
        self, top: Sequence[Blob], propagate_down: Sequence[bool], bottom: Sequence[Blob]
    ) -> None:
        if not propagate_down[0]:
            return
        xp = self.xp
        dy, y = top[0].diff, top[0].data
        x = bottom[0].data if self.input is None else self.input
        ratio = self._summand(dy.shape, dy.dtype)
        xp.multiply(dy, y, out=ratio)
        xp.divide(ratio, self.scale, out=ratio)
        summed = self.ws.get("summed", dy.shape, dy.dtype, xp)
        self._window_sum(summed)
        summed *= x
        summed *= -2.0 * self.alpha * self.beta / self.norm
        # In place, dy is bottom's diff: each element is read before it is overwritten.
        dx = bottom[0].diff
        xp.multiply(dy, self.factor, out=dx)
        dx += summed


# -- crop ----------------------------------------------------------------------------------
@register("Crop")
class CropLayer(Layer):
    """Caffe's Crop: bottom[0] cropped to bottom[1]'s shape on every axis from ``axis`` on,
    starting at ``offset`` (none: 0; one value: all cropped axes; else one per cropped
    axis). Backward pads the top's gradient back with zeros; bottom[1] only gives a shape,
    so its gradient is zero."""

    bottoms = (2, 2)
    tops = (1, 1)

    def setup(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        param = self.layer_param.crop_param
        ndim = bottom[0].num_axes
        if not -ndim <= param.axis < max(ndim, 1):
            raise self.config_error(f"axis {param.axis} is out of range for {bottom[0].shape}")
        self.axis = param.axis % ndim
        self.offsets = list(param.offset)
        if len(self.offsets) > 1 and self.axis + len(self.offsets) != ndim:
            raise self.config_error(
                f"{len(self.offsets)} offsets given for {ndim - self.axis} cropped axes "
                f"(axis {self.axis} on): give one offset, or one per cropped axis"
            )

    def reshape(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        big, ref = bottom[0].shape, bottom[1].shape
        if len(ref) != len(big):
            raise self.shape_error(f"bottoms have different numbers of axes: {big} vs {ref}")
        index, shape = [], []
        for i, size in enumerate(big):
            if i < self.axis:
                index.append(slice(None))
                shape.append(size)
                continue
            offset = 0
            if len(self.offsets) == 1:
                offset = self.offsets[0]
            elif self.offsets:
                offset = self.offsets[i - self.axis]
            if size - offset < ref[i]:
                raise self.shape_error(
                    f"cannot crop {ref[i]} elements at offset {offset} from axis {i} of size {size}"
                )
            index.append(slice(offset, offset + ref[i]))
            shape.append(ref[i])
        self.index = tuple(index)
        top[0].reshape(shape)

    def forward(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        top[0].data[...] = bottom[0].data[self.index]

    def backward(
        self, top: Sequence[Blob], propagate_down: Sequence[bool], bottom: Sequence[Blob]
    ) -> None:
        if propagate_down[0]:
            diff = bottom[0].diff
            diff.fill(0)
            diff[self.index] = top[0].diff
        if propagate_down[1]:
            bottom[1].diff.fill(0)
