"""Converters of Caffe's vision and normalization layers to ONNX operators.

Convolution, Im2col, Pooling (and SPP), LRN, Crop, Upsample, Interp, BatchNorm, Scale, Bias and MVN:
where ONNX's own operator differs from Caffe's (ceil-mode pooling sizes, AVE pooling's
divisor at the border, BatchNorm's scale factor), the converter composes standard
operators that compute Caffe's values.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from netforge.backend import to_numpy
from netforge.export.onnx_graph import OnnxGraph
from netforge.export.onnx_layers import Site, batch_target, converts, trailing
from netforge.layer import Layer
from netforge.proto import pb


# -- vision -----------------------------------------------------------------------------------
@converts("Convolution", "Deconvolution")
def convolution(g: OnnxGraph, site: Site) -> list[str]:
    """Conv / ConvTranspose: groups, dilation, per-axis kernel, stride and pad; each bottom
    is filtered with the same weights (Caffe's several bottom/top pairs)."""
    layer = site.layer
    weight = g.const(site.blob(0), f"{site.hint}/weight")
    inputs = [weight, g.const(site.blob(1), f"{site.hint}/bias")] if layer.bias_term else [weight]
    op = "ConvTranspose" if layer.type == "Deconvolution" else "Conv"
    return [
        _convolve(g, site, x, top, op, inputs, layer.group)
        for x, top in zip(site.inputs, site.top_shapes)
    ]


@converts("Im2col")
def im2col(g: OnnxGraph, site: Site) -> list[str]:
    """Conv with one-hot filters, one per (channel, kernel offset) in Caffe's column order
    (channel-major): group = channels, so each filter copies one input pixel, exactly."""
    layer = site.layer
    geom, channels = layer.geom, site.bottom_shapes[0][layer.axis]
    offsets = math.prod(geom.kernel)
    one_hot = np.eye(offsets, dtype=np.float32).reshape(offsets, 1, *geom.kernel)
    weight = g.const(np.tile(one_hot, (channels, 1) + (1,) * len(geom.kernel)), site.hint)
    return [_convolve(g, site, site.inputs[0], site.top_shapes[0], "Conv", [weight], channels)]


def _convolve(
    g: OnnxGraph,
    site: Site,
    x: str,
    top_shape: Sequence[int],
    op: str,
    parameters: Sequence[str],
    group: int,
) -> str:
    """``op`` over ``x`` with the layer's geometry. ONNX's channel axis is 1; Caffe's
    ``axis`` may be another, every axis before it counting items: those are merged into
    one before the convolution and split again after it."""
    layer, geom, hint = site.layer, site.layer.geom, site.hint
    attrs = dict(
        kernel_shape=list(geom.kernel),
        strides=list(geom.stride),
        pads=list(geom.pad) * 2,
        dilations=list(geom.dilation),
        group=group,
    )
    if layer.axis == 1:
        return g.node(op, [x, *parameters], hint, **attrs)
    items = g.reshape(x, [-1, *site.bottom_shapes[0][layer.axis :]], f"{hint}/items")
    y = g.node(op, [items, *parameters], f"{hint}/{op.lower()}", **attrs)
    return g.reshape(y, [-1, *top_shape[1:]], hint)


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
        return _max_pooling(g, site, spatial, end, window)
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


def _max_pooling(
    g: OnnxGraph, site: Site, spatial: Sequence[int], end: Sequence[int], window: dict
) -> list[str]:
    """MaxPool padded implicitly (padding never wins), with Caffe's mask as second top.

    Without pad and with a kernel smaller than the stride, CEIL mode can add a window that
    lies wholly past the input: Caffe gives it -FLT_MAX and mask -1. ONNX pooling takes
    only pads smaller than the kernel, so those ends are padded explicitly with -FLT_MAX
    and such a window's mask, pointing into that padding, becomes -1.
    """
    layer, x, hint = site.layer, site.inputs[0], site.hint
    explicit = [e if e >= k else 0 for e, k in zip(end, layer.kernel)]
    if any(explicit):
        pads = g.ints([0, 0] + [0] * len(spatial) + [0, 0, *explicit], f"{hint}/far_pads")
        lowest = g.const(np.finfo(np.float32).min, f"{hint}/lowest")
        x = g.node("Pad", [x, pads, lowest], f"{hint}/padded")
    pads = [*layer.pad, *(e - far for e, far in zip(end, explicit))]
    if len(site.top_shapes) == 1:
        return [g.node("MaxPool", [x], hint, pads=pads, **window)]
    top, index = g.node("MaxPool", [x], hint, outputs=2, pads=pads, **window)
    # Caffe's mask is the flat index within the input plane; ONNX's counts from the start
    # of the batch over the (explicitly padded) input: the remainder modulo its plane.
    height, width = spatial
    padded_width = width + explicit[1]
    plane = g.const((height + explicit[0]) * padded_width, f"{hint}/plane", np.int64)
    within = g.node("Mod", [index, plane], f"{hint}/mask_index")
    if any(explicit):
        row_size = g.const(padded_width, f"{hint}/row_size", np.int64)
        row = g.node("Div", [within, row_size], f"{hint}/row")
        column = g.node("Mod", [within, row_size], f"{hint}/column")
        inside = g.node(
            "And",
            [
                g.node("Less", [row, g.const(height, f"{hint}/h", np.int64)], f"{hint}/in_h"),
                g.node("Less", [column, g.const(width, f"{hint}/w", np.int64)], f"{hint}/in_w"),
            ],
            f"{hint}/inside",
        )
        flat = g.node(
            "Add",
            [g.node("Mul", [row, g.const(width, f"{hint}/w", np.int64)], f"{hint}/rows"), column],
            f"{hint}/flat",
        )
        none = g.const(-1, f"{hint}/none", np.int64)
        within = g.node("Where", [inside, flat, none], f"{hint}/mask_index")
    return [top, g.node("Cast", [within], f"{hint}/mask", to=g.onnx.TensorProto.FLOAT)]


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
    if not (g.dynamic_batch and axes[0] == 0):
        return [g.slice(site.inputs[0], starts, ends, axes, site.hint)]
    # axis 0 is the batch: crop it to bottom 1's batch, whatever that is at run time
    hint = site.hint
    batch_end = g.node(
        "Add", [g.dim(site.inputs[1], 0, f"{hint}/ref"), g.ints(starts[:1], f"{hint}/offset")], hint
    )
    if len(axes) > 1:
        batch_end = g.node(
            "Concat", [batch_end, g.ints(ends[1:], f"{hint}/ends")], f"{hint}/ends", axis=0
        )
    bounds = [g.ints(starts, f"{hint}/starts"), batch_end, g.ints(axes, f"{hint}/axes")]
    return [g.node("Slice", [site.inputs[0], *bounds], hint)]


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


# -- normalization ------------------------------------------------------------------------
@converts("BatchNorm")
def batch_norm(g: OnnxGraph, site: Site) -> list[str]:
    """With global statistics: mean and variance are blob0 and blob1 divided by the
    scale-factor blob2 (both 0 when it is 0), as ONNX BatchNormalization's inputs. With
    batch statistics (``use_global_stats: false``): the mean and biased variance of the
    batch over every axis but 1, composed from ReduceMean. A 1-axis blob is one channel,
    as in Caffe (ONNX's BatchNormalization wants N, C, ...: it runs on a column)."""
    layer, x, hint = site.layer, site.inputs[0], site.hint
    shape = site.bottom_shapes[0]
    if len(shape) == 1:
        x, shape = g.reshape(x, [-1, 1], f"{hint}/column"), (*shape, 1)
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
        y = g.node("Div", [centred, std], hint)
    else:
        factor = float(site.blob(2).reshape(-1)[0])
        factor = 0.0 if factor == 0 else 1.0 / factor
        channels = shape[1]
        inputs = [
            x,
            g.const(np.ones(channels), f"{hint}/gamma"),
            g.const(np.zeros(channels), f"{hint}/beta"),
            g.const(site.blob(0).astype(np.float64) * factor, f"{hint}/mean"),
            g.const(site.blob(1).astype(np.float64) * factor, f"{hint}/var"),
        ]
        y = g.node("BatchNormalization", inputs, hint, epsilon=layer.eps)
    return [g.reshape(y, [-1], hint) if len(site.bottom_shapes[0]) == 1 else y]


@converts("MVN")
def mvn(g: OnnxGraph, site: Site) -> list[str]:
    """x − mean, then / (std + eps) (eps added to the biased standard deviation, as Caffe),
    over each (item, channel) plane or each item; the top has Caffe's legacy 4 axes."""
    layer, x, hint = site.layer, site.inputs[0], site.hint
    shape = site.bottom_shapes[0]
    if len(shape) < 4:
        x = g.reshape(x, batch_target(site.top_shapes[0], range(len(shape)), None), hint)
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
    return g.reshape(site.inputs[1], batch_target(target, copied, None), f"{site.hint}/operand")


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
