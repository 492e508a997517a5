"""BlobProto conversion, mean binaryproto files, and Caffe's byte layout."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from netforge.errors import DataError, ShapeError
from netforge.proto import pb
from netforge.weights import array_to_proto, read_mean, stored_blob, write_mean


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_array_to_proto_is_byte_identical_to_protobufs_own_encoding(dtype) -> None:
    data = np.random.default_rng(0).normal(size=(3, 4)).astype(dtype)
    diff = -data
    reference = pb.BlobProto()
    reference.shape.dim.extend([3, 4])
    if dtype == np.float64:
        reference.double_data.extend(data.ravel().tolist())
        reference.double_diff.extend(diff.ravel().tolist())
    else:
        reference.data.extend(data.ravel().tolist())
        reference.diff.extend(diff.ravel().tolist())
    assert array_to_proto(data, diff).SerializeToString() == reference.SerializeToString()


def test_legacy_dims_win_over_shape_and_counts_are_checked() -> None:
    blob = pb.BlobProto(num=1, channels=2, height=1, width=3)
    blob.shape.dim.extend([7])
    blob.data.extend(range(6))
    stored = stored_blob(blob)
    assert stored.legacy and stored.shape == (1, 2, 1, 3)
    assert stored.fits((2, 1, 3)) and stored.fits((1, 2, 1, 3)) and not stored.fits((6,))
    blob.data.append(6)
    with pytest.raises(DataError, match="7 values but its shape"):
        stored_blob(blob)


def test_mean_binaryproto_round_trip_uses_legacy_dims(tmp_path: Path) -> None:
    mean = np.random.default_rng(1).uniform(0, 255, size=(3, 4, 5)).astype(np.float32)
    write_mean(tmp_path / "mean.binaryproto", mean)
    raw = pb.BlobProto()
    raw.ParseFromString((tmp_path / "mean.binaryproto").read_bytes())
    assert (raw.num, raw.channels, raw.height, raw.width) == (1, 3, 4, 5)
    assert not raw.HasField("shape")
    np.testing.assert_array_equal(read_mean(tmp_path / "mean.binaryproto"), mean)
    with pytest.raises(ShapeError):
        write_mean(tmp_path / "bad.binaryproto", mean[0])
    (tmp_path / "cut.binaryproto").write_bytes((tmp_path / "mean.binaryproto").read_bytes()[:50])
    with pytest.raises(DataError):
        read_mean(tmp_path / "cut.binaryproto")
