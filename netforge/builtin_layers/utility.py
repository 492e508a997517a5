"""Utility layers that move data: Concat, Slice, Split, Silence, Flatten, Reshape, Permute,
Tile, Filter and BatchReindex.

Each computes what BVLC Caffe's layer of the same type computes (Permute: the SSD fork's).
Layers that only re-view their bottom (Flatten, Reshape, Split, a one-blob Concat/Slice, an
identity Permute) share the bottom's data in forward and hand their top's diff back as the
bottom's diff in backward, as Caffe's ShareData/ShareDiff do; forward and backward redo the
sharing because a producer may have replaced its array since the last pass.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from netforge.blob import Blob
from netforge.builtin_layers.common import canonical_axis, check_no_in_place, legacy_axis
from netforge.errors import DataError
from netforge.layer import Layer, register


def _parts(array: Any, axis: int, sizes: Sequence[int]) -> list[Any]:
    """Consecutive views of ``array`` along ``axis`` with the given sizes (Concat, Slice)."""
    offsets = np.cumsum([0, *sizes])
    lead = (slice(None),) * axis
    return [array[lead + (slice(a, b),)] for a, b in zip(offsets[:-1], offsets[1:])]


class _SharingLayer(Layer):
    """A layer whose one top is its one bottom under another shape (Caffe's ShareData)."""

    bottoms = (1, 1)
    tops = (1, 1)
    reshape_follows_shapes = True

    def setup(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        check_no_in_place(self, bottom, top)

    def forward(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        top[0].share_data(bottom[0])

    def backward(
        self, top: Sequence[Blob], propagate_down: Sequence[bool], bottom: Sequence[Blob]
    ) -> None:
        if propagate_down[0]:
            bottom[0].share_diff(top[0])


@register("Concat")
class ConcatLayer(Layer):
    """Joins bottoms along ``axis`` (or legacy ``concat_dim``); one bottom is passed through."""

    bottoms = (1, None)
    tops = (1, 1)
    reshape_follows_shapes = True

    def reshape(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        first = bottom[0]
        axis = legacy_axis(self, self.layer_param.concat_param, "concat_dim", first)
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
        axis = legacy_axis(self, p, "slice_dim", bottom[0])
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
    reshape_follows_shapes = True

    def setup(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        check_no_in_place(self, bottom, top)

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
        start, end = (
            canonical_axis(self, bottom[0], p.axis),
            canonical_axis(self, bottom[0], p.end_axis),
        )
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
        axis = canonical_axis(self, bottom[0], p.axis)
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
        """Gathers the items that the reshape just before (Caffe's Forward order) selected."""
        for t, b in zip(top, bottom):
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
