"""Common and utility layers: InnerProduct, Embed, Softmax and the layers that move data.

Each layer computes what BVLC Caffe's layer of the same type computes (forward values,
gradients, output shapes and the checks that reject a bad configuration). Layers that only
re-view their bottom (Flatten, Reshape, Split, a one-blob Concat/Slice, an identity
Permute) share the bottom's data in forward and hand their top's diff back as the bottom's
diff in backward, as Caffe's ShareData/ShareDiff do. Beyond BVLC come three layers of
popular forks: Permute (SSD), Upsample (nearest; YOLOv3/SegNet forks) and Interp (bilinear
with aligned corners; DeepLab/PSPNet), whose parameters are netforge's schema additions.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from netforge.blob import Blob
from netforge.errors import DataError
from netforge.filler import filler_or
from netforge.layer import Layer, register
from netforge.proto import pb


# -- helpers ---------------------------------------------------------------------------------
def _axis(layer: Layer, blob: Blob, axis: int) -> int:
    """Caffe's CanonicalAxisIndex, with an error that names the layer."""
    n = blob.num_axes
    if not -n <= axis < n:
        raise layer.shape_error(f"axis {axis} is out of range for a bottom of shape {blob.shape}")
    return axis % n


def _legacy_axis(layer: Layer, message: Any, legacy: str, bottom: Blob) -> int:
    """``axis`` or its deprecated alias (``concat_dim``/``slice_dim``, no negative values)."""
    if message.HasField(legacy):
        if message.HasField("axis"):
            raise layer.config_error(f"give either axis or {legacy}, not both")
        value = getattr(message, legacy)
        if value >= bottom.num_axes:
            raise layer.shape_error(f"{legacy} {value} is out of range for shape {bottom.shape}")
        return value
    return _axis(layer, bottom, message.axis)


def _check_param_shapes(layer: Layer, shapes: Sequence[tuple[int, ...]]) -> None:
    """Loaded parameter blobs must have the shapes the layer's parameters imply."""
    if len(layer.blobs) != len(shapes):
        raise layer.shape_error(f"expects {len(shapes)} parameter blobs, has {len(layer.blobs)}")
    for i, (blob, shape) in enumerate(zip(layer.blobs, shapes)):
        if blob.shape != tuple(shape):
            raise layer.shape_error(
                f"parameter blob {i} has shape {blob.shape}, the layer's parameters need {shape}"
            )


def _parts(array: Any, axis: int, sizes: Sequence[int]) -> list[Any]:
    """Consecutive views of ``array`` along ``axis`` with the given sizes (Concat, Slice)."""
    offsets = np.cumsum([0, *sizes])
    lead = (slice(None),) * axis
    return [array[lead + (slice(a, b),)] for a, b in zip(offsets[:-1], offsets[1:])]


