"""Layers whose tops are not computed from bottoms: Input, DummyData, Parameter."""

from __future__ import annotations

from collections.abc import Sequence

from netforge.blob import Blob
from netforge.filler import fill
from netforge.layer import Layer, register
from netforge.proto import pb


def _dims(shape: pb.BlobShape) -> tuple[int, ...]:
    return tuple(int(d) for d in shape.dim)


def per_top(values: Sequence, count: int, what: str, layer: Layer) -> list:
    """Caffe's rule for per-top settings: none, one for all tops, or exactly one per top."""
    if len(values) == 1:
        return list(values) * count
    if len(values) != count:
        raise layer.config_error(f"give one {what} for all tops or one per top ({count})")
    return list(values)


@register("Input")
class InputLayer(Layer):
    """The net's input blobs; the caller writes their data (deploy nets)."""

    bottoms = (0, 0)
    tops = (1, None)

    def setup(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        shapes = self.layer_param.input_param.shape
        if shapes:
            for blob, shape in zip(top, per_top(shapes, len(top), "shape", self)):
                blob.reshape(_dims(shape))

    def reshape(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        """Tops keep the shape the caller (or setup) gave them."""

    def forward(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        """The data was written by the caller."""


@register("DummyData")
class DummyDataLayer(Layer):
    """Tops filled by fillers: constant ones once at setup, the others at every forward."""

    bottoms = (0, 0)
    tops = (1, None)

    def setup(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        p = self.layer_param.dummy_data_param
        legacy = [p.num, p.channels, p.height, p.width]
        if p.shape and any(legacy):
            raise self.config_error("give either 'shape' or num/channels/height/width, not both")
        if p.shape:
            shapes = [_dims(s) for s in per_top(p.shape, len(top), "shape", self)]
        else:
            columns = [
                per_top(values, len(top), name, self)
                for values, name in zip(legacy, ("num", "channels", "height", "width"))
            ]
            shapes = [tuple(int(v) for v in dims) for dims in zip(*columns)]
        fillers = list(p.data_filler) or [pb.FillerParameter(type="constant", value=0)]
        self.fillers = per_top(fillers, len(top), "data_filler", self)
        self.refill = [f.type != "constant" for f in self.fillers]
        for blob, shape, filler in zip(top, shapes, self.fillers):
            blob.reshape(shape)
            blob.data = self.backend.asarray(fill(filler, shape, self.rng, self.dtype))

    def reshape(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        """Shapes are fixed at setup."""

    def forward(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        for blob, filler, refill in zip(top, self.fillers, self.refill):
            if refill:
                blob.data = self.backend.asarray(fill(filler, blob.shape, self.rng, self.dtype))


@register("Parameter")
class ParameterLayer(Layer):
    """Exposes one learnable blob of ``parameter_param.shape`` as its top."""

    bottoms = (0, 0)
    tops = (1, 1)

    def setup(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        if not self.blobs:
            self.blobs.append(self.make_blob(_dims(self.layer_param.parameter_param.shape)))

    def reshape(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        top[0].reshape(self.blobs[0].shape)

    def forward(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        top[0].share_data(self.blobs[0])

    def backward(self, top, propagate_down, bottom) -> None:
        if self.param_propagate_down and self.param_propagate_down[0]:
            self.blobs[0].diff += top[0].diff
