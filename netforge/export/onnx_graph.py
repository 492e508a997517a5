"""The ONNX graph under construction: nodes, initializers and unique tensor names.

Converters (``onnx_layers.py``) add nodes through ``OnnxGraph``; it hides what depends on
the opset (a reduction's axes are an attribute before opset 18, an input from it on) and
keeps names unique, so a converter never thinks about either.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

#: The oldest opset exported: Softmax's ``axis`` means one axis (Caffe's) from opset 13 on.
MIN_OPSET = 13
#: The opset used unless the caller asks for another; every runtime in use reads it.
DEFAULT_OPSET = 17


def require_onnx() -> Any:
    """The ``onnx`` module, or a NetforgeError saying how to install it."""
    try:
        import onnx
    except ImportError as exc:
        from netforge.errors import ConfigError

        raise ConfigError(
            "ONNX export needs the onnx package: pip install 'netforge[onnx]'"
        ) from exc
    return onnx


class OnnxGraph:
    """Nodes and float32/int64 initializers of one graph, with unique names.

    ``dynamic_batch``: axis 0 of every input is symbolic; converters then derive shape
    arguments that copy the batch size (a 0 in Reshape) instead of fixing it.
    """

    def __init__(self, opset: int, dynamic_batch: bool) -> None:
        self.onnx = require_onnx()
        self.opset = opset
        self.dynamic_batch = dynamic_batch
        self.nodes: list[Any] = []
        self.initializers: list[Any] = []
        self.constants: dict[str, np.ndarray] = {}
        self._taken: set[str] = set()

    # -- names -----------------------------------------------------------------------------
    def reserve(self, name: str) -> str:
        """Claim ``name`` exactly (graph inputs and outputs keep Caffe's blob names)."""
        self._taken.add(name)
        return name

    def fresh(self, hint: str) -> str:
        """A new tensor or node name derived from ``hint``."""
        name, i = hint, 1
        while name in self._taken:
            name = f"{hint}_{i}"
            i += 1
        self._taken.add(name)
        return name

    # -- building --------------------------------------------------------------------------
    def const(self, value: Any, hint: str, dtype: Any = np.float32) -> str:
        """An initializer holding ``value`` (cast to ``dtype``); returns its name."""
        array = np.ascontiguousarray(np.asarray(value, dtype=dtype))
        name = self.fresh(hint)
        self.constants[name] = array
        self.initializers.append(self.onnx.numpy_helper.from_array(array, name))
        return name

    def ints(self, values: Sequence[int], hint: str) -> str:
        """An int64 initializer (shapes, axes, slice bounds)."""
        return self.const(list(values), hint, np.int64)

    def node(
        self,
        op: str,
        inputs: Sequence[str],
        hint: str,
        outputs: int = 1,
        **attrs: Any,
    ) -> Any:
        """Add one node; returns its output name, or a list when ``outputs`` > 1.

        An empty string in ``inputs`` is ONNX's "optional input left out".
        """
        names = [self.fresh(hint if outputs == 1 else f"{hint}:{i}") for i in range(outputs)]
        self.nodes.append(
            self.onnx.helper.make_node(
                op, list(inputs), names, name=self.fresh(f"{hint}/{op}"), **attrs
            )
        )
        return names[0] if outputs == 1 else names

    def reduce(self, op: str, x: str, axes: Sequence[int], hint: str, keepdims: int) -> str:
        """A Reduce* node over ``axes``: an attribute before opset 18 (13 for ReduceSum)."""
        axes_input = self.opset >= (13 if op == "ReduceSum" else 18)
        if axes_input:
            return self.node(op, [x, self.ints(axes, f"{hint}/axes")], hint, keepdims=keepdims)
        return self.node(op, [x], hint, axes=list(axes), keepdims=keepdims)

    def reshape(self, x: str, target: Sequence[int], hint: str) -> str:
        """Reshape to ``target`` (0 copies the input's dimension, -1 is inferred)."""
        return self.node("Reshape", [x, self.ints(target, f"{hint}/shape")], hint)

    def slice(
        self, x: str, starts: Sequence[int], ends: Sequence[int], axes: Sequence[int], hint: str
    ) -> str:
        """A Slice with constant bounds."""
        inputs = [x, self.ints(starts, f"{hint}/starts"), self.ints(ends, f"{hint}/ends")]
        return self.node("Slice", [*inputs, self.ints(axes, f"{hint}/axes")], hint)

    def dim(self, x: str, axis: int, hint: str) -> str:
        """Axis ``axis`` of ``x``'s runtime shape, a 1-element int64 tensor (the batch size
        of a dynamic-batch export, which no constant can give)."""
        shape = self.node("Shape", [x], f"{hint}/shape")
        return self.node("Gather", [shape, self.ints([axis], f"{hint}/axis")], hint, axis=0)

    def scaled(self, x: str, factor: float, hint: str) -> str:
        """``x · factor``, or ``x`` itself when the factor is 1."""
        if factor == 1:
            return x
        return self.node("Mul", [x, self.const(factor, f"{hint}/factor")], hint)
