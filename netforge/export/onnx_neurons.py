"""Converters of Caffe's neuron (element-wise) layers to ONNX operators.

Each reproduces the formula of the netforge layer of the same type
(``netforge/builtin_layers/activation.py``); Dropout at test time is the identity.
"""

from __future__ import annotations

import numpy as np

from netforge.export.onnx_graph import OnnxGraph
from netforge.export.onnx_layers import Site, converts, trailing


@converts("ReLU")
def relu(g: OnnxGraph, site: Site) -> list[str]:
    """Relu, or LeakyRelu with Caffe's ``negative_slope``."""
    slope = site.layer.slope
    if slope == 0:
        return [g.node("Relu", site.inputs, site.hint)]
    return [g.node("LeakyRelu", site.inputs, site.hint, alpha=slope)]


@converts("PReLU")
def prelu(g: OnnxGraph, site: Site) -> list[str]:
    """PRelu with the slope per channel (axis 1) or one shared slope."""
    slope = site.blob(0)
    rank = len(site.bottom_shapes[0])
    shaped = (
        slope.reshape(1)
        if site.layer.channel_shared
        else slope.reshape(trailing(slope.shape, rank, 1))
    )
    return [g.node("PRelu", [site.inputs[0], g.const(shaped, f"{site.hint}/slope")], site.hint)]


@converts("ELU")
def elu(g: OnnxGraph, site: Site) -> list[str]:
    """Elu with Caffe's ``alpha``."""
    return [g.node("Elu", site.inputs, site.hint, alpha=site.layer.alpha)]


@converts("Sigmoid")
def sigmoid(g: OnnxGraph, site: Site) -> list[str]:
    """Sigmoid."""
    return [g.node("Sigmoid", site.inputs, site.hint)]


@converts("TanH")
def tanh(g: OnnxGraph, site: Site) -> list[str]:
    """Tanh."""
    return [g.node("Tanh", site.inputs, site.hint)]


@converts("AbsVal")
def absval(g: OnnxGraph, site: Site) -> list[str]:
    """Abs."""
    return [g.node("Abs", site.inputs, site.hint)]


@converts("Power")
def power(g: OnnxGraph, site: Site) -> list[str]:
    """(shift + scale·x)^power; when power·scale is 0, Caffe's constant (1 for power 0,
    else shift^power) in the input's shape."""
    layer, x, hint = site.layer, site.inputs[0], site.hint
    if layer.power * layer.scale == 0:
        value = 1.0 if layer.power == 0 else layer.shift**layer.power
        shape = g.node("Shape", [x], f"{hint}/shape")
        fill = g.onnx.numpy_helper.from_array(np.array([value], dtype=np.float32))
        return [g.node("ConstantOfShape", [shape], hint, value=fill)]
    y = g.scaled(x, layer.scale, f"{hint}/scaled")
    if layer.shift != 0:
        y = g.node("Add", [y, g.const(layer.shift, f"{hint}/shift")], f"{hint}/shifted")
    if layer.power != 1:
        y = g.node("Pow", [y, g.const(layer.power, f"{hint}/power")], hint)
    if y == x:
        return [g.node("Identity", [x], hint)]
    return [y]


@converts("Exp")
def exp(g: OnnxGraph, site: Site) -> list[str]:
    """base^(shift + scale·x) = base^shift · exp(ln(base)·scale·x) (base −1 = e)."""
    layer, hint = site.layer, site.hint
    y = g.node("Exp", [g.scaled(site.inputs[0], layer.inner_scale, f"{hint}/inner")], hint)
    return [g.scaled(y, layer.outer_scale, hint)]


@converts("Log")
def log(g: OnnxGraph, site: Site) -> list[str]:
    """log(shift + scale·x) / ln(base) (base −1 = e)."""
    layer, hint = site.layer, site.hint
    y = g.scaled(site.inputs[0], layer.scale, f"{hint}/scaled")
    if layer.shift != 0:
        y = g.node("Add", [y, g.const(layer.shift, f"{hint}/shift")], f"{hint}/shifted")
    return [g.scaled(g.node("Log", [y], hint), layer.base_scale, hint)]


@converts("BNLL")
def bnll(g: OnnxGraph, site: Site) -> list[str]:
    """Softplus in Caffe's overflow-free form max(x, 0) + log(1 + exp(−|x|)); ONNX's
    Softplus leaves the form to the runtime."""
    x, hint = site.inputs[0], site.hint
    tail = g.node(
        "Exp", [g.node("Neg", [g.node("Abs", [x], f"{hint}/abs")], f"{hint}/neg")], f"{hint}/exp"
    )
    log1p = g.node(
        "Log",
        [g.node("Add", [tail, g.const(1.0, f"{hint}/one")], f"{hint}/one_plus")],
        f"{hint}/log1p",
    )
    return [g.node("Add", [g.node("Relu", [x], f"{hint}/relu"), log1p], hint)]


@converts("Threshold")
def threshold(g: OnnxGraph, site: Site) -> list[str]:
    """1 where x > threshold, else 0 (Greater, then a cast to float)."""
    hint = site.hint
    t = g.const(site.layer.layer_param.threshold_param.threshold, f"{hint}/threshold")
    above = g.node("Greater", [site.inputs[0], t], f"{hint}/above")
    return [g.node("Cast", [above], hint, to=g.onnx.TensorProto.FLOAT)]


@converts("Swish")
def swish(g: OnnxGraph, site: Site) -> list[str]:
    """x · sigmoid(β·x)."""
    x, hint = site.inputs[0], site.hint
    gate = g.node("Sigmoid", [g.scaled(x, site.layer.beta, f"{hint}/beta")], f"{hint}/gate")
    return [g.node("Mul", [x, gate], hint)]


@converts("Clip")
def clip(g: OnnxGraph, site: Site) -> list[str]:
    """Clip to [min, max]."""
    layer, hint = site.layer, site.hint
    bounds = [g.const(layer.low, f"{hint}/min"), g.const(layer.high, f"{hint}/max")]
    return [g.node("Clip", [site.inputs[0], *bounds], hint)]


@converts("Dropout")
def dropout(g: OnnxGraph, site: Site) -> list[str]:
    """The identity at test time (inverted dropout scales only in training)."""
    return list(site.inputs)
