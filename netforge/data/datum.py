"""Datum records and images, as Caffe stores them.

A Datum (the value of every LMDB record) holds either raw pixels — uint8, C×H×W, channels
in OpenCV's BGR order — or, with ``encoded: true``, the bytes of an image file (JPEG, PNG).
``float_data`` is the float alternative to ``data``; ``label`` is Caffe's single int label;
``targets`` (field 1000) is netforge's list of float targets for multi-label or regression
records (Caffe ignores the unknown field, so such databases still open in Caffe).

Images are decoded with Pillow and handed out as C×H×W arrays in BGR order, so decoded
pixels land where OpenCV's ``imdecode`` would put them (JPEG decoders may differ by a unit
in the last place). Resizing follows ``cv::resize`` with ``INTER_LINEAR``.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
from google.protobuf.message import DecodeError
from PIL import Image, UnidentifiedImageError

from netforge.errors import DataError
from netforge.memory import check_bytes
from netforge.proto import pb
from netforge.reading import read_bytes

#: file extensions Caffe's encode_type accepts, mapped to Pillow's format names.
FORMATS = {
    "jpg": "JPEG",
    "jpeg": "JPEG",
    "png": "PNG",
    "bmp": "BMP",
    "tif": "TIFF",
    "tiff": "TIFF",
    "ppm": "PPM",
    "pgm": "PPM",
    "webp": "WEBP",
}


@dataclass
class Record:
    """One decoded record: the (C, H, W) image, the int label and the float targets."""

    image: np.ndarray
    label: int
    targets: tuple[float, ...]


# -- images ----------------------------------------------------------------------------------
def decode_image(data: bytes, color: bool | None = None, where: str = "image") -> np.ndarray:
    """Decode image file bytes into a (C, H, W) uint8 array, BGR for colour.

    ``color`` True gives 3 channels, False 1 channel, None the file's own channels (OpenCV's
    IMREAD_COLOR / IMREAD_GRAYSCALE / IMREAD_UNCHANGED; alpha is kept as BGRA).
    """
    try:
        with Image.open(io.BytesIO(data)) as img:
            img = _converted(img, color)
            array = np.asarray(img)
    except UnidentifiedImageError:
        raise DataError(f"{where}: cannot decode the image (not a known image format)") from None
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise DataError(f"{where}: cannot decode the image ({exc})") from None
    if array.ndim == 2:
        return array[np.newaxis]
    # RGB(A) -> BGR(A), then channels first: views, the batch stacking makes the one copy.
    if array.shape[2] == 3:
        return array[:, :, ::-1].transpose(2, 0, 1)
    return array[:, :, [2, 1, 0, 3]].transpose(2, 0, 1)


def _converted(img: Image.Image, color: bool | None) -> Image.Image:
    if color is True:
        return img.convert("RGB") if img.mode != "RGB" else img
    if color is False:
        return img.convert("L") if img.mode != "L" else img
    if img.mode in ("L", "RGB", "RGBA"):
        return img
    if img.mode in ("LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        return img.convert("RGBA")
    if img.mode.startswith("I") or img.mode == "1":
        return img.convert("L")
    return img.convert("RGB")


def encode_image(image: np.ndarray, fmt: str) -> bytes:
    """Encode a (C, H, W) uint8 BGR (or 1-channel) array as ``fmt`` (an extension)."""
    name = FORMATS.get(fmt.lower().lstrip("."))
    if name is None:
        raise DataError(f"unknown image encoding {fmt!r}; use one of {sorted(FORMATS)}")
    if image.shape[0] == 1:
        pil = Image.fromarray(image[0])
    else:
        order = [2, 1, 0, 3][: image.shape[0]]
        pil = Image.fromarray(np.ascontiguousarray(image[order].transpose(1, 2, 0)))
    out = io.BytesIO()
    pil.save(out, format=name, **({"quality": 95} if name == "JPEG" else {}))
    return out.getvalue()


def resize(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """Bilinear resize of a (C, H, W) array as ``cv::resize(..., INTER_LINEAR)``.

    Pixel centres are aligned (source x = (x + ½)·W/w − ½, clamped to the edges) and
    there is no antialiasing filter, as in OpenCV; uint8 results are rounded.
    """
    c, h, w = image.shape
    if (h, w) == (height, width):
        return image
    # The float32 rows and columns picked, their blend and the result: four of its size.
    check_bytes(4 * 4 * c * height * width, f"resizing an image to {height}x{width}")
    y0, y1, fy = _axis(h, height)
    x0, x1, fx = _axis(w, width)
    src = image.astype(np.float32)
    fx = fx[np.newaxis, np.newaxis, :]
    top = src[:, y0][:, :, x0] * (1 - fx) + src[:, y0][:, :, x1] * fx
    bottom = src[:, y1][:, :, x0] * (1 - fx) + src[:, y1][:, :, x1] * fx
    fy = fy[np.newaxis, :, np.newaxis]
    out = top * (1 - fy) + bottom * fy
    if image.dtype == np.uint8:
        return np.clip(np.floor(out + 0.5), 0, 255).astype(np.uint8)
    return out.astype(image.dtype)


def _axis(size: int, new: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    pos = (np.arange(new, dtype=np.float64) + 0.5) * (size / new) - 0.5
    pos = np.clip(pos, 0, size - 1)
    low = np.floor(pos).astype(np.int64)
    high = np.minimum(low + 1, size - 1)
    return low, high, (pos - low).astype(np.float32)


def read_image(path: str, color: bool = True, height: int = 0, width: int = 0) -> np.ndarray:
    """Caffe's ReadImageToCVMat: a file as (C, H, W) uint8 BGR, resized if both sizes > 0."""
    try:
        data = read_bytes(path)
    except OSError as exc:
        raise DataError(f"cannot read image {path}: {exc.strerror or exc}") from None
    image = decode_image(data, color, where=path)
    if height > 0 and width > 0:
        image = resize(image, height, width)
    return image


