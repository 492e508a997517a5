"""R-CNN window sampling: the batch source of the WindowData layer (Caffe's WindowDataLayer).

The window file repeats blocks of::

    # <image index>
    <image path>            (prefixed with root_folder)
    <channels>
    <height>
    <width>
    <number of windows>
    <class> <overlap> <x1> <y1> <x2> <y2>     (one line per window, inclusive pixel box)

Windows with overlap >= ``fg_threshold`` are foreground (their class, which must be > 0),
those with overlap < ``bg_threshold`` background (label 0). Each batch holds
``batch_size - int(batch_size * fg_fraction)`` background windows then the foreground ones,
each drawn uniformly with replacement. A window is enlarged by ``context_pad`` pixels of
context at the output scale (and made square with ``crop_mode: "square"``), clipped to the
image, warped bilinearly to ``crop_size`` (the clipped part keeps its place, the rest is 0),
optionally mirrored, then has the mean (the centre crop of ``mean_file``, or
``mean_value``) subtracted and is multiplied by ``window_data_param.scale`` — Caffe's
arithmetic, including its rounding of the padded geometry.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import numpy as np

from netforge.data.datum import read_image, resize
from netforge.data.pipeline import decode_map
from netforge.data.sources import child_rng, rank_rng
from netforge.errors import DataError
from netforge.proto import pb
from netforge.reading import read_text


@dataclass(frozen=True)
class Window:
    """One box of one image: label (0 for background), overlap and the inclusive box."""

    image: int
    label: int
    overlap: float
    x1: int
    y1: int
    x2: int
    y2: int


def read_window_file(path: str, root: str, fg: float, bg: float) -> tuple[list, list, list]:
    """(image paths, foreground windows, background windows) of a window file."""
    try:
        tokens = read_text(path).split()
    except OSError as exc:
        raise DataError(f"cannot read window file {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise DataError(f"window file {path} is not text (byte {exc.start})") from None
    images: list[str] = []
    fgs: list[Window] = []
    bgs: list[Window] = []
    pos = 0
    try:
        while pos < len(tokens):
            if tokens[pos] != "#":
                raise ValueError(f"expected '#' at token {pos}, got {tokens[pos]!r}")
            image_path = tokens[pos + 2]
            count = int(tokens[pos + 6])
            pos += 7
            index = len(images)
            images.append(os.path.join(root, image_path) if root else image_path)
            for _ in range(count):
                label, overlap = int(tokens[pos]), float(tokens[pos + 1])
                box = [int(t) for t in tokens[pos + 2 : pos + 6]]
                if len(box) != 4:
                    raise ValueError(f"the last window of {image_path} is cut short")
                pos += 6
                if overlap >= fg:
                    if label <= 0:
                        raise ValueError(f"foreground window of {image_path} has class {label}")
                    fgs.append(Window(index, label, overlap, *box))
                elif overlap < bg:
                    bgs.append(Window(index, 0, overlap, *box))
    except (ValueError, IndexError) as exc:
        raise DataError(f"window file {path} is malformed: {exc}") from None
    return images, fgs, bgs


class WindowSource:
    """Batches of warped windows, as Caffe's WindowDataLayer::load_batch."""

    def __init__(
        self,
        param: pb.LayerParameter,
        phase: int,
        rng: np.random.Generator,
        dtype: Any,
        where: str,
    ) -> None:
        p = param.window_data_param
        t = param.transform_param
        self.where = f"{where}, window file {p.source}"
        self.batch_size = int(p.batch_size)
        self.crop = int(t.crop_size)
        if not self.crop or not self.batch_size:
            raise DataError(f"{where}: transform_param.crop_size and batch_size must be > 0")
        self.mirror = bool(t.mirror)
        self.scale = float(p.scale)
        self.context_pad = int(p.context_pad)
        self.square = p.crop_mode == "square"
        if p.crop_mode not in ("warp", "square"):
            raise DataError(f"{where}: crop_mode must be 'warp' or 'square'")
        self.fg_count = int(self.batch_size * p.fg_fraction)
        self.images, self.fg, self.bg = read_window_file(
            p.source, p.root_folder, p.fg_threshold, p.bg_threshold
        )
        for kind, windows, need in (
            ("foreground", self.fg, self.fg_count),
            ("background", self.bg, self.batch_size - self.fg_count),
        ):
            if need and not windows:
                raise DataError(f"{self.where} has no {kind} windows")
        self.cache: dict[int, np.ndarray] | None = {} if p.cache_images else None
        self.channels = self._image(0).shape[0]
        self.mean = self._mean(t)
        self.rng = child_rng(rng)
        self.dtype = np.dtype(dtype)
        #: (rank, count) of a data-parallel run: each rank samples windows of its own
        #: (``rank_rng``) where the record-reading sources split their records.
        self.shard = (0, 1)

    def _mean(self, t: pb.TransformationParameter) -> np.ndarray:
        if t.HasField("mean_file"):
            from netforge.weights import read_mean

            mean = read_mean(t.mean_file)
            size = mean.shape[1]
            if mean.shape[2] != size or size < self.crop:
                raise DataError(f"{self.where}: mean_file must be square and >= crop_size")
            off = (size - self.crop) // 2
            return mean[:, off : off + self.crop, off : off + self.crop].astype(np.float32)
        values = np.asarray(t.mean_value, np.float32)
        if values.size not in (0, 1, self.channels):
            raise DataError(f"{self.where}: give one mean_value or one per channel")
        return (values if values.size else np.zeros(1, np.float32)).reshape(-1, 1, 1)

    def _image(self, index: int) -> np.ndarray:
        if self.cache is not None and index in self.cache:
            return self.cache[index]
        image = read_image(self.images[index], True)
        if self.cache is not None:
            self.cache[index] = image
        return image

    def shapes(self) -> list[tuple[int, ...]]:
        return [(self.batch_size, self.channels, self.crop, self.crop), (self.batch_size,)]

    def next_batch(self) -> list[np.ndarray]:
        n_bg = self.batch_size - self.fg_count
        rng = rank_rng(self.rng, self.shard)
        picks = [self.bg[i] for i in rng.integers(0, len(self.bg) or 1, n_bg)] + [
            self.fg[i] for i in rng.integers(0, len(self.fg) or 1, self.fg_count)
        ]
        mirrors = (
            rng.integers(0, 2, self.batch_size).astype(bool)
            if self.mirror
            else np.zeros(self.batch_size, bool)
        )
        # Loading and warping is per window (the decoding loop); mean and scale are then
        # applied to the whole batch, and the padding is set back to 0, because Caffe
        # writes only the warped pixels into its zeroed batch.
        warped = decode_map(self._warp, zip(picks, mirrors))
        data = np.zeros((self.batch_size, self.channels, self.crop, self.crop), np.float32)
        mask = np.zeros((self.batch_size, 1, self.crop, self.crop), bool)
        for i, (patch, (top, left)) in enumerate(warped):
            h, w = patch.shape[1:]
            data[i, :, top : top + h, left : left + w] = patch
            mask[i, :, top : top + h, left : left + w] = True
        data = np.where(mask, (data - self.mean) * np.float32(self.scale), 0)
        labels = np.array([w.label for w in picks], dtype=self.dtype)
        return [data.astype(self.dtype, copy=False), labels]

    def _warp(self, item: tuple[Window, bool]) -> tuple[np.ndarray, tuple[int, int]]:
        """The warped (and mirrored) pixels of one window and their (top, left) in the crop."""
        window, mirror = item
        image = self._image(window.image)
        rows, cols = image.shape[1:]
        x1, y1, x2, y2 = window.x1, window.y1, window.x2, window.y2
        crop = self.crop
        pad_top = pad_left = 0
        out_h = out_w = crop
        if self.context_pad > 0 or self.square:
            context = crop / (crop - 2 * self.context_pad)
            half_h, half_w = (y2 - y1 + 1) / 2.0, (x2 - x1 + 1) / 2.0
            cx, cy = x1 + half_w, y1 + half_h
            if self.square:
                half_h = half_w = max(half_h, half_w)
            x1, x2 = _round(cx - half_w * context), _round(cx + half_w * context)
            y1, y2 = _round(cy - half_h * context), _round(cy + half_h * context)
            full_h, full_w = y2 - y1 + 1, x2 - x1 + 1
            pad_x1, pad_y1 = max(0, -x1), max(0, -y1)
            pad_x2, pad_y2 = max(0, x2 - cols + 1), max(0, y2 - rows + 1)
            x1, x2, y1, y2 = x1 + pad_x1, x2 - pad_x2, y1 + pad_y1, y2 - pad_y2
            scale_x, scale_y = crop / full_w, crop / full_h
            out_w = _round((x2 - x1 + 1) * scale_x)
            out_h = _round((y2 - y1 + 1) * scale_y)
            pad_top = _round(pad_y1 * scale_y)
            pad_left = _round((pad_x2 if mirror else pad_x1) * scale_x)
            out_h = min(out_h, crop - pad_top)
            out_w = min(out_w, crop - pad_left)
        patch = resize(image[:, y1 : y2 + 1, x1 : x2 + 1], out_h, out_w)
        if mirror:
            patch = patch[:, :, ::-1]
        return patch.astype(np.float32), (pad_top, pad_left)

    def get_state(self) -> dict:
        return {"rng": self.rng.bit_generator.state}

    def set_state(self, state: dict) -> None:
        self.rng.bit_generator.state = state["rng"]


def _round(value: float) -> int:
    """C's round(): halves away from zero (Python's round() rounds halves to even)."""
    return int(np.sign(value) * np.floor(abs(value) + 0.5))
