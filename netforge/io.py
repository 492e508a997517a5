"""pycaffe's ``caffe.io``: image loading and resizing, crops, the input Transformer, and the
conversions between arrays and BlobProto / Datum messages.

Names, signatures, defaults and checks are pycaffe's (BVLC ``python/caffe/io.py``), so
``import netforge.io`` (or ``caffe.io`` after ``import netforge as caffe``) runs pycaffe code
unchanged. Images are read with Pillow and resized with numpy instead of scikit-image and
SciPy; ``resize_image`` says how its interpolation relates to scikit-image's.

Where pycaffe raises ``ValueError`` (a shape it cannot use), this module raises
:class:`ArrayShapeError`, which is both a :class:`netforge.errors.ShapeError` and a
``ValueError``, so code written for either catches it.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from netforge.errors import ConfigError, DataError, ShapeError
from netforge.proto import pb

__all__ = [
    "ArrayShapeError",
    "Transformer",
    "array_to_blobproto",
    "array_to_datum",
    "arraylist_to_blobprotovector_str",
    "blobproto_to_array",
    "blobprotovector_str_to_arraylist",
    "datum_to_array",
    "load_image",
    "oversample",
    "resize_image",
]


class ArrayShapeError(ShapeError, ValueError):
    """An array or message whose shape pycaffe's io rejects with ``ValueError``."""


# -- proto / datum / ndarray conversion -------------------------------------------------------
def blobproto_to_array(blob: pb.BlobProto, return_diff: bool = False) -> np.ndarray:
    """The data (or, with ``return_diff``, the diff) of a BlobProto as a float64 array.

    The shape is the legacy (num, channels, height, width) when any of those fields is set,
    else ``shape.dim`` (no dims: a scalar), as pycaffe reads it. Values stored as
    ``double_data``/``double_diff`` (Caffe's float64 blobs) are read when the float fields are
    empty.
    """
    from netforge.weights import proto_shape

    values = blob.diff if return_diff else blob.data
    if not len(values):
        values = blob.double_diff if return_diff else blob.double_data
    data = np.asarray(values, dtype=np.float64)
    shape, _ = proto_shape(blob)
    if data.size != int(np.prod(shape)):
        raise ArrayShapeError(
            f"BlobProto holds {data.size} values but records shape {shape} "
            "(set num/channels/height/width or shape.dim to match)"
        )
    return data.reshape(shape)


def array_to_blobproto(arr: Any, diff: Any = None) -> pb.BlobProto:
    """A BlobProto with ``shape.dim`` and float32 ``data`` (and ``diff`` when given), as
    pycaffe writes it: the values are stored as floats whatever the array's dtype."""
    from netforge.weights import array_to_proto

    arr = np.asarray(arr)
    if diff is not None:
        diff = np.asarray(diff, dtype=np.float32)
        if diff.size != arr.size:
            raise ArrayShapeError(f"diff has {diff.size} values, the array {arr.size}")
    return array_to_proto(arr.astype(np.float32), diff)


def arraylist_to_blobprotovector_str(arraylist: Sequence[Any]) -> bytes:
    """A list of arrays as a serialized BlobProtoVector."""
    vec = pb.BlobProtoVector()
    vec.blobs.extend(array_to_blobproto(arr) for arr in arraylist)
    return vec.SerializeToString()


def blobprotovector_str_to_arraylist(str: bytes) -> list[np.ndarray]:  # noqa: A002 (pycaffe's name)
    """The arrays of a serialized BlobProtoVector."""
    from google.protobuf.message import DecodeError

    vec = pb.BlobProtoVector()
    try:
        vec.ParseFromString(str)
    except DecodeError as exc:
        raise DataError(f"not a serialized BlobProtoVector ({exc})") from None
    return [blobproto_to_array(blob) for blob in vec.blobs]


