"""Blob: lazy allocation, reshape reuse, sharing, pycaffe-style reshape arguments."""

from __future__ import annotations

import numpy as np
import pytest

from netforge.blob import Blob
from netforge.errors import ShapeError


def test_shape_is_known_before_memory_is_allocated() -> None:
    blob = Blob((2, 3, 4))
    assert blob.count == 24 and blob._data is None
    assert blob.data.shape == (2, 3, 4) and blob.data.dtype == np.float32
    assert not blob.diff.any()


def test_reshape_keeps_contents_when_count_is_unchanged() -> None:
    blob = Blob((2, 3))
    blob.data[...] = np.arange(6).reshape(2, 3)
    blob.reshape(3, 2)
    np.testing.assert_array_equal(blob.data, np.arange(6).reshape(3, 2))
    blob.reshape((4, 4))
    assert blob.data.shape == (4, 4) and not blob.data.any()


def test_set_data_checks_shape_and_sharing_is_a_view() -> None:
    a, b = Blob((2, 2), name="a"), Blob((4,), name="b")
    with pytest.raises(ShapeError, match="'a'"):
        a.data = np.zeros(3)
    b.share(a)
    a.data[0, 0] = 5
    a.diff[1, 1] = 7
    assert b.data[0] == 5 and b.diff[3] == 7


def test_axis_index_and_limits() -> None:
    blob = Blob((2, 3, 4))
    assert blob.shape_index(-1) == 2 and blob.shape_index(1) == 1
    with pytest.raises(ShapeError):
        blob.shape_index(3)
    with pytest.raises(ShapeError):
        Blob((1,) * 33)
