"""Caffe's DataTransformer, applied to a whole batch at once.

Caffe transforms one image at a time (BVLC/caffe src/caffe/data_transformer.cpp); the result
of each output element is the same here, computed for the batch with array indexing:

1. crop offsets: with ``crop_size`` > 0, uniform random ``h_off`` in [0, H - crop] and
   ``w_off`` in [0, W - crop] in TRAIN, the floor-centred offsets in TEST;
2. mirror: with ``mirror``, a horizontal flip with probability ½ in *both* phases (as Caffe);
3. ``mean_file`` (subtracted at the source pixel, i.e. cropped at the same offsets) or
   ``mean_value`` (one value for all channels, or one per channel), then ``scale``.

``force_color``/``force_gray`` act when encoded images are decoded (see ``datum.py``).
The random draws for a batch come from one generator in a fixed order (mirror flags, then
row offsets, then column offsets, each for the whole batch), so a batch depends only on the
generator's state, never on thread timing.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from netforge.errors import ConfigError, DataError
from netforge.proto import pb


@dataclass(frozen=True)
class Draw:
    """The random choices for one batch: per item row/column offsets and mirror flags."""

    h_off: np.ndarray
    w_off: np.ndarray
    mirror: np.ndarray


class Transformer:
    """Crop, mirror, mean and scale as Caffe's DataTransformer, for (N, C, H, W) batches.

    ``param`` is a ``TransformationParameter``; ``where`` names the layer in error messages.
    """

    def __init__(self, param: pb.TransformationParameter, phase: int, where: str) -> None:
        self.where = where
        self.phase = phase
        self.crop = int(param.crop_size)
        self.mirror = bool(param.mirror)
        self.scale = float(param.scale)
        self.force_color = bool(param.force_color)
        self.force_gray = bool(param.force_gray)
        if self.force_color and self.force_gray:
            raise ConfigError(f"{where}: force_color and force_gray cannot both be set")
        if param.HasField("mean_file") and len(param.mean_value):
            raise ConfigError(f"{where}: give either mean_file or mean_value, not both")
        self.mean_file: np.ndarray | None = None
        if param.HasField("mean_file"):
            from netforge.weights import read_mean

            self.mean_file = read_mean(param.mean_file).astype(np.float32)
        self.mean_value = np.asarray(param.mean_value, dtype=np.float32)

    def output_shape(self, shape: Sequence[int]) -> tuple[int, int, int]:
        """The (C, H, W) an input item of ``shape`` (C, H, W) becomes."""
        c, h, w = shape
        if self.crop:
            return c, self.crop, self.crop
        return c, h, w

    def draw(self, rng: np.random.Generator, sizes: np.ndarray) -> Draw:
        """Random choices for items of (H, W) ``sizes`` (an (N, 2) int array)."""
        n = len(sizes)
        mirror = rng.integers(0, 2, size=n).astype(bool) if self.mirror else np.zeros(n, bool)
        if self.crop and self.phase == pb.TRAIN:
            h_off = rng.integers(0, sizes[:, 0] - self.crop + 1, size=n)
            w_off = rng.integers(0, sizes[:, 1] - self.crop + 1, size=n)
        elif self.crop:
            h_off = (sizes[:, 0] - self.crop) // 2
            w_off = (sizes[:, 1] - self.crop) // 2
        else:
            h_off = w_off = np.zeros(n, np.int64)
        return Draw(h_off.astype(np.int64), w_off.astype(np.int64), mirror)

    def __call__(
        self,
        items: Sequence[np.ndarray],
        rng: np.random.Generator,
        dtype: np.dtype = np.float32,
        keys: Sequence[str] | None = None,
    ) -> np.ndarray:
        """Transform ``items`` ((C, H, W) uint8 or float arrays) into one (N, C, h, w) batch.

        Items may differ in size only when cropping (Caffe allows any size >= crop_size);
        the channel count, and without a crop the size, must match the first item's.
        ``keys`` name the items in errors.
        """
        keys = keys if keys is not None else [str(i) for i in range(len(items))]
        first = items[0].shape
        sizes = np.array([item.shape[1:] for item in items], dtype=np.int64).reshape(-1, 2)
        for key, item in zip(keys, items):
            if (
                item.ndim != 3
                or item.shape[0] != first[0]
                or (not self.crop and item.shape != first)
            ):
                raise DataError(
                    f"{self.where}: record {key!r} has shape {item.shape}, but the batch's "
                    f"first record has {first}; records must share their shape (or use crop)"
                )
        if self.crop and (sizes < self.crop).any():
            key = keys[int(np.flatnonzero((sizes < self.crop).any(axis=1))[0])]
            raise DataError(f"{self.where}: record {key!r} is smaller than crop_size {self.crop}")
        draw = self.draw(rng, sizes)
        batch = _stack(items, sizes)
        if self.mean_file is not None:
            if self.mean_file.shape != batch.shape[1:] or len(set(map(tuple, sizes))) > 1:
                raise DataError(
                    f"{self.where}: mean_file has shape {self.mean_file.shape} but the input "
                    f"is {items[0].shape}; the mean must be the size of the uncropped input"
                )
            # Subtracting the full-size mean before the crop is the same as subtracting it at
            # the source offsets, as Caffe does per pixel.
            batch = np.subtract(batch, self.mean_file, dtype=np.float32)
        out = _crop_mirror(batch, draw, self.output_shape(first)[1:])
        if self.mean_file is None and self.mean_value.size:
            if self.mean_value.size not in (1, first[0]):
                raise ConfigError(
                    f"{self.where}: give one mean_value or one per channel ({first[0]}), "
                    f"got {self.mean_value.size}"
                )
            # One pass: the cast to float and the subtraction together.
            out = np.subtract(out, self.mean_value.reshape(-1, 1, 1), dtype=dtype)
        else:
            out = out.astype(dtype, copy=False)  # the batch is a fresh array, ours to change
        if self.scale != 1:
            out *= self.scale
        return out


def _stack(items: Sequence[np.ndarray], sizes: np.ndarray) -> np.ndarray:
    """One (N, C, Hmax, Wmax) array; smaller items sit top-left (only crops read them)."""
    if (sizes == sizes[0]).all():
        return np.stack(items)
    h, w = sizes.max(axis=0)
    batch = np.zeros((len(items), items[0].shape[0], h, w), dtype=items[0].dtype)
    for slot, item in zip(batch, items):
        slot[:, : item.shape[1], : item.shape[2]] = item
    return batch


def _crop_mirror(batch: np.ndarray, draw: Draw, size: tuple[int, int]) -> np.ndarray:
    """Each item's (h, w) window at its offsets, flipped left-right where ``draw.mirror``."""
    ch, cw = size
    n, c, height, width = batch.shape
    if (ch, cw) == (height, width) and not draw.mirror.any():
        return batch
    index = np.arange(n)
    out = np.empty((n, c, ch, cw), dtype=batch.dtype)
    keep = ~draw.mirror
    # Advanced indices around a slice put the batch axis first: (n, C, ch, cw) windows.
    windows = sliding_window_view(batch, (ch, cw), axis=(2, 3))
    out[keep] = windows[index[keep], :, draw.h_off[keep], draw.w_off[keep]]
    if draw.mirror.any():
        # A window of the flipped batch is the flipped window; column j of the flipped
        # array is column width-1-j of the original.
        flipped = sliding_window_view(batch[..., ::-1], (ch, cw), axis=(2, 3))
        m = draw.mirror
        out[m] = flipped[index[m], :, draw.h_off[m], width - cw - draw.w_off[m]]
    return out
