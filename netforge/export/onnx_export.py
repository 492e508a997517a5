"""Export a built netforge ``Net`` (a deploy net and its weights) to an ONNX model.

Each layer becomes standard ONNX operators through its converter (``onnx_layers.py``,
``onnx_vision.py``, ``onnx_neurons.py``, ``onnx_recurrent.py``). Blobs a layer rewrites in
place become a new tensor per write; the net's inputs and outputs keep Caffe's blob names.
The model passes ``onnx.checker`` with full checks and carries the shapes ONNX's inference
gives.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Callable
from typing import Any

import numpy as np

from netforge.errors import ConfigError, DataError
from netforge.export import (  # noqa: F401  (register converters)
    onnx_neurons,
    onnx_recurrent,
    onnx_vision,
)
from netforge.export.onnx_graph import DEFAULT_OPSET, MIN_OPSET, OnnxGraph, require_onnx
from netforge.export.onnx_layers import CONVERTERS, Site
from netforge.graph import DATA_LAYER_PARAMS, filter_net
from netforge.proto import pb

#: Symbolic name of axis 0 of the inputs in a ``dynamic_batch`` export.
BATCH = "N"

#: Layers whose only work is to provide the net's inputs.
_INPUT_TYPES = ("Input",)


def net_to_onnx(
    net: Any,
    *,
    opset: int = DEFAULT_OPSET,
    dynamic_batch: bool = False,
    fold_batchnorm: bool = False,
    progress: Callable[[str], None] | None = None,
) -> Any:
    """The ``onnx.ModelProto`` of a TEST-phase ``Net`` with its current weights and shapes.

    ``dynamic_batch`` makes axis 0 of every input (and what follows from it) symbolic;
    ``fold_batchnorm`` folds BatchNorm, and the per-channel Scale/Bias after it, into the
    weights of the Convolution or InnerProduct they follow. ``progress(stage)`` is told of
    each stage (the check of a large model takes seconds). Raises ConfigError for a layer
    with no faithful ONNX form, naming it.
    """
    tell = progress or (lambda stage: None)
    onnx = require_onnx()
    newest = onnx.defs.onnx_opset_version()
    if not MIN_OPSET <= opset <= newest:
        raise ConfigError(f"opset {opset} is not supported: give {MIN_OPSET} to {newest}")
    if net.phase != pb.TEST:
        raise ConfigError("export a TEST-phase net (Dropout and batch statistics differ in TRAIN)")
    g = OnnxGraph(opset, dynamic_batch)
    tell(f"converting {len(net.layers)} layers to ONNX opset {opset}")
    tensors = _convert_layers(net, g)
    if fold_batchnorm:
        fold_channel_affine(g)
    tell(f"checking {len(g.nodes)} nodes (onnx.checker, shape inference)")
    return _model(net, g, tensors)


def _convert_layers(net: Any, g: OnnxGraph) -> dict[str, str]:
    """Convert every layer; returns each Caffe blob's final ONNX tensor name."""
    if not net.inputs:
        raise ConfigError(
            "the net has no Input layer (or input: fields): export a deploy prototxt, whose "
            "inputs are declared, not read from a database"
        )
    current: dict[str, str] = {}
    for name in net.inputs:
        current[name] = g.reserve(name)
    for name in net.outputs:
        g.reserve(name)
    for layer in net.layers:
        bottoms, tops = layer.layer_param.bottom, layer.layer_param.top
        if layer.type in _INPUT_TYPES:
            continue
        site = Site(
            layer,
            [current[b] for b in bottoms],
            [tuple(net.blobs[b].shape) for b in bottoms],
            [tuple(net.blobs[t].shape) for t in tops],
        )
        converter = CONVERTERS.get(layer.type)
        if converter is None:
            raise site.refuse(_unconvertible(layer.type))
        for top, tensor in zip(tops, converter(g, site)):
            current[top] = tensor
    return current