def _no_in_place(layer: Layer, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
    if any(t is b for t in top for b in bottom):
        raise layer.config_error("this layer does not allow in-place computation")


class _SharingLayer(Layer):
    """A layer whose one top is its one bottom under another shape (Caffe's ShareData)."""

    bottoms = (1, 1)
    tops = (1, 1)

    def setup(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        _no_in_place(self, bottom, top)

    def forward(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        top[0].share_data(bottom[0])

    def backward(
        self, top: Sequence[Blob], propagate_down: Sequence[bool], bottom: Sequence[Blob]
    ) -> None:
        if propagate_down[0]:
            bottom[0].share_diff(top[0])


# -- InnerProduct, Embed -----------------------------------------------------------------------
@register("InnerProduct")
class InnerProductLayer(Layer):
    """Fully connected: ``y = x W^T + b`` over ``x`` flattened from ``axis`` (Caffe's layout).

    The weight is ``(num_output, K)``, or ``(K, num_output)`` with ``transpose``; the leading
    axes ``[0, axis)`` are kept and form the rows of one GEMM.
    """

    bottoms = (1, 1)
    tops = (1, 1)

    def setup(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        p = self.layer_param.inner_product_param
        if p.num_output < 1:
            raise self.config_error("inner_product_param.num_output must be positive")
        self.num_output = p.num_output
        self.bias_term = p.bias_term
        self.transpose = p.transpose
        self.axis = _axis(self, bottom[0], p.axis)
        self.k = math.prod(bottom[0].shape[self.axis :])
        n, k = self.num_output, self.k
        shapes = [(k, n) if self.transpose else (n, k)] + ([(n,)] if self.bias_term else [])
        if self.blobs:
            _check_param_shapes(self, shapes)
            return
        self.blobs.append(self.make_blob(shapes[0], filler_or(p, "weight_filler")))
        if self.bias_term:
            self.blobs.append(self.make_blob(shapes[1], filler_or(p, "bias_filler")))

    def reshape(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        shape = bottom[0].shape
        axis = _axis(self, bottom[0], self.layer_param.inner_product_param.axis)
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
        grads = self.param_propagate_down or [False] * len(self.blobs)
        if grads[0]:
            x = bottom[0].data.reshape(self.m, self.k)
            self.blobs[0].diff += x.T @ dy if self.transpose else dy.T @ x
        if self.bias_term and grads[1]:
            self.blobs[1].diff += dy.sum(axis=0)
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
        shapes = [(p.input_dim, p.num_output)] + ([(p.num_output,)] if p.bias_term else [])
        if self.blobs:
            _check_param_shapes(self, shapes)
            return
        self.blobs.append(self.make_blob(shapes[0], filler_or(p, "weight_filler")))
        if self.bias_term:
            self.blobs.append(self.make_blob(shapes[1], filler_or(p, "bias_filler")))

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

    def reshape(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        self.axis = _axis(self, bottom[0], self.layer_param.softmax_param.axis)
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


# -- element-wise and joining layers -----------------------------------------------------------
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


@register("Concat")
class ConcatLayer(Layer):
    """Joins bottoms along ``axis`` (or legacy ``concat_dim``); one bottom is passed through."""

    bottoms = (1, None)
    tops = (1, 1)

    def reshape(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        first = bottom[0]
        axis = _legacy_axis(self, self.layer_param.concat_param, "concat_dim", first)
        self.axis = axis
        for i, b in enumerate(bottom[1:], 1):
            same = b.num_axes == first.num_axes and all(
                d == e for j, (d, e) in enumerate(zip(b.shape, first.shape)) if j != axis
            )
            if not same:
                raise self.shape_error(
                    f"bottom {i} has shape {b.shape}, which differs from bottom 0's "
                    f"{first.shape} outside the concat axis {axis}"
                )
        self.sizes = [b.shape[axis] for b in bottom]
        shape = list(first.shape)
        shape[axis] = sum(self.sizes)
        top[0].reshape(shape)

    def forward(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        if len(bottom) == 1:
            top[0].share_data(bottom[0])
            return
        for part, b in zip(_parts(top[0].data, self.axis, self.sizes), bottom):
            part[...] = b.data

    def backward(
        self, top: Sequence[Blob], propagate_down: Sequence[bool], bottom: Sequence[Blob]
    ) -> None:
        if len(bottom) == 1:
            if propagate_down[0]:
                bottom[0].share_diff(top[0])
            return
        for part, b, down in zip(
            _parts(top[0].diff, self.axis, self.sizes), bottom, propagate_down
        ):
            if down:
                b.diff[...] = part


@register("Slice")
class SliceLayer(Layer):
    """Cuts the bottom along ``axis`` at ``slice_point``s, or into equal parts (Caffe's)."""

    bottoms = (1, 1)
    tops = (1, None)

    def reshape(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        p = self.layer_param.slice_param
        axis = _legacy_axis(self, p, "slice_dim", bottom[0])
        self.axis = axis
        dim = bottom[0].shape[axis]
        points = list(p.slice_point)
        if points:
            if len(points) != len(top) - 1:
                raise self.config_error(
                    f"{len(points)} slice_point(s) for {len(top)} tops; give one fewer than tops"
                )
            if any(b <= a for a, b in zip([0, *points], points)):
                raise self.config_error(f"slice_point {points} must be positive and increasing")
            if points[-1] >= dim:
                raise self.shape_error(
                    f"slice_point {points[-1]} leaves nothing for the last top: axis {axis} "
                    f"of {bottom[0].shape} has {dim}"
                )
            self.sizes = [b - a for a, b in zip([0, *points], [*points, dim])]
        else:
            if dim % len(top):
                raise self.shape_error(
                    f"axis {axis} of {bottom[0].shape} ({dim}) does not split into "
                    f"{len(top)} equal parts; give slice_point"
                )
            self.sizes = [dim // len(top)] * len(top)
        for t, size in zip(top, self.sizes):
            shape = list(bottom[0].shape)
            shape[axis] = size
            t.reshape(shape)

    def forward(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        if len(top) == 1:
            top[0].share_data(bottom[0])
            return
        for part, t in zip(_parts(bottom[0].data, self.axis, self.sizes), top):
            t.data[...] = part

    def backward(
        self, top: Sequence[Blob], propagate_down: Sequence[bool], bottom: Sequence[Blob]
    ) -> None:
        if not propagate_down[0]:
            return
        if len(top) == 1:
            bottom[0].share_diff(top[0])
            return
        for part, t in zip(_parts(bottom[0].diff, self.axis, self.sizes), top):
            part[...] = t.diff


@register("Split")
class SplitLayer(Layer):
    """One bottom read by several layers: tops share its data, backward sums their diffs.

    The net inserts it wherever a blob feeds more than one bottom (Caffe's InsertSplits).
    """

    bottoms = (1, 1)
    tops = (1, None)

    def setup(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        _no_in_place(self, bottom, top)

    def reshape(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        for t in top:
            t.reshape(bottom[0].shape)

    def forward(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        for t in top:
            t.share_data(bottom[0])

    def backward(
        self, top: Sequence[Blob], propagate_down: Sequence[bool], bottom: Sequence[Blob]
    ) -> None:
        if not propagate_down[0]:
            return
        dx = bottom[0].diff
        if len(top) == 1:
            dx[...] = top[0].diff
            return
        self.xp.add(top[0].diff, top[1].diff, out=dx)
        for t in top[2:]:
            dx += t.diff


@register("Silence")
class SilenceLayer(Layer):
    """Swallows its bottoms (so that they count as used); backward writes zero diffs."""

    bottoms = (1, None)
    tops = (0, 0)

    def reshape(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        """No tops."""

    def forward(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        """Nothing to compute."""

    def backward(
        self, top: Sequence[Blob], propagate_down: Sequence[bool], bottom: Sequence[Blob]
    ) -> None:
        for b, down in zip(bottom, propagate_down):
            if down:
                b.diff[...] = 0


# -- reshaping layers ------------------------------------------------------------------------
@register("Flatten")
class FlattenLayer(_SharingLayer):
    """Merges axes ``axis..end_axis`` (default 1..-1) into one; shares the bottom's data."""

    def reshape(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        p = self.layer_param.flatten_param
        shape = bottom[0].shape
        start, end = _axis(self, bottom[0], p.axis), _axis(self, bottom[0], p.end_axis)
        if end < start:
            raise self.config_error(f"flatten end_axis {p.end_axis} comes before axis {p.axis}")
        top[0].reshape(shape[:start] + (math.prod(shape[start : end + 1]),) + shape[end + 1 :])


@register("Reshape")
class ReshapeLayer(_SharingLayer):
    """Caffe's Reshape: ``shape`` replaces axes ``[axis, axis + num_axes)`` of the bottom.

    A 0 dimension copies the bottom's dimension at that position, one -1 is inferred from
    the count; ``axis`` may be negative (-1 = after the last axis), ``num_axes`` -1 = all.
    Shares the bottom's data.
    """

    def setup(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        super().setup(bottom, top)
        dims = [int(d) for d in self.layer_param.reshape_param.shape.dim]
        if dims.count(-1) > 1:
            raise self.config_error("new shape contains more than one -1 (at most one is inferred)")
        if any(d < -1 for d in dims):
            raise self.config_error(f"new shape {dims} has a dimension below -1")
        self.dims = dims

    def reshape(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        p = self.layer_param.reshape_param
        shape = bottom[0].shape
        n = len(shape)
        start = p.axis if p.axis >= 0 else n + p.axis + 1
        if not 0 <= start <= n:
            raise self.shape_error(f"reshape_param.axis {p.axis} is out of range for {shape}")
        if p.num_axes < -1:
            raise self.config_error("reshape_param.num_axes must be >= 0, or -1 for all")
        end = n if p.num_axes == -1 else start + p.num_axes
        if end > n:
            raise self.shape_error(f"axis + num_axes = {end} is out of range for {shape}")
        new = list(self.dims)
        for i, d in enumerate(new):
            if d == 0:
                if start + i >= n:
                    raise self.shape_error(
                        f"new shape has a 0 at position {i}, but {shape} has no axis "
                        f"{start + i} to copy"
                    )
                new[i] = shape[start + i]
        if -1 in new:
            known = math.prod(shape[:start]) * math.prod(shape[end:])
            known *= math.prod(d for d in new if d != -1)
            total = math.prod(shape)
            if known == 0 or total % known:
                raise self.shape_error(
                    f"bottom count {total} is not divisible by the product of the given "
                    f"dimensions ({known}) of shape {self.dims}"
                )
            new[new.index(-1)] = total // known
        out = shape[:start] + tuple(new) + shape[end:]
        if math.prod(out) != math.prod(shape):
            raise self.shape_error(
                f"output shape {out} has {math.prod(out)} values, the bottom {shape} has "
                f"{math.prod(shape)}"
            )
        top[0].reshape(out)


@register("Permute")
class PermuteLayer(_SharingLayer):
    """The SSD fork's Permute: ``top = transpose(bottom, order)``.

    ``order`` names the new order of the first axes; the axes it omits follow in their
    original order. An identity order shares the bottom's data, as in SSD.
    """

    def setup(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        super().setup(bottom, top)
        n = bottom[0].num_axes
        order = [int(o) for o in self.layer_param.permute_param.order]
        if any(o >= n for o in order):
            raise self.config_error(f"permute_param.order {order} names an axis >= {n}")
        if len(set(order)) != len(order):
            raise self.config_error(f"permute_param.order {order} repeats an axis")
        self.order = order + [i for i in range(n) if i not in order]
        self.inverse = list(np.argsort(self.order))
        self.identity = self.order == list(range(n))

    def reshape(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        if bottom[0].num_axes != len(self.order):
            raise self.shape_error(
                f"bottom has shape {bottom[0].shape}, but the layer was set up for "
                f"{len(self.order)} axes"
            )
        top[0].reshape(tuple(bottom[0].shape[i] for i in self.order))

    def forward(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        if self.identity:
            super().forward(bottom, top)
        else:
            top[0].data[...] = bottom[0].data.transpose(self.order)

    def backward(
        self, top: Sequence[Blob], propagate_down: Sequence[bool], bottom: Sequence[Blob]
    ) -> None:
        if self.identity:
            super().backward(top, propagate_down, bottom)
        elif propagate_down[0]:
            bottom[0].diff[...] = top[0].diff.transpose(self.inverse)


@register("Tile")
class TileLayer(Layer):
    """Repeats the bottom ``tiles`` times along ``axis``: blocks ``[x, x, ...]`` (Caffe's)."""

    bottoms = (1, 1)
    tops = (1, 1)

    def setup(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        if self.layer_param.tile_param.tiles < 1:
            raise self.config_error("tile_param.tiles must be positive")

    def reshape(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        p = self.layer_param.tile_param
        shape = bottom[0].shape
        axis = _axis(self, bottom[0], p.axis)
        self.outer, self.inner, self.tiles = (
            math.prod(shape[:axis]),
            math.prod(shape[axis:]),
            p.tiles,
        )
        top[0].reshape(shape[:axis] + (shape[axis] * p.tiles,) + shape[axis + 1 :])

    def forward(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        y = top[0].data.reshape(self.outer, self.tiles, self.inner)
        y[...] = bottom[0].data.reshape(self.outer, 1, self.inner)

    def backward(
        self, top: Sequence[Blob], propagate_down: Sequence[bool], bottom: Sequence[Blob]
    ) -> None:
        if propagate_down[0]:
            dy = top[0].diff.reshape(self.outer, self.tiles, self.inner)
            dy.sum(axis=1, out=bottom[0].diff.reshape(self.outer, self.inner))


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
        axis = _axis(self, bottom[0], self.layer_param.reduction_param.axis)
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
            self.axis = _axis(self, bottom[0], p.axis)
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


# -- selection layers -------------------------------------------------------------------------
@register("Filter")
class FilterLayer(Layer):
    """Keeps the items (axis 0) whose selector (the last bottom) is non-zero.

    Tops ``i`` are bottoms ``i`` restricted to those items; the first reshape, before any
    selector exists, sizes the tops for the whole batch, as Caffe's does. Backward scatters
    the diffs back and zeroes the dropped items.
    """

    bottoms = (2, None)
    tops = (1, None)

    def setup(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        if len(top) != len(bottom) - 1:
            raise self.config_error("Filter needs one top per bottom, the selector excepted")
        self.num_bottoms = len(bottom)
        self.first_reshape = True

    def allow_force_backward(self, bottom_index: int) -> bool:
        return bottom_index != self.num_bottoms - 1

    def reshape(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        selector = bottom[-1]
        if any(d != 1 for d in selector.shape[1:]):
            raise self.shape_error(
                f"the selector's dimensions must be 1 except the first, got {selector.shape}"
            )
        for i, b in enumerate(bottom[:-1]):
            if b.shape[0] != selector.shape[0]:
                raise self.shape_error(
                    f"bottom {i} has {b.shape[0]} items, the selector {selector.shape[0]}"
                )
        if self.first_reshape:
            self.first_reshape = False
            kept = selector.shape[0]
        else:
            self.indices = self.xp.nonzero(selector.data.reshape(-1))[0]
            kept = int(self.indices.shape[0])
        for t, b in zip(top, bottom):
            t.reshape((kept,) + b.shape[1:])

    def forward(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        self.indices = self.xp.nonzero(bottom[-1].data.reshape(-1))[0]
        for t, b in zip(top, bottom):
            t.reshape((int(self.indices.shape[0]),) + b.shape[1:])
            self.xp.take(b.data, self.indices, axis=0, out=t.data)

    def backward(
        self, top: Sequence[Blob], propagate_down: Sequence[bool], bottom: Sequence[Blob]
    ) -> None:
        if propagate_down[-1]:
            raise self.config_error("cannot backpropagate to the Filter layer's selector")
        for t, b, down in zip(top, bottom, propagate_down):
            if down:
                b.diff[...] = 0
                b.diff[self.indices] = t.diff


@register("BatchReindex")
class BatchReindexLayer(Layer):
    """``top[i] = bottom0[index[i]]`` for the (float-stored) indices in bottom 1.

    Backward scatter-adds into bottom 0 (an item picked twice gets both diffs); indices
    cannot be differentiated.
    """

    bottoms = (2, 2)
    tops = (1, 1)

    def allow_force_backward(self, bottom_index: int) -> bool:
        return bottom_index == 0

    def reshape(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        if bottom[1].num_axes != 1:
            raise self.shape_error(f"the index bottom must be 1-D, got shape {bottom[1].shape}")
        top[0].reshape(bottom[1].shape[:1] + bottom[0].shape[1:])

    def _indices(self, bottom: Sequence[Blob]) -> Any:
        values = bottom[1].data
        if values.size and bool(((values < 0) | (values >= bottom[0].shape[0])).any()):
            raise DataError(
                f"layer {self.name!r} (BatchReindex): an index is outside the batch "
                f"[0, {bottom[0].shape[0]})"
            )
        # Caffe truncates the stored floats to int.
        return values.astype(np.int64)

    def forward(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        self.xp.take(bottom[0].data, self._indices(bottom), axis=0, out=top[0].data)

    def backward(
        self, top: Sequence[Blob], propagate_down: Sequence[bool], bottom: Sequence[Blob]
    ) -> None:
        if propagate_down[1]:
            raise self.config_error("cannot backpropagate to the BatchReindex index bottom")
        if propagate_down[0]:
            dx = bottom[0].diff
            dx[...] = 0
            self.xp.add.at(dx, self._indices(bottom), top[0].diff)


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
        _no_in_place(self, bottom, top)
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
