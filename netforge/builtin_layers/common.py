"""Common layers that compute: InnerProduct, Embed, Softmax, Eltwise, Reduction, ArgMax,
and the resizing layers of popular forks, Upsample (nearest; YOLOv3/SegNet) and Interp
(bilinear with aligned corners; DeepLab/PSPNet), whose parameters are netforge's schema
additions.

Each layer computes what BVLC Caffe's (or the fork's) layer of the same type computes:
forward values, gradients, output shapes and the checks that reject a bad configuration.
The layers that only move data are in ``netforge/layers/utility.py``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from netforge._blas import matmul_into
from netforge.blob import Blob
from netforge.errors import DataError
from netforge.filler import filler_or
from netforge.layer import Layer, register
from netforge.proto import pb


# -- helpers ---------------------------------------------------------------------------------
def canonical_axis(layer: Layer, blob: Blob, axis: int) -> int:
    """Caffe's CanonicalAxisIndex, with an error that names the layer."""
    n = blob.num_axes
    if not -n <= axis < n:
        raise layer.shape_error(f"axis {axis} is out of range for a bottom of shape {blob.shape}")
    return axis % n


def legacy_axis(layer: Layer, message: Any, legacy: str, bottom: Blob) -> int:
    """``axis`` or its deprecated alias (``concat_dim``/``slice_dim``, no negative values)."""
    if message.HasField(legacy):
        if message.HasField("axis"):
            raise layer.config_error(f"give either axis or {legacy}, not both")
        value = getattr(message, legacy)
        if value >= bottom.num_axes:
            raise layer.shape_error(f"{legacy} {value} is out of range for shape {bottom.shape}")
        return value
    return canonical_axis(layer, bottom, message.axis)


def _check_param_shapes(layer: Layer, shapes: Sequence[tuple[int, ...]]) -> None:
    """Loaded parameter blobs must have the shapes the layer's parameters imply."""
    if len(layer.blobs) != len(shapes):
        raise layer.shape_error(f"expects {len(shapes)} parameter blobs, has {len(layer.blobs)}")
    for i, (blob, shape) in enumerate(zip(layer.blobs, shapes)):
        if blob.shape != tuple(shape):
            raise layer.shape_error(
                f"parameter blob {i} has shape {blob.shape}, the layer's parameters need {shape}"
            )


def _weight_and_bias(layer: Layer, param: Any, weight_shape: tuple[int, ...], bias: int) -> None:
    """Create the weight (``weight_filler``) and, when ``param.bias_term``, the ``(bias,)``
    bias (``bias_filler``), or check the shapes of loaded ones (InnerProduct, Embed)."""
    shapes = [weight_shape] + ([(bias,)] if param.bias_term else [])
    if layer.blobs:
        _check_param_shapes(layer, shapes)
        return
    for shape, filler in zip(shapes, ("weight_filler", "bias_filler")):
        layer.blobs.append(layer.make_blob(shape, filler_or(param, filler)))


def _largest_magnitude(a: Any) -> float:
    """max |a| as a Python float (0 for an empty array): NaN if ``a`` holds a NaN."""
    return float(np.abs(a).max()) if a.size else 0.0


