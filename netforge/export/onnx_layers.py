"""One converter per Caffe layer type: standard ONNX operators with Caffe's exact semantics.

A converter receives the built netforge layer (its parameters already parsed and its blobs
loaded) and the ONNX names of its bottoms, adds nodes to the ``OnnxGraph`` and returns the
ONNX names of its tops. A top that is its bottom unchanged (Split, Dropout at test time, a
one-part Concat or Slice) returns the bottom's name and adds no node.

Where ONNX's own operator differs from Caffe's (ceil-mode pooling sizes, AVE pooling's
divisor at the border, ArgMax's ties, Caffe's Reshape/Flatten axes), the converter composes
standard operators that compute Caffe's values; a layer with no faithful form raises a
ConfigError naming it. Neuron layers live in ``onnx_neurons.py``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

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


def batch_target(g: OnnxGraph, out: Sequence[int], copied: Sequence[int], inferred: int | None):
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


# -- vision -----------------------------------------------------------------------------------
@converts("Convolution", "Deconvolution")
def convolution(g: OnnxGraph, site: Site) -> list[str]:
    """Conv / ConvTranspose: groups, dilation, per-axis kernel, stride and pad; each bottom
    is filtered with the same weights (Caffe's several bottom/top pairs)."""
    layer = site.layer
    if layer.axis != 1:
        raise site.refuse(f"convolution over axis {layer.axis} (ONNX convolves from axis 1)")
    geom = layer.geom
    weight = g.const(site.blob(0), f"{site.hint}/weight")
    inputs = [weight, g.const(site.blob(1), f"{site.hint}/bias")] if layer.bias_term else [weight]
    op = "ConvTranspose" if layer.type == "Deconvolution" else "Conv"
    attrs = dict(
        kernel_shape=list(geom.kernel),
        strides=list(geom.stride),
        pads=list(geom.pad) * 2,
        dilations=list(geom.dilation),
        group=layer.group,
    )
    return [g.node(op, [x, *inputs], site.hint, **attrs) for x in site.inputs]


def _pool_end_pads(layer: Layer, spatial: Sequence[int]) -> list[int]:
    """Padding after each axis that makes floor-mode ONNX pooling give Caffe's windows:
    Caffe's last window ends at (out − 1)·stride + kernel in padded coordinates (it may
    overhang the padded input in CEIL mode, and is dropped when it would start in the far
    padding); a window ending short of the padded extent needs no padding there."""
    return [
        max((o - 1) * s + k - h - p, 0)
        for h, k, s, p, o in zip(spatial, layer.kernel, layer.stride, layer.pad, layer.out)
    ]


def _ave_divisor_factor(layer: Layer, spatial: Sequence[int]) -> np.ndarray:
    """kernel area / Caffe's divisor at each output position: the window clipped to the
    padded input (padding counts, what lies beyond the far padding does not)."""
    sizes = []
    for h, k, s, p, o in zip(spatial, layer.kernel, layer.stride, layer.pad, layer.out):
        start = np.arange(o) * s - p
        sizes.append(np.minimum(start + k, h + p) - start)
    divisor = np.outer(sizes[0], sizes[1]).astype(np.float64)
    return math.prod(layer.kernel) / divisor


@converts("Pooling")
def pooling(g: OnnxGraph, site: Site) -> list[str]:
    """MAX, AVE and (TEST-phase) STOCHASTIC pooling with Caffe's sizes and divisors.

    The windows are those of floor-mode ONNX pooling over the input padded by ``pad``
    before and by ``_pool_end_pads`` after, which is exactly Caffe's CEIL or FLOOR set of
    windows. MAX pads implicitly (padding never wins); AVE pads with zeros explicitly,
    averages over the full kernel and rescales where Caffe's divisor is smaller;
    STOCHASTIC at test time is Σx² / (FLT_MIN + Σx) per window.
    """
    layer, x = site.layer, site.inputs[0]
    spatial = site.bottom_shapes[0][2:]
    method = layer.method
    param = layer.layer_param.pooling_param
    if (
        param.global_pooling
        and method != pb.PoolingParameter.STOCHASTIC
        and len(site.top_shapes) == 1
    ):
        op = "GlobalMaxPool" if method == pb.PoolingParameter.MAX else "GlobalAveragePool"
        return [g.node(op, [x], site.hint)]
    end = _pool_end_pads(layer, spatial)
    window = dict(kernel_shape=list(layer.kernel), strides=list(layer.stride))
    if method == pb.PoolingParameter.MAX:
        pads = [*layer.pad, *end]
        if len(site.top_shapes) == 1:
            return [g.node("MaxPool", [x], site.hint, pads=pads, **window)]
        # Caffe's mask is the flat index within the input plane; ONNX's counts from the
        # start of the batch: the remainder modulo the plane size is Caffe's.
        top, index = g.node("MaxPool", [x], site.hint, outputs=2, pads=pads, **window)
        plane = g.const(math.prod(spatial), f"{site.hint}/plane", np.int64)
        within = g.node("Mod", [index, plane], f"{site.hint}/mask_index")
        return [top, g.node("Cast", [within], f"{site.hint}/mask", to=1)]
    padded = x
    if any(layer.pad) or any(end):
        pads = g.ints([0, 0, *layer.pad, 0, 0, *end], f"{site.hint}/pads")
        padded = g.node("Pad", [x, pads], f"{site.hint}/padded")
    if method == pb.PoolingParameter.AVE:
        mean = g.node("AveragePool", [padded], site.hint, **window)
        factor = _ave_divisor_factor(layer, spatial)
        if np.all(factor == 1):
            return [mean]
        return [g.node("Mul", [mean, g.const(factor, f"{site.hint}/divisor")], site.hint)]
    area = g.const(math.prod(layer.kernel), f"{site.hint}/area")
    square = g.node("Mul", [padded, padded], f"{site.hint}/square")
    sum_sq = g.node(
        "Mul",
        [g.node("AveragePool", [square], f"{site.hint}/sumsq", **window), area],
        f"{site.hint}/sumsq",
    )
    total = g.node(
        "Mul",
        [g.node("AveragePool", [padded], f"{site.hint}/sum", **window), area],
        f"{site.hint}/sum",
    )
    flt_min = g.const(np.finfo(np.float32).tiny, f"{site.hint}/flt_min")
    return [g.node("Div", [sum_sq, g.node("Add", [total, flt_min], f"{site.hint}/den")], site.hint)]


@converts("SPP")
def spp(g: OnnxGraph, site: Site) -> list[str]:
    """Each pyramid level is the layer's own inner Pooling (Caffe's kernel, stride and pad
    for the plane), converted as a Pooling layer, flattened and concatenated on axis 1."""
    layer, x = site.layer, site.inputs[0]
    levels = []
    for inner, out in zip(layer.levels, layer.outputs):
        level_site = Site(inner, [x], site.bottom_shapes, [tuple(out.shape)])
        levels.append(pooling(g, level_site)[0])
    if len(levels) == 1:
        return levels
    flat = [g.node("Flatten", [y], f"{site.hint}/level", axis=1) for y in levels]
    return [g.node("Concat", flat, site.hint, axis=1)]


@converts("LRN")
def lrn(g: OnnxGraph, site: Site) -> list[str]:
    """ACROSS_CHANNELS is ONNX LRN (both divide α by the window size, both add k);
    WITHIN_CHANNEL is x · (1 + α/n² · Σ_{n×n} x²)^−β composed from Mul, a zero-padded
    AveragePool (its divisor is n² everywhere: stride 1, pad (n−1)/2) and Pow."""
    layer, x, hint = site.layer, site.inputs[0], site.hint
    if layer.across:
        return [
            g.node(
                "LRN", [x], hint, size=layer.size, alpha=layer.alpha, beta=layer.beta, bias=layer.k
            )
        ]
    square = g.node("Mul", [x, x], f"{hint}/square")
    half = layer.half
    mean = g.node(
        "AveragePool",
        [square],
        f"{hint}/mean",
        kernel_shape=[layer.size] * 2,
        pads=[half] * 4,
        count_include_pad=1,
    )
    scale = g.node(
        "Add",
        [g.scaled(mean, layer.alpha, f"{hint}/alpha"), g.const(1.0, f"{hint}/one")],
        f"{hint}/scale",
    )
    power = g.node("Pow", [scale, g.const(-layer.beta, f"{hint}/beta")], f"{hint}/power")
    return [g.node("Mul", [x, power], hint)]


@converts("Crop")
def crop(g: OnnxGraph, site: Site) -> list[str]:
    """Slice of bottom 0 to bottom 1's shape from ``axis`` on, at Caffe's offsets."""
    index = site.layer.index
    axes = [i for i, s in enumerate(index) if s != slice(None)]
    if not axes:
        return [site.inputs[0]]
    starts = [index[a].start for a in axes]
    ends = [index[a].stop for a in axes]
    return [g.slice(site.inputs[0], starts, ends, axes, site.hint)]


# -- normalization ------------------------------------------------------------------------
@converts("BatchNorm")
def batch_norm(g: OnnxGraph, site: Site) -> list[str]:
    """With global statistics: mean and variance are blob0 and blob1 divided by the
    scale-factor blob2 (both 0 when it is 0), as ONNX BatchNormalization's inputs. With
    batch statistics (``use_global_stats: false``): the mean and biased variance of the
    batch over every axis but 1, composed from ReduceMean."""
    layer, x, hint = site.layer, site.inputs[0], site.hint
    shape = site.bottom_shapes[0]
    if not layer.use_global_stats:
        axes = [a for a in range(len(shape)) if a != 1]
        mean = g.reduce("ReduceMean", x, axes, f"{hint}/mean", keepdims=1)
        centred = g.node("Sub", [x, mean], f"{hint}/centred")
        square = g.node("Mul", [centred, centred], f"{hint}/square")
        var = g.reduce("ReduceMean", square, axes, f"{hint}/var", keepdims=1)
        std = g.node(
            "Sqrt",
            [g.node("Add", [var, g.const(layer.eps, f"{hint}/eps")], f"{hint}/var_eps")],
            f"{hint}/std",
        )
        return [g.node("Div", [centred, std], hint)]
    if len(shape) < 2:
        raise site.refuse(f"a BatchNorm over a {len(shape)}-axis blob (ONNX needs N, C, ...)")
    factor = float(site.blob(2).reshape(-1)[0])
    factor = 0.0 if factor == 0 else 1.0 / factor
    channels = shape[1]
    mean = site.blob(0).astype(np.float64) * factor
    var = site.blob(1).astype(np.float64) * factor
    inputs = [
        x,
        g.const(np.ones(channels), f"{hint}/gamma"),
        g.const(np.zeros(channels), f"{hint}/beta"),
        g.const(mean, f"{hint}/mean"),
        g.const(var, f"{hint}/var"),
    ]
    return [g.node("BatchNormalization", inputs, hint, epsilon=layer.eps)]


@converts("MVN")
def mvn(g: OnnxGraph, site: Site) -> list[str]:
    """x − mean, then / (std + eps) (eps added to the biased standard deviation, as Caffe),
    over each (item, channel) plane or each item; the top has Caffe's legacy 4 axes."""
    layer, x, hint = site.layer, site.inputs[0], site.hint
    shape = site.bottom_shapes[0]
    if len(shape) < 4:
        x = g.reshape(x, batch_target(g, site.top_shapes[0], range(len(shape)), None), hint)
    axes = [1, 2, 3] if layer.across_channels else [2, 3]
    mean = g.reduce("ReduceMean", x, axes, f"{hint}/mean", keepdims=1)
    y = g.node("Sub", [x, mean], f"{hint}/centred")
    if not layer.normalize_variance:
        return [y]
    square = g.node("Mul", [y, y], f"{hint}/square")
    var = g.reduce("ReduceMean", square, axes, f"{hint}/var", keepdims=1)
    std = g.node("Sqrt", [var], f"{hint}/std")
    std_eps = g.node("Add", [std, g.const(layer.eps, f"{hint}/eps")], f"{hint}/std_eps")
    return [g.node("Div", [y, std_eps], hint)]


def _operand(g: OnnxGraph, site: Site, param: Any, blob_index: int) -> str:
    """Scale's or Bias's second operand shaped to broadcast from ``axis``: the learned
    blob, or bottom 1 reshaped with trailing unit axes."""
    rank = len(site.bottom_shapes[0])
    axis = param.axis % rank if rank else 0
    if len(site.inputs) == 1:
        value = site.blob(blob_index)
        return g.const(value.reshape(trailing(value.shape, rank, axis)), f"{site.hint}/operand")
    other = site.bottom_shapes[1]
    target = trailing(other, rank, axis)
    if target == list(other):
        return site.inputs[1]
    copied = [0] if axis == 0 and other else []
    return g.reshape(site.inputs[1], batch_target(g, target, copied, None), f"{site.hint}/operand")


@converts("Scale")
def scale(g: OnnxGraph, site: Site) -> list[str]:
    """x · s (+ b) broadcast over ``axis`` … (learned s, or bottom 1)."""
    param = site.layer.layer_param.scale_param
    y = g.node("Mul", [site.inputs[0], _operand(g, site, param, 0)], site.hint)
    if param.bias_term:
        rank, axis = len(site.bottom_shapes[0]), param.axis % max(len(site.bottom_shapes[0]), 1)
        bias = site.blob(len(site.layer.blobs) - 1)
        b = g.const(bias.reshape(trailing(bias.shape, rank, axis)), f"{site.hint}/bias")
        y = g.node("Add", [y, b], site.hint)
    return [y]


@converts("Bias")
def bias(g: OnnxGraph, site: Site) -> list[str]:
    """x + b broadcast over ``axis`` … (learned b, or bottom 1)."""
    param = site.layer.layer_param.bias_param
    return [g.node("Add", [site.inputs[0], _operand(g, site, param, 0)], site.hint)]


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
    target = batch_target(g, [*site.bottom_shapes[0][:axis], layer.k], range(axis), None)
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
    index = g.node("Cast", [site.inputs[0]], f"{hint}/index", to=7)
    y = g.node("Gather", [g.const(site.blob(0), f"{hint}/weight"), index], hint, axis=0)
    if site.layer.bias_term:
        y = g.node("Add", [y, g.const(site.blob(1), f"{hint}/bias")], hint)
    return [y]


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
        target = batch_target(g, [shape[0], math.prod(shape[1:])], [0], None)
        x, axis = g.reshape(x, target, f"{hint}/flat"), 1
    size = shape[axis] if layer.has_axis else math.prod(shape[1:])
    bounds = [g.ints([-1], f"{hint}/start"), g.ints([-(2**63)], f"{hint}/end")]
    steps = [g.ints([axis], f"{hint}/axis"), g.ints([-1], f"{hint}/step")]
    flipped = g.node("Slice", [x, *bounds, *steps], f"{hint}/reversed")
    values, order = g.node(
        "TopK", [flipped, g.ints([p.top_k], f"{hint}/k")], f"{hint}/topk", outputs=2, axis=axis
    )
    last = g.const(size - 1, f"{hint}/last", np.int64)
    index = g.node("Cast", [g.node("Sub", [last, order], f"{hint}/index")], f"{hint}/index", to=1)
    if layer.has_axis:
        return [values if p.out_max_val else index]
    rows = [index, values] if p.out_max_val else [index]
    rows = [g.node("Unsqueeze", [r, g.ints([1], f"{hint}/row_axis")], f"{hint}/row") for r in rows]
    y = rows[0] if len(rows) == 1 else g.node("Concat", rows, hint, axis=1)
    out = site.top_shapes[0]
    if len(out) > 3:
        y = g.reshape(y, batch_target(g, out, [0, 1, 2], None), hint)
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
    """One Slice per top along Caffe's axis; one top passes the bottom through."""
    if len(site.top_shapes) == 1:
        return list(site.inputs)
    axis, tops, start = site.layer.axis, [], 0
    for i, size in enumerate(site.layer.sizes):
        tops.append(g.slice(site.inputs[0], [start], [start + size], [axis], f"{site.hint}:{i}"))
        start += size
    return tops


@converts("Flatten")
def flatten(g: OnnxGraph, site: Site) -> list[str]:
    """Reshape that merges ``axis`` … ``end_axis``: earlier axes copied, the merged one
    inferred, later ones fixed."""
    out, inp = site.top_shapes[0], site.bottom_shapes[0]
    p = site.layer.layer_param.flatten_param
    start = p.axis % len(inp)
    target = batch_target(g, out, range(start), start)
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
    target = batch_target(g, out, copied, inferred)
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


@converts("Upsample")
def upsample(g: OnnxGraph, site: Site) -> list[str]:
    """Nearest upsampling by whole factors: each pixel broadcast to an sh × sw block
    (Unsqueeze, Expand, Reshape), then cut to the output size when it is smaller."""
    layer, hint = site.layer, site.hint
    n, c, h, sh, w, sw = layer.full
    x = g.reshape(site.inputs[0], [0, c, h, 1, w, 1], f"{hint}/blocks")
    x = g.node("Expand", [x, g.ints([1, 1, 1, sh, 1, sw], f"{hint}/factors")], f"{hint}/expanded")
    y = g.reshape(x, [0, c, h * sh, w * sw], hint)
    oh, ow = site.top_shapes[0][2:]
    if (oh, ow) != (h * sh, w * sw):
        y = g.slice(y, [0, 0], [oh, ow], [2, 3], hint)
    return [y]


@converts("Interp")
def interp(g: OnnxGraph, site: Site) -> list[str]:
    """The layer's own bilinear weights: top = A_h · x · A_wᵀ as two MatMuls (the same
    float32 matrices netforge computes, so the fork's sample points are kept exactly)."""
    layer, hint = site.layer, site.hint
    a_w = g.const(to_numpy(layer.a_w).T, f"{hint}/columns")
    a_h = g.const(to_numpy(layer.a_h), f"{hint}/rows")
    across = g.node("MatMul", [site.inputs[0], a_w], f"{hint}/across")
    return [g.node("MatMul", [a_h, across], hint)]
