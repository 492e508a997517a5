"""Classify images with a deploy net: pycaffe's ``classify.py`` with ``--center_only``.

The preprocessing is pycaffe's ``caffe.Classifier`` + ``caffe.io.Transformer``: load the
image as RGB floats in [0, 1] (``caffe.io.load_image``), resize it to ``resize`` (the
``--images_dim``), take the centre crop of the net's input size, then per image: HWC to
CHW, channel swap (RGB to BGR), multiply by ``raw_scale``, subtract the per-channel mean
(``classify.py`` averages a mean image over its height and width), multiply by ``scale``
(``input_scale``). The net's first output is read as the class scores.

Where it differs: resizing is bilinear with half-pixel centres and edge clamping, which is
scikit-image's order-1 ``resize`` without its optional anti-aliasing.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from netforge.errors import ConfigError, DataError, ShapeError
from netforge.zoo.manifest import Preprocessing


@dataclass(frozen=True)
class Prediction:
    """One of an image's top-k classes."""

    index: int
    label: str
    score: float


def load_image(path: str | os.PathLike) -> np.ndarray:
    """An image file as float32 RGB (H, W, 3) in [0, 1]; grey is repeated, alpha dropped
    (``caffe.io.load_image`` with ``color=True``)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            rgb = image.convert("RGB")
    except (OSError, UnidentifiedImageError) as exc:
        raise DataError(f"{path}: cannot read image ({exc})") from exc
    return np.asarray(rgb, dtype=np.float32) / 255.0


def resize_image(image: np.ndarray, size: Sequence[int]) -> np.ndarray:
    """Bilinear resize of an (H, W, C) image to ``size`` = (height, width).

    Output pixel centres map to input coordinates ``(i + 0.5) * in / out - 0.5``, clamped
    to the image, as scikit-image's order-1 interpolation samples them.
    """
    height, width = image.shape[:2]
    out_h, out_w = int(size[0]), int(size[1])
    if (height, width) == (out_h, out_w):
        return image.astype(np.float32, copy=False)

    def axis(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        coords = np.clip((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0, n_in - 1)
        low = np.floor(coords).astype(np.intp)
        high = np.minimum(low + 1, n_in - 1)
        return low, high, (coords - low).astype(np.float32)

    y0, y1, wy = axis(height, out_h)
    x0, x1, wx = axis(width, out_w)
    wx = wx[None, :, None]
    rows0, rows1 = image[y0], image[y1]
    top = rows0[:, x0] * (1 - wx) + rows0[:, x1] * wx
    bottom = rows1[:, x0] * (1 - wx) + rows1[:, x1] * wx
    wy = wy[:, None, None]
    return (top * (1 - wy) + bottom * wy).astype(np.float32)


def centre_crop(images: np.ndarray, size: Sequence[int]) -> np.ndarray:
    """The centre (height, width) crop of (N, H, W, C) images, offsets rounded down as
    ``caffe.Classifier.predict`` computes them."""
    height, width = images.shape[1:3]
    if size[0] > height or size[1] > width:
        raise ShapeError(
            f"cannot crop {size[0]}x{size[1]} from {height}x{width} images: the resize "
            "must be at least the net's input size"
        )
    top = int(height / 2.0 - size[0] / 2.0)
    left = int(width / 2.0 - size[1] / 2.0)
    return images[:, top : top + size[0], left : left + size[1], :]


def channel_mean(path: str | os.PathLike) -> np.ndarray:
    """The per-channel mean of a mean file (``.npy`` (C, H, W) or a ``.binaryproto``)."""
    path = Path(path)
    if path.suffix == ".npy":
        try:
            mean = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise DataError(f"{path}: cannot read mean ({exc})") from exc
    else:
        from netforge.weights import read_mean

        mean = read_mean(path)
    if mean.ndim == 1:
        return mean.astype(np.float32)
    if mean.ndim != 3:
        raise ShapeError(f"{path}: a mean must be (C,) or (C, H, W), got shape {mean.shape}")
    return mean.mean(axis=(1, 2)).astype(np.float32)


def read_labels(path: str | os.PathLike) -> list[str]:
    """One label per line; surrounding quotes are dropped (some published synset files
    quote every line, as ``numpy.savetxt`` of strings writes them)."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise DataError(f"{path}: cannot read labels ({exc.strerror})") from exc
    labels = []
    for line in lines:
        line = line.strip()
        if len(line) >= 2 and line[0] == line[-1] and line[0] in "'\"":
            line = line[1:-1]
        if line:
            labels.append(line)
    return labels


