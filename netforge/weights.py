"""Weights and means on disk: BlobProto <-> arrays, ``.caffemodel`` (binary NetParameter),
``.caffemodel.h5`` (Caffe's HDF5 layout) and mean ``.binaryproto`` files.

Reading follows Caffe's Blob::FromProto: legacy num/channels/height/width dims win over
``shape`` when present, ``double_data`` over ``data``, and the value count must equal the
shape's product (a truncated file is an error, never zeros). Writing uses ``shape`` and
float ``data``, as Caffe's ToProto does.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from netforge.atomic import atomic_path, atomic_write
from netforge.errors import DataError, ShapeError
from netforge.memory import check_bytes
from netforge.proto import pb

_LEGACY_DIMS = ("num", "channels", "height", "width")


@dataclass(frozen=True)
class StoredBlob:
    """One parameter blob as a file stores it: its values and the shape recorded with them."""

    data: np.ndarray
    shape: tuple[int, ...]
    legacy: bool  # shape came from the 4-D num/channels/height/width fields

    def fits(self, target: tuple[int, ...]) -> bool:
        """Caffe's ShapeEquals: legacy 4-D shapes match targets right-aligned, 1-padded."""
        if self.legacy:
            return len(target) <= 4 and (1,) * (4 - len(target)) + tuple(target) == self.shape
        return tuple(target) == self.shape


def proto_shape(blob: pb.BlobProto) -> tuple[tuple[int, ...], bool]:
    """The shape a BlobProto records, and whether it is the legacy 4-D form."""
    if any(blob.HasField(d) for d in _LEGACY_DIMS):
        return tuple(int(getattr(blob, d)) for d in _LEGACY_DIMS), True
    return tuple(int(d) for d in blob.shape.dim), False


def stored_blob(blob: pb.BlobProto, where: str = "blob") -> StoredBlob:
    """Decode a BlobProto, checking that its value count matches its shape."""
    shape, legacy = proto_shape(blob)
    if any(d < 0 for d in shape):
        raise DataError(f"{where}: negative dimension in its shape {shape} (the file is corrupt)")
    if len(blob.double_data):
        data = np.asarray(blob.double_data, dtype=np.float64)
    else:
        data = np.asarray(blob.data, dtype=np.float32)
    if data.size != math.prod(shape):
        raise DataError(
            f"{where}: holds {data.size} values but its shape {shape} needs {math.prod(shape)} "
            "(the file is truncated or corrupt)"
        )
    return StoredBlob(data.reshape(shape), shape, legacy)


def array_from_proto(blob: pb.BlobProto) -> np.ndarray:
    """The array a BlobProto holds, shaped as it records."""
    return stored_blob(blob).data


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _packed_field(number: int, values: np.ndarray, dtype: str) -> bytes:
    """The wire bytes of a packed repeated float/double field: tag, length, little-endian
    values. Building them with numpy is ~100x faster than extending the repeated field."""
    payload = np.ascontiguousarray(values, dtype=dtype).tobytes()
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def array_to_proto(data: np.ndarray, diff: np.ndarray | None = None) -> pb.BlobProto:
    """A BlobProto with ``shape`` and float (or double, for float64 arrays) values."""
    blob = pb.BlobProto()
    data = np.asarray(data)
    blob.shape.dim.extend(data.shape)
    # BlobProto field numbers: data 5, diff 6 (float); double_data 8, double_diff 9.
    numbers, dtype = ((8, 9), "<f8") if data.dtype == np.float64 else ((5, 6), "<f4")
    wire = _packed_field(numbers[0], data.ravel(), dtype)
    if diff is not None:
        wire += _packed_field(numbers[1], np.asarray(diff).ravel(), dtype)
    blob.MergeFromString(wire)
    return blob


# -- trained weights -----------------------------------------------------------------------
WeightTable = dict[str, dict[int, StoredBlob]]


def is_hdf5(path: str | os.PathLike) -> bool:
    """Whether ``path`` is an HDF5 file (by its signature, as Caffe's H5Fis_hdf5)."""
    with open(path, "rb") as handle:
        return handle.read(8) == b"\x89HDF\r\n\x1a\n"


def load_weights(path: str | os.PathLike) -> pb.NetParameter:
    """A binary ``.caffemodel`` as a NetParameter, upgraded from V0/V1 as Caffe does."""
    from netforge.prototxt import read_binary
    from netforge.upgrade import upgrade_net

    net = read_binary(path, pb.NetParameter)
    if not net.layer and not net.layers:
        raise DataError(f"{path}: holds no layers; is it a caffemodel?")
    upgrade_net(net, str(path))
    return net


def read_weight_table(source: str | os.PathLike | pb.NetParameter) -> WeightTable:
    """Layer name -> {param index: StoredBlob} from a caffemodel, its HDF5 form or a message."""
    if isinstance(source, pb.NetParameter):
        return _table_from_net(source, "<NetParameter>")
    path = Path(source)
    if not os.path.isfile(path):  # False, not an OSError, for a name too long
        raise DataError(f"{path}: no such weights file")
    if is_hdf5(path):
        return _table_from_hdf5(path)
    return _table_from_net(load_weights(path), str(path))


def _table_from_net(net: pb.NetParameter, where: str) -> WeightTable:
    return {
        layer.name: {
            i: stored_blob(blob, f"{where}: layer {layer.name!r} blob {i}")
            for i, blob in enumerate(layer.blobs)
        }
        for layer in net.layer
    }