def check_no_in_place(layer: Layer, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
    """Raise a ConfigError when a top is also a bottom (layers that forbid in-place)."""
    if any(t is b for t in top for b in bottom):
        raise layer.config_error("this layer does not allow in-place computation")


# -- InnerProduct, Embed -----------------------------------------------------------------------
@register("InnerProduct")
class InnerProductLayer(Layer):
    """Fully connected: ``y = x W^T + b`` over ``x`` flattened from ``axis`` (Caffe's layout).

    The weight is ``(num_output, K)``, or ``(K, num_output)`` with ``transpose``; the leading
    axes ``[0, axis)`` are kept and form the rows of one GEMM.

    On numpy, backward reports ``diff_bounds`` for the weight and bias gradients from the
    largest magnitudes of the top gradient and the bottom, which it reads in a fraction of
    the time reading the weight gradient takes (CaffeNet's fc6: 0.4 M elements against
    38 M), so the solver's finiteness check skips the largest diffs of a classifier. It
    writes its gradients over stale diffs (``overwrites_param_diffs``): the weight GEMM
    then runs with beta = 0 and never reads the old diff.
    """

    bottoms = (1, 1)
    tops = (1, 1)
    reshape_follows_shapes = True
    overwrites_param_diffs = True

    def setup(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        p = self.layer_param.inner_product_param
        if p.num_output < 1:
            raise self.config_error("inner_product_param.num_output must be positive")
        self.num_output = p.num_output
        self.bias_term = p.bias_term
        self.transpose = p.transpose
        self.axis = canonical_axis(self, bottom[0], p.axis)
        self.k = math.prod(bottom[0].shape[self.axis :])
        n, k = self.num_output, self.k
        _weight_and_bias(self, p, (k, n) if self.transpose else (n, k), n)

    def reshape(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        shape = bottom[0].shape
        axis = canonical_axis(self, bottom[0], self.layer_param.inner_product_param.axis)
        if math.prod(shape[axis:]) != self.k:
            raise self.shape_error(
                f"input size incompatible with inner product parameters: bottom {shape} "
                f"flattens to {math.prod(shape[axis:])} values from axis {axis}, the weights "
                f"take {self.k}"
            )
        self.m = math.prod(shape[:axis])
        top[0].reshape(shape[:axis] + (self.num_output,))

    def forward(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        xp = self.xp
        x = bottom[0].data.reshape(self.m, self.k)
        w = self.blobs[0].data
        y = top[0].data.reshape(self.m, self.num_output)
        # One GEMM straight into the top's buffer; a transposed view costs BLAS nothing.
        xp.matmul(x, w if self.transpose else w.T, out=y)
        if self.bias_term:
            y += self.blobs[1].data

    def backward(
        self, top: Sequence[Blob], propagate_down: Sequence[bool], bottom: Sequence[Blob]
    ) -> None:
        dy = top[0].diff.reshape(self.m, self.num_output)
        x = bottom[0].data.reshape(self.m, self.k)
        grads = self.param_propagate_down or [False] * len(self.blobs)
        stale = self.stale_param_diffs or [False] * len(self.blobs)
        if grads[0]:
            # One GEMM into the diff: Caffe's beta = 1 accumulation, or beta = 0 over a
            # stale diff.
            a, b = (x.T, dy) if self.transpose else (dy.T, x)
            matmul_into(a, b, self.blobs[0].diff, accumulate=not stale[0])
        if self.bias_term and grads[1]:
            if stale[1]:
                dy.sum(axis=0, out=self.blobs[1].diff)
            else:
                self.blobs[1].diff += dy.sum(axis=0)
        if self.xp is np:  # on a GPU the bounds would cost a host sync each
            # A weight gradient element sums m products dy·x, a bias one m values of dy;
            # rounding grows the magnitude of such a sum by at most (1 + eps)^(m + 1).
            terms = self.m * (1.0 + float(np.finfo(dy.dtype).eps)) ** (self.m + 1)
            bias = terms * _largest_magnitude(dy)
            self.diff_bounds = [bias * _largest_magnitude(x) if grads[0] else 0.0]
            if self.bias_term:
                self.diff_bounds.append(bias if grads[1] else 0.0)
        if propagate_down[0]:
            w = self.blobs[0].data
            dx = bottom[0].diff.reshape(self.m, self.k)
            self.xp.matmul(dy, w.T if self.transpose else w, out=dx)


@register("Embed")
class EmbedLayer(Layer):
    """A lookup table: ``y[..., :] = W[x[...]] + b`` for integer indices stored as floats.

    Weight ``(input_dim, num_output)``; the top appends a ``num_output`` axis to the bottom's
    shape. Gradients reach the weights and bias only (Caffe cannot differentiate indices); an
    index that is not an integer in ``[0, input_dim)`` is a DataError, where Caffe checks
    only in debug builds.
    """

    bottoms = (1, 1)
    tops = (1, 1)

    def setup(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        p = self.layer_param.embed_param
        if p.num_output < 1:
            raise self.config_error("embed_param.num_output must be positive")
        if p.input_dim < 1:
            raise self.config_error("embed_param.input_dim must be positive")
        self.num_output, self.input_dim, self.bias_term = p.num_output, p.input_dim, p.bias_term
        _weight_and_bias(self, p, (p.input_dim, p.num_output), p.num_output)

    def allow_force_backward(self, bottom_index: int) -> bool:
        return False

    def reshape(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        top[0].reshape(bottom[0].shape + (self.num_output,))

    def _indices(self, bottom: Blob) -> Any:
        values = bottom.data.reshape(-1)
        index = values.astype(np.int64)
        bad = (index != values) | (index < 0) | (index >= self.input_dim)
        if bool(bad.any()):
            raise DataError(
                f"layer {self.name!r} (Embed): bottom {bottom.name!r} holds "
                f"{float(values[bad][0])}, not an integer index in [0, {self.input_dim})"
            )
        return index

    def forward(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        y = top[0].data.reshape(-1, self.num_output)
        self.xp.take(self.blobs[0].data, self._indices(bottom[0]), axis=0, out=y)
        if self.bias_term:
            y += self.blobs[1].data

    def backward(
        self, top: Sequence[Blob], propagate_down: Sequence[bool], bottom: Sequence[Blob]
    ) -> None:
        if propagate_down[0]:
            raise self.config_error("cannot backpropagate to the Embed layer's index input")
        dy = top[0].diff.reshape(-1, self.num_output)
        grads = self.param_propagate_down or [False] * len(self.blobs)
        if grads[0]:
            # Repeated indices must add up: an unbuffered scatter-add.
            self.xp.add.at(self.blobs[0].diff, self._indices(bottom[0]), dy)
        if self.bias_term and grads[1]:
            self.blobs[1].diff += dy.sum(axis=0)


# -- Softmax -------------------------------------------------------------------------------
@register("Softmax")
class SoftmaxLayer(Layer):
    """``y = exp(x - max) / sum(exp(x - max))`` along ``axis`` (default 1); may run in place."""

    bottoms = (1, 1)
    tops = (1, 1)
    reshape_follows_shapes = True

    def reshape(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        self.axis = canonical_axis(self, bottom[0], self.layer_param.softmax_param.axis)
        top[0].reshape(bottom[0].shape)

    def forward(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        xp = self.xp
        x = bottom[0].data
        peak = x.max(axis=self.axis, keepdims=True)
        y = top[0].data  # may be x itself (in place): the max is taken already
        xp.subtract(x, peak, out=y)
        xp.exp(y, out=y)
        y /= y.sum(axis=self.axis, keepdims=True)

    def backward(
        self, top: Sequence[Blob], propagate_down: Sequence[bool], bottom: Sequence[Blob]
    ) -> None:
        if not propagate_down[0]:
            return
        y, dy = top[0].data, top[0].diff
        dot = (dy * y).sum(axis=self.axis, keepdims=True)
        dx = bottom[0].diff
        self.xp.subtract(dy, dot, out=dx)
        dx *= y


# -- Eltwise ----------------------------------------------------------------------------------
@register("Eltwise")
class EltwiseLayer(Layer):
    """PROD, SUM (with one ``coeff`` per bottom) or MAX of equally shaped bottoms.

    MAX keeps Caffe's argmax mask: between the first two bottoms a tie goes to the second,
    after that a later bottom wins only when strictly greater; backward routes the top's
    diff to the winner. PROD's gradient is the product of the other bottoms
    (``stable_prod_grad``, the default) or ``top / bottom``.
    """

    bottoms = (2, None)
    tops = (1, 1)
    reshape_follows_shapes = True

    def setup(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        p = self.layer_param.eltwise_param
        if p.coeff and len(p.coeff) != len(bottom):
            raise self.config_error("Eltwise takes one coeff per bottom blob")
        if p.operation == pb.EltwiseParameter.PROD and p.coeff:
            raise self.config_error("Eltwise only takes coefficients for SUM")
        self.op = p.operation
        self.coeffs = list(p.coeff) or [1.0] * len(bottom)
        self.stable_prod_grad = p.stable_prod_grad

    def reshape(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        for i, b in enumerate(bottom[1:], 1):
            if b.shape != bottom[0].shape:
                raise self.shape_error(
                    f"bottom 0 has shape {bottom[0].shape} but bottom {i} has {b.shape}"
                )
        top[0].reshape(bottom[0].shape)

    def forward(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        xp = self.xp
        in_place = any(top[0] is b for b in bottom)
        out = xp.empty_like(bottom[0].data) if in_place else top[0].data
        data = [b.data for b in bottom]
        if self.op == pb.EltwiseParameter.PROD:
            xp.multiply(data[0], data[1], out=out)
            for d in data[2:]:
                out *= d
        elif self.op == pb.EltwiseParameter.SUM:
            # Unit coefficients (ResNet's shortcuts) add the bottoms without a temporary.
            terms = [d if c == 1 else c * d for c, d in zip(self.coeffs, data)]
            xp.add(terms[0], terms[1], out=out)
            for term in terms[2:]:
                out += term
        else:
            self.mask = xp.where(data[0] > data[1], 0, 1).astype(np.int32)
            xp.maximum(data[0], data[1], out=out)
            for i, d in enumerate(data[2:], 2):
                wins = d > out
                self.mask[wins] = i
                xp.maximum(out, d, out=out)
        if in_place:
            top[0].data[...] = out

    def backward(
        self, top: Sequence[Blob], propagate_down: Sequence[bool], bottom: Sequence[Blob]
    ) -> None:
        xp = self.xp
        dy = top[0].diff
        for i, b in enumerate(bottom):
            if not propagate_down[i]:
                continue
            if self.op == pb.EltwiseParameter.PROD:
                if self.stable_prod_grad:
                    others = [o.data for j, o in enumerate(bottom) if j != i]
                    grad = others[0].copy()
                    for o in others[1:]:
                        grad *= o
                else:
                    grad = top[0].data / b.data
                b.diff[...] = grad * dy
            elif self.op == pb.EltwiseParameter.SUM:
                b.diff[...] = dy if self.coeffs[i] == 1 else self.coeffs[i] * dy
            else:
                b.diff[...] = xp.where(self.mask == i, dy, 0)


# -- reductions ----------------------------------------------------------------------------
@register("Reduction")
class ReductionLayer(Layer):
    """Reduces all axes from ``axis`` on: SUM, ASUM (Σ|x|), SUMSQ (Σx²) or MEAN, times coeff.

    The top keeps the axes before ``axis`` (``axis: 0`` gives a scalar top).
    """

    bottoms = (1, 1)
    tops = (1, 1)

    def reshape(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        shape = bottom[0].shape
        axis = canonical_axis(self, bottom[0], self.layer_param.reduction_param.axis)
        self.num, self.dim = math.prod(shape[:axis]), math.prod(shape[axis:])
        top[0].reshape(shape[:axis])

    @property
    def _coeff(self) -> float:
        p = self.layer_param.reduction_param
        return p.coeff / self.dim if p.operation == pb.ReductionParameter.MEAN else p.coeff

    def forward(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        op = self.layer_param.reduction_param.operation
        x = bottom[0].data.reshape(self.num, self.dim)
        if op == pb.ReductionParameter.ASUM:
            x = self.xp.abs(x)
        elif op == pb.ReductionParameter.SUMSQ:
            x = x * x
        y = top[0].data.reshape(self.num)
        x.sum(axis=1, out=y)
        y *= self._coeff

    def backward(
        self, top: Sequence[Blob], propagate_down: Sequence[bool], bottom: Sequence[Blob]
    ) -> None:
        if not propagate_down[0]:
            return
        op = self.layer_param.reduction_param.operation
        x = bottom[0].data.reshape(self.num, self.dim)
        scale = top[0].diff.reshape(self.num, 1) * self._coeff
        dx = bottom[0].diff.reshape(self.num, self.dim)
        if op == pb.ReductionParameter.ASUM:
            self.xp.multiply(self.xp.sign(x), scale, out=dx)
        elif op == pb.ReductionParameter.SUMSQ:
            self.xp.multiply(x, 2 * scale, out=dx)
        else:
            dx[...] = scale


@register("ArgMax")
class ArgMaxLayer(Layer):
    """Indices (or values, ``out_max_val``) of the ``top_k`` largest entries.

    With ``axis`` the top is the bottom with that axis cut to ``top_k``. Without it each
    item (axis 0) is searched whole, and the top is ``(N, 1, top_k)`` (or ``(N, 2, top_k)``:
    indices then values, with ``out_max_val``), padded with 1s to the bottom's axis count.
    Ties go to the larger index, as Caffe's descending sort of (value, index) pairs does.
    Not differentiable.
    """

    bottoms = (1, 1)
    tops = (1, 1)

    def setup(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        p = self.layer_param.argmax_param
        if p.top_k < 1:
            raise self.config_error("argmax_param.top_k must be at least 1")
        self.has_axis = p.HasField("axis")

    def reshape(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        p = self.layer_param.argmax_param
        shape = bottom[0].shape
        if self.has_axis:
            self.axis = canonical_axis(self, bottom[0], p.axis)
            if p.top_k > shape[self.axis]:
                raise self.shape_error(
                    f"top_k {p.top_k} exceeds the size {shape[self.axis]} of axis {self.axis}"
                )
            out = list(shape)
            out[self.axis] = p.top_k
        else:
            if p.top_k > math.prod(shape[1:]):
                raise self.shape_error(
                    f"top_k {p.top_k} exceeds the {math.prod(shape[1:])} values per item"
                )
            out = [1] * max(len(shape), 3)
            out[0], out[1], out[2] = shape[0], 2 if p.out_max_val else 1, p.top_k
        top[0].reshape(out)

    def _top_k(self, x: Any, k: int) -> tuple[Any, Any]:
        """Indices and values of the k largest along the last axis, larger index on ties."""
        xp = self.xp
        dim = x.shape[-1]
        order = xp.argsort(-x[..., ::-1], axis=-1, kind="stable")[..., :k]
        index = dim - 1 - order
        return index, xp.take_along_axis(x, index, axis=-1)

    def forward(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        xp = self.xp
        p = self.layer_param.argmax_param
        x = bottom[0].data
        y = top[0].data
        if self.has_axis:
            index, value = self._top_k(xp.moveaxis(x, self.axis, -1), p.top_k)
            y[...] = xp.moveaxis(value if p.out_max_val else index, -1, self.axis)
            return
        index, value = self._top_k(x.reshape(x.shape[0], -1), p.top_k)
        rows = xp.stack([index, value], axis=1) if p.out_max_val else index[:, None]
        y[...] = rows.reshape(y.shape)


# -- resizing (fork layers) --------------------------------------------------------------------
def _check_4d(layer: Layer, bottom: Blob) -> None:
    if bottom.num_axes != 4:
        raise layer.shape_error(f"needs a 4-D (N, C, H, W) bottom, got shape {bottom.shape}")


@register("Upsample")
class UpsampleLayer(Layer):
    """Nearest-neighbour upsampling of (N, C, H, W): ``top[y, x] = bottom[y // sh, x // sw]``.

    The factors are ``scale_h``/``scale_w`` or ``scale`` (default 2). The output is
    ``H·sh - pad_out_h`` by ``W·sw - pad_out_w``, or ``upsample_h`` by ``upsample_w`` when
    given (the factor then defaults to ``ceil(upsample_h / H)``). Backward sums each block.
    """

    bottoms = (1, 1)
    tops = (1, 1)

    def setup(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        check_no_in_place(self, bottom, top)
        p = self.layer_param.upsample_param
        if p.HasField("upsample_h") != p.HasField("upsample_w"):
            raise self.config_error("give both upsample_h and upsample_w, or neither")
        if p.HasField("scale_h") != p.HasField("scale_w"):
            raise self.config_error("give both scale_h and scale_w, or neither")

    def _factor(self, size: int, scale_field: str, out_field: str) -> int:
        p = self.layer_param.upsample_param
        if p.HasField(scale_field):
            return getattr(p, scale_field)
        if p.HasField(out_field) and not p.HasField("scale"):
            return -(-getattr(p, out_field) // size)
        return p.scale

    def reshape(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        _check_4d(self, bottom[0])
        p = self.layer_param.upsample_param
        n, c, h, w = bottom[0].shape
        self.sh = self._factor(h, "scale_h", "upsample_h")
        self.sw = self._factor(w, "scale_w", "upsample_w")
        if self.sh < 1 or self.sw < 1:
            raise self.config_error("upsample scale factors must be positive")
        oh = p.upsample_h if p.HasField("upsample_h") else h * self.sh - int(p.pad_out_h)
        ow = p.upsample_w if p.HasField("upsample_w") else w * self.sw - int(p.pad_out_w)
        if not ((h - 1) * self.sh < oh <= h * self.sh and (w - 1) * self.sw < ow <= w * self.sw):
            raise self.shape_error(
                f"output {oh}x{ow} does not fit input {h}x{w} at factors {self.sh}x{self.sw}"
            )
        self.full = (n, c, h, self.sh, w, self.sw)
        top[0].reshape(n, c, oh, ow)

    def forward(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        n, c, h, sh, w, sw = self.full
        blocks = self.xp.broadcast_to(bottom[0].data[:, :, :, None, :, None], self.full)
        oh, ow = top[0].shape[2:]
        if (oh, ow) == (h * sh, w * sw):
            top[0].data.reshape(self.full)[...] = blocks
        else:
            top[0].data[...] = blocks.reshape(n, c, h * sh, w * sw)[:, :, :oh, :ow]

    def backward(
        self, top: Sequence[Blob], propagate_down: Sequence[bool], bottom: Sequence[Blob]
    ) -> None:
        if not propagate_down[0]:
            return
        n, c, h, sh, w, sw = self.full
        oh, ow = top[0].shape[2:]
        dy = top[0].diff
        if (oh, ow) != (h * sh, w * sw):
            padded = self.xp.zeros((n, c, h * sh, w * sw), dtype=dy.dtype)
            padded[:, :, :oh, :ow] = dy
            dy = padded
        dy.reshape(self.full).sum(axis=(3, 5), out=bottom[0].diff)


@register("Interp")
class InterpLayer(Layer):
    """Bilinear resize of (N, C, H, W) with aligned corners (DeepLab/PSPNet's Interp).

    ``pad_beg``/``pad_end`` (<= 0) crop the input first. The output is ``height`` x
    ``width``, or from the cropped size: ``shrink_factor`` s gives ``(H-1)//s + 1``,
    ``zoom_factor`` z gives ``H + (H-1)(z-1)``, both apply shrink then zoom. Output pixel
    ``i`` samples input ``i·(H_in-1)/(H_out-1)``, computed in float32 as the fork does. The
    resize is two small interpolation matrices, ``top = A_h · x · A_wᵀ``, so forward and
    backward are batched GEMMs.
    """

    bottoms = (1, 1)
    tops = (1, 1)

    def setup(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        p = self.layer_param.interp_param
        if p.pad_beg > 0 or p.pad_end > 0:
            raise self.config_error("pad_beg and pad_end must be <= 0 (only cropping)")
        sized = p.HasField("height") and p.HasField("width")
        if not (p.HasField("zoom_factor") or p.HasField("shrink_factor") or sized):
            raise self.config_error("give zoom_factor, shrink_factor, or height and width")
        if p.zoom_factor < 1 or p.shrink_factor < 1:
            raise self.config_error("zoom_factor and shrink_factor must be positive")

    def _out_size(self, size: int) -> int:
        p = self.layer_param.interp_param
        zoom, shrink = p.HasField("zoom_factor"), p.HasField("shrink_factor")
        if shrink:
            size = (size - 1) // p.shrink_factor + 1
        if zoom:
            size = size + (size - 1) * (p.zoom_factor - 1)
        return size

    def reshape(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        _check_4d(self, bottom[0])
        p = self.layer_param.interp_param
        n, c, h, w = bottom[0].shape
        h_eff, w_eff = h + p.pad_beg + p.pad_end, w + p.pad_beg + p.pad_end
        if p.HasField("zoom_factor") or p.HasField("shrink_factor"):
            oh, ow = self._out_size(h_eff), self._out_size(w_eff)
        else:
            oh, ow = p.height, p.width
        if min(h_eff, w_eff, oh, ow) <= 0:
            raise self.shape_error(
                f"input {h}x{w} cropped to {h_eff}x{w_eff} gives output {oh}x{ow}; "
                "all sizes must be positive"
            )
        self.a_h = self._matrix(h, h_eff, oh, -p.pad_beg)
        self.a_w = self._matrix(w, w_eff, ow, -p.pad_beg)
        top[0].reshape(n, c, oh, ow)

    def _matrix(self, size: int, size_eff: int, out: int, offset: int) -> Any:
        """(out, size) weights: row i mixes the two input pixels around its sample point."""
        # float32 arithmetic throughout, as the fork's kernel: the weights match it bit for bit.
        ratio = np.float32(size_eff - 1) / np.float32(out - 1) if out > 1 else np.float32(0)
        pos = ratio * np.arange(out, dtype=np.float32)
        low = pos.astype(np.int64)
        frac = (pos - low).astype(self.dtype)
        step = (low < size_eff - 1).astype(np.int64)
        matrix = np.zeros((out, size), dtype=self.dtype)
        rows = np.arange(out)
        np.add.at(matrix, (rows, offset + low), 1 - frac)
        np.add.at(matrix, (rows, offset + low + step), frac)
        return self.backend.asarray(matrix)

    def forward(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        xp = self.xp
        xp.matmul(self.a_h, bottom[0].data @ self.a_w.T, out=top[0].data)

    def backward(
        self, top: Sequence[Blob], propagate_down: Sequence[bool], bottom: Sequence[Blob]
    ) -> None:
        if propagate_down[0]:
            xp = self.xp
            xp.matmul(self.a_h.T, top[0].diff @ self.a_w, out=bottom[0].diff)
