"""Neuron (activation) layers: one bottom, one top of the same shape, element by element.

Each layer computes what Caffe's layer of the same type computes, forward and backward,
with the same parameters and defaults (src/caffe/layers/*_layer.cpp). All of them may run
in place (top is bottom): where backward needs the input that forward overwrote, forward
keeps it (or the part of it that backward needs), as Caffe's PReLU keeps ``bottom_memory_``.
Layers whose backward reads only the top (Sigmoid, TanH, Exp, Swish) need nothing kept.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from netforge.blob import Blob
from netforge.filler import filler_or
from netforge.layer import Layer, register
from netforge.proto import pb


class NeuronLayer(Layer):
    """Base of the element-wise layers (Caffe's NeuronLayer): top takes bottom's shape."""

    bottoms = (1, 1)
    tops = (1, 1)
    reshape_follows_shapes = True

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._kept: Any = None

    def reshape(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        top[0].reshape(bottom[0].shape)

    def _keep_input(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        """Copy the input before an in-place forward overwrites it (reusing the buffer)."""
        if top[0] is not bottom[0]:
            self._kept = None
            return
        x = bottom[0].data
        if self._kept is None or self._kept.shape != x.shape:
            self._kept = self.xp.empty_like(x)
        self._kept[...] = x

    def _input(self, bottom: Sequence[Blob]) -> Any:
        """The input forward saw: the kept copy after an in-place forward, else bottom's data."""
        return bottom[0].data if self._kept is None else self._kept


class _RectifierLayer(NeuronLayer):
    """ReLU and ELU: backward needs where x > 0. In place, the top's sign still tells that
    unless the negative side's coefficient is negative (which flips the sign of negative
    inputs); only then does forward keep the mask."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._positive: Any = None

    def _note_positive(self, bottom: Sequence[Blob], top: Sequence[Blob], flips: bool) -> None:
        """Before forward writes: keep ``x > 0`` when running in place with ``flips``."""
        self._positive = bottom[0].data > 0 if top[0] is bottom[0] and flips else None

    def _positive_input(self, bottom: Sequence[Blob]) -> Any:
        """Where the input forward saw was > 0."""
        return bottom[0].data > 0 if self._positive is None else self._positive


def _sigmoid(xp: Any, x: Any, out: Any = None) -> Any:
    """Caffe's sigmoid, 0.5·tanh(0.5·x) + 0.5 (no overflow for large |x|), into ``out``."""
    out = xp.multiply(x, 0.5, out=out)
    xp.tanh(out, out=out)
    out *= 0.5
    out += 0.5
    return out


#: Per dtype, a read-only flat array of zeros, grown as needed (``_zeros_like``).
_ZEROS: dict[np.dtype, np.ndarray] = {}


def _zeros_like(xp: Any, x: Any) -> Any:
    """Zero as the second operand of ``maximum`` / ``minimum`` with ``x``: on numpy a zero
    array of x's shape, on other array modules the scalar.

    numpy 2.4 runs ``maximum`` and ``minimum`` through SIMD loops only when both operands are
    arrays: on one core of a 2-core AMD EPYC, ``np.maximum(x, 0)`` on 819 K float32 values
    (CIFAR-10 quick's relu1) takes 270 µs, ``np.maximum(x, zeros)`` 56-87 µs. The zeros
    cost no memory traffic: ``np.zeros`` gets fresh pages from the kernel, which map one
    shared zero page until written, and this array is never written.
    """
    if xp is not np:
        return 0
    zeros = _ZEROS.get(x.dtype)
    if zeros is None or zeros.size < x.size:
        zeros = np.zeros(x.size, x.dtype)
        zeros.flags.writeable = False
        _ZEROS[x.dtype] = zeros
    return zeros[: x.size].reshape(x.shape)


# The element-wise layers below write into the top's (or bottom diff's) buffer with ``out=``
# and use Caffe's branch-free arithmetic, (x > 0) + slope·(x ≤ 0), rather than ``where``:
# on the CPU, fresh temporaries (page faults) and data-dependent selection cost 3-10x more.
def _leaky(xp: Any, x: Any, slope: Any, out: Any) -> None:
    """out = max(x, 0) + slope·min(x, 0); ``out`` may be ``x``."""
    zero = _zeros_like(xp, x)
    if isinstance(slope, float) and slope == 0:
        xp.maximum(x, zero, out=out)
        return
    negative_part = xp.minimum(x, zero)
    negative_part *= slope
    xp.maximum(x, zero, out=out)
    out += negative_part


def _leaky_backward(xp: Any, dy: Any, positive: Any, slope: Any, out: Any) -> None:
    """out = dy·((x > 0) + slope·(x ≤ 0)); ``out`` may be ``dy``."""
    factor = xp.multiply(xp.logical_not(positive), slope, dtype=dy.dtype)
    factor += positive
    xp.multiply(dy, factor, out=out)


@register("ReLU")
class ReLULayer(_RectifierLayer):
    """y = max(x, 0) + negative_slope·min(x, 0); dy/dx = 1 where x > 0, else negative_slope."""

    def setup(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        self.slope = self.layer_param.relu_param.negative_slope

    def forward(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        self._note_positive(bottom, top, self.slope < 0)
        _leaky(self.xp, bottom[0].data, self.slope, top[0].data)

    def backward(
        self, top: Sequence[Blob], propagate_down: Sequence[bool], bottom: Sequence[Blob]
    ) -> None:
        if not propagate_down[0]:
            return
        positive = self._positive_input(bottom)
        dy = top[0].diff
        if self.slope == 0:
            self.xp.multiply(dy, positive, out=bottom[0].diff)
        else:
            _leaky_backward(self.xp, dy, positive, self.slope, bottom[0].diff)


@register("PReLU")
class PReLULayer(NeuronLayer):
    """ReLU with a learned slope per channel (axis 1), or one shared slope.

    y = max(x, 0) + a_c·min(x, 0). The slope blob has shape (C,), or no axes when
    ``channel_shared`` (Caffe's ``Blob(vector<int>(0))``); its default filler is constant 0.25.
    """

    def setup(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        if bottom[0].num_axes < 2:
            raise self.shape_error(f"bottom needs at least 2 axes, got shape {bottom[0].shape}")
        param = self.layer_param.prelu_param
        self.channel_shared = param.channel_shared
        channels = bottom[0].shape[1]
        if not self.blobs:
            shape = () if self.channel_shared else (channels,)
            filler = filler_or(param, "filler", type="constant", value=0.25)
            self.blobs.append(self.make_blob(shape, filler))
        expected = 1 if self.channel_shared else channels
        if self.blobs[0].count != expected:
            raise self.shape_error(
                f"slope blob has {self.blobs[0].count} values but channel_shared is "
                f"{self.channel_shared} and the bottom has {channels} channels: fix the "
                "prototxt or the weights"
            )

    def reshape(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        if bottom[0].num_axes < 2:
            raise self.shape_error(f"bottom needs at least 2 axes, got shape {bottom[0].shape}")
        top[0].reshape(bottom[0].shape)

    def _slope(self, ndim: int) -> Any:
        """The slope shaped to broadcast over axis 1 of an ``ndim``-axis input."""
        slope = self.blobs[0].data
        if self.channel_shared:
            return slope.reshape(())
        return slope.reshape((-1,) + (1,) * (ndim - 2))

    def forward(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        xp = self.xp
        self._keep_input(bottom, top)
        x = bottom[0].data
        _leaky(xp, x, self._slope(x.ndim), top[0].data)

    def backward(
        self, top: Sequence[Blob], propagate_down: Sequence[bool], bottom: Sequence[Blob]
    ) -> None:
        xp = self.xp
        x = self._input(bottom)
        dy = top[0].diff
        # The slope's gradient first: in place, writing the bottom diff overwrites dy.
        if self.param_propagate_down[0]:
            contrib = xp.minimum(x, 0)  # x·(x ≤ 0)
            contrib *= dy
            if self.channel_shared:
                self.blobs[0].diff += contrib.sum()
            else:
                by_channel = contrib.reshape(x.shape[0], x.shape[1], -1)
                self.blobs[0].diff += by_channel.sum(axis=2).sum(axis=0)
        if propagate_down[0]:
            _leaky_backward(xp, dy, x > 0, self._slope(x.ndim), bottom[0].diff)


@register("ELU")
class ELULayer(_RectifierLayer):
    """y = x for x > 0, alpha·(exp(x) − 1) otherwise; dy/dx = 1 or y + alpha."""

    def setup(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        self.alpha = self.layer_param.elu_param.alpha

    def forward(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        xp = self.xp
        self._note_positive(bottom, top, self.alpha < 0)
        x = bottom[0].data
        top[0].data[...] = xp.maximum(x, 0) + self.alpha * (xp.exp(xp.minimum(x, 0)) - 1)

    def backward(
        self, top: Sequence[Blob], propagate_down: Sequence[bool], bottom: Sequence[Blob]
    ) -> None:
        if not propagate_down[0]:
            return
        positive = self._positive_input(bottom)
        _leaky_backward(self.xp, top[0].diff, positive, top[0].data + self.alpha, bottom[0].diff)


@register("Sigmoid")
class SigmoidLayer(NeuronLayer):
    """y = 1 / (1 + exp(−x)), computed as Caffe does as 0.5·tanh(0.5·x) + 0.5; dy/dx = y(1 − y)."""

    def forward(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        _sigmoid(self.xp, bottom[0].data, out=top[0].data)

    def backward(
        self, top: Sequence[Blob], propagate_down: Sequence[bool], bottom: Sequence[Blob]
    ) -> None:
        if propagate_down[0]:
            y = top[0].data
            factor = 1 - y
            factor *= y
            self.xp.multiply(top[0].diff, factor, out=bottom[0].diff)


@register("TanH")
class TanHLayer(NeuronLayer):
    """y = tanh(x); dy/dx = 1 − y²."""

    def forward(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        self.xp.tanh(bottom[0].data, out=top[0].data)

    def backward(
        self, top: Sequence[Blob], propagate_down: Sequence[bool], bottom: Sequence[Blob]
    ) -> None:
        if propagate_down[0]:
            y = top[0].data
            factor = y * y
            self.xp.subtract(1, factor, out=factor)
            self.xp.multiply(top[0].diff, factor, out=bottom[0].diff)


@register("AbsVal")
class AbsValLayer(NeuronLayer):
    """y = |x|; dy/dx = sign(x) (0 at 0).

    Caffe refuses to run AbsVal in place; netforge allows it by keeping the input.
    """

    def forward(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        self._keep_input(bottom, top)
        self.xp.abs(bottom[0].data, out=top[0].data)

    def backward(
        self, top: Sequence[Blob], propagate_down: Sequence[bool], bottom: Sequence[Blob]
    ) -> None:
        if propagate_down[0]:
            bottom[0].diff[...] = self.xp.sign(self._input(bottom)) * top[0].diff


@register("Power")
class PowerLayer(NeuronLayer):
    """y = (shift + scale·x)^power, with Caffe's special cases.

    When power·scale is 0 the input is ignored: y is 1 (power 0) or shift^power, and the
    gradient is 0. Backward uses Caffe's forms of the derivative power·scale·(shift +
    scale·x)^(power−1): a constant when power is 1, linear when power is 2, power·y/x when
    shift is 0, and power·scale·y/(shift + scale·x) otherwise (so, as in Caffe, an input
    where the base is 0 gives a non-finite gradient for those last two forms).
    """

    def setup(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        param = self.layer_param.power_param
        self.power, self.scale, self.shift = param.power, param.scale, param.shift
        self.diff_scale = self.power * self.scale

    def forward(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        if self.diff_scale == 0:
            # numpy's power: a negative shift to a fractional power is NaN, as C's pow gives.
            top[0].data[...] = 1.0 if self.power == 0 else np.power(self.shift, self.power)
            return
        self._keep_input(bottom, top)
        top[0].data[...] = (self.scale * bottom[0].data + self.shift) ** self.power

    def backward(
        self, top: Sequence[Blob], propagate_down: Sequence[bool], bottom: Sequence[Blob]
    ) -> None:
        if not propagate_down[0]:
            return
        dy = top[0].diff
        if self.diff_scale == 0:
            bottom[0].diff[...] = 0
            return
        if self.power == 1:
            bottom[0].diff[...] = self.diff_scale * dy
            return
        x = self._input(bottom)
        if self.power == 2:
            slope = self.diff_scale * self.scale * x + self.diff_scale * self.shift
        elif self.shift == 0:
            slope = self.power * top[0].data / x
        else:
            slope = self.diff_scale * top[0].data / (self.scale * x + self.shift)
        bottom[0].diff[...] = slope * dy


def _log_base(layer: Layer, base: float) -> float:
    """ln(base), with Caffe's convention that base −1 means e; other bases must be > 0."""
    if base == -1:
        return 1.0
    if base <= 0:
        raise layer.config_error(f"base must be strictly positive (or -1 for e), got {base}")
    return math.log(base)


@register("Exp")
class ExpLayer(NeuronLayer):
    """y = base^(shift + scale·x) (base −1 = e); dy/dx = y·scale·ln(base)."""

    def setup(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        param = self.layer_param.exp_param
        self.inner_scale = _log_base(self, param.base) * param.scale
        if param.shift == 0:
            self.outer_scale = 1.0
        elif param.base == -1:
            self.outer_scale = math.exp(param.shift)
        else:
            self.outer_scale = param.base**param.shift

    def forward(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        top[0].data[...] = self.outer_scale * self.xp.exp(self.inner_scale * bottom[0].data)

    def backward(
        self, top: Sequence[Blob], propagate_down: Sequence[bool], bottom: Sequence[Blob]
    ) -> None:
        if propagate_down[0]:
            bottom[0].diff[...] = self.inner_scale * top[0].data * top[0].diff


@register("Log")
class LogLayer(NeuronLayer):
    """y = log_base(shift + scale·x) (base −1 = e); dy/dx = scale / (ln(base)·(shift + scale·x))."""

    def setup(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        param = self.layer_param.log_param
        log_base = _log_base(self, param.base)
        if log_base == 0:
            raise self.config_error("base 1 has no logarithm: use a base other than 1")
        self.base_scale = 1.0 / log_base
        self.scale, self.shift = param.scale, param.shift

    def forward(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        self._keep_input(bottom, top)
        inner = self.scale * bottom[0].data + self.shift
        top[0].data[...] = self.base_scale * self.xp.log(inner)

    def backward(
        self, top: Sequence[Blob], propagate_down: Sequence[bool], bottom: Sequence[Blob]
    ) -> None:
        if propagate_down[0]:
            inner = self.scale * self._input(bottom) + self.shift
            bottom[0].diff[...] = top[0].diff * (self.scale * self.base_scale) / inner


#: BNLL's backward clamps its input here before exp, as Caffe's kBNLL_THRESHOLD.
BNLL_THRESHOLD = 50.0


@register("BNLL")
class BNLLLayer(NeuronLayer):
    """Binomial normal log likelihood, softplus: y = log(1 + exp(x)).

    Forward uses Caffe's overflow-free form max(x, 0) + log(1 + exp(−|x|)); backward is
    e/(e + 1) with e = exp(min(x, 50)).
    """

    def forward(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        xp = self.xp
        self._keep_input(bottom, top)
        x = bottom[0].data
        top[0].data[...] = xp.maximum(x, 0) + xp.log1p(xp.exp(-xp.abs(x)))

    def backward(
        self, top: Sequence[Blob], propagate_down: Sequence[bool], bottom: Sequence[Blob]
    ) -> None:
        if propagate_down[0]:
            e = self.xp.exp(self.xp.minimum(self._input(bottom), BNLL_THRESHOLD))
            bottom[0].diff[...] = top[0].diff * e / (e + 1)


@register("Threshold")
class ThresholdLayer(NeuronLayer):
    """y = 1 where x > threshold, else 0. Not differentiable: like Caffe, no backward."""

    def forward(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        threshold = self.layer_param.threshold_param.threshold
        top[0].data[...] = bottom[0].data > threshold


@register("Dropout")
class DropoutLayer(NeuronLayer):
    """Inverted dropout, as BVLC Caffe: in TRAIN each unit is kept with probability
    1 − dropout_ratio and kept units are scaled by 1/(1 − dropout_ratio); in TEST the layer
    is the identity. The mask comes from ``self.rng`` and backward reuses it.

    BVLC's DropoutParameter has no ``scale_train`` (a field of other forks, which scale at
    test time instead); netforge reads only ``dropout_ratio``.
    """

    def setup(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        self.ratio = self.layer_param.dropout_param.dropout_ratio
        if not 0 <= self.ratio < 1:
            raise self.config_error(f"dropout_ratio must be in [0, 1), got {self.ratio}")
        self.scale = 1.0 / (1.0 - self.ratio)
        self._mask: Any = None

    def forward(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        x = bottom[0].data
        if self.phase == pb.TRAIN:
            keep = self.random_uniform(x.shape) < 1.0 - self.ratio
            # The mask holds 0 or 1/(1 − ratio), so forward and backward are one multiply.
            self._mask = self.xp.multiply(keep, self.scale, dtype=self.dtype)
            self.xp.multiply(x, self._mask, out=top[0].data)
        elif top[0] is not bottom[0]:
            top[0].data[...] = x

    def backward(
        self, top: Sequence[Blob], propagate_down: Sequence[bool], bottom: Sequence[Blob]
    ) -> None:
        if not propagate_down[0]:
            return
        if self.phase == pb.TRAIN:
            self.xp.multiply(top[0].diff, self._mask, out=bottom[0].diff)
        elif top[0] is not bottom[0]:
            bottom[0].diff[...] = top[0].diff


@register("Swish")
class SwishLayer(NeuronLayer):
    """y = x·sigmoid(beta·x); dy/dx = beta·y + sigmoid(beta·x)·(1 − beta·y)."""

    def setup(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        self.beta = self.layer_param.swish_param.beta
        self._sig: Any = None

    def forward(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        x = bottom[0].data
        self._sig = _sigmoid(self.xp, self.beta * x)
        self.xp.multiply(x, self._sig, out=top[0].data)

    def backward(
        self, top: Sequence[Blob], propagate_down: Sequence[bool], bottom: Sequence[Blob]
    ) -> None:
        if propagate_down[0]:
            by = self.beta * top[0].data
            bottom[0].diff[...] = top[0].diff * (by + self._sig * (1 - by))


@register("Clip")
class ClipLayer(NeuronLayer):
    """y = max(min, min(x, max)); dy/dx = 1 where min ≤ x ≤ max (both ends included), else 0."""

    def setup(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        param = self.layer_param.clip_param
        if not (param.HasField("min") and param.HasField("max")):
            raise self.config_error("clip_param needs both min and max (Caffe requires them)")
        self.low, self.high = param.min, param.max
        self._inside: Any = None

    def forward(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        x = bottom[0].data
        # In place the clipped top cannot tell which inputs were outside; keep that mask.
        self._inside = (x >= self.low) & (x <= self.high) if top[0] is bottom[0] else None
        # max(min, min(x, max)) as Caffe orders it, so min wins when min > max.
        out = top[0].data
        self.xp.minimum(x, self.high, out=out)
        self.xp.maximum(out, self.low, out=out)

    def backward(
        self, top: Sequence[Blob], propagate_down: Sequence[bool], bottom: Sequence[Blob]
    ) -> None:
        if not propagate_down[0]:
            return
        inside = self._inside
        if inside is None:
            x = bottom[0].data
            inside = (x >= self.low) & (x <= self.high)
        bottom[0].diff[...] = top[0].diff * inside
