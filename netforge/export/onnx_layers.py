"""One converter per Caffe layer type: standard ONNX operators with Caffe's exact semantics.

A converter receives the built netforge layer (its parameters already parsed and its blobs
loaded) and the ONNX names of its bottoms, adds nodes to the ``OnnxGraph`` and returns the
ONNX names of its tops. A top that is its bottom unchanged (Split, Dropout at test time, a
one-part Concat or Slice) returns the bottom's name and adds no node.

Where ONNX's own operator differs from Caffe's (ceil-mode pooling sizes, AVE pooling's
divisor at the border, ArgMax's ties, Caffe's Reshape/Flatten axes), the converter composes
standard operators that compute Caffe's values; a layer with no faithful form raises a
ConfigError naming it. This module holds the registry and the fully connected, selection
and routing layers; vision and normalization layers are in ``onnx_vision.py``, neuron
layers in ``onnx_neurons.py``, recurrent layers in ``onnx_recurrent.py``.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from netforge.backend import to_numpy
from netforge.errors import ConfigError
from netforge.export.onnx_graph import OnnxGraph
from netforge.layer import Layer
from netforge.proto import pb


@dataclass
class Site:
    """One layer being converted: the layer, its bottoms' ONNX names and the blob shapes."""

    layer: Layer
    inputs: list[str]
    bottom_shapes: list[tuple[int, ...]]
    top_shapes: list[tuple[int, ...]]

    @property
    def hint(self) -> str:
        """The prefix of the names this layer's nodes and constants get."""
        return self.layer.name

    def blob(self, i: int) -> np.ndarray:
        """Parameter blob ``i`` as a numpy array."""
        return to_numpy(self.layer.blobs[i].data)

    def refuse(self, why: str) -> ConfigError:
        """The error for a layer that has no faithful ONNX form."""
        return ConfigError(
            f"layer {self.layer.name!r} ({self.layer.type}): {why}; it cannot be exported to ONNX"
        )


Converter = Callable[[OnnxGraph, Site], list[str]]
CONVERTERS: dict[str, Converter] = {}


def converts(*types: str) -> Callable[[Converter], Converter]:
    """Register a converter for Caffe layer ``types``."""

    def decorate(fn: Converter) -> Converter:
        for t in types:
            CONVERTERS[t] = fn
        return fn

    return decorate


def batch_target(out: Sequence[int], copied: Sequence[int], inferred: int | None) -> list[int]:
    """A Reshape target for the static shape ``out``.

    ``copied``: output axes that keep the input's dimension at the same position (written
    0, so that a symbolic batch flows through); ``inferred``: the axis written -1. With a
    dynamic batch, an output whose axis 0 is neither copied nor inferred would fix the
    batch size, and is refused by the caller's ``check_batch``.
    """
    target = list(out)
    for axis in copied:
        target[axis] = 0
    if inferred is not None:
        target[inferred] = -1
    return target


def check_batch(g: OnnxGraph, site: Site, target: Sequence[int]) -> None:
    """Refuse a reshape that would fix the batch size of a dynamic-batch export: one that
    neither copies axis 0 nor infers a dimension (an inferred one takes any batch, as in
    Caffe, whose Reshape gives (1, N·K) for ``dim: 1 dim: -1`` at batch N)."""
    if g.dynamic_batch and target and target[0] != 0 and -1 not in target:
        raise site.refuse(
            f"its output shape {list(site.top_shapes[0])} fixes the batch size; export "
            "without --dynamic-batch"
        )


def trailing(shape: Sequence[int], rank: int, start: int) -> list[int]:
    """``shape`` placed at axis ``start`` of a rank-``rank`` tensor, for broadcasting."""
    return list(shape) + [1] * (rank - start - len(shape))


# -- fully connected and selection ----------------------------------------------------------
@converts("InnerProduct")
def inner_product(g: OnnxGraph, site: Site) -> list[str]:
    """Gemm over the input flattened from ``axis`` (axis 1); a MatMul over the leading axes
    otherwise. ``transpose`` stores the weight as (K, N), which Gemm reads with transB 0."""
    layer, x, hint = site.layer, site.inputs[0], site.hint
    weight = site.blob(0)
    axis = layer.axis
    if axis == 1:
        flat = (
            x if len(site.bottom_shapes[0]) == 2 else g.node("Flatten", [x], f"{hint}/flat", axis=1)
        )
        inputs = [flat, g.const(weight, f"{hint}/weight")]
        if layer.bias_term:
            inputs.append(g.const(site.blob(1), f"{hint}/bias"))
        return [g.node("Gemm", inputs, hint, transB=0 if layer.transpose else 1)]
    target = batch_target([*site.bottom_shapes[0][:axis], layer.k], range(axis), None)
    if axis == 0:
        target = [1, layer.k]
    check_batch(g, site, target)
    flat = g.reshape(x, target, f"{hint}/flat")
    matrix = weight if layer.transpose else weight.T
    y = g.node("MatMul", [flat, g.const(matrix, f"{hint}/weight")], hint)
    if layer.bias_term:
        y = g.node("Add", [y, g.const(site.blob(1), f"{hint}/bias")], hint)
    if axis == 0:
        y = g.reshape(y, [layer.num_output], hint)
    return [y]


