"""pycaffe's ``caffe.Detector``: windowed detection (R-CNN style) by classifying warped image
crops, from a list of windows or from selective search proposals (BVLC
``python/caffe/detector.py``).

Selective search itself is not part of Caffe: pycaffe calls the external
``selective_search_ijcv_with_python`` package, which runs MATLAB. netforge calls it the same
way when it is installed, and otherwise says what is missing.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from netforge import io
from netforge.backend import to_numpy
from netforge.classifier import configure_transformer
from netforge.errors import ConfigError, ShapeError
from netforge.net import Net
from netforge.proto import pb

SELECTIVE_SEARCH_URL = "https://github.com/sergeyk/selective_search_ijcv_with_python"


class Detector(Net):
    """A deploy net that classifies windows of images, pycaffe's ``caffe.Detector``.

    ``Detector(model_file, pretrained_file, mean=None, input_scale=None, raw_scale=None,
    channel_swap=None, context_pad=None)``. With ``context_pad``, each window is enlarged so
    that a ``context_pad``-pixel border of the net's input is image context around it (as in
    R-CNN feature extraction); what falls outside the image is filled with the mean.
    Keyword arguments beyond pycaffe's go to :class:`netforge.Net`.
    """

    def __init__(
        self,
        model_file: str | os.PathLike | pb.NetParameter,
        pretrained_file: str | os.PathLike | None,
        mean: Any = None,
        input_scale: float | None = None,
        raw_scale: float | None = None,
        channel_swap: Sequence[int] | None = None,
        context_pad: int | None = None,
        **net_options: Any,
    ) -> None:
        super().__init__(model_file, pb.TEST, weights=pretrained_file, **net_options)
        self.transformer = configure_transformer(self, mean, input_scale, raw_scale, channel_swap)
        self.configure_crop(context_pad)

    def detect_windows(
        self, images_windows: Iterable[tuple[str | os.PathLike, Sequence[Sequence[int]]]]
    ) -> list[dict[str, Any]]:
        """Classify windows of images: ``images_windows`` pairs an image file with its
        windows (ymin, xmin, ymax, xmax). Each window is cropped (with context, see
        :meth:`crop`) and warped to the net's input size. Returns one
        ``{"window", "prediction", "filename"}`` dict per window, in input order."""
        images_windows = [(name, np.asarray(windows)) for name, windows in images_windows]
        crops = []
        for image_fname, windows in images_windows:
            image = io.load_image(image_fname)  # float32 already
            crops.extend(self.crop(image, window) for window in windows)
        if not crops:
            raise ConfigError("detect_windows was given no windows")
        in_ = self.inputs[0]
        caffe_in = np.stack([self.transformer.preprocess(in_, crop) for crop in crops])
        predictions = to_numpy(self.forward_all(**{in_: caffe_in})[self.outputs[0]])
        detections = []
        ix = 0
        for image_fname, windows in images_windows:
            for window in windows:
                detections.append(
                    {"window": window, "prediction": predictions[ix], "filename": image_fname}
                )
                ix += 1
        return detections

    def detect_selective_search(
        self, image_fnames: Iterable[str | os.PathLike]
    ) -> list[dict[str, Any]]:
        """Detect over selective search proposals, as pycaffe: needs the external
        ``selective_search_ijcv_with_python`` package and MATLAB."""
        try:
            import selective_search_ijcv_with_python as selective_search
        except ImportError:
            raise ConfigError(
                "selective search proposals need the external selective_search_ijcv_with_python "
                f"package and MATLAB ({SELECTIVE_SEARCH_URL}), as in pycaffe; install them, or "
                "give the windows yourself (Detector.detect_windows, detect.py --crop_mode list)"
            ) from None
        # Absolute paths, so that MATLAB finds the files.
        image_fnames = [os.path.abspath(f) for f in image_fnames]
        windows_list = selective_search.get_windows(image_fnames, cmd="selective_search_rcnn")
        return self.detect_windows(zip(image_fnames, windows_list))

    def crop(self, im: np.ndarray, window: Sequence[int]) -> np.ndarray:
        """The (H, W, K) crop of ``window`` = (ymin, xmin, ymax, xmax) from image ``im``.

        Without context padding this is ``im[ymin:ymax, xmin:xmax]``. With it, pycaffe's
        R-CNN warp: the box is scaled about its centre by ``size / (size - 2 context_pad)``
        (``size`` the net's input width), clipped to the image, resized to the part of the
        input it covers and placed on a canvas of the input size filled with the mean.
        """
        window = np.asarray(window)
        crop = im[int(window[0]) : int(window[2]), int(window[1]) : int(window[3])]
        if not self.context_pad:
            return crop
        crop_size = self.blobs[self.inputs[0]].shape[3]  # pycaffe assumes a square input
        scale = crop_size / (1.0 * crop_size - self.context_pad * 2)
        half_h = (window[2] - window[0] + 1) / 2.0
        half_w = (window[3] - window[1] + 1) / 2.0
        center = (window[0] + half_h, window[1] + half_w)
        scaled_dims = scale * np.array((-half_h, -half_w, half_h, half_w))
        box = np.round(np.tile(center, 2) + scaled_dims)
        full_h = box[2] - box[0] + 1
        full_w = box[3] - box[1] + 1
        scale_h = crop_size / full_h
        scale_w = crop_size / full_w
        pad_y = round(max(0, -box[0]) * scale_h)  # how far the box reaches outside
        pad_x = round(max(0, -box[1]) * scale_w)
        im_h, im_w = im.shape[:2]
        box = np.clip(box, 0.0, [im_h, im_w, im_h, im_w])
        clip_h = box[2] - box[0] + 1
        clip_w = box[3] - box[1] + 1
        if clip_h <= 0 or clip_w <= 0:
            raise ShapeError(f"window {window.tolist()} lies outside the {im_h}x{im_w} image")
        crop_h = min(round(clip_h * scale_h), crop_size - pad_y)
        crop_w = min(round(clip_w * scale_w), crop_size - pad_x)
        box = box.astype(int)
        context_crop = io.resize_image(im[box[0] : box[2], box[1] : box[3]], (crop_h, crop_w))
        crop = np.ones(self.crop_dims, dtype=np.float32) * self.crop_mean
        crop[pad_y : pad_y + crop_h, pad_x : pad_x + crop_w] = context_crop
        return crop

    def configure_crop(self, context_pad: int | None) -> None:
        """Set the crop size (the input's H, W, K) and the context padding; with padding,
        the mean in image space (before channel swap and raw scale) fills what lies
        outside the image."""
        in_ = self.inputs[0]
        transpose = self.transformer.transpose[in_]
        inverse = [transpose[t] for t in transpose]
        self.crop_dims = np.array(self.blobs[in_].shape[1:])[inverse]
        self.context_pad = context_pad
        if not context_pad:
            return
        mean = self.transformer.mean.get(in_)
        if mean is None:
            self.crop_mean = np.zeros(self.crop_dims, dtype=np.float32)
            return
        crop_mean = np.array(mean, dtype=np.float32).transpose(inverse)
        channel_order = self.transformer.channel_swap.get(in_)
        if channel_order is not None:
            crop_mean = crop_mean[:, :, [channel_order.index(i) for i in range(len(channel_order))]]
        raw_scale = self.transformer.raw_scale.get(in_)
        if raw_scale is not None:
            crop_mean /= raw_scale
        self.crop_mean = crop_mean