def array_to_datum(arr: Any, label: int | None = None) -> pb.Datum:
    """A (C, H, W) array as a Datum: uint8 arrays as bytes in ``data``, any other dtype as
    ``float_data``; the label is set only when given (pycaffe leaves it absent otherwise)."""
    from netforge.data.datum import make_datum

    arr = np.asarray(arr)
    if arr.ndim != 3:
        raise ArrayShapeError(f"a Datum holds a (C, H, W) array, got shape {arr.shape}")
    datum = make_datum(arr, 0 if label is None else label)
    # pycaffe sets neither ``encoded`` nor an absent label: keep the message byte-identical.
    datum.ClearField("encoded")
    if label is None:
        datum.ClearField("label")
    return datum


def datum_to_array(datum: pb.Datum) -> np.ndarray:
    """The (C, H, W) array of a Datum: uint8 from ``data``, float64 from ``float_data``
    (pycaffe's types); an encoded Datum (JPEG/PNG bytes) is decoded. The label is not
    returned: read ``datum.label``."""
    from netforge.data.datum import datum_image

    array = datum_image(datum)
    return array if array.dtype == np.uint8 else array.astype(np.float64)


# -- pre-processing ---------------------------------------------------------------------------
class Transformer:
    """pycaffe's input Transformer: formats (H, W, K) images for a net's input blobs.

    ``Transformer(inputs)`` takes a mapping of input name to blob shape, e.g.
    ``{"data": net.blobs["data"].data.shape}``. Each ``set_*`` configures one step for one
    input; ``preprocess`` applies them in pycaffe's order (resize to the blob's height and
    width, transpose, channel swap, raw scale, mean, input scale) and ``deprocess`` inverts
    them. Unlike pycaffe's, ``preprocess`` never writes into the caller's array.
    """

    def __init__(self, inputs: Mapping[str, Sequence[int]]) -> None:
        self.inputs = {name: tuple(int(d) for d in shape) for name, shape in inputs.items()}
        self.transpose: dict[str, tuple[int, ...]] = {}
        self.channel_swap: dict[str, tuple[int, ...]] = {}
        self.raw_scale: dict[str, float] = {}
        self.mean: dict[str, np.ndarray] = {}
        self.input_scale: dict[str, float] = {}

    def _check_input(self, in_: str) -> None:
        if in_ not in self.inputs:
            raise ConfigError(f"{in_!r} is not one of the net inputs: {list(self.inputs)}")

    def preprocess(self, in_: str, data: Any) -> np.ndarray:
        """An (H', W', K) image as the (K, H, W) float32 input of blob ``in_``: resized to
        the blob's (H, W) when it differs, then transposed, channel-swapped, multiplied by
        the raw scale, mean-subtracted and multiplied by the input scale (each when set)."""
        self._check_input(in_)
        caffe_in = np.asarray(data).astype(np.float32)  # a copy: the steps below work in place
        in_dims = self.inputs[in_][2:]
        if caffe_in.shape[:2] != in_dims:
            caffe_in = resize_image(caffe_in, in_dims)
        if in_ in self.transpose:
            caffe_in = caffe_in.transpose(self.transpose[in_])
        if in_ in self.channel_swap:
            caffe_in = caffe_in[list(self.channel_swap[in_]), :, :]
        if in_ in self.raw_scale:
            caffe_in *= self.raw_scale[in_]
        if in_ in self.mean:
            caffe_in -= self.mean[in_]
        if in_ in self.input_scale:
            caffe_in *= self.input_scale[in_]
        return caffe_in

    def deprocess(self, in_: str, data: Any) -> np.ndarray:
        """Invert :meth:`preprocess` (except the resize) on a (K, H, W) or (1, K, H, W)
        array: divide by the input scale, add the mean, divide by the raw scale, undo the
        channel swap and the transpose."""
        self._check_input(in_)
        decaf_in = np.array(data, copy=True).squeeze()
        if in_ in self.input_scale:
            decaf_in /= self.input_scale[in_]
        if in_ in self.mean:
            decaf_in += self.mean[in_]
        if in_ in self.raw_scale:
            decaf_in /= self.raw_scale[in_]
        if in_ in self.channel_swap:
            decaf_in = decaf_in[np.argsort(self.channel_swap[in_]), :, :]
        if in_ in self.transpose:
            decaf_in = decaf_in.transpose(np.argsort(self.transpose[in_]))
        return decaf_in

    def set_transpose(self, in_: str, order: Sequence[int]) -> None:
        """The order of the image's dimensions for the blob, e.g. (2, 0, 1) makes an
        (H, W, K) image (K, H, W)."""
        self._check_input(in_)
        if len(order) != len(self.inputs[in_]) - 1:
            raise ConfigError(
                f"transpose order {tuple(order)} for {in_!r} needs "
                f"{len(self.inputs[in_]) - 1} axes, as the input {self.inputs[in_]} has"
            )
        self.transpose[in_] = tuple(int(i) for i in order)

    def set_channel_swap(self, in_: str, order: Sequence[int]) -> None:
        """The order to take the channels in, after the transpose: (2, 1, 0) makes RGB BGR."""
        self._check_input(in_)
        if len(order) != self.inputs[in_][1]:
            raise ConfigError(
                f"channel swap {tuple(order)} for {in_!r} needs one entry per channel "
                f"({self.inputs[in_][1]})"
            )
        self.channel_swap[in_] = tuple(int(i) for i in order)

    def set_raw_scale(self, in_: str, scale: float) -> None:
        """Multiply the raw image by ``scale`` before the mean (255 for [0, 1] images fed to
        nets trained on [0, 255] pixels, as CaffeNet)."""
        self._check_input(in_)
        self.raw_scale[in_] = scale

    def set_mean(self, in_: str, mean: Any) -> None:
        """The mean to subtract: (K,) per channel, or (K, H, W) / (H, W) per element. An
        element-wise mean of another size is resized to the blob's (H, W), as pycaffe does
        (after scaling it to [0, 1] and back)."""
        self._check_input(in_)
        mean = np.asarray(mean)
        shape = mean.shape
        if mean.ndim == 1:
            if shape[0] != self.inputs[in_][1]:
                raise ArrayShapeError(
                    f"mean has {shape[0]} channels, input {in_!r} {self.inputs[in_][1]}"
                )
            mean = mean[:, np.newaxis, np.newaxis]
        else:
            if len(shape) == 2:
                shape = (1, *shape)
            if len(shape) != 3:
                raise ArrayShapeError(f"a mean must be (K,), (H, W) or (K, H, W), got {shape}")
            in_shape = self.inputs[in_][1:]
            if shape != in_shape:
                mean = _resize_mean(mean.reshape(shape), in_shape)
        self.mean[in_] = mean

    def set_input_scale(self, in_: str, scale: float) -> None:
        """Multiply the preprocessed input by ``scale`` after the mean subtraction."""
        self._check_input(in_)
        self.input_scale[in_] = scale