def _unconvertible(layer_type: str) -> str:
    """Why a layer type with no converter is refused, and what to export instead."""
    if layer_type == "Python":
        return "a Python layer runs user code, which ONNX cannot carry"
    if layer_type in DATA_LAYER_PARAMS:
        return (
            "a data layer reads its inputs from a source; export the deploy prototxt, "
            "whose inputs are Input layers"
        )
    if layer_type.endswith("Loss") or layer_type in ("Accuracy", "HDF5Output"):
        return (
            "it serves training or evaluation, not deployment; export the deploy prototxt, "
            "which leaves it out"
        )
    return "ONNX has no operator with this layer's semantics"


def _model(net: Any, g: OnnxGraph, tensors: dict[str, str]) -> Any:
    """Name the outputs, assemble, check and shape-infer the model."""
    onnx = g.onnx
    helper = onnx.helper
    produced = {out: node for node in g.nodes for out in node.output}
    consumed = Counter(name for node in g.nodes for name in node.input)
    finals = Counter(tensors[name] for name in net.outputs)
    for name in net.outputs:
        tensor = tensors[name]
        if tensor == name:
            continue
        node = produced.get(tensor)
        if node is not None and not consumed[tensor] and finals[tensor] == 1:
            node.output[list(node.output).index(tensor)] = name
        else:
            g.nodes.append(helper.make_node("Identity", [tensor], [name], name=g.fresh(name)))

    def value_info(name: str) -> Any:
        shape: list[Any] = list(net.blobs[name].shape)
        if g.dynamic_batch:
            # outputs: the rank only; shape inference fills in what it can derive
            shape = [BATCH, *shape[1:]] if name in net.inputs else [None] * len(shape)
        return helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, shape)

    used = {name for node in g.nodes for name in node.input}
    graph = helper.make_graph(
        g.nodes,
        net.name or "netforge",
        [value_info(name) for name in net.inputs],
        [value_info(name) for name in net.outputs],
        initializer=[t for t in g.initializers if t.name in used],
    )
    opsets = [helper.make_opsetid("", g.opset)]
    from netforge import __version__

    model = helper.make_model(
        graph, opset_imports=opsets, producer_name="netforge", producer_version=__version__
    )
    model.ir_version = helper.find_min_ir_version_for(opsets)
    try:
        onnx.checker.check_model(model, full_check=True)
        model = onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        raise ConfigError(f"net {net.name!r}: the exported ONNX graph is invalid: {exc}") from exc
    return model


def save_onnx(model: Any, path: str | os.PathLike) -> None:
    """Write ``model`` to ``path`` atomically; DataError when it cannot be written."""
    from netforge.atomic import atomic_write

    try:
        with atomic_write(path, "wb") as handle:
            handle.write(model.SerializeToString())
    except OSError as exc:
        raise DataError(
            f"{os.fspath(path)}: cannot write the ONNX model: {exc.strerror or exc}"
        ) from None


# -- folding ------------------------------------------------------------------------------
def _channel_affine(g: OnnxGraph, node: Any, channels: int, rank: int) -> tuple[Any, Any] | None:
    """(a, b) when ``node`` computes y = a·x + b per channel (axis 1) from constants:
    BatchNormalization, or Mul/Add by a per-channel constant; else None."""
    per_channel = (channels,) + (1,) * (rank - 2)
    if node.op_type == "BatchNormalization":
        gamma, beta, mean, var = (g.constants.get(n) for n in node.input[1:5])
        if any(v is None for v in (gamma, beta, mean, var)):
            return None
        eps = next(a.f for a in node.attribute if a.name == "epsilon")
        a = gamma.astype(np.float64) / np.sqrt(var.astype(np.float64) + np.float32(eps))
        return a, beta - mean.astype(np.float64) * a
    if node.op_type in ("Mul", "Add") and node.input[1] in g.constants:
        value = g.constants[node.input[1]]
        if value.shape != per_channel:
            return None
        value = value.reshape(channels).astype(np.float64)
        if node.op_type == "Mul":
            return value, np.zeros(channels)
        return np.ones(channels), value
    return None