@converts("Embed")
def embed(g: OnnxGraph, site: Site) -> list[str]:
    """Gather of the weight's rows at the (float-stored) indices, plus the bias."""
    hint = site.hint
    index = g.node("Cast", [site.inputs[0]], f"{hint}/index", to=g.onnx.TensorProto.INT64)
    y = g.node("Gather", [g.const(site.blob(0), f"{hint}/weight"), index], hint, axis=0)
    if site.layer.bias_term:
        y = g.node("Add", [y, g.const(site.blob(1), f"{hint}/bias")], hint)
    return [y]


@converts("BatchReindex")
def batch_reindex(g: OnnxGraph, site: Site) -> list[str]:
    """Gather of bottom 0's items at the indices of bottom 1 (floats, truncated as Caffe)."""
    hint = site.hint
    index = g.node("Cast", [site.inputs[1]], f"{hint}/index", to=g.onnx.TensorProto.INT64)
    return [g.node("Gather", [site.inputs[0], index], hint, axis=0)]


@converts("Filter")
def filter_layer(g: OnnxGraph, site: Site) -> list[str]:
    """Compress of every bottom but the last along axis 0, keeping the items whose selector
    (the last bottom, (N) or (N, 1, ...)) is non-zero. How many are kept depends on the
    data, so the export needs a symbolic batch."""
    if not g.dynamic_batch:
        raise site.refuse(
            "the number of items it keeps depends on the data; export with --dynamic-batch"
        )
    hint = site.hint
    flat = g.reshape(site.inputs[-1], [-1], f"{hint}/selector")
    keep = g.node("Cast", [flat], f"{hint}/keep", to=g.onnx.TensorProto.BOOL)
    return [g.node("Compress", [x, keep], hint, axis=0) for x in site.inputs[:-1]]


@converts("Softmax")
def softmax(g: OnnxGraph, site: Site) -> list[str]:
    """Softmax along Caffe's ``axis`` (ONNX's single-axis Softmax from opset 13)."""
    return [g.node("Softmax", site.inputs, site.hint, axis=site.layer.axis)]


@converts("Eltwise")
def eltwise(g: OnnxGraph, site: Site) -> list[str]:
    """SUM (each bottom times its coeff), PROD, MAX."""
    layer, hint = site.layer, site.hint
    if layer.op == pb.EltwiseParameter.PROD:
        y = site.inputs[0]
        for x in site.inputs[1:]:
            y = g.node("Mul", [y, x], hint)
        return [y]
    if layer.op == pb.EltwiseParameter.MAX:
        return [g.node("Max", site.inputs, hint)]
    terms = [g.scaled(x, c, f"{hint}/term") for x, c in zip(site.inputs, layer.coeffs)]
    return [g.node("Sum", terms, hint)]


_REDUCERS = {
    pb.ReductionParameter.SUM: "ReduceSum",
    pb.ReductionParameter.ASUM: "ReduceL1",
    pb.ReductionParameter.SUMSQ: "ReduceSumSquare",
    pb.ReductionParameter.MEAN: "ReduceMean",
}


@converts("Reduction")
def reduction(g: OnnxGraph, site: Site) -> list[str]:
    """SUM/ASUM/SUMSQ/MEAN over every axis from ``axis`` on, times ``coeff``."""
    param = site.layer.layer_param.reduction_param
    rank = len(site.bottom_shapes[0])
    axis = param.axis % rank
    y = g.reduce(
        _REDUCERS[param.operation], site.inputs[0], range(axis, rank), site.hint, keepdims=0
    )
    return [g.scaled(y, param.coeff, site.hint)]


@converts("ArgMax")
def argmax(g: OnnxGraph, site: Site) -> list[str]:
    """TopK on the reversed axis, so that ties go to the larger index as in Caffe's
    descending sort of (value, index) pairs (ONNX's TopK prefers the smaller index)."""
    layer, hint = site.layer, site.hint
    p = layer.layer_param.argmax_param
    shape = site.bottom_shapes[0]
    x = site.inputs[0]
    if layer.has_axis:
        axis = layer.axis
    else:
        target = batch_target([shape[0], math.prod(shape[1:])], [0], None)
        x, axis = g.reshape(x, target, f"{hint}/flat"), 1
    size = shape[axis] if layer.has_axis else math.prod(shape[1:])
    bounds = [g.ints([-1], f"{hint}/start"), g.ints([-(2**63)], f"{hint}/end")]
    steps = [g.ints([axis], f"{hint}/axis"), g.ints([-1], f"{hint}/step")]
    flipped = g.node("Slice", [x, *bounds, *steps], f"{hint}/reversed")
    values, order = g.node(
        "TopK", [flipped, g.ints([p.top_k], f"{hint}/k")], f"{hint}/topk", outputs=2, axis=axis
    )
    if g.dynamic_batch and axis == 0:
        last = g.node("Sub", [g.dim(x, 0, f"{hint}/size"), g.ints([1], f"{hint}/one")], hint)
    else:
        last = g.const(size - 1, f"{hint}/last", np.int64)
    index = g.node(
        "Cast",
        [g.node("Sub", [last, order], f"{hint}/index")],
        f"{hint}/index",
        to=g.onnx.TensorProto.FLOAT,
    )
    if layer.has_axis:
        return [values if p.out_max_val else index]
    rows = [index, values] if p.out_max_val else [index]
    rows = [g.node("Unsqueeze", [r, g.ints([1], f"{hint}/row_axis")], f"{hint}/row") for r in rows]
    y = rows[0] if len(rows) == 1 else g.node("Concat", rows, hint, axis=1)
    out = site.top_shapes[0]
    if len(out) > 3:
        y = g.reshape(y, batch_target(out, [0, 1, 2], None), hint)
    return [y]


