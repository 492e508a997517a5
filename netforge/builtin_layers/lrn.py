"""Local response normalization: Caffe's LRN layer (src/caffe/layers/lrn_layer.cpp), both
regions, as whole-array sums over window offsets."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from netforge.blob import Blob
from netforge.builtin_layers.conv_ops import (
    Workspace,
)
from netforge.layer import Layer, register
from netforge.proto import pb


# -- local response normalization ----------------------------------------------------------
@register("LRN")
class LRNLayer(Layer):
    """Caffe's LRN, y = x · scale^−β.

    ACROSS_CHANNELS: scale = k + α/n · Σ x² over the n channels centred on each channel
    (zero beyond the ends). WITHIN_CHANNEL: scale = 1 + α/n² · Σ x² over the n × n window
    centred on each pixel (zero padded); Caffe builds it from Power, AVE Pooling and
    Eltwise layers, whose shift is 1, so ``k`` is ignored there, as here. Backward is the
    exact gradient: dx = dy · scale^−β − (2αβ / size) · x · Σ_window(dy · y / scale), where
    size is n or n², and the window sum is the same centred sum (it is self-adjoint).
    """

    bottoms = (1, 1)
    tops = (1, 1)
    reshape_follows_shapes = True

    def setup(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        p = self.layer_param.lrn_param
        self.size = p.local_size
        if self.size % 2 == 0:
            raise self.config_error(f"local_size must be odd, got {self.size}")
        self.half = (self.size - 1) // 2
        self.alpha, self.beta = p.alpha, p.beta
        self.across = p.norm_region == pb.LRNParameter.ACROSS_CHANNELS
        self.k = p.k if self.across else 1.0
        self.norm = self.size if self.across else self.size * self.size
        #: the axes a window spans: channels, or height and width
        self.axes = (1,) if self.across else (2, 3)
        self.ws = Workspace()

    def reshape(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        if bottom[0].num_axes != 4:
            raise self.shape_error(
                f"bottom must be (num, channels, height, width), got {bottom[0].shape}"
            )
        top[0].reshape(bottom[0].shape)

    def _bordered(self, axis: int, shape: Sequence[int], dtype: Any) -> tuple[Any, Any]:
        """The window buffer of ``axis``: ``shape`` with a zero border of half a window on
        both sides of that axis (written once), and the view of its interior."""
        padded = list(shape)
        padded[axis] += 2 * self.half
        buf = self.ws.get(f"window{axis}", padded, dtype, self.xp, fill=0)
        index = [slice(None)] * len(shape)
        index[axis] = slice(self.half, self.half + shape[axis])
        return buf, buf[tuple(index)]

    def _summand(self, shape: Sequence[int], dtype: Any) -> Any:
        """Where to write the values ``_window_sum`` sums: the first buffer's interior."""
        return self._bordered(self.axes[0], shape, dtype)[1]

    def _window_sum(self, out: Any) -> None:
        """Write into ``out`` the centred window sums (zero outside) of what ``_summand``
        holds: across channels, or in-plane one axis after the other."""
        xp, shape = self.xp, out.shape
        for i, axis in enumerate(self.axes):
            buf, _ = self._bordered(axis, shape, out.dtype)
            last = i == len(self.axes) - 1
            total = out if last else self._bordered(self.axes[i + 1], shape, out.dtype)[1]
            index = [slice(None)] * len(shape)
            for offset in range(self.size):
                index[axis] = slice(offset, offset + shape[axis])
                if offset == 0:
                    xp.copyto(total, buf[tuple(index)])
                else:
                    xp.add(total, buf[tuple(index)], out=total)

    def forward(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        # Every intermediate lives in the workspace: CaffeNet's norm1 has 9 MB per array,
        # and fresh temporaries that size fault their pages in at every pass.
        xp, ws = self.xp, self.ws
        x = bottom[0].data
        xp.multiply(x, x, out=self._summand(x.shape, x.dtype))
        self.scale = ws.get("scale", x.shape, x.dtype, xp)
        self._window_sum(self.scale)
        self.scale *= self.alpha / self.norm
        self.scale += self.k
        self.factor = xp.power(self.scale, -self.beta, out=ws.get("factor", x.shape, x.dtype, xp))
        # In place, backward reads x back as y · scale^β; keep the input instead.
        self.input = None
        if top[0] is bottom[0]:
            self.input = ws.get("input", x.shape, x.dtype, xp)
            xp.copyto(self.input, x)
        xp.multiply(x, self.factor, out=top[0].data)

    def backward(
        self, top: Sequence[Blob], propagate_down: Sequence[bool], bottom: Sequence[Blob]
    ) -> None:
        if not propagate_down[0]:
            return
        xp = self.xp
        dy, y = top[0].diff, top[0].data
        x = bottom[0].data if self.input is None else self.input
        ratio = self._summand(dy.shape, dy.dtype)
        xp.multiply(dy, y, out=ratio)
        xp.divide(ratio, self.scale, out=ratio)
        summed = self.ws.scratch.get("summed", dy.shape, dy.dtype, xp)
        self._window_sum(summed)
        summed *= x
        summed *= -2.0 * self.alpha * self.beta / self.norm
        # In place, dy is bottom's diff: each element is read before it is overwritten.
        dx = bottom[0].diff
        xp.multiply(dy, self.factor, out=dx)
        dx += summed
