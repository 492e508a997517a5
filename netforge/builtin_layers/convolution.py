"""Convolution layers: Convolution, Deconvolution and Im2col.

Each computes what Caffe's layer of the same type computes (src/caffe/layers/
{base_conv,conv,deconv,im2col}_layer.cpp), with the same parameters, defaults, output sizes
and parameter blob shapes. Convolution is im2col + one batched GEMM over the groups per batch
chunk (``conv_ops``), or, for deep stride-1 2-D convolutions on numpy, one such GEMM per
kernel row over shared window rows (``conv_rows``); no loop over items, channels or pixels.
A depthwise Convolution (one input channel per group) runs on numba's kernels instead
(``depthwise``), when they are enabled.

Deliberate difference from Caffe: an input smaller than the (dilated) kernel is a ShapeError
instead of C++ integer-division output sizes.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Any, ClassVar

import numpy as np

from netforge._blas import matmul_into, set_blas_threads
from netforge.blob import Blob
from netforge.builtin_layers import _jit, winograd_kernels
from netforge.builtin_layers._threads import WORKERS, even_chunks, run_chunks
from netforge.builtin_layers.conv_ops import (
    Geometry,
    Workspace,
    batch_chunks,
    col2im,
    im2col,
    padded,
    windows,
)
from netforge.builtin_layers.conv_rows import RowShiftConv
from netforge.builtin_layers.conv_winograd import TILE, WinogradRowConv
from netforge.builtin_layers.depthwise import DepthwiseConv, is_depthwise
from netforge.filler import filler_or
from netforge.layer import Layer, register
from netforge.proto import pb

#: Most elements one column buffer holds (128 MiB of float32); larger batches run in chunks.
COLUMN_LIMIT = 1 << 25

#: Most elements a column buffer holds on numpy: 4 MiB of float32, so that each worker's
#: columns stay in cache between im2col and the GEMM that reads them.
CACHE_COLUMNS = 1 << 20

#: Most column elements a Convolution keeps from forward for its weight gradient (all chunks
#: together, 4 MiB of float32); beyond it, backward recomputes each chunk's columns. Keeping
#: saves one im2col (or Winograd transform) per chunk but holds the whole batch's columns
#: from forward to backward: CIFAR-10 quick's conv1, conv2 and conv3 hold 68 MiB at batch 100,
#: more than PyTorch's whole peak growth. Recomputing them cost 3-7% of its training
#: iteration (14 alternating rounds: lower quartile 67.3 -> 67.6 ms, median 72.5 -> 77.8);
#: LeNet's (17.2 -> 17.0 ms, within the noise) and CaffeNet's (GEMM-bound) cost nothing
#: measurable.
KEPT_COLUMNS = 1 << 20

#: Least GEMM depth (kernel width × channels per group) at which a stride-1 2-D Convolution
#: on numpy uses kernel-row shifts (``conv_rows``) instead of im2col. Below it the shifted
#: GEMMs are too thin: CIFAR-10 quick's conv1 (3 channels, depth 15) is faster with im2col,
#: its conv2 (depth 160) and LeNet's conv2 (depth 100) are faster with shifts.
ROW_SHIFT_MIN_DEPTH = 64

#: Least window-copy elements a row-shift Convolution saves per filter element it re-lays out
#: (``_ConvolutionBase._row_shift_conv``). The row shifts copy each input element kw·Hp/Ho
#: times where im2col copies it kh·kw times, but they rewrite the filters on every pass (the
#: Winograd form writes points/kh times their size), which im2col multiplies as they are.
#: Per image that saves about C·kw·Ho·Wo·(kh − 1) elements of copy and costs
#: O·(C/group)·kh·kw, a ratio of group·N·Ho·Wo·(kh − 1) / (O·kh). ResNet-50's batch-1 3×3
#: layers put the break-even near 4 (forward ms, row shifts against im2col, 2 cores):
#: 56×56, ratio 33: 1.8 against 2.4; 28×28, ratio 4.1: 1.7 against 1.8; 14×14, ratio 0.5:
#: 2.6-3.6 against 1.7-2.2; 7×7, ratio 0.06: 10-12 against 2-3. A 1×1 kernel saves nothing
#: (ratio 0): its row shifts only transposed input and filters (ResNet-50's 1×1 layers at
#: batch 1: 1.2-6.9 ms against 0.4-1.2).
ROW_SHIFT_MIN_REUSE = 4

#: Least batch at which a Convolution uses the row shifts: one image takes ``_forward_one``,
#: whose GEMM is split on the worker pool, while the row shifts' single chunk runs on
#: OpenBLAS's threads. Net.forward at batch 1, alternating in one process at load 3.9:
#: ResNet-50 316 -> 202 ms (its 28×28 3×3 layers took 10-12 ms each with Winograd),
#: SqueezeNet 24.8 -> 23.3, GoogLeNet 84 -> 89 (within its spread, 0.80-1.07).
ROW_SHIFT_MIN_IMAGES = 2

#: Least multiply-adds (filter elements × output pixels) at which a single image's GEMM is
#: split between the workers (``_forward_one``); a smaller one runs on the calling thread
#: alone, with OpenBLAS on one thread. Handing half to the pool costs about as much as
#: ~20 M multiply-adds save on 2 cores. Per layer, split / alone, ms (medians of 15,
#: alternating): GoogLeNet's inception_4a/3x3_reduce (9.0 M) 0.43 / 0.25,
#: inception_4a/1x1 (18.1 M) 0.56 / 0.48, inception_5a/3x3 (22.6 M) 0.87 / 0.80;
#: at 25.7 M the split wins or ties: ResNet-50's res3a_branch2a 0.89 / 1.18, MobileNet's
#: conv4_2/sep 0.54 / 0.60.
SPLIT_MIN_MACS = 3 << 23

#: Least pixels per image at which a 1×1, stride-1, unpadded Convolution of several images
#: multiplies each image's channels in place (``_pointwise``) instead of copying the batch
#: into columns and the product back. Per image the GEMM's long side is then the pixels
#: alone, too short below this. ResNet-50's layers at batch 8, forward ms, columns /
#: in place: res2b_branch2a (3136 pixels) 11.2 / 5.5, res3b_branch2a (784) 5.7 / 4.9,
#: res4b_branch2a (196) 6.9 / 5.1, res5b_branch2a (49) 6.4 / 7.2.
POINTWISE_MIN_PIXELS = 128

#: Least output rows at which a row-shift Convolution uses Winograd's F(4, kh) along the rows
#: (``conv_winograd``): one tile's worth; with fewer, the one tile computes mostly rows that
#: are cropped off.
WINOGRAD_MIN_ROWS = TILE

#: Most bottom pixels per top pixel at which the row-shift Convolution computes its bottom
#: gradient as a full correlation rather than as the adjoint of forward (see
#: ``_ConvolutionBase._full_correlation``).
FULL_CORRELATION_WASTE = 1.5


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
    reshape_follows_shapes = True
    transposed: ClassVar[bool] = False

    def setup(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        if len(top) != len(bottom):
            raise self.config_error(
                f"needs one top per bottom (each bottom is filtered alike), got {len(bottom)} "
                f"bottoms and {len(top)} tops"
            )
        param = self.layer_param.convolution_param
        self.axis, self.geom = _conv_geometry(self, param, bottom[0].shape)
        geom = self.geom
        #: 1×1, stride 1, unpadded: each image's bottom is its own column matrix.
        self._bottom_is_columns = (
            all(k == 1 for k in geom.kernel)
            and all(s == 1 for s in geom.stride)
            and not any(geom.pad)
        )
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
        self._depthwise = self._depthwise_conv()
        self._rowshift = self._row_shift_conv(spatial)
        self._pointwise = self._pointwise_conv()
        self._winograd_one = self._winograd_image()
        if self._rowshift is not None:
            self._rowshift_dx = self._full_correlation(self._rowshift)
            # Chunks sized by the larger of forward's rows and the bottom gradient's: a top
            # with more channels than the bottom has more rows (CIFAR-10 quick's conv3: 7.8
            # MiB per chunk of 50 images against forward's 3.9).
            per_item = max(
                conv.items_size(1) for conv in (self._rowshift, self._rowshift_dx) if conv
            )
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

    def _depthwise_conv(self) -> DepthwiseConv | None:
        """The compiled depthwise kernels (``depthwise``) where they apply: a 2-D
        Convolution with one input channel per group, on numpy, with ``_jit.enabled()``.
        Without numba, depthwise layers keep im2col + GEMM: the numpy alternative, a sum
        over the kernel taps of shifted input views times per-channel weights, measured
        slower on MobileNet v1's 3×3 layers at batch 1 (15.0-16.4 ms against 11.2-13.7 for
        all thirteen, on one shared 2-core machine)."""
        if self.xp is not np or self.transposed:
            return None
        # Depthwise first: asking ``_jit`` imports numba (116 MB resident), which a net without
        # depthwise layers must not pay for.
        if not is_depthwise(self.channels, self.group, len(self.geom.kernel)):
            return None
        if not _jit.enabled():
            return None
        geom = self.geom
        return DepthwiseConv(geom.stride, geom.pad, geom.dilation)

    def _pointwise_conv(self) -> bool:
        """Whether this convolution runs as one GEMM per image and group on the blobs as
        they are, with no column copies: numpy, 1×1, stride 1, unpadded, several images of
        at least ``POINTWISE_MIN_PIXELS`` pixels each (one image takes ``_forward_one``)."""
        return (
            self.xp is np
            and not self.transposed
            and self.num > 1
            and self._bottom_is_columns
            and math.prod(self.col_spatial) >= POINTWISE_MIN_PIXELS
        )

    def _winograd_image(self) -> bool:
        """Whether a single image's forward runs F(2×2, 3×3) (``winograd_kernels``): numpy,
        one image, one group, 3×3, stride 1, no dilation, enough channels and output tiles
        (``winograd_kernels.worth_it``), with ``_jit.enabled()`` (asked last: importing
        numba costs a net that never takes this path 116 MB)."""
        geom = self.geom
        return (
            self.xp is np
            and not self.transposed
            and self.num == 1
            and self.group == 1
            and winograd_kernels.fits(geom.kernel, geom.stride, geom.dilation)
            and winograd_kernels.worth_it(self.channels, self.out_spatial)
            and _jit.enabled()
        )

    def _row_shift_conv(self, spatial: Sequence[int]) -> RowShiftConv | None:
        """The kernel-row-shift form of this convolution (``conv_rows``) where it applies
        and pays: numpy, 2-D, stride 1, at least ``ROW_SHIFT_MIN_IMAGES`` images, GEMMs
        at least ``ROW_SHIFT_MIN_DEPTH`` deep, window
        copies saved at least ``ROW_SHIFT_MIN_REUSE`` times the filters' size; with
        Winograd's transform along the rows (``conv_winograd``) where that applies and the
        output has at least ``WINOGRAD_MIN_ROWS`` rows."""
        geom = self.geom
        if self.xp is not np or self.transposed or len(geom.kernel) != 2:
            return None
        if self.num < ROW_SHIFT_MIN_IMAGES:
            return None
        if geom.stride != (1, 1):
            return None
        args = (self.channels, self.num_output, self.group, geom, tuple(spatial))
        conv = RowShiftConv(*args)
        if conv.depth < ROW_SHIFT_MIN_DEPTH:
            return None
        kh = geom.kernel[0]
        saved = self.group * self.num * math.prod(conv.out) * (kh - 1)
        if saved < ROW_SHIFT_MIN_REUSE * self.num_output * kh:
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

    def _per_group(self, array: Any) -> Any:
        """A bottom- or top-shaped array as (N, group, channels/group, pixels): each image
        and group one GEMM operand of a 1×1 convolution (``_pointwise``)."""
        return array.reshape(self.num, self.group, -1, math.prod(self.col_spatial))

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

    def _columns_space(self, ws: Workspace) -> Workspace:
        """Where the columns go: the layer's own workspace when backward may reuse them
        (kept, or the whole batch in one chunk), else the thread's scratch, as they are dead
        once their chunk's GEMM has read them."""
        return ws if self._keep or len(self.chunks) == 1 else ws.scratch

    def _column_matrix(self, start: int, stop: int, dtype: Any, ws: Workspace) -> Any:
        """The (C·prod(kernel), n·pixels) column matrix of chunk ``start:stop``, in the
        workspace buffer ``_columns_key`` names (rows padded, ``Workspace.matrix``)."""
        rows = self.image_channels * math.prod(self.geom.kernel)
        cols = (stop - start) * math.prod(self.col_spatial)
        space = self._columns_space(ws)
        return space.matrix(self._columns_key(start), rows, cols, dtype, self.xp)

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
        rows = ws.scratch.matrix("rows", c, n * p, chunk.dtype, self.xp)
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
        """The (group, m, n) stack a @ b, into a scratch matrix (``Workspace.matrix``)."""
        (group, m), n = a.shape[:2], b.shape[-1]
        out = ws.scratch.matrix(key, group * m, n, b.dtype, self.xp).reshape(group, m, n)
        return self.xp.matmul(a, b, out=out)

    def _run(self, work) -> None:
        """``work(start, stop, workspace)`` over the batch chunks, on the worker pool."""
        run_chunks(
            self.xp, lambda start, stop, w: work(start, stop, self.workspaces[w]), self.chunks
        )

    def _weight_gradient_part(self, parts: list[Any], shape: Sequence[int], ws: Workspace) -> Any:
        """The weight-gradient sum of ``shape`` of the worker that owns ``ws``, in
        ``parts`` (a slot per worker, None until the worker's first chunk zeroes a scratch
        buffer for it). The parts are added to the parameter diff in worker order once all
        chunks are done."""
        worker = self.workspaces.index(ws)
        if parts[worker] is None:
            parts[worker] = ws.scratch.get("dw", shape, self.dtype, self.xp)
            parts[worker].fill(0)
        return parts[worker]

    def _add_weight_gradient(self, parts: list[Any], col: Any, rows: Any, ws: Workspace) -> None:
        """Add one chunk's rows · colᵀ to its worker's part, in the weights' own (group,
        rows/group, K) layout so that adding the parts to the parameter diff reads both
        contiguously. (The transposed product, col · rowsᵀ, runs the GEMM no faster, and
        adding it back transposed is a strided pass: 9-11 ms per worker for ResNet-50's
        res5 weights, 0.4-0.9 ms contiguous.) With one group it is one GEMM adding into the
        part (``matmul_into``), which also lets the other worker run while it computes."""
        part = self._weight_gradient_part(parts, (col.shape[0], rows.shape[1], col.shape[1]), ws)
        if col.shape[0] == 1:
            matmul_into(rows[0], col[0].T, part[0])
        else:
            part += self._matmul(rows, col.transpose(0, 2, 1), ws, "dwgemm")

    # -- forward / backward ---------------------------------------------------------------
    def forward(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        xp = self.xp
        weights = self._weights(self.blobs[0].data)
        bias = self.blobs[1].data if self.bias_term else None
        if self._depthwise is not None:
            for b, t in zip(bottom, top):
                self._depthwise.forward(
                    self._image(b.data), self.blobs[0].data, bias, self._output(t.data)
                )
            self._cached = None
            return
        conv = self._rowshift
        stack = conv.filters(self.blobs[0].data) if conv is not None else None
        kept = True  # whether the column buffer holds the last bottom's columns
        # Blob memory is allocated on first access: touch it here, not in the workers.
        for b, t in zip(bottom, top):
            if self.transposed:

                def work(start, stop, ws, x=b.data, y=t.data):
                    rows = self._to_rows(self._rows_view(x)[start:stop], ws)
                    col = self._matmul(weights.transpose(0, 2, 1), rows, ws, "colgemm")
                    self._uncolumns(col, self._image(y)[start:stop], ws)

            elif conv is not None:

                def work(start, stop, ws, x=b.data, y=t.data):
                    scratch = self._columns_space(ws) is not ws
                    rows = conv.rows(
                        self._image(x)[start:stop], ws, self._columns_key(start), scratch
                    )
                    conv.apply(rows, stack, self._output(y)[start:stop], bias, ws)

            elif self.num == 1 and xp is np:
                kept = self._forward_one(b.data, t.data, weights, bias)
                continue
            elif self._pointwise:
                kept = False

                def work(start, stop, ws, x=b.data, y=t.data):
                    ys = self._per_group(y)[start:stop]
                    np.matmul(weights, self._per_group(x)[start:stop], out=ys)
                    if bias is not None:
                        ys += bias.reshape(self.group, -1, 1)

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
        self._cached = len(bottom) - 1 if (single or self._keep) and kept else None

    def _forward_one(self, x: Any, y: Any, weights: Any, bias: Any) -> bool:
        """Forward of a single image on numpy by im2col: the GEMM is split by output
        channels among the workers, each running OpenBLAS on one thread, and writes the
        top directly (one image's (num_output, pixels) rows are the top's layout). A 1×1,
        stride-1, unpadded kernel multiplies the bottom itself, with no column copy. An
        image with at least as many pixels as filters is split by output rows instead
        (``_forward_one_by_rows``), and a GEMM under ``SPLIT_MIN_MACS`` is not split.

        Why not OpenBLAS's own two threads: they synchronise several times per call, and
        each time the other core is busy they wait for it to be scheduled. On 2 cores under
        load (load average 6), a 231 MFLOP GEMM of ResNet-50 at batch 1, (128, 1152) by
        (1152, 784), took a median 88 ms on OpenBLAS's two threads, 9.5 ms on one thread and
        2.9 ms split in two on the pool; CaffeNet-sized (32, 27) by (27, 12544), MobileNet's
        conv1: 16 ms, 0.42 and 0.58 (median of 9). Returns whether the column buffer
        holds the image's columns (for backward). Where ``_winograd_image`` says so,
        F(2×2, 3×3) replaces im2col and the GEMM (``winograd_kernels``)."""
        if self._winograd_one and _jit.usable(x, y, weights):
            image = self._image(x)[0]
            winograd_kernels.forward_image(
                image, self.blobs[0].data, bias, self._output(y)[0], self.geom.pad, self.workspaces
            )
            return False
        ws = self.workspaces[0]
        direct = self._bottom_is_columns
        pixels = math.prod(self.col_spatial)
        alone = weights.size * pixels < SPLIT_MIN_MACS
        if not alone and pixels * self.group >= self.num_output and self.col_spatial[0] >= WORKERS:
            self._forward_one_by_rows(x, y, weights, bias, direct)
            return False
        if direct:
            col = x.reshape(self.group, -1, pixels)
        else:
            col = self._columns(self._image(x), 0, 1, ws)
        out = y.reshape(self.group, self.num_output // self.group, -1)
        per_group = out.shape[1]

        def work(start: int, stop: int, _worker: int) -> None:
            target = out[:, start:stop]
            np.matmul(weights[:, start:stop], col, out=target)
            if bias is not None:
                target += bias.reshape(self.group, -1, 1)[:, start:stop]

        if alone:
            previous = set_blas_threads(1)
            try:
                work(0, per_group, 0)
            finally:
                set_blas_threads(previous)
        else:
            run_chunks(np, work, even_chunks(per_group))
        return not direct

    def _forward_one_by_rows(self, x: Any, y: Any, weights: Any, bias: Any, direct: bool) -> None:
        """``_forward_one`` split by output rows instead of output channels: each worker
        copies the columns of its rows (a view of the bottom for ``direct`` kernels) and
        multiplies all the filters by them into its rows of the top. Where an image has
        more pixels than filters this wins: each worker packs half the columns for its GEMM
        instead of all of them, and copies half of them, while they are in its cache.
        Per layer at batch 1, split by channels / by rows, ms (medians of 15, alternating):
        ResNet-50's res2b_branch2b (64 filters, 3136 pixels) 3.25 / 2.44, res3b_branch2b
        (128, 784) 2.88 / 2.22, conv1 3.84 / 3.01; GoogLeNet's conv1/7x7_s2 4.78 / 3.02; but
        res5b_branch2b (512, 49) 2.73 / 3.36. The columns are not kept for backward."""
        out = y.reshape(self.group, self.num_output // self.group, -1)
        rest = math.prod(self.col_spatial[1:])  # pixels per output row
        kernel, depth = self.geom.kernel, self.image_channels * math.prod(self.geom.kernel)
        if direct:
            bottom = x.reshape(self.group, -1, math.prod(self.col_spatial))
        else:
            image = padded(self._image(x), self.geom.pad, self.workspaces[0], "im2col_pad")
            view = windows(image, self.geom, self.col_spatial)[0]  # (C, *kernel, *out)
        channels_and_kernel = (slice(None),) * (1 + len(kernel))

        def work(first: int, last: int, worker: int) -> None:
            start, stop = first * rest, last * rest
            if direct:
                col = bottom[:, :, start:stop]
            else:
                space = self.workspaces[worker].scratch
                col = space.matrix("col", depth, stop - start, x.dtype, np)
                shape = (self.image_channels, *kernel, last - first, *self.col_spatial[1:])
                np.copyto(col.reshape(shape), view[channels_and_kernel + (slice(first, last),)])
                col = col.reshape(self.group, -1, stop - start)
            target = out[:, :, start:stop]
            np.matmul(weights, col, out=target)
            if bias is not None:
                target += bias.reshape(self.group, -1, 1)

        run_chunks(np, work, even_chunks(self.col_spatial[0]))

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
            if self._depthwise is not None:
                self._depthwise.backward(
                    self._image(b.data),
                    self._output(t.diff),
                    self.blobs[0].data,
                    self._image(dx) if dx is not None else None,
                    self.blobs[0].diff if want_w else None,
                )
            elif self._rowshift is not None:
                self._backward_row_shifts(b.data, t.diff, dx, want_w, self._cached == i)
            else:
                parts = [None] * len(self.workspaces) if want_w else None
                if self.transposed:
                    backward = self._backward_transposed
                elif self._pointwise:
                    backward = self._backward_pointwise
                else:
                    backward = self._backward_direct
                self._run(
                    functools.partial(
                        backward, b.data, t.diff, dx, weights, parts, self._cached == i
                    )
                )
                if want_w:
                    dw = self._weights(self.blobs[0].diff)
                    for part in parts:
                        if part is not None:  # None: a worker that had no chunk
                            dw += part
            self._cached = None  # the column buffers now hold other columns

    def _backward_row_shifts(self, x, dy_all, dx_all, want_w: bool, cached: bool) -> None:
        """Backward in the kernel-row-shift form: the filter gradient from the forward
        rows (kept, or rebuilt per chunk); the bottom gradient as the full correlation of
        the top gradient or as the adjoint of forward (``_full_correlation`` decides)."""
        conv, full = self._rowshift, self._rowshift_dx
        w = self.blobs[0].data
        parts = [None] * len(self.workspaces) if want_w else None
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
                    scratch = self._columns_space(ws) is not ws
                    rows = conv.rows(self._image(x)[start:stop], ws, key, scratch)
                part = self._weight_gradient_part(parts, conv.filters_shape, ws)
                conv.add_weight_gradient(rows, dy_last, part, ws)
            if adjoint:
                conv.data_gradient(dy_last, stack, self._image(dx_all)[start:stop], ws)
            elif stack_full is not None:
                rows_full = full.rows(dy, ws, "rows_dx", scratch=True)
                full.apply(rows_full, stack_full, self._image(dx_all)[start:stop], None, ws)

        self._run(work)
        if want_w:
            dw = self.blobs[0].diff
            for part in parts:
                if part is not None:
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

    def _backward_pointwise(
        self, x, dy_all, dx_all, weights, parts, cached, start, stop, ws
    ) -> None:
        """Backward of ``_pointwise``: per image and group, the filter gradient dy·xᵀ (the
        images' products summed into the worker's part) and the bottom gradient Wᵀ·dy."""
        dy = self._per_group(dy_all)[start:stop]
        if parts is not None:
            x_t = self._per_group(x)[start:stop].swapaxes(-1, -2)
            shape = (stop - start, *weights.shape)
            products = ws.scratch.get("dwgemm", shape, dy.dtype, self.xp)
            np.matmul(dy, x_t, out=products)
            part = self._weight_gradient_part(parts, weights.shape, ws)
            part += products.sum(axis=0)
        if dx_all is not None:
            np.matmul(weights.swapaxes(-1, -2), dy, out=self._per_group(dx_all)[start:stop])

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
        col = ws.scratch.matrix("fullcol", rows, pixels, dy.dtype, xp)
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
