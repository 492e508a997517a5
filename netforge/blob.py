"""Blob: an N-d array of data and its gradient (diff), as Caffe's Blob.

Shapes are set by ``reshape`` during shape inference; memory is allocated on first access
of ``data``/``diff``, so a whole net can infer its shapes before anything is allocated, and
a reshape to a size that still fits reuses the buffer.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from netforge.backend import CPU, Backend
from netforge.errors import ShapeError

MAX_BLOB_AXES = 32


class Blob:
    """Data and diff arrays of one shape on one backend, allocated lazily."""

    def __init__(
        self,
        shape: Sequence[int] = (),
        dtype: Any = np.float32,
        backend: Backend = CPU,
        name: str = "",
    ) -> None:
        self.name = name
        self.backend = backend
        self.dtype = np.dtype(dtype)
        self._shape: tuple[int, ...] = ()
        self._data: Any = None
        self._diff: Any = None
        self.reshape(shape)

    # -- shape ---------------------------------------------------------------------------
    @property
    def shape(self) -> tuple[int, ...]:
        return self._shape

    @property
    def count(self) -> int:
        return math.prod(self._shape)

    @property
    def num_axes(self) -> int:
        return len(self._shape)

    @property
    def xp(self) -> Any:
        return self.backend.xp

    def reshape(self, *shape: Any) -> None:
        """Set the shape; ``reshape(2, 3)`` and ``reshape((2, 3))`` both work (pycaffe)."""
        if len(shape) == 1 and not isinstance(shape[0], (int, np.integer)):
            shape = tuple(shape[0])
        shape = tuple(int(d) for d in shape)
        if len(shape) > MAX_BLOB_AXES:
            raise ShapeError(f"blob {self.name!r}: {len(shape)} axes, at most {MAX_BLOB_AXES}")
        if any(d < 0 for d in shape):
            raise ShapeError(f"blob {self.name!r}: negative dimension in shape {shape}")
        if shape == self._shape:
            return
        self._shape = shape
        self._data = self._fit(self._data)
        self._diff = self._fit(self._diff)

    def _fit(self, array: Any) -> Any:
        """Keep ``array``'s contents viewed at the new shape when the count is unchanged."""
        if array is None or array.size != self.count:
            return None
        return array.reshape(self._shape)

    def shape_index(self, axis: int) -> int:
        """Caffe's CanonicalAxisIndex: a negative axis counts from the end."""
        n = self.num_axes
        if not -n <= axis < max(n, 1):
            raise ShapeError(
                f"blob {self.name!r}: axis {axis} out of range for shape {self._shape}"
            )
        return axis % n if n else 0

    # -- arrays --------------------------------------------------------------------------
    @property
    def data(self) -> Any:
        if self._data is None:
            self._data = self.xp.zeros(self._shape, dtype=self.dtype)
        return self._data

    @data.setter
    def data(self, value: Any) -> None:
        self._data = self._checked(value, "data")

    @property
    def diff(self) -> Any:
        if self._diff is None:
            self._diff = self.xp.zeros(self._shape, dtype=self.dtype)
        return self._diff

    @diff.setter
    def diff(self, value: Any) -> None:
        self._diff = self._checked(value, "diff")

    def _checked(self, value: Any, what: str) -> Any:
        if tuple(value.shape) != self._shape:
            raise ShapeError(
                f"blob {self.name!r}: cannot set {what} of shape {tuple(value.shape)} "
                f"on a blob of shape {self._shape}"
            )
        return value

    def share_data(self, other: Blob) -> None:
        """Make this blob's data a view of ``other``'s (same count; Caffe's ShareData)."""
        self._data = other.data.reshape(self._shape)

    def share_diff(self, other: Blob) -> None:
        """Make this blob's diff a view of ``other``'s (same count; Caffe's ShareDiff)."""
        self._diff = other.diff.reshape(self._shape)

    def share(self, other: Blob) -> None:
        """Share both data and diff with ``other`` (shared parameters, in-place blobs)."""
        self.share_data(other)
        self.share_diff(other)

    def to(self, backend: Backend) -> None:
        """Move the arrays to ``backend``, keeping their contents."""
        if backend == self.backend:
            return
        self._data = None if self._data is None else backend.asarray(self._data)
        self._diff = None if self._diff is None else backend.asarray(self._diff)
        self.backend = backend

    def __repr__(self) -> str:
        return f"Blob({self.name!r}, shape={self._shape}, dtype={self.dtype}, {self.backend})"
