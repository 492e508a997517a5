"""What ``netforge classify`` needs around :class:`netforge.Classifier`: pycaffe's
``classify.py`` inputs (an image, a folder of images, or an ``.npy`` array of images), the
mean file, the labels, the top-k table, and a zoo model's deploy prototxt and preprocessing.

The preprocessing itself is ``netforge.Classifier`` (pycaffe's ``caffe.Classifier``): resize
to ``images_dim``, ten crops averaged (or the centre crop), HWC to CHW, channel swap, raw
scale, mean, input scale.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from netforge.errors import ConfigError, DataError, ShapeError
from netforge.zoo.manifest import Preprocessing

if TYPE_CHECKING:
    from netforge.classifier import Classifier


@dataclass(frozen=True)
class Prediction:
    """One of an image's top-k classes."""

    index: int
    label: str
    score: float


def load_inputs(
    path: str | os.PathLike, ext: str = "jpg", color: bool = True
) -> tuple[list[str], list[np.ndarray]]:
    """classify.py's input: an ``.npy`` array of (H, W, K) images, a folder (its ``*.ext``
    files, in name order), or one image file. Returns a name and an image per input; image
    files are read as RGB with ``color``, else as one intensity channel."""
    from netforge.io import load_image

    path = Path(os.path.expanduser(path))
    if path.suffix == ".npy":
        try:
            images = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise DataError(f"{path}: cannot read images ({exc})") from None
        if images.ndim != 4:
            raise ShapeError(f"{path}: an .npy input holds (N, H, W, K) images, got {images.shape}")
        return [f"{path}[{i}]" for i in range(len(images))], list(images)
    if path.is_dir():
        files = sorted(path.glob(f"*.{ext}"))
        if not files:
            raise DataError(f"{path}: no *.{ext} images in this folder (choose --ext)")
        return [str(f) for f in files], [load_image(f, color) for f in files]
    return [str(path)], [load_image(path, color)]


def load_mean(path: str | os.PathLike) -> np.ndarray:
    """A mean file as an array: ``.npy`` ((C, H, W) or (C,)) or a ``.binaryproto``."""
    path = Path(path)
    if path.suffix == ".npy":
        try:
            mean = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise DataError(f"{path}: cannot read mean ({exc})") from None
    else:
        from netforge.weights import read_mean

        mean = read_mean(path)
    if mean.ndim == 4 and mean.shape[0] == 1:
        mean = mean[0]
    if mean.ndim not in (1, 3):
        raise ShapeError(f"{path}: a mean must be (C,) or (C, H, W), got shape {mean.shape}")
    return mean.astype(np.float32)


def read_labels(path: str | os.PathLike) -> list[str]:
    """One label per line; surrounding quotes are dropped (some published synset files
    quote every line, as ``numpy.savetxt`` of strings writes them)."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise DataError(f"{path}: cannot read labels ({exc.strerror})") from exc
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: labels are not UTF-8 text (byte {exc.start})") from None
    labels = []
    for line in lines:
        line = line.strip()
        if len(line) >= 2 and line[0] == line[-1] and line[0] in "'\"":
            line = line[1:-1]
        if line:
            labels.append(line)
    return labels


def top_predictions(
    scores: np.ndarray, labels: Sequence[str] | None = None, top_k: int = 5
) -> list[list[Prediction]]:
    """The top-k classes of each row of (N, classes) scores, best first (ties: lower index)."""
    scores = np.asarray(scores).reshape(len(scores), -1)
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


def save_scores(path: str | os.PathLike, scores: np.ndarray) -> Path:
    """Write (N, classes) scores as ``.npy`` (classify.py's ``np.save``, which adds ``.npy``
    to a name without it), replacing the file whole or not at all. Returns the path."""
    from netforge.atomic import atomic_write

    target = Path(path if os.fspath(path).endswith(".npy") else f"{os.fspath(path)}.npy")
    try:
        with atomic_write(target, "wb") as handle:
            np.save(handle, scores)
    except OSError as exc:
        raise DataError(
            f"{target}: cannot write the probabilities: {exc.strerror or exc}"
        ) from None
    return target


@dataclass(frozen=True)
class ClassifySetup:
    """Everything ``classify`` needs, resolved from a zoo model or from explicit files."""

    model: Path
    weights: Path
    preprocessing: Preprocessing
    mean: np.ndarray | None
    labels: list[str] | None

    def classifier(self, **net_options: Any) -> Classifier:
        """The :class:`netforge.Classifier` this setup describes: the mean file's array, or
        else the manifest's per-channel mean values; an empty channel swap is none, and so
        is the default RGB-to-BGR swap for a net of one input channel (grey images)."""
        from netforge.classifier import Classifier

        pre = self.preprocessing
        mean = self.mean
        if mean is None and pre.mean_values is not None:
            mean = np.asarray(pre.mean_values, dtype=np.float32)
        classifier = Classifier(
            self.model,
            self.weights,
            image_dims=pre.resize,
            mean=mean,
            input_scale=pre.scale,
            raw_scale=pre.raw_scale,
            **net_options,
        )
        grey = classifier.blobs[classifier.inputs[0]].shape[1] == 1
        if pre.channel_swap and not (grey and pre.channel_swap == Preprocessing().channel_swap):
            classifier.transformer.set_channel_swap(classifier.inputs[0], pre.channel_swap)
        return classifier


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
        mean=load_mean(mean_path) if mean_path else None,
        labels=read_labels(labels_path) if labels_path else None,
    )