@contextlib.contextmanager
def hdf5_damage(head: str, tail: str) -> Iterator[None]:
    """Raise what h5py raises for a damaged file (OSError on a bad signature, RuntimeError on
    a damaged B-tree, KeyError, TypeError...; each means the same to the user) as one
    DataError: ``head (Type: message)tail``. A DataError passes through unchanged."""
    try:
        yield
    except DataError:
        raise
    except Exception as exc:
        raise DataError(f"{head} ({type(exc).__name__}: {exc}){tail}") from None


def refuse_links(handle: Any, path: str | os.PathLike) -> None:
    """Raise a DataError if the HDF5 file links outside itself (an external link would
    read, or probe, whatever file it names) or holds a dangling soft link."""
    import h5py

    def visit(name: str, link: Any) -> str | None:
        # An exception raised in here would come out of h5py mangled: return the message,
        # which also stops the walk.
        if isinstance(link, h5py.ExternalLink):
            return (
                f"{path}: {name!r} is a link to another file ({link.filename}); netforge reads "
                "only self-contained HDF5 files"
            )
        if isinstance(link, h5py.SoftLink) and link.path not in handle:
            return f"{path}: {name!r} is a link to {link.path!r}, which does not exist"
        return None

    problem = handle.visititems_links(visit)
    if problem:
        raise DataError(problem)


def read_dataset(dataset: Any, what: str) -> np.ndarray:
    """A numeric HDF5 dataset as an array, its size checked before it is read."""
    import h5py

    if not isinstance(dataset, h5py.Dataset) or dataset.dtype.kind not in "fiub":
        raise DataError(f"{what}: expected an array of numbers, found {dataset!r}")
    check_bytes(dataset.size * dataset.dtype.itemsize, what)
    return np.asarray(dataset[()])


def _table_from_hdf5(path: Path) -> WeightTable:
    import h5py

    table: WeightTable = {}
    damage = hdf5_damage(
        f"{path}: cannot read HDF5 weights",
        "; the file is damaged or not a Caffe HDF5 weights file",
    )
    with damage, h5py.File(path, "r") as handle:
        refuse_links(handle, path)
        group = handle.get("data")
        if not isinstance(group, h5py.Group):
            raise DataError(f"{path}: no /data group; not a Caffe HDF5 weights file")
        for layer_name, layer_group in group.items():
            where = f"{path}: layer {layer_name!r}"
            if not isinstance(layer_group, h5py.Group):
                raise DataError(f"{where} is not a group of parameter blobs")
            table[layer_name] = {}
            for key, dataset in layer_group.items():
                if not key.isdigit() or len(key) > 9:
                    raise DataError(f"{where}: blob name {key!r} is not a blob index")
                array = read_dataset(dataset, f"{where} blob {key}")
                table[layer_name][int(key)] = StoredBlob(array, array.shape, False)
    return table


def write_hdf5_weights(
    path: str | os.PathLike,
    layers: list[tuple[str, list[tuple[int, np.ndarray, np.ndarray | None]]]],
) -> None:
    """Caffe's HDF5 layout: ``/data/<layer>/<i>`` (and ``/diff/<layer>/<i>`` when given)."""
    import h5py

    with atomic_path(path) as tmp, h5py.File(tmp, "w") as handle:
        data, diff = handle.create_group("data"), None
        for layer_name, blobs in layers:
            layer_group = data.create_group(layer_name)
            for index, values, gradient in blobs:
                layer_group.create_dataset(str(index), data=values)
                if gradient is not None:
                    diff = diff if diff is not None else handle.create_group("diff")
                    diff.require_group(layer_name).create_dataset(str(index), data=gradient)


def resolve_weights(spec: str | os.PathLike) -> Path:
    """A weights file path; ``zoo:NAME`` downloads (once) the model zoo's weights for NAME."""
    text = os.fspath(spec)
    if text.startswith("zoo:"):
        from netforge.zoo import fetch_weights

        return fetch_weights(text[len("zoo:") :])
    path = Path(text)
    if not os.path.isfile(path):  # False, not an OSError, for a name too long
        raise DataError(f"{path}: no such weights file")
    return path


# -- means -----------------------------------------------------------------------------------
def read_mean(path: str | os.PathLike) -> np.ndarray:
    """A mean ``.binaryproto`` as a float32 (C, H, W) array (the first image if num > 1)."""
    from netforge.prototxt import read_binary

    blob = read_binary(path, pb.BlobProto)
    array = stored_blob(blob, str(path)).data.astype(np.float32)
    if array.ndim == 4 and array.shape[0] >= 1:
        array = array[0]
    if array.ndim != 3 or not array.size:
        raise ShapeError(
            f"{path}: a mean must be a non-empty (1,) C×H×W image, got shape {array.shape}"
        )
    return array


def write_mean(path: str | os.PathLike, mean: np.ndarray) -> None:
    """Write a (C, H, W) mean as compute_image_mean does: legacy dims (1, C, H, W) + data."""
    mean = np.asarray(mean, dtype=np.float32)
    if mean.ndim != 3:
        raise ShapeError(f"a mean image must be C×H×W, got shape {mean.shape}")
    blob = array_to_proto(mean)
    blob.ClearField("shape")
    blob.num, blob.channels, blob.height, blob.width = 1, *mean.shape
    with atomic_write(path, "wb") as handle:
        handle.write(blob.SerializeToString())