# -- Datum -----------------------------------------------------------------------------------
def make_datum(
    image: np.ndarray | bytes,
    label: int = 0,
    targets: tuple[float, ...] | list[float] = (),
) -> pb.Datum:
    """A Datum with the fields Caffe sets, in its order.

    A (C, H, W) uint8 array gives a raw Datum (channels, height, width, data, label,
    ``encoded: false``) as CVMatToDatum + ReadImageToDatum write it; a float array goes to
    ``float_data``; bytes give an encoded Datum (data, label, ``encoded: true``).
    """
    datum = pb.Datum()
    if isinstance(image, (bytes, bytearray)):
        datum.data = bytes(image)
        datum.label = int(label)
        datum.encoded = True
    else:
        image = np.asarray(image)
        if image.ndim != 3:
            raise DataError(f"a Datum holds a (C, H, W) array, got shape {image.shape}")
        datum.channels, datum.height, datum.width = (int(d) for d in image.shape)
        if image.dtype == np.uint8:
            datum.data = np.ascontiguousarray(image).tobytes()
        else:
            datum.float_data.extend(np.asarray(image, np.float32).ravel().tolist())
        datum.label = int(label)
        datum.encoded = False
    if len(targets):
        datum.targets.extend(float(t) for t in targets)
    return datum


def parse_datum(value: bytes, where: str) -> pb.Datum:
    """Parse a serialized Datum; ``where`` (source and key) names it in the DataError."""
    datum = pb.Datum()
    try:
        datum.ParseFromString(value)
    except DecodeError as exc:
        raise DataError(f"{where}: the record is not a Datum ({exc})") from None
    return datum


def datum_image(datum: pb.Datum, color: bool | None = None, where: str = "datum") -> np.ndarray:
    """The (C, H, W) array a Datum holds: decoded if encoded, else its bytes or floats.

    ``color`` applies to encoded records only (force_color / force_gray), as in Caffe.
    """
    if datum.encoded:
        return decode_image(datum.data, color, where=where)
    shape = (datum.channels, datum.height, datum.width)
    size = shape[0] * shape[1] * shape[2]
    if datum.data:
        values = np.frombuffer(datum.data, dtype=np.uint8)
    else:
        values = np.asarray(datum.float_data, dtype=np.float32)
    if size == 0 or values.size != size:
        raise DataError(
            f"{where}: the record holds {values.size} values for shape {shape}; it is "
            "truncated or not an image Datum"
        )
    return values.reshape(shape)


def decode_record(value: bytes, color: bool | None, where: str) -> Record:
    """A serialized Datum as a Record (run in decoding workers)."""
    datum = parse_datum(value, where)
    return Record(datum_image(datum, color, where), datum.label, tuple(datum.targets))