# -- shapes and routing ---------------------------------------------------------------------
@converts("Parameter")
def parameter(g: OnnxGraph, site: Site) -> list[str]:
    """The layer's blob, a constant of the graph."""
    return [g.const(site.blob(0), site.hint)]


@converts("DummyData")
def dummy_data(g: OnnxGraph, site: Site) -> list[str]:
    """Constant-filled tops are constants; tops refilled at random at every forward have
    no ONNX form."""
    layer = site.layer
    if any(layer.refill):
        raise site.refuse("its random filler refills a top at every forward")
    return [
        g.const(np.full(shape, filler.value), f"{site.hint}/value")
        for shape, filler in zip(site.top_shapes, layer.fillers)
    ]


@converts("Split")
def split(g: OnnxGraph, site: Site) -> list[str]:
    """Every top is the bottom."""
    return [site.inputs[0]] * len(site.top_shapes)


@converts("Silence")
def silence(g: OnnxGraph, site: Site) -> list[str]:
    """No tops, nothing to compute."""
    return []


@converts("Concat")
def concat(g: OnnxGraph, site: Site) -> list[str]:
    """Concat along Caffe's axis; one bottom passes through."""
    if len(site.inputs) == 1:
        return list(site.inputs)
    return [g.node("Concat", site.inputs, site.hint, axis=site.layer.axis)]


@converts("Slice")
def slice_layer(g: OnnxGraph, site: Site) -> list[str]:
    """One Slice per top along Caffe's axis; one top passes the bottom through. The last
    part runs to the end of the axis, as Caffe's, whatever the batch size."""
    if len(site.top_shapes) == 1:
        return list(site.inputs)
    layer = site.layer
    if g.dynamic_batch and layer.axis == 0 and not layer.layer_param.slice_param.slice_point:
        raise site.refuse(
            "its equal parts of axis 0 change with the batch size; give slice_point or "
            "export without --dynamic-batch"
        )
    ends = list(itertools.accumulate(layer.sizes))
    ends[-1] = np.iinfo(np.int64).max
    return [
        g.slice(site.inputs[0], [start], [end], [layer.axis], f"{site.hint}:{i}")
        for i, (start, end) in enumerate(zip([0, *ends], ends))
    ]


@converts("Flatten")
def flatten(g: OnnxGraph, site: Site) -> list[str]:
    """Reshape that merges ``axis`` … ``end_axis``: earlier axes copied, the merged one
    inferred, later ones fixed."""
    out, inp = site.top_shapes[0], site.bottom_shapes[0]
    p = site.layer.layer_param.flatten_param
    start = p.axis % len(inp)
    target = batch_target(out, range(start), start)
    check_batch(g, site, target)
    return [g.reshape(site.inputs[0], target, site.hint)]


@converts("Reshape")
def reshape(g: OnnxGraph, site: Site) -> list[str]:
    """Caffe's Reshape of axes [axis, axis + num_axes): the axes before it and the 0s of
    ``shape`` copy the input's dimension, its -1 is inferred, the rest are fixed."""
    inp, out = site.bottom_shapes[0], site.top_shapes[0]
    p = site.layer.layer_param.reshape_param
    start = p.axis if p.axis >= 0 else len(inp) + p.axis + 1
    dims = site.layer.dims
    copied = [*range(start), *(start + i for i, d in enumerate(dims) if d == 0)]
    inferred = start + dims.index(-1) if -1 in dims else None
    target = batch_target(out, copied, inferred)
    check_batch(g, site, target)
    return [g.reshape(site.inputs[0], target, site.hint)]


@converts("Permute")
def permute(g: OnnxGraph, site: Site) -> list[str]:
    """Transpose to the SSD fork's ``order``."""
    if site.layer.identity:
        return list(site.inputs)
    return [g.node("Transpose", site.inputs, site.hint, perm=[int(a) for a in site.layer.order])]


@converts("Tile")
def tile(g: OnnxGraph, site: Site) -> list[str]:
    """Tile with ``tiles`` repeats along Caffe's axis (whole blocks, as Caffe)."""
    rank = len(site.bottom_shapes[0])
    p = site.layer.layer_param.tile_param
    repeats = [1] * rank
    repeats[p.axis % rank] = p.tiles
    return [g.node("Tile", [site.inputs[0], g.ints(repeats, f"{site.hint}/repeats")], site.hint)]