def _resize_mean(mean: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """A (K, H', W') mean resized to ``shape`` = (K, H, W) through [0, 1], as pycaffe."""
    low, high = mean.min(), mean.max()
    if high <= low:  # constant: pycaffe would divide by zero
        return np.full(shape, low, dtype=np.float32)
    normal = (mean - low) / (high - low)
    resized = resize_image(normal.transpose(1, 2, 0), shape[1:])
    return resized.transpose(2, 0, 1) * (high - low) + low


# -- image IO ---------------------------------------------------------------------------------
# scikit-image's rgb2gray weights (ITU-R BT.709), what pycaffe's load_image(color=False) uses.
_GREY = np.array([0.2125, 0.7154, 0.0721])


def load_image(filename: str | os.PathLike, color: bool = True) -> np.ndarray:
    """An image file as float32 in [0, 1]: (H, W, 3) RGB with ``color`` (grey is repeated,
    alpha dropped), else (H, W, 1) intensity (colour converted with scikit-image's rgb2gray
    weights 0.2125, 0.7154, 0.0721). 8-bit images are divided by 255, 16-bit by 65535."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(filename) as image:
            if image.mode in ("I;16", "I;16B", "I;16L", "I", "F", "L", "LA", "RGB", "RGBA"):
                pixels = np.asarray(image)
            else:
                # Palette, CMYK, YCbCr, 1-bit: RGB(A), as skimage.io reads them.
                pixels = np.asarray(image.convert("RGBA" if _has_alpha(image) else "RGB"))
    except (OSError, UnidentifiedImageError) as exc:
        raise DataError(f"{filename}: cannot read image ({exc})") from None
    img = _as_float(pixels)
    if img.ndim == 3 and img.shape[2] in (2, 4):
        img = img[:, :, : img.shape[2] - 1]  # drop alpha
    if not color and img.ndim == 3 and img.shape[2] == 3:
        img = img @ _GREY
    if img.ndim == 3 and img.shape[2] == 1:
        img = img[:, :, 0]
    img = img.astype(np.float32)
    if img.ndim == 2:
        img = img[:, :, np.newaxis]
        if color:
            img = np.tile(img, (1, 1, 3))
    return img


def _has_alpha(image: Any) -> bool:
    return image.mode in ("PA", "La") or "transparency" in image.info


def _as_float(pixels: np.ndarray) -> np.ndarray:
    """scikit-image's img_as_float: unsigned integers over their range, floats unchanged."""
    if pixels.dtype.kind == "u":
        return pixels / float(np.iinfo(pixels.dtype).max)
    if pixels.dtype.kind == "i":
        return np.maximum(pixels / float(np.iinfo(pixels.dtype).max), -1.0)
    return pixels.astype(np.float64)


def resize_image(im: Any, new_dims: Sequence[int], interp_order: int = 1) -> np.ndarray:
    """Resize an (H, W, K) image to ``new_dims`` = (height, width); float32 out.

    As pycaffe: 1- and 3-channel images go through scikit-image's ``resize(order,
    mode='constant')``, which samples output pixel centres at input coordinates
    ``(i + 0.5) * in / out - 0.5`` and blends samples beyond the border with the image's
    minimum (pycaffe rescales to [0, 1] and skimage pads with 0); a constant image stays
    constant. Other channel counts go through SciPy's ``zoom``, which maps corner pixel to
    corner pixel (``i * (in - 1) / (out - 1)``).

    Orders 0 (nearest) and 1 (linear) are computed here with numpy, without scikit-image's
    optional anti-aliasing (which newer scikit-image applies when shrinking, and the
    scikit-image pycaffe was written for did not have). Spline orders 2 to 5 need SciPy,
    as in pycaffe.
    """
    im = np.asarray(im)
    if im.ndim != 3:
        raise ArrayShapeError(f"resize_image takes an (H, W, K) image, got shape {im.shape}")
    out_h, out_w = (int(d) for d in new_dims[:2])
    if out_h < 1 or out_w < 1:
        raise ArrayShapeError(f"cannot resize to {out_h}x{out_w}")
    if interp_order not in range(6):
        raise ConfigError(f"interp_order must be 0 to 5, got {interp_order!r}")
    skimage_path = im.shape[-1] in (1, 3)
    if skimage_path:
        low, high = im.min(), im.max()
        if high <= low:
            return np.full((out_h, out_w, im.shape[-1]), low, dtype=np.float32)
    if interp_order > 1:
        return _spline_resize(im, (out_h, out_w), interp_order, skimage_path)
    image = im.astype(np.float64 if im.dtype == np.float64 else np.float32)
    border = low if skimage_path else 0.0
    for axis, n_out in ((0, out_h), (1, out_w)):
        image = _resample_axis(image, axis, n_out, interp_order, skimage_path, border)
    return image.astype(np.float32)


def _resample_axis(
    image: np.ndarray, axis: int, n_out: int, order: int, centres: bool, border: float
) -> np.ndarray:
    """Resample one axis: pixel centres (skimage, samples beyond the edge blend with
    ``border``) or corner-aligned (ndimage.zoom)."""
    n_in = image.shape[axis]
    if n_in == n_out:
        return image
    if centres:
        coords = (np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5
    else:
        coords = np.arange(n_out) * ((n_in - 1) / (n_out - 1)) if n_out > 1 else np.zeros(1)
    if order == 0:
        index = np.clip(np.floor(coords + 0.5).astype(np.intp), 0, n_in - 1)
        return np.take(image, index, axis=axis)
    # Pad one border sample on each side so that neighbours beyond the edge read ``border``.
    pad = [(0, 0)] * image.ndim
    pad[axis] = (1, 1)
    padded = np.pad(image, pad, constant_values=border)
    low = np.floor(coords).astype(np.intp)
    frac = (coords - low).astype(image.dtype)
    low = np.clip(low, -1, n_in - 1) + 1
    shape = [1] * image.ndim
    shape[axis] = n_out
    frac = frac.reshape(shape)
    a = np.take(padded, low, axis=axis)
    b = np.take(padded, np.minimum(low + 1, n_in + 1), axis=axis)
    return a * (1 - frac) + b * frac


def _spline_resize(im: np.ndarray, dims: tuple[int, int], order: int, skimage_path: bool):
    try:
        from scipy import ndimage
    except ImportError:
        raise ConfigError(
            f"resize_image with interp_order={order} (spline) needs SciPy, as pycaffe's "
            "does: pip install scipy (orders 0 and 1 need nothing)"
        ) from None
    factors = (dims[0] / im.shape[0], dims[1] / im.shape[1], 1.0)
    if skimage_path:
        low, high = im.min(), im.max()
        std = (im.astype(np.float64) - low) / (high - low)
        out = ndimage.zoom(std, factors, order=order, mode="grid-constant", grid_mode=True)
        out = np.clip(out, 0.0, 1.0)  # skimage clips spline overshoot to the input's range
        return (out * (high - low) + low).astype(np.float32)
    return ndimage.zoom(im, factors, order=order).astype(np.float32)


def oversample(images: Sequence[np.ndarray] | np.ndarray, crop_dims: Sequence[int]) -> np.ndarray:
    """The ten crops of each (H, W, K) image: the four corners and the centre, then the
    same five mirrored left to right; (10 N, h, w, K) float32 for ``crop_dims`` = (h, w).

    The centre crop starts at ``H / 2 - h / 2`` (truncated), as pycaffe computes it.
    """
    if not isinstance(images, np.ndarray):
        if len({np.shape(im) for im in images}) > 1:
            raise ArrayShapeError("oversample takes images of one size: resize them first")
    images = np.asarray(images, dtype=np.float32)
    if images.ndim != 4:
        raise ArrayShapeError(f"oversample takes (N, H, W, K) images, got shape {images.shape}")
    height, width = images.shape[1:3]
    crop_h, crop_w = (int(d) for d in crop_dims[:2])
    if crop_h > height or crop_w > width:
        raise ArrayShapeError(
            f"cannot crop {crop_h}x{crop_w} from {height}x{width} images: resize them to at "
            "least the crop size first"
        )
    tops = [0, 0, height - crop_h, height - crop_h, int(height / 2.0 - crop_h / 2.0)]
    lefts = [0, width - crop_w, 0, width - crop_w, int(width / 2.0 - crop_w / 2.0)]
    # Gather all five crops of all images at once: index arrays (5, h) and (5, w).
    rows = np.asarray(tops)[:, None] + np.arange(crop_h)
    cols = np.asarray(lefts)[:, None] + np.arange(crop_w)
    crops = images[:, rows[:, :, None], cols[:, None, :], :]  # (N, 5, h, w, K)
    crops = np.concatenate([crops, crops[:, :, :, ::-1, :]], axis=1)
    return crops.reshape(-1, crop_h, crop_w, images.shape[-1])