def fold_channel_affine(g: OnnxGraph) -> None:
    """Fold each chain of per-channel affine nodes (BatchNorm, Scale's Mul and Add) that
    alone reads a Conv's or Gemm's output into that node's weight and bias, in float64."""
    consumers: dict[str, list[Any]] = {}
    for node in g.nodes:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    # A folded node's output becomes its reader's, whose own readers the map already holds.
    folded: set[int] = set()
    for node in g.nodes:
        if node.op_type not in ("Conv", "Gemm"):
            continue
        while node.input[1] in g.constants:
            readers = consumers.get(node.output[0], [])
            if len(readers) != 1:
                break
            weight = g.constants[node.input[1]].astype(np.float64)
            if node.op_type == "Conv":
                channels, rank, out_axis = weight.shape[0], weight.ndim, 0
            else:
                trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
                out_axis = 0 if trans_b else 1
                channels, rank = weight.shape[out_axis], 2
            affine = _channel_affine(g, readers[0], channels, rank)
            if affine is None:
                break
            a, b = affine
            shape = [1] * weight.ndim
            shape[out_axis] = channels
            bias = g.constants[node.input[2]] if len(node.input) > 2 else np.zeros(channels)
            new_bias = a * bias.astype(np.float64) + b
            del node.input[1:]
            node.input.append(g.const(weight * a.reshape(shape), f"{node.name}/folded_weight"))
            node.input.append(g.const(new_bias, f"{node.name}/folded_bias"))
            node.output[0] = readers[0].output[0]
            folded.add(id(readers[0]))
    g.nodes[:] = [node for node in g.nodes if id(node) not in folded]


def export_onnx_file(
    model: str | os.PathLike,
    weights: str | os.PathLike,
    output: str | os.PathLike,
    *,
    opset: int = DEFAULT_OPSET,
    dynamic_batch: bool = False,
    fold_batchnorm: bool = False,
    progress: Callable[[str], None] | None = None,
) -> Any:
    """Export the deploy prototxt ``model`` with ``weights`` (a file or ``zoo:NAME``) to
    ``output``; returns the ModelProto. A Python layer is refused before any code runs.
    ``progress(stage)`` is told of each stage."""
    tell = progress or (lambda stage: None)
    from netforge.net import Net
    from netforge.prototxt import read_net
    from netforge.weights import resolve_weights

    param = read_net(model)
    param.state.phase = pb.TEST
    for layer in filter_net(param, param.state).layer:
        # refused before the net is built: a Python layer would import and run its
        # module, a data layer would open its source
        if layer.type == "Python" or layer.type in DATA_LAYER_PARAMS:
            raise ConfigError(
                f"{model}: layer {layer.name!r} ({layer.type}): {_unconvertible(layer.type)}; "
                "it cannot be exported to ONNX"
            )
    tell(f"building {model} with the weights of {weights}")
    net = Net(param, phase=pb.TEST, allow_python_layers=False)
    source = resolve_weights(weights)
    missing = net.copy_from(source).missing
    if missing:
        # weights are matched by layer name: a renamed layer would be exported with its
        # random initialisation, which only a wrong deployment would reveal
        raise DataError(
            f"{source}: no weights for layer(s) {', '.join(missing)} of {model} (weights are "
            "copied by layer name); export only a net whose weights file covers every layer "
            "with parameters"
        )
    onnx_model = net_to_onnx(
        net,
        opset=opset,
        dynamic_batch=dynamic_batch,
        fold_batchnorm=fold_batchnorm,
        progress=progress,
    )
    tell(f"writing {os.fspath(output)}")
    save_onnx(onnx_model, output)
    return onnx_model
