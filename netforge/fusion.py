"""Fusion of BatchNorm → Scale → ReLU chains into one pass over memory, at inference and
in training.

The nets of the ResNet and MobileNet families follow each convolution with BatchNorm, Scale
(the affine part, with a bias) and ReLU, all in place on one blob: three layers, three or
more passes over the blob each way, where the blob needs one or two.

**Inference runs** (``FusedRun``). With global statistics the three compose to one
per-channel map,

    y = relu_slope(x·a + b),  a = s / sqrt(var + eps),  b = β − mean·a,

(mean, var = blob0, blob1 of BatchNorm times its 1/blob2, or 0 when blob2 is 0; s, β Scale's
factor and optional bias, 1 and 0 without Scale), which ``FusedRun`` applies:
``norm_kernels``' per-channel affine kernel with ReLU in the same pass when numba is enabled
(``_jit.enabled``), else numpy's in-place multiply, add and ReLU. Such a run is fused where
nothing can tell it from the layers one by one:

- consecutive layers: a BatchNorm with global statistics, then optionally a Scale with one
  bottom, a learned factor over the channel axis only and an optional bias, then optionally a
  ReLU (any ``negative_slope``), two layers at least; the Scale and ReLU in place on the
  BatchNorm's top (which may be its bottom), so no layer reads the values in between;
- none of them runs backward (``Net.layer_need_backward`` false: a deploy net) or carries a
  loss weight.

a and b are computed from the parameter blobs as they are at each pass, in float64: pycaffe
users edit ``net.params`` in place between forwards, and a folded copy would miss that. The
layers' own state for backward (BatchNorm's std, Scale's copy of x) is not written: no
backward reads it.

**Training runs** (``TrainingRun``): a BatchNorm with batch statistics, then a Scale as
above, then optionally a ReLU with ``negative_slope`` ≥ 0, in place likewise, none carrying
a loss weight, and either all of them and the BatchNorm's bottom in backward or none.
Forward is one call of ``norm_kernels.batch_norm_scale_train_forward`` (BatchNorm's passes,
the last of which writes relu(s·(x − mean)/std + β)); it updates the running statistics and
keeps x − mean and std as BatchNorm's own forward does. Backward, when the net's next
backward reaches the run whole with nothing watching the layers one by one, is one call of
``norm_kernels.batch_norm_scale_train_backward``: the ReLU's mask from the output, the
Scale's parameter gradients (those it learns) and BatchNorm's bottom gradient. Otherwise
(a backward hook, ``debug_info``, a backward starting inside the run, a layer of the run
run alone in between) the layers run their own backward, the Scale from the input it had in
the fused forward, rebuilt from BatchNorm's kept values before any layer of the run runs
alone (``Net._settle``, ``keep_scale_input``). Compiled kernels only: without numba the
layers run one by one.

Either kind is fused per pass only where the blob and parameters are numpy arrays (on cupy
the layers run one by one), the pass covers the whole run (``Net.forward_from_to`` with a
start or end inside it runs the layers), no forward hook is registered and ``debug_info`` is
off (``netforge.timing``, the data-parallel trainer and Caffe's debug lines see every
layer), and the environment variable ``NETFORGE_FUSE`` is not ``0`` (the switch to compare
or to rule fusion out). The layers reshape as they would one by one (``Net.reshape_layer``).
The values differ from the layers' by float rounding only (one rounding of x·a + b where
the layers round after BatchNorm and again after Scale; in training, the gradients' sums
likewise).

Measured with ``tools/bench_fusion.py`` (batch-1 ``Net.forward`` of the deploy nets, float32,
ms, fusion off → on, median of 5 alternating rounds of about 1 s on the shared 2-core
machine, load 1.3-1.5, so a few ms of spread):

- ResNet-50 (53 runs: 33 with ReLU, 20 BatchNorm + Scale before an Eltwise): numba kernels
  137 → 124, numpy path 142 → 125;
- MobileNet v1 (27 runs, all with ReLU): numba kernels 33 → 26, numpy path 52 → 46.

Per run, the fused pass costs about 30 µs of Python on a tiny blob (the three reshapes, the
checks, one fold and one kernel call) where the three layers cost 50.

ResNet-50's training at batch 8 (53 training runs), ``tools/bench_fusion.py --train
resnet50 --rounds 7 --seconds 3``: 1943 → 1730 ms per SGD iteration (lowest rounds 1761 →
1653). Per (8, 256, 56, 56) float32 run, the layers one by one take about 8.3 ms forward and
8 backward, the fused calls 3.0 and 3.6. In float64, ResNet-50's parameter gradients with
and without fusion agree to 3e-13 of each one's largest value; in float32 both stray from
float64's alike (median 2% of the largest value at batch 2 from random weights: BatchNorm's
backward cancels).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from netforge.builtin_layers import _jit, norm_kernels
from netforge.builtin_layers.activation import _leaky

if TYPE_CHECKING:
    from netforge.layer import Layer
    from netforge.net import Net

#: The environment variable that turns fusion off: ``0`` (or off, false, no).
SETTING = "NETFORGE_FUSE"


def enabled() -> bool:
    """Whether ``NETFORGE_FUSE`` allows fusion (read at each pass, so that a process can
    compare both)."""
    return os.environ.get(SETTING, "1").strip().lower() not in ("0", "off", "false", "no")


@dataclass(frozen=True)
class FusedRun:
    """Layers ``first`` … ``last`` of a net, applied as one per-channel pass: ``batch_norm``,
    then ``scale`` and ``relu`` when the run has them (None otherwise)."""

    first: int
    last: int
    batch_norm: Layer
    scale: Layer | None
    relu: Layer | None
    #: the blob's number of axes when the run was planned
    axes: int

    def forward(self, net: Net) -> bool:
        """Reshape the run's layers and apply them to the blob in one pass; False, with
        only the reshapes done, where the arrays are not numpy's (the caller then runs the
        layers)."""
        _reshape_layers(net, self.first, self.last)
        bn = self.batch_norm
        source = net.blobs[net.layer_bottoms[self.first][0]]
        target = net.blobs[net.layer_tops[self.first][0]]
        x = source.data
        # BatchNorm's blobs, then Scale's factors and bias (if any), flat.
        params = [
            b.data.reshape(-1) for b in (*bn.blobs, *(self.scale.blobs if self.scale else ()))
        ]
        if (
            type(x) is not np.ndarray
            or any(type(p) is not np.ndarray for p in params)
            # What the plan saw, unless the caller changed it since: the statistics used
            # (a layer attribute) and the number of axes (on which the Scale's axis counts).
            or not bn.use_global_stats
            or x.ndim != self.axes
        ):
            return False
        x = x.reshape(x.shape[0], bn.channels, -1)
        # In place, the same array object: the kernel then writes through one name.
        y = x if target is source else target.data.reshape(x.shape)
        slope = None if self.relu is None else float(self.relu.slope)
        if _jit.usable(x, y, *params):
            factors, bias = (*params[3:], None, None)[:2]
            scale, shift = norm_kernels.batch_norm_fold(*params[:3], bn.eps, factors, bias, x.dtype)
            norm_kernels.channel_affine(x, scale, shift, y, slope=slope)
            return True
        scale, shift = self._coefficients(*params)
        np.multiply(x, scale[:, None], out=y)
        y += shift[:, None]
        if slope is not None:
            _leaky(np, y, slope, y)
        return True

    def _coefficients(
        self, mean_sum: np.ndarray, var_sum: np.ndarray, norm: np.ndarray, *scale: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """a and b of the module docstring, per channel, from BatchNorm's flat blobs and
        Scale's (factors, then bias, if any), computed in float64 and given in the blobs'
        type (``norm_kernels.batch_norm_fold`` on numpy's operations)."""
        # Caffe's BatchNorm: the statistics times 1/blob2, or 0 when blob2 is 0.
        factor = 0.0 if norm[0] == 0 else 1.0 / float(norm[0])
        a = 1.0 / np.sqrt(var_sum.astype(np.float64) * factor + self.batch_norm.eps)
        b = -factor * mean_sum.astype(np.float64) * a
        if scale:
            a *= scale[0]
            b *= scale[0]
        if len(scale) > 1:
            b += scale[1]
        return a.astype(mean_sum.dtype), b.astype(mean_sum.dtype)


@dataclass(frozen=True)
class TrainingRun:
    """Layers ``first`` … ``last`` of a net: a BatchNorm with batch statistics, a Scale and
    optionally a ReLU (``relu``, None otherwise), applied forward as one call and, when the
    net's next backward reaches them with nothing to see the layers one by one, backward as
    one call (``Net.backward_from_to``)."""

    first: int
    last: int
    batch_norm: Layer
    scale: Layer
    relu: Layer | None
    #: the blob's number of axes when the run was planned
    axes: int

    def _views(self, net: Net, diff: bool) -> tuple[np.ndarray, np.ndarray]:
        """The run's bottom and top, their data or diffs, as (N, C, rest) arrays: in place,
        one array object twice, so that a kernel writes through the one name it reads."""
        source = net.blobs[net.layer_bottoms[self.first][0]]
        target = net.blobs[net.layer_tops[self.first][0]]
        x = (source.diff if diff else source.data).reshape(
            source.shape[0], self.batch_norm.channels, -1
        )
        if target is source:
            return x, x
        return x, (target.diff if diff else target.data).reshape(x.shape)

    @property
    def _slope(self) -> float | None:
        return None if self.relu is None else float(self.relu.slope)

    def forward(self, net: Net) -> bool:
        """Reshape the run's layers and apply them in one call; False, with only the
        reshapes done, where the compiled kernels cannot take the arrays (the caller then
        runs the layers). The BatchNorm keeps what its own backward needs; the Scale's copy
        of its input is not written (``keep_scale_input`` writes it if needed)."""
        _reshape_layers(net, self.first, self.last)
        bn = self.batch_norm
        x, y = self._views(net, diff=False)
        factors = self.scale.blobs[0].data.reshape(-1)
        bias = (
            self.scale.blobs[1].data.reshape(-1)
            if len(self.scale.blobs) > 1
            else np.zeros(bn.channels, factors.dtype)
        )
        # What the plan saw, unless the caller changed it since (as for ``FusedRun``).
        axes = net.blobs[net.layer_bottoms[self.first][0]].num_axes
        if bn.use_global_stats or axes != self.axes or not _jit.usable(x, y, factors, bias):
            return False
        centered = bn.centered_buffer(x)
        mean, var = norm_kernels.batch_norm_scale_train_forward(
            x, y, centered, bn.eps, factors, bias, self._slope
        )
        bn.record_batch_statistics(mean, var, x)
        self.scale._x = None
        return True

    def keep_scale_input(self, net: Net) -> None:
        """What the Scale's own backward reads after a fused forward: its input, the
        BatchNorm's output (x − mean) / std, in the Scale's kept buffer."""
        bn, scale = self.batch_norm, self.scale
        kept = scale.kept_buffer(net.blobs[net.layer_bottoms[self.first + 1][0]])
        np.divide(bn._centered, bn._std[:, None], out=kept.reshape(bn._centered.shape))
        scale._x = kept

    def backward(self, net: Net) -> bool:
        """The run's backward in one call after its fused forward: the BatchNorm's bottom
        gradient and the Scale's parameter gradients (those it learns). False, having
        done nothing, where the compiled kernels cannot take the diffs."""
        dx, dy = self._views(net, diff=True)
        output = self._views(net, diff=False)[1]
        bn, scale = self.batch_norm, self.scale
        factors = scale.blobs[0].data.reshape(-1)
        if not _jit.usable(dx, dy, output, factors):
            return False
        sums = norm_kernels.batch_norm_scale_train_backward(
            dy, output, bn._centered, bn._std, factors, dx, self._slope
        )
        learns = scale.param_propagate_down
        for k, blob in enumerate(scale.blobs):
            if learns[k]:
                blob.diff += sums[:, k].reshape(blob.shape)
        return True


def _reshape_layers(net: Net, first: int, last: int) -> None:
    """Layers ``first`` … ``last``'s reshapes, as they would run one by one."""
    for i in range(first, last + 1):
        net.reshape_layer(i, net._blobs_of(net.layer_bottoms[i]), net._blobs_of(net.layer_tops[i]))


def plan(net: Net) -> dict[int, FusedRun | TrainingRun]:
    """The runs of ``net`` that forward may fuse (see the module docstring), by the index of
    their first layer."""
    runs = {}
    i = 0
    while i < len(net.layers):
        run = _run_at(net, i) or _training_run_at(net, i)
        if run is None:
            i += 1
            continue
        runs[i] = run
        i = run.last + 1
    return runs


def _inert(net: Net, i: int) -> bool:
    """Whether layer ``i`` never runs backward and weighs no loss: its forward is all that
    can observe it."""
    return not net.layer_need_backward[i] and not _weighs_loss(net, i)


def _weighs_loss(net: Net, i: int) -> bool:
    return any(weight for _, weight in net._layer_loss[i])


def _in_place_on(net: Net, i: int, name: str, kind: str) -> bool:
    """Whether layer ``i`` is a ``kind`` layer with one bottom and one top, both ``name``."""
    return (
        i < len(net.layers)
        and net.layers[i].type == kind
        and net.layer_bottoms[i] == [name]
        and net.layer_tops[i] == [name]
    )


def _run_at(net: Net, i: int) -> FusedRun | None:
    """The inference run starting with layer ``i``, or None where none does."""
    bn = net.layers[i]
    if bn.type != "BatchNorm" or not bn.use_global_stats or not _inert(net, i):
        return None
    blob = net.layer_tops[i][0]
    j = i + 1
    scale = relu = None
    if (
        _in_place_on(net, j, blob, "Scale")
        and _inert(net, j)
        and _channel_scale(net, j, bn.channels)
    ):
        scale = net.layers[j]
        j += 1
    if _in_place_on(net, j, blob, "ReLU") and _inert(net, j):
        relu = net.layers[j]
        j += 1
    if j == i + 1:
        return None  # BatchNorm alone: its own forward is that one pass already
    return FusedRun(i, j - 1, bn, scale, relu, net.blobs[blob].num_axes)


def _training_run_at(net: Net, i: int) -> TrainingRun | None:
    """The batch-statistics run starting with layer ``i``, or None where none does."""
    bn = net.layers[i]
    if bn.type != "BatchNorm" or bn.use_global_stats:
        return None
    blob = net.layer_tops[i][0]
    j = i + 1
    if not (_in_place_on(net, j, blob, "Scale") and _channel_scale(net, j, bn.channels)):
        return None
    relu = None
    if _in_place_on(net, j + 1, blob, "ReLU") and net.layers[j + 1].slope >= 0:
        relu = net.layers[j + 1]
    last = j + (relu is not None)
    layers = range(i, last + 1)
    if any(_weighs_loss(net, k) for k in layers):
        return None
    # Backward fused too: every layer of the run, and the BatchNorm's bottom, take part in
    # it, or none does (a net that never runs backward there).
    backward = [net.layer_need_backward[k] for k in layers] + [net.bottom_need_backward[i][0]]
    if any(backward) and not all(backward):
        return None
    return TrainingRun(i, last, bn, net.layers[j], relu, net.blobs[blob].num_axes)


def _channel_scale(net: Net, i: int, channels: int) -> bool:
    """Whether Scale layer ``i`` multiplies by a learned factor per channel of the blob's
    axis 1 (and adds a learned bias of the same shape, if any)."""
    layer = net.layers[i]
    param = layer.layer_param.scale_param
    axes = net.blobs[net.layer_bottoms[i][0]].num_axes
    if axes < 2 or param.axis % axes != 1 or not -axes <= param.axis < axes:
        return False
    return all(blob.shape == (channels,) for blob in layer.blobs) and len(layer.blobs) == (
        1 + param.bias_term
    )
