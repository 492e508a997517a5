"""pycaffe's ``caffe.Classifier``: a Net that classifies images by scaling, centre cropping
or oversampling (BVLC ``python/caffe/classifier.py``)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from netforge import io
from netforge.backend import to_numpy
from netforge.errors import ConfigError, ShapeError
from netforge.net import Net
from netforge.proto import pb


def _input_blob(net: Net) -> str:
    if not net.inputs:
        raise ConfigError(f"net {net.name!r} has no input blob to feed images to")
    name = net.inputs[0]
    if len(net.blobs[name].shape) != 4:
        raise ShapeError(
            f"input {name!r} of net {net.name!r} is {net.blobs[name].shape}, not N x C x H x W"
        )
    return name


def configure_transformer(
    net: Net,
    mean: Any = None,
    input_scale: float | None = None,
    raw_scale: float | None = None,
    channel_swap: Sequence[int] | None = None,
) -> io.Transformer:
    """The Transformer that Classifier and Detector set up for a net's first input: HWC to
    CHW, then each preprocessing option that is not None."""
    in_ = _input_blob(net)
    transformer = io.Transformer({in_: net.blobs[in_].shape})
    transformer.set_transpose(in_, (2, 0, 1))
    if mean is not None:
        transformer.set_mean(in_, mean)
    if input_scale is not None:
        transformer.set_input_scale(in_, input_scale)
    if raw_scale is not None:
        transformer.set_raw_scale(in_, raw_scale)
    if channel_swap is not None:
        transformer.set_channel_swap(in_, channel_swap)
    return transformer


class Classifier(Net):
    """A deploy net for image class prediction, pycaffe's ``caffe.Classifier``.

    ``Classifier(model_file, pretrained_file, image_dims=None, mean=None, input_scale=None,
    raw_scale=None, channel_swap=None)`` builds the net in the TEST phase with the weights
    and a :class:`netforge.io.Transformer` for its first input. ``image_dims`` (height,
    width) is the size images are scaled to before cropping, by default the net's input
    size. Keyword arguments beyond pycaffe's (``allow_python_layers``, ``backend``...) go to
    :class:`netforge.Net`.
    """

    def __init__(
        self,
        model_file: str | os.PathLike | pb.NetParameter,
        pretrained_file: str | os.PathLike | None,
        image_dims: Sequence[int] | None = None,
        mean: Any = None,
        input_scale: float | None = None,
        raw_scale: float | None = None,
        channel_swap: Sequence[int] | None = None,
        **net_options: Any,
    ) -> None:
        super().__init__(model_file, pb.TEST, weights=pretrained_file, **net_options)
        self.transformer = configure_transformer(self, mean, input_scale, raw_scale, channel_swap)
        self.crop_dims = np.array(self.blobs[self.inputs[0]].shape[2:])
        if image_dims is None or not len(image_dims):
            image_dims = self.crop_dims
        self.image_dims = image_dims

    def predict(self, inputs: Sequence[np.ndarray], oversample: bool = True) -> np.ndarray:
        """Class probabilities, (N, classes), of N (H, W, K) images (the net's first
        output).

        Each image is resized to ``image_dims``; with ``oversample`` (the default) the
        predictions of its ten crops (four corners, centre, and their mirrors; see
        :func:`netforge.io.oversample`) are averaged, otherwise its centre crop is used.
        """
        if not len(inputs):
            raise ConfigError("predict needs at least one image")
        in_ = self.inputs[0]
        dims = (int(self.image_dims[0]), int(self.image_dims[1]))
        channels = np.asarray(inputs[0]).shape[2]
        batch = np.zeros((len(inputs), *dims, channels), dtype=np.float32)
        for ix, image in enumerate(inputs):
            batch[ix] = io.resize_image(image, dims)
        crop_h, crop_w = (int(d) for d in self.crop_dims)
        if crop_h > dims[0] or crop_w > dims[1]:
            raise ShapeError(
                f"cannot crop the net's {crop_h}x{crop_w} input from images resized to "
                f"{dims[0]}x{dims[1]}: image_dims must be at least the input size"
            )
        if oversample:
            batch = io.oversample(batch, self.crop_dims)
        else:
            top = int(dims[0] / 2.0 - crop_h / 2.0)
            left = int(dims[1] / 2.0 - crop_w / 2.0)
            batch = batch[:, top : top + crop_h, left : left + crop_w, :]
        caffe_in = np.stack([self.transformer.preprocess(in_, image) for image in batch])
        predictions = to_numpy(self.forward_all(**{in_: caffe_in})[self.outputs[0]])
        if oversample:
            predictions = predictions.reshape(len(predictions) // 10, 10, -1).mean(1)
        return predictions