def preprocess(
    images: Sequence[np.ndarray],
    pre: Preprocessing,
    input_size: Sequence[int],
    mean: np.ndarray | None = None,
) -> np.ndarray:
    """Stack RGB [0, 1] images into the net's (N, C, H, W) input, as described above.

    ``mean`` is the per-channel mean in the net's channel order (from ``mean_file``);
    ``pre.mean_values`` is used when it is None.
    """
    resize = pre.resize or tuple(input_size)
    batch = np.stack([resize_image(im, resize) for im in images])
    batch = centre_crop(batch, input_size)
    batch = batch.transpose(0, 3, 1, 2)[:, list(pre.channel_swap)] * np.float32(pre.raw_scale)
    if mean is None and pre.mean_values is not None:
        mean = np.asarray(pre.mean_values, dtype=np.float32)
    if mean is not None:
        if mean.shape != (batch.shape[1],):
            raise ShapeError(f"mean has {mean.shape[0]} channels, the images {batch.shape[1]}")
        batch = batch - mean[None, :, None, None]
    return (batch * np.float32(pre.scale)).astype(np.float32)


def classify(
    net: Any,
    images: Sequence[str | os.PathLike],
    pre: Preprocessing,
    *,
    mean: np.ndarray | None = None,
    labels: Sequence[str] | None = None,
    top_k: int = 5,
) -> list[list[Prediction]]:
    """Top-k predictions of ``net`` (a deploy Net) for each image file."""
    if not net.inputs:
        raise ConfigError(f"net {net.name!r} has no input blob to feed images to")
    name = net.inputs[0]
    shape = net.blobs[name].shape
    if len(shape) != 4:
        raise ShapeError(f"input {name!r} of net {net.name!r} is {shape}, not N×C×H×W")
    size = pre.input_size or tuple(shape[2:])
    batch = preprocess([load_image(p) for p in images], pre, size, mean)
    if batch.shape[1] != shape[1]:
        raise ShapeError(f"the net takes {shape[1]} channels; the images have {batch.shape[1]}")
    from netforge.backend import to_numpy

    scores = to_numpy(net.forward(**{name: batch})[net.outputs[0]])
    scores = scores.reshape(len(images), -1)
    if labels is not None and len(labels) != scores.shape[1]:
        raise ConfigError(f"{len(labels)} labels for a net with {scores.shape[1]} outputs")
    order = np.argsort(-scores, axis=1, kind="stable")[:, :top_k]
    return [
        [
            Prediction(int(i), labels[i] if labels is not None else str(int(i)), float(row[i]))
            for i in ranks
        ]
        for row, ranks in zip(scores, order)
    ]


@dataclass(frozen=True)
class ClassifySetup:
    """Everything ``classify`` needs, resolved from a zoo model or from explicit files."""

    model: Path
    weights: Path
    preprocessing: Preprocessing
    mean: np.ndarray | None
    labels: list[str] | None


def resolve_setup(
    weights: str,
    model: str | os.PathLike | None = None,
    *,
    labels: str | os.PathLike | None = None,
    mean_file: str | os.PathLike | None = None,
    **overrides: Any,
) -> ClassifySetup:
    """Resolve ``--weights`` (a file or ``zoo:NAME``), the deploy prototxt, preprocessing,
    mean and labels. With ``zoo:NAME`` the manifest supplies what is not given (its deploy
    prototxt, preprocessing, mean file and labels, downloaded and verified); ``overrides``
    replace single ``Preprocessing`` fields."""
    from netforge import zoo
    from netforge.weights import resolve_weights

    pre = Preprocessing()
    mean_path = Path(mean_file) if mean_file else None
    labels_path = Path(labels) if labels else None
    if weights.startswith("zoo:"):
        name = weights[len("zoo:") :]
        manifest = zoo.load_manifest(name)
        pre = manifest.preprocessing
        if model is None:
            deploy = manifest.prototxts.get("deploy")
            model = deploy if deploy is not None else zoo.fetch_file(name, "deploy")
        if mean_path is None and pre.mean_file and not overrides.get("mean_values"):
            mean_path = zoo.fetch_file(name, pre.mean_file)
        if labels_path is None and pre.labels:
            labels_path = zoo.fetch_file(name, pre.labels)
    if model is None:
        raise ConfigError("--model DEPLOY is needed unless --weights is zoo:NAME")
    given = {k: v for k, v in overrides.items() if v is not None}
    if given.get("mean_values") or mean_file:
        pre = replace(pre, mean_file=None, mean_values=given.pop("mean_values", None))
    pre = replace(pre, **given)
    return ClassifySetup(
        model=Path(model),
        weights=resolve_weights(weights),
        preprocessing=pre,
        mean=channel_mean(mean_path) if mean_path else None,
        labels=read_labels(labels_path) if labels_path else None,
    )
