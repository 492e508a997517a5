"""Caffe's Crop layer (src/caffe/layers/crop_layer.cpp)."""

from __future__ import annotations

from collections.abc import Sequence

from netforge.blob import Blob
from netforge.layer import Layer, register


# -- crop ----------------------------------------------------------------------------------
@register("Crop")
class CropLayer(Layer):
    """Caffe's Crop: bottom[0] cropped to bottom[1]'s shape on every axis from ``axis`` on,
    starting at ``offset`` (none: 0; one value: all cropped axes; else one per cropped
    axis). Backward pads the top's gradient back with zeros; bottom[1] only gives a shape,
    so its gradient is zero."""

    bottoms = (2, 2)
    tops = (1, 1)

    def setup(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        param = self.layer_param.crop_param
        ndim = bottom[0].num_axes
        if not -ndim <= param.axis < max(ndim, 1):
            raise self.config_error(f"axis {param.axis} is out of range for {bottom[0].shape}")
        self.axis = param.axis % ndim
        self.offsets = list(param.offset)
        if len(self.offsets) > 1 and self.axis + len(self.offsets) != ndim:
            raise self.config_error(
                f"{len(self.offsets)} offsets given for {ndim - self.axis} cropped axes "
                f"(axis {self.axis} on): give one offset, or one per cropped axis"
            )

    def reshape(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        big, ref = bottom[0].shape, bottom[1].shape
        if len(ref) != len(big):
            raise self.shape_error(f"bottoms have different numbers of axes: {big} vs {ref}")
        index, shape = [], []
        for i, size in enumerate(big):
            if i < self.axis:
                index.append(slice(None))
                shape.append(size)
                continue
            offset = 0
            if len(self.offsets) == 1:
                offset = self.offsets[0]
            elif self.offsets:
                offset = self.offsets[i - self.axis]
            if size - offset < ref[i]:
                raise self.shape_error(
                    f"cannot crop {ref[i]} elements at offset {offset} from axis {i} of size {size}"
                )
            index.append(slice(offset, offset + ref[i]))
            shape.append(ref[i])
        self.index = tuple(index)
        top[0].reshape(shape)

    def forward(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        top[0].data[...] = bottom[0].data[self.index]

    def backward(
        self, top: Sequence[Blob], propagate_down: Sequence[bool], bottom: Sequence[Blob]
    ) -> None:
        if propagate_down[0]:
            diff = bottom[0].diff
            diff.fill(0)
            diff[self.index] = top[0].diff
        if propagate_down[1]:
            bottom[1].diff.fill(0)
