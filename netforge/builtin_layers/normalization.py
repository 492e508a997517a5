"""Normalization layers: BatchNorm, MVN, and the per-channel affine pair Scale and Bias.

Each computes what Caffe's layer of the same type computes, forward and backward
(src/caffe/layers/{batch_norm,mvn,scale,bias}_layer.cpp), and may run in place. Caffe's
BatchNorm has no affine part; its models follow it with ``Scale { bias_term: true }``.

On numpy, BatchNorm, Scale and Bias run numba's fused kernels when the jit extra is
installed (``norm_kernels``); otherwise, and on cupy, the whole-array code here, which
reduces per channel through BLAS and einsum rather than numpy's strided sum over axes (0, 2)
and writes into kept buffers rather than fresh temporaries.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from netforge.blob import Blob
from netforge.builtin_layers import _jit, norm_kernels
from netforge.builtin_layers.common import canonical_axis
from netforge.filler import filler_or
from netforge.layer import Layer, register
from netforge.proto import pb

#: Shortest rows that ``_channel_sums`` sums through BLAS: below it, one call per row costs
#: more than numpy's strided loop ((64, 4096, 1): 1.5 ms through BLAS, 0.04 by numpy).
_BLAS_ROW = 32


def _channel_sums(xp: Any, a: Any) -> Any:
    """Per-channel sums of an (outer, C, inner) array: a matrix-vector product with ones and
    a sum over the outer axis. numpy's sum over axes (0, 2) is a strided loop, 2-3x slower
    ((8, 256, 3136) float32: 1.0 ms against 2.5)."""
    if a.shape[2] < _BLAS_ROW:
        return a.sum(axis=(0, 2))
    return (a @ xp.ones(a.shape[2], a.dtype)).sum(axis=0)


def _channel_dots(xp: Any, a: Any, b: Any) -> Any:
    """Per-channel Σ a·b of two (outer, C, inner) arrays, in one pass without the temporary
    a·b (einsum's sum of products; (8, 256, 3136) float32: 2.7 ms, against 6.0 for
    ``(a * b).sum(axis=(0, 2))``)."""
    return xp.einsum("ncs,ncs->c", a, b)


@register("BatchNorm")
class BatchNormLayer(Layer):
    """Caffe's BatchNorm: normalise each channel (axis 1) by its mean and variance.

    Parameter blobs, all created as zeros: 0 the running sum of means (C), 1 the running
    sum of variances (C), 2 the running normaliser (1). They are statistics, not weights:
    like Caffe, setup adds ``param { lr_mult: 0 }`` for each to ``layer_param`` (the Net
    reads it after setup) and rejects a prototxt that gives any of them another lr_mult.

    With batch statistics (``use_global_stats`` false; by default in TRAIN), forward uses the
    batch's mean and biased variance over every axis but 1, and updates the blobs as Caffe
    does, un-normalised: blob2 ← maf·blob2 + 1, blob0 ← maf·blob0 + mean,
    blob1 ← maf·blob1 + m/(m−1)·var (m = values per channel; the factor is 1 when m = 1),
    maf being ``moving_average_fraction``. With global statistics (by default in TEST), the
    mean and variance are blob0/blob2 and blob1/blob2 (both 0 when blob2 is 0). Then
    y = (x − mean) / sqrt(var + eps).

    Backward with batch statistics is the full batch-norm gradient
    (dy − mean(dy) − y·mean(dy·y)) / sqrt(var + eps); with global statistics it is
    dy / sqrt(var + eps), the statistics being constants (Caffe's choice).
    """

    bottoms = (1, 1)
    tops = (1, 1)
    reshape_follows_shapes = True

    def setup(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        param = self.layer_param.batch_norm_param
        self.maf = param.moving_average_fraction
        self.eps = param.eps
        self.use_global_stats = (
            param.use_global_stats if param.HasField("use_global_stats") else self.phase == pb.TEST
        )
        self.channels = 1 if bottom[0].num_axes == 1 else bottom[0].shape[1]
        expected = (self.channels, self.channels, 1)
        if not self.blobs:
            for count in expected:
                self.blobs.append(self.make_blob((count,)))
        counts = tuple(b.count for b in self.blobs)
        if counts != expected:
            raise self.shape_error(
                f"the stored statistics have {counts} values, expected {expected} for "
                f"{self.channels} channels: the weights do not belong to this net"
            )
        specs = self.layer_param.param
        for i in range(len(self.blobs)):
            if i == len(specs):
                specs.add(lr_mult=0.0)
            elif specs[i].lr_mult != 0:
                raise self.config_error(
                    f"param {i} has lr_mult {specs[i].lr_mult}, but the mean, variance and "
                    "normaliser are statistics, not learned: remove the param specs or set "
                    "lr_mult: 0"
                )
        self._centered: Any = None
        self._std: Any = None

    def reshape(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        channels = 1 if bottom[0].num_axes == 1 else bottom[0].shape[1]
        if channels != self.channels:
            raise self.shape_error(
                f"bottom has {channels} channels, but the layer was set up for {self.channels}"
            )
        top[0].reshape(bottom[0].shape)

    def _by_channel(self, array: Any) -> Any:
        """``array`` viewed as (N, C, rest), so statistics reduce over axes 0 and 2."""
        return array.reshape(array.shape[0], self.channels, -1)

    def forward(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        xp = self.xp
        x = self._by_channel(bottom[0].data)
        # In place, the same array object: the kernels then write through one name.
        y = x if top[0] is bottom[0] else self._by_channel(top[0].data)
        if self.use_global_stats:
            mean_sum, var_sum, norm = (b.data.reshape(-1) for b in self.blobs)
            # Caffe's 1/blob2, or 0 when blob2 is 0, as a device expression (no host sync):
            # True/(norm + False) where norm != 0, False/(0 + True) = 0 where it is 0.
            empty = norm == 0
            factor = xp.logical_not(empty) / (norm + empty)
            mean, var = factor * mean_sum, factor * var_sum
            # An affine map written straight into the top: backward needs only std, so no
            # normalised copy is kept.
            self._std = xp.sqrt(var + self.eps)
            scale = 1 / self._std
            shift = -mean * scale
            if _jit.usable(x, y, scale, shift):
                norm_kernels.channel_affine(x, scale, shift, y)
            else:
                xp.multiply(x, scale[:, None], out=y)
                y += shift[:, None]
            return
        centered = self.centered_buffer(x)
        kernels = _jit.usable(x, y, centered)
        if kernels:
            mean, var = norm_kernels.batch_norm_train_forward(x, y, centered, self.eps)
        else:
            m = x.size // self.channels
            mean = _channel_sums(xp, x) / m
            xp.subtract(x, mean[:, None], out=centered)
            var = _channel_dots(xp, centered, centered) / m
        self.record_batch_statistics(mean, var, x)
        if not kernels:
            xp.divide(centered, self._std[:, None], out=y)

    def centered_buffer(self, x: Any) -> Any:
        """Where batch-statistics forward writes x − mean for backward (``x`` as (N, C,
        rest)): kept apart from the top, which a later in-place layer may overwrite, in a
        buffer reused across passes; backward needs nothing else but std."""
        centered = self._centered
        if centered is None or type(centered) is not type(x) or centered.shape != x.shape:
            centered = self._centered = self.xp.empty_like(x)
        return centered

    def record_batch_statistics(self, mean: Any, var: Any, x: Any) -> None:
        """After a batch-statistics forward of ``x`` with channel ``mean`` and biased
        ``var``: update the running blobs as Caffe does and keep std for backward."""
        mean_sum, var_sum, norm = (b.data.reshape(-1) for b in self.blobs)
        m = x.size // self.channels
        correction = m / (m - 1) if m > 1 else 1.0
        norm[...] = self.maf * norm + 1
        mean_sum[...] = self.maf * mean_sum + mean
        var_sum[...] = self.maf * var_sum + correction * var
        self._std = self.xp.sqrt(var + self.eps).astype(x.dtype, copy=False)

    def backward(
        self, top: Sequence[Blob], propagate_down: Sequence[bool], bottom: Sequence[Blob]
    ) -> None:
        if not propagate_down[0]:
            return
        xp = self.xp
        dy = self._by_channel(top[0].diff)
        dx = dy if top[0] is bottom[0] else self._by_channel(bottom[0].diff)
        std = self._std
        if self.use_global_stats:
            scale = 1 / std
            if _jit.usable(dy, dx, scale):
                norm_kernels.channel_affine(dy, scale, xp.zeros_like(scale), dx)
            else:
                xp.divide(dy, std[:, None], out=dx)
            return
        centered = self._centered
        if _jit.usable(dy, dx, centered, std):
            norm_kernels.batch_norm_train_backward(dy, centered, std, dx)
            return
        # (dy − mean(dy) − y·mean(dy·y)) / std with y = (x − mean) / std, from x − mean:
        # y·mean(dy·y) = (x − mean)·mean(dy·(x − mean)) / std².
        m = dy.size // self.channels
        mean_dy = _channel_sums(xp, dy) / m
        slope = _channel_dots(xp, dy, centered) / (m * std * std)
        # Built in dx itself unless dx is dy (in place), which is still to be read.
        work = xp.empty_like(dy) if top[0] is bottom[0] else dx
        xp.multiply(centered, slope[:, None], out=work)
        work += mean_dy[:, None]
        xp.subtract(dy, work, out=work)
        xp.divide(work, std[:, None], out=dx)


@register("MVN")
class MVNLayer(Layer):
    """Mean-variance normalisation of each (item, channel), or of each item when
    ``across_channels``: y = (x − mean) / (std + eps), or x − mean without
    ``normalize_variance``. As in Caffe, eps is added to the standard deviation (biased),
    not to the variance, and backward is Caffe's
    (dy − mean(dy) − y·mean(dy·y)) / (std + eps), computed from the top's data (the exact
    derivative as eps → 0; with the default eps of 1e-9 the difference is nil).

    Caffe's MVN works on the legacy 4-axis view of its bottom, so its top is
    (num, channels, height, width) with missing axes 1: a (N, C) bottom gives a
    (N, C, 1, 1) top, here too. Bottoms with more than 4 axes are refused, as Caffe does.
    """

    bottoms = (1, 1)
    tops = (1, 1)
    reshape_follows_shapes = True

    def setup(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        param = self.layer_param.mvn_param
        self.normalize_variance = param.normalize_variance
        self.across_channels = param.across_channels
        self.eps = param.eps
        self._std: Any = None

    def reshape(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        shape = bottom[0].shape
        if not 1 <= len(shape) <= 4:
            raise self.shape_error(f"bottom needs 1 to 4 axes, got shape {shape}")
        legacy = shape + (1,) * (4 - len(shape))
        self._rows = legacy[0] if self.across_channels else legacy[0] * legacy[1]
        top[0].reshape(legacy)

    def forward(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        xp = self.xp
        x = bottom[0].data.reshape(self._rows, -1)
        y = x - x.mean(axis=1, keepdims=True)
        if self.normalize_variance:
            self._std = xp.sqrt(xp.square(y).mean(axis=1, keepdims=True)) + self.eps
            y = y / self._std
        top[0].data[...] = y.reshape(top[0].shape)

    def backward(
        self, top: Sequence[Blob], propagate_down: Sequence[bool], bottom: Sequence[Blob]
    ) -> None:
        if not propagate_down[0]:
            return
        dy = top[0].diff.reshape(self._rows, -1)
        dx = dy - dy.mean(axis=1, keepdims=True)
        if self.normalize_variance:
            y = top[0].data.reshape(self._rows, -1)
            dx = (dx - y * (dy * y).mean(axis=1, keepdims=True)) / self._std
        bottom[0].diff[...] = dx.reshape(bottom[0].shape)


# -- Scale and Bias ------------------------------------------------------------------------
def _param_shape(layer: Layer, bottom: Blob, axis: int, num_axes: int) -> tuple[int, ...]:
    """The shape of a learned scale or bias: bottom's axes from ``axis``, ``num_axes`` of
    them, or through the last axis when ``num_axes`` is −1."""
    axis = canonical_axis(layer, bottom, axis)
    if num_axes < -1:
        raise layer.config_error(f"num_axes must be >= -1 (-1: to the last axis), got {num_axes}")
    if num_axes >= 0 and bottom.num_axes < axis + num_axes:
        raise layer.shape_error(
            f"axis {axis} with num_axes {num_axes} runs past the bottom's shape {bottom.shape}"
        )
    return bottom.shape[axis:] if num_axes == -1 else bottom.shape[axis : axis + num_axes]


def _broadcast_dims(layer: Layer, bottom: Blob, axis: int, operand: Blob) -> tuple[int, int, int]:
    """(outer, operand count, inner): the view of bottom in which ``operand`` broadcasts
    along the middle axis. As in Caffe, a 0-axis (scalar) operand ignores ``axis``."""
    shape = operand.shape
    start = 0 if not shape else canonical_axis(layer, bottom, axis)
    if bottom.shape[start : start + len(shape)] != shape:
        raise layer.shape_error(
            f"operand of shape {shape} does not match the bottom's shape {bottom.shape} "
            f"from axis {start}"
        )
    return (
        math.prod(bottom.shape[:start]),
        operand.count,
        math.prod(bottom.shape[start + len(shape) :]),
    )


def _sum_to(xp: Any, array: Any, dims: tuple[int, int, int], shape: tuple[int, ...]) -> Any:
    """``array`` summed over the outer and inner axes of its ``dims`` view, as ``shape``."""
    return _channel_sums(xp, array.reshape(dims)).reshape(shape)


@register("Bias")
class BiasLayer(Layer):
    """y = x + b, b broadcast over bottom's axes ``axis`` … ``axis + num_axes − 1``.

    With one bottom, b is a learned blob of bottom's shape over those axes (``num_axes``
    −1: through the last axis), filled by ``bias_param.filler`` (default constant 0). With
    two bottoms, b is bottom[1], whose shape must equal bottom[0]'s from ``axis``; its
    gradient is the sum of the top diff over the other axes.
    """

    bottoms = (1, 2)
    tops = (1, 1)
    reshape_follows_shapes = True

    def setup(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        param = self.layer_param.bias_param
        if len(bottom) == 1 and not self.blobs:
            shape = _param_shape(self, bottom[0], param.axis, param.num_axes)
            self.blobs.append(self.make_blob(shape, param.filler))

    def reshape(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        self._bias = bottom[1] if len(bottom) > 1 else self.blobs[0]
        self._dims = _broadcast_dims(self, bottom[0], self.layer_param.bias_param.axis, self._bias)
        top[0].reshape(bottom[0].shape)

    def forward(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        x = bottom[0].data.reshape(self._dims)
        y = x if top[0] is bottom[0] else top[0].data.reshape(self._dims)
        bias = self._bias.data.reshape(-1)
        if _jit.usable(x, y, bias):
            norm_kernels.channel_affine(x, self.xp.ones_like(bias), bias, y)
        else:
            self.xp.add(x, bias[:, None], out=y)

    def backward(
        self, top: Sequence[Blob], propagate_down: Sequence[bool], bottom: Sequence[Blob]
    ) -> None:
        xp = self.xp
        dy = top[0].diff
        if len(bottom) == 1:
            if self.param_propagate_down[0]:
                self.blobs[0].diff += _sum_to(xp, dy, self._dims, self.blobs[0].shape)
        elif propagate_down[1]:
            bottom[1].diff[...] = _sum_to(xp, dy, self._dims, bottom[1].shape)
        # In place, the bottom diff already is the top diff.
        if propagate_down[0] and top[0] is not bottom[0]:
            xp.copyto(bottom[0].diff, dy)


@register("Scale")
class ScaleLayer(Layer):
    """y = x·s (+ b), s broadcast over bottom's axes ``axis`` … ``axis + num_axes − 1``.

    With one bottom, s is a learned blob of bottom's shape over those axes (``num_axes``
    −1: through the last axis), filled by ``scale_param.filler`` (default constant 1). With
    two bottoms, s is bottom[1], whose shape must equal bottom[0]'s from ``axis``; a
    0-axis s scales everything. ``bias_term`` adds a learned bias b, the last parameter
    blob, of the same axes (bottom[1]'s axes count in the two-bottom form), filled by
    ``bias_filler`` (default constant 0), as Caffe's internal Bias layer does.

    Gradients: ds = Σ dy·x and db = Σ dy over the other axes (added to learned blobs,
    written to bottom[1]); dx = dy·s. In place, forward keeps x for ds, as Caffe does.
    """

    bottoms = (1, 2)
    tops = (1, 1)
    reshape_follows_shapes = True

    def setup(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        param = self.layer_param.scale_param
        if len(bottom) == 1 and not self.blobs:
            shape = _param_shape(self, bottom[0], param.axis, param.num_axes)
            filler = filler_or(param, "filler", type="constant", value=1)
            self.blobs.append(self.make_blob(shape, filler))
        if param.bias_term and len(self.blobs) + len(bottom) < 3:
            num_axes = bottom[1].num_axes if len(bottom) > 1 else param.num_axes
            shape = _param_shape(self, bottom[0], param.axis, num_axes)
            self.blobs.append(self.make_blob(shape, param.bias_filler))
        expected = (len(bottom) == 1) + param.bias_term
        if len(self.blobs) != expected:
            raise self.config_error(
                f"has {len(self.blobs)} parameter blobs but {len(bottom)} bottom(s) and "
                f"bias_term {param.bias_term} need {expected}: the weights do not match"
            )
        self._x: Any = None
        self._x_kept: Any = None

    def reshape(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        param = self.layer_param.scale_param
        self._scale = bottom[1] if len(bottom) > 1 else self.blobs[0]
        self._dims = _broadcast_dims(self, bottom[0], param.axis, self._scale)
        self._bias_dims = None
        if param.bias_term:
            self._bias_dims = _broadcast_dims(self, bottom[0], param.axis, self.blobs[-1])
        # The kernels take the bias per channel of the scale's view: they apply unless
        # loaded weights lay the bias out otherwise.
        self._fused = self._bias_dims in (None, self._dims)
        top[0].reshape(bottom[0].shape)

    def forward(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        xp = self.xp
        x = bottom[0].data.reshape(self._dims)
        y = x if top[0] is bottom[0] else top[0].data.reshape(self._dims)
        scale = self._scale.data.reshape(-1)
        bias = self.blobs[-1].data.reshape(-1) if self._bias_dims else None
        self._x = kept = None
        if top[0] is bottom[0]:
            self._x = self.kept_buffer(bottom[0])
            kept = self._x.reshape(self._dims)
        shift = xp.zeros_like(scale) if bias is None else bias
        operands = (x, y, scale, shift) + ((kept,) if kept is not None else ())
        if self._fused and _jit.usable(*operands):
            norm_kernels.channel_affine(x, scale, shift, y, kept)
            return
        if kept is not None:
            xp.copyto(kept, x)
        # Written into the top, one pass per operation and no temporaries.
        xp.multiply(x, scale[:, None], out=y)
        if bias is not None:
            y = top[0].data.reshape(self._bias_dims)
            y += bias[:, None]

    def kept_buffer(self, bottom: Blob) -> Any:
        """In place, the scale's gradient needs the bottom as it was: kept in this buffer
        (``self._x`` once written), reused across passes."""
        kept = self._x_kept
        if kept is None or type(kept) is not type(bottom.data) or kept.shape != bottom.shape:
            kept = self._x_kept = self.xp.empty_like(bottom.data)
        return kept

    def backward(
        self, top: Sequence[Blob], propagate_down: Sequence[bool], bottom: Sequence[Blob]
    ) -> None:
        xp = self.xp
        dy = top[0].diff.reshape(self._dims)
        x = (bottom[0].data if self._x is None else self._x).reshape(self._dims)
        dx = None
        if propagate_down[0]:
            dx = dy if top[0] is bottom[0] else bottom[0].diff.reshape(self._dims)
        scale = self._scale.data.reshape(-1)
        learned = len(bottom) == 1
        want_scale = self.param_propagate_down[0] if learned else propagate_down[1]
        want_bias = self._bias_dims is not None and self.param_propagate_down[-1]
        operands = (dy, x, scale) + ((dx,) if dx is not None else ())
        if self._fused and (want_scale or want_bias) and _jit.usable(*operands):
            sums = norm_kernels.scale_backward(dy, x, scale, dx)
            scale_diff, bias_diff = sums[:, 0], sums[:, 1]
        else:
            # Every gradient that reads dy comes before the bottom diff: in place, they
            # share memory.
            bias_diff = _channel_sums(xp, dy.reshape(self._bias_dims)) if want_bias else None
            scale_diff = _channel_dots(xp, dy, x) if want_scale else None
            if dx is not None:
                if _jit.usable(dy, dx, scale):
                    norm_kernels.channel_affine(dy, scale, xp.zeros_like(scale), dx)
                else:
                    xp.multiply(dy, scale[:, None], out=dx)
        if want_bias:
            bias = self.blobs[-1]
            bias.diff += bias_diff.reshape(bias.shape)
        if want_scale and learned:
            self.blobs[0].diff += scale_diff.reshape(self.blobs[0].shape)
        elif want_scale:
            bottom[1].diff[...] = scale_diff.reshape(bottom[1].shape)
